//! Shared by the integration tests: the fixture, and running the `pipe` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use pipe::data::{Batch, Sequence};
use pipe::model::{CausalLm, FusedOps, Gpt2, Gpt2Config};

/// The repository: where `cargo test` says it is (so that a test binary built on one machine
/// runs from a checkout at another path, as `tests/cuda.rs` on a GPU machine), else where it
/// was built.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The `pipe` binary: `GPU_PIPE_BIN` where set (a carried binary), else the one cargo built.
pub fn pipe_bin() -> PathBuf {
    std::env::var_os("GPU_PIPE_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pipe")), PathBuf::from)
}

pub fn fixture_dir() -> PathBuf {
    repo().join("tests/fixtures/tiny-gpt2")
}

/// transformers' outputs on the fixture (see tests/fixtures/tiny-gpt2/reference.json).
pub fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

pub fn floats(value: &serde_json::Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

/// The reference texts' token ids, each trained on whole.
pub fn sequences_of(r: &serde_json::Value) -> Vec<Sequence> {
    r["encoded"].as_array().unwrap().iter().map(|e| Sequence::all_trained(ids(e))).collect()
}

/// The right-padded batch loss, through the same Batch the training loop uses.
pub fn batch_loss(model: &Gpt2<Flex>, sequences: &[Sequence]) -> f64 {
    let refs: Vec<&Sequence> = sequences.iter().collect();
    let batch = Batch::<Flex>::new(&refs, 50256, &Default::default());
    let sum: f32 = model.loss_sum(batch.inputs, batch.targets, batch.scored, batch.packing).into_scalar();
    sum as f64 / batch.loss_tokens as f64
}

/// Every trained parameter's gradient of `loss` by module path (a model family's enum variant is
/// not part of the path, as in `pipe::model::params`): (name, dims, values). Frozen parameters
/// have none and are left out.
pub fn gradients_by_name<M: burn::module::AutodiffModule<burn::backend::Autodiff<Flex>>>(
    model: &M,
    loss: Tensor<burn::backend::Autodiff<Flex>, 1>,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    use burn::module::{ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    type AD = burn::backend::Autodiff<Flex>;
    struct Collect<'a> {
        path: Vec<Option<String>>,
        grads: &'a GradientsParams,
        out: Vec<(String, Vec<usize>, Vec<f32>)>,
    }
    impl ModuleVisitor<AD> for Collect<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.push((!container.starts_with("Enum:")).then(|| name.to_string()));
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            let name = self.path.iter().flatten().cloned().collect::<Vec<_>>().join(".");
            if let Some(grad) = self.grads.get::<Flex, D>(param.id) {
                self.out.push((name, grad.dims().to_vec(), grad.into_data().to_vec().unwrap()));
            }
        }
    }
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let mut collect = Collect { path: Vec::new(), grads: &grads, out: Vec::new() };
    model.visit(&mut collect);
    collect.out
}

/// Logits through the KV cache equal the full forward's, 1e-4 apart, over a context of 300
/// positions: the cache's buffers grow by blocks (to 128, 256, then the context), fed a
/// prompt, a chunk across a block's end, then one token at a time.
pub fn cached_decoding_matches_the_full_forward<B: FusedOps>() {
    let vocab = 97;
    let model = Gpt2Config::new(vocab, 300, 32, 2, 4).with_initializer_range(0.3).init::<B>(&Default::default());
    let ids: Vec<i32> = (0..300).map(|i| (i * 37 % vocab) as i32).collect();
    let tokens = |range: std::ops::Range<usize>| {
        Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids[range.clone()].to_vec(), [1, range.len()]),
            &Default::default(),
        )
    };
    let full: Vec<f32> = model.logits(tokens(0..300), None).into_data().to_vec().unwrap(); // [300·vocab]
    let mut cache = model.new_cache();
    for range in [0..100, 100..130].into_iter().chain((130..300).map(|i| i..i + 1)) {
        let got: Vec<f32> = model.logits(tokens(range.clone()), Some(&mut cache)).into_data().to_vec().unwrap();
        let want = &full[range.start * vocab..range.end * vocab];
        let off = got.iter().zip(want).position(|(g, w)| g.is_nan() || (g - w).abs() > 1e-4);
        assert!(off.is_none(), "positions {range:?}: cached logit {off:?} off the full forward");
    }
    assert_eq!(Gpt2::<B>::cached(&cache), 300);
}

/// Feeding `prompt` to a bf16 decoder at once or one token at a time gives bit-identical
/// logits at every position (`what` names the model in a failure).
pub fn fed_at_once_or_token_by_token_alike(decoder: &pipe::model::Bf16Decoder, prompt: &[u32], what: &str) {
    let all = decoder.logits(prompt, &mut decoder.new_cache(), true); // [n, vocab]
    let vocab = all.len() / prompt.len();
    let mut cache = decoder.new_cache();
    for (i, &token) in prompt.iter().enumerate() {
        let one = decoder.logits(&[token], &mut cache, false);
        assert_eq!(one, all[i * vocab..(i + 1) * vocab], "{what}: position {i} fed alone");
    }
    assert_eq!(cache.seen(), prompt.len());
}

/// The test build's `pipe-faults`: `pipe` that makes the faults PIPEFAULT_* variables ask for.
pub fn pipe_faults_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pipe-faults"))
}

/// `pipe` with `args` in `dir`, with no PIPE_ variables from the outer environment; the
/// `pipe-faults` build when `env` asks for a fault.
fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let faults = env.iter().any(|(key, _)| key.starts_with("PIPEFAULT_"));
    let mut command = Command::new(if faults { pipe_faults_bin() } else { pipe_bin() });
    command.current_dir(dir).args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("PIPE_") {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Run `pipe` with `args` in `dir` to its end.
pub fn pipe(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(dir, args, env).output().unwrap()
}

/// Start `pipe` with `args` in `dir`, its output captured.
pub fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    command(dir, args, env).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// A run's `meta.json` status.
pub fn status(run: &Path) -> String {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("meta.json")).unwrap()).unwrap();
    meta["status"].as_str().unwrap().to_string()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A run's step records as (step, loss), in file order.
pub fn step_losses(run: &Path) -> Vec<(u64, f64)> {
    metric(run, "loss")
}

/// A run's evaluation records as (step, validation loss), in file order.
pub fn val_losses(run: &Path) -> Vec<(u64, f64)> {
    metric(run, "val_loss")
}

/// (step, value of `field`) for each record of `metrics.jsonl` that has the field.
fn metric(run: &Path, field: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m.get(field).is_some())
        .map(|m| (m["step"].as_u64().unwrap(), m[field].as_f64().unwrap()))
        .collect()
}

/// A run's complete checkpoints (`checkpoints/step-N`), oldest first.
pub fn list_checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut steps: Vec<PathBuf> =
        std::fs::read_dir(run.join("checkpoints")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    steps.retain(|p| p.file_name().unwrap().to_string_lossy().starts_with("step-"));
    steps.sort();
    steps
}

/// The newest run named `name` under `dir/runs`.
pub fn newest_run(dir: &Path, name: &str) -> PathBuf {
    let mut runs: Vec<PathBuf> =
        std::fs::read_dir(dir.join("runs").join(name)).unwrap().map(|e| e.unwrap().path()).collect();
    runs.sort();
    runs.pop().unwrap()
}

/// The spec the tests start from — a one-layer model trained from scratch on `train.jsonl`,
/// runs in `runs/` — with `changes` (TOML: the sections and fields that differ) laid over it,
/// field by field.
pub fn spec(changes: &str) -> String {
    let base = "[run]\nname = \"test\"\nruns_dir = \"runs\"\n\n[data]\npath = \"train.jsonl\"\n\n\
                [tokenizer]\ntrain_vocab_size = 300\n\n[model]\nlayers = 1\nheads = 2\nembd = 16\ncontext = 48\n";
    overlaid(base, changes)
}

/// The spec `base` with `changes` (TOML: the sections and fields that differ) laid over it,
/// field by field.
pub fn overlaid(base: &str, changes: &str) -> String {
    let mut spec: toml::Table = base.parse().unwrap();
    let changes: toml::Table = changes.parse().unwrap_or_else(|e| panic!("the changes are not TOML: {e}"));
    for (section, fields) in changes {
        let toml::Value::Table(fields) = fields else { panic!("[{section}]: a section of fields") };
        let into = spec.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        into.as_table_mut().unwrap().extend(fields);
    }
    toml::to_string(&spec).unwrap()
}

/// A spec of a one-layer model trained on `train.jsonl` on `backend`, for tests that stop
/// before training.
pub fn tiny_spec(backend: &str) -> String {
    format!(
        "[run]\nname = \"tiny\"\nruns_dir = \"runs\"\nbackend = \"{backend}\"\n\n[data]\npath = \"train.jsonl\"\n\n\
         [tokenizer]\ntrain_vocab_size = 280\n\n[model]\nlayers = 1\nheads = 1\nembd = 8\ncontext = 16\n"
    )
}

/// A temporary folder holding `spec.toml` and `train.jsonl`, the first `examples` pairs of the
/// shipped default data.
pub fn folder_with(spec: &str, examples: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read_to_string(repo().join("data/sft.jsonl")).unwrap();
    std::fs::write(dir.path().join("train.jsonl"), data.lines().take(examples).collect::<Vec<_>>().join("\n")).unwrap();
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    dir
}

/// Test data drawn by a generator of the caller's own, seeded: a tensor of `shape` filled by
/// `draw`. Never the backend's generator (`B::seed`, `Tensor::random`): that is one per process,
/// shared by the tests running beside this one, which may seed it or draw from it between this
/// test's seeding and its draw.
pub fn drawn<B: burn::tensor::backend::Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    mut draw: impl FnMut(&mut rand::rngs::StdRng) -> f32,
) -> Tensor<B, D> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| draw(&mut rng)).collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// Draws from N(0, std²) (Box–Muller).
pub fn normal(std: f32) -> impl FnMut(&mut rand::rngs::StdRng) -> f32 {
    use rand::Rng;
    move |rng| {
        let (u, v): (f32, f32) = (1.0 - rng.random::<f32>(), rng.random());
        std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// A dropout mask's entries as the model draws them: 1/(1 − p) with probability 1 − p, else 0.
pub fn kept(p: f32) -> impl FnMut(&mut rand::rngs::StdRng) -> f32 {
    use rand::Rng;
    move |rng| if rng.random::<f32>() < 1.0 - p { 1.0 / (1.0 - p) } else { 0.0 }
}
