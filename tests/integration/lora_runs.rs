//! Pipelines with a `[lora]` section, end to end through the `pipe` binary: what lands in the
//! run folder, what the other commands do with it, exact resume after a kill, continuing a
//! PEFT adapter, and the bad inputs that are refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common;
use crate::common::{fixture_dir, newest_run, pipe, stderr, stdout, step_losses};
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use pipe::model::{hf, CausalLm, Gpt2};

fn spec(lora: &str) -> String {
    format!(
        r#"
[run]
name = "lora"
seed = 5
runs_dir = "runs"
stages = ["train", "eval", "generate"]

[data]
path = "train.jsonl"
val_fraction = 0.1
prompt_template = "{{prompt}}\n"

[model]
path = "{base}"

[optimizer]
lr = 1e-2
schedule = "cosine"
warmup_steps = 2

[train]
epochs = 2
batch_size = 4
max_length = 48
checkpoint_every = 3
keep_checkpoints = 2

[generate]
prompts = ["What is the capital of Kenya?"]
max_new_tokens = 4

[lora]
{lora}
"#,
        base = fixture_dir().display()
    )
}

const LORA: &str = "rank = 4\nalpha = 8\ndropout = 0.1\ntargets = [\"c_attn\", \"mlp.c_proj\"]";

fn setup(lora: &str) -> tempfile::TempDir {
    common::folder_with(&spec(lora), 40)
}

/// `pipe run spec.toml` with `args`; the run folder.
fn run_ok(dir: &Path, args: &[&str]) -> PathBuf {
    let mut all = vec!["run", "spec.toml"];
    all.extend_from_slice(args);
    let out = pipe(dir, &all, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let name = args.iter().find_map(|a| a.strip_prefix("run.name=")).unwrap_or("lora");
    newest_run(dir, name)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn logits(model: &Gpt2<Flex>, ids: &[i32]) -> Vec<f32> {
    let tokens = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &Default::default());
    model.logits(tokens, None).into_data().to_vec().unwrap()
}

#[test]
fn a_lora_run_keeps_adapters_not_copies_of_the_base_and_every_command_takes_it() {
    let dir = setup(LORA);
    let run = run_ok(dir.path(), &[]);
    let adapter = run.join("final/adapter");
    let config = json(&adapter.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(config["lora_dropout"], 0.1);
    assert_eq!(config["fan_in_fan_out"], true);
    assert_eq!(config["target_modules"], serde_json::json!(["c_attn", "mlp.c_proj"]));
    assert_eq!(config["base_model_name_or_path"], fixture_dir().display().to_string());
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let base = json(&run.join("final/base.json"));
    assert_eq!(base["sha256"], json(&run.join("meta.json"))["inputs"]["model.path"]["sha256"]);

    // No copy of the frozen base anywhere in the run; checkpoints hold the adapters and their
    // optimizer state, which is the adapters' size, not the model's.
    let checkpoints: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("step-"))
        .collect();
    assert!(!checkpoints.is_empty());
    let base_bytes = std::fs::metadata(fixture_dir().join("model.safetensors")).unwrap().len();
    for dir in checkpoints.iter().chain([&run.join("final"), &run.join("checkpoints/best")]) {
        assert!(!dir.join("model.safetensors").exists(), "{} holds no base weights", dir.display());
        assert!(dir.join("adapter/adapter_model.safetensors").is_file(), "{}", dir.display());
    }
    let optimizer = std::fs::metadata(checkpoints[0].join("optimizer.bin")).unwrap().len();
    assert!(optimizer * 20 < base_bytes, "optimizer state {optimizer} bytes, base weights {base_bytes}");

    let run_arg = run.to_str().unwrap();
    let out = pipe(dir.path(), &["generate", run_arg, "--prompt", "What is the capital of Kenya?\n"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = pipe(dir.path(), &["score", run_arg, "--text", "Nairobi is the capital of Kenya.", "--json"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = pipe(dir.path(), &["score", run_arg, "--checkpoint", "last", "--text", "Nairobi."], &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Export: the PEFT folder as it is, or a full GPT-2 with the adapters merged in.
    let out = pipe(dir.path(), &["export", run_arg, "--out", "peft"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for file in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"] {
        assert!(dir.path().join("peft").join(file).is_file(), "{file}");
    }
    let out = pipe(dir.path(), &["export", run_arg, "--merge", "--out", "merged"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("merged"), "{}", stdout(&out));
    let (_, merged) = hf::load::<Flex>(&dir.path().join("merged"), None, &Default::default()).unwrap();
    let adapted = Gpt2::<Flex>::load(&run.join("final"), None, &Default::default()).unwrap();
    let base = hf::load::<Flex>(&fixture_dir(), None, &Default::default()).unwrap().1;
    let ids = [464, 3139, 286, 13151, 318];
    let (want, got, plain) = (logits(&adapted, &ids), logits(&merged, &ids), logits(&base, &ids));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-4, "merged {g}, base + adapters {w}");
    }
    assert!(plain.iter().zip(&want).any(|(p, w)| (p - w).abs() > 1e-3), "training changed the model");
}

#[test]
fn merge_of_a_model_without_adapters_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture_dir();
    let out = pipe(dir.path(), &["export", fixture.to_str().unwrap(), "--merge", "--out", "x"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--merge") && stderr(&out).contains("has none"), "{}", stderr(&out));
    assert!(!dir.path().join("x").exists());
}

fn adapter_bytes(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("final/adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn a_lora_run_killed_mid_checkpoint_resumes_exactly() {
    let dir = setup(LORA);
    let reference = run_ok(dir.path(), &["--set", "run.name=reference"]);
    let status = Command::new(env!("CARGO_BIN_EXE_pipe-faults"))
        .current_dir(dir.path())
        .args(["run", "spec.toml"])
        .env("PIPEFAULT_KILL_IN_CHECKPOINT", "6")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "killed while writing the checkpoint of step 6");
    let run = newest_run(dir.path(), "lora");
    assert_eq!(json(&run.join("meta.json"))["status"], "running");
    let out = pipe(dir.path(), &["resume", run.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(adapter_bytes(&run) == adapter_bytes(&reference), "the adapters equal the uninterrupted run's");
    assert_eq!(step_losses(&run), step_losses(&reference), "every step's loss as in the uninterrupted run");
}

#[test]
fn a_peft_adapter_continues_training() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-lora");
    let from = format!("rank = 4\nalpha = 8\ntargets = [\"all-linear\"]\nfrom = \"{}\"", fixture.display());
    let dir = setup(&from);
    let run = run_ok(dir.path(), &["--set", "train.epochs=1"]);
    let fresh = setup("rank = 4\nalpha = 8\ntargets = [\"all-linear\"]");
    let fresh_run = run_ok(fresh.path(), &["--set", "train.epochs=1"]);
    let (continued, from_scratch) = (step_losses(&run), step_losses(&fresh_run));
    assert_ne!(continued[0].1, from_scratch[0].1, "step 1 starts from PEFT's adapter, not a fresh one");
    let inputs = json(&run.join("meta.json"))["inputs"].clone();
    assert!(inputs.get("lora.from").is_some(), "the adapter is a recorded input: {inputs}");

    // Its settings must be the spec's.
    let out = pipe(dir.path(), &["run", "spec.toml", "--set", "lora.rank=8"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("lora.rank = 8") && stderr(&out).contains("`r` = 4"), "{}", stderr(&out));
}

#[test]
fn bad_lora_settings_are_refused_naming_the_field() {
    let dir = setup(LORA);
    for (set, needle) in [
        ("lora.rank=0", "lora.rank"),
        ("lora.rank=33", "lora.rank = 33: above the model's width"),
        ("lora.alpha=-1", "lora.alpha"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("lora.targets=[\"q_proj\"]", "lora.targets"),
        ("lora.targets=[]", "lora.targets"),
        ("lora.from=\"nowhere\"", "nowhere"),
    ] {
        let out = pipe(dir.path(), &["run", "spec.toml", "--set", set], &[]);
        assert_eq!(out.status.code(), Some(2), "{set}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{set}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{set}");
    }
    assert!(!dir.path().join("runs/lora").exists(), "no run was started");
    // Adapters need a pretrained base.
    let text = std::fs::read_to_string(dir.path().join("spec.toml")).unwrap();
    let new_model = text
        .replace(&format!("path = \"{}\"", fixture_dir().display()), "layers = 1\nheads = 1\nembd = 8\ncontext = 16");
    std::fs::write(dir.path().join("new.toml"), new_model + "\n[tokenizer]\ntrain_vocab_size = 300\n").unwrap();
    let out = pipe(dir.path(), &["run", "new.toml"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("`lora`") && stderr(&out).contains("model.path"), "{}", stderr(&out));
}

#[test]
fn a_lora_run_exports_one_gguf_file_with_its_adapters_merged_and_its_prompt_layout() {
    use pipe::export::gguf::file;
    let dir = setup(LORA);
    let run = run_ok(dir.path(), &[]);
    let export = |args: &[&str]| {
        let out = pipe(dir.path(), args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    // Default name: the run's, in the working folder.
    let said = export(&["export", "lora", "--format", "gguf", "--quant", "f32"]);
    assert!(said.contains("lora-f32.gguf"), "{said}");
    export(&["export", "lora", "--merge", "--dtype", "f32", "--out", "merged"]);
    export(&["export", "merged", "--format", "gguf", "--quant", "f32", "--out", "merged.gguf"]);
    let (from_run, from_merged) = (
        std::fs::read(dir.path().join("lora-f32.gguf")).unwrap(),
        std::fs::read(dir.path().join("merged.gguf")).unwrap(),
    );
    let (a, b) = (file::read(&from_run).unwrap(), file::read(&from_merged).unwrap());
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!((&x.name, &x.dims, x.ty), (&y.name, &y.dims, y.ty));
        assert_eq!(&from_run[x.start..x.start + x.len], &from_merged[y.start..y.start + y.len], "{}", x.name);
    }
    // The adapters changed what they adapt: the merged weights are not the base's.
    export(&[
        "export",
        &fixture_dir().display().to_string(),
        "--format",
        "gguf",
        "--quant",
        "f32",
        "--out",
        "base.gguf",
    ]);
    let base_bytes = std::fs::read(dir.path().join("base.gguf")).unwrap();
    let base = file::read(&base_bytes).unwrap();
    let qkv = |f: &file::File| f.tensor("blk.0.attn_qkv.weight").unwrap().clone();
    let (x, y) = (qkv(&base), qkv(&a));
    assert_ne!(&base_bytes[x.start..x.start + x.len], &from_run[y.start..y.start + y.len]);
    // The run laid prompts out as "{prompt}\n" and ended answers with EOS: so does its template.
    let template = a.get("tokenizer.chat_template").and_then(|v| v.as_str()).unwrap().to_string();
    assert!(template.contains(r#"message['content'] + "\n""#) && template.contains("<|endoftext|>"), "{template}");
    assert_eq!(a.get("general.name").and_then(|v| v.as_str()), Some("lora"));

    // A checkpoint by its step.
    let newest = common::list_checkpoints(&run).pop().unwrap();
    let step: u64 = newest.file_name().unwrap().to_str().unwrap().trim_start_matches("step-").parse().unwrap();
    let said =
        export(&["export", "lora", "--format", "gguf", "--checkpoint", &format!("step-{step}"), "--out", "step.gguf"]);
    assert!(said.contains(&newest.file_name().unwrap().to_string_lossy().to_string()), "{said}");
    let out = pipe(dir.path(), &["export", "lora", "--format", "gguf", "--checkpoint", "step-999999"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no checkpoint at step 999999"), "{}", stderr(&out));

    // Settings of the other format, and a file already there, are refused.
    for (args, says) in [
        (vec!["export", "lora", "--format", "gguf", "--merge"], "--merge and --dtype are for --format hf"),
        (vec!["export", "lora", "--quant", "q8_0", "--out", "x"], "--quant is for --format gguf"),
        (vec!["export", "lora", "--format", "gguf", "--out", "merged.gguf"], "already exists"),
        (vec!["export", "lora", "--format", "gguf", "--quant", "q4"], "invalid value 'q4'"),
    ] {
        let out = pipe(dir.path(), &args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}
