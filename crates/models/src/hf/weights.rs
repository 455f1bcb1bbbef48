//! Memory-mapped safetensors weight files: single file or sharded with an index.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

fn w_err(path: &Path, tensor: &str, message: impl Into<String>) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        tensor: tensor.into(),
        message: message.into(),
    }
}

/// The weight files of one model folder, memory-mapped (no copy until a tensor is converted).
#[derive(Debug)]
pub struct WeightFiles {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `files`.
    index: HashMap<String, usize>,
}

/// A tensor converted to f32 values.
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

#[allow(unsafe_code)]
fn map(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    // SAFETY: the file is opened read-only and only read through the map; a concurrent truncation
    // by another process is outside what any reader of model files can guard against.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

impl WeightFiles {
    /// Opens `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    ///
    /// # Errors
    /// No weights file, a malformed index, or a corrupt/truncated safetensors header (naming the file).
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::Io {
                path: index_path.clone(),
                source: e,
            })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| w_err(&index_path, "<index>", e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| w_err(&index_path, "weight_map", "missing or not an object"))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains("..") {
                    return Err(w_err(
                        &index_path,
                        f,
                        "shard names must be plain file names",
                    ));
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(w_err(
                dir,
                "<files>",
                "no model.safetensors or model.safetensors.index.json",
            ));
        };
        Self::from_paths(names)
    }

    /// Opens one safetensors file (e.g. `adapter_model.safetensors`).
    ///
    /// # Errors
    /// The file is missing or its header is corrupt.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::from_paths(vec![path.to_path_buf()])
    }

    fn from_paths(names: Vec<PathBuf>) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in names {
            let mmap = map(&path)?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| w_err(&path, "<header>", e.to_string()))?;
            for name in st.names() {
                index.insert(name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(WeightFiles { files, index })
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shape of a tensor, if it exists and its file header is readable.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (_, mmap) = &self.files[*self.index.get(name)?];
        let st = SafeTensors::deserialize(mmap).ok()?;
        st.tensor(name).ok().map(|v| v.shape().to_vec())
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The files, for error messages.
    pub fn describe(&self) -> PathBuf {
        match self.files.as_slice() {
            [(p, _)] => p.clone(),
            _ => self
                .files
                .first()
                .map(|(p, _)| p.with_file_name("model.safetensors.index.json"))
                .unwrap_or_default(),
        }
    }

    /// Runs `f` on the view of tensor `name`, then drops the file pages it touched from this
    /// process's memory (they stay in the page cache), so reading a whole model through the map
    /// never holds more than one tensor's file pages on top of what was converted.
    ///
    /// # Errors
    /// A missing tensor or unreadable header (naming file and tensor), or what `f` returns.
    fn with_view<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Path, &TensorView<'_>) -> Result<T>,
    ) -> Result<T> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| w_err(&self.describe(), name, "missing tensor"))?;
        let (path, mmap) = &self.files[i];
        let st =
            SafeTensors::deserialize(mmap).map_err(|e| w_err(path, "<header>", e.to_string()))?;
        let view = st
            .tensor(name)
            .map_err(|e| w_err(path, name, e.to_string()))?;
        let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
        let len = view.data().len();
        let out = f(path, &view);
        drop(view);
        drop(st);
        release(mmap, offset, len);
        out
    }

    /// Reads `name` as f32 (from f32, bf16 or f16), checking its shape against `expected`.
    ///
    /// # Errors
    /// Missing tensor, wrong shape, or unsupported dtype, naming file and tensor.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        self.with_view(name, |path, view| {
            if view.shape() != expected {
                return Err(w_err(
                    path,
                    name,
                    format!("shape {:?}, expected {:?}", view.shape(), expected),
                ));
            }
            to_f32(path, name, view)
        })
    }

    /// Reads `name` as f32 (from f32, bf16 or f16) whatever its shape.
    ///
    /// # Errors
    /// Missing tensor or unsupported dtype, naming file and tensor.
    pub fn read_f32_any(&self, name: &str) -> Result<HostTensor> {
        self.with_view(name, |path, view| to_f32(path, name, view))
    }

    /// Reads a `uint8` tensor's bytes (any shape).
    ///
    /// # Errors
    /// Missing tensor or a dtype other than U8, naming file and tensor.
    pub fn read_u8(&self, name: &str) -> Result<Vec<u8>> {
        self.with_view(name, |path, view| match view.dtype() {
            Dtype::U8 => Ok(view.data().to_vec()),
            other => Err(w_err(path, name, format!("dtype {other:?}, expected U8"))),
        })
    }

    /// The dtype of a tensor, if it exists and its file header is readable.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        let (_, mmap) = &self.files[*self.index.get(name)?];
        let st = SafeTensors::deserialize(mmap).ok()?;
        st.tensor(name).ok().map(|v| v.dtype())
    }
}

/// Drops the pages of `mmap[offset..offset + len]` from this process (`madvise(MADV_DONTNEED)`).
/// A failure only means the pages stay resident, so it is ignored.
#[allow(unsafe_code)]
fn release(mmap: &Mmap, offset: usize, len: usize) {
    // SAFETY: the map is read-only and no slice into this range is alive (the views were dropped
    // by the caller); DONTNEED on a never-written file mapping only unmaps the pages, and a later
    // read faults them in again from the file with the same contents.
    let _ = unsafe { mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, offset, len) };
}

fn to_f32(path: &Path, name: &str, view: &TensorView<'_>) -> Result<HostTensor> {
    let bytes = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(w_err(
                path,
                name,
                format!("unsupported dtype {other:?} (expected F32, BF16 or F16)"),
            ))
        }
    };
    Ok(HostTensor {
        shape: view.shape().to_vec(),
        values,
    })
}
