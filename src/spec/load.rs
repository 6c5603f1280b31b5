//! Loading a spec: the TOML file, then `PIPE_` environment variables, then `--set` flags, each
//! a figment provider of its own so that `pipe check` can say where every value came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::{Spec, ENV_PREFIX};
use crate::error::bad_input;

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
            // Control characters escaped, so a message naming the flag stays one line.
            Source::Set(arg) => {
                let shown: String = arg
                    .chars()
                    .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
                    .collect();
                write!(f, "--set {shown}")
            }
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
        // `[a, b]` without quotes: a list of the comma-separated words, each read as above.
        if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            let items: Vec<Value> =
                inner.split(',').map(str::trim).filter(|t| !t.is_empty()).map(parse_override).collect();
            return Value::from(items);
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
const PATH_FIELDS: &[&str] = &[
    "run.runs_dir",
    "data.path",
    "data.val_path",
    "tokenizer.path",
    "model.path",
    "lora.from",
    "dpo.path",
    "dpo.val_path",
];

/// Load a spec: the TOML file, then `PIPE_` environment variables, then `--set key=value`
/// flags, later winning. Unknown fields, wrong types and invalid values are errors that name
/// the field and where its value came from.
pub fn load(path: &Path, sets: &[String]) -> Result<LoadedSpec> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let cwd = std::env::current_dir().map_err(|e| anyhow::anyhow!("cannot read the current directory: {e}"))?;
    load_with_env(path, sets, &env, &cwd)
}

/// [`load`] with the environment, and the folder the overrides' relative paths resolve
/// against (where the command runs), given explicitly.
pub fn load_with_env(path: &Path, sets: &[String], env: &[(String, String)], cwd: &Path) -> Result<LoadedSpec> {
    if !path.exists() {
        return Err(bad_input(format!("spec file {} does not exist", path.display())));
    }
    let path = path.canonicalize()?;
    let text = crate::files::read_regular_to_string(&path)?;
    if let Err(e) = toml::from_str::<toml::Table>(&text) {
        return Err(bad_input(format!("{}: {}", path.display(), toml_error_line(&e, &text))));
    }
    let mut figment = Figment::from(Toml::file_exact(&path));
    // Only PIPE_SECTION__FIELD names are overrides: PIPE_HOME and the like belong to others.
    let is_override = |name: &str| name.strip_prefix(ENV_PREFIX).is_some_and(|rest| rest.contains("__"));
    let mut env_overrides: Vec<_> = env.iter().filter(|(k, _)| is_override(k)).collect();
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
    let emptied: Vec<String> = env
        .iter()
        .filter(|(k, v)| is_override(k) && v.trim().is_empty())
        .map(|(k, _)| Source::Env(k.clone()).to_string())
        .chain(
            sets.iter()
                .filter(|s| s.split_once('=').is_some_and(|(_, v)| v.trim().is_empty()))
                .map(|s| Source::Set(s.clone()).to_string()),
        )
        .collect();
    let mut spec: Spec = figment.extract().map_err(|e| bad_input(describe_figment_error(e, &path, &emptied)))?;
    let loaded_from = |key: &str| source_of(&figment, key);
    if loaded_from("run.stages") == Source::Default && spec.generate.prompts.is_empty() {
        // The default stages sample only when there is something to sample from.
        spec.run.stages.retain(|stage| *stage != super::Stage::Generate);
    }
    // Relative paths become absolute, so that the spec a run saves means the same from anywhere
    // (a resumed run reads it from inside the run folder).
    for field in PATH_FIELDS {
        let base = match loaded_from(field) {
            Source::File(file) => file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            Source::Env(_) | Source::Set(_) | Source::Default => cwd.to_path_buf(),
        };
        for p in path_fields(&mut spec, field) {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = normalize(&base.join(&*p));
            }
        }
    }
    // A chat template file resolves like a path field.
    if spec.data.chat_template.ends_with(".jinja") && Path::new(&spec.data.chat_template).is_relative() {
        let base = match loaded_from("data.chat_template") {
            Source::File(file) => file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            Source::Env(_) | Source::Set(_) | Source::Default => cwd.to_path_buf(),
        };
        spec.data.chat_template = normalize(&base.join(&spec.data.chat_template)).display().to_string();
    }
    let loaded = LoadedSpec { spec, path, figment };
    loaded.validate()?;
    Ok(loaded)
}

fn path_fields<'a>(spec: &'a mut Spec, field: &str) -> Vec<&'a mut PathBuf> {
    let one = match field {
        "data.path" => return spec.data.path.0.iter_mut().collect(),
        "dpo.path" => return spec.dpo.iter_mut().flat_map(|dpo| dpo.path.0.iter_mut()).collect(),
        "dpo.val_path" => {
            return spec.dpo.iter_mut().flat_map(|dpo| dpo.val_path.iter_mut().flat_map(|p| p.0.iter_mut())).collect()
        }
        "run.runs_dir" => Some(&mut spec.run.runs_dir),
        "data.val_path" => spec.data.val_path.as_mut(),
        "tokenizer.path" => spec.tokenizer.path.as_mut(),
        "model.path" => spec.model.path.as_mut(),
        "lora.from" => spec.lora.as_mut().and_then(|lora| lora.from.as_mut()),
        _ => unreachable!("{field} is not a path field"),
    };
    one.into_iter().collect()
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

/// figment's errors, one line each: "<source>: field `<field>`: <what is wrong>"; the source
/// is the spec file when figment cannot tell.
/// `emptied`: the overrides (by source name) whose value is empty.
fn describe_figment_error(error: figment::Error, spec: &Path, emptied: &[String]) -> String {
    error
        .into_iter()
        .map(|e| {
            let field = e.path.join(".");
            let source = match &e.metadata {
                Some(md) => match &md.source {
                    Some(figment::Source::File(p)) => p.display().to_string(),
                    _ => md.name.to_string(),
                },
                None => spec.display().to_string(),
            };
            // An empty override (`--set run.seed=`, `PIPE_RUN__SEED=`) clears a field, which
            // only an optional one allows: say that it needs a value rather than how serde saw it.
            let emptied = e.metadata.as_ref().is_some_and(|md| emptied.contains(&md.name.to_string()));
            let kind = match emptied && !field.is_empty() {
                true => needs_a_value(&field),
                false => describe_kind(&e.kind),
            };
            if field.is_empty() {
                format!("{source}: {kind}")
            } else {
                format!("{source}: field `{field}`: {kind}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What an empty override of the required `field` gets told: it needs a value, with the default
/// as an example where there is one.
fn needs_a_value(field: &str) -> String {
    let default = field.split_once('.').and_then(|(section, name)| {
        let section = match section {
            "run" => toml::Value::try_from(super::RunSpec::default()),
            "data" => toml::Value::try_from(super::DataSpec::default()),
            "optimizer" => toml::Value::try_from(super::OptimizerSpec::default()),
            "train" => toml::Value::try_from(super::TrainSpec::default()),
            "eval" => toml::Value::try_from(super::EvalSpec::default()),
            "generate" => toml::Value::try_from(super::GenerateSpec::default()),
            "lora" => toml::Value::try_from(super::LoraSpec::default()),
            "distributed" => toml::Value::try_from(super::DistributedSpec::default()),
            _ => return None,
        };
        section.ok()?.get(name).map(render)
    });
    // The required fields whose default is empty get an example of their own.
    let default = match field {
        "run.name" => Some("sft-demo".to_string()),
        "data.path" => Some("data/train.jsonl".to_string()),
        _ => default,
    };
    let example = match default.filter(|d| !["\"\"", "[]"].contains(&d.as_str())) {
        Some(value) => format!(" (e.g. {field}={})", value.trim_matches('"')),
        None => String::new(),
    };
    format!("needs a value{example}; an empty value clears only an optional field, such as model.path")
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
