//! The property/fuzz campaign: every parser a user feeds — the spec and its overrides, each
//! dataset format and kind (Parquet and Arrow files among them), config.json, safetensors files, tokenizer.json, and the run folder's
//! own files (meta.json, metrics.jsonl, trainer.json, checkpoint folders) — is given inputs made
//! from valid ones by structure-aware edits (a value replaced by an odd one of any type, a key
//! added or removed) and byte-level edits (a token inserted, a range deleted or repeated, a bit
//! flipped, a cut). For every input: no panic, and an error is one a user can act on — exit 2's
//! kind where the user wrote the file, naming the file (or the flag or variable).
//!
//! The generator is seeded, so a run is reproducible. CI runs a slice of `PIPE_FUZZ_CASES`
//! inputs per parser (default 300); the campaign runs 100,000 or more:
//!
//!     PIPE_FUZZ_CASES=100000 cargo test --release --test integration fuzz:: -- --nocapture --test-threads 1
//!
//! `PIPE_FUZZ_SEED` picks another seed.

use std::path::{Path, PathBuf};

use burn::backend::Flex;

use crate::common;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{json, Value};

use pipe::error::is_bad_input;

// ---------------------------------------------------------------------------------------------
// Edits

/// One edit of an input. Positions and picks are taken modulo what they index.
#[derive(Debug, Clone)]
enum Edit {
    /// Replace the `node`th value of the document (pre-order) by odd value `value`.
    Replace { node: usize, value: usize },
    /// Add key `key` with odd value `value` to the `node`th table or object.
    AddKey { node: usize, key: usize, value: usize },
    /// Remove the `node`th value from its table, object or array.
    Remove { node: usize },
    /// Insert odd token `token` at byte `at`.
    Insert { at: usize, token: usize },
    /// Delete up to `len` bytes at `at`.
    Delete { at: usize, len: usize },
    /// Repeat up to `len` bytes at `at`.
    Repeat { at: usize, len: usize },
    /// Flip bit `bit` of the byte at `at`.
    Flip { at: usize, bit: u8 },
    /// Cut the input at `at`.
    Cut { at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<usize>()).prop_map(|(node, value)| Edit::Replace { node, value }),
        2 => (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(node, key, value)| Edit::AddKey { node, key, value }),
        1 => any::<usize>().prop_map(|node| Edit::Remove { node }),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(at, token)| Edit::Insert { at, token }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Edit::Delete { at, len }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Edit::Repeat { at, len }),
        1 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        1 => any::<usize>().prop_map(|at| Edit::Cut { at }),
    ]
}

/// An input: which seed it starts from, and its edits.
fn edits(seeds: usize) -> impl Strategy<Value = (usize, Vec<Edit>)> {
    (0..seeds, proptest::collection::vec(edit(), 1..5))
}

/// Bytes that parsers trip on.
const TOKENS: &[&str] = &[
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "=",
    "\n",
    "\r\n",
    "#",
    "'",
    "\0",
    "\u{feff}",
    "-",
    ".",
    "1e999",
    "nan",
    "inf",
    "-0",
    "18446744073709551616",
    "\"\"\"",
    "[[",
    "]]",
    "null",
    "true",
    "{prompt}",
    "{",
    "é漢🙂",
    "\u{202e}",
    "\t",
    "\"a\":",
    "key = 1\n",
    "[section]\n",
    "\u{ff}",
];

/// Keys that are not in the seeds, and some that are.
const KEYS: &[&str] = &[
    "x",
    "",
    "prompt",
    "response",
    "messages",
    "role",
    "content",
    "text",
    "instruction",
    "input",
    "output",
    "n_embd",
    "n_layer",
    "n_head",
    "vocab_size",
    "n_positions",
    "n_inner",
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
    "status",
    "step",
    "loss",
    "progress",
    "param_ids",
    "model",
    "vocab",
    "merges",
    "added_tokens",
];

/// Odd JSON values of every type.
fn odd_json(pick: usize) -> Value {
    let deep = (0..300).fold(json!(1), |inner, _| json!([inner]));
    let values = [
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(3),
        json!(0.5),
        json!(1.5),
        json!(-0.0),
        json!(1e308),
        json!(1e-320),
        json!(4294967296u64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("x"),
        json!("a\u{0}b"),
        json!("{prompt}"),
        json!("{"),
        json!("a".repeat(5000)),
        json!("é漢🙂"),
        json!("user"),
        json!("assistant"),
        json!("system"),
        json!("F32"),
        json!("BF16"),
        json!("I64"),
        json!("gelu_new"),
        json!("relu"),
        json!("completed"),
        json!("running"),
        json!([]),
        json!([1]),
        json!([""]),
        json!([0, 0]),
        json!([1, 100000000000u64]),
        json!([-1, 2]),
        json!({}),
        json!({"role": "user", "content": "x"}),
        json!({"a": {"b": [{}]}}),
        deep,
    ];
    values[pick % values.len()].clone()
}

/// Odd TOML values of every type.
fn odd_toml(pick: usize) -> toml::Value {
    use toml::Value as T;
    let strings = [
        "",
        "x",
        "cpu",
        "cuda",
        "bf16",
        "f32",
        "train",
        "eval",
        "generate",
        "{prompt}",
        "{prompt}{x}",
        "jsonl",
        "json",
        "csv",
        "text",
        "chat",
        "alpaca",
        "pair",
        "line",
        "file",
        "cosine",
        "linear",
        "constant",
        "adamw",
        "adam",
        "all",
        "response",
        "simple",
        "../x",
        "/nonexistent/file",
        "é漢🙂",
    ];
    let mut values: Vec<T> = vec![
        T::Integer(0),
        T::Integer(-1),
        T::Integer(1),
        T::Integer(2),
        T::Integer(3),
        T::Integer(7),
        T::Integer(1000),
        T::Integer(1 << 40),
        T::Integer(i64::MAX),
        T::Integer(i64::MIN),
        T::Float(0.0),
        T::Float(-0.0),
        T::Float(0.5),
        T::Float(1.0),
        T::Float(1.5),
        T::Float(f64::NAN),
        T::Float(f64::INFINITY),
        T::Float(f64::NEG_INFINITY),
        T::Float(1e-30),
        T::Float(1e30),
        T::Boolean(true),
        T::Boolean(false),
        T::String("a".repeat(3000)),
        T::Array(vec![]),
        T::Array(vec![T::String("train".into())]),
        T::Array(vec![T::String("train".into()), T::String("train".into())]),
        T::Array(vec![T::String("generate".into())]),
        T::Array(vec![T::String("".into())]),
        T::Array(vec![T::Integer(1), T::Integer(2)]),
        T::Array(vec![T::Float(0.9), T::Float(0.95)]),
        T::Array(vec![T::Float(0.9)]),
        T::Array(vec![T::Float(0.9), T::Float(1.0), T::Float(0.5)]),
        T::Table(toml::Table::new()),
        T::Table(toml::Table::from_iter([("a".to_string(), T::Integer(1))])),
        T::Datetime("1979-05-27T07:32:00Z".parse().unwrap()),
    ];
    values.extend(strings.iter().map(|s| T::String(s.to_string())));
    values[pick % values.len()].clone()
}

/// The byte-level edits, applied to `bytes`.
fn edit_bytes(bytes: &mut Vec<u8>, edit: &Edit) {
    let n = bytes.len();
    let at = |a: usize| if n == 0 { 0 } else { a % (n + 1) };
    match *edit {
        Edit::Insert { at: a, token } => {
            let at = at(a);
            let token = TOKENS[token % TOKENS.len()].as_bytes();
            // "\xff" in the list stands for a byte that is not UTF-8.
            let token: &[u8] = if token == "\u{ff}".as_bytes() { &[0xff] } else { token };
            bytes.splice(at..at, token.iter().copied());
        }
        Edit::Delete { at: a, len } => {
            let at = at(a);
            bytes.drain(at..(at + len).min(n));
        }
        Edit::Repeat { at: a, len } => {
            let at = at(a);
            let piece = bytes[at..(at + len).min(n)].to_vec();
            bytes.splice(at..at, piece);
        }
        Edit::Flip { at: a, bit } if n > 0 => bytes[a % n] ^= 1 << bit,
        Edit::Cut { at: a } => bytes.truncate(at(a)),
        _ => {}
    }
}

/// The JSON values of a document, pre-order, as paths of object keys and array indexes.
fn json_paths(value: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(path.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                path.push(json!(k));
                json_paths(v, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate().take(64) {
                path.push(json!(i));
                json_paths(v, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'a>(value: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(value, |v, step| match step {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

/// A structural edit of a JSON document.
fn edit_json(doc: &mut Value, edit: &Edit) {
    let mut paths = Vec::new();
    json_paths(doc, &mut Vec::new(), &mut paths);
    let pick = |node: usize| paths[node % paths.len()].clone();
    match *edit {
        Edit::Replace { node, value } => *json_at(doc, &pick(node)) = odd_json(value),
        Edit::AddKey { node, key, value } => {
            if let Value::Object(map) = json_at(doc, &pick(node)) {
                map.insert(KEYS[key % KEYS.len()].to_string(), odd_json(value));
            }
        }
        Edit::Remove { node } => {
            let path = pick(node);
            if let Some((last, parent)) = path.split_last() {
                match (json_at(doc, parent), last) {
                    (Value::Object(map), Value::String(k)) => {
                        map.remove(k);
                    }
                    (Value::Array(items), Value::Number(i)) => {
                        items.remove(i.as_u64().unwrap() as usize);
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// Apply edits to a JSON text: structural ones while it still parses, then bytes.
fn mutate_json(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for edit in edits {
        match edit {
            Edit::Replace { .. } | Edit::AddKey { .. } | Edit::Remove { .. } => {
                if let Ok(mut doc) = serde_json::from_slice::<Value>(&bytes) {
                    edit_json(&mut doc, edit);
                    bytes = serde_json::to_vec_pretty(&doc).unwrap();
                }
            }
            _ => edit_bytes(&mut bytes, edit),
        }
    }
    bytes
}

/// Apply edits to a JSONL text: structural ones to one line each.
fn mutate_jsonl(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = seed.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let mut bytes = None;
    for edit in edits {
        match (edit, &mut bytes) {
            (Edit::Replace { node, .. } | Edit::AddKey { node, .. } | Edit::Remove { node }, None) => {
                let count = lines.len();
                let line = &mut lines[node / 7 % count];
                if let Ok(mut doc) = serde_json::from_slice::<Value>(line) {
                    edit_json(&mut doc, edit);
                    *line = serde_json::to_vec(&doc).unwrap();
                }
            }
            (Edit::Replace { .. } | Edit::AddKey { .. } | Edit::Remove { .. }, Some(_)) => {}
            (_, slot) => edit_bytes(slot.get_or_insert_with(|| lines.join(&b'\n')), edit),
        }
    }
    bytes.unwrap_or_else(|| lines.join(&b'\n'))
}

/// Apply edits to a TOML text: structural ones (keys from `keys`) while it still parses.
fn mutate_toml(seed: &str, keys: &[String], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.as_bytes().to_vec();
    for edit in edits {
        let doc = std::str::from_utf8(&bytes).ok().and_then(|t| t.parse::<toml::Table>().ok());
        match (edit, doc) {
            (Edit::Replace { node: key, value } | Edit::AddKey { key, value, .. }, Some(mut doc)) => {
                let key = &keys[key % keys.len()];
                let (section, field) = key.split_once('.').unwrap_or(("run", key));
                let table = doc.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(table) = table {
                    table.insert(field.to_string(), odd_toml(*value));
                } else {
                    *table = odd_toml(*value);
                }
                bytes = toml::to_string(&doc).unwrap_or_default().into_bytes();
            }
            (Edit::Remove { node }, Some(mut doc)) => {
                let key = &keys[node % keys.len()];
                let (section, field) = key.split_once('.').unwrap_or(("run", key));
                if let Some(toml::Value::Table(table)) = doc.get_mut(section) {
                    table.remove(field);
                }
                bytes = toml::to_string(&doc).unwrap_or_default().into_bytes();
            }
            (Edit::Replace { .. } | Edit::AddKey { .. } | Edit::Remove { .. }, None) => {}
            _ => edit_bytes(&mut bytes, edit),
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// The campaign

fn cases() -> u32 {
    std::env::var("PIPE_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(300)
}

fn runner(parser: &str) -> TestRunner {
    let seed = std::env::var("PIPE_FUZZ_SEED").ok().and_then(|n| n.parse().ok()).unwrap_or(20261128u64);
    // Each parser its own stream, so adding one does not change the others' inputs.
    let seed = parser.bytes().fold(seed, |h, b| h.wrapping_mul(0x100_0000_01b3).wrapping_add(b as u64));
    TestRunner::new(Config {
        cases: cases(),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        // PIPE_FUZZ_SHRINK=0 shows the first failing input as found.
        max_shrink_iters: std::env::var("PIPE_FUZZ_SHRINK").ok().and_then(|n| n.parse().ok()).unwrap_or(2000),
        ..Config::default()
    })
}

/// Run `check` on `cases()` generated inputs; fail with the smallest failing input found.
fn campaign<S: Strategy>(parser: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let started = std::time::Instant::now();
    let result = runner(parser).run(&strategy, check);
    if let Err(failure) = result {
        panic!("{parser}: {failure}");
    }
    println!("fuzz {parser}: {} inputs, no panic, every error named its file ({:.1?})", cases(), started.elapsed());
}

/// An error must name one of `names`, and be the user's (exit 2) when `must_be_bad_input`.
fn judge<T>(result: &anyhow::Result<T>, names: &[&str], must_be_bad_input: bool) -> Result<(), TestCaseError> {
    let Err(error) = result else { return Ok(()) };
    let message = format!("{error:#}");
    if must_be_bad_input && !is_bad_input(error) {
        return Err(TestCaseError::fail(format!("not a bad-input error (exit 1, not 2): {message}")));
    }
    if !names.iter().any(|n| message.contains(n)) {
        return Err(TestCaseError::fail(format!("the message names none of {names:?}: {message}")));
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

const SPEC: &str = r#"[run]
name = "fuzz"
seed = 3
runs_dir = "runs"
stages = ["train", "eval", "generate"]

[data]
path = "train.jsonl"
kind = "pair"
val_fraction = 0.2
prompt_template = "Q: {prompt}\n"

[tokenizer]
train_vocab_size = 300

[model]
layers = 1
heads = 2
embd = 16
context = 32
dropout = 0.1

[optimizer]
name = "adamw"
lr = 1e-3
betas = [0.9, 0.95]
schedule = "cosine"
warmup_steps = 2

[train]
epochs = 2
batch_size = 2
grad_accum = 1
checkpoint_every = 1

[generate]
prompts = ["Q: hi"]
max_new_tokens = 4
"#;

const PAIRS: &str = "{\"prompt\": \"What is one?\", \"response\": \"One is a number.\"}\n\
{\"prompt\": \"Name a colour\", \"response\": \"Blue, like the sky.\"}\n\
{\"prompt\": \"Say hi\", \"response\": \"Hi there!\"}\n\
{\"prompt\": \"Count to three\", \"response\": \"One, two, three.\"}\n";

/// Every field of the spec, and where overrides of it are spelled.
fn spec_keys(dir: &Path) -> Vec<String> {
    let loaded = pipe::spec::load_with_env(&dir.join("spec.toml"), &[], &[], dir).unwrap();
    let mut keys: Vec<String> = loaded.provenance().into_iter().map(|(k, _, _)| k).collect();
    keys.extend(
        ["run.nme", "train.epochz", "model.path", "tokenizer.path", "data.val_path", "lora.rank"].map(String::from),
    );
    keys
}

#[test]
fn spec_and_its_overrides() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("spec.toml"), SPEC.as_bytes());
    write(&dir.path().join("train.jsonl"), PAIRS.as_bytes());
    let keys = spec_keys(dir.path());
    let override_ = (any::<usize>(), any::<usize>(), 0u8..4);
    let strategy =
        (edits(1), proptest::collection::vec(override_.clone(), 0..3), proptest::collection::vec(override_, 0..3));
    campaign("spec", strategy, |((_, file_edits), sets, env)| {
        let text = mutate_toml(SPEC, &keys, &file_edits);
        let path = dir.path().join("spec.toml");
        write(&path, &text);
        let value = |pick: usize, form: u8| {
            let value = odd_toml(pick);
            match (form, &value) {
                (0, toml::Value::String(s)) => s.clone(), // a bare word
                (1, _) => TOKENS[pick % TOKENS.len()].to_string(),
                _ => value.to_string(),
            }
        };
        let sets: Vec<String> = sets
            .iter()
            .map(|&(key, pick, form)| match form {
                3 => keys[key % keys.len()].clone(), // no `=`
                _ => format!("{}={}", keys[key % keys.len()], value(pick, form)),
            })
            .collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|&(key, pick, form)| {
                let name = format!("PIPE_{}", keys[key % keys.len()].to_uppercase().replacen('.', "__", 1));
                (name, value(pick, form))
            })
            .collect();
        let mut names = vec!["spec.toml", "--set", "PIPE_"];
        // Overrides' relative paths (a mutated run.runs_dir too) resolve inside the test's folder.
        let loaded = pipe::spec::load_with_env(&path, &sets, &env, dir.path());
        judge(&loaded, &names, true)?;
        // What a run checks before its folder exists: the data, the tokenizer, the step plan.
        if let Ok(loaded) = loaded {
            let spec = &loaded.spec;
            names.extend(["train.jsonl", "data.", "train.", "tokenizer", "model", "generate.", "context"]);
            let files: Vec<String> = (spec.data.path.0.iter())
                .chain(spec.data.val_path.as_ref())
                .chain(spec.tokenizer.path.as_ref())
                .map(|p| p.display().to_string())
                .collect();
            names.extend(files.iter().map(String::as_str));
            judge(&pipe::train::StepPlan::new(4, &spec.train, 1), &names, true)?;
            if spec.tokenizer.train_vocab_size.is_some_and(|v| v <= 2000)
                && spec.data.path.0.iter().all(|p| p.ends_with("train.jsonl"))
            {
                judge(&pipe::data::PreparedData::prepare(spec, None), &names, true)?;
            }
        }
        Ok(())
    });
}

/// A dataset of each format and kind, read and rendered into token sequences.
#[test]
fn datasets_of_every_format_and_kind() {
    let dir = tempfile::tempdir().unwrap();
    let tok = pipe::data::Tok::train(PAIRS.lines(), 300).unwrap();
    let alpaca = "{\"instruction\": \"Add\", \"input\": \"2 and 2\", \"output\": \"4\"}\n{\"instruction\": \"Greet\", \"output\": \"Hello\"}\n";
    let chat = "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello.\"}, {\"role\": \"user\", \"content\": \"Bye\"}, {\"role\": \"assistant\", \"content\": \"Bye.\"}]}\n";
    let seeds: Vec<(&str, &str, String)> = vec![
        ("pair", "jsonl", PAIRS.to_string()),
        ("pair", "json", format!("[{}]", PAIRS.trim().replace('\n', ","))),
        ("pair", "csv", "prompt,response\n\"What is one?\",\"One, a number.\"\nSay hi,Hi there!\n".to_string()),
        ("alpaca", "jsonl", alpaca.to_string()),
        ("alpaca", "json", format!("[{}]", alpaca.trim().replace('\n', ","))),
        ("alpaca", "csv", "instruction,input,output\nAdd,2 and 2,4\nGreet,,Hello\n".to_string()),
        ("chat", "jsonl", chat.to_string()),
        ("chat", "json", format!("[{}]", chat.trim())),
        ("text", "txt", "A first document.\nA second one, longer than the first.\n".to_string()),
        ("text", "jsonl", "{\"text\": \"A first document.\"}\n{\"text\": \"A second.\"}\n".to_string()),
    ];
    let settings = (any::<usize>(), any::<bool>(), any::<usize>());
    campaign("datasets", (edits(seeds.len()), settings), |((seed, edits), (template, by_line, max_length))| {
        let (kind, extension, text) = &seeds[seed];
        let bytes = match *extension {
            "json" => mutate_json(text.as_bytes(), &edits),
            "jsonl" => mutate_jsonl(text.as_bytes(), &edits),
            _ => {
                let mut bytes = text.as_bytes().to_vec();
                edits.iter().for_each(|e| edit_bytes(&mut bytes, e));
                bytes
            }
        };
        let path = dir.path().join(format!("data.{extension}"));
        write(&path, &bytes);
        let templates = ["{prompt}\n", "Q: {prompt}\nA: ", "{prompt}", "<|user|>{prompt}<|assistant|>"];
        let mut data: pipe::spec::DataSpec =
            toml::from_str(&format!("path = \"{}\"\nkind = \"{kind}\"", path.display())).unwrap();
        data.prompt_template = templates[template % templates.len()].to_string();
        if by_line {
            data.documents = pipe::spec::Documents::Line;
        }
        let names = ["data."];
        let examples = pipe::data::records::read(&path, &data);
        judge(&examples, &names, true)?;
        if let Ok(examples) = examples {
            let max_length = 2 + max_length % 40;
            let tokenized = pipe::data::tokenize(&examples, &tok, &data, None, max_length, Default::default());
            judge(&tokenized, &names, true)?;
        }
        Ok(())
    });
}

/// Byte-level edits of a columnar file, half of them aimed at its metadata — a Parquet file's
/// footer (its last bytes), an Arrow file's schema (its first) — where a reader can go wrong
/// before any checksum or decompressor would notice.
fn mutate_columnar(seed: &[u8], edits: &[Edit], metadata_at_end: bool) -> Vec<u8> {
    let mut out = seed.to_vec();
    for edit in edits {
        let n = out.len().max(1);
        let window = n.min(768);
        let aim = |a: usize| match (a % 2, metadata_at_end) {
            (0, _) => a / 2,
            (_, true) => n - window + (a / 2) % window,
            (_, false) => (a / 2) % window,
        };
        let edit = match *edit {
            // The structural edits, meaningless here, become flips.
            Edit::Replace { node, value } | Edit::AddKey { node, value, .. } => {
                Edit::Flip { at: aim(node), bit: (value % 8) as u8 }
            }
            Edit::Remove { node } => Edit::Flip { at: aim(node), bit: (node % 8) as u8 },
            Edit::Flip { at, bit } => Edit::Flip { at: aim(at), bit },
            Edit::Insert { at, token } => Edit::Insert { at: aim(at), token },
            Edit::Delete { at, len } => Edit::Delete { at: aim(at), len },
            Edit::Repeat { at, len } => Edit::Repeat { at: aim(at), len },
            Edit::Cut { at } => Edit::Cut { at: aim(at) },
        };
        edit_bytes(&mut out, &edit);
    }
    out
}

/// Columnar datasets of each kind, edited, read through the data reader as a run reads them.
fn columnar_campaign(parser: &str, seeds: &[(&str, &str)], metadata_at_end: bool) {
    let fixtures = common::repo().join("tests/fixtures/columnar");
    let seeds: Vec<(Vec<u8>, String, pipe::spec::DataSpec)> = seeds
        .iter()
        .map(|(file, spec)| {
            let extension = Path::new(file).extension().unwrap().to_str().unwrap().to_string();
            (std::fs::read(fixtures.join(file)).unwrap(), extension, toml::from_str(spec).unwrap())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let contained = std::sync::atomic::AtomicUsize::new(0);
    campaign(parser, edits(seeds.len()), |(seed, edits)| {
        let (bytes, extension, spec) = &seeds[seed];
        let path = dir.path().join(format!("fuzzed.{extension}"));
        write(&path, &mutate_columnar(bytes, &edits, metadata_at_end));
        let read = pipe::data::records::read(&path, spec);
        if read.as_ref().is_err_and(|e| format!("{e:#}").contains("the reader failed on it")) {
            contained.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        judge(&read, &["fuzzed."], true)
    });
    println!(
        "fuzz {parser}: {} panics inside the reader were caught and reported as the file's",
        contained.into_inner()
    );
}

#[test]
fn parquet_files() {
    let chat = "path = \"x\"\nkind = \"chat\"";
    let seeds = [
        ("pairs-snappy.parquet", "path = \"x\""),
        ("pairs-zstd.parquet", "path = \"x\""),
        ("pairs-gzip.parquet", "path = \"x\""),
        ("pairs-lz4.parquet", "path = \"x\""),
        ("pairs-brotli.parquet", "path = \"x\""),
        ("pairs-none.parquet", "path = \"x\""),
        ("pairs-large-and-view.parquet", "path = \"x\""),
        ("pairs-dictionary.parquet", "path = \"x\""),
        ("alpaca.parquet", "path = \"x\"\nkind = \"alpaca\""),
        ("chat.parquet", chat),
        ("chat-large-list.parquet", chat),
        ("sharegpt.parquet", "path = \"x\"\nkind = \"chat\"\nmessages_field = \"conversations\""),
        ("text.parquet", "path = \"x\"\nkind = \"text\""),
    ];
    columnar_campaign("parquet", &seeds, true);
}

#[test]
fn arrow_files() {
    let seeds = [
        // datasets' save_to_disk: Arrow's stream format.
        ("saved-dataset/data-00000-of-00002.arrow", "path = \"x\""),
        // Arrow's file format (Feather v2), with its footer.
        ("pairs.feather", "path = \"x\""),
        ("pairs-lz4.feather", "path = \"x\""),
    ];
    columnar_campaign("arrow", &seeds, false);
}

/// A tiny model saved as a HF GPT-2 folder (config.json, model.safetensors, tokenizer.json), in
/// a temporary folder of the caller's, removed when it is dropped.
fn tiny_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let model = pipe::model::Gpt2Config::new(300, 16, 8, 1, 2).init::<Flex>(&Default::default());
    pipe::model::hf::save(&model, Some(0), dir.path()).unwrap();
    pipe::data::Tok::train(PAIRS.lines(), 300).unwrap().save(&dir.path().join("tokenizer.json")).unwrap();
    dir
}

#[test]
fn config_json() {
    let model_dir = tiny_model_dir();
    let seed = std::fs::read(model_dir.path().join("config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    campaign("config.json", edits(1), |(_, edits)| {
        write(&dir.path().join("config.json"), &mutate_json(&seed, &edits));
        judge(&pipe::model::hf::read_config(dir.path()), &["config.json"], true)
    });
}

/// Edit a safetensors file: its header as JSON, its length prefix, or its bytes.
fn mutate_safetensors(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let header_len = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let (header, data) = (&seed[8..8 + header_len], &seed[8 + header_len..]);
    let (structural, bytes): (Vec<Edit>, Vec<Edit>) = edits
        .iter()
        .cloned()
        .partition(|e| matches!(e, Edit::Replace { .. } | Edit::AddKey { .. } | Edit::Remove { .. }));
    let header = mutate_json(header, &structural);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    for edit in &bytes {
        // Mostly within the length prefix and the header, where a parser can go wrong.
        let edit = match *edit {
            Edit::Flip { at, bit } => Edit::Flip { at: at % out.len().clamp(1, 8 + header_len + 16), bit },
            ref other => other.clone(),
        };
        edit_bytes(&mut out, &edit);
    }
    out
}

#[test]
fn safetensors_files() {
    let model_dir = tiny_model_dir();
    let source = model_dir.path();
    let seed = std::fs::read(source.join("model.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
    campaign("safetensors", edits(1), |(_, edits)| {
        write(&dir.path().join("model.safetensors"), &mutate_safetensors(&seed, &edits));
        let loaded = pipe::model::hf::load::<Flex>(dir.path(), None, &Default::default());
        judge(&loaded, &["model.safetensors"], true)
    });
}

#[test]
fn tokenizer_json() {
    let model_dir = tiny_model_dir();
    let seed = std::fs::read(model_dir.path().join("tokenizer.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    campaign("tokenizer.json", edits(1), |(_, edits)| {
        write(&path, &mutate_json(&seed, &edits));
        let tok = pipe::data::Tok::load(&path);
        judge(&tok, &["tokenizer.json"], true)?;
        // A tokenizer that loads is used: encoding and decoding must not panic either.
        if let Ok(tok) = tok {
            let ids = tok.encode("Say hi, é漢🙂 <|endoftext|>");
            judge(&ids, &["tokenizer.json"], true)?;
            if let Ok(ids) = ids {
                judge(&tok.decode(&ids), &["tokenizer.json"], true)?;
            }
            judge(&tok.decode(&[0, 5, 299, 100_000]), &["tokenizer.json"], true)?;
        }
        Ok(())
    });
}

/// A finished run of a tiny spec with a checkpoint at every step, in a temporary folder of the
/// caller's: (the folder, the run folder in it).
fn seed_run() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("spec.toml"), SPEC.as_bytes());
    write(&dir.path().join("train.jsonl"), PAIRS.as_bytes());
    let out = common::pipe(dir.path(), &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let run = std::fs::read_dir(dir.path().join("runs/fuzz")).unwrap().next().unwrap().unwrap().path();
    (dir, run)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// meta.json, metrics.jsonl and spec.toml of a run folder, as `pipe runs`, `pipe compare` and
/// `pipe resume` read them.
#[test]
fn run_folder_records() {
    let (_seed_dir, seed) = seed_run();
    let seed = seed.as_path();
    let files = ["meta.json", "metrics.jsonl", "spec.toml"];
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(seed.join(f)).unwrap()).collect();
    let keys = spec_keys(seed);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("fuzz/20260101-000000");
    copy_dir(seed, &run);
    campaign("run folder", edits(files.len()), |(file, edits)| {
        for (name, original) in files.iter().zip(&originals) {
            write(&run.join(name), original);
        }
        let bytes = match files[file] {
            "meta.json" => mutate_json(&originals[file], &edits),
            "metrics.jsonl" => mutate_jsonl(&originals[file], &edits),
            _ => mutate_toml(std::str::from_utf8(&originals[file]).unwrap(), &keys, &edits),
        };
        write(&run.join(files[file]), &bytes);
        let names = ["meta.json", "metrics.jsonl", "spec.toml", "20260101-000000"];
        let listed = pipe::runs::list(dir.path()).map(|runs| {
            let _ = pipe::runs::table(&runs);
            let comparison = pipe::runs::Comparison::new(&runs);
            let _ = comparison.render();
            let _ = comparison.to_json(None);
        });
        judge(&listed, &names, true)?;
        judge(&pipe::runs::resolve(dir.path(), "fuzz"), &names, true)?;
        let reopened = pipe::run_dir::RunDir::open_for_writing(&run).and_then(|mut r| r.restart(3));
        judge(&reopened, &names, false)
    });
}

/// A checkpoint folder as `pipe resume` reads it: trainer.json, the optimizer state, the weights.
#[test]
fn checkpoint_folders() {
    let (_seed_dir, seed_run) = seed_run();
    let seed = pipe::checkpoint::list(&seed_run).pop().unwrap();
    let files = ["trainer.json", "optimizer.bin", "model.safetensors", "config.json"];
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(seed.join(f)).unwrap()).collect();
    let spec = pipe::spec::load_with_env(&seed_run.join("spec.toml"), &[], &[], &seed_run).unwrap().spec;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("step-000004");
    copy_dir(&seed, &checkpoint);
    campaign("checkpoint", edits(files.len()), |(file, edits)| {
        for (name, original) in files.iter().zip(&originals) {
            write(&checkpoint.join(name), original);
        }
        let bytes = match files[file] {
            "model.safetensors" => mutate_safetensors(&originals[file], &edits),
            "optimizer.bin" => {
                let mut bytes = originals[file].clone();
                edits.iter().for_each(|e| edit_bytes(&mut bytes, e));
                bytes
            }
            _ => mutate_json(&originals[file], &edits),
        };
        write(&checkpoint.join(files[file]), &bytes);
        let device = Default::default();
        type Train = burn::backend::Autodiff<Flex>;
        let loaded = pipe::checkpoint::load::<Train, pipe::model::Gpt2<Train>>(&checkpoint, None, &device);
        let names = ["step-000004"];
        judge(&loaded, &names, false)?;
        if let Ok((model, _)) = loaded {
            let optimizer = pipe::train::ModelOptimizer::<Train, pipe::model::Gpt2<Train>>::new(&spec.optimizer);
            judge(&optimizer.restore(&checkpoint, &model, &device), &names, false)?;
        }
        Ok(())
    });
}

#[test]
fn lora_adapter_folders() {
    use pipe::model::lora::{self, Adapters, BaseModel, LoraConfig, Target};
    use pipe::model::{CausalLm, Gpt2};
    // A model folder with adapters over the tiny model: adapter/adapter_config.json,
    // adapter/adapter_model.safetensors, base.json; one of them edited per input.
    let seed_dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model_dir();
    let base = BaseModel::of("tiny".into(), model_dir.path()).unwrap();
    let config = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: Target::parse_list(&["all-linear".into()], "gpt2").unwrap(),
        rslora: false,
    };
    let (_, model) = pipe::model::hf::load::<Flex>(model_dir.path(), None, &Default::default()).unwrap();
    let model = lora::attach(model, Adapters { config, base }, &Default::default()).unwrap();
    model.save(seed_dir.path(), Some(0)).unwrap();
    let files = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "base.json"];
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(seed_dir.path().join(f)).unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(seed_dir.path(), dir.path());
    campaign("LoRA adapter folder", edits(files.len()), |(which, edits)| {
        for (file, seed) in files.iter().zip(&seeds) {
            write(&dir.path().join(file), seed);
        }
        let edited = match which {
            1 => mutate_safetensors(&seeds[1], &edits),
            _ => mutate_json(&seeds[which], &edits),
        };
        write(&dir.path().join(files[which]), &edited);
        let loaded = Gpt2::<Flex>::load(dir.path(), None, &Default::default());
        judge(&loaded, &[files[which].rsplit('/').next().unwrap()], true)
    });
}

/// Jinja's own tokens, which byte edits of a template insert.
const JINJA_TOKENS: &[&str] = &[
    "{{", "}}", "{%", "%}", "{#", "#}", "|", ".", "(", ")", "[", "]", "'", "\"", "+", "-", "loop.", "endfor", "endif",
    "else", " if ", " in ", "~",
];

fn mutate_jinja(seed: &str, edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.as_bytes().to_vec();
    for edit in edits {
        match *edit {
            Edit::Insert { at, token } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, JINJA_TOKENS[token % JINJA_TOKENS.len()].bytes());
            }
            ref other => edit_bytes(&mut bytes, other),
        }
    }
    bytes
}

#[test]
fn chat_templates() {
    use pipe::data::records::{Message, Role};
    use pipe::data::{JinjaTemplate, Tok};
    // A `.jinja` file (byte and Jinja-token edits) or a tokenizer_config.json (JSON edits),
    // then rendered for a conversation, its assistant spans, the prompt layout and the turn end.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
    let templates: Vec<String> = ["chatml", "headers", "zephyr", "gemma", "inst"]
        .iter()
        .map(|n| std::fs::read_to_string(fixtures.join(format!("{n}.jinja"))).unwrap())
        .collect();
    let config = std::fs::read(fixtures.join("tokenizer_config.json")).unwrap();
    let tok = Tok::load(&common::fixture_dir().join("tokenizer.json")).unwrap();
    let m = |role, content: &str| Message { role, content: content.into() };
    let conversation =
        [m(Role::User, "Hi"), m(Role::Assistant, " Hello! "), m(Role::User, "Bye"), m(Role::Assistant, "Bye.")];
    let dir = tempfile::tempdir().unwrap();
    let jinja = dir.path().join("style.jinja");
    campaign("chat templates", edits(templates.len() + 1), |(which, edits)| {
        let (template, name) = if which < templates.len() {
            write(&jinja, &mutate_jinja(&templates[which], &edits));
            (JinjaTemplate::resolve(jinja.to_str().unwrap(), None, &tok, Default::default()), "style.jinja")
        } else {
            write(&dir.path().join("tokenizer_config.json"), &mutate_json(&config, &edits));
            (JinjaTemplate::resolve("hf", Some(dir.path()), &tok, Default::default()), "tokenizer_config.json")
        };
        judge(&template, &[name], true)?;
        if let Ok(Some(template)) = template {
            judge(&template.render_with_answers(&conversation), &[name], true)?;
            judge(&template.prompt_layout(), &[name], true)?;
            judge(&template.after_answer(), &[name], true)?;
        }
        Ok(())
    });
}
