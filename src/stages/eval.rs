//! The eval stage: the loss and perplexity of the model on the validation set, into
//! `metrics.jsonl` and `eval.json`.

use anyhow::Result;

use super::{StageContext, Trained};
use crate::model::{TrainBackend, TrainableLm};
use crate::objective::TokenLoss;
use crate::run_dir::{self, EvalRecord, MetricRecord};
use crate::train::evaluate;

pub fn run<B: TrainBackend, M: TrainableLm<B>>(ctx: &StageContext<'_, B>, state: Trained<M>) -> Result<Trained<M>> {
    let val = &ctx.data.val;
    if val.is_empty() {
        tracing::warn!("eval stage: no validation examples (data.val_fraction = 0 and no data.val_path)");
        return Ok(state);
    }
    ctx.stop.check("before the eval stage")?;
    let objective = TokenLoss { pad_id: ctx.data.tok.eos_id };
    let (val_loss, tokens) = evaluate(&state.model.valid(), &objective, val, ctx.spec.train.batch_size, ctx.device);
    let record = EvalRecord {
        eval: "final".into(),
        step: state.steps,
        val_loss,
        val_ppl: val_loss.exp(),
        val_tokens: tokens,
        val_examples: val.len(),
    };
    run_dir::write_atomic(&ctx.run.file(run_dir::EVAL_FILE), serde_json::to_string_pretty(&record)?.as_bytes())?;
    ctx.run.log_metrics(&MetricRecord::Eval(record))?;
    tracing::info!(val_loss = format!("{val_loss:.4}"), val_ppl = format!("{:.2}", val_loss.exp()), "eval");
    ctx.stop.check("after the eval stage")?;
    Ok(state)
}
