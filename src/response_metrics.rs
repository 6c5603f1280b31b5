//! How well generated responses match the references of held-out pairs: exact match and token
//! F1 after SQuAD's normalisation (lower case, no punctuation or articles, single spaces), and
//! ROUGE-L (the F-measure of the longest common subsequence of lower-cased alphanumeric
//! tokens, as Google's rouge-score computes it without stemming).

use std::time::Instant;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::{PromptLayout, Sequence, Tok};
use crate::generate::{Generator, Sampling};
use crate::model::{CausalLm, FusedOps};

/// Scores of one response, or their means over several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseScores {
    #[serde(with = "crate::json_float")]
    pub exact_match: f64,
    #[serde(with = "crate::json_float")]
    pub token_f1: f64,
    #[serde(with = "crate::json_float")]
    pub rouge_l: f64,
}

impl ResponseScores {
    /// Score `prediction` against `reference`.
    pub fn of(prediction: &str, reference: &str) -> Self {
        let (p, r) = (squad_tokens(prediction), squad_tokens(reference));
        let exact_match = if p == r { 1.0 } else { 0.0 };
        let token_f1 = if p.is_empty() || r.is_empty() {
            exact_match
        } else {
            let mut unmatched = r.clone();
            let common = p
                .iter()
                .filter(|t| match unmatched.iter().position(|u| u == *t) {
                    Some(i) => {
                        unmatched.swap_remove(i);
                        true
                    }
                    None => false,
                })
                .count() as f64;
            f_measure(common, p.len() as f64, r.len() as f64)
        };
        let (p, r) = (rouge_tokens(prediction), rouge_tokens(reference));
        let rouge_l = f_measure(lcs(&p, &r) as f64, p.len() as f64, r.len() as f64);
        Self { exact_match, token_f1, rouge_l }
    }

    /// The mean of each score.
    pub fn mean(all: &[Self]) -> Self {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&Self) -> f64| all.iter().map(f).sum::<f64>() / n;
        Self { exact_match: sum(|s| s.exact_match), token_f1: sum(|s| s.token_f1), rouge_l: sum(|s| s.rouge_l) }
    }
}

/// One answer to a held-out prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub prompt: String,
    pub reference: String,
    pub prediction: String,
    pub scores: ResponseScores,
}

/// How a model answered held-out prompts: the mean scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEval {
    /// How many were answered.
    pub examples: usize,
    #[serde(flatten)]
    pub scores: ResponseScores,
    /// Seconds the answers took.
    pub seconds: f64,
}

/// Answer each example's prompt greedily (up to `max_new_tokens`, or the layout's stop text)
/// and score the answer against its reference, both cut at the stop text; examples without a
/// prompt (plain text) are passed over. `each` sees every answer as it is made, and may stop
/// the work with an error.
pub fn answer_all<B: FusedOps, M: CausalLm<B>>(
    model: &M,
    tok: &Tok,
    layout: &PromptLayout,
    examples: &[Sequence],
    max_new_tokens: usize,
    device: &B::Device,
    mut each: impl FnMut(usize, &Answer) -> Result<()>,
) -> Result<ResponseEval> {
    let started = Instant::now();
    let greedy = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0 };
    let mut generator = Generator::new(model, device, 0);
    let mut scores = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        let Some((prompt, reference)) = prompt_and_reference(example, tok.eos_id) else { continue };
        let answer = generator.answer(tok, layout, prompt, max_new_tokens, greedy)?;
        let answer = match answer.split_last() {
            Some((&last, before)) if tok.is_stop(last) => before,
            _ => &answer,
        };
        let (prediction, reference) = (tok.decode(answer)?, tok.decode(reference)?);
        let (prediction, reference) = (layout.cut(&prediction).to_string(), layout.cut(&reference).to_string());
        let scores_of_one = ResponseScores::of(&prediction, &reference);
        each(i, &Answer { prompt: tok.decode(prompt)?, reference, prediction, scores: scores_of_one })?;
        scores.push(scores_of_one);
    }
    Ok(ResponseEval {
        examples: scores.len(),
        scores: ResponseScores::mean(&scores),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A held-out example as a prompt and its reference response: the tokens before its last
/// trained span, and that span without the end-of-text token that closes it. None when the
/// example has no prompt (every token trained, as for plain text).
pub fn prompt_and_reference(sequence: &Sequence, eos: u32) -> Option<(&[u32], &[u32])> {
    let end = sequence.trained.iter().rposition(|&t| t)? + 1;
    let start = sequence.trained[..end].iter().rposition(|&t| !t)? + 1;
    let reference = &sequence.ids[start..end];
    let reference = reference.strip_suffix(&[eos]).unwrap_or(reference);
    Some((&sequence.ids[..start], reference))
}

fn f_measure(common: f64, predicted: f64, reference: f64) -> f64 {
    if common == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (common / predicted, common / reference);
    2.0 * precision * recall / (precision + recall)
}

/// SQuAD's answer normalisation, as tokens.
fn squad_tokens(text: &str) -> Vec<String> {
    let lower: String = text.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    lower.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).map(str::to_string).collect()
}

/// rouge-score's default tokenisation: lower case, runs of ASCII letters and digits.
fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The length of the longest common subsequence.
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { above.max(row[j]) };
            diagonal = above;
        }
    }
    row[b.len()]
}
