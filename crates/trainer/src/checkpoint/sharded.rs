//! Sharded checkpoints (FSDP): every rank writes the rows it holds — `model-rank-<r>.safetensors`
//! (its rows of each sharded weight; rank 0 also every whole tensor) and
//! `optimizer-rank-<r>.safetensors` (its rows of the AdamW moments) — and the manifest records the
//! layout: the world size that wrote them and the global shape of every row-split tensor.
//!
//! Reading assembles any rows of any tensor from the files that hold them, whatever world size
//! wrote them, so a run resumes on a different number of ranks and `bellows export` rebuilds
//! whole tensors. A consolidated checkpoint (`model.safetensors` / `optimizer.safetensors`) reads
//! through the same interface ([`TensorReader`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bellows_peft::shard::shard_rows;
use burn::tensor::{DType, TensorData};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::tensors::from_st;
use crate::{Error, Result};

/// The per-rank model file name.
pub(crate) fn model_file(rank: usize) -> String {
    format!("model-rank-{rank}.safetensors")
}

/// The per-rank optimizer file name.
pub(crate) fn optimizer_file(rank: usize) -> String {
    format!("optimizer-rank-{rank}.safetensors")
}

/// How a sharded checkpoint's tensors are spread over its files (recorded in the manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLayout {
    /// Ranks that wrote it; file `r` of each list holds rank `r`'s rows.
    pub world_size: usize,
    /// `model-rank-<r>.safetensors`, by rank.
    pub model_files: Vec<String>,
    /// `optimizer-rank-<r>.safetensors`, by rank.
    pub optimizer_files: Vec<String>,
    /// Row-split tensors (both kinds of file) → global shape: rank `r`'s file holds rows
    /// `shard_rows(shape[0], world_size, r)` of dim 0 (contiguous, the first `rows % world_size`
    /// ranks one row more). Every other tensor is whole in rank 0's file.
    pub split: BTreeMap<String, Vec<usize>>,
}

impl ShardLayout {
    /// The layout of `world` ranks with row-split tensors `split`.
    pub fn new(world: usize, split: BTreeMap<String, Vec<usize>>) -> Self {
        ShardLayout {
            world_size: world,
            model_files: (0..world).map(model_file).collect(),
            optimizer_files: (0..world).map(optimizer_file).collect(),
            split,
        }
    }

    /// Every file name it lists.
    pub fn files(&self) -> impl Iterator<Item = &String> {
        self.model_files.iter().chain(&self.optimizer_files)
    }
}

/// Tensors by name, readable row range by row range.
pub trait TensorReader {
    /// Every tensor name.
    fn names(&self) -> Vec<String>;
    /// The global shape and dtype of `name`.
    fn meta(&self, name: &str) -> Option<(Vec<usize>, DType)>;
    /// Rows `rows` of dim 0 of `name` (all of a 0-d or 1-element tensor's values for `0..1`).
    ///
    /// # Errors
    /// The name is unknown, the range is out of bounds, or a file is damaged.
    fn rows(&self, name: &str, rows: Range<usize>) -> Result<TensorData>;

    /// The whole tensor.
    ///
    /// # Errors
    /// As [`TensorReader::rows`].
    fn whole(&self, name: &str) -> Result<TensorData> {
        let (shape, _) = self.meta(name).ok_or_else(|| missing(name))?;
        self.rows(name, 0..shape.first().copied().unwrap_or(1))
    }
}

fn missing(name: &str) -> Error {
    Error::Internal(format!("checkpoint tensor {name} is missing"))
}

/// One memory-mapped safetensors file: name → (dtype, shape, byte range).
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    index: HashMap<String, (DType, Vec<usize>, Range<usize>)>,
}

#[allow(unsafe_code)]
fn map(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: checkpoint files are written once (into a temp folder, then renamed) and never
    // modified in place; the map is read-only. A concurrent truncation by another process is
    // outside what any reader of files can guard against (hashes were verified before).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let map = map(path)?;
        let corrupt = |message: String| Error::CheckpointCorrupt {
            file: path.to_path_buf(),
            message,
        };
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
        let base = 8 + header_len;
        let mut index = HashMap::new();
        for (name, info) in meta.tensors() {
            let dtype = from_st(info.dtype).ok_or_else(|| {
                corrupt(format!("tensor {name}: unsupported dtype {:?}", info.dtype))
            })?;
            let (s, e) = info.data_offsets;
            index.insert(name, (dtype, info.shape.clone(), base + s..base + e));
        }
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
            index,
        })
    }

    /// Rows `rows` (local to this file's piece) of `name`.
    fn rows(&self, name: &str, rows: Range<usize>) -> Result<TensorData> {
        let (dtype, shape, bytes) = self.index.get(name).ok_or_else(|| missing(name))?;
        let n = shape.first().copied().unwrap_or(1);
        let row_bytes = bytes.len().checked_div(n).unwrap_or(0);
        if rows.end > n.max(1) || rows.start > rows.end {
            return Err(Error::CheckpointCorrupt {
                file: self.path.clone(),
                message: format!("tensor {name}: rows {rows:?} of {n}"),
            });
        }
        let mut out_shape = shape.clone();
        if let Some(d0) = out_shape.first_mut() {
            *d0 = rows.len();
        }
        let (a, b) = (
            bytes.start + rows.start * row_bytes,
            bytes.start + rows.end * row_bytes,
        );
        Ok(TensorData::from_bytes_vec(
            self.map[a..b].to_vec(),
            out_shape,
            *dtype,
        ))
    }
}

/// A sharded checkpoint's files of one kind (model or optimizer), read through its layout.
pub struct ShardedReader {
    files: Vec<MappedFile>,
    split: BTreeMap<String, Vec<usize>>,
}

impl ShardedReader {
    /// Opens the files `names` (by rank) of `dir`, split as `layout` says.
    ///
    /// # Errors
    /// A file is missing or not safetensors, or a piece does not have the rows the layout says.
    pub fn open(dir: &Path, names: &[String], layout: &ShardLayout) -> Result<Self> {
        let files = names
            .iter()
            .map(|n| MappedFile::open(&dir.join(n)))
            .collect::<Result<Vec<_>>>()?;
        for (r, f) in files.iter().enumerate() {
            for (name, (_, shape, _)) in &f.index {
                if let Some(global) = layout.split.get(name) {
                    let want = shard_rows(global[0], layout.world_size, r).len();
                    if shape.first() != Some(&want) || shape[1..] != global[1..] {
                        return Err(Error::CheckpointCorrupt {
                            file: f.path.clone(),
                            message: format!(
                                "tensor {name}: shape {shape:?}, the layout says rows {want} of {global:?}"
                            ),
                        });
                    }
                }
            }
        }
        Ok(ShardedReader {
            files,
            split: layout.split.clone(),
        })
    }
}

impl TensorReader for ShardedReader {
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .files
            .iter()
            .flat_map(|f| f.index.keys().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn meta(&self, name: &str) -> Option<(Vec<usize>, DType)> {
        let dtype = self
            .files
            .iter()
            .find_map(|f| f.index.get(name).map(|e| e.0))?;
        match self.split.get(name) {
            Some(shape) => Some((shape.clone(), dtype)),
            None => self
                .files
                .first()?
                .index
                .get(name)
                .map(|e| (e.1.clone(), e.0)),
        }
    }

    fn rows(&self, name: &str, rows: Range<usize>) -> Result<TensorData> {
        let Some(global) = self.split.get(name) else {
            return self
                .files
                .first()
                .ok_or_else(|| missing(name))?
                .rows(name, rows);
        };
        let world = self.files.len();
        let mut bytes = Vec::new();
        let mut dtype = DType::F32;
        for (r, f) in self.files.iter().enumerate() {
            let held = shard_rows(global[0], world, r);
            let (a, b) = (rows.start.max(held.start), rows.end.min(held.end));
            if a < b {
                let piece = f.rows(name, a - held.start..b - held.start)?;
                dtype = piece.dtype;
                bytes.extend_from_slice(piece.as_bytes());
            }
        }
        let mut shape = global.clone();
        shape[0] = rows.len();
        if rows.end > global[0] {
            return Err(Error::Internal(format!(
                "checkpoint tensor {name}: rows {rows:?} of {}",
                global[0]
            )));
        }
        Ok(TensorData::from_bytes_vec(bytes, shape, dtype))
    }
}

/// A consolidated file's tensors (name → whole data) as a [`TensorReader`].
impl TensorReader for HashMap<String, TensorData> {
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.keys().cloned().collect();
        v.sort();
        v
    }

    fn meta(&self, name: &str) -> Option<(Vec<usize>, DType)> {
        self.get(name).map(|d| (d.shape.to_vec(), d.dtype))
    }

    fn rows(&self, name: &str, rows: Range<usize>) -> Result<TensorData> {
        let d = self.get(name).ok_or_else(|| missing(name))?;
        let n = d.shape.first().copied().unwrap_or(1);
        if rows.end > n.max(1) {
            return Err(Error::Internal(format!(
                "tensor {name}: rows {rows:?} of {n}"
            )));
        }
        let bytes = d.as_bytes();
        let row_bytes = bytes.len().checked_div(n).unwrap_or(0);
        let mut shape = d.shape.to_vec();
        if let Some(d0) = shape.first_mut() {
            *d0 = rows.len();
        }
        Ok(TensorData::from_bytes_vec(
            bytes[rows.start * row_bytes..rows.end * row_bytes].to_vec(),
            shape,
            d.dtype,
        ))
    }
}
