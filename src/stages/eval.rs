//! The eval stage: the loss and perplexity of the model on the validation set and, with
//! `eval.responses`, its answers to held-out prompts scored against the references; into
//! `metrics.jsonl`, `eval.json` and `responses.jsonl`.

use std::time::Instant;

use anyhow::Result;

use super::{StageContext, Trained};
use crate::data::Sequence;
use crate::generate::{Generator, Sampling};
use crate::model::{CausalLm, TrainBackend, TrainableLm};
use crate::objective::TokenLoss;
use crate::response_metrics::{prompt_and_reference, ResponseScores};
use crate::run_dir::{self, EvalRecord, MetricRecord, ResponseEval};
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
        n => Some(answer(ctx, &model, &val[..n.min(val.len())])?),
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

/// Answer each held-out example's prompt greedily and score the answer against its reference
/// (examples without a prompt, such as plain text, are passed over); each answer goes to
/// `responses.jsonl`.
fn answer<B: TrainBackend, M: CausalLm<B::InnerBackend>>(
    ctx: &StageContext<'_, B>,
    model: &M,
    examples: &[Sequence],
) -> Result<ResponseEval> {
    let started = Instant::now();
    let tok = &ctx.data.tok;
    let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
    let mut generator = Generator::new(model, ctx.device, 0);
    let mut scores = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        ctx.stop.check(&format!("in the eval stage, after {i} of {} answers", examples.len()))?;
        let Some((prompt, reference)) = prompt_and_reference(example, tok.eos_id) else { continue };
        let answer = generator.generate(prompt, ctx.spec.eval.max_new_tokens, greedy, Some(tok.eos_id), |_| {});
        let answer = answer.strip_suffix(&[tok.eos_id]).unwrap_or(&answer);
        let (prediction, reference) = (tok.decode(answer)?, tok.decode(reference)?);
        let score = ResponseScores::of(&prediction, &reference);
        ctx.run.log_response(&serde_json::json!({
            "prompt": tok.decode(prompt)?,
            "reference": reference,
            "prediction": prediction,
            "scores": score,
        }))?;
        scores.push(score);
    }
    Ok(ResponseEval {
        examples: scores.len(),
        scores: ResponseScores::mean(&scores),
        seconds: started.elapsed().as_secs_f64(),
    })
}
