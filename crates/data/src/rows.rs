//! Raw rows: what one record of a file holds, before checking and tokenizing.

use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};

use crate::{Columns, Content, Error, Result};

/// One record as read from a file.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RawRow {
    /// 0-based data row within its file.
    pub file_row: u64,
    pub data: RowData,
}

/// The columns of one record that the configured [`Content`] uses.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RowData {
    Tokens {
        ids: Vec<i64>,
        labels: Option<Vec<i64>>,
        mask: Option<Vec<i64>>,
    },
    Text(String),
    PromptCompletion(String, String),
}

/// A row, or the row-level problem with it (so `on_error = "skip"` can drop just that row).
pub(crate) type RowResult = Result<RawRow>;

const LIST_EXPECTED: &str = "list<int32|int64|uint32> or large_list of those";
const STRING_EXPECTED: &str = "string or large_string";

/// Reads the configured columns of `batch`, whose first row is row `first_row` of `path`.
///
/// # Errors
/// File-level: a missing required column or a column of the wrong type. Row-level problems
/// (nulls) come back per row.
pub(crate) fn from_batch(
    batch: &RecordBatch,
    content: Content,
    cols: &Columns,
    path: &Path,
    first_row: u64,
) -> Result<Vec<RowResult>> {
    let n = batch.num_rows();
    let row = |i: usize| first_row + i as u64;
    match content {
        Content::Tokens => {
            let ids = list_column(batch, &cols.input_ids, path, true)?
                .ok_or_else(|| missing(batch, &cols.input_ids, path))?;
            let labels = list_column(batch, &cols.labels, path, false)?;
            let mask = list_column(batch, &cols.attention_mask, path, false)?;
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let r = (|| {
                    let ids = list_row(&ids, i).ok_or_else(|| {
                        Error::bad_row(path, &cols.input_ids, row(i), "null or out-of-range value")
                    })?;
                    let labels = opt_list_row(labels.as_ref(), i, path, &cols.labels, row(i))?;
                    let mask = opt_list_row(mask.as_ref(), i, path, &cols.attention_mask, row(i))?;
                    Ok(RawRow {
                        file_row: row(i),
                        data: RowData::Tokens { ids, labels, mask },
                    })
                })();
                out.push(r);
            }
            Ok(out)
        }
        Content::Text => {
            let text = string_column(batch, &cols.text, path)?;
            Ok((0..n)
                .map(|i| {
                    let t = string_row(&text, i, path, &cols.text, row(i))?;
                    Ok(RawRow {
                        file_row: row(i),
                        data: RowData::Text(t),
                    })
                })
                .collect())
        }
        Content::PromptCompletion => {
            let p = string_column(batch, &cols.prompt, path)?;
            let c = string_column(batch, &cols.completion, path)?;
            Ok((0..n)
                .map(|i| {
                    let pt = string_row(&p, i, path, &cols.prompt, row(i))?;
                    let ct = string_row(&c, i, path, &cols.completion, row(i))?;
                    Ok(RawRow {
                        file_row: row(i),
                        data: RowData::PromptCompletion(pt, ct),
                    })
                })
                .collect())
        }
    }
}

fn missing(batch: &RecordBatch, column: &str, path: &Path) -> Error {
    let present = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ");
    Error::MissingColumn {
        path: path.to_path_buf(),
        column: column.to_string(),
        present,
    }
}

/// A list column as (offsets, values as i64 with nulls for out-of-range), or `None` if optional and absent.
struct ListCol {
    array: ArrayRef,
    offsets: Vec<i64>,
    values: arrow::array::Int64Array,
}

fn list_column(
    batch: &RecordBatch,
    name: &str,
    path: &Path,
    required: bool,
) -> Result<Option<ListCol>> {
    let Some(array) = batch.column_by_name(name) else {
        return if required {
            Err(missing(batch, name, path))
        } else {
            Ok(None)
        };
    };
    let wrong = || Error::WrongType {
        path: path.to_path_buf(),
        column: name.to_string(),
        found: array.data_type().to_string(),
        expected: LIST_EXPECTED,
    };
    let (offsets, child): (Vec<i64>, &ArrayRef) = match array.data_type() {
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            (l.offsets().iter().map(|&o| o as i64).collect(), l.values())
        }
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            (l.offsets().iter().copied().collect(), l.values())
        }
        _ => return Err(wrong()),
    };
    if !child.data_type().is_integer() {
        return Err(wrong());
    }
    // A safe cast turns values that do not fit in i64 (huge u64) into nulls, reported per row.
    let cast = arrow::compute::cast(child, &DataType::Int64).map_err(|_| wrong())?;
    let values = cast.as_primitive::<Int64Type>().clone();
    Ok(Some(ListCol {
        array: array.clone(),
        offsets,
        values,
    }))
}

fn list_row(col: &ListCol, i: usize) -> Option<Vec<i64>> {
    if col.array.is_null(i) {
        return None;
    }
    let (a, b) = (col.offsets[i] as usize, col.offsets[i + 1] as usize);
    let slice = col.values.slice(a, b - a);
    if slice.null_count() > 0 {
        return None;
    }
    Some(slice.values().to_vec())
}

fn opt_list_row(
    col: Option<&ListCol>,
    i: usize,
    path: &Path,
    name: &str,
    row: u64,
) -> Result<Option<Vec<i64>>> {
    match col {
        None => Ok(None),
        Some(c) => list_row(c, i)
            .map(Some)
            .ok_or_else(|| Error::bad_row(path, name, row, "null or out-of-range value")),
    }
}

fn string_column(batch: &RecordBatch, name: &str, path: &Path) -> Result<ArrayRef> {
    let array = batch
        .column_by_name(name)
        .ok_or_else(|| missing(batch, name, path))?;
    match array.data_type() {
        DataType::Utf8 => Ok(array.clone()),
        DataType::LargeUtf8 | DataType::Utf8View => {
            arrow::compute::cast(array, &DataType::Utf8).map_err(|e| Error::corrupt(path, e))
        }
        other => Err(Error::WrongType {
            path: path.to_path_buf(),
            column: name.to_string(),
            found: other.to_string(),
            expected: STRING_EXPECTED,
        }),
    }
}

fn string_row(array: &ArrayRef, i: usize, path: &Path, name: &str, row: u64) -> Result<String> {
    if array.is_null(i) {
        return Err(Error::bad_row(path, name, row, "null value"));
    }
    Ok(array.as_string::<i32>().value(i).to_string())
}

/// Reads one JSONL object into a row, using the same column names.
pub(crate) fn from_json(
    value: &serde_json::Value,
    content: Content,
    cols: &Columns,
    path: &Path,
    file_row: u64,
) -> RowResult {
    let obj = value
        .as_object()
        .ok_or_else(|| Error::bad_row(path, "<line>", file_row, "line is not a JSON object"))?;
    let ints = |name: &str, required: bool| -> Result<Option<Vec<i64>>> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) if !required => Ok(None),
            None => Err(Error::bad_row(path, name, file_row, "missing key")),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| {
                        Error::bad_row(
                            path,
                            name,
                            file_row,
                            format!("{v} is not an integer token id"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(Error::bad_row(
                path,
                name,
                file_row,
                format!("expected a list of integers, got {}", json_kind(v)),
            )),
        }
    };
    let string = |name: &str| -> Result<String> {
        match obj.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            None => Err(Error::bad_row(path, name, file_row, "missing key")),
            Some(v) => Err(Error::bad_row(
                path,
                name,
                file_row,
                format!("expected a string, got {}", json_kind(v)),
            )),
        }
    };
    let data = match content {
        Content::Tokens => RowData::Tokens {
            ids: ints(&cols.input_ids, true)?.unwrap_or_default(),
            labels: ints(&cols.labels, false)?,
            mask: ints(&cols.attention_mask, false)?,
        },
        Content::Text => RowData::Text(string(&cols.text)?),
        Content::PromptCompletion => {
            RowData::PromptCompletion(string(&cols.prompt)?, string(&cols.completion)?)
        }
    };
    Ok(RawRow { file_row, data })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}
