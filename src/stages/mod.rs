//! The stages a pipeline runs, one file each, all with one signature: a stage takes the run's
//! context and the model as the previous stage left it, and returns the model for the next.

mod dpo;
mod eval;
mod generate;
mod train;

pub use generate::check_prompts;

use std::path::PathBuf;

use anyhow::Result;

use crate::checkpoint::Progress;
use crate::data::PreparedData;
use crate::model::{TrainBackend, TrainableLm};
use crate::run_dir::RunDir;
use crate::selection::TrainingOutcome;
use crate::signals::StopSignal;
use crate::spec::{Spec, Stage};
use crate::train::TrainStage;

/// What every stage works with besides the model.
pub struct StageContext<'a, B: TrainBackend> {
    pub spec: &'a Spec,
    pub data: &'a PreparedData,
    pub run: &'a RunDir,
    pub device: &'a B::Device,
    /// Set by Ctrl-C, SIGTERM or SIGHUP: each stage stops at the end of its unit of work.
    pub stop: &'a StopSignal,
    /// The checkpoint a resumed run continues from (the model already holds its weights), and
    /// where training stood then.
    pub resume: Option<(PathBuf, Progress)>,
}

/// The model between stages, how many optimizer steps it has had, and how training ended.
pub struct Trained<M> {
    pub model: M,
    /// Optimizer steps the model was trained for (the best model's step when `final/` is it).
    pub steps: usize,
    /// The training stage that trained the model last (whose checkpoints hold its steps).
    pub stage: TrainStage,
    /// Set by the train and dpo stages: how the last of them ended.
    pub training: Option<TrainingOutcome>,
}

/// Run the spec's stages in order; how training ended, when there was a train stage.
pub fn run_all<B: TrainBackend, M: TrainableLm<B>>(
    ctx: &StageContext<'_, B>,
    model: M,
) -> Result<Option<TrainingOutcome>> {
    let steps = ctx.resume.as_ref().map_or(0, |(_, progress)| progress.step);
    let mut state = Trained { model, steps, stage: TrainStage::Train, training: None };
    for stage in &ctx.spec.run.stages {
        if let Some(hooks) = crate::hooks::installed() {
            hooks.stage_begins(stage.name());
        }
        state = match stage {
            Stage::Train => train::run(ctx, state)?,
            Stage::Dpo => dpo::run(ctx, state)?,
            Stage::Eval => eval::run(ctx, state)?,
            Stage::Generate => generate::run(ctx, state)?,
        };
    }
    Ok(state.training)
}
