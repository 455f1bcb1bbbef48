//! Every shipped config validates; every invalid fixture fails with the expected dotted keys.
//! Fixtures in `tests/configs/invalid/` state their expected messages as `# expect: <text>` lines;
//! the files they name are in `tests/configs/inputs/`, relative to `tests/` (the working directory).

use std::path::Path;
use std::sync::Mutex;

use bellows_tests::repo_root;
use bellows_trainer::RunConfig;

/// Relative paths in job files are relative to the working directory, which one test changes:
/// tests that resolve relative paths hold this lock.
static CWD: Mutex<()> = Mutex::new(());

#[test]
fn every_shipped_config_validates() {
    let _cwd = CWD.lock().unwrap_or_else(|p| p.into_inner());
    let dir = repo_root().join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            // Relative paths in configs are relative to the repository root.
            let text = std::fs::read_to_string(&path).expect("read");
            let cwd = std::env::current_dir().expect("cwd");
            std::env::set_current_dir(repo_root()).expect("cd");
            let r = RunConfig::from_toml_str(&text, &path, &[])
                .and_then(|c| c.check_inputs(&path).map(|()| c));
            std::env::set_current_dir(cwd).expect("cd back");
            r.unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1, "no configs found in {}", dir.display());
}

/// Each fixture fails (in parsing, validation, or the check of the files it names) with a message
/// naming the fixture file and the dotted key, and without a panic.
#[test]
fn invalid_fixtures_report_every_expected_problem() {
    let _cwd = CWD.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/invalid");
    let mut n = 0;
    let mut failures = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fixtures") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let err = RunConfig::from_toml_str(&text, &path, &[])
            .and_then(|c| c.check_inputs(&path).map(|()| c))
            .expect_err(&path.display().to_string());
        let shown = err.to_string();
        for e in &expected {
            let want = format!("{}: {e}", path.display());
            if !shown.contains(&want) {
                failures.push(format!(
                    "expected a line containing {want:?}\ngot:\n{shown}"
                ));
            }
        }
        n += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(n >= 30, "only {n} fixtures");
}

#[test]
fn overrides_replace_file_values() {
    let path = repo_root().join("configs/quickstart.toml");
    let sets = [
        "run.max_steps=7".to_string(),
        "optim.lr=3e-4".into(),
        "peft.method=lora".into(),
        r#"data.train=["a.parquet","b.parquet"]"#.into(),
    ];
    let text = std::fs::read_to_string(&path).expect("read");
    let cfg = RunConfig::from_toml_str(&text, &path, &sets).expect("valid");
    assert_eq!(cfg.run.max_steps, 7);
    assert_eq!(cfg.optim.lr, 3e-4);
    assert_eq!(cfg.peft.method, bellows_peft::Method::Lora);
    assert_eq!(cfg.data.train.patterns(), ["a.parquet", "b.parquet"]);
    let bad = RunConfig::from_toml_str(&text, &path, &["run.max_steps=zero".into()])
        .expect_err("string for u64");
    assert!(
        bad.to_string().contains("run.max_steps: invalid type"),
        "{bad}"
    );
}
