//! Turns a resolved spec into its stages and runs them in order. Everything that can be wrong
//! with the user's input (tokenizer, data, model) is checked before the run folder is created;
//! once it exists, the folder's `meta.json` always says how the run ended.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::json;

use crate::backend::{self, BackendJob};
use crate::checkpoint;
use crate::data::{apply_template, cache, prompt_layout, records, tokenize, Example, Sequence, Tok, TokenizeReport};
use crate::error::{bad_input, is_interrupted};
use crate::generate::{Generator, Sampling};
use crate::model::{hf, FusedOps, Gpt2, Gpt2Config, TrainBackend};
use crate::run_dir::{self, Meta, RunDir, Status};
use crate::spec::{LoadedSpec, ModelSpec, Spec, Stage};
use crate::train::{self, evaluate, TrainContext};

/// Run the pipeline a spec describes; returns the run folder.
pub fn run(loaded: &LoadedSpec) -> Result<PathBuf> {
    let spec = &loaded.spec;
    let interrupt = interrupt_on_ctrl_c()?;
    backend::dispatch(spec.run.backend, spec.run.device, RunJob { loaded, resume: None, interrupt: &interrupt })
}

/// What `pipe resume` did.
pub enum Resumed {
    /// The run went on and completed.
    Completed(PathBuf),
    /// The run had already completed; nothing was done.
    AlreadyCompleted(PathBuf),
}

/// Continue an unfinished run from its latest complete checkpoint (or from the start when it
/// has none), in the same folder, with the spec it was started with. A completed run is left
/// as it is.
pub fn resume(run_path: &Path) -> Result<Resumed> {
    let run = RunDir::open(run_path)?;
    if run.meta.status == Status::Completed {
        return Ok(Resumed::AlreadyCompleted(run.path));
    }
    let loaded = crate::spec::load_with_env(&run.file(run_dir::SPEC_FILE), &[], &[])?;
    let interrupt = interrupt_on_ctrl_c()?;
    let job = RunJob { loaded: &loaded, resume: Some(run), interrupt: &interrupt };
    backend::dispatch(loaded.spec.run.backend, loaded.spec.run.device, job).map(Resumed::Completed)
}

/// The first Ctrl-C sets the flag (training checkpoints after the current step and stops);
/// a second one ends the process at once.
fn interrupt_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    {
        use signal_hook::consts::SIGINT;
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&flag))?;
        signal_hook::flag::register(SIGINT, Arc::clone(&flag))?;
    }
    Ok(flag)
}

struct RunJob<'a> {
    loaded: &'a LoadedSpec,
    /// The run folder to continue, for `pipe resume`.
    resume: Option<RunDir>,
    interrupt: &'a AtomicBool,
}

impl BackendJob for RunJob<'_> {
    type Output = PathBuf;

    fn run<B: TrainBackend>(self, device: B::Device, device_name: String) -> Result<PathBuf> {
        let spec = &self.loaded.spec;
        B::seed(&device, spec.run.seed);
        let (mut run, inputs, checkpoint) = match self.resume {
            None => {
                let inputs = Inputs::<B>::prepare(spec, None, &device)?;
                let meta = Meta {
                    pipe_version: env!("CARGO_PKG_VERSION").to_string(),
                    name: spec.run.name.clone(),
                    run_id: String::new(),
                    spec_file: self.loaded.path.clone(),
                    backend: backend::name(spec.run.backend).to_string(),
                    device: device_name,
                    seed: spec.run.seed,
                    started: run_dir::now(),
                    ended: None,
                    status: Status::Running,
                    error: None,
                    resumed: Vec::new(),
                };
                let run = RunDir::create(&spec.run.runs_dir, meta)?;
                run_dir::write_atomic(&run.file(run_dir::SPEC_FILE), self.loaded.to_toml().as_bytes())?;
                inputs.data.tok.save(&run.file(run_dir::TOKENIZER_FILE))?;
                (run, inputs, None)
            }
            Some(mut run) => {
                // The run's own tokenizer, not a retrained one.
                let inputs = Inputs::<B>::prepare(spec, Some(&run.file(run_dir::TOKENIZER_FILE)), &device)?;
                let latest = checkpoint::list(&run.path).pop();
                let step = match &latest {
                    Some(dir) => checkpoint::progress(dir)?.step,
                    None => 0,
                };
                run.restart(step)?;
                tracing::info!(from_step = step, "resuming the run from its latest checkpoint");
                (run, inputs, latest)
            }
        };
        tracing::info!(run = %run.path.display(), "run folder");
        match execute(spec, inputs, &run, &device, checkpoint.as_deref(), self.interrupt) {
            Ok(()) => {
                run.finish(Status::Completed, None)?;
                Ok(run.path)
            }
            Err(error) if is_interrupted(&error) => {
                run.finish(Status::Interrupted, Some(format!("{error:#}")))?;
                let how = format!("continue it with: pipe resume {}", run.path.display());
                Err(error.context(format!("run {} stopped by Ctrl-C; {how}", run.path.display())))
            }
            Err(error) => {
                run.finish(Status::Failed, Some(format!("{error:#}")))?;
                Err(error.context(format!("run {} failed", run.path.display())))
            }
        }
    }
}

/// The tokenized data and the model a run starts from.
struct Inputs<B: TrainBackend> {
    data: PreparedData,
    config: Gpt2Config,
    model: Gpt2<B>,
}

impl<B: TrainBackend> Inputs<B> {
    /// `tokenizer` replaces the spec's tokenizer (a resumed run uses the one it saved).
    fn prepare(spec: &Spec, tokenizer: Option<&Path>, device: &B::Device) -> Result<Self> {
        let data = PreparedData::prepare(spec, tokenizer)?;
        let (config, mut model) = match &data.model_dir {
            Some(dir) => hf::load::<B>(dir, spec.model.dropout, device)?,
            None => {
                let m = &spec.model;
                let (layers, heads, embd, context) =
                    (m.layers.unwrap(), m.heads.unwrap(), m.embd.unwrap(), m.context.unwrap());
                let config = Gpt2Config::new(data.tok.vocab_size(), context, embd, layers, heads)
                    .with_dropout(m.dropout.unwrap_or(0.0));
                let model = config.init::<B>(device);
                (config, model)
            }
        };
        model.precision = spec.run.precision;
        log_data(&data.report, data.val.len(), &config);
        Ok(Self { data, config, model })
    }
}

/// The tokenizer and the tokenized train and validation sets of a spec.
pub struct PreparedData {
    pub tok: Tok,
    pub train: Vec<Sequence>,
    pub val: Vec<Sequence>,
    pub report: TokenizeReport,
    model_dir: Option<PathBuf>,
}

impl PreparedData {
    /// Read, split and tokenize the spec's data (from the tokenized cache when the inputs are
    /// unchanged), checking it against the model's vocabulary and context.
    pub fn prepare(spec: &Spec, tokenizer: Option<&Path>) -> Result<Self> {
        let model_dir = model_dir(&spec.model)?;
        let train_examples = records::read(&spec.data.path, &spec.data)?;
        let (train_examples, val_examples, val_origin) = match &spec.data.val_path {
            Some(path) => (train_examples, records::read(path, &spec.data)?, path.clone()),
            None => {
                let (train, val) = split(train_examples, spec.data.val_fraction, spec.run.seed);
                (train, val, spec.data.path.clone())
            }
        };
        let tokenizer_path = tokenizer.map(Path::to_path_buf).or_else(|| spec.tokenizer.path.clone());
        let (tok, tok_origin) = match (&tokenizer_path, spec.tokenizer.train_vocab_size, &model_dir) {
            (Some(path), _, _) => (Tok::load(path)?, path.display().to_string()),
            (None, Some(vocab), _) => {
                tracing::info!(vocab, "training a byte-level BPE tokenizer on the training data");
                let tok = Tok::train(train_examples.iter().flat_map(Example::texts), vocab)?;
                if tok.vocab_size() < vocab {
                    tracing::warn!(
                        asked = vocab,
                        learned = tok.vocab_size(),
                        "the training texts support fewer BPE merges than asked"
                    );
                }
                (tok, "trained on data.path".to_string())
            }
            (None, None, Some(dir)) => {
                let path = dir.join(hf::TOKENIZER_FILE);
                (Tok::load(&path)?, path.display().to_string())
            }
            (None, None, None) => unreachable!("validated: a new model names its tokenizer"),
        };
        let (vocab_size, context) = match &model_dir {
            Some(dir) => {
                let config = hf::read_config(dir)?;
                (config.vocab_size, config.n_positions)
            }
            None => (tok.vocab_size(), spec.model.context.expect("validated: a new model has a context")),
        };
        if tok.vocab_size() > vocab_size {
            return Err(bad_input(format!(
                "the tokenizer ({tok_origin}) has {} tokens but the model's vocabulary has {vocab_size}{}: use the tokenizer the model was trained with",
                tok.vocab_size(),
                model_dir.as_ref().map(|d| format!(" ({})", d.display())).unwrap_or_default()
            )));
        }
        let max_length = spec.train.max_length.unwrap_or(context);
        if max_length > context {
            return Err(bad_input(format!(
                "train.max_length = {max_length} is longer than the model's context of {context} positions"
            )));
        }
        let entry = cache_entry(spec, &tok, max_length)?;
        let tokenized = match cache::load(&entry) {
            Some(cached) => {
                tracing::info!(path = %entry.display(), "reusing the tokenized data from the cache");
                cached
            }
            None => {
                let (train, report) =
                    tokenize(&train_examples, &tok, &spec.data, max_length, spec.train.loss_on, &spec.data.path)?;
                let (val, _) = tokenize(&val_examples, &tok, &spec.data, max_length, spec.train.loss_on, &val_origin)?;
                let tokenized = cache::Tokenized { train, val, report };
                match cache::store(&entry, &tokenized) {
                    Ok(()) => tracing::info!(path = %entry.display(), "tokenized the data and cached it"),
                    Err(e) => tracing::warn!("could not cache the tokenized data: {e:#}"),
                }
                tokenized
            }
        };
        if tokenized.train.is_empty() {
            return Err(bad_input(format!(
                "{}: no training sequences are left after tokenizing",
                spec.data.path.display()
            )));
        }
        Ok(Self { tok, train: tokenized.train, val: tokenized.val, report: tokenized.report, model_dir })
    }
}

/// The cache entry for a spec's data: the dataset files' bytes, the tokenizer, and every
/// setting that changes the tokenized result (paths themselves do not).
fn cache_entry(spec: &Spec, tok: &Tok, max_length: usize) -> Result<PathBuf> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| bad_input(format!("{}: cannot read: {e}", p.display())));
    let train = read(&spec.data.path)?;
    let val = spec.data.val_path.as_deref().map(read).transpose()?.unwrap_or_default();
    let tokenizer = tok.inner.to_string(false).map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
    let mut data = spec.data.clone();
    data.path = PathBuf::new();
    data.val_path = None;
    let settings = format!(
        "{}\nseed={} max_length={max_length} loss_on={:?} version={}",
        toml::to_string(&data)?,
        spec.run.seed,
        spec.train.loss_on,
        env!("CARGO_PKG_VERSION")
    );
    Ok(cache::entry_path(&spec.run.runs_dir, &[&train, &val, tokenizer.as_bytes(), settings.as_bytes()]))
}

fn log_data(report: &TokenizeReport, val: usize, config: &Gpt2Config) {
    tracing::info!(
        train_examples = report.examples,
        train_sequences = report.sequences,
        val_sequences = val,
        train_tokens = report.tokens,
        trained_tokens = report.trained_tokens,
        truncated = report.truncated,
        dropped = report.dropped,
        "data"
    );
    tracing::info!(
        layers = config.n_layer,
        heads = config.n_head,
        embd = config.n_embd,
        context = config.n_positions,
        vocab = config.vocab_size,
        params = config.num_params(),
        "model"
    );
}

/// The HF directory a spec's model comes from, if it names one.
fn model_dir(model: &ModelSpec) -> Result<Option<PathBuf>> {
    match (&model.path, &model.hub) {
        (Some(path), _) => {
            if !path.join(hf::CONFIG_FILE).is_file() {
                return Err(bad_input(format!("model.path {}: no {} there", path.display(), hf::CONFIG_FILE)));
            }
            Ok(Some(path.clone()))
        }
        (None, Some(id)) => hf::resolve_hub_model(id).map(Some),
        (None, None) => Ok(None),
    }
}

/// Hold out `fraction` of the examples for validation, chosen by a seeded shuffle (at least
/// one when the fraction is positive and there are two or more examples).
fn split(mut examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    if fraction <= 0.0 || examples.len() < 2 {
        return (examples, Vec::new());
    }
    let n_val = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let val_set: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let mut val = Vec::with_capacity(n_val);
    let mut i = 0;
    examples.retain(|e| {
        let held_out = val_set.contains(&i);
        if held_out {
            val.push(e.clone());
        }
        i += 1;
        !held_out
    });
    (examples, val)
}

/// The stages, in the spec's order, in an existing run folder.
fn execute<B: TrainBackend>(
    spec: &Spec,
    inputs: Inputs<B>,
    run: &RunDir,
    device: &B::Device,
    resume_from: Option<&Path>,
    interrupt: &AtomicBool,
) -> Result<()> {
    let Inputs { data: PreparedData { tok, train, val, .. }, config, mut model } = inputs;
    let pad_id = tok.eos_id;
    let mut steps_trained = 0;
    for stage in &spec.run.stages {
        match stage {
            Stage::Train => {
                let ctx =
                    TrainContext { train: &train, val: &val, spec, config: &config, tok: &tok, run, device, interrupt };
                let (trained, summary) = train::train(&ctx, model, resume_from)?;
                model = trained;
                steps_trained = summary.steps;
                save_final(&model.valid(), &config, &tok, run)?;
                tracing::info!(
                    steps = summary.steps,
                    first_loss = summary.first_loss,
                    last_loss = summary.last_loss,
                    "training done"
                );
            }
            Stage::Eval => {
                if val.is_empty() {
                    tracing::warn!("eval stage: no validation examples (data.val_fraction = 0 and no data.val_path)");
                    continue;
                }
                let (val_loss, tokens) = evaluate(&model.valid(), &val, spec.train.batch_size, pad_id, device);
                let record = json!({"eval": "final", "step": steps_trained, "val_loss": val_loss, "val_ppl": val_loss.exp(), "val_tokens": tokens, "val_examples": val.len()});
                run.log_metrics(&record)?;
                run_dir::write_atomic(&run.file("eval.json"), serde_json::to_string_pretty(&record)?.as_bytes())?;
                tracing::info!(val_loss = format!("{val_loss:.4}"), val_ppl = format!("{:.2}", val_loss.exp()), "eval");
            }
            Stage::Generate => generate_samples(&model.valid(), &tok, spec, run, device)?,
        }
    }
    Ok(())
}

/// Save the model as a HF GPT-2 directory `final/`, written beside and renamed into place.
fn save_final<B: Backend>(model: &Gpt2<B>, config: &Gpt2Config, tok: &Tok, run: &RunDir) -> Result<()> {
    let final_dir = run.file(run_dir::FINAL_DIR);
    let staging = run.file(".final.partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    hf::save(model, config, Some(tok.eos_id as usize), &staging)?;
    tok.save(&staging.join(hf::TOKENIZER_FILE))?;
    if final_dir.exists() {
        // A resumed run that had finished training saves the same weights again.
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&staging, &final_dir)
        .with_context(|| format!("cannot move the checkpoint into {}", final_dir.display()))?;
    tracing::info!(path = %final_dir.display(), "saved the final model");
    Ok(())
}

fn generate_samples<B: FusedOps>(
    model: &Gpt2<B>,
    tok: &Tok,
    spec: &Spec,
    run: &RunDir,
    device: &B::Device,
) -> Result<()> {
    let g = &spec.generate;
    let sampling = Sampling { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p };
    let mut generator = Generator::new(model, device, g.seed);
    let bar = indicatif::ProgressBar::new(g.prompts.len() as u64).with_prefix("generate");
    for prompt in &g.prompts {
        let text_in = apply_template(&prompt_layout(&spec.data), prompt);
        let ids = tok.encode(&text_in)?;
        let new = generator.generate(&ids, g.max_new_tokens, sampling, Some(tok.eos_id), |_| {});
        let ended = new.last() == Some(&tok.eos_id);
        let text = tok.decode(&new)?;
        run.log_sample(&json!({"prompt": prompt, "completion": text, "ids": new, "stopped_at_eos": ended}))?;
        bar.suspend(|| println!("--- sample\n{text_in}{text}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}
