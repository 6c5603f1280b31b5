//! The training loop, top to bottom: shuffle, batch, loss, backward, accumulate, clip, step,
//! schedule, log, evaluate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
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
use crate::data::{PromptLayout, Sequence, Tok};
use crate::error::{bad_input, Interrupted};
use crate::model::{params, CausalLm, FusedOps, Gpt2, TrainBackend, TrainableLm};
use crate::objective::{Objective, TokenLoss};
use crate::response_metrics::answer_all;
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
#[derive(Debug, Clone, Copy)]
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
}

/// The optimizer, the objective and how to step them: one `step` is one update of the model
/// over a set of micro-batches.
pub struct Trainer<B: TrainBackend, M: TrainableLm<B> = Gpt2<B>, O: Objective<B, M> = TokenLoss> {
    optim: ModelOptimizer<B, M>,
    objective: O,
    grad_clip: f64,
    device: B::Device,
}

impl<B: TrainBackend, M: TrainableLm<B>> Trainer<B, M, TokenLoss> {
    /// A trainer for supervised fine-tuning's token loss, padding batches with `pad_id`.
    pub fn new(opt: &OptimizerSpec, pad_id: u32, device: &B::Device) -> Self {
        Self::with_objective(opt, TokenLoss { pad_id }, device)
    }
}

impl<B: TrainBackend, M: TrainableLm<B>, O: Objective<B, M>> Trainer<B, M, O> {
    pub fn with_objective(opt: &OptimizerSpec, objective: O, device: &B::Device) -> Self {
        Self { optim: ModelOptimizer::new(opt), objective, grad_clip: opt.grad_clip, device: device.clone() }
    }

    /// Forward and backward over each micro-batch, accumulating gradients, then clip and
    /// update. The loss is normalised by the loss tokens of the whole step, so neither loss
    /// nor gradient depends on how the step is split into micro-batches.
    pub fn step(&mut self, model: M, micro_batches: &[Vec<&O::Example>], lr: f64) -> Result<(M, StepStats)> {
        let loss_tokens: usize = micro_batches.iter().flatten().map(|e| self.objective.loss_tokens(e)).sum();
        let mut accumulator = GradientsAccumulator::<M>::new();
        let (mut loss, mut tokens, mut positions) = (0.0f64, 0usize, 0usize);
        for micro in micro_batches {
            let (micro_loss, counts) = self.objective.loss_sum(&model, micro, &self.device);
            tokens += counts.tokens;
            positions += counts.positions;
            let micro_loss = micro_loss.div_scalar(loss_tokens as f64);
            loss += micro_loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(micro_loss.backward(), &model);
            accumulator.accumulate(&model, grads);
        }
        if !loss.is_finite() {
            bail!("the loss became {loss}; lower optimizer.lr or set optimizer.grad_clip");
        }
        let mut grads = accumulator.grads();
        let grad_norm = clip_global_norm(&model, &mut grads, self.grad_clip);
        let model = self.optim.step(lr, model, grads);
        Ok((model, StepStats { loss, grad_norm, tokens, positions, loss_tokens }))
    }
}

/// How a run's examples divide into optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    pub examples_per_step: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

impl StepPlan {
    /// The plan for `examples` training examples; sizes whose product does not fit are an
    /// error naming the field (a wrapped count would train a different schedule).
    pub fn new(examples: usize, train: &TrainSpec) -> Result<Self> {
        let examples_per_step = train
            .batch_size
            .checked_mul(train.grad_accum)
            .ok_or_else(|| bad_input("train.batch_size × train.grad_accum is too large"))?;
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

/// Everything the training stage works with besides the model.
pub struct TrainContext<'a, B: TrainBackend> {
    pub train: &'a [Sequence],
    pub val: &'a [Sequence],
    pub spec: &'a Spec,
    pub tok: &'a Tok,
    /// How prompts are laid out for the answers that select the best model.
    pub layout: &'a PromptLayout,
    pub run: &'a RunDir,
    pub device: &'a B::Device,
    /// Set by a stop signal: finish the step, checkpoint, stop.
    pub stop: &'a StopSignal,
}

/// Train for the spec's epochs, evaluating on the validation set after each, checkpointing
/// every `train.checkpoint_every` steps and at the end. With `resume` (a checkpoint whose
/// weights `model` already holds, and where training stood), training continues exactly where
/// the interrupted run stood.
pub fn train<B: TrainBackend, M: TrainableLm<B>>(
    ctx: &TrainContext<'_, B>,
    mut model: M,
    resume: Option<(&Path, Progress)>,
) -> Result<(M, TrainSummary)> {
    let (train_spec, opt, seed) = (&ctx.spec.train, &ctx.spec.optimizer, ctx.spec.run.seed);
    let (train, device) = (ctx.train, ctx.device);
    let objective = TokenLoss { pad_id: ctx.tok.eos_id };
    let mut trainer = Trainer::<B, M, _>::with_objective(opt, objective, device);
    let mut start = Progress { step: 0, epoch: 1, position: 0, selection: Selection::default() };
    if let Some((dir, progress)) = resume {
        trainer.optim = trainer.optim.restore(dir, &model, device)?;
        start = progress;
        tracing::info!(checkpoint = %dir.display(), step = start.step, epoch = start.epoch, "resuming");
    }
    let StepPlan { examples_per_step, steps_per_epoch, total_steps } = StepPlan::new(train.len(), train_spec)?;
    let schedule = LrSchedule::new(opt, total_steps);
    tracing::info!(examples = train.len(), steps_per_epoch, total_steps, "training");
    let mut summary =
        TrainSummary { steps: start.step, first_loss: f64::NAN, last_loss: f64::NAN, selection: start.selection };
    if let Some(step) = start.selection.stopped_early_at {
        tracing::info!(step, "training had ended early; nothing left to train");
        return Ok((model, summary));
    }
    let started = Instant::now();
    let mut latest_val = None;
    let checkpoint = |model: &M, trainer: &Trainer<B, M, TokenLoss>, progress: Progress| {
        let at = CheckpointAt { run: &ctx.run.path, model, tok: ctx.tok, progress, keep: train_spec.keep_checkpoints };
        trainer.optim.save(at)
    };

    'epochs: for epoch in start.epoch..=train_spec.epochs {
        let order = epoch_order(train, seed, epoch, train_spec.group_by_length.then_some(examples_per_step));
        // A position past the end is possible only when the data shrank under a resume.
        let skip = if epoch == start.epoch { start.position.min(order.len()) } else { 0 };
        let bar = progress_bar(steps_per_epoch as u64, &format!("epoch {epoch}/{}", train_spec.epochs));
        bar.set_position((skip / examples_per_step) as u64);
        let (mut epoch_loss, mut epoch_tokens) = (0.0, 0usize);
        for (i, step_examples) in order[skip..].chunks(examples_per_step).enumerate() {
            let step_started = Instant::now();
            let micro_batches: Vec<Vec<&Sequence>> = step_examples
                .chunks(train_spec.batch_size)
                .map(|chunk| chunk.iter().map(|&i| &train[i]).collect())
                .collect();
            let step = summary.steps + 1;
            let lr = schedule.at(step - 1);
            // Dropout draws from the backend's generator: seeding it per step makes a resumed
            // run draw the same masks as an uninterrupted one.
            B::seed(device, seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(step as u64));
            let stats;
            (model, stats) =
                trainer.step(model, &micro_batches, lr).with_context(|| format!("step {step} (epoch {epoch})"))?;
            let tokens_per_s = stats.tokens as f64 / step_started.elapsed().as_secs_f64();
            if summary.first_loss.is_nan() {
                summary.first_loss = stats.loss;
            }
            summary.steps = step;
            summary.last_loss = stats.loss;
            epoch_loss += stats.loss * stats.loss_tokens as f64;
            epoch_tokens += stats.loss_tokens;
            ctx.run.log_metrics(&MetricRecord::Step(StepRecord {
                step,
                epoch,
                loss: stats.loss,
                lr,
                grad_norm: stats.grad_norm,
                tokens: stats.tokens,
                padded_tokens: stats.positions - stats.tokens,
                tokens_per_s,
                elapsed_s: started.elapsed().as_secs_f64(),
            }))?;
            if step.is_multiple_of(train_spec.log_every) {
                tracing::debug!(step, epoch, loss = stats.loss, lr, grad_norm = stats.grad_norm, tokens_per_s, "step");
            }
            let position = (skip + (i + 1) * examples_per_step).min(train.len());
            // Evaluations come before the step's checkpoint, so a checkpoint holds everything
            // logged up to its step (and where selection stood) and a resumed run neither
            // repeats nor loses one.
            let epoch_done = position == train.len();
            let every = train_spec.eval_every;
            let mut stop_early = false;
            if !ctx.val.is_empty() && (epoch_done || (every > 0 && step.is_multiple_of(every))) {
                let valid = model.valid();
                let (val_loss, _) = evaluate(&valid, &objective, ctx.val, train_spec.batch_size, device);
                let metric = train_spec.select_metric;
                let responses = if metric.higher_is_better() {
                    let examples = &ctx.val[..ctx.spec.eval.responses.min(ctx.val.len())];
                    let max_new = ctx.spec.eval.max_new_tokens;
                    Some(answer_all(&valid, ctx.tok, ctx.layout, examples, max_new, device, |_, _| Ok(()))?.scores)
                } else {
                    None
                };
                ctx.run.log_metrics(&MetricRecord::Epoch(EpochRecord {
                    step,
                    epoch,
                    val_loss,
                    val_ppl: val_loss.exp(),
                    responses,
                }))?;
                latest_val = Some(val_loss);
                let value = match (metric, responses) {
                    (SelectMetric::ExactMatch, Some(r)) => r.exact_match,
                    (SelectMetric::TokenF1, Some(r)) => r.token_f1,
                    (SelectMetric::RougeL, Some(r)) => r.rouge_l,
                    _ => val_loss,
                };
                let verdict = summary.selection.observe(Scored { step, value }, train_spec);
                if verdict.new_best {
                    checkpoint::save_best(&ctx.run.path, &valid, ctx.tok, Scored { step, value })?;
                }
                stop_early = verdict.stop;
                if epoch_done {
                    let train_loss = epoch_loss / epoch_tokens.max(1) as f64;
                    tracing::info!(
                        epoch,
                        train_loss = format!("{train_loss:.4}"),
                        val_loss = format!("{val_loss:.4}"),
                        val_ppl = format!("{:.2}", val_loss.exp()),
                        "epoch done"
                    );
                }
            } else if epoch_done {
                let train_loss = epoch_loss / epoch_tokens.max(1) as f64;
                tracing::info!(epoch, train_loss = format!("{train_loss:.4}"), "epoch done");
            }
            let val = latest_val.map(|v| format!("  val {v:.4}")).unwrap_or_default();
            bar.set_message(format!("loss {:.4}{val}  {tokens_per_s:.0} tok/s", stats.loss));
            bar.inc(1);
            let progress = Progress { step, epoch, position, selection: summary.selection };
            if stop_early {
                bar.finish_and_clear();
                checkpoint(&model, &trainer, progress)?;
                let best = summary.selection.best.unwrap_or(Scored { step, value: f64::NAN });
                tracing::info!(
                    step,
                    metric = ?train_spec.select_metric,
                    patience = train_spec.early_stopping_patience,
                    min_delta = train_spec.early_stopping_min_delta,
                    best_step = best.step,
                    best = format!("{:.4}", best.value),
                    "early stopping: the selection metric did not improve by more than min_delta in `patience` evaluations"
                );
                break 'epochs;
            }
            if let Some(signal) = ctx.stop.requested() {
                bar.finish_and_clear();
                let dir = checkpoint(&model, &trainer, progress)?;
                let message =
                    format!("stopped by {} after step {step}; checkpoint {}", signals::name(signal), dir.display());
                return Err(Interrupted { signal, message }.into());
            }
            let every = train_spec.checkpoint_every;
            if (every > 0 && step.is_multiple_of(every)) || step == total_steps {
                checkpoint(&model, &trainer, progress)?;
            }
        }
        bar.finish_and_clear();
    }
    Ok((model, summary))
}

/// The objective's token-weighted mean loss over `examples`, and the number of loss tokens.
pub fn evaluate<B: FusedOps, M: CausalLm<B>, O: Objective<B, M>>(
    model: &M,
    objective: &O,
    examples: &[O::Example],
    batch_size: usize,
    device: &B::Device,
) -> (f64, usize) {
    let (mut sum, mut tokens) = (0.0, 0);
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&O::Example> = chunk.iter().collect();
        tokens += refs.iter().map(|e| objective.loss_tokens(e)).sum::<usize>();
        sum += objective.loss_sum(model, &refs, device).0.into_scalar().elem::<f64>();
    }
    (sum / tokens.max(1) as f64, tokens)
}

/// The order of examples in an epoch: a shuffle seeded by the run seed and the epoch, so the
/// same spec and seed give the same run (and a resumed run the same order).
///
/// With `group_by_length` (the examples per step), the shuffled examples are taken 50 steps at
/// a time, each group sorted by length and cut into steps, and the full steps of the epoch are
/// shuffled again: a batch holds examples of similar length, so little of it is padding, while
/// the epoch stays randomly ordered. A last, short step stays last.
pub fn epoch_order(train: &[Sequence], seed: u64, epoch: usize, group_by_length: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    let Some(per_step) = group_by_length else { return order };
    for group in order.chunks_mut(per_step * 50) {
        group.sort_by_key(|&i| std::cmp::Reverse(train[i].ids.len()));
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
