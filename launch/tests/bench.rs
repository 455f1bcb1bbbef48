//! `bellows bench`: the training-step and matrix-product benchmarks print what docs/BENCHMARKS.md
//! reads, and the product list stays the peer script's.

mod common;

use common::bellows;

fn json_lines(args: &[&str]) -> Vec<serde_json::Value> {
    let out = bellows().args(args).output().expect("bellows runs");
    assert!(
        out.status.success(),
        "bellows {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn the_tiny_training_bench_reports_throughput_memory_and_a_falling_loss() {
    let lines = json_lines(&[
        "bench",
        "--mode",
        "tiny",
        "--threads",
        "1",
        "--warmup",
        "1",
        "--steps",
        "30",
    ]);
    assert_eq!(lines.len(), 1);
    let r = &lines[0];
    assert_eq!(r["mode"], "tiny");
    assert!(r["tokens_per_sec"].as_f64().expect("tokens/s") > 0.0);
    assert!(r["peak_rss_mib"].as_f64().expect("rss") > 1.0);
    let (first, last) = (
        r["loss_first_last"][0].as_f64().expect("first loss"),
        r["loss_first_last"][1].as_f64().expect("last loss"),
    );
    assert!(
        last < first,
        "31 AdamW steps on one batch lower its loss: {first} -> {last}"
    );
}

#[test]
fn the_gemm_bench_times_every_product_of_the_peer_list() {
    let lines = json_lines(&["bench", "--mode", "gemm", "--threads", "2"]);
    let peer = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../benches/peer/torch_lora_bench.py"
    ))
    .expect("the peer script");
    // The backend's matmul, then the fused ops' kernels, each over the whole list.
    let cases = bellows_trainer::GEMM_CASES;
    assert_eq!(lines.len(), 2 * cases.len());
    for (i, (r, c)) in lines.iter().zip(cases.iter().chain(cases)).enumerate() {
        assert_eq!(r["case"], c.name);
        let kernel = if i < cases.len() { "backend" } else { "fused" };
        assert_eq!(r["kernel"], kernel);
        assert_eq!(r["dtype"], "f32");
        let g = r["gflops_per_sec"].as_f64().expect("GFLOP/s");
        assert!(g.is_finite() && g > 0.0, "{}: {g}", c.name);
        // The same product, written the peer's way: ("name", batch, m, k, n, rhs_t).
        let t = if c.rhs_t { "True" } else { "False" };
        let row = format!(
            "(\"{}\", {}, {}, {}, {}, {})",
            c.name, c.batch, c.m, c.k, c.n, t
        );
        assert!(
            peer.contains(&row),
            "the peer script's GEMM_CASES lacks {row}"
        );
    }
}
