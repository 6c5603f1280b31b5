//! The bad-input catalogue: every way a user can get the input wrong gives exit code 2 and one
//! message naming the file and the line or field, never a panic, and never a run folder that
//! claims to be complete. (Failures of the machine rather than the input — a full disk — exit
//! with 1 and mark the run failed.)

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::common::{fixture_dir, stderr};

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
    /// Another command than `pipe run spec.toml ARGS` (`{fixture}` is the tiny GPT-2 folder).
    command: Option<Vec<String>>,
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
        command: None,
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

fn with_command(mut c: Case, command: &[&str]) -> Case {
    c.command = Some(command.iter().map(|s| s.to_string()).collect());
    c
}

fn with_section(section: &str, lines: &str) -> String {
    format!("{SPEC}\n[{section}]\n{lines}\n")
}

fn sub(from: &str, to: &str) -> String {
    assert!(SPEC.contains(from), "{from}");
    SPEC.replacen(from, to, 1)
}

const ARCH: &str = "layers = 1\nheads = 2\nembd = 16\ncontext = 32\n";

/// `count` JSONL pairs whose responses run `chars` characters of varied words.
fn long_pairs(count: usize, chars: usize) -> Vec<u8> {
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];
    let response =
        |n: usize| (0..).map(|i| words[(i * 7 + n) % words.len()]).take(chars / 5).collect::<Vec<_>>().join(" ");
    let lines: Vec<String> =
        (0..count).map(|n| format!("{{\"prompt\": \"Q: {n}\", \"response\": \"{}\"}}", response(n))).collect();
    lines.join("\n").into_bytes()
}

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
            "bf16-weight decoding on a GPU backend",
            sub("[train]", "[generate]\nprecision = \"bf16\"\n[train]").replace("runs_dir = \"runs\"", "runs_dir = \"runs\"\nbackend = \"cuda\""),
            &["spec.toml", "generate.precision", "run.backend = \"cpu\""],
        ),
        case(
            "cuda not compiled in",
            sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nbackend = \"cuda\""),
            &["run.backend", "--features cuda"],
        ),
        case(
            "a vocabulary no machine could train",
            sub("train_vocab_size = 280", "train_vocab_size = 100000000000"),
            &["spec.toml", "tokenizer.train_vocab_size", "at most 1048576", "100000000000"],
        ),
        case(
            "a second device on the CPU",
            sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\ndevice = 2"),
            &["run.device", "backend `cpu` has one device", "device 2"],
        ),
        with_command(
            case("generate on a second CPU device", SPEC.into(), &["--device", "backend `cpu` has one device", "device 1"]),
            &["generate", "{fixture}", "--prompt", "hi", "--device", "1"],
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

        // The spec's values, one field at a time.
        case("unknown data kind", sub("val_fraction = 0.0", "val_fraction = 0.0\nkind = \"dialog\""), &["spec.toml", "data.kind", "dialog"]),
        case("unknown data format", sub("val_fraction = 0.0", "val_fraction = 0.0\nformat = \"xml\""), &["spec.toml", "data.format", "xml"]),
        case("val_fraction of 1", sub("val_fraction = 0.0", "val_fraction = 1.0"), &["spec.toml", "data.val_fraction"]),
        case("negative val_fraction", sub("val_fraction = 0.0", "val_fraction = -0.2"), &["spec.toml", "data.val_fraction"]),
        case("zero grad_accum", sub("batch_size = 2", "batch_size = 2\ngrad_accum = 0"), &["spec.toml", "train.grad_accum"]),
        case("zero log_every", sub("batch_size = 2", "batch_size = 2\nlog_every = 0"), &["spec.toml", "train.log_every"]),
        case("max_length of 1", sub("batch_size = 2", "batch_size = 2\nmax_length = 1"), &["spec.toml", "train.max_length", "at least 2"]),
        case("unknown loss_on", sub("batch_size = 2", "batch_size = 2\nloss_on = \"prompt\""), &["spec.toml", "train.loss_on", "prompt"]),
        case("zero eps", with_section("optimizer", "eps = 0.0"), &["spec.toml", "optimizer.eps"]),
        case("negative grad_clip", with_section("optimizer", "grad_clip = -1.0"), &["spec.toml", "optimizer.grad_clip"]),
        case("min_lr_ratio above 1", with_section("optimizer", "min_lr_ratio = 1.5"), &["spec.toml", "optimizer.min_lr_ratio"]),
        case("unknown schedule", with_section("optimizer", "schedule = \"exponential\""), &["spec.toml", "optimizer.schedule", "exponential"]),
        case("unknown optimizer", with_section("optimizer", "name = \"sgd\""), &["spec.toml", "optimizer.name", "sgd"]),
        case("negative warmup", with_section("optimizer", "warmup_steps = -3"), &["spec.toml", "optimizer.warmup_steps"]),
        case("dropout of 1", sub("context = 32", "context = 32\ndropout = 1.0"), &["spec.toml", "model.dropout", "[0, 1)"]),
        case("negative dropout", sub("context = 32", "context = 32\ndropout = -0.1"), &["spec.toml", "model.dropout"]),
        case("zero layers", sub("layers = 1", "layers = 0"), &["spec.toml", "model.layers"]),
        case("zero heads", sub("heads = 2", "heads = 0"), &["spec.toml", "model.heads"]),
        case("zero context", sub("context = 32", "context = 0"), &["spec.toml", "model.context"]),
        case("a new model without a width", sub("embd = 16\n", ""), &["spec.toml", "model.embd"]),
        case("model path and hub both", sub("[model]", "[model]\nhub = \"gpt2\"\npath = \"m\""), &["spec.toml", "model"]),
        case("model path and architecture both", sub("[model]", "[model]\npath = \"m\""), &["spec.toml", "model"]),
        case("tokenizer path and vocab size both", sub("train_vocab_size = 280", "train_vocab_size = 280\npath = \"t.json\""), &["spec.toml", "tokenizer", "not both"]),
        case("vocab size below the bytes", sub("train_vocab_size = 280", "train_vocab_size = 100"), &["spec.toml", "tokenizer.train_vocab_size", "257"]),
        case("a new model without a tokenizer", sub("train_vocab_size = 280", ""), &["spec.toml", "tokenizer"]),
        case("run name with a slash", sub("name = \"bad\"", "name = \"a/b\""), &["spec.toml", "run.name"]),
        case("empty run name", sub("name = \"bad\"", "name = \"\""), &["spec.toml", "run.name"]),
        case("unknown stage", sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nstages = [\"train\", \"deploy\"]"), &["spec.toml", "run.stages", "deploy"]),
        case("no stages", sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nstages = []"), &["spec.toml", "run.stages"]),
        case("negative seed", sub("runs_dir = \"runs\"", "runs_dir = \"runs\"\nseed = -1"), &["spec.toml", "run.seed"]),
        case("no data path", sub("path = \"train.jsonl\"\n", ""), &["spec.toml", "data.path"]),
        case("negative temperature", with_section("generate", "temperature = -1.0"), &["spec.toml", "generate.temperature"]),
        case("NaN temperature", with_section("generate", "temperature = nan"), &["spec.toml", "generate.temperature"]),
        case("zero max_new_tokens", with_section("generate", "prompts = [\"Q: one\"]\nmax_new_tokens = 0"), &["spec.toml", "generate.max_new_tokens"]),
        case("prompts not a list", with_section("generate", "prompts = \"Q: one\""), &["spec.toml", "generate.prompts"]),
        case("chat template without {content}", sub("val_fraction = 0.0", "val_fraction = 0.0\nkind = \"chat\"\nchat_template = \"{role}:\""), &["spec.toml", "data.chat_template"]),
        case("duplicate key", sub("epochs = 1", "epochs = 1\nepochs = 2"), &["spec.toml", "line 20"]),
        case("a section that is a value", format!("{SPEC}\ngenerate = 3\n"), &["spec.toml", "generate"]),
        case("final best without validation", sub("batch_size = 2", "batch_size = 2\nfinal = \"best\""), &["spec.toml", "train.final", "data.val_fraction"]),
        case("unknown final model", sub("batch_size = 2", "batch_size = 2\nfinal = \"middle\""), &["spec.toml", "train.final", "middle"]),
        case(
            "early stopping without validation",
            sub("batch_size = 2", "batch_size = 2\nearly_stopping_patience = 2"),
            &["spec.toml", "train.early_stopping_patience", "validation"],
        ),
        case(
            "negative early stopping delta",
            sub("batch_size = 2", "batch_size = 2\nearly_stopping_min_delta = -0.1"),
            &["spec.toml", "train.early_stopping_min_delta"],
        ),
        case(
            "select by answers without answering",
            sub("val_fraction = 0.0", "val_fraction = 0.5").replace("batch_size = 2", "batch_size = 2\nselect_metric = \"rouge_l\""),
            &["spec.toml", "train.select_metric", "eval.responses"],
        ),
        case(
            "unknown select metric",
            sub("batch_size = 2", "batch_size = 2\nselect_metric = \"bleu\""),
            &["spec.toml", "train.select_metric", "bleu"],
        ),
        with_file(
            with_data(
                case(
                    "final best with every validation example dropped",
                    sub("val_fraction = 0.0", "val_path = \"val.jsonl\"\nkind = \"chat\"")
                        .replace("batch_size = 2", "batch_size = 2\nfinal = \"best\""),
                    &["train.final", "none are left after tokenizing"],
                ),
                b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
            ),
            "val.jsonl",
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}, {{\"role\": \"assistant\", \"content\": \"ok\"}}]}}\n",
                "many words ".repeat(40)
            )
            .into_bytes(),
        ),
        // The data files.
        case("validation file missing", sub("val_fraction = 0.0", "val_path = \"val.jsonl\""), &["val.jsonl"]),
        with_file(
            case("validation file empty", sub("val_fraction = 0.0", "val_path = \"val.jsonl\""), &["val.jsonl", "no examples"]),
            "val.jsonl",
            b"\n\n".to_vec(),
        ),
        with_data(
            case("chat record without messages", sub("val_fraction = 0.0", "val_fraction = 0.0\nkind = \"chat\""), &["train.jsonl:1", "messages"]),
            b"{\"prompt\": \"a\", \"response\": \"b\"}\n",
        ),
        with_data(
            case("chat message with an unknown role", sub("val_fraction = 0.0", "val_fraction = 0.0\nkind = \"chat\""), &["train.jsonl:1", "robot"]),
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"robot\", \"content\": \"beep\"}]}\n",
        ),
        with_data(
            case("chat content not a string", sub("val_fraction = 0.0", "val_fraction = 0.0\nkind = \"chat\""), &["train.jsonl:1", "content"]),
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": 5}]}\n",
        ),
        with_data(
            case("chat without an assistant turn", sub("val_fraction = 0.0", "val_fraction = 0.0\nkind = \"chat\""), &["train.jsonl:1", "assistant"]),
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        ),
        with_data(
            case("alpaca record without output", sub("val_fraction = 0.0", "val_fraction = 0.0\nkind = \"alpaca\""), &["train.jsonl:1", "`output`"]),
            b"{\"instruction\": \"add\", \"input\": \"1 1\"}\n",
        ),
        with_file(
            case("CSV without the prompt column", sub("train.jsonl", "train.csv"), &["train.csv", "prompt"]),
            "train.csv",
            b"question,response\nhi,there\n".to_vec(),
        ),
        with_file(
            case("CSV row of the wrong length", sub("train.jsonl", "train.csv"), &["train.csv:3", "3 fields"]),
            "train.csv",
            b"prompt,response\nhi,there\na,b,c\n".to_vec(),
        ),
        with_file(
            case("JSON array of non-objects", sub("train.jsonl", "train.json"), &["train.json:3", "record [1]", "found a string"]),
            "train.json",
            b"[\n  {\"prompt\": \"a\",\n   \"response\": \"b\"}, \"x\",\n  7\n]".to_vec(),
        ),
        with_file(
            case("JSON file that is not an array", sub("train.jsonl", "train.json"), &["train.json"]),
            "train.json",
            b"[{\"prompt\": \"a\", \"response\": \"b\"}".to_vec(),
        ),
        with_file(
            case("plain text with a pair kind", sub("train.jsonl", "train.txt"), &["train.txt", "data.kind = \"text\""]),
            "train.txt",
            b"Just some text.\n".to_vec(),
        ),
        case(
            "a renamed prompt field absent",
            sub("val_fraction = 0.0", "val_fraction = 0.0\nprompt_field = \"question\""),
            &["train.jsonl:1", "`question`"],
        ),
        with_data(
            case("a dataset of blank lines and a stray value", SPEC.into(), &["train.jsonl:3", "expected a JSON object"]),
            b"\n\n[1, 2]\n",
        ),
        // Overrides.
        with_args(case("--set of an unknown section", SPEC.into(), &["--set lora.rank=4", "lora"]), &["--set", "lora.rank=4"]),
        with_args(
            case("--set of the wrong type", SPEC.into(), &["--set train.epochs=many", "train.epochs"]),
            &["--set", "train.epochs=many"],
        ),
        with_args(case("--set to a missing dataset", SPEC.into(), &["missing.jsonl"]), &["--set", "data.path=missing.jsonl"]),
        // Empty values of required fields of every type, and names with control characters.
        with_args(
            case("--set of an empty name", SPEC.into(), &["--set run.name=", "`run.name`", "needs a value (e.g. run.name="]),
            &["--set", "run.name="],
        ),
        with_args(
            case("--set of an empty seed", SPEC.into(), &["`run.seed`", "needs a value (e.g. run.seed=0)"]),
            &["--set", "run.seed="],
        ),
        with_args(
            case("--set of an empty rate", SPEC.into(), &["`optimizer.lr`", "needs a value (e.g. optimizer.lr="]),
            &["--set", "optimizer.lr=  "],
        ),
        with_args(
            case("--set of an empty list", SPEC.into(), &["`run.stages`", "needs a value (e.g. run.stages=["]),
            &["--set", "run.stages="],
        ),
        with_args(
            case("--set of an empty choice", SPEC.into(), &["`run.backend`", "needs a value (e.g. run.backend=cpu)"]),
            &["--set", "run.backend="],
        ),
        Case {
            env: vec![("PIPE_DATA__PATH", "".into())],
            ..case("env override of an empty path", SPEC.into(), &["PIPE_DATA__PATH", "`data.path`", "needs a value"])
        },
        with_args(
            case("a name with a newline", SPEC.into(), &["--set run.name=two\\nlines", "`run.name`", "control character (U+000A)"]),
            &["--set", "run.name=two\nlines"],
        ),
        case(
            "a field name with a tab",
            sub("[data]\n", "[data]\nprompt_field = \"pro\\tmpt\"\n"),
            &["`data.prompt_field`", "control character (U+0009)"],
        ),
        Case {
            env: vec![("PIPE_RUN__BACKEND", "tpu".into())],
            ..case("env override with an unknown value", SPEC.into(), &["PIPE_RUN__BACKEND", "tpu"])
        },
        // Model folders.
        with_file(
            case(
                "tokenizer without an end-of-text token",
                sub("train_vocab_size = 280", "path = \"tok.json\""),
                &["tok.json", "<|endoftext|>"],
            ),
            "tok.json",
            br#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null, "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}}"#.to_vec(),
        ),
        model_dir(
            case("config.json not JSON", hf_spec.clone(), &["config.json"]),
            b"{\"n_embd\": 32,".to_vec(),
            fixture_file("model.safetensors"),
        ),
        model_dir(
            case("config.json unsupported activation", hf_spec.clone(), &["config.json", "activation_function", "relu"]),
            String::from_utf8(fixture_file("config.json"))
                .unwrap()
                .replace("\"activation_function\": \"gelu_new\"", "\"activation_function\": \"relu\"")
                .into_bytes(),
            fixture_file("model.safetensors"),
        ),
        model_dir(
            case("config.json heads do not divide width", hf_spec.clone(), &["config.json", "n_head"]),
            String::from_utf8(fixture_file("config.json")).unwrap().replace("\"n_head\": 4", "\"n_head\": 3").into_bytes(),
            fixture_file("model.safetensors"),
        ),
        model_dir(
            case("config.json negative layers", hf_spec.clone(), &["config.json", "n_layer"]),
            String::from_utf8(fixture_file("config.json")).unwrap().replace("\"n_layer\": 2", "\"n_layer\": -2").into_bytes(),
            fixture_file("model.safetensors"),
        ),
        model_dir(
            case("weights file empty", hf_spec.clone(), &["model.safetensors"]),
            fixture_file("config.json"),
            Vec::new(),
        ),
        with_file(
            with_file(
                case("model folder without weights", hf_spec.clone(), &["model", "model.safetensors"]),
                "model/config.json",
                fixture_file("config.json"),
            ),
            "model/tokenizer.json",
            fixture_file("tokenizer.json"),
        ),
        case(
            "a new model too large for memory",
            sub("embd = 16", "embd = 65536").replace("layers = 1", "layers = 100").replace("heads = 2", "heads = 16"),
            &["model.layers = 100", "model.embd = 65536", "GiB"],
        ),
        with_data(
            case(
                "micro-batches too large for memory",
                sub("layers = 1\nheads = 2\nembd = 16\ncontext = 32", "layers = 8\nheads = 1024\nembd = 1024\ncontext = 1024")
                    .replace("batch_size = 2", "batch_size = 64"),
                &["train.batch_size = 64", "GiB of activations", "up to 65536 tokens", "lower train.batch_size"],
            ),
            &long_pairs(64, 3000),
        ),
        case(
            "a new model past counting",
            sub("embd = 16", "embd = 4294967296").replace("heads = 2", "heads = 1"),
            &["spec.toml", "model.embd", "more parameters than can be counted"],
        ),
        model_dir(
            case(
                "config.json far larger than its weights",
                hf_spec.clone(),
                &["model.safetensors", "wte.weight", "[50257, 1048576]"],
            ),
            String::from_utf8(fixture_file("config.json"))
                .unwrap()
                .replace("\"n_embd\": 32", "\"n_embd\": 1048576")
                .into_bytes(),
            fixture_file("model.safetensors"),
        ),
        with_file(
            case(
                "tokenizer whose decoder is malformed",
                sub("train_vocab_size = 280", "path = \"tok.json\""),
                &["tok.json", "not a valid tokenizer.json"],
            ),
            "tok.json",
            String::from_utf8(fixture_file("tokenizer.json"))
                .unwrap()
                .replacen("\"decoder\":{\"type\":\"ByteLevel\"", "\"decoder\":{\"type\":5", 1)
                .into_bytes(),
        ),
        // Other commands.
        with_command(case("spec file missing", SPEC.into(), &["nope.toml", "does not exist"]), &["run", "nope.toml"]),
        with_command(case("spec is a folder", SPEC.into(), &["runs", "does not exist"]), &["check", "runs"]),
        with_file(
            with_command(case("spec not UTF-8", SPEC.into(), &["latin.toml"]), &["run", "latin.toml"]),
            "latin.toml",
            b"[run]\nname = \"caf\xe9\"\n".to_vec(),
        ),
        with_command(case("check of a bad spec", sub("epochs = 1", "epochs = 0"), &["spec.toml", "train.epochs"]), &["check", "spec.toml"]),
        with_data(
            with_command(case("data of a bad dataset", SPEC.into(), &["train.jsonl:1", "`response`"]), &["data", "spec.toml"]),
            b"{\"prompt\": \"a\"}\n",
        ),
        with_command(case("resume of a missing run", SPEC.into(), &["runs/bad/nope"]), &["resume", "runs/bad/nope"]),
        with_file(
            with_command(case("resume of a run with a corrupt meta.json", SPEC.into(), &["meta.json"]), &["resume", "runs/bad/1"]),
            "runs/bad/1/meta.json",
            b"{\"name\": ".to_vec(),
        ),
        with_command(case("generate an empty prompt", SPEC.into(), &["--prompt", "0 tokens"]), &["generate", "{fixture}", "--prompt", ""]),
        with_command(
            case("generate from a missing model", SPEC.into(), &["no-such-model"]),
            &["generate", "no-such-model", "--prompt", "hi"],
        ),
        with_command(
            case("generate a checkpoint of a model folder", SPEC.into(), &["--checkpoint", "run folder"]),
            &["generate", "{fixture}", "--prompt", "hi", "--checkpoint", "checkpoints/step-000099"],
        ),
        with_command(
            case("generate with a negative temperature", SPEC.into(), &["--temperature -1"]),
            &["generate", "{fixture}", "--prompt", "hi", "--temperature=-1"],
        ),
        with_command(
            case("generate with top-p above 1", SPEC.into(), &["--top-p 2"]),
            &["generate", "{fixture}", "--prompt", "hi", "--top-p", "2"],
        ),
        with_file(
            with_command(case("score an empty file", SPEC.into(), &["no texts to score"]), &["score", "{fixture}", "--file", "empty.txt"]),
            "empty.txt",
            b"\n".to_vec(),
        ),
        with_command(
            case("score a missing file", SPEC.into(), &["missing.txt"]),
            &["score", "{fixture}", "--file", "missing.txt"],
        ),
        with_command(case("score an empty text", SPEC.into(), &["text 2 is empty"]), &["score", "{fixture}", "--text", "a", "--text", ""]),
        with_file(
            with_command(case("score a JSONL line without text", SPEC.into(), &["texts.jsonl:2", "text"]), &["score", "{fixture}", "--file", "texts.jsonl"]),
            "texts.jsonl",
            b"{\"text\": \"hello\"}\n{\"body\": \"world\"}\n".to_vec(),
        ),
        with_file(
            with_command(case("export into a non-empty folder", SPEC.into(), &["out", "not empty"]), &["export", "{fixture}", "--out", "out"]),
            "out/keep.txt",
            b"mine".to_vec(),
        ),
        with_command(
            case("compare a missing run", SPEC.into(), &["nope"]),
            &["compare", "nope", "nope2"],
        ),
        with_file(
            with_command(case("runs sorted by an unknown column", SPEC.into(), &["--sort", "colour"]), &["runs", "--sort", "colour"]),
            "runs/.keep",
            Vec::new(),
        ),
        with_command(case("chat with a missing model", SPEC.into(), &["no-such-model"]), &["chat", "no-such-model"]),
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
    command.current_dir(dir.path());
    match &c.command {
        Some(args) => command.args(args.iter().map(|a| a.replace("{fixture}", fixture_dir().to_str().unwrap()))),
        None => command.arg("run").arg("spec.toml").args(&c.args),
    };
    for (k, v) in &c.env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (out.status.code(), stderr(&out), dir)
}

/// Whether a run folder under `dir` claims to be complete.
fn completed_run(dir: &Path) -> bool {
    let Ok(names) = std::fs::read_dir(dir.join("runs")) else { return false };
    names.flat_map(|n| std::fs::read_dir(n.unwrap().path()).into_iter().flatten().flatten()).any(|run| {
        std::fs::read_to_string(run.path().join("meta.json")).is_ok_and(|meta| meta.contains("\"completed\""))
    })
}

#[test]
fn every_bad_input_exits_2_with_a_message_naming_where() {
    let cases = catalogue();
    assert!(cases.len() >= 90, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let (code, message, dir) = run_case(c);
        let missing: Vec<&String> = c.needles.iter().filter(|n| !message.contains(n.as_str())).collect();
        if completed_run(dir.path()) {
            failures.push(format!("{}: a run folder claims completed\n{message}", c.name));
        } else if code != Some(2)
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
