//! TensorBoard event files, written natively into each run folder, so that
//! `tensorboard --logdir runs` shows every run as `<name>/<run-id>`: the training and validation
//! scalars, the generate stage's samples as text, and the resolved spec as hyperparameters.
//!
//! The format is TFRecord framing — the record's length (u64, little-endian), the masked
//! CRC-32C of those 8 bytes, the record, the masked CRC-32C of the record — around `Event`
//! protocol buffers (tensorflow/core/util/event.proto, summary.proto, and the hparams plugin's
//! plugin_data.proto), whose few fields pipe writes are declared below.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;

use crate::error::bad_input;

/// TensorBoard finds event files by this part of their name.
const NAME_MARK: &str = "tfevents";
const PLUGIN_TEXT: &str = "text";
const PLUGIN_HPARAMS: &str = "hparams";
pub const HPARAMS_START_TAG: &str = "_hparams_/session_start_info";
pub const HPARAMS_END_TAG: &str = "_hparams_/session_end_info";

/// The messages, as the protos number their fields.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(string, optional, tag = "3")]
        pub file_version: Option<String>,
        #[prost(message, optional, tag = "5")]
        pub summary: Option<Summary>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(float, optional, tag = "2")]
        pub simple_value: Option<f32>,
        #[prost(message, optional, tag = "8")]
        pub tensor: Option<TensorProto>,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<SummaryMetadata>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryMetadata {
        #[prost(message, optional, tag = "1")]
        pub plugin_data: Option<PluginData>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }

    /// A tensor of strings (the only kind pipe writes: text summaries).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        /// DT_STRING = 7.
        #[prost(int32, tag = "1")]
        pub dtype: i32,
        #[prost(message, optional, tag = "2")]
        pub tensor_shape: Option<TensorShape>,
        #[prost(bytes = "vec", repeated, tag = "8")]
        pub string_val: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShape {
        #[prost(message, repeated, tag = "2")]
        pub dim: Vec<Dim>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dim {
        #[prost(int64, tag = "1")]
        pub size: i64,
    }

    /// The hparams plugin's content: a session's start (its hyperparameters) or end.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HParamsPluginData {
        #[prost(int32, tag = "1")]
        pub version: i32,
        #[prost(message, optional, tag = "3")]
        pub session_start_info: Option<SessionStartInfo>,
        #[prost(message, optional, tag = "4")]
        pub session_end_info: Option<SessionEndInfo>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionStartInfo {
        #[prost(btree_map = "string, message", tag = "1")]
        pub hparams: std::collections::BTreeMap<String, HParamValue>,
        #[prost(double, tag = "5")]
        pub start_time_secs: f64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionEndInfo {
        /// STATUS_SUCCESS = 1, STATUS_FAILURE = 2, STATUS_RUNNING = 3.
        #[prost(int32, tag = "1")]
        pub status: i32,
        #[prost(double, tag = "2")]
        pub end_time_secs: f64,
    }

    /// `google.protobuf.Value`, as far as hyperparameters need it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HParamValue {
        #[prost(double, optional, tag = "2")]
        pub number_value: Option<f64>,
        #[prost(string, optional, tag = "3")]
        pub string_value: Option<String>,
        #[prost(bool, optional, tag = "4")]
        pub bool_value: Option<bool>,
    }
}

use proto::{Event, HParamValue, HParamsPluginData, PluginData, Summary, SummaryMetadata, Value};

/// How a session ended, as the hparams plugin shows it.
#[derive(Debug, Clone, Copy)]
pub enum SessionStatus {
    Success = 1,
    Failure = 2,
}

/// The event file of one run.
pub struct EventFile {
    path: PathBuf,
}

impl EventFile {
    /// The run's event file: the one it has, or a new one (which starts with the version record).
    pub fn open(run: &Path) -> Result<Self> {
        if let Some(path) = find(run) {
            return Ok(Self { path });
        }
        let seconds = now();
        let file = Self { path: run.join(format!("events.out.{NAME_MARK}.{}.pipe", seconds as u64)) };
        file.append(&[Event { wall_time: seconds, file_version: Some("brain.Event:2".into()), ..Default::default() }])?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars at an optimizer step.
    pub fn scalars(&self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|&(tag, v)| Value { tag: tag.into(), simple_value: Some(v as f32), ..Default::default() })
            .collect();
        self.append(&[summary_event(step, value)])
    }

    /// A text (rendered as markdown by TensorBoard) at an optimizer step.
    pub fn text(&self, tag: &str, step: usize, text: &str) -> Result<()> {
        let tensor = proto::TensorProto {
            dtype: 7,
            tensor_shape: Some(proto::TensorShape { dim: vec![proto::Dim { size: 1 }] }),
            string_val: vec![text.as_bytes().to_vec()],
        };
        let value = Value {
            tag: tag.into(),
            tensor: Some(tensor),
            metadata: plugin(PLUGIN_TEXT, vec![]),
            ..Default::default()
        };
        self.append(&[summary_event(step, vec![value])])
    }

    /// The run's hyperparameters: each field of the resolved spec, for the HParams tab.
    pub fn hparams(&self, spec: &toml::Value) -> Result<()> {
        let mut hparams = BTreeMap::new();
        flatten(spec, "", &mut hparams);
        let start = proto::SessionStartInfo { hparams, start_time_secs: now() };
        let content = HParamsPluginData { version: 0, session_start_info: Some(start), session_end_info: None };
        let value = Value {
            tag: HPARAMS_START_TAG.into(),
            metadata: plugin(PLUGIN_HPARAMS, content.encode_to_vec()),
            ..Default::default()
        };
        self.append(&[summary_event(0, vec![value])])
    }

    /// How the run ended, for the HParams tab.
    pub fn session_end(&self, status: SessionStatus) -> Result<()> {
        let end = proto::SessionEndInfo { status: status as i32, end_time_secs: now() };
        let content = HParamsPluginData { version: 0, session_start_info: None, session_end_info: Some(end) };
        let value = Value {
            tag: HPARAMS_END_TAG.into(),
            metadata: plugin(PLUGIN_HPARAMS, content.encode_to_vec()),
            ..Default::default()
        };
        self.append(&[summary_event(0, vec![value])])
    }

    /// Keep only the summaries `keep` accepts (by tag and step), rewriting the file in place
    /// (atomically); a record cut off when the process died is dropped. Returns how many
    /// records were dropped as unreadable.
    pub fn retain(&self, keep: impl Fn(&str, usize) -> bool) -> Result<usize> {
        let (events, unreadable) = read_lenient(&self.path)?;
        let kept: Vec<Event> = events
            .into_iter()
            .filter_map(|mut event| {
                if let Some(summary) = &mut event.summary {
                    summary.value.retain(|v| keep(&v.tag, event.step.max(0) as usize));
                    if summary.value.is_empty() {
                        return None;
                    }
                }
                Some(event)
            })
            .collect();
        let bytes: Vec<u8> = kept.iter().flat_map(frame).collect();
        crate::files::write_atomic(&self.path, &bytes)?;
        Ok(unreadable)
    }

    fn append(&self, events: &[Event]) -> Result<()> {
        let bytes: Vec<u8> = events.iter().flat_map(frame).collect();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        file.write_all(&bytes).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The event file in a run folder, if it has one.
pub fn find(run: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(NAME_MARK)))
        .collect();
    files.sort();
    files.pop()
}

/// Every event of a file, each record's framing and checksums verified.
pub fn read(path: &Path) -> Result<Vec<Event>> {
    let (events, unreadable) = read_lenient(path)?;
    if unreadable > 0 {
        return Err(bad_input(format!("{}: the last record is cut off or damaged", path.display())));
    }
    Ok(events)
}

/// The events of a file up to the first record that does not read, and whether one did not.
fn read_lenient(path: &Path) -> Result<(Vec<Event>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    let mut events = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        match unframe(rest) {
            Some((record, after)) => match Event::decode(record) {
                Ok(event) => {
                    events.push(event);
                    rest = after;
                }
                Err(_) => return Ok((events, 1)),
            },
            None => return Ok((events, 1)),
        }
    }
    Ok((events, 0))
}

fn summary_event(step: usize, value: Vec<Value>) -> Event {
    Event { wall_time: now(), step: step as i64, summary: Some(Summary { value }), ..Default::default() }
}

fn plugin(name: &str, content: Vec<u8>) -> Option<SummaryMetadata> {
    Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: name.into(), content }) })
}

/// Spec fields as hyperparameters: numbers and booleans as such, everything else as text.
fn flatten(value: &toml::Value, prefix: &str, out: &mut BTreeMap<String, HParamValue>) {
    let text = |s: String| HParamValue { string_value: Some(s), ..Default::default() };
    let entry = match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(v, &key, out);
            }
            return;
        }
        toml::Value::Integer(n) => HParamValue { number_value: Some(*n as f64), ..Default::default() },
        toml::Value::Float(x) => HParamValue { number_value: Some(*x), ..Default::default() },
        toml::Value::Boolean(b) => HParamValue { bool_value: Some(*b), ..Default::default() },
        toml::Value::String(s) => text(s.clone()),
        other => text(other.to_string()),
    };
    out.insert(prefix.to_string(), entry);
}

/// A record in its TFRecord frame.
fn frame(event: &Event) -> Vec<u8> {
    let data = event.encode_to_vec();
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&masked_crc(&data).to_le_bytes());
    out
}

/// The record at the start of `bytes`, and what follows it; None when the frame is cut off or
/// a checksum does not match.
fn unframe(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let length: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let length_crc = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?);
    if masked_crc(&length) != length_crc {
        return None;
    }
    let n = usize::try_from(u64::from_le_bytes(length)).ok()?;
    let end = n.checked_add(12)?;
    let data = bytes.get(12..end)?;
    let data_crc = u32::from_le_bytes(bytes.get(end..end.checked_add(4)?)?.try_into().ok()?);
    (masked_crc(data) == data_crc).then(|| (data, &bytes[end + 4..]))
}

/// TFRecord's masked CRC-32C: rotated and offset, so that a CRC of data holding CRCs stays strong.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}
