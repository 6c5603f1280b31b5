//! What a training step minimises. The trainer asks an objective for the loss of each
//! micro-batch and for how many tokens the step's loss is averaged over; everything else (the
//! loop, accumulation, clipping, the update) is the objective's business not at all. Today's
//! objective is supervised fine-tuning's masked token loss; a preference objective (DPO) would
//! be a second one whose examples hold a chosen and a rejected sequence.

use burn::tensor::Tensor;

use crate::data::{Batch, Sequence};
use crate::model::{CausalLm, FusedOps};

/// What one micro-batch processed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Real input tokens.
    pub tokens: usize,
    /// Input positions, padding included.
    pub positions: usize,
}

/// A training objective over examples of type `Example`, for a model `M` on backend `B`.
pub trait Objective<B: FusedOps, M: CausalLm<B>> {
    /// One example as this objective reads it.
    type Example;

    /// The tokens of `example` its loss is taken over. A step's loss is the sum of its
    /// micro-batches' `loss_sum` divided by these tokens over the whole step, so that neither
    /// the loss nor the gradient depends on how the step is split into micro-batches.
    fn loss_tokens(&self, example: &Self::Example) -> usize;

    /// The summed (not averaged) loss of one micro-batch, and what it processed. → [1]
    fn loss_sum(&self, model: &M, examples: &[&Self::Example], device: &B::Device) -> (Tensor<B, 1>, BatchCounts);
}

/// Supervised fine-tuning's loss: the negative log-likelihood of each trained token (the
/// response, or every token with `loss_on = "all"`), summed; prompt and padding weigh 0.
#[derive(Debug, Clone, Copy)]
pub struct TokenLoss {
    /// The id right-padded batches are filled with.
    pub pad_id: u32,
}

impl<B: FusedOps, M: CausalLm<B>> Objective<B, M> for TokenLoss {
    type Example = Sequence;

    fn loss_tokens(&self, example: &Sequence) -> usize {
        example.loss_tokens()
    }

    fn loss_sum(&self, model: &M, examples: &[&Sequence], device: &B::Device) -> (Tensor<B, 1>, BatchCounts) {
        let batch = Batch::<B>::new(examples, self.pad_id, device);
        let counts = BatchCounts { tokens: batch.tokens, positions: batch.positions };
        (model.loss_sum_packed(batch.inputs, batch.targets, batch.weights, batch.packing), counts)
    }
}
