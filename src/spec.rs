//! The pipeline spec: the TOML schema as plain serde structs, loaded through figment
//! (file < `PIPE_` environment < `--set`), validated with field paths, and the provenance of
//! every value for `pipe check`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::bad_input;
pub use crate::model::gpt2::Precision;

/// Prefix of environment variables that override spec fields (`PIPE_TRAIN__EPOCHS=3`).
pub const ENV_PREFIX: &str = "PIPE_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub run: RunSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    pub model: ModelSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub generate: GenerateSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Runs land in `<runs_dir>/<name>/<run-id>/`.
    #[serde(deserialize_with = "lenient_string")]
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_runs_dir")]
    pub runs_dir: PathBuf,
    #[serde(default)]
    pub backend: BackendKind,
    /// Device index for GPU backends.
    #[serde(default)]
    pub device: usize,
    /// "f32", or "bf16": linear layers and the LM head multiply in bf16, with f32 master
    /// weights, gradients, optimizer state, LayerNorm, attention and loss (mixed precision).
    #[serde(default)]
    pub precision: Precision,
    /// The stages to run, in order.
    #[serde(default = "default_stages")]
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's flex backend on the CPU.
    #[default]
    Cpu,
    /// burn's CUDA backend (needs the `cuda` cargo feature).
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Train,
    Eval,
    Generate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training data: JSON array, JSONL, CSV with a header row, or plain text.
    pub path: PathBuf,
    /// How the file is laid out; `auto` goes by the extension (.jsonl, .csv, .txt) or content.
    #[serde(default)]
    pub format: DataFormat,
    /// What each record holds.
    #[serde(default)]
    pub kind: DataKind,
    /// `pair` records: which fields hold prompt and response.
    #[serde(default = "default_prompt_field", deserialize_with = "lenient_string")]
    pub prompt_field: String,
    #[serde(default = "default_response_field", deserialize_with = "lenient_string")]
    pub response_field: String,
    /// `pair` records: how a prompt is laid out before the response (`{prompt}` is the prompt).
    /// The generate stage's prompts and `pipe chat` use the same template.
    #[serde(default = "default_prompt_template")]
    pub prompt_template: String,
    /// `alpaca` records: instruction, optional input, output.
    #[serde(default = "default_instruction_field", deserialize_with = "lenient_string")]
    pub instruction_field: String,
    #[serde(default = "default_input_field", deserialize_with = "lenient_string")]
    pub input_field: String,
    #[serde(default = "default_output_field", deserialize_with = "lenient_string")]
    pub output_field: String,
    /// `chat` records: the field with the list of {role, content} messages.
    #[serde(default = "default_messages_field", deserialize_with = "lenient_string")]
    pub messages_field: String,
    /// `chat` records: `simple`, or a format string with `{role}` and `{content}` that every
    /// message is rendered with; assistant messages are followed by EOS.
    #[serde(default = "default_chat_template")]
    pub chat_template: String,
    /// `text` records: the field that holds the text (JSON, JSONL or CSV).
    #[serde(default = "default_text_field", deserialize_with = "lenient_string")]
    pub text_field: String,
    /// Plain-text files: one document per `line`, or the whole `file` as one document.
    #[serde(default)]
    pub documents: Documents,
    /// Validation examples from a second file; otherwise `val_fraction` of `path` is held out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_path: Option<PathBuf>,
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// By extension: `.jsonl`, `.csv`, `.txt`; otherwise a JSON array or, failing that, JSONL.
    #[default]
    Auto,
    Json,
    Jsonl,
    Csv,
    Text,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// A prompt and a response.
    #[default]
    Pair,
    /// Alpaca records: instruction, optional input, output, in the two Alpaca prompt layouts.
    Alpaca,
    /// A list of {role, content} messages (system, user, assistant), several turns.
    Chat,
    /// Plain documents for continued pre-training, packed into blocks with EOS between.
    Text,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Documents {
    #[default]
    Line,
    File,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    /// A HuggingFace `tokenizer.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Train a byte-level BPE of this vocabulary size on the training data instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_vocab_size: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A HuggingFace GPT-2 directory (config.json + model.safetensors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A hub id such as `openai-community/gpt2`, resolved through the HuggingFace cache.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "lenient_opt_string")]
    pub hub: Option<String>,
    /// Or an architecture to initialise from scratch:
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embd: Option<usize>,
    /// Context length (learned positions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    /// Dropout probability; defaults to the checkpoint's, or 0 for a new model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    #[serde(default)]
    pub name: OptimizerKind,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// L2 penalty added to the gradient for `adam`; decoupled decay for `adamw` (as PyTorch).
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value, as `torch.nn.utils.clip_grad_norm_`; 0 = off.
    #[serde(default)]
    pub grad_clip: f64,
    #[serde(default)]
    pub schedule: Schedule,
    /// Linear warmup from 0 to `lr` over this many optimizer steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// The learning rate the cosine schedule decays to, as a fraction of `lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            name: OptimizerKind::default(),
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            grad_clip: 0.0,
            schedule: Schedule::default(),
            warmup_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    #[default]
    Adamw,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant after the warmup.
    #[default]
    Constant,
    /// Cosine decay to `min_lr_ratio · lr` over the run, after the warmup.
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default = "one")]
    pub epochs: usize,
    /// Examples per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Batch examples of similar length together (less padding), as TRL's `group_by_length`.
    #[serde(default)]
    pub group_by_length: bool,
    /// Longest example in tokens (prompt + response + EOS); defaults to the model's context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    #[serde(default)]
    pub loss_on: LossOn,
    /// Log a metrics line every this many optimizer steps.
    #[serde(default = "one")]
    pub log_every: usize,
    /// Checkpoint every this many optimizer steps (and always at the end); 0 = only at the end.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// How many checkpoints to keep (the newest).
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: default_batch_size(),
            grad_accum: 1,
            group_by_length: false,
            max_length: None,
            loss_on: LossOn::default(),
            log_every: 1,
            checkpoint_every: default_checkpoint_every(),
            keep_checkpoints: default_keep_checkpoints(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// Only the response tokens (and the EOS after them) are trained on.
    #[default]
    Response,
    /// Every token of prompt + response + EOS.
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateSpec {
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 = no limit.
    #[serde(default)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 = no limit.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    #[serde(default)]
    pub seed: u64,
}

impl Default for GenerateSpec {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            max_new_tokens: default_max_new_tokens(),
            temperature: default_temperature(),
            top_k: 0,
            top_p: default_top_p(),
            seed: 0,
        }
    }
}

fn default_runs_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_stages() -> Vec<Stage> {
    vec![Stage::Train, Stage::Eval, Stage::Generate]
}
fn default_prompt_field() -> String {
    "prompt".into()
}
fn default_response_field() -> String {
    "response".into()
}
fn default_instruction_field() -> String {
    "instruction".into()
}
fn default_input_field() -> String {
    "input".into()
}
fn default_output_field() -> String {
    "output".into()
}
fn default_messages_field() -> String {
    "messages".into()
}
fn default_chat_template() -> String {
    "simple".into()
}
fn default_text_field() -> String {
    "text".into()
}
fn default_prompt_template() -> String {
    "{prompt}".into()
}
fn default_val_fraction() -> f64 {
    0.1
}
fn default_lr() -> f64 {
    1e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f64 {
    1e-8
}
fn one() -> usize {
    1
}
fn default_checkpoint_every() -> usize {
    100
}
fn default_keep_checkpoints() -> usize {
    2
}
fn default_batch_size() -> usize {
    8
}
fn default_max_new_tokens() -> usize {
    64
}
fn default_temperature() -> f64 {
    1.0
}
fn default_top_p() -> f64 {
    1.0
}

/// A string field also takes a number or a boolean (`--set run.name=2024`).
fn lenient_string<'de, D: Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(de)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

fn lenient_opt_string<'de, D: Deserializer<'de>>(de: D) -> Result<Option<String>, D::Error> {
    lenient_string(de).map(Some)
}

/// Where a resolved value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Set(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Env(var) => write!(f, "env {var}"),
            Source::Set(arg) => write!(f, "--set {arg}"),
        }
    }
}

/// One override from the environment or the command line, as a figment provider of its own,
/// so that provenance names the exact variable or flag.
struct Override {
    source: Source,
    key: String,
    raw: String,
}

impl Provider for Override {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source.to_string())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let nested = figment::util::nest(&self.key, parse_override(&self.raw));
        let dict = nested.into_dict().expect("a dotted key nests into a dict");
        Ok(Profile::Default.collect(dict))
    }
}

/// Read an override's text as the value it spells. Numbers are parsed with Rust's own parsers
/// (so `1e-4` is a float and `0.1` is exactly the f64 0.1); text with a leading zero such as
/// `007` stays a string; `[a, b]` is a TOML array; an empty value unsets an optional field.
fn parse_override(raw: &str) -> Value {
    let text = raw.trim();
    if text.is_empty() {
        // `--set model.path=` clears an optional field.
        return Value::Empty(figment::value::Tag::Default, figment::value::Empty::None);
    }
    let leading_zero = text.len() > 1 && text.starts_with('0') && !text.starts_with("0.");
    if text.starts_with('[') {
        if let Ok(table) = toml::from_str::<toml::Table>(&format!("v = {text}")) {
            if let Ok(value) = Value::serialize(&table["v"]) {
                return value;
            }
        }
    }
    match text {
        "true" => return Value::from(true),
        "false" => return Value::from(false),
        _ => {}
    }
    if !leading_zero {
        if let Ok(u) = text.parse::<u64>() {
            return Value::from(u);
        }
        if let Ok(i) = text.parse::<i64>() {
            return Value::from(i);
        }
        if text.chars().any(|c| c.is_ascii_digit()) {
            if let Ok(f) = text.parse::<f64>() {
                return Value::from(f);
            }
        }
    }
    Value::from(raw.to_string())
}

/// A spec after overrides, with the figment that knows where each value came from.
pub struct LoadedSpec {
    pub spec: Spec,
    pub path: PathBuf,
    figment: Figment,
}

/// The spec's path fields, which resolve against the spec file's folder when they come from
/// the file, and against the current directory when they come from an override.
const PATH_FIELDS: &[&str] = &["run.runs_dir", "data.path", "data.val_path", "tokenizer.path", "model.path"];

/// Load a spec: the TOML file, then `PIPE_` environment variables, then `--set key=value`
/// flags, later winning. Unknown fields, wrong types and invalid values are errors that name
/// the field and where its value came from.
pub fn load(path: &Path, sets: &[String]) -> Result<LoadedSpec> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(path, sets, &env)
}

/// [`load`] with the environment given explicitly (tests use this).
pub fn load_with_env(path: &Path, sets: &[String], env: &[(String, String)]) -> Result<LoadedSpec> {
    if !path.is_file() {
        return Err(bad_input(format!("spec file {} does not exist", path.display())));
    }
    let path = path.canonicalize()?;
    let text =
        std::fs::read_to_string(&path).map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    if let Err(e) = toml::from_str::<toml::Table>(&text) {
        return Err(bad_input(format!("{}: {}", path.display(), toml_error_line(&e, &text))));
    }
    let mut figment = Figment::from(Toml::file_exact(&path));
    let mut env_overrides: Vec<_> = env.iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    env_overrides.sort();
    for (var, value) in env_overrides {
        let key = var[ENV_PREFIX.len()..].to_ascii_lowercase().replace("__", ".");
        figment = figment.merge(Override { source: Source::Env(var.clone()), key, raw: value.clone() });
    }
    for set in sets {
        let (key, value) =
            set.split_once('=').ok_or_else(|| bad_input(format!("--set {set}: expected section.field=value")))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(bad_input(format!("--set {set}: `{key}` is not a field path such as train.epochs")));
        }
        figment =
            figment.merge(Override { source: Source::Set(set.clone()), key: key.to_string(), raw: value.to_string() });
    }
    let mut spec: Spec = figment.extract().map_err(|e| bad_input(describe_figment_error(e)))?;
    let loaded_from = |key: &str| source_of(&figment, key);
    for field in PATH_FIELDS {
        if let Source::File(file) = loaded_from(field) {
            let base = file.parent().unwrap_or(Path::new("."));
            let slot = path_field(&mut spec, field);
            if let Some(p) = slot {
                if p.is_relative() {
                    *p = normalize(&base.join(&*p));
                }
            }
        }
    }
    let loaded = LoadedSpec { spec, path, figment };
    loaded.validate()?;
    Ok(loaded)
}

fn path_field<'a>(spec: &'a mut Spec, field: &str) -> Option<&'a mut PathBuf> {
    match field {
        "run.runs_dir" => Some(&mut spec.run.runs_dir),
        "data.path" => Some(&mut spec.data.path),
        "data.val_path" => spec.data.val_path.as_mut(),
        "tokenizer.path" => spec.tokenizer.path.as_mut(),
        "model.path" => spec.model.path.as_mut(),
        _ => unreachable!("{field} is not a path field"),
    }
}

fn source_of(figment: &Figment, key: &str) -> Source {
    match figment.find_metadata(key) {
        None => Source::Default,
        Some(md) => match &md.source {
            Some(figment::Source::File(path)) => Source::File(path.clone()),
            _ if md.name.starts_with("env ") => Source::Env(md.name["env ".len()..].to_string()),
            _ if md.name.starts_with("--set ") => Source::Set(md.name["--set ".len()..].to_string()),
            _ => Source::Default,
        },
    }
}

/// toml's parse error, reduced to its first line ("TOML parse error at line 3, column 9")
/// and the reason.
fn toml_error_line(error: &toml::de::Error, text: &str) -> String {
    let reason = error.message();
    match error.span() {
        Some(span) => {
            let line = text[..span.start].matches('\n').count() + 1;
            let column = span.start - text[..span.start].rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: invalid TOML: {reason}")
        }
        None => format!("invalid TOML: {reason}"),
    }
}

/// figment's errors, one line each: "<field>: <what is wrong> (from <source>)".
fn describe_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let field = e.path.join(".");
            let source = match &e.metadata {
                Some(md) => match &md.source {
                    Some(figment::Source::File(p)) => p.display().to_string(),
                    _ => md.name.to_string(),
                },
                None => "the spec".into(),
            };
            let kind = describe_kind(&e.kind);
            if field.is_empty() {
                format!("{source}: {kind}")
            } else {
                format!("{source}: field `{field}`: {kind}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    let list = |names: &[&str]| names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    match kind {
        Kind::UnknownField(found, expected) => format!("unknown field `{found}`; expected one of {}", list(expected)),
        Kind::UnknownVariant(found, expected) => format!("unknown value `{found}`; expected one of {}", list(expected)),
        Kind::InvalidType(found, expected) => format!("expected {expected}, found {found}"),
        Kind::MissingField(name) => format!("missing field `{name}`"),
        other => other.to_string(),
    }
}

/// Remove `.` and `dir/..` from a path without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl LoadedSpec {
    /// Where the value at `key` (a dotted field path) came from.
    pub fn source(&self, key: &str) -> Source {
        source_of(&self.figment, key)
    }

    fn invalid(&self, key: &str, problem: impl std::fmt::Display) -> anyhow::Error {
        let source = match self.source(key) {
            Source::Default => format!("{} (default)", self.path.display()),
            other => other.to_string(),
        };
        bad_input(format!("{source}: field `{key}`: {problem}"))
    }

    fn validate(&self) -> Result<()> {
        let s = &self.spec;
        let positive_f = |key: &str, v: f64| -> Result<()> {
            if !v.is_finite() || v <= 0.0 {
                return Err(self.invalid(key, format!("must be a finite number > 0, got {v}")));
            }
            Ok(())
        };
        let non_negative_f = |key: &str, v: f64| -> Result<()> {
            if !v.is_finite() || v < 0.0 {
                return Err(self.invalid(key, format!("must be a finite number ≥ 0, got {v}")));
            }
            Ok(())
        };
        let positive = |key: &str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(self.invalid(key, "must be at least 1"));
            }
            Ok(())
        };
        let probability = |key: &str, v: f64| -> Result<()> {
            if !(0.0..1.0).contains(&v) {
                return Err(self.invalid(key, format!("must be in [0, 1), got {v}")));
            }
            Ok(())
        };
        if s.run.name.is_empty() || s.run.name.contains(['/', '\\', '@']) || s.run.name.starts_with('.') {
            return Err(self.invalid(
                "run.name",
                format!("`{}` cannot be a folder name (no /, \\, @ or leading dot)", s.run.name),
            ));
        }
        if s.run.stages.is_empty() {
            return Err(self.invalid("run.stages", "name at least one stage: train, eval, generate"));
        }
        if !(0.0..1.0).contains(&s.data.val_fraction) || s.data.val_fraction.is_nan() {
            return Err(self.invalid("data.val_fraction", format!("must be in [0, 1), got {}", s.data.val_fraction)));
        }
        let chat = &s.data.chat_template;
        if chat != "simple" && !(chat.contains("{role}") && chat.contains("{content}")) {
            return Err(
                self.invalid("data.chat_template", "must be `simple` or a format string with `{role}` and `{content}`")
            );
        }
        if !s.data.prompt_template.contains("{prompt}") {
            return Err(self.invalid("data.prompt_template", "must contain `{prompt}`, where the prompt goes"));
        }
        positive_f("optimizer.lr", s.optimizer.lr)?;
        probability("optimizer.betas", s.optimizer.betas[0])?;
        probability("optimizer.betas", s.optimizer.betas[1])?;
        positive_f("optimizer.eps", s.optimizer.eps)?;
        non_negative_f("optimizer.weight_decay", s.optimizer.weight_decay)?;
        non_negative_f("optimizer.grad_clip", s.optimizer.grad_clip)?;
        if !(0.0..=1.0).contains(&s.optimizer.min_lr_ratio) {
            return Err(
                self.invalid("optimizer.min_lr_ratio", format!("must be in [0, 1], got {}", s.optimizer.min_lr_ratio))
            );
        }
        positive("train.epochs", s.train.epochs)?;
        positive("train.batch_size", s.train.batch_size)?;
        positive("train.grad_accum", s.train.grad_accum)?;
        positive("train.log_every", s.train.log_every)?;
        positive("train.keep_checkpoints", s.train.keep_checkpoints)?;
        if let Some(max) = s.train.max_length {
            if max < 2 {
                return Err(self.invalid("train.max_length", "must be at least 2 tokens"));
            }
        }
        non_negative_f("generate.temperature", s.generate.temperature)?;
        if !(s.generate.top_p > 0.0 && s.generate.top_p <= 1.0) {
            return Err(self.invalid("generate.top_p", format!("must be in (0, 1], got {}", s.generate.top_p)));
        }
        let m = &s.model;
        let arch = [m.layers, m.heads, m.embd, m.context];
        let sources = m.path.is_some() as usize + m.hub.is_some() as usize + arch.iter().any(Option::is_some) as usize;
        if sources != 1 {
            return Err(self.invalid(
                "model",
                "give exactly one of: `path` (a HF GPT-2 directory), `hub` (a hub id), or `layers`, `heads`, `embd` and `context` (a new model)",
            ));
        }
        if m.path.is_none() && m.hub.is_none() {
            for (key, v) in [
                ("model.layers", m.layers),
                ("model.heads", m.heads),
                ("model.embd", m.embd),
                ("model.context", m.context),
            ] {
                match v {
                    None => return Err(self.invalid(key, "is needed to initialise a new model")),
                    Some(v) => positive(key, v)?,
                }
            }
            if !m.embd.unwrap().is_multiple_of(m.heads.unwrap()) {
                return Err(self.invalid(
                    "model.embd",
                    format!("{} is not divisible by model.heads = {}", m.embd.unwrap(), m.heads.unwrap()),
                ));
            }
        }
        if let Some(p) = m.dropout {
            probability("model.dropout", p)?;
        }
        let t = &s.tokenizer;
        if t.path.is_some() && t.train_vocab_size.is_some() {
            return Err(self.invalid("tokenizer", "give `path` or `train_vocab_size`, not both"));
        }
        if t.path.is_none() && t.train_vocab_size.is_none() && m.path.is_none() && m.hub.is_none() {
            return Err(self.invalid("tokenizer", "a new model needs `tokenizer.path` or `tokenizer.train_vocab_size`"));
        }
        if let Some(v) = t.train_vocab_size {
            if v < 257 {
                return Err(self.invalid(
                    "tokenizer.train_vocab_size",
                    format!("must be at least 257 (256 bytes + EOS), got {v}"),
                ));
            }
        }
        if s.run.backend == BackendKind::Cuda && !cfg!(feature = "cuda") {
            return Err(
                self.invalid("run.backend", "`cuda` is not compiled into this pipe; rebuild with `--features cuda`")
            );
        }
        Ok(())
    }

    /// Every leaf of the resolved spec as (dotted key, value as TOML text, source).
    pub fn provenance(&self) -> Vec<(String, String, Source)> {
        let value = toml::Value::try_from(&self.spec).expect("a spec serialises to TOML");
        flatten(&value)
            .into_iter()
            .map(|(k, v)| {
                let source = self.source(&k);
                (k, v, source)
            })
            .collect()
    }

    /// The resolved spec as TOML, with absolute paths, as written into each run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.spec).expect("a spec serialises to TOML")
    }
}

/// Every leaf of a TOML value as (dotted key, value as one line of TOML).
pub fn flatten(value: &toml::Value) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(table) => {
                for (k, v) in table {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), render(other));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// A value as one line of TOML (strings with escapes, never multi-line).
fn render(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => serde_json::to_string(s).expect("a string serialises"),
        toml::Value::Array(items) => format!("[{}]", items.iter().map(render).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}
