//! Replays the committed fuzz inputs through the fuzz target bodies (`bellows_tests::fuzz`):
//! the hand-written seeds (`fuzz/seeds/<target>/`), the minimised corpus the fuzzer grew
//! (`fuzz/corpus/<target>/`) and every input that once crashed a target (`fuzz/regressions/<target>/`).
//! No fuzzer runs here; this keeps fixed crashes fixed in the normal test suite.

use std::time::Instant;

use bellows_tests::fuzz::TARGETS;
use bellows_tests::repo_root;

fn replay(kind: &str) -> usize {
    let mut n = 0;
    for (target, body) in TARGETS {
        let dir = repo_root().join("fuzz").join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let scratch = tempfile::tempdir().expect("scratch");
        let mut files: Vec<_> = entries.map(|e| e.expect("entry").path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).expect("read input");
            let started = Instant::now();
            let r = std::panic::catch_unwind(|| body(&data, scratch.path()));
            assert!(r.is_ok(), "{target}: {} panicked", f.display());
            assert!(
                started.elapsed().as_secs() < 10,
                "{target}: {} took {:?}",
                f.display(),
                started.elapsed()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn every_seed_input_is_handled_without_a_panic() {
    assert!(replay("seeds") >= 40, "seeds missing");
}

#[test]
fn the_fuzzed_corpus_is_handled_without_a_panic() {
    replay("corpus");
}

#[test]
fn every_past_fuzz_crash_is_fixed() {
    replay("regressions");
}
