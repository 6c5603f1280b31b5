//! Columnar datasets: Parquet files (every dataset on the hub) and Arrow IPC files (the
//! `data-*.arrow` of a `datasets` save_to_disk folder), read a batch of rows at a time and
//! only the columns the spec's kind reads. Each row becomes the JSON object a line of JSONL
//! would be, so one reader of records (and one set of messages) serves every format.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::Result;
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, LargeStringArray, OffsetSizeTrait, RecordBatch, StructArray};
use arrow_schema::{ArrowError, DataType, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Value};

use crate::error::bad_input;
use crate::spec::{DataKind, DataSpec};

/// Rows decoded at a time: a batch's columns, not the file's, are in memory.
const BATCH_ROWS: usize = 1024;

/// The two columnar formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columnar {
    Parquet,
    /// Arrow IPC, as a stream (what `datasets` writes) or as a file (`ARROW1` at both ends).
    Arrow,
}

/// Hand each row of the file to `each` in order, numbered from 1, as a JSON object of the
/// columns the spec's kind reads. A column the kind needs that is missing or not of a type it
/// can read is an error naming the file, the column and the type found; a damaged file is one
/// naming the file.
pub fn rows(
    path: &Path,
    format: Columnar,
    spec: &DataSpec,
    mut each: impl FnMut(usize, Value) -> Result<()>,
) -> Result<()> {
    let file = crate::files::open_regular(path).map_err(|e| bad_input(format!("the dataset {e}")))?;
    let damaged = |e: &dyn std::fmt::Display| {
        let what = match format {
            Columnar::Parquet => "Parquet",
            Columnar::Arrow => "Arrow",
        };
        bad_input(format!("{}: not a readable {what} file: {e}", path.display()))
    };
    // The Arrow and Parquet readers panic on some damaged files rather than return an error:
    // such a panic is the file's fault, said as such.
    let contained = |e: String| damaged(&format!("the reader failed on it ({e})"));
    let open = || -> Result<Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>>>> {
        Ok(match format {
            Columnar::Parquet => {
                let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| damaged(&e))?;
                let columns = columns(path, builder.schema(), spec)?;
                let mask = ProjectionMask::roots(builder.parquet_schema(), columns);
                let reader =
                    builder.with_projection(mask).with_batch_size(BATCH_ROWS).build().map_err(|e| damaged(&e))?;
                Box::new(reader)
            }
            Columnar::Arrow => {
                let mut file = file;
                let mut magic = [0u8; 6];
                let is_file_format = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
                check_ipc_lengths(&mut file, is_file_format).map_err(|e| damaged(&e))?;
                file.seek(SeekFrom::Start(0)).map_err(|e| damaged(&e))?;
                let reader: Box<dyn arrow_array::RecordBatchReader> = match is_file_format {
                    true => Box::new(arrow_ipc::reader::FileReader::try_new(file, None).map_err(|e| damaged(&e))?),
                    false => Box::new(
                        arrow_ipc::reader::StreamReader::try_new(BufReader::with_capacity(1 << 20, file), None)
                            .map_err(|e| damaged(&e))?,
                    ),
                };
                let schema = reader.schema();
                let columns = columns(path, &schema, spec)?;
                Box::new(reader.map(move |batch| batch?.project(&columns)))
            }
        })
    };
    let mut batches = crate::error::without_panics(open).map_err(contained)??;
    let mut row = 0;
    while let Some(batch) = crate::error::without_panics(|| batches.next()).map_err(contained)? {
        let batch = batch.map_err(|e| damaged(&e))?;
        let schema = batch.schema();
        let values = || -> Result<Vec<(String, Vec<Value>)>> {
            schema
                .fields()
                .iter()
                .zip(batch.columns())
                .map(|(field, column)| Ok((field.name().clone(), column_values(path, field.name(), column)?)))
                .collect()
        };
        let values = crate::error::without_panics(values).map_err(contained)??;
        for i in 0..batch.num_rows() {
            row += 1;
            let object: Map<String, Value> =
                values.iter().map(|(name, column)| (name.clone(), column[i].clone())).collect();
            each(row, Value::Object(object))?;
        }
    }
    Ok(())
}

/// The most bytes one compressed Arrow buffer may say it holds uncompressed.
const MAX_IPC_BUFFER: u64 = 1 << 32;

/// Check the lengths an Arrow IPC file declares before Arrow's reader sees them: each message's
/// header and body inside the file, each compressed buffer's uncompressed size at most
/// [`MAX_IPC_BUFFER`]. The reader allocates what these lengths say before it reads, so a damaged
/// one would end the process (an allocation that cannot succeed aborts) instead of failing.
fn check_ipc_lengths(file: &mut std::fs::File, file_format: bool) -> std::result::Result<(), String> {
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if file_format {
        // The file format ends with its footer's length and `ARROW1`; the footer lists the
        // record batches and dictionaries by offset and length.
        let tail = read_at(file, size.saturating_sub(10), 10)?;
        let footer_length = u64::try_from(i32::from_le_bytes(tail[..4].try_into().expect("4 bytes")))
            .map_err(|_| "a negative footer length".to_string())?;
        let footer = read_at(file, size.saturating_sub(10).saturating_sub(footer_length), footer_length)?;
        let footer = arrow_ipc::root_as_footer(&footer).map_err(|e| format!("a damaged footer: {e}"))?;
        let blocks = footer.recordBatches().into_iter().flatten().chain(footer.dictionaries().into_iter().flatten());
        for block in blocks {
            let (offset, header, body) = (block.offset(), block.metaDataLength(), block.bodyLength());
            let fits = u64::try_from(offset).ok().zip(u64::try_from(header).ok()).zip(u64::try_from(body).ok());
            match fits.and_then(|((o, h), b)| o.checked_add(h)?.checked_add(b)) {
                Some(end) if end <= size => {}
                _ => return Err(format!("a block of {header} + {body} bytes at byte {offset}, past the file's end")),
            }
            // The reader takes the message from the block's first `header` bytes and its body
            // from the rest, whatever the message's own prefix says.
            let (offset, header) = (offset as u64, header as u64);
            let bytes = read_at(file, offset, header)?;
            let skip = match bytes.get(..4) {
                Some([0xff, 0xff, 0xff, 0xff]) => 8,
                _ => 4,
            };
            let message = arrow_ipc::root_as_message(bytes.get(skip..).unwrap_or_default())
                .map_err(|e| format!("a damaged message at byte {offset}: {e}"))?;
            check_ipc_buffers(file, &message, offset + header, body as u64)?;
        }
        return Ok(());
    }
    let mut offset = 0;
    while offset < size {
        match check_ipc_message(file, offset, size)? {
            Some(next) => offset = next,
            None => break,
        }
    }
    Ok(())
}

/// Check the IPC message at `offset` of a file of `size` bytes; return where the next one
/// starts, or `None` at the stream's end marker.
fn check_ipc_message(file: &mut std::fs::File, offset: u64, size: u64) -> std::result::Result<Option<u64>, String> {
    let word = |bytes: Vec<u8>| i32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    // A length, after the continuation marker 0xFFFFFFFF (or without it, as older writers did).
    let (mut length, mut start) = (word(read_at(file, offset, 4)?), offset + 4);
    if length == -1 {
        (length, start) = (word(read_at(file, start, 4)?), start + 4);
    }
    let length = u64::try_from(length).map_err(|_| format!("a negative message length at byte {offset}"))?;
    if length == 0 {
        return Ok(None);
    }
    let header = read_at(file, start, length)?;
    let message =
        arrow_ipc::root_as_message(&header).map_err(|e| format!("a damaged message at byte {offset}: {e}"))?;
    let body_start = start + length;
    let body = u64::try_from(message.bodyLength()).map_err(|_| format!("a negative body length at byte {offset}"))?;
    if body_start.checked_add(body).is_none_or(|end| end > size) {
        return Err(format!("a message body of {body} bytes at byte {body_start}, past the file's end"));
    }
    check_ipc_buffers(file, &message, body_start, body)?;
    Ok(Some(body_start + body))
}

/// Check the buffers of a message whose body is the `body` bytes at `body_start`: each inside
/// the body, and a compressed one's uncompressed size at most [`MAX_IPC_BUFFER`].
fn check_ipc_buffers(
    file: &mut std::fs::File,
    message: &arrow_ipc::Message<'_>,
    body_start: u64,
    body: u64,
) -> std::result::Result<(), String> {
    let batch = message.header_as_record_batch().or_else(|| message.header_as_dictionary_batch()?.data());
    if let Some(batch) = batch.filter(|batch| batch.compression().is_some()) {
        for buffer in batch.buffers().into_iter().flatten() {
            let (at, length) = (buffer.offset(), buffer.length());
            let inside = u64::try_from(at).ok().zip(u64::try_from(length).ok());
            let Some((at, length)) =
                inside.filter(|&(at, length)| at.checked_add(length).is_some_and(|end| end <= body))
            else {
                return Err(format!("a buffer of {length} bytes at {at}, outside its message's body"));
            };
            if length >= 8 {
                let declared = i64::from_le_bytes(read_at(file, body_start + at, 8)?.try_into().expect("8 bytes"));
                if u64::try_from(declared).is_ok_and(|declared| declared > MAX_IPC_BUFFER) {
                    return Err(format!("a compressed buffer that says it holds {declared} bytes"));
                }
            }
        }
    }
    Ok(())
}

/// `length` bytes at `offset`, which must lie inside the file.
fn read_at(file: &mut std::fs::File, offset: u64, length: u64) -> std::result::Result<Vec<u8>, String> {
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!("{length} bytes at byte {offset}, past the file's end ({size} bytes)"));
    }
    let mut bytes = vec![0; length as usize];
    file.seek(SeekFrom::Start(offset)).and_then(|_| file.read_exact(&mut bytes)).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// The indexes of the columns `spec`'s kind reads from a file of schema `schema`, checked: each one there,
/// of a type it can be read as (text, or for chat a list of turns).
fn columns(path: &Path, schema: &Schema, spec: &DataSpec) -> Result<Vec<usize>> {
    let (text, optional_text, turns): (Vec<&str>, Vec<&str>, Option<&str>) = match spec.kind {
        DataKind::Pair => (vec![&spec.prompt_field, &spec.response_field], vec![], None),
        DataKind::Alpaca => (vec![&spec.instruction_field, &spec.output_field], vec![&spec.input_field], None),
        DataKind::Text => (vec![&spec.text_field], vec![], None),
        DataKind::Chat => (vec![], vec![], Some(&spec.messages_field)),
        DataKind::Preference => (vec![&spec.prompt_field, &spec.response_field, &spec.rejected_field], vec![], None),
    };
    let found = || schema.fields().iter().map(|f| format!("`{}`", f.name())).collect::<Vec<_>>().join(", ");
    let mut columns = Vec::new();
    let wanted = text.iter().map(|n| (*n, true, false)).chain(optional_text.iter().map(|n| (*n, false, false)));
    for (name, required, is_turns) in wanted.chain(turns.map(|n| (n, true, true))) {
        let Ok(index) = schema.index_of(name) else {
            if !required {
                continue;
            }
            let hint = match (is_turns && name == "messages", schema.index_of("conversations").is_ok()) {
                (true, true) => " (it has `conversations`: set data.messages_field = \"conversations\")",
                _ => "",
            };
            return Err(bad_input(format!(
                "{}: no column `{name}`{hint}; the file's columns are {}",
                path.display(),
                found()
            )));
        };
        let data_type = schema.field(index).data_type();
        let readable = match is_turns {
            false => is_text(data_type),
            true => turns_of(data_type)
                .is_some_and(|fields| fields.iter().all(|f| !is_turn_key(f.name()) || is_text(f.data_type()))),
        };
        if !readable {
            let expected = match is_turns {
                false => "text (a string column)",
                true => "a list of turns (structs of string `role` and `content`, or `from` and `value`)",
            };
            return Err(bad_input(format!("{}: column `{name}` holds {data_type}, not {expected}", path.display())));
        }
        columns.push(index);
    }
    Ok(columns)
}

/// Whether a column of this type reads as text: any of Arrow's string types, or a dictionary
/// of them (pandas' categoricals).
fn is_text(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, values) => is_text(values),
        _ => false,
    }
}

/// The fields of a list-of-struct column's structs.
fn turns_of(data_type: &DataType) -> Option<&arrow_schema::Fields> {
    match data_type {
        DataType::List(item) | DataType::LargeList(item) => match item.data_type() {
            DataType::Struct(fields) => Some(fields),
            _ => None,
        },
        _ => None,
    }
}

fn is_turn_key(name: &str) -> bool {
    ["role", "content", "from", "value"].contains(&name)
}

/// A column's values as JSON: strings (null where null), or lists of turn objects.
fn column_values(path: &Path, name: &str, column: &ArrayRef) -> Result<Vec<Value>> {
    match column.data_type() {
        DataType::List(_) => Ok(turn_lists(path, name, column.as_list::<i32>())?),
        DataType::LargeList(_) => Ok(turn_lists(path, name, column.as_list::<i64>())?),
        _ => Ok(strings(path, name, column)?
            .iter()
            .map(|s| s.map_or(Value::Null, |s| Value::String(s.into())))
            .collect()),
    }
}

/// A text column as one string type, whatever its own.
fn strings(path: &Path, name: &str, column: &ArrayRef) -> Result<LargeStringArray> {
    let cast = arrow_cast::cast(column, &DataType::LargeUtf8)
        .map_err(|e| bad_input(format!("{}: column `{name}` cannot be read as text: {e}", path.display())))?;
    Ok(cast.as_string::<i64>().clone())
}

/// Each row's list of turns, as `{key: text}` objects with the struct's turn keys.
fn turn_lists<O: OffsetSizeTrait>(
    path: &Path,
    name: &str,
    lists: &arrow_array::GenericListArray<O>,
) -> Result<Vec<Value>> {
    let turns: &StructArray = lists.values().as_struct();
    let keys: Vec<(String, LargeStringArray)> = turns
        .fields()
        .iter()
        .zip(turns.columns())
        .filter(|(field, _)| is_turn_key(field.name()))
        .map(|(field, column)| Ok((field.name().clone(), strings(path, name, column)?)))
        .collect::<Result<_>>()?;
    let turn = |i: usize| -> Value {
        if turns.is_null(i) {
            return Value::Null;
        }
        let object = keys
            .iter()
            .filter(|(_, values)| values.is_valid(i))
            .map(|(key, values)| (key.clone(), Value::String(values.value(i).to_string())));
        Value::Object(object.collect())
    };
    let offsets = lists.value_offsets();
    Ok((0..lists.len())
        .map(|row| match lists.is_null(row) {
            true => Value::Null,
            false => Value::Array((offsets[row].as_usize()..offsets[row + 1].as_usize()).map(turn).collect()),
        })
        .collect())
}
