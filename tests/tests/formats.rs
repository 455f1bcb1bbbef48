//! Issue #12: bellows deserializes only safetensors, JSON and TOML (plus its own length-checked
//! wire formats for the store and the ring). No pickle, no bincode/MessagePack recorders, no
//! format that can run code or allocate unchecked sizes on load. This scans the library sources.

use bellows_tests::repo_root;

/// Names whose appearance in library code would mean another deserialization format.
const FORBIDDEN: [&str; 8] = [
    "Recorder",
    "bincode",
    "rmp_serde",
    "pickle",
    "serde_pickle",
    "ciborium",
    "postcard",
    "torch.load",
];

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn library_code_deserializes_only_safetensors_json_and_toml() {
    let root = repo_root();
    let mut files = Vec::new();
    for dir in [
        "crates/dist/src",
        "crates/data/src",
        "crates/peft/src",
        "crates/models/src",
        "crates/trainer/src",
        "launch/src",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 30, "{} files", files.len());
    let mut found = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        for word in FORBIDDEN {
            if text.contains(word) {
                found.push(format!("{}: {word}", f.display()));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
    for manifest in [
        "crates/dist",
        "crates/data",
        "crates/peft",
        "crates/models",
        "crates/trainer",
        "launch",
    ] {
        let text =
            std::fs::read_to_string(root.join(manifest).join("Cargo.toml")).expect("Cargo.toml");
        for dep in [
            "bincode",
            "rmp-serde",
            "serde-pickle",
            "ciborium",
            "postcard",
        ] {
            assert!(!text.contains(dep), "{manifest} depends on {dep}");
        }
    }
}
