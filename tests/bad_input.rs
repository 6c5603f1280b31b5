//! The bad-input catalogue: every way a user can get the input wrong gives exit code 2 and one
//! message naming the file and the line or field, never a panic, and never a run folder that
//! claims to be complete. (Failures of the machine rather than the input — a full disk — exit
//! with 1 and mark the run failed.)

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::{fixture_dir, stderr};

const SPEC: &str = r#"[run]
name = "bad"
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
batch_size = 2
"#;

const DATA: &str =
    "{\"prompt\": \"Q: one\", \"response\": \"A: two\"}\n{\"prompt\": \"Q: three\", \"response\": \"A: four\"}\n";

struct Case {
    name: &'static str,
    spec: String,
    files: Vec<(&'static str, Vec<u8>)>,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// What the message must contain (file and line or field, and the problem).
    needles: Vec<String>,
}

fn case(name: &'static str, spec: String, needles: &[&str]) -> Case {
    Case {
        name,
        spec,
        files: vec![("train.jsonl", DATA.as_bytes().to_vec())],
        args: vec![],
        env: vec![],
        needles: needles.iter().map(|s| s.to_string()).collect(),
    }
}

fn with_data(mut c: Case, data: &[u8]) -> Case {
    c.files[0].1 = data.to_vec();
    c
}

fn with_file(mut c: Case, name: &'static str, bytes: Vec<u8>) -> Case {
    c.files.push((name, bytes));
    c
}

fn with_args(mut c: Case, args: &[&str]) -> Case {
    c.args = args.iter().map(|s| s.to_string()).collect();
    c
}

fn sub(from: &str, to: &str) -> String {
    assert!(SPEC.contains(from), "{from}");
    SPEC.replacen(from, to, 1)
}

const ARCH: &str = "layers = 1\nheads = 2\nembd = 16\ncontext = 32\n";

fn fixture_file(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(name)).unwrap()
}

fn catalogue() -> Vec<Case> {
    let model_dir = |c: Case, config: Vec<u8>, weights: Vec<u8>| {
        let c = with_file(c, "model/config.json", config);
        let c = with_file(c, "model/tokenizer.json", fixture_file("tokenizer.json"));
        with_file(c, "model/model.safetensors", weights)
    };
    let hf_spec = sub("[tokenizer]\ntrain_vocab_size = 280\n", "").replace(ARCH, "path = \"model\"\n");
    vec![
        case("malformed TOML", sub("epochs = 1", "epochs = = 1"), &["spec.toml", "line 19"]),
        case("unterminated string", sub("name = \"bad\"", "name = \"bad"), &["spec.toml", "line 2"]),
        case("unknown section", format!("{SPEC}\n[trainer]\nepochs = 2\n"), &["spec.toml", "trainer"]),
        case("unknown field", sub("epochs = 1", "epochs = 1\nepochz = 2"), &["spec.toml", "train.epochz"]),
        case("wrong type", sub("epochs = 1", "epochs = \"one\""), &["spec.toml", "train.epochs", "expected usize"]),
        case("zero epochs", sub("epochs = 1", "epochs = 0"), &["spec.toml", "train.epochs", "at least 1"]),
        case("negative epochs", sub("epochs = 1", "epochs = -1"), &["spec.toml", "train.epochs"]),
        case("zero batch size", sub("batch_size = 2", "batch_size = 0"), &["spec.toml", "train.batch_size"]),
        case("negative lr", format!("{SPEC}\n[optimizer]\nlr = -0.1\n"), &["spec.toml", "optimizer.lr", "> 0"]),
        case("zero lr", format!("{SPEC}\n[optimizer]\nlr = 0.0\n"), &["spec.toml", "optimizer.lr"]),
        case("NaN lr", format!("{SPEC}\n[optimizer]\nlr = nan\n"), &["spec.toml", "optimizer.lr", "NaN"]),
        case("infinite lr", format!("{SPEC}\n[optimizer]\nlr = inf\n"), &["spec.toml", "optimizer.lr", "inf"]),
        case(
            "beta of 1",
            format!("{SPEC}\n[optimizer]\nbetas = [0.9, 1.0]\n"),
            &["spec.toml", "optimizer.betas", "[0, 1)"],
        ),
        case(
            "negative beta",
            format!("{SPEC}\n[optimizer]\nbetas = [-0.1, 0.95]\n"),
            &["spec.toml", "optimizer.betas"],
        ),
        case("one beta", format!("{SPEC}\n[optimizer]\nbetas = [0.9]\n"), &["spec.toml", "optimizer.betas"]),
        case(
            "negative weight decay",
            format!("{SPEC}\n[optimizer]\nweight_decay = -1.0\n"),
            &["spec.toml", "optimizer.weight_decay"],
        ),
        case("top_p above 1", format!("{SPEC}\n[generate]\ntop_p = 1.5\n"), &["spec.toml", "generate.top_p"]),
        case(
            "template without {prompt}",
            sub("val_fraction = 0.0", "val_fraction = 0.0\nprompt_template = \"Q:\""),
            &["spec.toml", "data.prompt_template"],
        ),
        case("heads do not divide width", sub("heads = 2", "heads = 3"), &["spec.toml", "model.embd", "divisible"]),
        case(
            "max_length beyond the context",
            sub("batch_size = 2", "batch_size = 2\nmax_length = 64"),
            &["train.max_length = 64", "context of 32"],
        ),
        case("missing dataset file", sub("train.jsonl", "missing.jsonl"), &["missing.jsonl"]),
        with_data(case("empty dataset", SPEC.into(), &["train.jsonl", "no examples"]), b"\n"),
        with_data(
            case("JSONL line not JSON", SPEC.into(), &["train.jsonl:2", "not a JSON object"]),
            b"{\"prompt\": \"a\", \"response\": \"b\"}\n{oops}\n",
        ),
        with_data(
            case("JSONL line lacks a field", SPEC.into(), &["train.jsonl:1", "`response`"]),
            b"{\"prompt\": \"a\"}\n",
        ),
        with_data(
            case("field of the wrong type", SPEC.into(), &["train.jsonl:1", "`prompt`", "must be a string"]),
            b"{\"prompt\": 1, \"response\": \"b\"}\n",
        ),
        with_data(
            case("non-UTF-8 bytes", SPEC.into(), &["train.jsonl:2", "UTF-8"]),
            b"{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"\xc3\x28\", \"response\": \"b\"}\n",
        ),
        with_data(
            case(
                "prompt longer than the context",
                SPEC.into(),
                &["train.jsonl:2", "leaves no room", "max_length = 32"],
            ),
            format!(
                "{{\"prompt\": \"a\", \"response\": \"b\"}}\n{{\"prompt\": \"{}\", \"response\": \"b\"}}\n",
                "many words ".repeat(40)
            )
            .as_bytes(),
        ),
        case(
            "tokenizer file missing",
            sub("train_vocab_size = 280", "path = \"nope/tokenizer.json\""),
            &["nope/tokenizer.json", "does not exist"],
        ),
        with_file(
            case(
                "tokenizer corrupt",
                sub("train_vocab_size = 280", "path = \"tok.json\""),
                &["tok.json", "not a valid tokenizer.json"],
            ),
            "tok.json",
            b"{\"model\": 3".to_vec(),
        ),
        with_file(
            case("model directory without config.json", hf_spec.clone(), &["model", "config.json"]),
            "model/model.safetensors",
            fixture_file("model.safetensors"),
        ),
        model_dir(
            case("safetensors truncated", hf_spec.clone(), &["model.safetensors", "not a valid safetensors file"]),
            fixture_file("config.json"),
            fixture_file("model.safetensors")[..5000].to_vec(),
        ),
        model_dir(
            case("config.json dropout above 1", hf_spec.clone(), &["config.json", "`resid_pdrop` = 1.5", "[0, 1)"]),
            String::from_utf8(fixture_file("config.json"))
                .unwrap()
                .replace("\"resid_pdrop\": 0.0", "\"resid_pdrop\": 1.5")
                .into_bytes(),
            fixture_file("model.safetensors"),
        ),
        model_dir(
            case("config.json unscaled attention", hf_spec.clone(), &["config.json", "`scale_attn_weights` = false"]),
            String::from_utf8(fixture_file("config.json"))
                .unwrap()
                .replace("\"scale_attn_weights\": true", "\"scale_attn_weights\": false")
                .into_bytes(),
            fixture_file("model.safetensors"),
        ),
        model_dir(
            case(
                "tensor shape mismatch",
                hf_spec.clone(),
                &["model.safetensors", "wte.weight", "[50257, 32]", "[50257, 64]"],
            ),
            String::from_utf8(fixture_file("config.json"))
                .unwrap()
                .replace("\"n_embd\": 32", "\"n_embd\": 64")
                .into_bytes(),
            fixture_file("model.safetensors"),
        ),
        with_file(
            model_dir(
                case(
                    "tokenizer and model vocabularies differ",
                    hf_spec.replace("[model]", "[tokenizer]\npath = \"big.json\"\n\n[model]"),
                    &["big.json) has 50257 tokens", "vocabulary has 1000"],
                ),
                String::from_utf8(fixture_file("config.json")).unwrap().replace("50257", "1000").into_bytes(),
                Vec::new(),
            ),
            "big.json",
            fixture_file("tokenizer.json"),
        ),
        case(
            "unknown backend",
            sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nbackend = \"tpu\""),
            &["spec.toml", "run.backend", "tpu"],
        ),
        case(
            "unknown precision",
            sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nprecision = \"fp16\""),
            &["spec.toml", "run.precision", "fp16"],
        ),
        case(
            "cuda not compiled in",
            sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nbackend = \"cuda\""),
            &["run.backend", "--features cuda"],
        ),
        case(
            "a stage named twice",
            sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nstages = [\"train\", \"eval\", \"train\"]"),
            &["spec.toml", "run.stages", "`train` twice"],
        ),
        case(
            "a generate stage without prompts",
            sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nstages = [\"train\", \"generate\"]"),
            &["generate.prompts", "at least one prompt"],
        ),
        case(
            "an empty generate prompt",
            format!("{SPEC}\n[generate]\nprompts = [\"Q: one\", \"\"]\n"),
            &["generate.prompts[1]", "0 tokens", "1 to 31"],
        ),
        case(
            "a generate prompt longer than the context",
            format!("{SPEC}\n[generate]\nprompts = [\"{}\"]\n", "many words ".repeat(40)),
            &["generate.prompts[0]", "context of 32"],
        ),
        with_args(
            case(
                "epochs past counting",
                SPEC.into(),
                &["train.epochs = 18446744073709551615", "more steps than can be counted"],
            ),
            &["--set", "train.epochs=18446744073709551615", "--set", "train.batch_size=1"],
        ),
        Case {
            env: vec![("PIPE_TRAIN__EPOCS", "3".into())],
            ..case("env override of a missing field", SPEC.into(), &["PIPE_TRAIN__EPOCS", "epocs"])
        },
        Case {
            env: vec![("PIPE_OPTIMIZER__LR", "fast".into())],
            ..case("env override of the wrong type", SPEC.into(), &["PIPE_OPTIMIZER__LR", "optimizer.lr"])
        },
        with_args(
            case("--set without =", SPEC.into(), &["--set train.epochs", "section.field=value"]),
            &["--set", "train.epochs"],
        ),
        with_args(
            case("--set of a missing field", SPEC.into(), &["--set model.width=3", "model.width"]),
            &["--set", "model.width=3"],
        ),
        with_file(
            case(
                "runs folder not writable",
                sub("runs_dir = \"runs\"", "runs_dir = \"afile/runs\""),
                &["runs folder", "afile/runs"],
            ),
            "afile",
            b"not a folder".to_vec(),
        ),
    ]
}

fn run_case(c: &Case) -> (Option<i32>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spec.toml"), &c.spec).unwrap();
    for (name, bytes) in &c.files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let mut command = Command::new(env!("CARGO_BIN_EXE_pipe"));
    command.current_dir(dir.path()).arg("run").arg("spec.toml").args(&c.args);
    for (k, v) in &c.env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (out.status.code(), stderr(&out), dir)
}

fn assert_no_completed_run(dir: &Path, name: &str) {
    let Ok(names) = std::fs::read_dir(dir.join("runs")) else { return };
    for run in names.flatten().flat_map(|n| std::fs::read_dir(n.path()).into_iter().flatten().flatten()) {
        if let Ok(meta) = std::fs::read_to_string(run.path().join("meta.json")) {
            assert!(!meta.contains("\"completed\""), "{name}: a run folder claims completed");
        }
    }
}

#[test]
fn every_bad_input_exits_2_with_a_message_naming_where() {
    let cases = catalogue();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let (code, message, dir) = run_case(c);
        assert_no_completed_run(dir.path(), c.name);
        let missing: Vec<&String> = c.needles.iter().filter(|n| !message.contains(n.as_str())).collect();
        if code != Some(2)
            || !missing.is_empty()
            || message.contains("panicked")
            || !message.trim_end().lines().last().unwrap_or("").starts_with("error: ")
        {
            failures.push(format!("{}: exit {code:?}, missing {missing:?}\n{message}", c.name));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn a_disk_full_during_a_checkpoint_fails_the_run_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SPEC
        .replace(ARCH, "layers = 2\nheads = 2\nembd = 64\ncontext = 32\n")
        .replace("batch_size = 2", "batch_size = 1\ncheckpoint_every = 1");
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    std::fs::write(dir.path().join("train.jsonl"), DATA).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_pipe"));
    command.current_dir(dir.path()).args(["run", "spec.toml"]);
    // SAFETY: only async-signal-safe calls between fork and exec. Files may not grow past
    // 100 kB, as on a full disk, and the write fails instead of killing the process.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 100_000, rlim_max: 100_000 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            Ok(())
        });
    }
    let out = command.output().unwrap();
    let message = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{message}");
    assert!(
        message.contains("checkpoints/.step-000001.partial/model.safetensors") && message.contains("File too large"),
        "{message}"
    );
    let run = std::fs::read_dir(dir.path().join("runs/bad")).unwrap().next().unwrap().unwrap().path();
    let meta = std::fs::read_to_string(run.join("meta.json")).unwrap();
    assert!(meta.contains("\"failed\""), "{meta}");
    assert!(pipe::checkpoint::list(&run).is_empty(), "no checkpoint that looks complete");
}
