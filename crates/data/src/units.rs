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
    if rows_are_units(cfg) {
        return Ok(ds.chunks.iter().map(|c| c.rows).collect());
    }
    let seq = cfg.seq_len as u64;
    let mut out = Vec::with_capacity(ds.chunks.len());
    for c in 0..ds.chunks.len() {
        let mut reader = ds.open_chunk(c, 0)?;
        let mut units = 0u64;
        while let Some(row) = reader.next_row()? {
            let doc = match row.and_then(|r| builder.build(r, ds.path(c))) {
                Ok(d) => d,
                Err(e) if cfg.on_error == OnError::Skip && e.is_row_level() => continue,
                Err(e) => return Err(e),
            };
            let len = doc.tokens.len() as u64;
            units += match cfg.packing {
                Packing::Pack => len,
                Packing::Pad => len.div_ceil(seq).max(1),
            };
        }
        out.push(units);
    }
    Ok(out)
}
