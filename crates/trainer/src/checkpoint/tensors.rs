//! Named tensors in safetensors files, byte-for-byte: the dtype of every tensor is kept, so a
//! reload is bit-exact (f32, f64, f16 and bf16).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{DType, TensorData};
use safetensors::{Dtype, View};

use crate::{Error, Result};

/// A tensor to write, borrowed.
struct ByteView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl View for &ByteView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn to_st(d: DType) -> Option<Dtype> {
    Some(match d {
        DType::F64 => Dtype::F64,
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        _ => return None,
    })
}

pub(crate) fn from_st(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        _ => return None,
    })
}

/// The name a dtype has in manifests (`"f32"`, `"bf16"`, …).
pub(crate) fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

/// Serialises `tensors` (name → data) into safetensors bytes, in the given order.
///
/// # Errors
/// A tensor has a dtype safetensors cannot hold here (not f64/f32/f16/bf16/i64).
pub(crate) fn serialize(path: &Path, tensors: &[(String, TensorData)]) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, data) in tensors {
        let dtype = to_st(data.dtype).ok_or_else(|| Error::CheckpointWrite {
            path: path.to_path_buf(),
            message: format!("tensor {name}: unsupported dtype {:?}", data.dtype),
        })?;
        views.push((
            name.as_str(),
            ByteView {
                dtype,
                shape: &data.shape,
                bytes: data.as_bytes(),
            },
        ));
    }
    let refs: Vec<(&str, &ByteView<'_>)> = views.iter().map(|(n, v)| (*n, v)).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(refs, Some(meta)).map_err(|e| Error::CheckpointWrite {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads every tensor of a safetensors file into name → data (dtype kept).
///
/// # Errors
/// The file cannot be read or parsed, or holds a dtype this reader does not take.
pub(crate) fn read_all(path: &Path) -> Result<HashMap<String, TensorData>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let corrupt = |message: String| Error::CheckpointCorrupt {
        file: path.to_path_buf(),
        message,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = from_st(view.dtype()).ok_or_else(|| {
            corrupt(format!(
                "tensor {name}: unsupported dtype {:?}",
                view.dtype()
            ))
        })?;
        let data = TensorData::from_bytes_vec(view.data().to_vec(), view.shape().to_vec(), dtype);
        out.insert(name, data);
    }
    Ok(out)
}
