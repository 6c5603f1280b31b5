//! Fused operations for the hot spots of a training step, as a backend extension: the linear
//! layers, LayerNorm and RMSNorm, GELU and SwiGLU, the rotary embedding of grouped-query
//! attention, causal self-attention, the cross-entropy over the vocabulary and the Adam update
//! are each one operation (the differentiable ones with a hand-written
//! backward) instead of the chain of element-wise tensor ops (each a pass over memory and an
//! autodiff node) that composing them from burn's API costs.
//!
//! One op, one place per role: the trait and the tensor-level calls here; the composite
//! versions every backend gets (burn's own ops; the numerics the fidelity tests check) in
//! `composite.rs`; the hand-written backward passes autodiff wraps them with in `autodiff.rs`;
//! the CPU backend's kernels (`cpu_kernels`) plugged in by `cpu.rs`; the GPU backends' in
//! `model/gpu/`. `tests/integration/fused.rs` holds each kernel to its composite version.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, IntTensor, ModuleOps};
use burn::tensor::{
    Bool, DType, Distribution, FloatDType, IndexingUpdateOp, Int, Shape, Tensor, TensorMetadata, TensorPrimitive,
};
use serde::Serialize;

use super::cpu_kernels;
use super::gpt2::Precision;
use crate::model::sampling::{sample_with_draw, Sampling};

mod autodiff;
pub mod composite;
mod cpu;

/// What causal attention runs with besides the packed projections: the heads; the dropout mask
/// on the probabilities, already scaled (0 or 1/(1 − p); None for no dropout); for packed rows,
/// the position each position's example starts at (block-diagonal causal attention; None for
/// one example a row) and, where given, a span [from, to) of keys each position skips (see
/// `KeySpans`); and the precision of the products (the softmax is f32).
/// keep: [batch, heads, seq, seq], starts: [batch, seq], gaps: [batch, seq, 2]
#[derive(Debug, Clone)]
pub struct AttentionArgs<B: Backend> {
    pub n_head: usize,
    pub keep: Option<FloatTensor<B>>,
    pub starts: Option<IntTensor<B>>,
    pub gaps: Option<IntTensor<B>>,
    pub precision: Precision,
}

/// Which keys each query of packed rows attends to: those from its example's start (`starts`)
/// up to itself, less the span [from, to) that `gaps` gives it, where given (an empty span,
/// from = to, skips nothing). A gap lets two continuations of one prefix share a row and the
/// prefix's computation: the second skips the first (see `dpo`). A gap never holds the query
/// itself. starts: [batch, seq], gaps: [batch, seq, 2]
#[derive(Debug, Clone)]
pub struct KeySpans<B: Backend> {
    pub starts: Tensor<B, 2, Int>,
    pub gaps: Option<Tensor<B, 3, Int>>,
}

/// The rotary embedding at every row's position, and the head counts `rotary_qkv` spreads
/// between: row r's pair i of a head is rotated by the angle whose cosine and sine are
/// `cos[r, i]`, `sin[r, i]` (dimension i with dimension i + head_dim/2, as transformers pairs
/// them). cos, sin: [rows, head_dim / 2]
#[derive(Debug, Clone)]
pub struct RotaryArgs<B: Backend> {
    pub cos: FloatTensor<B>,
    pub sin: FloatTensor<B>,
    pub heads: usize,
    pub kv_heads: usize,
}

/// A backend pipe's model runs on: burn's ops plus the fused ones.
pub trait FusedOps: Backend {
    /// x·weight + bias, the product in `precision` (see `Precision`).
    /// x: [rows, in], weight: [in, out], bias: [out] → [rows, out]
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        precision: Precision,
    ) -> FloatTensor<Self> {
        composite::linear::<Self>(x, weight, bias, precision)
    }

    /// The gradients of `fused_linear` for x, and for weight and bias where asked (a frozen
    /// weight needs none), given the output's, the products in `precision`. The bias's is
    /// `column_sums` of the output's.
    fn fused_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        wanted: LinearGradsWanted,
        precision: Precision,
    ) -> LinearGrads<Self> {
        let bias = wanted.bias.then(|| Self::column_sums(grad.clone()));
        let (dx, dw, _) =
            composite::linear_backward::<Self>(x, weight, grad, LinearGradsWanted { bias: false, ..wanted }, precision);
        (dx, dw, bias)
    }

    /// Each column's sum over the rows. x: [rows, cols] → [cols]
    fn column_sums(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::column_sums::<Self>(x)
    }

    /// One Adam(W) update of a parameter of any shape: the new parameter and first and second
    /// moments (`moments` is None before the first update).
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        update: AdamUpdate,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composite::adam_step::<Self>(param, grad, moments, update)
    }

    /// LayerNorm of each row (biased variance, ε inside the square root), and each row's mean
    /// and 1/σ (kept for the backward). x: [rows, d], gamma, beta: [d] → ([rows, d], [rows], [rows])
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composite::layer_norm::<Self>(x, gamma, beta, epsilon)
    }

    /// The gradients of `fused_layer_norm` for x, gamma and beta, given the output's.
    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composite::layer_norm_backward::<Self>(x, gamma, mean, rstd, grad)
    }

    /// RMSNorm of each row, x/√(mean(x²) + ε)·weight, and each row's 1/√(mean(x²) + ε) (kept
    /// for the backward). x: [rows, d], weight: [d] → ([rows, d], [rows])
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composite::rms_norm::<Self>(x, weight, epsilon)
    }

    /// The gradients of `fused_rms_norm` for x and weight, given the output's.
    fn fused_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composite::rms_norm_backward::<Self>(x, weight, rstd, grad)
    }

    /// The SwiGLU MLP's gate: silu(gate)·up. gate, up: [rows, inner] → [rows, inner]
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::swiglu::<Self>(gate, up)
    }

    /// The gradients of `swiglu` for gate and up, given the output's. [rows, inner] each.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composite::swiglu_backward::<Self>(gate, up, grad)
    }

    /// The packed q·k·v that `causal_attention` reads, from the projections: queries and keys
    /// rotated by the rotary embedding, keys and values spread from the key/value heads to the
    /// heads they serve (`rotary.heads / rotary.kv_heads` each, in order).
    /// q: [rows, heads·head_dim], k, v: [rows, kv_heads·head_dim] → [rows, 3·heads·head_dim]
    fn rotary_qkv(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        rotary: RotaryArgs<Self>,
    ) -> FloatTensor<Self> {
        composite::rotary_qkv::<Self>(q, k, v, rotary)
    }

    /// The gradients of `rotary_qkv` for q, k and v, given the packed output's: each rotation
    /// undone, and the gradients of the heads a key/value head serves summed.
    /// grad: [rows, 3·heads·head_dim] → ([rows, heads·head_dim], [rows, kv_heads·head_dim] × 2)
    fn rotary_qkv_backward(
        grad: FloatTensor<Self>,
        rotary: RotaryArgs<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composite::rotary_qkv_backward::<Self>(grad, rotary)
    }

    /// GPT-2's tanh GELU. x: [rows, cols] → [rows, cols]
    fn gelu_new(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::gelu_new::<Self>(x)
    }

    /// The gradient of `gelu_new` at `x`, given the output's gradient. [rows, cols] each.
    fn gelu_new_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::gelu_new_backward::<Self>(x, grad)
    }

    /// Negative log-likelihood of each row's target, and each row's log-sum-exp (kept for the
    /// backward). logits: [rows, vocab], targets: [rows] → ([rows], [rows])
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composite::cross_entropy::<Self>(logits, targets)
    }

    /// The gradient of the NLL with respect to the logits: (softmax − one-hot) · grad per row.
    /// logits: [rows, vocab], targets, lse, grad: [rows] → [rows, vocab]
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composite::cross_entropy_backward::<Self>(logits, targets, lse, grad)
    }

    /// The per-row NLL of `targets` under softmax(x·weight) and each row's log-sum-exp, computed
    /// a block of rows at a time (`lm_head_blocks`) so that the logits of a large vocabulary are
    /// never held whole; under autodiff the backward recomputes each block's logits.
    /// x: [rows, d], weight: [d, vocab], targets: [rows] → ([rows], [rows])
    fn lm_head_nll(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        precision: Precision,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (rows, vocab) = (x.shape().dims::<2>()[0], weight.shape().dims::<2>()[1]);
        let (mut nll, mut lse) = (Vec::new(), Vec::new());
        for block in lm_head_blocks(rows, vocab) {
            let logits = Self::fused_linear(rows_of::<Self>(x.clone(), block.clone()), weight.clone(), None, precision);
            let (block_nll, block_lse) = Self::cross_entropy(logits, int_rows_of::<Self>(targets.clone(), block));
            nll.push(block_nll);
            lse.push(block_lse);
        }
        (cat_rows::<Self>(nll), cat_rows::<Self>(lse))
    }

    /// Causal multi-head self-attention over the packed query/key/value projections, and what
    /// the backward needs of it (`attention_saved_shape`): here and on the CPU the attention
    /// probabilities before dropout. The two products (scores, output) run in `args.precision`.
    /// qkv: [batch, seq, 3·d_model] → ([batch, seq, d_model], saved)
    fn causal_attention(qkv: FloatTensor<Self>, args: AttentionArgs<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composite::causal_attention::<Self>(qkv, args)
    }

    /// The gradient of `causal_attention` with respect to `qkv`, given the output's gradient
    /// and what the forward saved, with the forward's `args`; its four products run in
    /// `args.precision`. (Probabilities are zero outside the mask, so this version needs no
    /// `args.starts` or `args.gaps`; a backend that recomputes them does.) qkv: [batch, seq, 3·d_model],
    /// saved: as the forward returned it, grad: [batch, seq, d_model] → [batch, seq, 3·d_model]
    fn causal_attention_backward(
        qkv: FloatTensor<Self>,
        saved: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        args: AttentionArgs<Self>,
    ) -> FloatTensor<Self> {
        composite::causal_attention_backward::<Self>(qkv, saved, grad, args)
    }

    /// Where this backend's own attention kernels take attention over qkv of this shape and
    /// element type, the shape of what their forward saves for the backward; None where the
    /// composite version runs (which saves the probabilities). qkv: [batch, seq, 3·d_model]
    fn attention_saved_shape(_qkv: &Shape, _n_head: usize, _dtype: DType) -> Option<Shape> {
        None
    }

    /// The token `generate::sample_with_draw` draws from these logits with `draw` ∈ [0, 1), at
    /// a temperature above 0. Here the logits are read to the host and drawn from there; the
    /// GPU backends draw on the device and read back only the id. logits: [1, vocab] → [1]
    fn sample_token(logits: FloatTensor<Self>, sampling: Sampling, draw: f64) -> IntTensor<Self> {
        composite::sample_token::<Self>(logits, sampling, draw)
    }
}

/// Which attention the GPU backends run: their flash-style kernels, or the composite version
/// built from burn's ops (`pipe bench --gpu-attention`, to measure one against the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GpuAttention {
    #[default]
    Kernels,
    Composite,
}

/// The widest head the GPU attention kernels take (they keep a row in registers); wider heads
/// take the composite version.
pub const GPU_ATTENTION_MAX_HEAD_DIM: usize = 128;

/// The process's choice of `GpuAttention` (kernels unless set): a setting of the whole process,
/// as burn's autotune cache is, so that every layer of every model makes the same choice.
static GPU_ATTENTION_COMPOSITE: AtomicBool = AtomicBool::new(false);

pub fn set_gpu_attention(choice: GpuAttention) {
    GPU_ATTENTION_COMPOSITE.store(choice == GpuAttention::Composite, Ordering::Relaxed);
}

pub fn gpu_attention() -> GpuAttention {
    match GPU_ATTENTION_COMPOSITE.load(Ordering::Relaxed) {
        true => GpuAttention::Composite,
        false => GpuAttention::Kernels,
    }
}

/// One Adam or AdamW update's settings; `time` counts this update (1 for the first).
#[derive(Debug, Clone, Copy)]
pub struct AdamUpdate {
    pub lr: f64,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    /// AdamW's decoupled decay (p ← p·(1 − lr·wd)) rather than Adam's L2 term (g ← g + wd·p).
    pub decoupled: bool,
    pub time: usize,
}

/// The gradients of a linear layer: input, and weight and bias where wanted.
pub type LinearGrads<B> = (FloatTensor<B>, Option<FloatTensor<B>>, Option<FloatTensor<B>>);

/// Which parameter gradients a linear layer's backward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearGradsWanted {
    pub weight: bool,
    pub bias: bool,
}

/// A backend pipe trains on: autodiff over a backend with the fused ops.
pub trait TrainBackend: AutodiffBackend<InnerBackend: FusedOps> + FusedOps {}
impl<B> TrainBackend for B where B: AutodiffBackend<InnerBackend: FusedOps> + FusedOps {}

/// x·weight + bias, the product in `precision`. x: [rows, in], weight: [in, out], bias: [out] → [rows, out]
pub fn linear<B: FusedOps>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    precision: Precision,
) -> Tensor<B, 2> {
    let bias = bias.map(|b| b.into_primitive().tensor());
    let y = B::fused_linear(x.into_primitive().tensor(), weight.into_primitive().tensor(), bias, precision);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// LayerNorm of each row. x: [rows, d], gamma, beta: [d] → [rows, d]
pub fn layer_norm<B: FusedOps>(x: Tensor<B, 2>, gamma: Tensor<B, 1>, beta: Tensor<B, 1>, epsilon: f64) -> Tensor<B, 2> {
    let (x, gamma, beta) =
        (x.into_primitive().tensor(), gamma.into_primitive().tensor(), beta.into_primitive().tensor());
    let (y, _mean, _rstd) = B::fused_layer_norm(x, gamma, beta, epsilon);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// GPT-2's "gelu_new", the tanh approximation of GELU. x: [rows, cols] → [rows, cols]
pub fn gelu_new<B: FusedOps>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::gelu_new(x.into_primitive().tensor())))
}

/// RMSNorm of each row: x/√(mean(x²) + ε)·weight. x: [rows, d], weight: [d] → [rows, d]
pub fn rms_norm<B: FusedOps>(x: Tensor<B, 2>, weight: Tensor<B, 1>, epsilon: f64) -> Tensor<B, 2> {
    let (y, _rstd) = B::fused_rms_norm(x.into_primitive().tensor(), weight.into_primitive().tensor(), epsilon);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// silu(gate)·up. gate, up: [rows, inner] → [rows, inner]
pub fn swiglu<B: FusedOps>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::swiglu(
        gate.into_primitive().tensor(),
        up.into_primitive().tensor(),
    )))
}

/// The packed, rotated q·k·v of grouped-query attention (`FusedOps::rotary_qkv`).
/// q: [rows, heads·head_dim], k, v: [rows, kv_heads·head_dim], cos, sin: [rows, head_dim / 2]
/// → [rows, 3·heads·head_dim]
pub fn rotary_qkv<B: FusedOps>(
    q: Tensor<B, 2>,
    k: Tensor<B, 2>,
    v: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    heads: usize,
    kv_heads: usize,
) -> Tensor<B, 2> {
    let rotary = RotaryArgs { cos: cos.into_primitive().tensor(), sin: sin.into_primitive().tensor(), heads, kv_heads };
    let prim = |t: Tensor<B, 2>| t.into_primitive().tensor();
    Tensor::from_primitive(TensorPrimitive::Float(B::rotary_qkv(prim(q), prim(k), prim(v), rotary)))
}

/// The most logits `lm_head_nll` holds at once (256 MiB of f32): below it the rows are one block.
const LM_HEAD_BLOCK_VALUES: usize = 1 << 26;

std::thread_local! {
    /// `LM_HEAD_BLOCK_VALUES`, or another bound set for this thread by `with_lm_head_block_values`.
    static BLOCK_VALUES: std::cell::Cell<usize> = const { std::cell::Cell::new(LM_HEAD_BLOCK_VALUES) };
}

/// Run `f` with `lm_head_nll` holding at most `values` logits at once on this thread (the
/// tests hold the blocked computation to the whole one at small sizes).
pub fn with_lm_head_block_values<R>(values: usize, f: impl FnOnce() -> R) -> R {
    let before = BLOCK_VALUES.with(|v| v.replace(values.max(1)));
    let out = f();
    BLOCK_VALUES.with(|v| v.set(before));
    out
}

/// The row blocks `lm_head_nll` computes one at a time for `rows` rows of a `vocab`-wide head.
pub fn lm_head_blocks(rows: usize, vocab: usize) -> Vec<std::ops::Range<usize>> {
    let block = (BLOCK_VALUES.with(std::cell::Cell::get) / vocab.max(1)).max(1);
    (0..rows).step_by(block).map(|start| start..(start + block).min(rows)).collect()
}

/// Rows `range` of x. x: [rows, cols] → [range.len(), cols]
fn rows_of<B: Backend>(x: FloatTensor<B>, range: std::ops::Range<usize>) -> FloatTensor<B> {
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    x.narrow(0, range.start, range.len()).into_primitive().tensor()
}

/// Entries `range` of x. x: [rows] → [range.len()]
fn int_rows_of<B: Backend>(x: IntTensor<B>, range: std::ops::Range<usize>) -> IntTensor<B> {
    Tensor::<B, 1, Int>::from_primitive(x).narrow(0, range.start, range.len()).into_primitive()
}

/// One-dimensional blocks joined in order. [n₀], [n₁], … → [n₀ + n₁ + …]
fn cat_rows<B: Backend>(blocks: Vec<FloatTensor<B>>) -> FloatTensor<B> {
    match blocks.len() {
        1 => blocks.into_iter().next().expect("one block"),
        _ => {
            let blocks =
                blocks.into_iter().map(|b| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(b))).collect();
            Tensor::cat(blocks, 0).into_primitive().tensor()
        }
    }
}

/// The gradients of `lm_head_nll` for x, and for weight where asked, given the NLL's: each
/// block's logits recomputed, its softmax − one-hot through the head's backward.
fn lm_head_nll_backward<B: FusedOps>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    weight_wanted: bool,
    precision: Precision,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let (rows, vocab) = (x.shape().dims::<2>()[0], weight.shape().dims::<2>()[1]);
    let one = |x: &FloatTensor<B>, range: &std::ops::Range<usize>| rows_of::<B>(x.clone(), range.clone());
    let (mut dx, mut dw): (Vec<FloatTensor<B>>, Option<FloatTensor<B>>) = (Vec::new(), None);
    for block in lm_head_blocks(rows, vocab) {
        let x_block = one(&x, &block);
        let logits = B::fused_linear(x_block.clone(), weight.clone(), None, precision); // [block, vocab]
        let lse = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(lse.clone()));
        let lse = lse.narrow(0, block.start, block.len()).into_primitive().tensor();
        let grad = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grad.clone()));
        let grad = grad.narrow(0, block.start, block.len()).into_primitive().tensor();
        let dlogits = B::cross_entropy_backward(logits, int_rows_of::<B>(targets.clone(), block), lse, grad);
        let wanted = LinearGradsWanted { weight: weight_wanted, bias: false };
        let (dx_block, dw_block, _) = B::fused_linear_backward(x_block, weight.clone(), dlogits, wanted, precision);
        dx.push(dx_block);
        dw = match (dw, dw_block) {
            (Some(sum), Some(block)) => Some(B::float_add(sum, block)),
            (sum, block) => sum.or(block),
        };
    }
    let dx = match dx.len() {
        1 => dx.into_iter().next().expect("one block"),
        _ => {
            let blocks = dx.into_iter().map(|b| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(b))).collect();
            Tensor::cat(blocks, 0).into_primitive().tensor()
        }
    };
    (dx, dw)
}

/// Per-row NLL of `targets` under softmax(x·weight), the LM head and the loss in one
/// (`FusedOps::lm_head_nll`). x: [rows, d], weight: [d, vocab], targets: [rows] → [rows]
pub fn lm_head_nll<B: FusedOps>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    precision: Precision,
) -> Tensor<B, 1> {
    let (x, weight) = (x.into_primitive().tensor(), weight.into_primitive().tensor());
    let (nll, _lse) = B::lm_head_nll(x, weight, targets.into_primitive(), precision);
    Tensor::from_primitive(TensorPrimitive::Float(nll))
}

/// Per-row negative log-likelihood of `targets` under softmax(`logits`).
/// logits: [rows, vocab], targets: [rows] → [rows]
pub fn cross_entropy<B: FusedOps>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let (nll, _lse) = B::cross_entropy(logits.into_primitive().tensor(), targets.into_primitive());
    Tensor::from_primitive(TensorPrimitive::Float(nll))
}

/// Causal multi-head self-attention (no cache: every query sees the keys up to its own position,
/// within its `spans` when given for packed rows), with dropout `p` on the attention
/// probabilities while training (as GPT-2's `attn_pdrop`), the products in `precision`.
/// qkv: [batch, seq, 3·d_model] → [batch, seq, d_model]
pub fn causal_attention<B: FusedOps>(
    qkv: Tensor<B, 3>,
    n_head: usize,
    dropout: f64,
    spans: Option<KeySpans<B>>,
    precision: Precision,
) -> Tensor<B, 3> {
    let device = qkv.device();
    let keep = (dropout > 0.0 && B::ad_enabled(&device)).then(|| {
        let [batch, seq, _] = qkv.dims();
        let keep = Tensor::<B, 4>::random([batch, n_head, seq, seq], Distribution::Bernoulli(1.0 - dropout), &device);
        (keep / (1.0 - dropout)).into_primitive().tensor()
    });
    let (starts, gaps) = match spans {
        Some(KeySpans { starts, gaps }) => (Some(starts.into_primitive()), gaps.map(Tensor::into_primitive)),
        None => (None, None),
    };
    let args = AttentionArgs { n_head, keep, starts, gaps, precision };
    let (y, _probs) = B::causal_attention(qkv.into_primitive().tensor(), args);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}
