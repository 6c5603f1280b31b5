//! The eval stage: the loss and perplexity of the model on the validation set and, with
//! `eval.responses`, its answers to held-out prompts scored against the references; into
//! `metrics.jsonl`, `eval.json` and `responses.jsonl`.

use anyhow::Result;

use super::{StageContext, Trained};
use crate::checkpoint;
use crate::model::{CausalLm, TrainBackend, TrainableLm};
use crate::objective::TokenLoss;
use crate::response_metrics::answer_all;
use crate::run_dir::{self, EvalRecord, MetricRecord};
use crate::spec::FinalModel;
use crate::train::{evaluate, TrainStage};

pub fn run<B: TrainBackend, M: TrainableLm<B>>(ctx: &StageContext<'_, B>, state: Trained<M>) -> Result<Trained<M>> {
    if ctx.data.val.is_empty() {
        tracing::warn!(
            "eval stage: no validation examples (data.val_fraction = 0, and no data.val_path or data.val_split)"
        );
        return Ok(state);
    }
    ctx.stop.check("before the eval stage")?;
    let record = evaluate_model(ctx, &state.model.valid(), "final", state.steps, state.stage, true)?;
    crate::files::write_atomic(&ctx.run.file(run_dir::EVAL_FILE), serde_json::to_string_pretty(&record)?.as_bytes())?;
    // When final/ is the best model, the last one is evaluated too, to show them side by side.
    let last = checkpoint::list(&state.stage.folder(&ctx.run.path)).pop();
    if let (Some(training), Some(last)) = (&state.training, last) {
        let last_step = checkpoint::progress(&last)?.step;
        if training.final_model == FinalModel::Best && last_step != state.steps {
            let model = state.model.clone().with_weights_of(&last)?.valid();
            evaluate_model(ctx, &model, "last", last_step, state.stage, false)?;
        }
    }
    ctx.stop.check("after the eval stage")?;
    Ok(state)
}

/// The validation loss of `model` and, with `eval.responses`, the scores of its answers to
/// held-out prompts (into `responses.jsonl` when `log_answers`); recorded as `name`.
fn evaluate_model<B: TrainBackend, M: CausalLm<B::InnerBackend>>(
    ctx: &StageContext<'_, B>,
    model: &M,
    name: &str,
    step: usize,
    stage: TrainStage,
    log_answers: bool,
) -> Result<EvalRecord> {
    let val = &ctx.data.val;
    let objective = TokenLoss { pad_id: ctx.data.tok.eos_id };
    let measured = evaluate(model, &objective, val, ctx.spec.train.batch_size, ctx.device);
    let (val_loss, tokens) = (measured.loss, measured.units);
    let responses = match ctx.spec.eval.responses {
        0 => None,
        n => Some(answer_all(
            model,
            &ctx.data.tok,
            &ctx.data.layout,
            &val[..n.min(val.len())],
            ctx.spec.eval.max_new_tokens,
            ctx.device,
            |i, answer| {
                ctx.stop.check(&format!("in the eval stage, after {i} of {n} answers"))?;
                if log_answers {
                    ctx.run.log_response(answer)?;
                }
                Ok(())
            },
        )?),
    };
    let record = EvalRecord {
        eval: name.into(),
        step,
        val_loss,
        val_ppl: val_loss.exp(),
        val_tokens: tokens,
        val_examples: val.len(),
        responses,
        stage: stage.tag(),
    };
    ctx.run.log_metrics(&MetricRecord::Eval(record.clone()))?;
    tracing::info!(
        model = name,
        step,
        val_loss = format!("{val_loss:.4}"),
        val_ppl = format!("{:.2}", val_loss.exp()),
        "eval"
    );
    if let Some(r) = &record.responses {
        tracing::info!(
            model = name,
            examples = r.examples,
            exact_match = format!("{:.3}", r.scores.exact_match),
            token_f1 = format!("{:.3}", r.scores.token_f1),
            rouge_l = format!("{:.3}", r.scores.rouge_l),
            seconds = format!("{:.1}", r.seconds),
            "eval: answers to held-out prompts"
        );
    }
    Ok(record)
}
