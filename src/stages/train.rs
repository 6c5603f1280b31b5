//! The train stage: the training loop (`crate::train`), then the final model saved as `final/`.

use anyhow::{Context, Result};

use super::{StageContext, Trained};
use crate::data::Tok;
use crate::model::{hf, CausalLm, FusedOps, TrainBackend, TrainableLm};
use crate::run_dir::{self, RunDir};
use crate::train::{self, TrainContext};

pub fn run<B: TrainBackend, M: TrainableLm<B>>(ctx: &StageContext<'_, B>, state: Trained<M>) -> Result<Trained<M>> {
    let data = ctx.data;
    let train_ctx = TrainContext {
        train: &data.train,
        val: &data.val,
        spec: ctx.spec,
        tok: &data.tok,
        run: ctx.run,
        device: ctx.device,
        stop: ctx.stop,
    };
    let resume = ctx.resume.as_ref().map(|(dir, progress)| (dir.as_path(), *progress));
    let (model, summary) = train::train(&train_ctx, state.model, resume)?;
    save_final(&model.valid(), &data.tok, ctx.run)?;
    tracing::info!(
        steps = summary.steps,
        first_loss = summary.first_loss,
        last_loss = summary.last_loss,
        "training done"
    );
    Ok(Trained { model, steps: summary.steps })
}

/// Save the model as `final/` with its tokenizer, written beside and renamed into place.
fn save_final<B: FusedOps, M: CausalLm<B>>(model: &M, tok: &Tok, run: &RunDir) -> Result<()> {
    let final_dir = run.file(run_dir::FINAL_DIR);
    let staging = run.file(".final.partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    model.save(&staging, Some(tok.eos_id as usize))?;
    tok.save(&staging.join(hf::TOKENIZER_FILE))?;
    if final_dir.exists() {
        // A resumed run that had finished training saves the same weights again.
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&staging, &final_dir)
        .with_context(|| format!("cannot move the final model into {}", final_dir.display()))?;
    tracing::info!(path = %final_dir.display(), "saved the final model");
    Ok(())
}
