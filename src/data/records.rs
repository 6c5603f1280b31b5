//! Prompt/response records from a JSON array or a JSONL file, each remembering its line.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::error::bad_input;
use crate::spec::{DataFormat, DataSpec};

/// One training example, with the line of the file it came from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: String,
    pub response: String,
    pub line: usize,
}

/// Read the examples of one file.
pub fn read(path: &Path, spec: &DataSpec) -> Result<Vec<Example>> {
    let bytes =
        std::fs::read(path).map_err(|e| bad_input(format!("{}: cannot read the dataset: {e}", path.display())))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        bad_input(format!("{}:{line}: not valid UTF-8", path.display()))
    })?;
    let format = match spec.format {
        DataFormat::Auto if path.extension().is_some_and(|e| e == "jsonl") => DataFormat::Jsonl,
        DataFormat::Auto if text.trim_start().starts_with('[') => DataFormat::Json,
        DataFormat::Auto => DataFormat::Jsonl,
        other => other,
    };
    let records: Vec<(usize, Value)> = match format {
        DataFormat::Jsonl => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map(|v| (i + 1, v))
                    .map_err(|e| bad_input(format!("{}:{}: not a JSON object: {e}", path.display(), i + 1)))
            })
            .collect::<Result<_>>()?,
        _ => json_array(path, &text)?,
    };
    let examples = records
        .into_iter()
        .map(|(line, record)| {
            let field = |name: &str| -> Result<String> {
                match record.get(name) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(bad_input(format!(
                        "{}:{line}: field `{name}` must be a string, found {}",
                        path.display(),
                        kind_of(other)
                    ))),
                    None => Err(bad_input(format!("{}:{line}: record has no field `{name}`", path.display()))),
                }
            };
            Ok(Example { prompt: field(&spec.prompt_field)?, response: field(&spec.response_field)?, line })
        })
        .collect::<Result<Vec<_>>>()?;
    if examples.is_empty() {
        return Err(bad_input(format!("{}: the dataset has no examples", path.display())));
    }
    Ok(examples)
}

/// A JSON array of records, each with the line its object starts on.
fn json_array(path: &Path, text: &str) -> Result<Vec<(usize, Value)>> {
    let values: Vec<Value> = serde_json::from_str(text)
        .map_err(|e| bad_input(format!("{}:{}: not a JSON array of records: {e}", path.display(), e.line())))?;
    // serde_json does not report where array elements start; find the top-level `{`s.
    let mut starts = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut line) = (0usize, false, false, 1usize);
    for c in text.chars() {
        match c {
            '\n' => line += 1,
            _ if in_string => match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            },
            '"' => in_string = true,
            '[' | '{' => {
                if depth == 1 {
                    starts.push(line);
                }
                depth += 1;
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(values.into_iter().enumerate().map(|(i, v)| (starts.get(i).copied().unwrap_or(1), v)).collect())
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
