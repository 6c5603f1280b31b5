//! The model: the causal-language-model seam the rest of pipe is written against, the families
//! behind it (GPT-2; Llama, Qwen2 and Qwen3) and the one place a checkpoint is mapped to its
//! family, the fused operations its hot spots run as, LoRA adapters, parameters by
//! name, and HuggingFace checkpoint directories in and out.

pub mod bf16_decoder;
mod cpu_kernels;
pub mod decode;
pub mod family;
pub mod fused;
pub mod gpt2;
#[cfg(feature = "gpu-kernels")]
mod gpu;
pub mod hf;
pub mod kv_cache;
pub mod llama;
pub mod llama_hf;
pub mod lora;
pub mod params;
mod raw;
pub mod sampling;

use std::path::Path;

use anyhow::Result;
use burn::module::{AutodiffModule, Module};
use burn::tensor::{Int, Tensor};

pub use bf16_decoder::Bf16Decoder;
pub use cpu_kernels::gemm_gflops;
pub use family::{Model, ModelConfig};
pub use fused::{FusedOps, KeySpans, TrainBackend};
pub use gpt2::{Gpt2, Gpt2Config, Precision};
pub use kv_cache::KvCache;
pub use llama::{Llama, LlamaConfig};
pub use raw::bf16_native;

/// Rows that pack several examples each: every position's index within its own example (where
/// position embeddings restart), the row position its example starts at (where its attention
/// begins) and, where given, a span of keys each position skips (`KeySpans`).
/// positions, starts: [batch, seq], gaps: [batch, seq, 2]
#[derive(Debug, Clone)]
pub struct Packing<B: burn::tensor::backend::Backend> {
    pub positions: Tensor<B, 2, Int>,
    pub starts: Tensor<B, 2, Int>,
    pub gaps: Option<Tensor<B, 3, Int>>,
}

impl<B: burn::tensor::backend::Backend> Packing<B> {
    /// Where each of a step's `seq` new positions (after `start` cached ones) is, per row: its
    /// position within its example, and with packed rows the keys it attends to.
    /// → [batch, seq], spans
    pub fn layout(
        packing: Option<Self>,
        start: usize,
        [batch, seq]: [usize; 2],
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Option<KeySpans<B>>) {
        match packing {
            Some(Packing { positions, starts, gaps }) => (positions, Some(KeySpans { starts, gaps })),
            None => {
                let positions = Tensor::<B, 1, Int>::arange(start as i64..(start + seq) as i64, device);
                (positions.unsqueeze::<2>().expand([batch, seq]), None)
            }
        }
    }
}

/// Per-token NLL of `targets` at the row-major positions `at` of [batch, seq] (every position
/// when `None`) from the final hidden states of those positions, through the LM head `weight`,
/// the logits a block of rows at a time. rows: [n, width] (or [batch·seq, width]),
/// weight: [width, vocab], targets: [batch, seq], at: [n] → [n] (or [batch·seq])
fn nll_of_rows<B: FusedOps>(
    rows: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    at: Option<Tensor<B, 1, Int>>,
    precision: Precision,
) -> Tensor<B, 1> {
    let [batch, seq] = targets.dims();
    let targets = targets.reshape([batch * seq]); // [batch·seq]
    let targets = match at {
        Some(at) => targets.select(0, at), // [n]
        None => targets,
    };
    fused::lm_head_nll(rows, weight, targets, precision)
}

/// A causal language model: everything the trainer, checkpoints, evaluation, generation,
/// scoring and chat need of a model family.
///
/// Its parameters are named on disk by their module paths (`h.0.attn.c_attn.weight`, see
/// [`params`]): saving, loading and the optimizer state's parameter order all go through those
/// names, so a parameter added to a model is in every checkpoint without a list to update.
pub trait CausalLm<B: FusedOps>: Module<B> + core::fmt::Debug {
    /// What decoding keeps from one step to the next (GPT-2: every layer's keys and values).
    type Cache;

    /// The positions the model attends over.
    fn context(&self) -> usize;

    fn vocab_size(&self) -> usize;

    /// Trainable parameter count (a tied weight counted once).
    fn num_params(&self) -> usize;

    /// What one position costs in the layers' matrix products, counted in what attending to one
    /// more key costs it: how packing weighs a longer row's attention against padding.
    fn position_cost_in_keys(&self) -> usize;

    /// Per-token negative log-likelihood of `targets` given `inputs` (targets are the inputs
    /// shifted left by one). inputs, targets: [batch, seq] → [batch, seq]
    fn token_nll(&self, inputs: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [batch, seq] = inputs.dims();
        self.nll_at(inputs, targets, None, None).reshape([batch, seq])
    }

    /// Per-token NLL of `targets` at the row-major positions `at` of [batch, seq] (every
    /// position when `None`), of rows that may each pack several examples (`packing`: every
    /// example computed as if it were alone in its row). The LM head and its softmax run only
    /// where asked, so a prompt's positions cost no vocabulary-wide products.
    /// inputs, targets: [batch, seq], at: [n] → [n] (or [batch·seq])
    fn nll_at(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        packing: Option<Packing<B>>,
        at: Option<Tensor<B, 1, Int>>,
    ) -> Tensor<B, 1>;

    /// Sum of the per-token NLL at the positions `scored` (those trained on: not prompt, not
    /// padding), the numerator of a token-mean loss. With nothing scored it is a zero that
    /// still reaches every parameter, so each gets its (zero) gradient.
    /// inputs, targets: [batch, seq], scored: [n] → [1]
    fn loss_sum(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        scored: Tensor<B, 1, Int>,
        packing: Option<Packing<B>>,
    ) -> Tensor<B, 1> {
        match scored.dims()[0] {
            0 => {
                let first = Tensor::zeros([1], &inputs.device());
                self.nll_at(inputs, targets, packing, Some(first)).mul_scalar(0.0)
            }
            _ => self.nll_at(inputs, targets, packing, Some(scored)).sum(),
        }
    }

    /// An empty cache for one decoding session.
    fn new_cache(&self) -> Self::Cache;

    /// How many positions `cache` holds.
    fn cached(cache: &Self::Cache) -> usize;

    /// The next-token logits after `tokens`, which follow the positions already in `cache`
    /// (and are added to it). tokens: [batch, seq] → [batch, vocab]
    fn next_logits(&self, tokens: Tensor<B, 2, Int>, cache: &mut Self::Cache) -> Tensor<B, 2>;

    /// The model with its linear layers' products in `precision`.
    fn with_precision(self, precision: Precision) -> Self
    where
        Self: Sized;

    /// A copy of the model for decoding on the CPU with its weights rounded to bf16
    /// (`--precision bf16`).
    fn bf16_decoder(&self) -> Bf16Decoder;

    /// Write the model as a folder in its family's format (GPT-2: a HuggingFace directory);
    /// `eos_id` is the tokenizer's end-of-text id, recorded in the config.
    fn save(&self, dir: &Path, eos_id: Option<usize>) -> Result<()>;

    /// Read a model written by `save` (or by its family's own tools). `dropout` replaces the
    /// folder's dropout probability.
    fn load(dir: &Path, dropout: Option<f64>, device: &B::Device) -> Result<Self>
    where
        Self: Sized;

    /// This model with the weights of a model of the same architecture written by `save`,
    /// keeping its own settings (precision, dropout).
    fn with_weights_of(self, dir: &Path) -> Result<Self>
    where
        Self: Sized;
}

/// A model pipe can train: a [`CausalLm`] under autodiff whose inference copy is one too.
pub trait TrainableLm<B: TrainBackend>:
    CausalLm<B> + AutodiffModule<B, InnerModule: CausalLm<B::InnerBackend>> + 'static
{
}

impl<B: TrainBackend, M> TrainableLm<B> for M where
    M: CausalLm<B> + AutodiffModule<B, InnerModule: CausalLm<B::InnerBackend>> + 'static
{
}
