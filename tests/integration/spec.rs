//! The spec: schema, overrides from the environment and --set, their precedence and typing,
//! relative paths, provenance, and the messages for bad specs.

use std::path::{Path, PathBuf};

use pipe::error::is_bad_input;
use pipe::spec::{load_with_env, LoadedSpec, OptimizerKind, Source};

const BASE: &str = r#"
[run]
name = "unit"
seed = 7

[data]
path = "data/train.jsonl"

[tokenizer]
train_vocab_size = 300

[model]
layers = 2
heads = 2
embd = 32
context = 64

[optimizer]
lr = 0.001
"#;

fn write_spec(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("spec.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load(text: &str, sets: &[&str], env: &[(&str, &str)]) -> anyhow::Result<LoadedSpec> {
    let dir = tempfile::tempdir().unwrap();
    let path = write_spec(dir.path(), text);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    load_with_env(&path, &sets, &env, dir.path())
}

fn error_of(text: &str, sets: &[&str], env: &[(&str, &str)]) -> String {
    let error = load(text, sets, env).err().expect("the spec should be rejected");
    assert!(is_bad_input(&error), "a bad spec is bad input: {error:#}");
    format!("{error:#}")
}

#[test]
fn defaults_fill_unset_fields() {
    let loaded = load(BASE, &[], &[]).unwrap();
    let s = &loaded.spec;
    assert_eq!(s.run.name, "unit");
    assert_eq!(s.train.epochs, 1);
    assert_eq!(s.optimizer.name, OptimizerKind::Adamw);
    assert_eq!(s.optimizer.betas, [0.9, 0.95]);
    assert_eq!(s.optimizer.lr, 0.001);
    assert_eq!(loaded.source("train.epochs"), Source::Default);
    assert!(matches!(loaded.source("optimizer.lr"), Source::File(_)));
}

#[test]
fn env_overrides_file_and_set_overrides_env() {
    let env = [("PIPE_TRAIN__EPOCHS", "3"), ("PIPE_OPTIMIZER__LR", "5e-4")];
    let loaded = load(BASE, &[], &env).unwrap();
    assert_eq!(loaded.spec.train.epochs, 3);
    assert_eq!(loaded.spec.optimizer.lr, 5e-4);
    assert_eq!(loaded.source("train.epochs"), Source::Env("PIPE_TRAIN__EPOCHS".into()));

    let loaded = load(BASE, &["train.epochs=5", "optimizer.lr=3e-4"], &env).unwrap();
    assert_eq!(loaded.spec.train.epochs, 5);
    assert_eq!(loaded.spec.optimizer.lr, 3e-4);
    assert_eq!(loaded.source("train.epochs"), Source::Set("train.epochs=5".into()));
}

#[test]
fn override_values_take_the_field_type() {
    // Scientific notation is a float, 0.1 is exactly the f64 0.1, and a string field keeps
    // leading zeros and takes numbers as text.
    let env = [("PIPE_OPTIMIZER__LR", "1e-4"), ("PIPE_OPTIMIZER__WEIGHT_DECAY", "0.1")];
    let loaded = load(BASE, &["run.name=007", "optimizer.betas=[0.8, 0.99]"], &env).unwrap();
    assert_eq!(loaded.spec.optimizer.lr, 1e-4);
    assert_eq!(loaded.spec.optimizer.weight_decay, 0.1);
    assert_eq!(loaded.spec.run.name, "007");
    assert_eq!(loaded.spec.optimizer.betas, [0.8, 0.99]);
    let loaded = load(BASE, &["run.name=2024", "optimizer.lr=1"], &[]).unwrap();
    assert_eq!(loaded.spec.run.name, "2024");
    assert_eq!(loaded.spec.optimizer.lr, 1.0);
}

#[test]
fn relative_paths_resolve_against_the_spec_folder() {
    let dir = tempfile::tempdir().unwrap();
    let spec_dir = dir.path().join("pipelines");
    std::fs::create_dir(&spec_dir).unwrap();
    let path = write_spec(&spec_dir, &BASE.replace("data/train.jsonl", "../data/train.jsonl"));
    let loaded = load_with_env(&path, &[], &[], dir.path()).unwrap();
    let root = dir.path().canonicalize().unwrap();
    assert_eq!(loaded.spec.data.path, root.join("data/train.jsonl").into());
    // A path given on the command line or in the environment is relative to where the command
    // runs, and is kept absolute, so that the run's saved spec finds it from inside the run.
    let cwd = dir.path().join("elsewhere");
    let env = [("PIPE_DATA__VAL_PATH".to_string(), "held/val.jsonl".to_string())];
    let loaded = load_with_env(&path, &["data.path=other.jsonl".into()], &env, &cwd).unwrap();
    assert_eq!(loaded.spec.data.path, cwd.join("other.jsonl").into());
    assert_eq!(loaded.spec.data.val_path, Some(cwd.join("held/val.jsonl")));
    assert!(
        loaded.to_toml().contains(&format!("{:?}", cwd.join("other.jsonl").display().to_string())),
        "{}",
        loaded.to_toml()
    );
    assert_eq!(loaded.spec.run.runs_dir, cwd.join("runs"), "the default runs folder too");
}

#[test]
fn provenance_names_every_source() {
    let loaded = load(BASE, &["train.batch_size=4"], &[("PIPE_TRAIN__EPOCHS", "2")]).unwrap();
    let rows = loaded.provenance();
    let row = |key: &str| rows.iter().find(|(k, _, _)| k == key).unwrap_or_else(|| panic!("{key} listed")).clone();
    assert_eq!(row("train.epochs").1, "2");
    assert_eq!(row("train.epochs").2, Source::Env("PIPE_TRAIN__EPOCHS".into()));
    assert_eq!(row("train.batch_size").2, Source::Set("train.batch_size=4".into()));
    assert!(matches!(row("model.layers").2, Source::File(_)));
    assert_eq!(row("optimizer.eps").2, Source::Default);
}

#[test]
fn unknown_field_is_an_error_with_its_path() {
    let message = error_of(&BASE.replace("seed = 7", "seed = 7\nepochz = 3"), &[], &[]);
    assert!(message.contains("run.epochz") || (message.contains("epochz") && message.contains("run")), "{message}");
    assert!(message.contains("spec.toml"), "{message}");
}

#[test]
fn unknown_section_is_an_error() {
    let message = error_of(&format!("{BASE}\n[trainer]\nepochs = 2\n"), &[], &[]);
    assert!(message.contains("trainer"), "{message}");
}

#[test]
fn env_override_of_a_missing_field_names_the_variable() {
    let message = error_of(BASE, &[], &[("PIPE_TRAIN__EPOCS", "3")]);
    assert!(message.contains("PIPE_TRAIN__EPOCS"), "{message}");
    assert!(message.contains("epocs"), "{message}");
}

#[test]
fn malformed_toml_names_the_line() {
    let message = error_of(&BASE.replace("seed = 7", "seed = = 7"), &[], &[]);
    assert!(message.contains("spec.toml"), "{message}");
    assert!(message.contains("line 4"), "{message}");
}

#[test]
fn wrong_type_names_the_field() {
    let message = error_of(&BASE.replace("seed = 7", "seed = \"seven\""), &[], &[]);
    assert!(message.contains("run.seed"), "{message}");
    let message = error_of(BASE, &["train.epochs=many"], &[]);
    assert!(message.contains("train.epochs") && message.contains("--set"), "{message}");
}

#[test]
fn invalid_values_name_the_field_and_source() {
    for (set, field) in [
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=nan", "optimizer.lr"),
        ("optimizer.lr=inf", "optimizer.lr"),
        ("optimizer.betas=[0.9, 1.0]", "optimizer.betas"),
        ("generate.top_p=0", "generate.top_p"),
        ("data.val_fraction=1.5", "data.val_fraction"),
    ] {
        let message = error_of(BASE, &[set], &[]);
        assert!(message.contains(field), "{set}: {message}");
        assert!(message.contains("--set"), "{set}: {message}");
    }
}

#[test]
fn set_without_equals_is_an_error() {
    let message = error_of(BASE, &["train.epochs"], &[]);
    assert!(message.contains("--set train.epochs") && message.contains("section.field=value"), "{message}");
}

#[test]
fn model_needs_exactly_one_source() {
    let message = error_of(&BASE.replace("layers = 2", "layers = 2\npath = \"gpt2\""), &[], &[]);
    assert!(message.contains("model"), "{message}");
    let message = error_of(&BASE.replace("heads = 2\n", ""), &[], &[]);
    assert!(message.contains("model.heads"), "{message}");
}

#[test]
fn cuda_backend_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let message = error_of(BASE, &["run.backend=cuda"], &[]);
    assert!(message.contains("run.backend") && message.contains("--features cuda"), "{message}");
    let message = error_of(BASE, &["run.backend=tpu"], &[]);
    assert!(message.contains("run.backend") && message.contains("tpu"), "{message}");
}

#[test]
fn missing_spec_file_is_named() {
    let error = load_with_env(Path::new("/nonexistent/spec.toml"), &[], &[], Path::new("/")).err().unwrap();
    assert!(is_bad_input(&error));
    assert!(format!("{error}").contains("/nonexistent/spec.toml"));
}

#[test]
fn an_empty_override_unsets_an_optional_field() {
    let text = BASE
        .replace("[tokenizer]\ntrain_vocab_size = 300\n", "")
        .replace("layers = 2\nheads = 2\nembd = 32\ncontext = 64\n", "path = \"models/gpt2\"\n");
    let loaded = load(&text, &["model.path=", "model.hub=openai-community/gpt2"], &[]).unwrap();
    assert_eq!(loaded.spec.model.path, None);
    assert_eq!(loaded.spec.model.hub.as_deref(), Some("openai-community/gpt2"));
}

#[test]
fn only_variables_named_pipe_section_field_are_overrides() {
    let loaded = load(BASE, &[], &[("PIPE_HOME", "/somewhere"), ("PIPE_", "x"), ("PIPE_TRAIN__EPOCHS", "3")]).unwrap();
    assert_eq!(loaded.spec.train.epochs, 3);
    assert!(error_of(BASE, &[], &[("PIPE_TRAIN__EPOCS", "3")]).contains("PIPE_TRAIN__EPOCS"));
}

#[test]
fn a_list_of_bare_words_is_a_list_of_strings() {
    let loaded =
        load(BASE, &["generate.prompts=[Hello there, What is 2+2?]", "optimizer.betas=[0.8, 0.99]"], &[]).unwrap();
    assert_eq!(loaded.spec.generate.prompts, ["Hello there", "What is 2+2?"]);
    assert_eq!(loaded.spec.optimizer.betas, [0.8, 0.99]);
    let quoted = load(BASE, &["generate.prompts=[\"a, b\", \"c\"]"], &[]).unwrap();
    assert_eq!(quoted.spec.generate.prompts, ["a, b", "c"], "quoted TOML strings keep their commas");
}

#[test]
fn the_default_stages_sample_only_when_there_are_prompts() {
    use pipe::spec::Stage;
    let loaded = load(BASE, &[], &[]).unwrap();
    assert_eq!(loaded.spec.run.stages, [Stage::Train, Stage::Eval]);
    let loaded = load(&format!("{BASE}\n[generate]\nprompts = [\"Hi\"]\n"), &[], &[]).unwrap();
    assert_eq!(loaded.spec.run.stages, [Stage::Train, Stage::Eval, Stage::Generate]);
}
