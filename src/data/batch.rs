//! Token sequences with loss masks, and right-padded batches of them.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// One tokenized example, and which of its tokens the loss is computed on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Per token: whether predicting it counts in the loss (the first token never does).
    pub trained: Vec<bool>,
}

impl Sequence {
    /// Every token after the first is trained on (plain language modelling).
    pub fn all_trained(ids: Vec<u32>) -> Self {
        let trained = vec![true; ids.len()];
        Self { ids, trained }
    }

    /// The first `untrained` tokens are context (a prompt); the rest are trained on.
    pub fn with_prompt(ids: Vec<u32>, untrained: usize) -> Self {
        let trained = (0..ids.len()).map(|i| i >= untrained).collect();
        Self { ids, trained }
    }

    /// The number of tokens this sequence contributes to the loss.
    pub fn loss_tokens(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
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
    /// Input positions, padding included (batch · longest sequence).
    pub positions: usize,
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
                if s.trained[j + 1] {
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
            positions: batch * seq,
        }
    }
}
