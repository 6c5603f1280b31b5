//! The eval stage: the loss and perplexity of the model on the validation set and, with
//! `eval.responses`, its answers to held-out prompts scored against the references; into
//! `metrics.jsonl`, `eval.json` and `responses.jsonl`.

use anyhow::Result;

use super::{StageContext, Trained};
use crate::model::{TrainBackend, TrainableLm};
use crate::objective::TokenLoss;
use crate::response_metrics::answer_all;
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
    let model = state.model.valid();
    let (val_loss, tokens) = evaluate(&model, &objective, val, ctx.spec.train.batch_size, ctx.device);
    let responses = match ctx.spec.eval.responses {
        0 => None,
        n => Some(answer_all(
            &model,
            &ctx.data.tok,
            &val[..n.min(val.len())],
            ctx.spec.eval.max_new_tokens,
            ctx.device,
            |i, answer| {
                ctx.stop.check(&format!("in the eval stage, after {i} of {n} answers"))?;
                ctx.run.log_response(answer)
            },
        )?),
    };
    let record = EvalRecord {
        eval: "final".into(),
        step: state.steps,
        val_loss,
        val_ppl: val_loss.exp(),
        val_tokens: tokens,
        val_examples: val.len(),
        responses,
    };
    run_dir::write_atomic(&ctx.run.file(run_dir::EVAL_FILE), serde_json::to_string_pretty(&record)?.as_bytes())?;
    let record_responses = record.responses.clone();
    ctx.run.log_metrics(&MetricRecord::Eval(record))?;
    tracing::info!(val_loss = format!("{val_loss:.4}"), val_ppl = format!("{:.2}", val_loss.exp()), "eval");
    if let Some(r) = &record_responses {
        tracing::info!(
            examples = r.examples,
            exact_match = format!("{:.3}", r.scores.exact_match),
            token_f1 = format!("{:.3}", r.scores.token_f1),
            rouge_l = format!("{:.3}", r.scores.rouge_l),
            seconds = format!("{:.1}", r.seconds),
            "eval: answers to held-out prompts"
        );
    }
    ctx.stop.check("after the eval stage")?;
    Ok(state)
}
