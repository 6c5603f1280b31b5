//! The generate stage: a sample for each of the spec's prompts, laid out with the data's prompt
//! template, printed and kept in `samples.jsonl`.

use anyhow::Result;

use super::{StageContext, Trained};
use crate::data::{PromptLayout, Tok};
use crate::error::bad_input;
use crate::generate::{Decode, Generator, Sampling};
use crate::model::gpt2::Precision;
use crate::model::{CausalLm, TrainBackend, TrainableLm};
use crate::run_dir::SampleRecord;
use crate::spec::{BackendKind, Spec, Stage};

/// Each of the spec's prompts, laid out as the data was, must leave the model room to
/// generate: 1 to context − 1 tokens, as `pipe generate` requires of its prompt.
pub fn check_prompts(spec: &Spec, tok: &Tok, layout: &PromptLayout, context: usize) -> Result<()> {
    if !spec.run.stages.contains(&Stage::Generate) {
        return Ok(());
    }
    for (i, prompt) in spec.generate.prompts.iter().enumerate() {
        let ids = tok.encode_prompt(&layout.apply(prompt))?;
        if ids.is_empty() || ids.len() >= context {
            return Err(bad_input(format!(
                "generate.prompts[{i}] is {} tokens laid out with the prompt template; it must be 1 to {} for the model's context of {context}",
                ids.len(),
                context - 1
            )));
        }
    }
    Ok(())
}

pub fn run<B: TrainBackend, M: TrainableLm<B>>(ctx: &StageContext<'_, B>, state: Trained<M>) -> Result<Trained<M>> {
    let g = &ctx.spec.generate;
    let sampling = Sampling { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p };
    let model = state.model.valid();
    // bf16 on the CPU is the bf16-weight decoder (as `pipe generate --precision bf16`); on a
    // GPU, the model's own bf16 products.
    match (g.precision, ctx.spec.run.backend) {
        (Precision::F32, _) => sample_all(ctx, Generator::new(&model, ctx.device, g.seed), sampling, state.steps)?,
        (Precision::Bf16, BackendKind::Cpu) => {
            sample_all(ctx, Generator::with(model.bf16_decoder(), g.seed), sampling, state.steps)?
        }
        (Precision::Bf16, _) => {
            let model = model.with_precision(Precision::Bf16);
            sample_all(ctx, Generator::new(&model, ctx.device, g.seed), sampling, state.steps)?
        }
    }
    Ok(state)
}

/// A sample for each prompt, printed and logged.
fn sample_all<B: TrainBackend>(
    ctx: &StageContext<'_, B>,
    mut generator: Generator<impl Decode>,
    sampling: Sampling,
    steps: usize,
) -> Result<()> {
    let (g, tok) = (&ctx.spec.generate, &ctx.data.tok);
    let bar = indicatif::ProgressBar::new(g.prompts.len() as u64).with_prefix("generate");
    for (i, prompt) in g.prompts.iter().enumerate() {
        if let Err(stop) = ctx.stop.check(&format!("in the generate stage, after {i} of {} samples", g.prompts.len())) {
            bar.finish_and_clear();
            return Err(stop);
        }
        let layout = &ctx.data.layout;
        let text_in = layout.apply(prompt);
        let ids = tok.encode_prompt(&text_in)?;
        let new = generator.answer(tok, layout, &ids, g.max_new_tokens, sampling)?;
        let stopped_at_eos = new.last().is_some_and(|&id| tok.is_stop(id));
        let completion = layout.cut(&tok.decode(&new)?).to_string();
        bar.suspend(|| println!("--- sample\n{text_in}{completion}"));
        ctx.run.log_sample(&SampleRecord { prompt: prompt.clone(), completion, ids: new, stopped_at_eos }, i, steps)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}
