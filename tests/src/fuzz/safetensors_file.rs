//! Target `safetensors_file`: a weights file through [`WeightFiles`], as model loading reads it
//! (memory-mapped header parse, then every tensor converted to f32). An input that starts with `{`
//! is also tried as `model.safetensors.index.json` (the sharded layout).

use std::path::Path;

use bellows_models::hf::WeightFiles;

/// Runs one input. Properties: errors name the file; every tensor the header lists either reads
/// with its own shape or fails with an error naming the file.
pub fn run(data: &[u8], scratch: &Path) {
    let file = scratch.join("model.safetensors");
    if std::fs::write(&file, data).is_err() {
        return;
    }
    match WeightFiles::open_file(&file) {
        Err(e) => assert!(
            e.to_string().contains("model.safetensors"),
            "error does not name the file: {e}"
        ),
        Ok(w) => {
            let names: Vec<String> = w.names().map(String::from).collect();
            for name in names {
                let shape = w.shape(&name).unwrap_or_default();
                if let Err(e) = w.read_f32(&name, &shape) {
                    assert!(e.to_string().contains("model.safetensors"), "{e}");
                }
            }
        }
    }
    if data.first() == Some(&b'{') {
        let dir = scratch.join("sharded");
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        let index = dir.join("model.safetensors.index.json");
        if std::fs::write(&index, data).is_ok() {
            if let Err(e) = WeightFiles::open(&dir) {
                assert!(!e.to_string().is_empty());
            }
        }
    }
}
