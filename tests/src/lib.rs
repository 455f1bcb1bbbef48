//! Shared helpers for the workspace integration tests in `tests/tests/`.
#![warn(missing_docs)]

use std::path::{Path, PathBuf};

pub mod fuzz;

use burn::tensor::{backend::Backend, Tensor};
use safetensors::{Dtype, SafeTensors};

/// The golden-file folder `tests/golden/<case>`.
pub fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(case)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A tensor read from a golden safetensors file, as f64 values (exact for f32/bf16/i64 ids).
#[derive(Debug, Clone)]
pub struct Array {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f64>,
}

/// Reads tensor `name` of the safetensors file `path`.
///
/// # Panics
/// If the file or tensor is missing (a broken golden set is a test failure).
pub fn read_array(path: &Path, name: &str) -> Array {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
    let d = v.data();
    let values: Vec<f64> = match v.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| f64::from(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        Dtype::U8 => d.iter().map(|&b| f64::from(b)).collect(),
        other => panic!("{}: {name}: unsupported dtype {other:?}", path.display()),
    };
    Array {
        shape: v.shape().to_vec(),
        values,
    }
}

/// Asserts `|got − exp| <= atol + rtol·|exp|` elementwise, reporting the worst element.
///
/// # Panics
/// On a length mismatch or any element out of tolerance.
pub fn assert_close(what: &str, got: &[f64], exp: &[f64], atol: f64, rtol: f64) {
    assert_eq!(
        got.len(),
        exp.len(),
        "{what}: length {} vs expected {}",
        got.len(),
        exp.len()
    );
    let mut worst = (0usize, 0f64);
    for (i, (g, e)) in got.iter().zip(exp).enumerate() {
        let excess = (g - e).abs() - (atol + rtol * e.abs());
        if excess > worst.1 || g.is_nan() {
            worst = (i, if g.is_nan() { f64::INFINITY } else { excess });
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} is {} but expected {} (atol {atol}, rtol {rtol})",
        worst.0,
        got[worst.0],
        exp[worst.0]
    );
}

/// A tensor's values as f64 (any float dtype; converted through f32).
///
/// # Panics
/// If the tensor is not a float tensor.
pub fn to_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("a float tensor")
        .into_iter()
        .map(f64::from)
        .collect()
}
