//! Records from disk — JSON arrays, JSONL, CSV with a header row, plain text, Parquet or Arrow
//! — as the spec's kind says: prompt/response pairs, alpaca records, chat conversations or
//! documents. Each record remembers the file and line it starts on (a columnar file's row,
//! counted from 1), for messages.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use serde_json::Value;

use super::columnar::{self, Columnar};
use crate::error::bad_input;
use crate::spec::{DataFormat, DataKind, DataSpec, Documents};

/// One training example, with the file and line it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub record: Record,
    pub file: Arc<Path>,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Pair {
        prompt: String,
        response: String,
    },
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    Chat {
        messages: Vec<Message>,
    },
    Text {
        text: String,
    },
    Preference {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    /// A preference pair in TRL's conversational form: the prompt's turns, then the chosen and
    /// the rejected completions' turns (an assistant's answer each).
    ChatPreference {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl Example {
    /// The record's texts, for training a tokenizer on them.
    pub fn texts(&self) -> Vec<&str> {
        match &self.record {
            Record::Pair { prompt, response } => vec![prompt, response],
            Record::Alpaca { instruction, input, output } => vec![instruction, input, output],
            Record::Chat { messages } => messages.iter().map(|m| m.content.as_str()).collect(),
            Record::Text { text } => vec![text],
            Record::Preference { prompt, chosen, rejected } => vec![prompt, chosen, rejected],
            Record::ChatPreference { prompt, chosen, rejected } => {
                prompt.iter().chain(chosen).chain(rejected).map(|m| m.content.as_str()).collect()
            }
        }
    }
}

/// A raw record: a JSON object or a CSV row, and its line.
enum Row {
    Json(Value),
    Csv(std::collections::HashMap<String, String>),
}

/// Examples handed out at a time by `read_chunks`.
pub const CHUNK: usize = 4096;

/// Read the examples of one file.
pub fn read(path: &Path, spec: &DataSpec) -> Result<Vec<Example>> {
    let mut all = Vec::new();
    read_chunks(path, spec, |chunk| {
        all.extend(chunk);
        Ok(())
    })?;
    Ok(all)
}

/// The examples of several files, one after the other.
pub fn read_all(files: &[std::path::PathBuf], spec: &DataSpec) -> Result<Vec<Example>> {
    let mut all = Vec::new();
    read_chunks_of(files, spec, |chunk| {
        all.extend(chunk);
        Ok(())
    })?;
    Ok(all)
}

/// [`read_chunks`] of several files, one after the other (a chunk holds one file's examples);
/// returns how many there were in all.
pub fn read_chunks_of(
    files: &[std::path::PathBuf],
    spec: &DataSpec,
    mut each: impl FnMut(Vec<Example>) -> Result<()>,
) -> Result<usize> {
    files.iter().try_fold(0, |count, file| Ok(count + read_chunks(file, spec, &mut each)?))
}

/// The examples of one file in order, handed to `each` up to [`CHUNK`] at a time; returns how
/// many there were. The line formats (JSONL, CSV, text by line) are read as a stream, so
/// memory holds one chunk of records, not the file; a JSON array, or a text file that is one
/// document, is read whole.
pub fn read_chunks(path: &Path, spec: &DataSpec, each: impl FnMut(Vec<Example>) -> Result<()>) -> Result<usize> {
    let cannot_read = |e: std::io::Error| bad_input(format!("{}: cannot read the dataset: {e}", path.display()));
    let file = crate::files::open_regular(path).map_err(|e| bad_input(format!("the dataset {e}")))?;
    let max = spec.max_record_bytes;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let format = match spec.format {
        DataFormat::Auto => match extension {
            "jsonl" => DataFormat::Jsonl,
            "csv" => DataFormat::Csv,
            "txt" | "text" => DataFormat::Text,
            "parquet" => DataFormat::Parquet,
            "arrow" | "feather" | "ipc" => DataFormat::Arrow,
            _ => {
                let head = reader.fill_buf().map_err(cannot_read)?;
                match head.iter().find(|b| !b.is_ascii_whitespace()) {
                    Some(b'[') => DataFormat::Json,
                    _ => DataFormat::Jsonl,
                }
            }
        },
        other => other,
    };
    if format == DataFormat::Text && spec.kind != DataKind::Text {
        return Err(bad_input(format!(
            "{}: a plain-text file holds documents: set data.kind = \"text\"",
            path.display()
        )));
    }
    let mut chunks = Chunks { each, chunk: Vec::with_capacity(CHUNK), count: 0 };
    let file: Arc<Path> = path.into();
    let example = |line: usize, row: Row| -> Result<Example> {
        let example = Example { record: record(path, line, &row, spec)?, file: file.clone(), line };
        let bytes: usize = example.texts().iter().map(|t| t.len()).sum();
        if bytes > max {
            return Err(too_long(format!("{}:{line}: the record holds {bytes} bytes of text", path.display()), max));
        }
        Ok(example)
    };
    match (format, spec.documents) {
        (DataFormat::Text, Documents::File) => {
            let mut bytes = Vec::new();
            (&mut reader).take(max as u64 + 1).read_to_end(&mut bytes).map_err(cannot_read)?;
            if bytes.len() > max {
                let why =
                    format!("{}: a document read whole (data.documents = \"file\") of more bytes", path.display());
                return Err(too_long(why, max));
            }
            let text = whole_text(path, &bytes[..])?;
            chunks.push(Example { record: Record::Text { text }, file: file.clone(), line: 1 })?
        }
        (DataFormat::Text, Documents::Line) => {
            for line in lines(path, reader, max) {
                let (number, text) = line?;
                if !text.trim().is_empty() {
                    chunks.push(Example { record: Record::Text { text }, file: file.clone(), line: number })?;
                }
            }
        }
        (DataFormat::Jsonl, _) => {
            for line in lines(path, reader, max) {
                let (number, text) = line?;
                if !text.trim().is_empty() {
                    chunks.push(example(number, jsonl_row(path, number, &text)?)?)?;
                }
            }
        }
        (DataFormat::Parquet | DataFormat::Arrow, _) => {
            drop(reader);
            let columnar = match format {
                DataFormat::Parquet => Columnar::Parquet,
                _ => Columnar::Arrow,
            };
            columnar::rows(path, columnar, spec, |row, value| chunks.push(example(row, Row::Json(value))?))?
        }
        (DataFormat::Csv, _) => {
            let bounded = LineBound { inner: reader, path, max, run: 0, line: 1 };
            csv_rows(path, bounded, |line, row| chunks.push(example(line, row)?))?
        }
        _ => {
            for (line, row) in json_array(path, &whole_text(path, reader)?)? {
                chunks.push(example(line, row)?)?;
            }
        }
    }
    let count = chunks.finish()?;
    if count == 0 {
        return Err(bad_input(format!("{}: the dataset has no examples", path.display())));
    }
    Ok(count)
}

/// Examples gathered into chunks for a consumer.
struct Chunks<F: FnMut(Vec<Example>) -> Result<()>> {
    each: F,
    chunk: Vec<Example>,
    count: usize,
}

impl<F: FnMut(Vec<Example>) -> Result<()>> Chunks<F> {
    fn push(&mut self, example: Example) -> Result<()> {
        self.chunk.push(example);
        self.count += 1;
        match self.chunk.len() == CHUNK {
            true => (self.each)(std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK))),
            false => Ok(()),
        }
    }

    /// Hand out the last, partial chunk; how many examples there were.
    fn finish(mut self) -> Result<usize> {
        if !self.chunk.is_empty() {
            (self.each)(std::mem::take(&mut self.chunk))?;
        }
        Ok(self.count)
    }
}

/// The rest of the file as text; bytes that are not UTF-8 are an error naming their line.
fn whole_text(path: &Path, mut reader: impl Read) -> Result<String> {
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| bad_input(format!("{}: cannot read the dataset: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        bad_input(format!("{}:{line}: not valid UTF-8", path.display()))
    })
}

/// The refusal of a record over `data.max_record_bytes`: `what` says where and what it is.
fn too_long(what: String, max: usize) -> anyhow::Error {
    bad_input(format!(
        "{what} than data.max_record_bytes allows ({max}); raise data.max_record_bytes if records this long are meant"
    ))
}

/// The file's lines, numbered from 1, without their line ending (`\n` or `\r\n`); a line that
/// is not UTF-8, or longer than `max` bytes, is an error naming it. No more than `max` bytes
/// and its line ending are read into memory for a line (an endless one ends there).
fn lines<'a>(
    path: &'a Path,
    mut reader: impl BufRead + 'a,
    max: usize,
) -> impl Iterator<Item = Result<(usize, String)>> + 'a {
    let mut number = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        let mut bytes = Vec::new();
        let read = (&mut reader).take(max as u64 + 2).read_until(b'\n', &mut bytes);
        number += 1;
        let line = match read {
            Ok(0) => return None,
            Ok(_) => {
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
                if bytes.len() > max {
                    Err(too_long(format!("{}:{number}: a line of more bytes", path.display()), max))
                } else {
                    String::from_utf8(bytes)
                        .map(|text| (number, text))
                        .map_err(|_| bad_input(format!("{}:{number}: not valid UTF-8", path.display())))
                }
            }
            Err(e) => Err(bad_input(format!("{}: cannot read the dataset: {e}", path.display()))),
        };
        failed = line.is_err();
        Some(line)
    })
}

/// A reader that fails once a line runs past `max` bytes, naming it: what reads CSV records
/// (which may span lines, inside quotes) then holds no more than that of one line.
struct LineBound<'a, R> {
    inner: R,
    path: &'a Path,
    max: usize,
    /// Bytes of the current line so far.
    run: usize,
    line: usize,
}

impl<R: Read> Read for LineBound<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &byte in &buf[..n] {
            if byte == b'\n' {
                (self.run, self.line) = (0, self.line + 1);
            } else {
                self.run += 1;
                if self.run > self.max + 1 {
                    let why = format!("{}:{}: a line of more bytes", self.path.display(), self.line);
                    return Err(std::io::Error::other(format!("{:#}", too_long(why, self.max))));
                }
            }
        }
        Ok(n)
    }
}

fn record(path: &Path, line: usize, row: &Row, spec: &DataSpec) -> Result<Record> {
    let at = || format!("{}:{line}", path.display());
    let field = |name: &str, required: bool| -> Result<String> {
        let found = match row {
            Row::Json(value) => match value.get(name) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Null) if required => {
                    return Err(bad_input(format!("{}: field `{name}` is null", at())));
                }
                Some(Value::Null) | None => None,
                Some(other) => {
                    return Err(bad_input(format!(
                        "{}: field `{name}` must be a string, found {}",
                        at(),
                        kind_of(other)
                    )))
                }
            },
            Row::Csv(map) => map.get(name).cloned(),
        };
        match found {
            Some(s) => Ok(s),
            None if required => Err(bad_input(format!("{}: record has no field `{name}`", at()))),
            None => Ok(String::new()),
        }
    };
    Ok(match spec.kind {
        DataKind::Pair => {
            Record::Pair { prompt: field(&spec.prompt_field, true)?, response: field(&spec.response_field, true)? }
        }
        DataKind::Alpaca => Record::Alpaca {
            instruction: field(&spec.instruction_field, true)?,
            input: field(&spec.input_field, false)?,
            output: field(&spec.output_field, true)?,
        },
        DataKind::Text => Record::Text { text: field(&spec.text_field, true)? },
        DataKind::Preference => match row {
            Row::Json(value) if value.get(&spec.prompt_field).is_some_and(Value::is_array) => {
                let turns = |name: &str| -> Result<Vec<Message>> {
                    let list = value
                        .get(name)
                        .ok_or_else(|| bad_input(format!("{}: record has no field `{name}`", at())))?
                        .as_array()
                        .ok_or_else(|| {
                            bad_input(format!(
                                "{}: field `{name}` must be a list of messages, as `{}` is",
                                at(),
                                spec.prompt_field
                            ))
                        })?;
                    list.iter()
                        .enumerate()
                        .map(|(i, m)| {
                            message(m)
                                .map_err(|why| bad_input(format!("{}: field `{name}`, message {}: {why}", at(), i + 1)))
                        })
                        .collect()
                };
                let (prompt, chosen, rejected) =
                    (turns(&spec.prompt_field)?, turns(&spec.response_field)?, turns(&spec.rejected_field)?);
                for (name, completion) in [(&spec.response_field, &chosen), (&spec.rejected_field, &rejected)] {
                    if !completion.iter().any(|m| m.role == Role::Assistant) {
                        return Err(bad_input(format!("{}: field `{name}` has no assistant message", at())));
                    }
                }
                Record::ChatPreference { prompt, chosen, rejected }
            }
            _ => Record::Preference {
                prompt: field(&spec.prompt_field, true)?,
                chosen: field(&spec.response_field, true)?,
                rejected: field(&spec.rejected_field, true)?,
            },
        },
        DataKind::Chat => {
            let Row::Json(value) = row else {
                return Err(bad_input(format!("{}: chat records need JSON or JSONL, not CSV", at())));
            };
            let name = &spec.messages_field;
            let list = value
                .get(name)
                .ok_or_else(|| {
                    // ShareGPT's conversations are usually under `conversations`.
                    let hint = match (name.as_str(), value.get("conversations")) {
                        ("messages", Some(_)) => {
                            " (it has `conversations`: set data.messages_field = \"conversations\")"
                        }
                        _ => "",
                    };
                    bad_input(format!("{}: record has no field `{name}`{hint}", at()))
                })?
                .as_array()
                .ok_or_else(|| bad_input(format!("{}: field `{name}` must be a list of messages", at())))?;
            let messages = list
                .iter()
                .enumerate()
                .map(|(i, m)| message(m).map_err(|why| bad_input(format!("{}: message {}: {why}", at(), i + 1))))
                .collect::<Result<Vec<_>>>()?;
            if !messages.iter().any(|m| m.role == Role::Assistant) {
                return Err(bad_input(format!("{}: the conversation has no assistant message to train on", at())));
            }
            Record::Chat { messages }
        }
    })
}

/// One turn of a conversation, in either shape chat data comes in: OpenAI's `{role, content}`
/// (roles system, user, assistant), or ShareGPT's `{from, value}` (from system, human, gpt, as
/// axolotl and LLaMA-Factory read them; `user` and `assistant` too). The keys decide.
fn message(turn: &Value) -> std::result::Result<Message, String> {
    let Some(object) = turn.as_object() else {
        return Err(format!("expected an object with `role` and `content`, found {}", kind_of(turn)));
    };
    let sharegpt = !object.contains_key("role") && (object.contains_key("from") || object.contains_key("value"));
    let (role_key, content_key) = if sharegpt { ("from", "value") } else { ("role", "content") };
    let role = match (object.get(role_key).and_then(Value::as_str), sharegpt) {
        (Some("system"), _) => Role::System,
        (Some("user"), _) | (Some("human"), true) => Role::User,
        (Some("assistant"), _) | (Some("gpt"), true) => Role::Assistant,
        (found, _) => {
            let expected = match sharegpt {
                true => "system, human or gpt (ShareGPT's turns)",
                false => "system, user or assistant",
            };
            let found = found.map_or("missing".to_string(), |r| format!("`{r}`"));
            return Err(format!("`{role_key}` is {found}; expected {expected}"));
        }
    };
    let content =
        object.get(content_key).and_then(Value::as_str).ok_or_else(|| format!("has no string `{content_key}`"))?;
    Ok(Message { role, content: content.to_string() })
}

fn jsonl_row(path: &Path, line: usize, text: &str) -> Result<Row> {
    match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => Ok(Row::Json(value)),
        Ok(other) => {
            Err(bad_input(format!("{}:{line}: expected a JSON object, found {}", path.display(), kind_of(&other))))
        }
        Err(e) => Err(bad_input(format!("{}:{line}: not a JSON object: {e}", path.display()))),
    }
}

/// Each CSV record after the header row, with its line, handed to `each` as it is read.
fn csv_rows(path: &Path, reader: impl Read, mut each: impl FnMut(usize, Row) -> Result<()>) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(reader);
    let headers = reader
        .headers()
        .map_err(|e| match e.is_io_error() {
            true => bad_input(e.to_string()),
            false => bad_input(format!("{}:1: not a CSV header row: {e}", path.display())),
        })?
        .clone();
    for record in reader.records() {
        let record = record.map_err(|e| {
            if e.is_io_error() {
                // A read that failed, or a line past data.max_record_bytes: said as it is.
                return bad_input(e.to_string());
            }
            let line = e.position().map_or(0, |p| p.line());
            bad_input(format!("{}:{line}: not a CSV record: {e}", path.display()))
        })?;
        let line = record.position().map_or(0, |p| p.line()) as usize;
        let map = headers.iter().zip(record.iter()).map(|(h, v)| (h.to_string(), v.to_string())).collect();
        each(line, Row::Csv(map))?;
    }
    Ok(())
}

/// A JSON array of records, each with the line its object starts on.
fn json_array(path: &Path, text: &str) -> Result<Vec<(usize, Row)>> {
    let values: Vec<Value> = serde_json::from_str(text)
        .map_err(|e| bad_input(format!("{}:{}: not a JSON array of records: {e}", path.display(), e.line())))?;
    // serde_json does not report where array elements start: find the line of each top-level value.
    let mut starts = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut line, mut expecting) = (0usize, false, false, 1usize, false);
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if depth == 1 && expecting && !c.is_whitespace() && c != ']' {
            starts.push(line);
            expecting = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                expecting = depth == 0;
                depth += 1;
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let line = starts.get(i).copied().unwrap_or(1);
            match v {
                value @ Value::Object(_) => Ok((line, Row::Json(value))),
                other => Err(bad_input(format!(
                    "{}:{line}: record [{i}]: expected a JSON object, found {}",
                    path.display(),
                    kind_of(&other)
                ))),
            }
        })
        .collect()
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
