//! The bodies of the cargo-fuzz targets in `fuzz/` (one file per parser bellows owns).
//!
//! Each body takes arbitrary bytes and must never panic: a panic is a bug (the fuzzer reports it
//! as a crash). Bodies also assert properties of what the parser accepts or rejects, e.g. that
//! every error names its file, or that an accepted manifest only names paths inside its folder.
//! `tests/tests/fuzz_corpus.rs` replays the committed corpus and every past crash through the
//! same bodies, so a fixed crash stays fixed without running the fuzzer.

use std::path::{Path, PathBuf};

pub mod adapter_config;
pub mod hf_config;
pub mod job_config;
pub mod loader_state;
pub mod manifest;
pub mod safetensors_file;
pub mod store_frame;

/// A fuzz body: the input bytes and a scratch folder it may write in.
pub type Body = fn(&[u8], &Path);

/// Every target: its name (the file under `fuzz/fuzz_targets/` and the folder under `fuzz/corpus/`)
/// and its body.
pub const TARGETS: [(&str, Body); 7] = [
    ("job_config", job_config::run),
    ("safetensors_file", safetensors_file::run),
    ("hf_config", hf_config::run),
    ("adapter_config", adapter_config::run),
    ("store_frame", store_frame::run),
    ("loader_state", loader_state::run),
    ("manifest", manifest::run),
];

/// A scratch folder for one fuzzing process, created on first use and kept for its lifetime
/// (under `/dev/shm` when present, so file-backed targets stay fast).
pub fn process_scratch() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("bellows-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder for the fuzz target");
        dir
    })
}
