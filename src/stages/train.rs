//! The train stage: the training loop (`crate::train`), then the final model saved as `final/`.

use anyhow::Result;

use super::{StageContext, Trained};
use crate::checkpoint;
use crate::data::Tok;
use crate::files::Staged;
use crate::model::{hf, CausalLm, FusedOps, TrainBackend, TrainableLm};
use crate::objective::TokenLoss;
use crate::run_dir::{self, RunDir};
use crate::selection::TrainingOutcome;
use crate::spec::FinalModel;
use crate::train::{self, TrainContext, TrainStage};

pub fn run<B: TrainBackend, M: TrainableLm<B>>(ctx: &StageContext<'_, B>, state: Trained<M>) -> Result<Trained<M>> {
    let data = ctx.data;
    let train_ctx = TrainContext {
        spec: ctx.spec,
        data,
        train: &data.train,
        val: &data.val,
        stage: TrainStage::Train,
        run: Some(ctx.run),
        device: ctx.device,
        stop: ctx.stop,
    };
    let resume = ctx.resume.as_ref().map(|(dir, progress)| (dir.as_path(), *progress));
    let objective = TokenLoss { pad_id: data.tok.eos_id };
    let (model, summary) = train::train(&train_ctx, state.model, objective, resume)?;
    let (model, final_step) = match (ctx.spec.train.final_model, checkpoint::best(&ctx.run.path)?) {
        (FinalModel::Last, _) => (model, summary.steps),
        (FinalModel::Best, Some((dir, best))) if Some(best.step) == summary.selection.best.map(|b| b.step) => {
            tracing::info!(step = best.step, value = format!("{:.4}", best.value), "final/ is the best model");
            (model.with_weights_of(&dir)?, best.step)
        }
        (FinalModel::Best, Some((dir, kept))) => {
            return Err(anyhow::anyhow!(
                "{} holds the model of step {}, but this run's best evaluation is at step {:?} (were the inputs changed under a resume?)",
                dir.display(),
                kept.step,
                summary.selection.best.map(|b| b.step)
            ))
        }
        (FinalModel::Best, None) => {
            return Err(anyhow::anyhow!(
                "train.final = \"best\": training kept no best model (no evaluation was made, or none was usable), so final/ cannot be the best one"
            ))
        }
    };
    save_final(&model.valid(), &data.tok, ctx.run)?;
    tracing::info!(
        steps = summary.steps,
        first_loss = summary.first_loss,
        last_loss = summary.last_loss,
        "training done"
    );
    let train = &ctx.spec.train;
    let outcome = TrainingOutcome {
        selection: summary.selection,
        select_metric: train.select_metric,
        final_model: train.final_model,
        final_step,
        stage: None,
    };
    Ok(Trained { model, steps: final_step, stage: TrainStage::Train, training: Some(outcome) })
}

/// Save the model as `final/` with its tokenizer, written beside and renamed into place.
pub(super) fn save_final<B: FusedOps, M: CausalLm<B>>(model: &M, tok: &Tok, run: &RunDir) -> Result<()> {
    // A resumed run that had finished training saves the same weights again, replacing them.
    let staged = Staged::new(&run.file(run_dir::FINAL_DIR), run.file(".final.partial"))?;
    model.save(staged.path(), Some(tok.eos_id as usize))?;
    tok.save(&staged.path().join(hf::TOKENIZER_FILE))?;
    let final_dir = staged.commit()?;
    tracing::info!(path = %final_dir.display(), "saved the final model");
    Ok(())
}
