//! A run's life: check the user's inputs, create (or reopen) the run folder, run the stages,
//! record how it ended. Everything that can be wrong with the user's input (tokenizer, data,
//! model) is checked before the run folder is created; once it exists, the folder's
//! `meta.json` always says how the run ended.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::backend::{self, BackendJob};
use crate::checkpoint::{self, Progress};
use crate::data::{PreparedData, TokenizeReport};
use crate::error::{bad_input, interrupted_by};
use crate::files;
use crate::inputs;
use crate::memory;
use crate::model::lora::{self, Adaptable, Adapters, BaseModel, LoraConfig, Target};
use crate::model::{family, CausalLm, FusedOps, Model, ModelConfig, TrainBackend};
use crate::run_dir::{self, Meta, RunDir, Status};
use crate::signals::{self, StopSignal};
use crate::spec::{BackendKind, FinalModel, LoadedSpec, LoraSpec, Spec};
use crate::stages::{self, StageContext};
use crate::train::ModelOptimizer;

/// Run the pipeline a spec describes; returns the run folder.
pub fn run(loaded: &LoadedSpec) -> Result<PathBuf> {
    let spec = &loaded.spec;
    let stop = StopSignal::register()?;
    let job = RunJob { loaded, resume: None, allow_changed_inputs: false, stop: &stop };
    backend::dispatch(spec.run.backend, &spec.run.device_indices(), job)
}

/// Train as node `distributed.rank` > 0 of a multi-node run: this node's peers take their
/// share of every step, and node 0 writes the run. With `resume` (node 0's run folder, which
/// this node must be able to read: a shared or copied folder), continue from its newest
/// checkpoint, as node 0 does.
pub fn run_node(loaded: &LoadedSpec, resume: Option<&Path>) -> Result<()> {
    let stop = StopSignal::register()?;
    let job = NodeJob { loaded, resume, stop: &stop };
    backend::dispatch(loaded.spec.run.backend, &loaded.spec.run.device_indices(), job)
}

struct NodeJob<'a> {
    loaded: &'a LoadedSpec,
    resume: Option<&'a Path>,
    stop: &'a StopSignal,
}

impl BackendJob for NodeJob<'_> {
    type Output = ();

    fn run<B: TrainBackend>(self, device: B::Device, _device_name: String) -> Result<()> {
        let spec = &self.loaded.spec;
        B::seed(&device, spec.run.seed);
        if let Some(run) = self.resume {
            let saved = crate::spec::load_with_env(&run.join(run_dir::SPEC_FILE), &[], &[], run)?;
            if serde_json::to_value(saved.spec.shared_by_nodes())? != serde_json::to_value(spec.shared_by_nodes())? {
                return Err(bad_input(format!(
                    "{} resolves differently from the spec {} was started with (beyond this node's rank, address and devices)",
                    self.loaded.path.display(),
                    run.display()
                )));
            }
        }
        let data = prepare_data(spec, self.resume)?;
        let (model, resume) = model_and_progress::<B>(spec, &data, self.resume, &device)?;
        check_plan(spec, &data, &model.config())?;
        let ctx = crate::train::TrainContext {
            spec,
            data: &data,
            train: &data.train,
            val: &data.val,
            stage: crate::train::TrainStage::Train,
            run: None,
            device: &device,
            stop: self.stop,
        };
        let resume = resume.as_ref().map(|(dir, progress)| (dir.as_path(), *progress));
        let objective = crate::objective::TokenLoss { pad_id: data.tok.eos_id };
        crate::train::train(&ctx, model, objective, resume)?;
        Ok(())
    }
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
/// as it is. With `spec` (`pipe run SPEC --resume RUN`), the spec must resolve exactly as the
/// run's own did. An input file whose contents changed since the run started is refused unless
/// `allow_changed_inputs`.
pub fn resume(run_path: &Path, spec: Option<&LoadedSpec>, allow_changed_inputs: bool) -> Result<Resumed> {
    let run = RunDir::open_for_writing(run_path)?;
    if let Some(given) = spec {
        let saved = std::fs::read_to_string(run.file(run_dir::SPEC_FILE)).unwrap_or_default();
        if given.to_toml() != saved {
            return Err(bad_input(format!(
                "{} resolves differently from the spec {} was started with; continue it as it was with: pipe resume {}",
                given.path.display(),
                run.path.display(),
                run.path.display()
            )));
        }
    }
    if run.meta.status == Status::Completed {
        return Ok(Resumed::AlreadyCompleted(run.path));
    }
    let loaded = crate::spec::load_with_env(&run.file(run_dir::SPEC_FILE), &[], &[], &run.path)?;
    let stop = StopSignal::register()?;
    let job = RunJob { loaded: &loaded, resume: Some(run), allow_changed_inputs, stop: &stop };
    backend::dispatch(loaded.spec.run.backend, &loaded.spec.run.device_indices(), job).map(Resumed::Completed)
}

struct RunJob<'a> {
    loaded: &'a LoadedSpec,
    /// The run folder to continue, for `pipe resume`.
    resume: Option<RunDir>,
    allow_changed_inputs: bool,
    stop: &'a StopSignal,
}

impl BackendJob for RunJob<'_> {
    type Output = PathBuf;

    fn run<B: TrainBackend>(self, device: B::Device, device_name: String) -> Result<PathBuf> {
        let spec = &self.loaded.spec;
        B::seed(&device, spec.run.seed);
        let (mut run, data, model, resume) = match self.resume {
            None => {
                let data = prepare_data(spec, None)?;
                let inputs = inputs::of(spec, data.model_dir.as_deref())?;
                let (model, _) = model_and_progress::<B>(spec, &data, None, &device)?;
                check_plan(spec, &data, &model.config())?;
                self.stop.check("before the run started")?;
                let meta = Meta {
                    pipe_version: env!("CARGO_PKG_VERSION").to_string(),
                    name: spec.run.name.clone(),
                    run_id: String::new(),
                    spec_file: self.loaded.path.clone(),
                    backend: spec.run.backend.name().to_string(),
                    device: device_name,
                    seed: spec.run.seed,
                    started: run_dir::now(),
                    ended: None,
                    status: Status::Running,
                    error: None,
                    resumed: Vec::new(),
                    inputs,
                    training: None,
                };
                let mut run = RunDir::create(&spec.run.runs_dir, meta)?;
                if let Err(error) = write_run_files(&run, self.loaded, &data) {
                    return Err(failed(&mut run, error));
                }
                (run, data, model, None)
            }
            Some(mut run) => {
                let data = prepare_data(spec, Some(&run.path))?;
                run.meta.inputs = check_inputs(&run, spec, &data, self.allow_changed_inputs)?;
                let (model, resume) = model_and_progress::<B>(spec, &data, Some(&run.path), &device)?;
                check_plan(spec, &data, &model.config())?;
                let step = resume.as_ref().map_or(0, |(_, progress): &(PathBuf, Progress)| progress.step);
                if let Err(error) = run.restart(step) {
                    return Err(failed(&mut run, error));
                }
                tracing::info!(from_step = step, "resuming the run from its latest checkpoint");
                (run, data, model, resume)
            }
        };
        log_data(&data.report, data.val.len(), &model.config());
        if let Some(adapters) = model.adapters() {
            let c = &adapters.config;
            let targets: Vec<&str> = c.targets.iter().map(|t| t.peft_name()).collect();
            tracing::info!(
                rank = c.rank,
                alpha = c.alpha,
                ?targets,
                trainable = model.num_params(),
                "LoRA adapters on a frozen base"
            );
        }
        tracing::info!(run = %run.path.display(), "run folder");
        let ctx = StageContext { spec, data: &data, run: &run, device: &device, stop: self.stop, resume };
        match stages::run_all(&ctx, model) {
            Ok(training) => {
                run.meta.training = training.or(run.meta.training);
                run.finish(Status::Completed, None)?;
                Ok(run.path)
            }
            Err(error) if interrupted_by(&error).is_some() => {
                if let Err(unrecorded) = run.finish(Status::Interrupted, Some(format!("{error:#}"))) {
                    tracing::warn!("the run's status could not be recorded: {unrecorded:#}");
                }
                let by = signals::name(interrupted_by(&error).unwrap_or_default());
                let how = format!("continue it with: pipe resume {}", run.path.display());
                Err(error.context(format!("run {} stopped by {by}; {how}", run.path.display())))
            }
            Err(error) => Err(failed(&mut run, error)),
        }
    }
}

/// What a new run folder holds besides `meta.json`: the spec as resolved, the tokenizer and how
/// prompts are laid out.
fn write_run_files(run: &RunDir, loaded: &LoadedSpec, data: &PreparedData) -> Result<()> {
    files::write_atomic(&run.file(run_dir::SPEC_FILE), loaded.to_toml().as_bytes())?;
    run.log_spec(&toml::Value::try_from(&loaded.spec)?)?;
    data.tok.save(&run.file(run_dir::TOKENIZER_FILE))?;
    let layout = serde_json::to_string_pretty(&data.layout)?;
    files::write_atomic(&run.file(run_dir::PROMPT_LAYOUT_FILE), layout.as_bytes())
}

/// A run that failed once its folder was written to: the folder says `failed`, with the error.
/// The error is no longer one of input (exit 2 means nothing was written): the run had started,
/// so the process exits 1, whatever the cause.
fn failed(run: &mut RunDir, error: anyhow::Error) -> anyhow::Error {
    let message = format!("{error:#}");
    let failed = format!("run {} failed: {message}", run.path.display());
    match run.finish(Status::Failed, Some(message)) {
        Ok(()) => anyhow::anyhow!(failed),
        Err(unrecorded) => anyhow::anyhow!("{failed} (and the status could not be recorded: {unrecorded:#})"),
    }
}

/// The inputs as they are now, refused (unless `allow_changed`) when one differs from what the
/// run started with.
fn check_inputs(run: &RunDir, spec: &Spec, data: &PreparedData, allow_changed: bool) -> Result<inputs::Inputs> {
    let now = inputs::of(spec, data.model_dir.as_deref())?;
    let changes = inputs::changes(&run.meta.inputs, &now);
    if changes.is_empty() {
        return Ok(now);
    }
    if !allow_changed {
        return Err(bad_input(format!(
            "{} cannot continue on changed inputs:\n  {}\nrestore them, or continue on them as they are now with: pipe resume {} --allow-changed-inputs",
            run.path.display(),
            changes.join("\n  "),
            run.path.display()
        )));
    }
    for change in &changes {
        tracing::warn!("{change}; continuing as --allow-changed-inputs asks");
    }
    if changes.iter().any(|c| c.starts_with("tokenizer")) {
        tracing::warn!("the run keeps the tokenizer it started with ({})", run.file(run_dir::TOKENIZER_FILE).display());
    }
    Ok(now)
}

/// The newest checkpoint of a run whose model, trainer state and optimizer state all read, with
/// where training stood; a damaged newer one is passed over with a warning. None when the run
/// has no checkpoint; an error when it has some and none reads.
fn latest_readable<B: TrainBackend>(
    run: &Path,
    spec: &Spec,
    device: &B::Device,
) -> Result<Option<(Model<B>, PathBuf, Progress)>> {
    let mut newest_error = None;
    for dir in checkpoint::list(run).into_iter().rev() {
        // The optimizer state is read here only to know it reads; training reads it again.
        let readable = checkpoint::load::<B, Model<B>>(&dir, spec.model.dropout, device).and_then(|loaded| {
            ModelOptimizer::<B, Model<B>>::new(&spec.optimizer).restore(&dir, &loaded.0, device)?;
            Ok(loaded)
        });
        match readable {
            Ok((model, progress)) => return Ok(Some((model, dir, progress))),
            Err(error) => {
                tracing::warn!("checkpoint {} cannot be read ({error:#}); trying the one before it", dir.display());
                newest_error.get_or_insert(error);
            }
        }
    }
    match newest_error {
        None => Ok(None),
        Some(error) => Err(error.context(format!(
            "no checkpoint of {} can be read; remove {} to start the run over",
            run.display(),
            run.join(checkpoint::CHECKPOINTS_DIR).display()
        ))),
    }
}

/// A checkpoint training continues from, and where training stood then.
type ResumePoint = (PathBuf, Progress);

/// A run's data, as every node prepares it: from the spec, or for a run resumed from folder
/// `from`, with the run's own tokenizer (not a retrained one).
fn prepare_data(spec: &Spec, from: Option<&Path>) -> Result<PreparedData> {
    PreparedData::prepare(spec, from.map(|run| run.join(run_dir::TOKENIZER_FILE)).as_deref())
}

/// The model training starts from, read once, and where training resumes: for a run resumed
/// from folder `from`, its newest readable checkpoint; else (or when it has none) the model as
/// the run started.
fn model_and_progress<B: TrainBackend>(
    spec: &Spec,
    data: &PreparedData,
    from: Option<&Path>,
    device: &B::Device,
) -> Result<(Model<B>, Option<ResumePoint>)> {
    let latest = match from {
        Some(run) => latest_readable::<B>(run, spec, device)?,
        None => None,
    };
    Ok(match latest {
        Some((model, dir, progress)) => (model.with_precision(spec.run.precision), Some((dir, progress))),
        None => (initial_model::<B>(spec, data, device)?, None),
    })
}

/// The model a run starts from: the spec's HF checkpoint, or a new one of its architecture.
fn initial_model<B: FusedOps>(spec: &Spec, data: &PreparedData, device: &B::Device) -> Result<Model<B>> {
    let model = match &data.model_dir {
        Some(dir) => {
            let config = family::read_config(dir)?;
            family::check_sizes(&config, dir)?;
            let arch = format!(
                "{}: a {} of {} layers, width {}, context {}",
                dir.join(crate::model::hf::CONFIG_FILE).display(),
                config.family(),
                config.layers(),
                config.width(),
                config.context()
            );
            // On a GPU the loaded weights take their share of the free memory.
            let loaded = match spec.run.backend {
                BackendKind::Cpu => 0.0,
                _ => 4.0 * config.num_params() as f64,
            };
            check_fits_in_memory(&config, &arch, spec, data, loaded)?;
            family::load::<B>(dir, spec.model.dropout, device)?
        }
        None => {
            let m = &spec.model;
            let config = m.new_model_config(data.tok.vocab_size()).expect("validated: a new model has its sizes");
            let arch = format!(
                "model.layers = {}, model.embd = {}, model.context = {}",
                config.layers(),
                config.width(),
                config.context()
            );
            check_fits_in_memory(&config, &arch, spec, data, 0.0)?;
            let model = config.init::<B>(device);
            crate::model::params::materialize(&model);
            model
        }
    };
    let model = match (&spec.lora, &data.model_dir) {
        (Some(lora), Some(base_dir)) => with_adapters(model, lora, spec, base_dir, device)?,
        _ => model,
    };
    Ok(model.with_precision(spec.run.precision))
}

/// The base model with the spec's adapters: fresh ones, or those of `lora.from` (whose
/// settings must be the spec's).
fn with_adapters<B: FusedOps>(
    model: Model<B>,
    spec_lora: &LoraSpec,
    spec: &Spec,
    base_dir: &Path,
    device: &B::Device,
) -> Result<Model<B>> {
    match model {
        Model::Gpt2(m) => Ok(Model::Gpt2(adapted(m, spec_lora, spec, base_dir, device)?)),
        Model::Llama(m) => Ok(Model::Llama(adapted(m, spec_lora, spec, base_dir, device)?)),
    }
}

/// A model of any family with the spec's adapters (see `with_adapters`).
fn adapted<B: FusedOps, M: Adaptable<B>>(
    model: M,
    spec_lora: &LoraSpec,
    spec: &Spec,
    base_dir: &Path,
    device: &B::Device,
) -> Result<M> {
    let width = model.width();
    if spec_lora.rank > width {
        return Err(bad_input(format!(
            "lora.rank = {}: above the model's width ({width}); a rank that large adapts nothing a full update would not",
            spec_lora.rank
        )));
    }
    let family = model.family();
    let targets =
        Target::parse_list(&spec_lora.targets, family).map_err(|why| bad_input(format!("lora.targets: {why}")))?;
    let config = LoraConfig {
        rank: spec_lora.rank,
        alpha: spec_lora.alpha,
        dropout: spec_lora.dropout,
        targets,
        rslora: spec_lora.rslora,
    };
    let name = spec.model.hub.clone().unwrap_or_else(|| base_dir.display().to_string());
    let adapters = Adapters { config, base: BaseModel::of(name, base_dir)? };
    let Some(from) = &spec_lora.from else { return lora::attach(model, adapters, device) };
    let (found, _) = lora::read_peft_config(from, family)?;
    let file = from.join(lora::ADAPTER_CONFIG_FILE);
    let wanted = &adapters.config;
    let disagreements = [
        ("lora.rank", wanted.rank.to_string(), "r", found.rank.to_string()),
        ("lora.alpha", wanted.alpha.to_string(), "lora_alpha", found.alpha.to_string()),
        ("lora.targets", format!("{:?}", wanted.targets), "target_modules", format!("{:?}", found.targets)),
        ("lora.rslora", wanted.rslora.to_string(), "use_rslora", found.rslora.to_string()),
    ];
    if let Some((field, ours, key, theirs)) = disagreements.into_iter().find(|(_, ours, _, theirs)| ours != theirs) {
        return Err(bad_input(format!(
            "{field} = {ours}, but the adapter to continue, {}, has `{key}` = {theirs}; make them agree",
            file.display()
        )));
    }
    lora::with_peft_adapter(model, from, adapters)
}

/// A run too large to train in the memory of its devices is refused before anything is
/// allocated (see `memory`): each device holds one local peer's largest micro-batch (on the CPU
/// the local peers share the machine's memory), the training stage's and the dpo stage's
/// alike. `loaded`: bytes of the weights already on the device, which its free memory no
/// longer counts.
fn check_fits_in_memory(config: &ModelConfig, arch: &str, spec: &Spec, data: &PreparedData, loaded: f64) -> Result<()> {
    // The micro-batch holding the longest example is padded to it.
    let train = &data.train;
    let longest = (0..train.len()).map(|i| train.token_len(i)).max().unwrap_or(0);
    let what = format!("{arch}, train.batch_size = {}", spec.train.batch_size);
    let lower = "lower train.batch_size (train.grad_accum keeps the step's size) or train.max_length";
    check_micro_batches(config, spec, longest, spec.train.batch_size.min(train.len()), &what, lower, loaded)?;
    if let Some(preference) = &data.preference {
        // A dpo micro-batch: its pairs' rows (`dpo::pair_row_len`), packed into rows that hold no
        // more positions or attention than a row each as long as the longest (`dpo::row_length`).
        let longest = preference.train.iter().map(crate::dpo::pair_row_len).max().unwrap_or(0);
        let batch = spec.for_dpo().train.batch_size;
        let what = format!("{arch}, the dpo stage's batch of {batch} pairs (dpo.batch_size or train.batch_size)");
        let lower = "lower dpo.batch_size (dpo.grad_accum keeps the step's size) or dpo.max_length";
        check_micro_batches(config, spec, longest, batch.min(preference.train.len()), &what, lower, loaded)?;
    }
    Ok(())
}

/// `check_fits_in_memory` for micro-batches of `rows` rows of up to `longest` tokens.
fn check_micro_batches(
    config: &ModelConfig,
    spec: &Spec,
    longest: usize,
    rows: usize,
    what: &str,
    lower: &str,
    loaded: f64,
) -> Result<()> {
    let (longest, micro_batch) = (longest as f64, (longest * rows) as f64);
    let backend = spec.run.backend;
    let devices = if spec.run.devices.is_empty() { vec![spec.run.device] } else { spec.run.devices.clone() };
    let (tokens, devices) = match backend {
        BackendKind::Cpu => (micro_batch * devices.len() as f64, vec![0]),
        _ => (micro_batch, devices),
    };
    let keeps = memory::AttentionKeeps::of(backend, config);
    let mut footprint =
        memory::Footprint::training(config, spec.lora.is_some(), spec.run.precision, tokens, longest, keeps);
    footprint.weights -= loaded;
    for device in devices {
        if let Some(room) = memory::Room::of(backend, device) {
            footprint.check(&room, what, lower)?;
        }
    }
    Ok(())
}

/// What would otherwise fail only once its stage came, checked before the run folder is
/// created or touched: the step count, validation examples where selection needs them, and the
/// generate stage's prompts.
fn check_plan(spec: &Spec, data: &PreparedData, config: &ModelConfig) -> Result<()> {
    let plan =
        crate::train::StepPlan::new(data.train.len(), &spec.train, crate::distributed::Topology::of(spec).world())?;
    let warmup = spec.optimizer.warmup_steps;
    if warmup >= plan.total_steps && spec.run.stages.contains(&crate::spec::Stage::Train) {
        tracing::warn!(
            warmup_steps = warmup,
            total_steps = plan.total_steps,
            "optimizer.warmup_steps is not shorter than the run: the learning rate never reaches optimizer.lr"
        );
    }
    crate::distributed::Topology::of(spec).check_ports()?;
    let t = &spec.train;
    let needs_validation = t.final_model == FinalModel::Best || t.early_stopping_patience > 0;
    if needs_validation && data.val.is_empty() {
        return Err(bad_input(
            "train.final = \"best\" and early stopping need validation examples, and none are left after tokenizing",
        ));
    }
    stages::check_prompts(spec, &data.tok, &data.layout, config.context())
}

fn log_data(report: &TokenizeReport, val: usize, config: &ModelConfig) {
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
        family = config.family(),
        layers = config.layers(),
        heads = config.heads(),
        embd = config.width(),
        context = config.context(),
        vocab = config.vocab_size(),
        params = config.num_params(),
        "model"
    );
}
