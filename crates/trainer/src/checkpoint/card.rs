//! The model card: `<output_dir>/README.md`, written at the end of training, in the Hugging Face
//! layout (YAML front matter, then prose): base model, method, data, steps, final metrics, config.

use std::fmt::Write;

use crate::config::RunConfig;
use crate::recipe::TrainReport;
use crate::Result;

/// Writes `<output_dir>/README.md` for a finished run.
///
/// # Errors
/// The file cannot be written.
pub fn write_model_card(cfg: &RunConfig, report: &TrainReport) -> Result<()> {
    let base = cfg.model.path.as_ref().map_or_else(
        || "random init ([model.init])".to_string(),
        |p| p.display().to_string(),
    );
    let method = format!("{:?}", cfg.peft.method).to_lowercase();
    let data = format!("{:?}", cfg.data.train);
    let mut s = String::new();
    let _ = writeln!(s, "---");
    if let Some(p) = &cfg.model.path {
        let _ = writeln!(s, "base_model: {}", p.display());
    }
    if cfg.peft.method != bellows_peft::Method::None {
        let _ = writeln!(s, "library_name: peft");
    }
    let _ = writeln!(s, "tags:\n- bellows\n- {method}\n---\n");
    let _ = writeln!(s, "# Model card\n");
    let _ = writeln!(
        s,
        "Fine-tuned with bellows {}.\n",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(s, "- Base model: {base}");
    let _ = writeln!(s, "- Method: {method}");
    let _ = writeln!(s, "- Training data: {data}");
    let _ = writeln!(s, "- Steps: {}", report.steps);
    let _ = writeln!(s, "- Training tokens: {}", report.tokens);
    let _ = writeln!(s, "- First loss: {:.6}", report.first_loss);
    let _ = writeln!(s, "- Final loss: {:.6}", report.final_loss);
    if let Some(e) = report.eval_loss {
        let _ = writeln!(s, "- Final eval loss: {e:.6}");
    }
    let _ = writeln!(s, "\n## Config\n\n```toml\n{}```", cfg.to_toml());
    let path = cfg.run.output_dir.join("README.md");
    let tmp = cfg.run.output_dir.join("README.md.tmp");
    super::save::write_synced(&tmp, s.as_bytes())?;
    std::fs::rename(&tmp, &path).map_err(|e| crate::Error::io(&path, e))
}
