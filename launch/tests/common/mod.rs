//! Helpers shared by the `bellows launch` integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Builder, ListBuilder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

/// The `bellows` binary under test.
pub fn bellows() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bellows"))
}

/// 48 rows of different lengths in row groups of 4: each rank's 4-row batch is one row group,
/// so N ranks × 4 rows cover exactly the rows of one process's 4·N-row batch.
pub fn write_data(path: &Path) {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "input_ids",
        DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
        false,
    )]));
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(4))
        .build();
    let file = std::fs::File::create(path).expect("create");
    let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props)).expect("writer");
    let mut b = ListBuilder::new(Int32Builder::new());
    for r in 0..48i32 {
        let len = 5 + (r * 7) % 12;
        let d = 1 + r % 3;
        for t in 0..len {
            b.values().append_value((r * 11 + t * d) % 64);
        }
        b.append(true);
    }
    let col: ArrayRef = Arc::new(b.finish());
    w.write(&RecordBatch::try_new(schema, vec![col]).expect("batch"))
        .expect("write");
    w.close().expect("close");
}

pub fn job(dir: &Path) -> PathBuf {
    let data = dir.join("rows.parquet");
    write_data(&data);
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
seed = 3
max_steps = 4
log_every = 1
[model.init]
vocab_size = 64
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
[data]
train = "{}"
seq_len = 16
batch_size = 4
shuffle = "off"
[optim]
lr = 1e-2
warmup_steps = 0
[peft]
method = "lora"
r = 4
alpha = 8.0
target_modules = "all-linear"
init = "gaussian"
[dist]
timeout_secs = 60
[logging]
progress = "plain"
"#,
            data.display()
        ),
    )
    .expect("write job");
    cfg
}

/// `bellows launch` of `cfg` on `nproc` local ranks into `out`, with extra arguments.
pub fn launch(cfg: &Path, out: &Path, nproc: usize, extra: &[&str]) -> Output {
    bellows()
        .arg("launch")
        .args(["--nproc-per-node", &nproc.to_string()])
        .arg(cfg)
        .args(["--set", &format!("run.output_dir={}", out.display())])
        .args(extra)
        .output()
        .expect("run launch")
}

/// The job's arguments plus a checkpoint every 2 steps and a constant schedule, so that a run
/// stopped after step 2 trains steps 1–2 exactly as the whole run does.
fn every_2(extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for s in [
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "optim.scheduler=\"constant\"",
    ] {
        a.push(s.to_string());
    }
    a
}

/// Launches the job on `nproc` ranks twice: whole into `dir/whole`, and stopped after step 2
/// (its checkpoint written) into `dir/part`; returns `(whole, part)`. [`resume_part`] continues
/// `part` from that checkpoint.
pub fn whole_and_stopped_at_2(
    cfg: &Path,
    dir: &Path,
    nproc: usize,
    extra: &[&str],
    what: &str,
) -> (PathBuf, PathBuf) {
    let args = every_2(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let whole = dir.join("whole");
    check(&launch(cfg, &whole, nproc, &args), &format!("{what} whole"));
    let part = dir.join("part");
    let mut first = args.clone();
    first.extend(["--set", "run.max_steps=2"]);
    check(
        &launch(cfg, &part, nproc, &first),
        &format!("{what} to step 2"),
    );
    (whole, part)
}

/// Resumes the run in `part` (see [`whole_and_stopped_at_2`]) from its latest checkpoint.
pub fn resume_part(cfg: &Path, part: &Path, nproc: usize, extra: &[&str], what: &str) {
    let mut args = every_2(extra);
    args.extend(["--set", "checkpoint.resume=\"latest\""].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    check(&launch(cfg, part, nproc, &args), &format!("{what} resumed"));
}

/// Fails the test with both output streams unless `out` succeeded.
pub fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every f32 tensor of a safetensors file, sorted by name: `(name, shape, values)`.
pub fn tensors(file: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = st.tensor(&n).expect("tensor");
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, v.shape().to_vec(), vals)
        })
        .collect()
}

/// The tensors of two files agree within 1e-6 + 1e-5·|b| (DDP vs ZeRO/FSDP summation order).
pub fn assert_close_files(a: &Path, b: &Path, what: &str) {
    let (x, y) = (tensors(a), tensors(b));
    assert_eq!(x.len(), y.len(), "{what}: tensor count");
    assert!(!x.is_empty(), "{what}: no tensors");
    for ((n1, s1, v1), (n2, s2, v2)) in x.iter().zip(&y) {
        assert_eq!((n1, s1), (n2, s2), "{what}: names and shapes");
        for (i, (p, q)) in v1.iter().zip(v2).enumerate() {
            assert!(
                (p - q).abs() <= 1e-6 + 1e-5 * q.abs(),
                "{what}: {n1}[{i}] {p} vs {q}"
            );
        }
    }
}

/// The PEFT adapters two runs wrote agree ([`assert_close_files`]).
pub fn assert_same_adapter(a: &Path, b: &Path, what: &str) {
    let f = "adapter/adapter_model.safetensors";
    assert_close_files(&a.join(f), &b.join(f), what);
}

/// The Hugging Face models two runs wrote agree ([`assert_close_files`]).
pub fn assert_same_model(a: &Path, b: &Path, what: &str) {
    let f = "model/model.safetensors";
    assert_close_files(&a.join(f), &b.join(f), what);
}

/// Largest |a − b| over the tensors of two safetensors files (same names and shapes).
pub fn max_diff(a: &Path, b: &Path) -> f32 {
    let (x, y) = (tensors(a), tensors(b));
    assert_eq!(x.len(), y.len(), "tensor count");
    let mut worst = 0f32;
    for ((n1, s1, v1), (n2, s2, v2)) in x.iter().zip(&y) {
        assert_eq!((n1, s1), (n2, s2), "names and shapes");
        for (p, q) in v1.iter().zip(v2) {
            worst = worst.max((p - q).abs());
        }
    }
    worst
}

/// The worker processes a launcher spawned (its children, from /proc).
pub fn worker_pids(launcher: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
        .expect("children")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
