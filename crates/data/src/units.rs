//! Counting how much each chunk contributes: padded rows (pad mode) or tokens (pack mode).

use crate::doc::DocBuilder;
use crate::loader::rows_are_units;
use crate::source::Dataset;
use crate::{DataConfig, OnError, Packing, Result};

/// Units per chunk. Uses row counts from file metadata when every row is exactly one padded row;
/// otherwise reads every row once (checking it on the way).
///
/// # Errors
/// Read errors and, with `on_error = "fail"`, the first bad row.
pub(crate) fn count(ds: &Dataset, builder: &DocBuilder, cfg: &DataConfig) -> Result<Vec<u64>> {
    (0..ds.chunks.len())
        .map(|c| count_from(ds, builder, cfg, c, 0))
        .collect()
}

/// Units of rows `start..` of chunk `c`, as [`count`] counts them.
///
/// # Errors
/// As [`count`].
pub(crate) fn count_from(
    ds: &Dataset,
    builder: &DocBuilder,
    cfg: &DataConfig,
    c: usize,
    start: u64,
) -> Result<u64> {
    if rows_are_units(cfg) {
        return Ok(ds.chunks[c].rows.saturating_sub(start));
    }
    let mut reader = ds.open_chunk(c, start)?;
    let mut units = 0u64;
    while let Some(row) = reader.next_row()? {
        let doc = match row.and_then(|r| builder.build(r, ds.path(c))) {
            Ok(d) => d,
            Err(e) if cfg.on_error == OnError::Skip && e.is_row_level() => continue,
            Err(e) => return Err(e),
        };
        units += doc_units(cfg, doc.tokens.len());
    }
    Ok(units)
}

/// Units of a document (or of what is left of one) of `len` tokens: its tokens in pack mode, the
/// rows it fills in pad mode (at least one: an empty document still takes a padded row).
pub(crate) fn doc_units(cfg: &DataConfig, len: usize) -> u64 {
    let len = len as u64;
    match cfg.packing {
        Packing::Pack => len,
        Packing::Pad => len.div_ceil(cfg.seq_len as u64).max(1),
    }
}
