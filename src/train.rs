//! The training loop, top to bottom: shuffle, batch, loss, backward, accumulate, clip, step,
//! schedule, log, evaluate.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{ElementConversion, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::adam::{check_state, FusedAdam, ModelState};
use crate::checkpoint::{self, Progress};
use crate::data::{Examples, PreparedData, Tok};
use crate::distributed::{Peer, Peers, Topology};
use crate::error::{bad_input, Interrupted};
use crate::json_float::Float;
use crate::model::{params, CausalLm, FusedOps, Model, TrainBackend, TrainableLm};
use crate::objective::{Objective, TokenLoss, TrainingSet};
use crate::response_metrics::{answer_all, ResponseScores};
use crate::run_dir::{EpochRecord, MetricRecord, RunDir, StepRecord};
use crate::selection::{Scored, Selection};
use crate::signals::{self, StopSignal};
use crate::spec::{OptimizerSpec, Schedule, SelectMetric, Spec, TrainSpec};

/// What a finished training stage reports.
#[derive(Debug, Clone, Copy)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    /// The best model so far and whether early stopping ended training.
    pub selection: Selection,
}

/// Adam or AdamW over the model, as the spec names it, with burn keeping each parameter's state.
pub struct ModelOptimizer<B: TrainBackend, M: TrainableLm<B>>(OptimizerAdaptor<FusedAdam, M, B>);

impl<B: TrainBackend, M: TrainableLm<B>> ModelOptimizer<B, M> {
    pub fn new(opt: &OptimizerSpec) -> Self {
        Self(FusedAdam::new(opt).init())
    }

    fn step(&mut self, lr: f64, model: M, grads: GradientsParams) -> M {
        self.0.step(lr, model, grads)
    }

    fn save(&self, at: CheckpointAt<'_, M>) -> Result<PathBuf> {
        let CheckpointAt { run, model, tok, progress, keep } = at;
        checkpoint::save(run, model, tok, self.0.to_record(), progress, keep)
    }

    /// The optimizer state saved in checkpoint `dir` for `model`: one that does not fit the
    /// model's parameters is refused here, not found out in the middle of a step.
    pub fn restore(self, dir: &Path, model: &M, device: &B::Device) -> Result<Self> {
        let state: ModelState<B, M> = checkpoint::load_optimizer(dir, device)?;
        check_state::<B, M>(&state, &params::shapes(model))
            .map_err(|why| anyhow::anyhow!("{}: the optimizer state does not fit the model: {why}", dir.display()))?;
        Ok(Self(self.0.load_record(state)))
    }
}

/// What a checkpoint is taken of.
struct CheckpointAt<'a, M> {
    run: &'a Path,
    model: &'a M,
    tok: &'a Tok,
    progress: Progress,
    keep: usize,
}

/// What one optimizer step saw.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// Mean loss over the step's trained tokens, before the update.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real input tokens processed.
    pub tokens: usize,
    /// Input positions processed, padding included.
    pub positions: usize,
    /// Tokens the loss was computed on.
    pub loss_tokens: usize,
    /// Seconds in the step's all-reduce (data-parallel runs).
    pub allreduce_s: Option<f64>,
    /// The objective's figures, as means over the step's loss units.
    pub figures: Vec<f64>,
}

/// The optimizer, the objective and how to step them: one `step` is one update of the model
/// over a set of micro-batches.
pub struct Trainer<B: TrainBackend, M: TrainableLm<B> = Model<B>, O: Objective<B, M> = TokenLoss> {
    optim: ModelOptimizer<B, M>,
    objective: O,
    grad_clip: f64,
    device: B::Device,
    /// This trainer's place among data-parallel peers; None for one device.
    peer: Option<Peer>,
}

/// A data-parallel peer's part of one optimizer step.
pub struct StepShare {
    /// Loss tokens of the whole step, all peers together: the loss is normalised by them.
    pub loss_tokens: usize,
    /// Seeds the dropout masks (per micro-batch and peer), so a resumed run draws the same;
    /// None leaves the backend's generator as it is.
    pub dropout_seed: Option<u64>,
    /// This peer was asked to stop (a signal).
    pub stop: Option<i32>,
}

impl<B: TrainBackend, M: TrainableLm<B>> Trainer<B, M, TokenLoss> {
    /// A trainer for supervised fine-tuning's token loss, padding batches with `pad_id`.
    pub fn new(opt: &OptimizerSpec, pad_id: u32, device: &B::Device) -> Self {
        Self::with_objective(opt, TokenLoss { pad_id }, device)
    }
}

impl<B: TrainBackend, M: TrainableLm<B>, O: Objective<B, M>> Trainer<B, M, O> {
    pub fn with_objective(opt: &OptimizerSpec, objective: O, device: &B::Device) -> Self {
        Self {
            optim: ModelOptimizer::new(opt),
            objective,
            grad_clip: opt.grad_clip,
            device: device.clone(),
            peer: None,
        }
    }

    /// Forward and backward over each micro-batch, accumulating gradients, then clip and
    /// update. The loss is normalised by the loss tokens of the whole step, so neither loss
    /// nor gradient depends on how the step is split into micro-batches.
    pub fn step(&mut self, model: M, micro_batches: &[Vec<&O::Example>], lr: f64) -> Result<(M, StepStats)> {
        let loss_tokens: usize = micro_batches.iter().flatten().map(|e| self.objective.loss_tokens(e)).sum();
        let share = StepShare { loss_tokens, dropout_seed: None, stop: None };
        self.step_share(model, micro_batches, share, lr).map(|(model, stats, _)| (model, stats))
    }

    /// `step` for one peer of a data-parallel run (or the only one): its micro-batches, the
    /// whole step's loss tokens, and one all-reduce summing gradients, loss and counts over
    /// the peers before clipping and the update, so every peer updates alike. Also returns
    /// the stop signal any peer was asked to stop by.
    fn step_share(
        &mut self,
        model: M,
        micro_batches: &[Vec<&O::Example>],
        share: StepShare,
        lr: f64,
    ) -> Result<(M, StepStats, Option<i32>)> {
        let StepShare { loss_tokens, dropout_seed, mut stop } = share;
        let rank = self.peer.as_ref().map_or(0, |p| p.rank);
        let mut accumulator = GradientsAccumulator::<M>::new();
        let (mut loss, mut tokens, mut positions) = (0.0f64, 0usize, 0usize);
        let mut figures = vec![0.0; self.objective.figure_names().len()];
        for (i, micro) in micro_batches.iter().enumerate() {
            let done = {
                let _turn = self.peer.as_ref().map(Peer::forward_turn);
                if let Some(seed) = dropout_seed {
                    B::seed(&self.device, dropout_draws(seed, rank, i));
                }
                self.objective.loss_sum(&model, micro, &self.device)
            };
            tokens += done.counts.tokens;
            positions += done.counts.positions;
            figures.iter_mut().zip(&done.figures).for_each(|(sum, f)| *sum += f);
            let micro_loss = done.loss.div_scalar(loss_tokens as f64);
            loss += micro_loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(micro_loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        let mut grads = accumulator.grads();
        let mut allreduce_s = None;
        if let Some(peer) = &mut self.peer {
            let started = Instant::now();
            let mut extras = vec![loss, tokens as f64, positions as f64, stop.unwrap_or(0) as f64];
            extras.extend(&figures);
            let summed;
            (grads, summed) =
                peer.sum_gradients(&model, grads, &extras, "summing the step's gradients", &self.device)?;
            (loss, tokens, positions) = (summed[0], summed[1] as usize, summed[2] as usize);
            figures = summed[4..].to_vec();
            // Any peer's signal stops them all after this step (its number, or SIGTERM's if several).
            stop = (summed[3] > 0.0).then(|| stop.unwrap_or(if summed[3] <= 64.0 { summed[3] as i32 } else { 15 }));
            allreduce_s = Some(started.elapsed().as_secs_f64());
        }
        let loss = measured("loss", loss);
        if !loss.is_finite() {
            bail!("the training loss became {loss}; {NON_FINITE}");
        }
        let grad_norm = measured("grad_norm", clip_global_norm(&model, &mut grads, self.grad_clip));
        if !grad_norm.is_finite() {
            bail!("the gradient norm became {grad_norm} (the loss was {loss:.4}); {NON_FINITE}");
        }
        let model = self.optim.step(lr, model, grads);
        figures.iter_mut().for_each(|f| *f /= loss_tokens.max(1) as f64);
        Ok((model, StepStats { loss, grad_norm, tokens, positions, loss_tokens, allreduce_s, figures }, stop))
    }
}

/// What a non-finite loss or gradient means for the run: it stops there, before the update, as
/// a failed run (docs/runs.md says why it does not skip the step).
const NON_FINITE: &str = "the run stops before updating the model (its checkpoints so far are kept); \
     lower optimizer.lr or set optimizer.grad_clip";

/// `value` as the installed hooks have it (as measured, unless a test build spoils it).
fn measured(quantity: &str, value: f64) -> f64 {
    crate::hooks::installed().map_or(value, |hooks| hooks.measured(quantity, value))
}

/// The seed of micro-batch `micro`'s dropout masks on peer `rank`, in a step seeded `step_seed`.
fn dropout_draws(step_seed: u64, rank: usize, micro: usize) -> u64 {
    step_seed.wrapping_add(((rank as u64) << 32 | micro as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// How a run's examples divide into optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    pub examples_per_step: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

impl StepPlan {
    /// The plan for `examples` training examples on `peers` data-parallel peers; sizes whose
    /// product does not fit are an error naming the field (a wrapped count would train a
    /// different schedule).
    pub fn new(examples: usize, train: &TrainSpec, peers: usize) -> Result<Self> {
        let examples_per_step = train
            .batch_size
            .checked_mul(train.grad_accum)
            .and_then(|n| n.checked_mul(peers))
            .ok_or_else(|| bad_input("train.batch_size × train.grad_accum × peers is too large"))?;
        let steps_per_epoch = examples.div_ceil(examples_per_step);
        let total_steps = steps_per_epoch.checked_mul(train.epochs).ok_or_else(|| {
            bad_input(format!(
                "train.epochs = {}: {steps_per_epoch} steps per epoch for that many epochs is more steps than can be counted",
                train.epochs
            ))
        })?;
        Ok(Self { examples_per_step, steps_per_epoch, total_steps })
    }
}

/// Which training stage the loop runs: where its checkpoints go and how its records are marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainStage {
    /// Supervised fine-tuning: checkpoints under the run folder, records unmarked.
    Train,
    /// Preference tuning: checkpoints under `<run>/dpo/`, records marked `"stage": "dpo"`.
    Dpo,
}

impl TrainStage {
    /// The folder this stage's checkpoints (and best model) are kept under.
    pub fn folder(self, run: &Path) -> PathBuf {
        match self {
            TrainStage::Train => run.to_path_buf(),
            TrainStage::Dpo => run.join("dpo"),
        }
    }

    /// How its records are marked.
    pub fn tag(self) -> Option<String> {
        match self {
            TrainStage::Train => None,
            TrainStage::Dpo => Some("dpo".into()),
        }
    }
}

/// Everything a training stage works with besides the model.
pub struct TrainContext<'a, B: TrainBackend, S: TrainingSet = Examples> {
    /// The spec, its `[train]` and `[optimizer]` as this stage trains with them.
    pub spec: &'a Spec,
    /// The tokenizer, and the SFT validation prompts and their layout (for the answers that
    /// select the best model).
    pub data: &'a PreparedData,
    pub train: &'a S,
    pub val: &'a [S::Example],
    pub stage: TrainStage,
    /// The run folder; None on the nodes of a multi-node run other than node 0.
    pub run: Option<&'a RunDir>,
    pub device: &'a B::Device,
    /// Set by a stop signal: finish the step, checkpoint, stop.
    pub stop: &'a StopSignal,
}

impl<B: TrainBackend, S: TrainingSet> Clone for TrainContext<'_, B, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: TrainBackend, S: TrainingSet> Copy for TrainContext<'_, B, S> {}

/// Train for the spec's epochs, evaluating on the validation set after each, checkpointing
/// every `train.checkpoint_every` steps and at the end. With `resume` (a checkpoint whose
/// weights `model` already holds, and where training stood), training continues exactly where
/// the interrupted run stood. With several peers (`run.devices`, `[distributed]`), this
/// process trains its peers on threads of their own and returns rank 0's model. `objective` is
/// what every step minimises and every validation measures.
pub fn train<B: TrainBackend, M: TrainableLm<B>, S: TrainingSet, O: LoopObjective<B, M, S::Example>>(
    ctx: &TrainContext<'_, B, S>,
    model: M,
    objective: O,
    resume: Option<(&Path, Progress)>,
) -> Result<(M, TrainSummary)> {
    let topology = Topology::of(ctx.spec);
    if topology.world() == 1 {
        return train_peer(ctx, model, objective, resume, None);
    }
    let peers = Arc::new(Peers::new(topology)?);
    // What every peer compares with the others: the same for all of this process's peers.
    let fingerprints = fingerprints(ctx, &model, resume);
    let mut ranks = peers.topology().local_ranks();
    let first = ranks.next().expect("at least one local peer");
    // The other local peers run on threads of their own, with their own copies of what they
    // read, so that one that hangs cannot keep this process from ending with the error.
    let (done, finished) = mpsc::channel();
    if !ranks.is_empty() {
        let shared = Arc::new(OwnedContext::<B, S>::of(ctx));
        for rank in ranks {
            let (peers, shared, done, fingerprints, objective) =
                (peers.clone(), shared.clone(), done.clone(), fingerprints.clone(), objective.clone());
            let device = peers.topology().device_of::<B>(rank, ctx.device);
            let model = model.clone().fork(&device);
            let resume = resume.map(|(dir, progress)| (dir.to_path_buf(), progress));
            std::thread::spawn(move || {
                let ctx = TrainContext { device: &device, ..shared.borrow() };
                let resume = resume.as_ref().map(|(dir, progress)| (dir.as_path(), *progress));
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    join_and_train(&peers, rank, &ctx, model, objective, resume, &fingerprints).map(|_| ())
                }))
                .unwrap_or_else(|panic| Err(anyhow!("panicked: {}", crate::error::panic_message(&panic))));
                if let Err(error) = &result {
                    if crate::error::interrupted_by(error).is_none() {
                        peers.fail(rank, error);
                    }
                }
                let _ = done.send((rank, result));
            });
        }
    }
    drop(done);
    let device = peers.topology().device_of::<B>(first, ctx.device);
    let mine = TrainContext { device: &device, ..*ctx };
    let (model, summary) = join_and_train(&peers, first, &mine, model.fork(&device), objective, resume, &fingerprints)?;
    // Every peer has passed the last all-reduce; a failure after it is still a failure.
    let deadline = Instant::now() + peers.topology().timeout;
    while let Ok((rank, result)) = finished.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        result.with_context(|| format!("peer rank {rank}"))?;
    }
    Ok((model.fork(ctx.device), summary))
}

/// Join the run as `rank`, check that every peer trains the same thing, and train.
fn join_and_train<B: TrainBackend, M: TrainableLm<B>, S: TrainingSet, O: LoopObjective<B, M, S::Example>>(
    peers: &Peers,
    rank: usize,
    ctx: &TrainContext<'_, B, S>,
    model: M,
    objective: O,
    resume: Option<(&Path, Progress)>,
    fingerprints: &[(&str, u64)],
) -> Result<(M, TrainSummary)> {
    let mut peer = peers.join::<B::InnerBackend>(rank, ctx.device)?;
    peer.agree::<B::InnerBackend>(fingerprints, peers.topology().address(), ctx.device)?;
    train_peer(ctx, model, objective, resume, Some(peer))
}

/// What a peer on a thread of its own reads, owned: the data and settings of a `TrainContext`
/// (no run folder: only the first peer of node 0 writes).
struct OwnedContext<B: TrainBackend, S: TrainingSet> {
    spec: Spec,
    data: PreparedData,
    train: S,
    val: Vec<S::Example>,
    stage: TrainStage,
    device: B::Device,
    stop: StopSignal,
}

impl<B: TrainBackend, S: TrainingSet> OwnedContext<B, S> {
    fn of(ctx: &TrainContext<'_, B, S>) -> Self {
        Self {
            spec: ctx.spec.clone(),
            data: ctx.data.clone(),
            train: ctx.train.clone(),
            val: ctx.val.to_vec(),
            stage: ctx.stage,
            device: ctx.device.clone(),
            stop: ctx.stop.clone(),
        }
    }

    fn borrow(&self) -> TrainContext<'_, B, S> {
        TrainContext {
            spec: &self.spec,
            data: &self.data,
            train: &self.train,
            val: &self.val,
            stage: self.stage,
            run: None,
            device: &self.device,
            stop: &self.stop,
        }
    }
}

/// What the peers of a run compare before training: the spec (less what differs by node),
/// the training data, the model's weights, and where training stands. Reading every weight
/// also initialises lazily created parameters, so that the peers' clones share them.
fn fingerprints<B: TrainBackend, M: TrainableLm<B>, S: TrainingSet>(
    ctx: &TrainContext<'_, B, S>,
    model: &M,
    resume: Option<(&Path, Progress)>,
) -> Vec<(&'static str, u64)> {
    use sha2::Digest;
    let digest = |bytes: &[u8]| u64::from_le_bytes(sha2::Sha256::digest(bytes)[..8].try_into().expect("8 bytes"));
    let spec = digest(serde_json::to_string(&ctx.spec.shared_by_nodes()).unwrap_or_default().as_bytes());
    let data = ctx.train.fingerprint();
    let weights = params::fingerprint(model);
    let step = resume.map_or(0, |(_, progress)| progress.step as u64);
    vec![("spec", spec), ("training data", data), ("model weights", weights), ("resume step", step)]
}

/// The training loop of one peer (or of the only device, with no `peer`), top to bottom:
/// each step is trained and logged; then, when due, validated (keeping the best model); then
/// training stops early, stops on a signal, or checkpoints and goes on.
fn train_peer<B: TrainBackend, M: TrainableLm<B>, S: TrainingSet, O: LoopObjective<B, M, S::Example>>(
    ctx: &TrainContext<'_, B, S>,
    mut model: M,
    objective: O,
    resume: Option<(&Path, Progress)>,
    peer: Option<Peer>,
) -> Result<(M, TrainSummary)> {
    let mut lp = PeerLoop::setup(ctx, &model, objective, resume, peer)?;
    let (start, train_spec) = (lp.start, &ctx.spec.train);
    if let Some(step) = start.selection.stopped_early_at {
        tracing::info!(step, "training had ended early; nothing left to train");
        return Ok((model, lp.summary));
    }
    let per_step = lp.plan.examples_per_step;
    'epochs: for epoch in start.epoch..=train_spec.epochs {
        let order = epoch_order(ctx.train, ctx.spec.run.seed, epoch, train_spec.group_by_length.then_some(per_step));
        // A position past the end is possible only when the data shrank under a resume.
        let skip = if epoch == start.epoch { start.position.min(order.len()) } else { 0 };
        let bar = match lp.writes() {
            true => progress_bar(lp.plan.steps_per_epoch as u64, &format!("epoch {epoch}/{}", train_spec.epochs)),
            false => ProgressBar::hidden(),
        };
        bar.set_position((skip / per_step) as u64);
        let mut epoch_loss = EpochLoss::default();
        for (i, step_examples) in order[skip..].chunks(per_step).enumerate() {
            let done;
            (model, done) = lp.step(model, step_examples, epoch)?;
            epoch_loss.add(&done.stats);
            let step = done.step;
            let position = (skip + (i + 1) * per_step).min(ctx.train.len());
            // Evaluations come before the step's checkpoint, so a checkpoint holds everything
            // logged up to its step (and where selection stood) and a resumed run neither
            // repeats nor loses one.
            let epoch_done = position == ctx.train.len();
            let validation = match lp.validation_due(step, epoch_done) {
                true => Some(lp.validate(&model, step, epoch)?),
                false => None,
            };
            if epoch_done && lp.writes() {
                epoch_loss.log(epoch, validation.as_ref());
            }
            let val = lp.latest_val.map(|v| format!("  val {v:.4}")).unwrap_or_default();
            bar.set_message(format!("loss {:.4}{val}  {:.0} tok/s", done.stats.loss, done.tokens_per_s));
            bar.inc(1);
            let progress = Progress { step, epoch, position, selection: lp.summary.selection };
            if validation.as_ref().is_some_and(|v| v.stop_early) {
                bar.finish_and_clear();
                lp.checkpoint(&model, progress)?;
                lp.log_early_stop(step);
                break 'epochs;
            }
            if let Some(signal) = done.stop {
                bar.finish_and_clear();
                return Err(lp.interrupted(&model, progress, signal)?);
            }
            if lp.checkpoint_due(step) {
                lp.checkpoint(&model, progress)?;
            }
        }
        bar.finish_and_clear();
    }
    lp.finish(model)
}

/// An objective the loop trains with, over examples `E`: it trains the model and measures
/// the model without gradients alike, and its peers share it.
pub trait LoopObjective<B: TrainBackend, M: TrainableLm<B>, E>:
    Objective<B, M, Example = E> + Objective<B::InnerBackend, M::InnerModule, Example = E> + Clone + Send + 'static
{
}

impl<B: TrainBackend, M: TrainableLm<B>, E, O> LoopObjective<B, M, E> for O where
    O: Objective<B, M, Example = E> + Objective<B::InnerBackend, M::InnerModule, Example = E> + Clone + Send + 'static
{
}

/// One peer's training: the trainer, the plan, the schedule, where it started and what it has
/// seen so far, and where it writes (rank 0 only).
struct PeerLoop<'a, B: TrainBackend, M: TrainableLm<B>, S: TrainingSet, O: LoopObjective<B, M, S::Example>> {
    ctx: &'a TrainContext<'a, B, S>,
    trainer: Trainer<B, M, O>,
    objective: O,
    plan: StepPlan,
    schedule: LrSchedule,
    start: Progress,
    /// Rank 0 writes the run (metrics, checkpoints, the best model) and reports progress.
    run: Option<&'a RunDir>,
    world: usize,
    summary: TrainSummary,
    started: Instant,
    latest_val: Option<f64>,
}

/// What one step did.
struct StepDone {
    step: usize,
    stats: StepStats,
    tokens_per_s: f64,
    /// The signal any peer was asked to stop by.
    stop: Option<i32>,
}

/// What a validation found.
#[derive(Clone)]
struct Validation {
    val_loss: f64,
    /// The objective's figures on the validation set.
    figures: Vec<(&'static str, f64)>,
    /// The answers' mean scores, when selection is by one of them.
    answers: Option<ResponseScores>,
    stop_early: bool,
}

impl<'a, B: TrainBackend, M: TrainableLm<B>, S: TrainingSet, O: LoopObjective<B, M, S::Example>>
    PeerLoop<'a, B, M, S, O>
{
    fn setup(
        ctx: &'a TrainContext<'a, B, S>,
        model: &M,
        objective: O,
        resume: Option<(&Path, Progress)>,
        peer: Option<Peer>,
    ) -> Result<Self> {
        let (train_spec, opt) = (&ctx.spec.train, &ctx.spec.optimizer);
        let world = peer.as_ref().map_or(1, |p| p.world);
        let run = ctx.run.filter(|_| peer.as_ref().is_none_or(Peer::writes));
        let mut trainer = Trainer::<B, M, O>::with_objective(opt, objective.clone(), ctx.device);
        trainer.peer = peer;
        let mut start = Progress { step: 0, epoch: 1, position: 0, selection: Selection::default() };
        if let Some((dir, progress)) = resume {
            trainer.optim = trainer.optim.restore(dir, model, ctx.device)?;
            start = progress;
            tracing::info!(checkpoint = %dir.display(), step = start.step, epoch = start.epoch, "resuming");
        }
        let plan = StepPlan::new(ctx.train.len(), train_spec, world)?;
        let schedule = LrSchedule::new(opt, plan.total_steps);
        if run.is_some() {
            let (examples, steps_per_epoch, total_steps) = (ctx.train.len(), plan.steps_per_epoch, plan.total_steps);
            tracing::info!(examples, steps_per_epoch, total_steps, peers = world, "training");
        }
        let summary =
            TrainSummary { steps: start.step, first_loss: f64::NAN, last_loss: f64::NAN, selection: start.selection };
        Ok(Self {
            ctx,
            trainer,
            objective,
            plan,
            schedule,
            start,
            run,
            world,
            summary,
            started: Instant::now(),
            latest_val: None,
        })
    }

    fn writes(&self) -> bool {
        self.run.is_some()
    }

    /// One optimizer step over `step_examples` (this peer's share of them), logged.
    fn step(&mut self, model: M, step_examples: &[usize], epoch: usize) -> Result<(M, StepDone)> {
        let (ctx, train_spec) = (self.ctx, &self.ctx.spec.train);
        let step_started = Instant::now();
        let mine = match &self.trainer.peer {
            Some(peer) => peer.share(step_examples, self.plan.examples_per_step / self.world),
            None => step_examples,
        };
        // Read now (from the mapped cache, usually): only this step's examples are in memory.
        let examples: Vec<S::Example> = mine.iter().map(|&i| ctx.train.get(i)).collect();
        let micro_batches: Vec<Vec<&S::Example>> =
            examples.chunks(train_spec.batch_size).map(|chunk| chunk.iter().collect()).collect();
        let step = self.summary.steps + 1;
        if let (Some(peer), Some(hooks)) = (&self.trainer.peer, crate::hooks::installed()) {
            hooks.peer_step_begins(peer.rank, step)?;
        }
        let lr = self.schedule.at(step - 1);
        // Dropout draws from the backend's generator: seeding it per step makes a resumed run
        // draw the same masks as an uninterrupted one.
        let share = StepShare {
            loss_tokens: step_examples.iter().map(|&i| ctx.train.loss_units(i)).sum(),
            dropout_seed: Some(ctx.spec.run.seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(step as u64)),
            stop: ctx.stop.requested(),
        };
        let (model, stats, stop) = self
            .trainer
            .step_share(model, &micro_batches, share, lr)
            .with_context(|| format!("step {step} (epoch {epoch})"))?;
        let tokens_per_s = stats.tokens as f64 / step_started.elapsed().as_secs_f64();
        if self.summary.first_loss.is_nan() {
            self.summary.first_loss = stats.loss;
        }
        self.summary.steps = step;
        self.summary.last_loss = stats.loss;
        self.log_metrics(&MetricRecord::Step(StepRecord {
            step,
            epoch,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens,
            padded_tokens: stats.positions - stats.tokens,
            tokens_per_s,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            allreduce_s: stats.allreduce_s,
            stage: ctx.stage.tag(),
            figures: self.named(&stats.figures).collect(),
        }))?;
        if self.writes() && step.is_multiple_of(train_spec.log_every) {
            tracing::debug!(step, epoch, loss = stats.loss, lr, grad_norm = stats.grad_norm, tokens_per_s, "step");
        }
        Ok((model, StepDone { step, stats, tokens_per_s, stop }))
    }

    /// The objective's figures under their names.
    fn named<'f>(&self, figures: &'f [f64]) -> impl Iterator<Item = (String, Float)> + 'f {
        let names = <O as Objective<B, M>>::figure_names(&self.objective);
        names.iter().zip(figures).map(|(name, value)| (name.to_string(), Float(*value)))
    }

    fn log_metrics(&self, record: &MetricRecord) -> Result<()> {
        self.run.map_or(Ok(()), |run| run.log_metrics(record))
    }

    /// At each epoch's end and every `train.eval_every` steps, where there is validation data.
    fn validation_due(&self, step: usize, epoch_done: bool) -> bool {
        let every = self.ctx.spec.train.eval_every;
        !self.ctx.val.is_empty() && (epoch_done || (every > 0 && step.is_multiple_of(every)))
    }

    /// The validation loss (and the answers' scores, when they select the model), logged; the
    /// best model kept; whether training should stop early.
    fn validate(&mut self, model: &M, step: usize, epoch: usize) -> Result<Validation> {
        let (ctx, train_spec) = (self.ctx, &self.ctx.spec.train);
        let (device, world) = (ctx.device, self.world);
        let valid = model.valid();
        let metric = train_spec.select_metric;
        let objective = &self.objective;
        let (val_loss, figures, responses) = match &mut self.trainer.peer {
            None => {
                let measured = evaluate(&valid, objective, ctx.val, train_spec.batch_size, device);
                let responses = match metric.scores_answers() {
                    true => Some(answers(ctx, &valid)?),
                    false => None,
                };
                (measured.loss, measured.figures, responses)
            }
            // Each peer evaluates its share of the validation set; rank 0 answers.
            Some(peer) => {
                let shard = peer.share(ctx.val, ctx.val.len().div_ceil(world));
                let measured = evaluate(&valid, objective, shard, train_spec.batch_size, device);
                let scores = match (metric.scores_answers(), peer.writes()) {
                    (true, true) => Some(answers(ctx, &valid)?),
                    _ => None,
                };
                let s = scores.unwrap_or(ResponseScores { exact_match: 0.0, token_f1: 0.0, rouge_l: 0.0 });
                let units = measured.units as f64;
                let mut local = vec![measured.loss * units, units, s.exact_match, s.token_f1, s.rouge_l];
                local.extend(measured.figures.iter().map(|f| f * units));
                let all = peer.sum::<B::InnerBackend>(&local, "summing the evaluation", device)?;
                let responses = metric.scores_answers().then_some(ResponseScores {
                    exact_match: all[2],
                    token_f1: all[3],
                    rouge_l: all[4],
                });
                let figures = all[5..].iter().map(|f| f / all[1].max(1.0)).collect();
                (all[0] / all[1].max(1.0), figures, responses)
            }
        };
        let val_loss = measured("val_loss", val_loss);
        let token_loss = ctx.stage == TrainStage::Train;
        self.log_metrics(&MetricRecord::Epoch(EpochRecord {
            step,
            epoch,
            val_loss,
            val_ppl: token_loss.then(|| val_loss.exp()),
            responses,
            stage: ctx.stage.tag(),
            figures: self.named(&figures).collect(),
        }))?;
        // Never selected, never trained on: a model that measures NaN or infinity has diverged.
        if !val_loss.is_finite() {
            bail!(
                "the validation loss at step {step} (epoch {epoch}) became {val_loss}; the run stops, and no model \
                 measured so is kept as the best; lower optimizer.lr or set optimizer.grad_clip"
            );
        }
        self.latest_val = Some(val_loss);
        let value = match (metric, responses) {
            (SelectMetric::ExactMatch, Some(r)) => r.exact_match,
            (SelectMetric::TokenF1, Some(r)) => r.token_f1,
            (SelectMetric::RougeL, Some(r)) => r.rouge_l,
            (SelectMetric::RewardAccuracy, _) => {
                let names = <O as Objective<B, M>>::figure_names(objective);
                let at = names.iter().position(|name| *name == "rewards/accuracies").ok_or_else(|| {
                    anyhow!("select_metric = reward_accuracy: this stage's objective measures no reward accuracy")
                })?;
                figures[at]
            }
            _ => val_loss,
        };
        let verdict = self.summary.selection.observe(Scored { step, value }, train_spec);
        if let Some(run) = self.run.filter(|_| verdict.new_best) {
            checkpoint::save_best(&ctx.stage.folder(&run.path), &valid, &ctx.data.tok, Scored { step, value })?;
        }
        let names = <O as Objective<B, M>>::figure_names(objective);
        let figures = names.iter().copied().zip(figures).collect();
        Ok(Validation { val_loss, figures, answers: responses, stop_early: verdict.stop })
    }

    /// Every `train.checkpoint_every` steps, and after the last.
    fn checkpoint_due(&self, step: usize) -> bool {
        let every = self.ctx.spec.train.checkpoint_every;
        (every > 0 && step.is_multiple_of(every)) || step == self.plan.total_steps
    }

    /// The model, the optimizer and where training stands, written by rank 0 (None elsewhere).
    fn checkpoint(&self, model: &M, progress: Progress) -> Result<Option<PathBuf>> {
        let Some(run) = self.run else { return Ok(None) };
        let keep = self.ctx.spec.train.keep_checkpoints;
        let folder = self.ctx.stage.folder(&run.path);
        let at = CheckpointAt { run: &folder, model, tok: &self.ctx.data.tok, progress, keep };
        self.trainer.optim.save(at).map(Some)
    }

    fn log_early_stop(&self, step: usize) {
        let train_spec = &self.ctx.spec.train;
        let best = self.summary.selection.best.unwrap_or(Scored { step, value: f64::NAN });
        tracing::info!(
            step,
            metric = ?train_spec.select_metric,
            patience = train_spec.early_stopping_patience,
            min_delta = train_spec.early_stopping_min_delta,
            best_step = best.step,
            best = format!("{:.4}", best.value),
            "early stopping: the selection metric did not improve by more than min_delta in `patience` evaluations"
        );
    }

    /// Stopped by `signal` after the step of `progress`: checkpointed, and said so.
    fn interrupted(&self, model: &M, progress: Progress, signal: i32) -> Result<anyhow::Error> {
        let written = match self.checkpoint(model, progress)? {
            Some(dir) => format!("checkpoint {}", dir.display()),
            None => "rank 0 writes the checkpoint".into(),
        };
        let message = format!("stopped by {} after step {}; {written}", signals::name(signal), progress.step);
        Ok(Interrupted { signal, message }.into())
    }

    fn finish(mut self, model: M) -> Result<(M, TrainSummary)> {
        if let Some(peer) = self.trainer.peer.take() {
            peer.finish::<B::InnerBackend>()?;
        }
        Ok((model, self.summary))
    }
}

/// The training loss of an epoch's steps, token-weighted, for the line that ends the epoch.
#[derive(Default)]
struct EpochLoss {
    sum: f64,
    tokens: usize,
}

impl EpochLoss {
    fn add(&mut self, stats: &StepStats) {
        self.sum += stats.loss * stats.loss_tokens as f64;
        self.tokens += stats.loss_tokens;
    }

    fn log(&self, epoch: usize, validation: Option<&Validation>) {
        let train_loss = self.sum / self.tokens.max(1) as f64;
        match validation {
            Some(Validation { val_loss, figures, .. }) if !figures.is_empty() => {
                let figures: Vec<String> = figures.iter().map(|(name, value)| format!("{name}={value:.4}")).collect();
                tracing::info!(
                    epoch,
                    train_loss = format!("{train_loss:.4}"),
                    val_loss = format!("{val_loss:.4}"),
                    val = figures.join(" "),
                    "epoch done"
                )
            }
            Some(Validation { val_loss, answers: Some(answers), .. }) => tracing::info!(
                epoch,
                train_loss = format!("{train_loss:.4}"),
                val_loss = format!("{val_loss:.4}"),
                exact_match = format!("{:.3}", answers.exact_match),
                token_f1 = format!("{:.3}", answers.token_f1),
                rouge_l = format!("{:.3}", answers.rouge_l),
                "epoch done"
            ),
            Some(Validation { val_loss, answers: None, .. }) => tracing::info!(
                epoch,
                train_loss = format!("{train_loss:.4}"),
                val_loss = format!("{val_loss:.4}"),
                val_ppl = format!("{:.2}", val_loss.exp()),
                "epoch done"
            ),
            None => tracing::info!(epoch, train_loss = format!("{train_loss:.4}"), "epoch done"),
        }
    }
}

/// The answers to the first `eval.responses` validation prompts, scored.
fn answers<B: TrainBackend, S: TrainingSet, V: CausalLm<B::InnerBackend>>(
    ctx: &TrainContext<'_, B, S>,
    valid: &V,
) -> Result<ResponseScores> {
    let examples = &ctx.data.val[..ctx.spec.eval.responses.min(ctx.data.val.len())];
    let max_new = ctx.spec.eval.max_new_tokens;
    Ok(answer_all(valid, &ctx.data.tok, &ctx.data.layout, examples, max_new, ctx.device, |_, _| Ok(()))?.scores)
}

/// What an objective measured over a set of examples.
pub struct Evaluated {
    /// The mean loss over the loss units (tokens, pairs).
    pub loss: f64,
    pub units: usize,
    /// The objective's figures, as means over the loss units.
    pub figures: Vec<f64>,
}

/// The objective's mean loss and figures over `examples`, `batch_size` at a time.
pub fn evaluate<B: FusedOps, M: CausalLm<B>, O: Objective<B, M>>(
    model: &M,
    objective: &O,
    examples: &[O::Example],
    batch_size: usize,
    device: &B::Device,
) -> Evaluated {
    let (mut sum, mut units) = (0.0, 0);
    let mut figures = vec![0.0; objective.figure_names().len()];
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&O::Example> = chunk.iter().collect();
        units += refs.iter().map(|e| objective.loss_tokens(e)).sum::<usize>();
        let done = objective.loss_sum(model, &refs, device);
        sum += done.loss.into_scalar().elem::<f64>();
        figures.iter_mut().zip(&done.figures).for_each(|(total, f)| *total += f);
    }
    let per_unit = units.max(1) as f64;
    Evaluated { loss: sum / per_unit, units, figures: figures.into_iter().map(|f| f / per_unit).collect() }
}

/// The order of examples in an epoch: a shuffle seeded by the run seed and the epoch, so the
/// same spec and seed give the same run (and a resumed run the same order).
///
/// With `group_by_length` (the examples per step), the shuffled examples are taken 50 steps at
/// a time, each group sorted by length and cut into steps, and the full steps of the epoch are
/// shuffled again: a batch holds examples of similar length, so little of it is padding, while
/// the epoch stays randomly ordered. A last, short step stays last.
pub fn epoch_order<S: TrainingSet>(train: &S, seed: u64, epoch: usize, group_by_length: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    let Some(per_step) = group_by_length else { return order };
    for group in order.chunks_mut(per_step * 50) {
        group.sort_by_key(|&i| std::cmp::Reverse(train.token_len(i)));
    }
    let full = order.len() / per_step * per_step;
    let mut steps: Vec<&[usize]> = order[..full].chunks(per_step).collect();
    steps.shuffle(&mut rng);
    steps.into_iter().flatten().chain(&order[full..]).copied().collect()
}

fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Linear warmup, then constant or cosine decay, by optimizer step (0-based).
pub struct LrSchedule {
    lr: f64,
    warmup: usize,
    total: usize,
    schedule: Schedule,
    min_lr: f64,
}

impl LrSchedule {
    pub fn new(opt: &OptimizerSpec, total_steps: usize) -> Self {
        Self {
            lr: opt.lr,
            warmup: opt.warmup_steps,
            total: total_steps,
            schedule: opt.schedule,
            min_lr: opt.lr * opt.min_lr_ratio,
        }
    }

    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.total.saturating_sub(self.warmup).max(1) as f64;
                let progress = ((step - self.warmup) as f64 / span).min(1.0);
                self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// The global L2 norm of all gradients, clipped to `max_norm` (0 = no clipping) as PyTorch's
/// `clip_grad_norm_` does: every gradient scaled by max_norm / (norm + 1e-6) when that is < 1.
/// burn's own clipping works per tensor, which is a different method.
pub fn clip_global_norm<B: TrainBackend, M: Module<B>>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SquaredNorm<'a, B: TrainBackend> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(grad) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let squares = grad.square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(sum) => sum + squares,
                    None => squares,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: TrainBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register::<B::InnerBackend, D>(param.id, grad.mul_scalar(self.factor));
            }
        }
    }
    let mut visitor = SquaredNorm::<B> { grads, sum: None };
    model.visit(&mut visitor);
    let norm = visitor.sum.map_or(0.0, |s| s.into_scalar().elem::<f64>().sqrt());
    if max_norm > 0.0 {
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            model.visit(&mut Scale { grads, factor });
        }
    }
    norm
}
