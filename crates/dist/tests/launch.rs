//! The launcher with the `allreduce_worker` example as the worker program.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bellows_dist::launch::{run, LaunchOptions};
use bellows_dist::Error;
use common::with_timeout;

/// The `allreduce_worker` example. `cargo test -p bellows-dist` builds examples (in test mode as
/// `examples/allreduce_worker-<hash>`; `cargo build --examples` as `examples/allreduce_worker`): take the
/// newest. A filtered `cargo test --test launch` does not build examples.
fn worker() -> PathBuf {
    let dir = std::env::current_exe()
        .expect("exe")
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("examples");
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name == "allreduce_worker"
                || (name.starts_with("allreduce_worker-") && !name.contains('.'))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    match newest {
        Some((_, path)) => path,
        None => panic!("no allreduce_worker in {}: run the whole `cargo test -p bellows-dist` or `cargo build -p bellows-dist --examples`", dir.display()),
    }
}

fn opts(nproc: usize, out: &std::path::Path, extra: &[&str]) -> LaunchOptions {
    let mut args = vec!["--out".to_string(), out.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut o = LaunchOptions::local(nproc, worker(), args);
    o.stop_grace = Duration::from_secs(2);
    o
}

#[test]
fn two_and_three_workers_all_reduce_and_write_identical_results() {
    with_timeout(180, || {
        for nproc in [2, 3] {
            let dir = tempfile::tempdir().expect("tempdir");
            let report = run(&opts(nproc, dir.path(), &["--len", "5000"])).expect("launch");
            assert_eq!(report.restarts, 0);
            let results: Vec<String> = (0..nproc)
                .map(|r| {
                    std::fs::read_to_string(dir.path().join(format!("rank{r}.txt")))
                        .expect("result file")
                })
                .collect();
            assert!(results.iter().all(|r| r == &results[0]));
            let first: f64 = results[0]
                .lines()
                .next()
                .expect("line")
                .parse()
                .expect("number");
            // Element 0 is sum over ranks of (rank + 1).
            assert_eq!(first, (nproc * (nproc + 1) / 2) as f64);
        }
    });
}

#[test]
fn a_failing_worker_stops_the_rest_and_is_named() {
    with_timeout(120, || {
        let dir = tempfile::tempdir().expect("tempdir");
        let t0 = Instant::now();
        // Rank 1 exits with code 3 before joining; ranks 0 and 2 would wait 60 s in init if not stopped.
        let err = run(&opts(
            3,
            dir.path(),
            &["--fail-rank", "1", "--timeout-secs", "60"],
        ))
        .expect_err("must fail");
        assert!(matches!(err, Error::WorkerFailed { rank: 1, .. }), "{err}");
        assert!(err.to_string().contains("exit code 3"), "{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "took {:?}",
            t0.elapsed()
        );
    });
}

#[test]
fn max_restarts_restarts_the_whole_group() {
    with_timeout(180, || {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut o = opts(
            2,
            dir.path(),
            &[
                "--fail-rank",
                "0",
                "--fail-attempts",
                "1",
                "--timeout-secs",
                "60",
            ],
        );
        o.max_restarts = 2;
        let report = run(&o).unwrap_or_else(|e| panic!("second attempt must succeed: {e}"));
        assert_eq!(report.restarts, 1);
        assert!(dir.path().join("rank0.txt").exists() && dir.path().join("rank1.txt").exists());

        let mut o = opts(2, dir.path(), &["--fail-rank", "0", "--timeout-secs", "60"]);
        o.max_restarts = 1;
        let err = run(&o).expect_err("always fails");
        assert!(
            err.to_string().contains("rank 0") && err.to_string().contains("after 1 restarts"),
            "{err}"
        );
    });
}

#[test]
fn bad_options_and_missing_programs_are_errors() {
    with_timeout(30, || {
        let mut o = LaunchOptions::local(0, "/bin/true", vec![]);
        assert!(matches!(run(&o), Err(Error::Launch { .. })));
        o.nproc_per_node = 1;
        o.nnodes = 2;
        assert!(run(&o).is_err(), "multi-node without port/token");
        let o = LaunchOptions::local(1, "/nonexistent/program", vec![]);
        let err = run(&o).expect_err("cannot start");
        assert!(err.to_string().contains("rank 0"), "{err}");
    });
}
