//! Token sequences with loss masks, and right-padded batches of them.

use anyhow::Result;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::{apply_template, Example, Tok};
use crate::error::bad_input;
use crate::spec::LossOn;

/// One tokenized example: `prompt + response + EOS`, and how many leading tokens are prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Tokens before the first trained one: the prompt's length (0 when training on all).
    pub untrained_prefix: usize,
}

impl Sequence {
    /// The number of tokens this sequence contributes to the loss.
    pub fn loss_tokens(&self) -> usize {
        // Target positions are 1..len; those at or after the prefix are trained on.
        self.ids.len() - self.untrained_prefix.max(1)
    }
}

/// What tokenizing a dataset did to fit the length limit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TokenizeReport {
    pub examples: usize,
    pub tokens: usize,
    pub truncated: usize,
}

/// Tokenize examples (prompts laid out by `prompt_template`) into sequences of at most `max_length` tokens. A sequence too long is cut
/// from the end of the response (and counted); an example whose prompt alone leaves no room
/// for a response token is an error naming its line.
pub fn tokenize(
    examples: &[Example],
    tok: &Tok,
    max_length: usize,
    loss_on: LossOn,
    prompt_template: &str,
    origin: &std::path::Path,
) -> Result<(Vec<Sequence>, TokenizeReport)> {
    let mut report = TokenizeReport { examples: examples.len(), ..Default::default() };
    let mut sequences = Vec::with_capacity(examples.len());
    for example in examples {
        let prompt = tok.encode(&apply_template(prompt_template, &example.prompt))?;
        let response = tok.encode(&example.response)?;
        if prompt.len() + 1 > max_length {
            return Err(bad_input(format!(
                "{}:{}: the prompt is {} tokens, which leaves no room for a response within max_length = {max_length}",
                origin.display(),
                example.line,
                prompt.len()
            )));
        }
        let mut ids = prompt.clone();
        ids.extend_from_slice(&response);
        ids.push(tok.eos_id);
        if ids.len() > max_length {
            ids.truncate(max_length);
            report.truncated += 1;
        }
        report.tokens += ids.len();
        let untrained_prefix = match loss_on {
            LossOn::Response => prompt.len(),
            LossOn::All => 0,
        };
        sequences.push(Sequence { ids, untrained_prefix });
    }
    if report.truncated > 0 {
        tracing::warn!(
            truncated = report.truncated,
            of = report.examples,
            max_length,
            "examples longer than max_length were truncated from the end of the response"
        );
    }
    Ok((sequences, report))
}

/// A right-padded batch: inputs are each sequence without its last token, targets without its
/// first, and weights are 1 where a target is trained on (0 for prompt and padding).
pub struct Batch<B: Backend> {
    /// [batch, seq]
    pub inputs: Tensor<B, 2, Int>,
    /// [batch, seq]
    pub targets: Tensor<B, 2, Int>,
    /// [batch, seq]
    pub weights: Tensor<B, 2>,
    /// How many targets have weight 1.
    pub loss_tokens: usize,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
}

impl<B: Backend> Batch<B> {
    pub fn new(sequences: &[&Sequence], pad_id: u32, device: &B::Device) -> Self {
        let batch = sequences.len();
        let seq = sequences.iter().map(|s| s.ids.len() - 1).max().unwrap_or(1).max(1);
        let mut inputs = vec![pad_id as i32; batch * seq];
        let mut targets = vec![pad_id as i32; batch * seq];
        let mut weights = vec![0f32; batch * seq];
        let (mut loss_tokens, mut tokens) = (0, 0);
        for (row, s) in sequences.iter().enumerate() {
            let n = s.ids.len() - 1;
            tokens += n;
            for j in 0..n {
                inputs[row * seq + j] = s.ids[j] as i32;
                targets[row * seq + j] = s.ids[j + 1] as i32;
                if j + 1 >= s.untrained_prefix {
                    weights[row * seq + j] = 1.0;
                    loss_tokens += 1;
                }
            }
        }
        Self {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, seq]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, seq]), device),
            weights: Tensor::from_data(TensorData::new(weights, [batch, seq]), device),
            loss_tokens,
            tokens,
        }
    }
}
