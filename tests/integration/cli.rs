//! The command line as a user meets it: exit codes (2 for bad input, 1 for a failed run),
//! one-line messages that name the file, line or field, and no run folder that looks complete
//! after a failure.

use std::path::Path;

use crate::common::{fixture_dir, pipe, stderr, stdout};

const SPEC: &str = r#"
[run]
name = "cli"
runs_dir = "runs"

[data]
path = "train.jsonl"
val_fraction = 0.0

[tokenizer]
train_vocab_size = 280

[model]
layers = 1
heads = 2
embd = 16
context = 32

[train]
epochs = 1
batch_size = 4
"#;

const GOOD_DATA: &str =
    "{\"prompt\": \"Q: one\\n\", \"response\": \"A: two\"}\n{\"prompt\": \"Q: three\\n\", \"response\": \"A: four\"}\n";

fn setup(spec: &str, data: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    std::fs::write(dir.path().join("train.jsonl"), data).unwrap();
    dir
}

/// Run `pipe run spec.toml` and return (exit code, stderr).
fn run(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["run", "spec.toml"];
    all.extend_from_slice(args);
    let out = pipe(dir, &all, &[]);
    (out.status.code(), stderr(&out))
}

fn assert_bad_input(dir: &Path, args: &[&str], needles: &[&str]) {
    let (code, message) = run(dir, args);
    assert_eq!(code, Some(2), "exit code for {args:?}: {message}");
    let last = message.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "one error line: {message}");
    for needle in needles {
        assert!(message.contains(needle), "{needle:?} in {message}");
    }
    assert!(!message.contains("panicked"), "{message}");
    assert!(
        !dir.join("runs/cli").exists() || std::fs::read_dir(dir.join("runs/cli")).unwrap().next().is_none(),
        "no run folder for bad input"
    );
}

#[test]
fn help_explains_the_commands() {
    let out = pipe(Path::new("."), &["--help"], &[]);
    assert!(out.status.success());
    let help = stdout(&out);
    for needle in ["run", "check", "PIPE_SECTION__FIELD", "--set", "pipe run pipelines/sft.toml"] {
        assert!(help.contains(needle), "{needle} in --help: {help}");
    }
}

/// The binary a user runs never carries the test build's fault hooks: `pipe` does not know the
/// PIPEFAULT_* variables (a run asked to be killed mid-checkpoint completes), while the tests'
/// `pipe-faults` build does (the same run is killed).
#[test]
fn the_pipe_binary_carries_no_test_hooks() {
    let mentions = |binary: &Path| {
        let bytes = std::fs::read(binary).unwrap();
        bytes.windows(b"PIPEFAULT_".len()).any(|w| w == b"PIPEFAULT_")
    };
    assert!(!mentions(Path::new(env!("CARGO_BIN_EXE_pipe"))), "pipe names no PIPEFAULT_ variable");
    assert!(mentions(&crate::common::pipe_faults_bin()), "the test build's pipe-faults does");
    let dir = setup(SPEC, &GOOD_DATA.repeat(8));
    let kill = [("PIPE_TRAIN__CHECKPOINT_EVERY", "1")];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipe"))
        .current_dir(dir.path())
        .args(["run", "spec.toml"])
        .envs(kill)
        .env("PIPEFAULT_KILL_IN_CHECKPOINT", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "pipe ignores the test build's variables: {}", stderr(&out));
    let out = pipe(dir.path(), &["run", "spec.toml"], &[kill[0], ("PIPEFAULT_KILL_IN_CHECKPOINT", "1")]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "pipe-faults is killed as asked");
}

#[test]
fn missing_spec_file() {
    let dir = tempfile::tempdir().unwrap();
    assert_bad_input(dir.path(), &[], &["spec.toml", "does not exist"]);
}

#[test]
fn malformed_toml_names_the_line() {
    let dir = setup(&SPEC.replace("epochs = 1", "epochs = = 1"), GOOD_DATA);
    assert_bad_input(dir.path(), &[], &["spec.toml", "line 20"]);
}

#[test]
fn wrong_field_type_names_the_field() {
    let dir = setup(&SPEC.replace("epochs = 1", "epochs = \"one\""), GOOD_DATA);
    assert_bad_input(dir.path(), &[], &["spec.toml", "train.epochs", "expected usize"]);
}

#[test]
fn set_without_equals() {
    let dir = setup(SPEC, GOOD_DATA);
    assert_bad_input(dir.path(), &["--set", "train.epochs"], &["--set train.epochs", "section.field=value"]);
}

#[test]
fn missing_dataset_file() {
    let dir = setup(&SPEC.replace("train.jsonl", "nope.jsonl"), GOOD_DATA);
    assert_bad_input(dir.path(), &[], &["nope.jsonl"]);
}

#[test]
fn bad_jsonl_line_names_file_and_line() {
    let dir = setup(SPEC, &format!("{GOOD_DATA}{{\"prompt\": \"x\"\n"));
    assert_bad_input(dir.path(), &[], &["train.jsonl:3"]);
}

#[test]
fn missing_model_config() {
    let dir =
        setup(&SPEC.replace("layers = 1\nheads = 2\nembd = 16\ncontext = 32\n", "path = \"empty-model\"\n"), GOOD_DATA);
    std::fs::create_dir(dir.path().join("empty-model")).unwrap();
    assert_bad_input(dir.path(), &[], &["empty-model", "config.json"]);
}

#[test]
fn tensor_shape_mismatch_names_the_tensor() {
    let dir =
        setup(&SPEC.replace("layers = 1\nheads = 2\nembd = 16\ncontext = 32\n", "path = \"small-vocab\"\n"), GOOD_DATA);
    // A config that disagrees with the weights it sits beside.
    let model = dir.path().join("small-vocab");
    std::fs::create_dir(&model).unwrap();
    let config = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap().replace("50257", "1000");
    std::fs::write(model.join("config.json"), config).unwrap();
    std::fs::copy(fixture_dir().join("model.safetensors"), model.join("model.safetensors")).unwrap();
    assert_bad_input(dir.path(), &[], &["model.safetensors", "wte.weight", "[50257, 32]", "[1000, 32]"]);
}

#[test]
fn tokenizer_larger_than_the_model_vocabulary() {
    // Train a 280-token model, then pair it with GPT-2's 50257-token tokenizer.
    let dir = setup(SPEC, GOOD_DATA);
    let (code, message) = run(dir.path(), &["--set", "run.stages=[\"train\"]", "--set", "run.name=small"]);
    assert_eq!(code, Some(0), "{message}");
    let small = std::fs::read_dir(dir.path().join("runs/small")).unwrap().next().unwrap().unwrap().path().join("final");
    let spec = SPEC
        .replace("train_vocab_size = 280", &format!("path = \"{}\"", fixture_dir().join("tokenizer.json").display()))
        .replace("layers = 1\nheads = 2\nembd = 16\ncontext = 32\n", &format!("path = \"{}\"\n", small.display()));
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    assert_bad_input(dir.path(), &[], &["tokenizer.json) has 50257 tokens", "the model's vocabulary has", "final)"]);
}

#[test]
fn a_diverging_run_fails_with_exit_1_and_says_so_in_meta() {
    let dir = setup(&SPEC.replace("epochs = 1", "epochs = 3"), &GOOD_DATA.repeat(4));
    let (code, message) = run(dir.path(), &["--set", "optimizer.lr=1e30", "--set", "train.batch_size=2"]);
    assert_eq!(code, Some(1), "{message}");
    assert!(message.contains("the training loss became") && message.contains("step"), "{message}");
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("runs/cli")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 1);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs[0].join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["status"], "failed");
    assert!(meta["error"].as_str().unwrap().contains("the training loss became"));
    assert!(!runs[0].join("final").exists(), "no final model from a failed run");
}

#[test]
fn check_prints_values_and_sources() {
    let dir = setup(SPEC, GOOD_DATA);
    let out = pipe(dir.path(), &["check", "spec.toml", "--set", "train.batch_size=2"], &[("PIPE_TRAIN__EPOCHS", "4")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} in {text}"))
            .to_string()
    };
    assert!(line("train.epochs").contains("= 4") && line("train.epochs").contains("# env PIPE_TRAIN__EPOCHS"));
    assert!(
        line("train.batch_size").contains("= 2") && line("train.batch_size").contains("# --set train.batch_size=2")
    );
    assert!(line("model.layers").contains("spec.toml"));
    assert!(line("optimizer.eps").ends_with("# default"));
    // Fields of other data kinds are not shown as if they applied; they are named apart, with why.
    assert!(line("data.prompt_field").contains("# default"));
    let unused = text.split("not used by this spec:\n").nth(1).unwrap_or_else(|| panic!("{text}"));
    for key in ["data.instruction_field", "data.messages_field", "data.text_field", "optimizer.min_lr_ratio"] {
        assert!(!text.lines().any(|l| l.starts_with(&format!("{key} = "))), "{key} is not listed as applying: {text}");
        assert!(unused.contains(key), "{key} is named as unused: {text}");
    }
    assert!(unused.contains("for data.kind = \"alpaca\"; this spec's is \"pair\""), "{text}");
    let no_validation =
        "train.eval_every, train.select_metric, train.early_stopping_patience: there is no validation data";
    assert!(unused.contains(no_validation), "{text}");

    // A held-out file makes val_fraction moot, and a chat spec uses the chat fields; what the
    // user set but does nothing is called out.
    let out = pipe(
        dir.path(),
        &[
            "check",
            "spec.toml",
            "--set",
            "data.val_path=train.jsonl",
            "--set",
            "data.kind=chat",
            "--set",
            "run.stages=[\"train\"]",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let unused = text.split("not used by this spec:\n").nth(1).unwrap_or_else(|| panic!("{text}"));
    assert!(text.contains("data.messages_field = \"messages\""), "{text}");
    assert!(
        unused.contains(
            "data.val_fraction: data.val_path or data.val_split holds the validation set (data.val_fraction set by "
        ) && unused.contains("spec.toml)"),
        "{text}"
    );
    assert!(
        unused.contains("data.prompt_field, data.response_field, data.prompt_template: for data.kind = \"pair\""),
        "{text}"
    );
    assert!(unused.contains("eval.*: run.stages has no eval stage"), "{text}");
}

/// `pipe bench` prints one JSON line with torch_ref.py's keys, through the real training and
/// generation code (a tiny shape here; speed itself is measured, not asserted).
#[test]
fn bench_prints_torch_refs_keys_and_rejects_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let shape = ["--layers", "1", "--heads", "2", "--embd", "16", "--vocab", "64", "--seq", "8", "--batch", "2"];
    let few = ["--steps", "2", "--warmup", "1", "--gen-tokens", "4"];
    for precision in ["f32", "bf16"] {
        let args: Vec<&str> =
            ["bench"].iter().chain(&shape).chain(&few).chain(&["--precision", precision]).copied().collect();
        let out = pipe(dir.path(), &args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        for key in ["impl", "params", "train_tokens_per_s", "gen_tokens_per_s", "peak_rss_mib", "shape"] {
            assert!(line.get(key).is_some(), "{key} missing from {line}");
        }
        assert!(line["train_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(line["shape"]["precision"], precision);
        // Token and (1024) position embeddings, one block, the final LayerNorm.
        let d = 16;
        let want = 64 * d
            + 1024 * d
            + (2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d))
            + 2 * d;
        assert_eq!(line["params"].as_u64(), Some(want as u64));
    }
    for (flag, value, needle) in
        [("--precision", "fp16", "possible values: f32, bf16"), ("--backend", "tpu", "possible values: cpu, cuda")]
    {
        let out = pipe(dir.path(), &["bench", flag, value], &[]);
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
    let out = pipe(dir.path(), &["bench", "--embd", "10", "--heads", "4"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("divisible by --heads"), "{}", stderr(&out));
    let out = pipe(dir.path(), &["bench", "--gpu-attention", "composite"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--gpu-attention: only for the GPU backends"), "{}", stderr(&out));
    // More than the machine holds: refused before the model is made, naming what to lower.
    let out = pipe(dir.path(), &["bench", "--batch", "1000000", "--seq", "1024"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    for part in
        ["pipe bench --batch 1000000 --seq 1024", "GiB of activations", "this machine's", "lower --batch or --seq"]
    {
        assert!(stderr(&out).contains(part), "{part:?} in {}", stderr(&out));
    }
}
