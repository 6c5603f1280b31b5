//! What a training step minimises. The trainer asks an objective for the loss of each
//! micro-batch and for how many units (tokens, pairs) the step's loss is averaged over;
//! everything else (the loop, accumulation, clipping, the update) is the objective's business
//! not at all. Supervised fine-tuning's masked token loss is here; preference tuning's is in
//! the `dpo` module, its examples a chosen and a rejected sequence.

use burn::tensor::Tensor;

use crate::data::{Batch, Examples, Sequence};
use crate::model::{CausalLm, FusedOps};

/// What one micro-batch processed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Real input tokens.
    pub tokens: usize,
    /// Input positions, padding included.
    pub positions: usize,
}

/// What one micro-batch's loss came to: the summed loss, what it processed, and the sums of
/// the objective's own figures (in the order of [`Objective::figure_names`]).
pub struct MicroBatch<B: FusedOps> {
    /// → [1]
    pub loss: Tensor<B, 1>,
    pub counts: BatchCounts,
    pub figures: Vec<f64>,
}

/// A training objective over examples of type `Example`, for a model `M` on backend `B`.
pub trait Objective<B: FusedOps, M: CausalLm<B>> {
    /// One example as this objective reads it.
    type Example;

    /// The units of `example` its loss is averaged over (trained tokens, or 1 for a pair). A
    /// step's loss is the sum of its micro-batches' `loss_sum` divided by these units over the
    /// whole step, so that neither the loss nor the gradient depends on how the step is split
    /// into micro-batches.
    fn loss_tokens(&self, example: &Self::Example) -> usize;

    /// The summed (not averaged) loss of one micro-batch, what it processed, and its figures.
    fn loss_sum(&self, model: &M, examples: &[&Self::Example], device: &B::Device) -> MicroBatch<B>;

    /// The names of the figures `loss_sum` sums besides the loss; they are reported as means
    /// over the loss units.
    fn figure_names(&self) -> &'static [&'static str] {
        &[]
    }
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

    fn loss_sum(&self, model: &M, examples: &[&Sequence], device: &B::Device) -> MicroBatch<B> {
        let batch = Batch::<B>::new(examples, self.pad_id, device);
        let counts = BatchCounts { tokens: batch.tokens, positions: batch.positions };
        let loss = model.loss_sum(batch.inputs, batch.targets, batch.scored, batch.packing);
        MicroBatch { loss, counts, figures: Vec::new() }
    }
}

/// A training set the loop reads by index, one copy shared by a process's peers.
pub trait TrainingSet: Clone + Send + Sync + 'static {
    type Example: Clone + Send + Sync + 'static;

    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Example `i`, copied out.
    fn get(&self, i: usize) -> Self::Example;

    /// Example `i`'s length in tokens (its longest sequence), for batching by length.
    fn token_len(&self, i: usize) -> usize;

    /// What example `i` weighs in a step's mean loss: the objective's `loss_tokens` of it.
    fn loss_units(&self, i: usize) -> usize;

    /// A 64-bit digest of the whole set, for the peers to compare.
    fn fingerprint(&self) -> u64;
}

impl TrainingSet for Examples {
    type Example = Sequence;

    fn len(&self) -> usize {
        Examples::len(self)
    }

    fn get(&self, i: usize) -> Sequence {
        Examples::get(self, i)
    }

    fn token_len(&self, i: usize) -> usize {
        Examples::token_len(self, i)
    }

    fn loss_units(&self, i: usize) -> usize {
        Examples::loss_tokens(self, i)
    }

    fn fingerprint(&self) -> u64 {
        Examples::fingerprint(self)
    }
}
