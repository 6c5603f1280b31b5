//! Working with runs: `pipe runs`, `compare`, `generate`, `score`, `chat` and `export`, on
//! small runs and on the transformers fixture.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::{fixture_dir, ids, pipe, reference, stderr, stdout};

const SPEC: &str = r#"
[run]
name = "small"
seed = 1
runs_dir = "runs"
stages = ["train", "eval"]

[data]
path = "train.jsonl"
val_fraction = 0.25
prompt_template = "{prompt}\n"

[tokenizer]
train_vocab_size = 300

[model]
layers = 1
heads = 2
embd = 16
context = 48

[train]
epochs = 3
batch_size = 4
"#;

/// A folder with two finished runs of `small` that differ in their learning rate.
fn two_runs() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sft.jsonl")).unwrap();
    std::fs::write(dir.path().join("train.jsonl"), data.lines().take(16).collect::<Vec<_>>().join("\n")).unwrap();
    std::fs::write(dir.path().join("spec.toml"), SPEC).unwrap();
    for lr in ["1e-3", "1e-2"] {
        let out = pipe(dir.path(), &["run", "spec.toml", "--set", &format!("optimizer.lr={lr}")], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let mut runs: Vec<PathBuf> =
        std::fs::read_dir(dir.path().join("runs/small")).unwrap().map(|e| e.unwrap().path()).collect();
    runs.sort();
    (dir, runs)
}

#[test]
fn runs_lists_and_compare_diffs_tables_and_plots() {
    let (dir, runs) = two_runs();
    let out = pipe(dir.path(), &["runs", "--sort", "val_loss"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].contains("lowest val loss") && lines[0].contains("final model") && lines[0].contains("status"));
    for run in &runs {
        assert!(table.contains(run.file_name().unwrap().to_str().unwrap()), "{table}");
    }
    assert!(lines[1].contains("completed") && lines[1].contains(" cpu"), "the spec's word for the backend: {table}");
    let out = pipe(dir.path(), &["runs", "--name", "nothing-like-this"], &[]);
    assert_eq!(stdout(&out).lines().count(), 1, "only the header");
    let out = pipe(dir.path(), &["runs", "--sort", "colour"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let damaged = runs[0].join("meta.json");
    let meta = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, b"{\"name\": ").unwrap();
    let out = pipe(dir.path(), &["runs"], &[]);
    assert!(out.status.success(), "one damaged run does not stop the listing: {}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2, "the header and the readable run: {}", stdout(&out));
    let id = runs[0].file_name().unwrap().to_str().unwrap();
    assert!(stderr(&out).contains(&format!("{id}/meta.json")), "the damaged one is named: {}", stderr(&out));
    std::fs::write(&damaged, meta).unwrap();

    let refs: Vec<String> =
        runs.iter().map(|r| format!("small@{}", r.file_name().unwrap().to_str().unwrap())).collect();
    let out = pipe(dir.path(), &["compare", &refs[0], &refs[1], "--out", "cmp"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let svg_before = std::fs::read(dir.path().join("cmp/loss.svg")).unwrap();
    let again = pipe(dir.path(), &["compare", &refs[1], "--out", "cmp"], &[]);
    assert_eq!(again.status.code(), Some(2), "an earlier comparison is not overwritten: {}", stderr(&again));
    assert!(stderr(&again).contains("--out cmp: already exists and is not empty"), "{}", stderr(&again));
    assert_eq!(std::fs::read(dir.path().join("cmp/loss.svg")).unwrap(), svg_before);
    // --checkpoint names a folder of the run, not one of another run beside it.
    let elsewhere = format!("../{}/final", runs[1].file_name().unwrap().to_str().unwrap());
    let foreign = pipe(dir.path(), &["generate", &refs[0], "--checkpoint", &elsewhere, "--prompt", "Hi"], &[]);
    assert_eq!(foreign.status.code(), Some(2), "{}", stderr(&foreign));
    assert!(stderr(&foreign).contains("not a folder of the run"), "{}", stderr(&foreign));
    let text = stdout(&out);
    assert!(text.contains("optimizer.lr") && text.contains("0.001") && text.contains("0.01"), "{text}");
    assert!(!text.contains("model.layers"), "only differences are listed: {text}");
    assert!(text.contains('*'), "the best is marked: {text}");
    assert!(
        text.contains("train ▁") || text.contains("train █") || text.chars().any(|c| ('▁'..='█').contains(&c)),
        "{text}"
    );
    let svg = std::fs::read_to_string(dir.path().join("cmp/loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.len() > 2000, "an SVG with lines");

    let out = pipe(dir.path(), &["compare", &refs[0], "small", "--json", "--out", "cmp2"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 2);
    assert_eq!(json["runs"][1]["run"], refs[1], "a bare name is its latest run");
    assert_eq!(json["spec_diff"]["optimizer.lr"], serde_json::json!(["0.001", "0.01"]));
    assert!(json["runs"][0]["train_loss"].as_array().unwrap().len() == 9);
    // The curve holds the evaluations during training (each epoch's end), not the eval stage's
    // re-measure of the final model after it.
    let steps = |key: &str| -> Vec<u64> {
        json["runs"][0][key].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect()
    };
    assert_eq!((steps("val_loss"), steps("eval_val_loss")), (vec![3, 6, 9], vec![9]));
    assert!(dir.path().join("cmp2/comparison.json").is_file());

    let out = pipe(dir.path(), &["compare", &refs[0], "small@nope"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("small@nope"), "{}", stderr(&out));

    // One run: its metrics and curves, and without --out nothing is written.
    let before = std::fs::read_dir(dir.path().join("runs")).unwrap().count();
    let out = pipe(dir.path(), &["compare", &refs[0]], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("metrics:\n")
            && !text.contains('*')
            && !text.contains("spec differences")
            && !text.contains("plot:"),
        "{text}"
    );
    assert!(text.chars().any(|c| ('▁'..='█').contains(&c)), "its curves: {text}");
    // Nine steps, nine columns: the validation loss of steps 3, 6 and 9 in columns 3, 6 and 9.
    let val = text.lines().find_map(|l| l.trim_start().strip_prefix("val   ")).unwrap_or_else(|| panic!("{text}"));
    let marked: Vec<usize> = val.chars().enumerate().filter(|(_, c)| *c != ' ').map(|(i, _)| i + 1).collect();
    assert_eq!(marked, [3, 6, 9], "{text}");
    assert_eq!(std::fs::read_dir(dir.path().join("runs")).unwrap().count(), before, "no _compare folder");
}

/// Sparklines are drawn on the step axis: a series measured every 24 steps marks the columns
/// of those steps on the same 48 columns as a series measured at every one of 96 steps.
#[test]
fn sparklines_share_the_step_axis() {
    use pipe::runs::sparkline;
    let every_step: Vec<(u64, f64)> = (1..=96).map(|s| (s, 4.0 - s as f64 / 32.0)).collect();
    let every_24 = [(24, 3.0), (48, 2.5), (72, 2.0), (96, 1.0)];
    let (train, val) = (sparkline(&every_step, 1.0, 4.0, 96, 48), sparkline(&every_24, 1.0, 4.0, 96, 48));
    assert_eq!((train.chars().count(), val.chars().count()), (48, 48));
    assert!(!train.contains(' '), "{train}");
    let marked: Vec<(usize, char)> = val.chars().enumerate().filter(|(_, c)| *c != ' ').collect();
    assert_eq!(marked, [(11, '▆'), (23, '▅'), (35, '▃'), (47, '▁')], "{val}");
    assert_eq!(sparkline(&every_24, 1.0, 4.0, 4, 48).chars().count(), 4, "fewer steps than columns: a column a step");
}

#[test]
fn score_matches_transformers_token_by_token() {
    let r = reference();
    let fixture = fixture_dir();
    let mut args = vec!["score".to_string(), fixture.to_str().unwrap().to_string(), "--json".into()];
    for text in r["texts"].as_array().unwrap() {
        args.push("--text".into());
        args.push(text.as_str().unwrap().into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = pipe(Path::new("."), &args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let mut total = (0.0, 0usize);
    for (i, text) in json["texts"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ids(&text["ids"]), ids(&r["encoded"][i]));
        let nll = r["nll"][i].as_array().unwrap();
        for (lp, want) in text["token_logprobs"].as_array().unwrap().iter().zip(nll) {
            assert!((lp.as_f64().unwrap() + want.as_f64().unwrap()).abs() < 1e-4, "text {i}: {lp} vs -{want}");
            total.0 += want.as_f64().unwrap();
            total.1 += 1;
        }
        assert!((text["loss"].as_f64().unwrap() - r["loss"][i].as_f64().unwrap()).abs() < 1e-4);
    }
    let overall = &json["overall"];
    assert_eq!(overall["scored_tokens"].as_u64().unwrap() as usize, total.1);
    assert!((overall["loss"].as_f64().unwrap() - total.0 / total.1 as f64).abs() < 1e-4);
    assert!(
        (overall["perplexity"].as_f64().unwrap() - overall["loss"].as_f64().unwrap().exp()).abs()
            < 1e-6 * overall["perplexity"].as_f64().unwrap()
    );
}

#[test]
fn score_reads_files_and_rejects_texts_longer_than_the_context() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("texts.jsonl"), "{\"text\": \"Hello, I am a language model.\"}\n").unwrap();
    let fixture = fixture_dir();
    let out = pipe(dir.path(), &["score", fixture.to_str().unwrap(), "--file", "texts.jsonl"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("text 1: 8 tokens, loss 10.8459"), "{}", stdout(&out));
    let long = "word ".repeat(100);
    let out = pipe(dir.path(), &["score", fixture.to_str().unwrap(), "--text", &long], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("longer than the model's context of 64"), "{}", stderr(&out));
}

#[test]
fn greedy_generate_matches_transformers() {
    let r = reference();
    let g = &r["greedy"];
    let fixture = fixture_dir();
    let out = pipe(
        Path::new("."),
        &[
            "generate",
            fixture.to_str().unwrap(),
            "--prompt",
            g["prompt"].as_str().unwrap(),
            "--greedy",
            "--max-new-tokens",
            "20",
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(ids(&json["prompt_ids"]), ids(&g["prompt_ids"]));
    assert_eq!(ids(&json["new_ids"]), ids(&g["new_ids"]));
}

#[test]
fn sampling_is_seeded() {
    let fixture = fixture_dir();
    let sample = |seed: &str| {
        let args = [
            "generate",
            fixture.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
        ];
        let out = pipe(Path::new("."), &args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        ids(&serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["new_ids"])
    };
    assert_eq!(sample("5"), sample("5"));
    assert_ne!(sample("5"), sample("6"));
}

#[test]
fn chat_streams_replies_and_survives_the_context_limit() {
    let r = reference();
    let g = &r["greedy"];
    let tok = pipe::data::Tok::load(&fixture_dir().join("tokenizer.json")).unwrap();
    let want = tok.decode(&ids(&g["new_ids"])).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipe"))
        .args(["chat", fixture_dir().to_str().unwrap(), "--template", "{prompt}", "--greedy", "--max-new-tokens", "20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        // The first turn is the fixture's greedy prompt; then enough turns to overflow the
        // 64-token context many times over; EOF ends the chat.
        writeln!(stdin, "{}", g["prompt"].as_str().unwrap()).unwrap();
        for i in 0..12 {
            writeln!(stdin, "Tell me more about the number {i} and what it means to you").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let replies: Vec<&str> = text.split("> ").skip(1).collect();
    assert_eq!(replies.len(), 14, "13 replies and the closing prompt: {text}");
    // Piped input is echoed after its prompt, then the reply follows.
    let (echoed, reply) = replies[0].split_once('\n').unwrap();
    assert_eq!(echoed, g["prompt"].as_str().unwrap(), "{text}");
    assert_eq!(reply.trim_end_matches('\n'), want, "the first reply is transformers' greedy continuation");
}

#[test]
fn chat_uses_the_runs_prompt_template_and_ends_on_exit() {
    let (dir, runs) = two_runs();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipe"))
        .current_dir(dir.path())
        .args(["chat", runs[0].to_str().unwrap(), "--greedy", "--max-new-tokens", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"What is the capital of France?\n\xff\xfe not UTF-8\n/exit\nnever read\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(stdout(&out).contains("that line is not UTF-8 text, so it was not sent"), "{}", stdout(&out));
    assert_eq!(stdout(&out).matches("> ").count(), 3, "one reply, a line set aside, then /exit: {}", stdout(&out));
}

fn tensor_shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect()
}

/// Every tensor of a model folder's safetensors files (one or shards): name → (dtype, bytes).
fn stored_tensors(dir: &Path) -> BTreeMap<String, (String, Vec<u8>)> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") && !path.ends_with("grads.safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in file.tensors() {
                all.insert(name, (format!("{:?}", view.dtype()), view.data().to_vec()));
            }
        }
    }
    all
}

/// `pipe export` stores the weights in the dtype of the checkpoint they came from — bf16 and
/// f16 checkpoints (a Qwen2 in two shards, a Qwen3) come out bit for bit as transformers wrote
/// them — or in the one `--dtype` names (bf16 rounded to nearest, and f32 widening bf16
/// exactly), with config.json saying so; an export that fails leaves no folder behind.
#[test]
fn exports_store_the_source_dtype_or_the_one_asked_for_and_appear_whole() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config = |out: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
    };
    for (fixture, dtype, torch_name) in [("tiny-qwen2", "BF16", "bfloat16"), ("tiny-qwen3", "F16", "float16")] {
        let source = fixtures.join(fixture);
        let out = dir.path().join(fixture);
        let done = pipe(dir.path(), &["export", source.to_str().unwrap(), "--out", out.to_str().unwrap()], &[]);
        assert!(done.status.success(), "{}", stderr(&done));
        assert!(stdout(&done).contains(&format!("as {torch_name}")), "{}", stdout(&done));
        assert_eq!(config(&out)["torch_dtype"], torch_name);
        let (exported, original) = (stored_tensors(&out), stored_tensors(&source));
        assert!(exported.values().all(|(d, _)| d == dtype), "{fixture}: every tensor stored as {dtype}");
        for (name, stored) in &original {
            assert!(exported.get(name) == Some(stored), "{fixture}: `{name}` as transformers stored it");
        }
    }
    let source = fixtures.join("tiny-qwen2");
    let widened = dir.path().join("widened");
    let done = pipe(dir.path(), &["export", source.to_str().unwrap(), "--out", "widened", "--dtype", "f32"], &[]);
    assert!(done.status.success(), "{}", stderr(&done));
    assert_eq!(config(&widened)["torch_dtype"], "float32");
    for (name, (dtype, bytes)) in stored_tensors(&source) {
        assert_eq!(dtype, "BF16");
        let (f32_dtype, f32_bytes) = &stored_tensors(&widened)[&name];
        let high_halves: Vec<u8> = f32_bytes.chunks(4).flat_map(|b| [b[2], b[3]]).collect();
        assert!(f32_dtype == "F32" && high_halves == bytes && f32_bytes.chunks(4).all(|b| b[..2] == [0, 0]), "{name}");
    }
    let done = pipe(dir.path(), &["export", "widened", "--out", "narrowed", "--dtype", "bf16"], &[]);
    assert!(done.status.success(), "{}", stderr(&done));
    assert!(stored_tensors(&dir.path().join("narrowed")) == stored_tensors(&source), "f32 → bf16 rounds back exactly");

    // An export that fails leaves nothing under the name asked for, nor a partial sibling.
    std::fs::remove_file(widened.join("tokenizer.json")).unwrap();
    let failed = pipe(dir.path(), &["export", "widened", "--out", "broken"], &[]);
    assert_eq!(failed.status.code(), Some(2), "{}", stderr(&failed));
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("broken"))
        .collect();
    assert!(left.is_empty(), "no folder, partial or not: {left:?}");
}

#[test]
fn export_round_trips_with_hf_names_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sft.jsonl")).unwrap();
    std::fs::write(dir.path().join("train.jsonl"), data.lines().take(4).collect::<Vec<_>>().join("\n")).unwrap();
    let spec = SPEC
        .replace("[tokenizer]\ntrain_vocab_size = 300\n", "")
        .replace(
            "layers = 1\nheads = 2\nembd = 16\ncontext = 48\n",
            &format!("path = \"{}\"\n", fixture_dir().display()),
        )
        .replace("epochs = 3", "epochs = 1")
        .replace("stages = [\"train\", \"eval\"]", "stages = [\"train\"]");
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    let out = pipe(dir.path(), &["run", "spec.toml"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = pipe(dir.path(), &["export", "small", "--out", "exported"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exported = dir.path().join("exported");
    for file in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"] {
        assert!(exported.join(file).is_file(), "{file}");
    }
    // The same tensor names and shapes as transformers' own save_pretrained.
    assert_eq!(
        tensor_shapes(&exported.join("model.safetensors")),
        tensor_shapes(&fixture_dir().join("model.safetensors"))
    );
    // Reloaded, it scores text exactly as the run's model does.
    let score = |model: &str| {
        let out = pipe(dir.path(), &["score", model, "--json", "--text", "Hello, I am a language model."], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["texts"][0]["token_logprobs"].clone()
    };
    assert_eq!(score("exported"), score("small"));
    assert_ne!(score("exported"), score(fixture_dir().to_str().unwrap()), "the export holds the fine-tuned weights");
    let out = pipe(dir.path(), &["export", "small", "--out", "exported"], &[]);
    assert_eq!(out.status.code(), Some(2), "never overwrite a folder");
    assert!(stderr(&out).contains("not empty"));
}

/// Run names are looked up where the runs are: `--runs-dir` for the tools, the spec's
/// `run.runs_dir` for `pipe run --resume`; never a fixed `runs/`.
#[test]
fn run_names_are_looked_up_in_the_runs_folder_given() {
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sft.jsonl")).unwrap();
    std::fs::write(dir.path().join("train.jsonl"), data.lines().take(16).collect::<Vec<_>>().join("\n")).unwrap();
    std::fs::write(dir.path().join("spec.toml"), SPEC.replace("runs_dir = \"runs\"", "runs_dir = \"elsewhere\""))
        .unwrap();
    let out = pipe(dir.path(), &["run", "spec.toml", "--set", "train.epochs=1"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let prompt = ["--prompt", "Hello", "--greedy", "--max-new-tokens", "3"];
    let out = pipe(dir.path(), &[&["generate", "small"][..], &prompt].concat(), &[]);
    assert_eq!(out.status.code(), Some(2), "not under runs/: {}", stderr(&out));
    let out = pipe(dir.path(), &[&["generate", "small", "--runs-dir", "elsewhere"][..], &prompt].concat(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for tool in [
        &["score", "small", "--runs-dir", "elsewhere", "--text", "Hello there"][..],
        &["resume", "small", "--runs-dir", "elsewhere"],
    ] {
        let out = pipe(dir.path(), tool, &[]);
        assert!(out.status.success(), "{tool:?}: {}", stderr(&out));
    }
    let out = pipe(dir.path(), &["run", "spec.toml", "--set", "train.epochs=1", "--resume", "small"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("already completed"), "{}", stdout(&out));
}

/// Two run folders as pipe writes them, made by hand so that every figure is fixed: one that
/// selected its final model by exact match (recorded by an earlier version, which named the CPU
/// backend `flex`), one that failed after two epochs.
fn recorded_runs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let write = |id: &str, meta: serde_json::Value, lr: f64, metrics: Vec<serde_json::Value>| {
        let run = dir.path().join("runs/demo").join(id);
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("meta.json"), meta.to_string()).unwrap();
        std::fs::write(run.join("spec.toml"), format!("[optimizer]\nlr = {lr}\n\n[train]\nepochs = 4\n")).unwrap();
        let lines: Vec<String> = metrics.iter().map(|m| m.to_string()).collect();
        std::fs::write(run.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    };
    let step = |step: u64, loss: f64| {
        serde_json::json!({"step": step, "epoch": (step - 1) / 4 + 1, "loss": loss, "lr": 0.001, "grad_norm": 1.0,
            "tokens": 100, "padded_tokens": 0, "tokens_per_s": 1000.0, "elapsed_s": step as f64})
    };
    let epoch = |step: u64, val_loss: f64, exact_match: f64| {
        serde_json::json!({"step": step, "epoch": step / 4, "val_loss": val_loss, "val_ppl": f64::exp(val_loss),
            "exact_match": exact_match, "token_f1": exact_match, "rouge_l": exact_match})
    };
    let eval = |which: &str, step: u64, val_loss: f64| {
        serde_json::json!({"eval": which, "step": step, "val_loss": val_loss, "val_ppl": f64::exp(val_loss),
            "val_tokens": 50, "val_examples": 5,
            "responses": {"examples": 5, "exact_match": 0.8, "token_f1": 0.9, "rouge_l": 0.85, "seconds": 0.1}})
    };
    let meta = |id: &str, backend: &str, ended: &str, status: &str| {
        serde_json::json!({"pipe_version": "0.1.0", "name": "demo", "run_id": id, "spec_file": "spec.toml",
            "backend": backend, "device": "cpu", "seed": 1, "started": format!("2026-12-05T10:{id}:00Z"),
            "ended": ended, "status": status})
    };
    let mut selected = meta("00", "flex", "2026-12-05T10:00:27Z", "completed");
    selected["training"] = serde_json::json!({"best": {"step": 12, "value": 0.8}, "evals_without_improvement": 1,
        "select_metric": "exact_match", "final_model": "best", "final_step": 12});
    // Four steps an epoch, each epoch ending with its evaluation: (val loss, exact match).
    let epochs = |slope: f64, evaluations: &[(f64, f64)]| -> Vec<serde_json::Value> {
        let mut metrics = Vec::new();
        for (e, &(val_loss, exact)) in evaluations.iter().enumerate() {
            let steps = 4 * e as u64 + 1..=4 * e as u64 + 4;
            metrics.extend(steps.map(|s| step(s, 4.0 - slope * s as f64)));
            metrics.push(epoch(4 * e as u64 + 4, val_loss, exact));
        }
        metrics
    };
    let mut metrics = epochs(0.2, &[(3.5, 0.2), (2.5, 0.6), (1.5, 0.8), (1.25, 0.8)]);
    metrics.extend([eval("final", 12, 1.5), eval("last", 16, 1.25)]);
    write("00", selected, 0.001, metrics);
    let failed = meta("05", "cpu", "2026-12-05T10:06:05Z", "failed");
    write("05", failed, 0.0001, epochs(0.1, &[(3.75, 0.0), (3.5, 0.2)]));
    dir
}

/// `pipe runs` and `pipe compare` as a user reads them, line for line: the lowest validation
/// loss with its step, which model `final/` is by which metric, the spec's word for the backend,
/// the final model's answers, and curves on one step axis without the eval stage's re-measures.
#[test]
fn runs_and_compare_read_as_their_snapshots() {
    let dir = recorded_runs();
    let out = pipe(dir.path(), &["runs"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let want = "\
name  id  status     started              duration  steps  last train loss  lowest val loss  final model           backend
demo  00  completed  2026-12-05 10:00:00  27s       16     0.8000           1.2500 @16       best exact_match @12  cpu
demo  05  failed     2026-12-05 10:05:00  1m05s     8      3.2000           3.5000 @8        -                     cpu
";
    assert_eq!(stdout(&out), want);

    let out = pipe(dir.path(), &["compare", "demo@00", "demo@05"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let want = "\
spec differences:
  field         demo@00  demo@05
  optimizer.lr  0.001    0.0001

metrics (* the best of these runs):
  run      status     steps  last train loss  lowest val loss  at step  final model           duration
  demo@00  completed  16     0.8000*          1.2500*          16       best exact_match @12  27s
  demo@05  failed     8      3.2000           3.5000           8        -                     1m05s

final/'s answers to held-out prompts (* the best; high is good):
  run      answers  exact match  token F1  ROUGE-L
  demo@00  5        0.800*       0.900*    0.850*
  demo@05  -        -            -         -

loss by step, 0 to 16 (one scale; low is good):
  demo@00  train █▇▇▆▆▆▅▅▄▄▃▃▂▂▁▁
           val      ▇   ▅   ▃   ▂
  demo@05  train ███▇▇▇▇▆
           val      █   ▇
";
    assert_eq!(stdout(&out), want);
}
