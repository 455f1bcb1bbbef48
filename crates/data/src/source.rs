//! The chunk index over all files, and reading one chunk from a row offset.
//!
//! A *chunk* is the unit of sharding and seeking: a Parquet row group, an Arrow IPC record batch
//! (file or stream format), or a block of [`JSONL_BLOCK_ROWS`] JSONL rows. Opening a chunk at a row
//! offset seeks straight there: Parquet through `with_row_groups(..).with_offset(..)` with the page
//! index loaded when the file has one, IPC through the byte offsets of its messages (recorded once at
//! open), JSONL through the byte offset of its block.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::PageIndexPolicy;

use crate::files::{Format, SourceFile};
use crate::rows::{self, RowResult};
use crate::{Columns, Content, Error, Files, Result};

/// Rows per JSONL chunk.
pub const JSONL_BLOCK_ROWS: u64 = 4096;
/// Rows decoded at a time from a Parquet row group.
const PARQUET_BATCH_ROWS: usize = 1024;

/// One unit of sharding.
#[derive(Clone, Debug)]
pub(crate) struct Chunk {
    /// Index into the file list.
    pub file: usize,
    /// Row group, record batch or JSONL block number within the file.
    pub index: usize,
    /// Rows in the chunk.
    pub rows: u64,
    /// File row number of the chunk's first row.
    pub first_row: u64,
}

enum FileIndex {
    Parquet(ArrowReaderMetadata),
    /// Schema (and dictionary) message bytes, then (byte offset, byte length) of each record batch.
    Ipc {
        prefix: Vec<u8>,
        batches: Vec<(u64, u64)>,
    },
    /// Byte offset of each block's first row.
    Jsonl(Vec<u64>),
}

/// Every chunk of every file of one split.
pub(crate) struct Dataset {
    files: Vec<SourceFile>,
    index: Vec<FileIndex>,
    pub chunks: Vec<Chunk>,
    content: Content,
    columns: Columns,
}

impl Dataset {
    /// Resolves `files` and indexes each one (metadata only; JSONL is scanned for line starts).
    ///
    /// # Errors
    /// Unmatched patterns, unreadable, empty or corrupt files.
    pub fn open(files: &Files, content: Content, columns: &Columns) -> Result<Self> {
        let files = crate::files::resolve(files)?;
        let mut index = Vec::with_capacity(files.len());
        let mut chunks = Vec::new();
        for (fi, f) in files.iter().enumerate() {
            let (idx, rows) = match f.format {
                Format::Parquet => index_parquet(&f.path)?,
                Format::IpcFile => index_ipc(&f.path, true)?,
                Format::IpcStream => index_ipc(&f.path, false)?,
                Format::Jsonl => index_jsonl(&f.path)?,
            };
            if rows.iter().sum::<u64>() == 0 {
                return Err(Error::EmptyFile {
                    path: f.path.clone(),
                });
            }
            let mut first_row = 0;
            for (ci, &n) in rows.iter().enumerate() {
                if n > 0 {
                    chunks.push(Chunk {
                        file: fi,
                        index: ci,
                        rows: n,
                        first_row,
                    });
                }
                first_row += n;
            }
            index.push(idx);
        }
        Ok(Dataset {
            files,
            index,
            chunks,
            content,
            columns: columns.clone(),
        })
    }

    /// The path of chunk `c`'s file.
    pub fn path(&self, c: usize) -> &Path {
        &self.files[self.chunks[c].file].path
    }

    /// Starts reading chunk `c` at row `offset` within the chunk.
    ///
    /// # Errors
    /// I/O or decoding errors, naming the file.
    pub fn open_chunk(&self, c: usize, offset: u64) -> Result<ChunkReader> {
        let chunk = &self.chunks[c];
        let path = self.files[chunk.file].path.clone();
        let next_row = chunk.first_row + offset;
        let remaining = chunk.rows.saturating_sub(offset);
        let inner = match &self.index[chunk.file] {
            FileIndex::Parquet(meta) => {
                let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
                let builder =
                    ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta.clone());
                let roots = self.wanted_roots(builder.schema());
                let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
                let reader = builder
                    .with_row_groups(vec![chunk.index])
                    .with_offset(offset as usize)
                    .with_batch_size(PARQUET_BATCH_ROWS)
                    .with_projection(mask)
                    .build()
                    .map_err(|e| Error::corrupt(&path, e))?;
                Inner::Parquet(reader)
            }
            FileIndex::Ipc { prefix, batches } => {
                let batch = read_ipc_batch(&path, prefix, batches[chunk.index])?;
                let off = (offset as usize).min(batch.num_rows());
                Inner::Batch(Some(batch.slice(off, batch.num_rows() - off)))
            }
            FileIndex::Jsonl(blocks) => {
                let mut file = File::open(&path).map_err(|e| Error::io(&path, e))?;
                file.seek(SeekFrom::Start(blocks[chunk.index]))
                    .map_err(|e| Error::io(&path, e))?;
                let mut lines = BufReader::new(file);
                for _ in 0..offset {
                    if next_nonblank_line(&mut lines, &path)?.is_none() {
                        break;
                    }
                }
                Inner::Jsonl(lines)
            }
        };
        Ok(ChunkReader {
            path,
            next_row,
            remaining,
            inner,
            pending: std::collections::VecDeque::new(),
            content: self.content,
            columns: self.columns.clone(),
        })
    }

    fn wanted_roots(&self, schema: &arrow::datatypes::SchemaRef) -> Vec<usize> {
        let c = &self.columns;
        let names: Vec<&str> = match self.content {
            Content::Tokens => vec![&c.input_ids, &c.labels, &c.attention_mask],
            Content::Text => vec![&c.text],
            Content::PromptCompletion => vec![&c.prompt, &c.completion],
        };
        // A missing required column is then reported by `rows::from_batch` with the full column list,
        // so project everything when one is absent.
        let found: Vec<usize> = names
            .iter()
            .filter_map(|n| schema.index_of(n).ok())
            .collect();
        let required_missing = match self.content {
            Content::Tokens => schema.index_of(&c.input_ids).is_err(),
            _ => found.len() < names.len(),
        };
        if required_missing {
            (0..schema.fields().len()).collect()
        } else {
            found
        }
    }
}

enum Inner {
    Parquet(ParquetRecordBatchReader),
    Batch(Option<RecordBatch>),
    Jsonl(BufReader<File>),
}

/// Reads the rows of one chunk in order.
pub(crate) struct ChunkReader {
    path: std::path::PathBuf,
    next_row: u64,
    remaining: u64,
    inner: Inner,
    pending: std::collections::VecDeque<RowResult>,
    content: Content,
    columns: Columns,
}

impl ChunkReader {
    /// The next row (`Some(Err)` for a row-level problem), or `None` at the chunk's end.
    ///
    /// # Errors
    /// File-level problems: I/O, corruption, missing column, wrong column type.
    pub fn next_row(&mut self) -> Result<Option<RowResult>> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Ok(Some(r));
            }
            if self.remaining == 0 {
                return Ok(None);
            }
            let batch = match &mut self.inner {
                Inner::Parquet(reader) => match reader.next() {
                    Some(b) => Some(b.map_err(|e| Error::corrupt(&self.path, e))?),
                    None => None,
                },
                Inner::Batch(b) => b.take(),
                Inner::Jsonl(lines) => {
                    let line = next_nonblank_line(lines, &self.path)?;
                    let Some(line) = line else {
                        return Err(Error::corrupt(
                            &self.path,
                            "file shrank since it was indexed",
                        ));
                    };
                    let row = self.next_row;
                    self.next_row += 1;
                    self.remaining -= 1;
                    let r = match serde_json::from_str::<serde_json::Value>(&line) {
                        Ok(v) => rows::from_json(&v, self.content, &self.columns, &self.path, row),
                        Err(e) => Err(Error::bad_row(
                            &self.path,
                            "<line>",
                            row,
                            format!("invalid JSON: {e}"),
                        )),
                    };
                    return Ok(Some(r));
                }
            };
            let Some(batch) = batch else {
                return Err(Error::corrupt(&self.path, "chunk ended early"));
            };
            let rows = rows::from_batch(
                &batch,
                self.content,
                &self.columns,
                &self.path,
                self.next_row,
            )?;
            self.next_row += rows.len() as u64;
            self.remaining = self.remaining.saturating_sub(rows.len() as u64);
            self.pending.extend(rows);
        }
    }
}

fn index_parquet(path: &Path) -> Result<(FileIndex, Vec<u64>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let opts = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional);
    let meta = ArrowReaderMetadata::load(&file, opts).map_err(|e| Error::corrupt(path, e))?;
    let rows = meta
        .metadata()
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows().max(0) as u64)
        .collect();
    Ok((FileIndex::Parquet(meta), rows))
}

/// Walks the IPC messages, recording where each record batch lies and its row count.
fn index_ipc(path: &Path, file_format: bool) -> Result<(FileIndex, Vec<u64>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = BufReader::new(file);
    let (mut pos, end) = if file_format {
        // Footer: ... | footer | i32 footer length | "ARROW1"
        if len < 18 {
            return Err(Error::corrupt(path, "arrow file too short"));
        }
        r.seek(SeekFrom::Start(len - 10))
            .map_err(|e| Error::io(path, e))?;
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(|e| Error::io(path, e))?;
        let footer = i32::from_le_bytes(b).max(0) as u64;
        (
            first_message(&mut r, path)?,
            len.saturating_sub(10 + footer),
        )
    } else {
        (0, len)
    };
    let mut prefix = Vec::new();
    let mut batches = Vec::new();
    let mut rows = Vec::new();
    while pos + 4 <= end {
        r.seek(SeekFrom::Start(pos))
            .map_err(|e| Error::io(path, e))?;
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(|e| Error::io(path, e))?;
        let mut header = 4;
        let mut meta_len = u32::from_le_bytes(b);
        if meta_len == u32::MAX {
            r.read_exact(&mut b).map_err(|e| Error::io(path, e))?;
            header = 8;
            meta_len = u32::from_le_bytes(b);
        }
        if meta_len == 0 {
            break;
        }
        if pos + header + u64::from(meta_len) > end {
            return Err(Error::corrupt(
                path,
                format!("message at byte {pos} runs past the end"),
            ));
        }
        let mut meta = vec![0u8; meta_len as usize];
        r.read_exact(&mut meta)
            .map_err(|e| Error::corrupt(path, format!("truncated message at byte {pos}: {e}")))?;
        let msg = arrow::ipc::root_as_message(&meta)
            .map_err(|e| Error::corrupt(path, format!("bad message at byte {pos}: {e}")))?;
        let total = header + meta_len as u64 + msg.bodyLength().max(0) as u64;
        if pos + total > end {
            return Err(Error::corrupt(
                path,
                format!("message at byte {pos} runs past the end"),
            ));
        }
        match msg.header_type() {
            arrow::ipc::MessageHeader::RecordBatch => {
                let n = msg
                    .header_as_record_batch()
                    .map_or(0, |b| b.length().max(0));
                batches.push((pos, total));
                rows.push(n as u64);
            }
            _ => {
                // Schema and dictionary messages: kept so one batch can be decoded on its own.
                let mut bytes = vec![0u8; total as usize];
                r.seek(SeekFrom::Start(pos))
                    .map_err(|e| Error::io(path, e))?;
                r.read_exact(&mut bytes).map_err(|e| Error::io(path, e))?;
                prefix.extend_from_slice(&bytes);
            }
        }
        pos += total;
    }
    if prefix.is_empty() {
        return Err(Error::corrupt(path, "no arrow schema message"));
    }
    Ok((FileIndex::Ipc { prefix, batches }, rows))
}

/// Where the first message of an IPC file starts: the 6-byte magic is padded with zeros to the
/// writer's alignment (8 in the spec, 64 in arrow-rs), and current messages begin with 0xFFFFFFFF.
fn first_message(r: &mut BufReader<File>, path: &Path) -> Result<u64> {
    r.seek(SeekFrom::Start(6)).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 128];
    let n = r.read(&mut head).map_err(|e| Error::io(path, e))?;
    Ok(match head[..n].iter().position(|&b| b != 0) {
        Some(i) if head[i] == 0xff => 6 + i as u64,
        // A pre-1.0 file without continuation markers: the spec's 8-byte padding.
        _ => 8,
    })
}

fn read_ipc_batch(path: &Path, prefix: &[u8], (pos, len): (u64, u64)) -> Result<RecordBatch> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    file.seek(SeekFrom::Start(pos))
        .map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::with_capacity(prefix.len() + len as usize);
    buf.extend_from_slice(prefix);
    let start = buf.len();
    buf.resize(start + len as usize, 0);
    file.read_exact(&mut buf[start..])
        .map_err(|e| Error::io(path, e))?;
    let mut reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(buf), None)
        .map_err(|e| Error::corrupt(path, e))?;
    match reader.next() {
        Some(b) => b.map_err(|e| Error::corrupt(path, e)),
        None => Err(Error::corrupt(
            path,
            format!("no record batch at byte {pos}"),
        )),
    }
}

fn index_jsonl(path: &Path) -> Result<(FileIndex, Vec<u64>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::new(file);
    let mut blocks = Vec::new();
    let mut rows = Vec::new();
    let mut pos = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            if rows.last().is_none_or(|&k| k == JSONL_BLOCK_ROWS) {
                blocks.push(pos);
                rows.push(0);
            }
            if let Some(k) = rows.last_mut() {
                *k += 1;
            }
        }
        pos += n as u64;
    }
    Ok((FileIndex::Jsonl(blocks), rows))
}

fn next_nonblank_line(r: &mut BufReader<File>, path: &Path) -> Result<Option<String>> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::corrupt(path, "file is not UTF-8 text"),
            _ => Error::io(path, e),
        })?;
        if n == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            return Ok(Some(line));
        }
    }
}
