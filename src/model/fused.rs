//! Fused operations for the hot spots of a GPT-2 step, as a backend extension: the linear
//! layers, LayerNorm, GELU, causal self-attention, the cross-entropy over the vocabulary and
//! the Adam update are each one operation (the differentiable ones with a hand-written
//! backward) instead of the chain of element-wise tensor ops (each a pass over memory and an
//! autodiff node) that composing them from burn's API costs.
//!
//! Every backend gets the composite versions (burn's own ops; the numerics the fidelity tests
//! check); the CPU backend overrides them with the kernels of `cpu_kernels`, which the tests in
//! `tests/integration/fused.rs` hold to the composite versions. Autodiff wraps whichever the inner backend
//! has, with the backward below.

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

    /// Causal multi-head self-attention over the packed query/key/value projections, and what
    /// the backward needs of it (`attention_saved_shape`): here and on the CPU the attention
    /// probabilities before dropout. `keep` is the dropout mask on the probabilities, already
    /// scaled (0 or 1/(1 − p)); None for no dropout. `starts` confines each position to its own
    /// example in a packed row: the position its example starts at (block-diagonal causal
    /// attention); None for one example per row. The two products (scores, output) run in
    /// `precision`; the softmax is f32.
    /// qkv: [batch, seq, 3·d_model], keep: [batch, heads, seq, seq], starts: [batch, seq]
    /// → ([batch, seq, d_model], saved)
    fn causal_attention(
        qkv: FloatTensor<Self>,
        n_head: usize,
        keep: Option<FloatTensor<Self>>,
        starts: Option<IntTensor<Self>>,
        precision: Precision,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composite::causal_attention::<Self>(qkv, n_head, keep, starts, precision)
    }

    /// The gradient of `causal_attention` with respect to `qkv`, given the output's gradient
    /// and what the forward saved; its four products run in `precision`. (Probabilities are
    /// zero outside the mask, so this version needs no `starts`; a backend that recomputes
    /// them does.) qkv: [batch, seq, 3·d_model], saved: as the forward returned it,
    /// keep: [batch, heads, seq, seq], starts: [batch, seq], grad: [batch, seq, d_model]
    /// → [batch, seq, 3·d_model]
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward(
        qkv: FloatTensor<Self>,
        saved: FloatTensor<Self>,
        keep: Option<FloatTensor<Self>>,
        _starts: Option<IntTensor<Self>>,
        grad: FloatTensor<Self>,
        n_head: usize,
        precision: Precision,
    ) -> FloatTensor<Self> {
        composite::causal_attention_backward::<Self>(qkv, saved, keep, grad, n_head, precision)
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

/// Per-row negative log-likelihood of `targets` under softmax(`logits`).
/// logits: [rows, vocab], targets: [rows] → [rows]
pub fn cross_entropy<B: FusedOps>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let (nll, _lse) = B::cross_entropy(logits.into_primitive().tensor(), targets.into_primitive());
    Tensor::from_primitive(TensorPrimitive::Float(nll))
}

/// Causal multi-head self-attention (no cache: every query sees the keys up to its own position,
/// from its example's first position when `starts` gives packed rows), with dropout `p` on the
/// attention probabilities while training (as GPT-2's `attn_pdrop`), the products in `precision`.
/// qkv: [batch, seq, 3·d_model], starts: [batch, seq] → [batch, seq, d_model]
pub fn causal_attention<B: FusedOps>(
    qkv: Tensor<B, 3>,
    n_head: usize,
    dropout: f64,
    starts: Option<Tensor<B, 2, Int>>,
    precision: Precision,
) -> Tensor<B, 3> {
    let device = qkv.device();
    let keep = (dropout > 0.0 && B::ad_enabled(&device)).then(|| {
        let [batch, seq, _] = qkv.dims();
        let keep = Tensor::<B, 4>::random([batch, n_head, seq, seq], Distribution::Bernoulli(1.0 - dropout), &device);
        (keep / (1.0 - dropout)).into_primitive().tensor()
    });
    let starts = starts.map(Tensor::into_primitive);
    let (y, _probs) = B::causal_attention(qkv.into_primitive().tensor(), n_head, keep, starts, precision);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// The fused ops written with burn's tensor API: what every backend runs unless it has faster
/// kernels, and what those kernels are tested against.
pub mod composite {
    use super::*;

    fn float<B: Backend, const D: usize>(x: FloatTensor<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(x))
    }

    /// burn's own linear op and its gradients. In bf16 every operand is cast to bf16 and every
    /// result back to f32 (burn's bf16 product returns bf16, as PyTorch's autocast does).
    pub fn linear<B: Backend>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        precision: Precision,
    ) -> FloatTensor<B> {
        let (into, out) = casts::<B>(precision);
        out(<B as ModuleOps<B>>::linear(into(x), into(weight), bias.map(into)))
    }

    pub fn linear_backward<B: Backend>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        grad: FloatTensor<B>,
        wanted: LinearGradsWanted,
        precision: Precision,
    ) -> LinearGrads<B> {
        let (into, out) = casts::<B>(precision);
        let bias = wanted.bias.then(|| B::linear_bias_backward(grad.clone()));
        let grad = into(grad);
        let dw = wanted.weight.then(|| out(B::linear_weight_backward(into(x), grad.clone())));
        (out(B::linear_x_backward(into(weight), grad)), dw, bias)
    }

    type Cast<B> = fn(FloatTensor<B>) -> FloatTensor<B>;

    /// Casts into a precision's product dtype and back out to f32 (both identity for f32).
    fn casts<B: Backend>(precision: Precision) -> (Cast<B>, Cast<B>) {
        match precision {
            Precision::F32 => (|x| x, |x| x),
            Precision::Bf16 => (|x| B::float_cast(x, FloatDType::BF16), |x| B::float_cast(x, FloatDType::F32)),
        }
    }

    pub fn column_sums<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        let x = float::<B, 2>(x);
        let cols = x.dims()[1];
        x.sum_dim(0).reshape([cols]).into_primitive().tensor()
    }

    pub fn layer_norm<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        beta: FloatTensor<B>,
        epsilon: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let x = float::<B, 2>(x);
        let (var, mean) = x.clone().var_mean_bias(1); // [rows, 1] each
        let rstd = (var + epsilon).sqrt().recip(); // [rows, 1]
        let gamma = float::<B, 1>(gamma).unsqueeze::<2>();
        let y = (x - mean.clone()) * rstd.clone() * gamma + float::<B, 1>(beta).unsqueeze::<2>();
        let squeeze = |t: Tensor<B, 2>| t.squeeze_dim::<1>(1).into_primitive().tensor();
        (y.into_primitive().tensor(), squeeze(mean), squeeze(rstd))
    }

    /// With x̂ = (x − mean)·rstd and g = grad·gamma: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)),
    /// dgamma = Σ grad·x̂, dbeta = Σ grad over the rows.
    pub fn layer_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        mean: FloatTensor<B>,
        rstd: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let (x, grad) = (float::<B, 2>(x), float::<B, 2>(grad));
        let d = x.dims()[1];
        let rstd = float::<B, 1>(rstd).unsqueeze_dim::<2>(1); // [rows, 1]
        let x_hat = (x - float::<B, 1>(mean).unsqueeze_dim::<2>(1)) * rstd.clone(); // [rows, d]
        let g = grad.clone() * float::<B, 1>(gamma).unsqueeze::<2>();
        let dx = (g.clone() - g.clone().mean_dim(1) - x_hat.clone() * (g * x_hat.clone()).mean_dim(1)) * rstd;
        let dgamma = (grad.clone() * x_hat).sum_dim(0).reshape([d]);
        let dbeta = grad.sum_dim(0).reshape([d]);
        (dx.into_primitive().tensor(), dgamma.into_primitive().tensor(), dbeta.into_primitive().tensor())
    }

    /// burn's Adam/AdamW arithmetic, op for op.
    pub fn adam_step<B: Backend>(
        param: FloatTensor<B>,
        grad: FloatTensor<B>,
        moments: Option<(FloatTensor<B>, FloatTensor<B>)>,
        u: AdamUpdate,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let shape = param.shape();
        let flat = |t: FloatTensor<B>| float::<B, 1>(B::float_reshape(t, Shape::new([shape.num_elements()])));
        let (param, mut grad) = (flat(param), flat(grad));
        if !u.decoupled && u.weight_decay != 0.0 {
            grad = param.clone().mul_scalar(u.weight_decay) + grad;
        }
        let (b1, b2) = (u.beta_1 as f64, u.beta_2 as f64);
        let (m, v) = match moments {
            Some((m, v)) => (flat(m) * b1 + grad.clone() * (1.0 - b1), flat(v) * b2 + grad.square() * (1.0 - b2)),
            None => (grad.clone() * (1.0 - b1), grad.square() * (1.0 - b2)),
        };
        let time = u.time as i32;
        let m_hat = m.clone() / (1.0 - u.beta_1.powi(time)) as f64;
        let v_hat = v.clone() / (1.0 - u.beta_2.powi(time)) as f64;
        let delta = m_hat / (v_hat.sqrt() + u.epsilon as f64);
        let param = if u.decoupled { param * (1.0 - u.lr * u.weight_decay as f64) } else { param };
        let param = param - delta * u.lr;
        let back = |t: Tensor<B, 1>| B::float_reshape(t.into_primitive().tensor(), shape.clone());
        (back(param), back(m), back(v))
    }

    /// 2·√(2/π) and 0.044715 times it: with them, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    /// = x·σ(x·(A + B·x²)), since 0.5·(1 + tanh(z)) = σ(2z).
    pub const GELU_A: f64 = 2.0 * core::f64::consts::FRAC_2_SQRT_PI * core::f64::consts::FRAC_1_SQRT_2;
    pub const GELU_B: f64 = 0.044715 * GELU_A;

    pub fn gelu_new<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        let x = float::<B, 2>(x);
        let inner = x.clone() * (x.clone().square() * GELU_B + GELU_A);
        (x * sigmoid(inner)).into_primitive().tensor()
    }

    /// d/dx x·σ(u) with u = x·(A + B·x²): σ(u) + x·σ(u)·(1 − σ(u))·(A + 3B·x²).
    pub fn gelu_new_backward<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
        let (x, grad) = (float::<B, 2>(x), float::<B, 2>(grad));
        let x2 = x.clone().square();
        let s = sigmoid(x.clone() * (x2.clone() * GELU_B + GELU_A));
        let slope = s.clone() + x * s.clone() * (s.neg() + 1.0) * (x2 * (3.0 * GELU_B) + GELU_A);
        (slope * grad).into_primitive().tensor()
    }

    pub fn cross_entropy<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let logits = float::<B, 2>(logits);
        let targets = Tensor::<B, 1, Int>::from_primitive(targets).unsqueeze_dim::<2>(1); // [rows, 1]
        let log_probs = log_softmax(logits.clone(), 1); // [rows, vocab]
        let nll = log_probs.clone().gather(1, targets).neg().squeeze_dim::<1>(1); // [rows]

        // log-sum-exp = logit − log-prob, at any column.
        let lse = (logits.narrow(1, 0, 1) - log_probs.narrow(1, 0, 1)).squeeze_dim::<1>(1); // [rows]
        (nll.into_primitive().tensor(), lse.into_primitive().tensor())
    }

    pub fn cross_entropy_backward<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
        lse: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let probs = (float::<B, 2>(logits) - float::<B, 1>(lse).unsqueeze_dim::<2>(1)).exp(); // [rows, vocab]
        let grad = float::<B, 1>(grad).unsqueeze_dim::<2>(1); // [rows, 1]
        let targets = Tensor::<B, 1, Int>::from_primitive(targets).unsqueeze_dim::<2>(1); // [rows, 1]

        // −grad at each row's target (a scatter, not a one-hot: no [rows, vocab] mask, no
        // device-to-host bounds check).
        (probs * grad.clone()).scatter(1, targets, grad.neg(), IndexingUpdateOp::Add).into_primitive().tensor()
    }

    /// The logits read to the host and drawn from there. logits: [1, vocab] → [1]
    pub fn sample_token<B: Backend>(logits: FloatTensor<B>, sampling: Sampling, draw: f64) -> IntTensor<B> {
        let logits = float::<B, 2>(logits);
        let device = logits.device();
        let logits = logits.into_data().convert::<f32>().to_vec::<f32>().expect("f32 logits");
        let id = sample_with_draw(&logits, sampling, draw);
        Tensor::<B, 1, Int>::from_data([id as i32], &device).into_primitive()
    }

    /// qkv: [batch, seq, 3·d_model] → queries, keys, values, each [batch, heads, seq, head_dim]
    fn split_heads<B: Backend>(qkv: Tensor<B, 3>, n_head: usize) -> [Tensor<B, 4>; 3] {
        let [batch, seq, three_d] = qkv.dims();
        let d = three_d / 3;
        [0, 1, 2]
            .map(|part| qkv.clone().narrow(2, part * d, d).reshape([batch, seq, n_head, d / n_head]).swap_dims(1, 2))
    }

    /// [batch, heads, seq, head_dim] → [batch, seq, d_model]
    fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, heads, seq, head_dim] = x.dims();
        x.swap_dims(1, 2).reshape([batch, seq, heads * head_dim])
    }

    /// P ⊙ keep, or P without dropout. [batch, heads, seq, seq]
    fn dropped<B: Backend>(probs: Tensor<B, 4>, keep: Option<FloatTensor<B>>) -> Tensor<B, 4> {
        match keep {
            Some(keep) => probs * float::<B, 4>(keep),
            None => probs,
        }
    }

    /// a·b over the two last dimensions, the product in `precision` (as `linear`).
    fn matmul<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>, precision: Precision) -> Tensor<B, 4> {
        let (into, out) = casts::<B>(precision);
        float(out(B::float_matmul(into(a.into_primitive().tensor()), into(b.into_primitive().tensor()))))
    }

    pub fn causal_attention<B: Backend>(
        qkv: FloatTensor<B>,
        n_head: usize,
        keep: Option<FloatTensor<B>>,
        starts: Option<IntTensor<B>>,
        precision: Precision,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let [q, k, v] = split_heads(float::<B, 3>(qkv), n_head);
        let [batch, heads, seq, head_dim] = q.dims();
        let device = q.device();
        let scores = matmul(q, k.swap_dims(2, 3), precision) / (head_dim as f64).sqrt(); // [batch, heads, seq, seq]

        // Expanded to the scores' shape: mask_fill does not broadcast on every backend.
        let future = Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, &device).unsqueeze::<3>().expand([batch, seq, seq]);
        let hidden = match starts {
            // Keys before the query's own example are hidden too.
            Some(starts) => {
                let starts =
                    Tensor::<B, 2, Int>::from_primitive(starts).unsqueeze_dim::<3>(2).expand([batch, seq, seq]);
                let keys =
                    Tensor::<B, 1, Int>::arange(0..seq as i64, &device).unsqueeze::<3>().expand([batch, seq, seq]);
                future.bool_or(keys.lower(starts))
            }
            None => future,
        };
        let hidden = hidden.unsqueeze_dim::<4>(1).expand([batch, heads, seq, seq]);
        let probs = softmax(scores.mask_fill(hidden, f32::NEG_INFINITY), 3); // [batch, heads, seq, seq]
        let y = merge_heads(matmul(dropped(probs.clone(), keep), v, precision)); // [batch, seq, d_model]
        (y.into_primitive().tensor(), probs.into_primitive().tensor())
    }

    pub fn causal_attention_backward<B: Backend>(
        qkv: FloatTensor<B>,
        probs: FloatTensor<B>,
        keep: Option<FloatTensor<B>>,
        grad: FloatTensor<B>,
        n_head: usize,
        precision: Precision,
    ) -> FloatTensor<B> {
        let [q, k, v] = split_heads(float::<B, 3>(qkv), n_head);
        let scale = 1.0 / (q.dims()[3] as f64).sqrt();
        let probs = float::<B, 4>(probs); // [batch, heads, seq, seq]
        let [batch, seq, d] = float::<B, 3>(grad.clone()).dims();
        let dy = float::<B, 3>(grad).reshape([batch, seq, n_head, d / n_head]).swap_dims(1, 2); // [batch, heads, seq, head_dim]
        let dv = matmul(dropped(probs.clone(), keep.clone()).swap_dims(2, 3), dy.clone(), precision);
        let dp = dropped(matmul(dy, v.swap_dims(2, 3), precision), keep); // [batch, heads, seq, seq]
        let ds = probs.clone() * (dp.clone() - (dp * probs).sum_dim(3));
        let dq = matmul(ds.clone(), k, precision) * scale;
        let dk = matmul(ds.swap_dims(2, 3), q, precision) * scale;
        Tensor::cat(vec![merge_heads(dq), merge_heads(dk), merge_heads(dv)], 2).into_primitive().tensor()
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        precision: Precision,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Linear(Precision);
        impl<B: FusedOps, const N: usize> Backward<B, N> for Linear {
            type State = (FloatTensor<B>, FloatTensor<B>); // x, weight
            fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let (x, weight) = ops.state;
                let parents = ops.parents; // x, weight, then bias when N = 3
                let tracked = |i: usize| parents.get(i).is_some_and(Option::is_some);
                let wanted = LinearGradsWanted { weight: tracked(1), bias: tracked(2) };
                let (dx, dw, db) = B::fused_linear_backward(x, weight, grad, wanted, self.0);
                for (parent, grad) in parents.into_iter().zip([Some(dx), dw, db]) {
                    if let (Some(node), Some(grad)) = (parent, grad) {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }
        let state = (x.primitive.clone(), weight.primitive.clone());
        match bias {
            Some(bias) => {
                let y = B::fused_linear(x.primitive, weight.primitive, Some(bias.primitive), precision);
                match Linear(precision).prepare::<C>([x.node, weight.node, bias.node]).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => prep.finish(state, y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            }
            None => {
                let y = B::fused_linear(x.primitive, weight.primitive, None, precision);
                match Linear(precision).prepare::<C>([x.node, weight.node]).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => prep.finish(state, y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            }
        }
    }

    fn gelu_new(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluNew;
        impl<B: FusedOps> Backward<B, 1> for GeluNew {
            type State = FloatTensor<B>; // the input
            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let x = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| B::gelu_new_backward(x, grad));
            }
        }
        match GeluNew.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::gelu_new(x.primitive.clone());
                prep.finish(x.primitive, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_new(x.primitive)),
        }
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct LayerNorm;
        impl<B: FusedOps> Backward<B, 3> for LayerNorm {
            type State = [FloatTensor<B>; 4]; // x, gamma, mean, rstd
            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let [x, gamma, mean, rstd] = ops.state;
                let (dx, dgamma, dbeta) = B::fused_layer_norm_backward(x, gamma, mean, rstd, grad);
                for (parent, grad) in ops.parents.into_iter().zip([dx, dgamma, dbeta]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }
        let (y, mean, rstd) =
            B::fused_layer_norm(x.primitive.clone(), gamma.primitive.clone(), beta.primitive, epsilon);
        let y = match LayerNorm.prepare::<C>([x.node, gamma.node, beta.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish([x.primitive, gamma.primitive, mean.clone(), rstd.clone()], y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(mean), Self::from_inner(rstd))
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct CrossEntropy;
        impl<B: FusedOps> Backward<B, 1> for CrossEntropy {
            type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>); // logits, targets, lse
            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let (logits, targets, lse) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::cross_entropy_backward(logits, targets, lse, grad)
                });
            }
        }
        let (nll, lse) = B::cross_entropy(logits.primitive.clone(), targets.clone());
        let nll = match CrossEntropy.prepare::<C>([logits.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((logits.primitive, targets, lse.clone()), nll),
            OpsKind::UnTracked(prep) => prep.finish(nll),
        };
        (nll, Self::from_inner(lse))
    }

    fn causal_attention(
        qkv: FloatTensor<Self>,
        n_head: usize,
        keep: Option<FloatTensor<Self>>,
        starts: Option<IntTensor<Self>>,
        precision: Precision,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct CausalAttention(Precision);
        impl<B: FusedOps> Backward<B, 1> for CausalAttention {
            // qkv, what the forward saved, dropout mask, starts, heads
            type State = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>, Option<IntTensor<B>>, usize);
            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let (qkv, saved, keep, starts, n_head) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::causal_attention_backward(qkv, saved, keep, starts, grad, n_head, self.0)
                });
            }
        }
        let keep = keep.map(|k| k.primitive); // a constant: no gradient flows to the mask
        let (y, saved) = B::causal_attention(qkv.primitive.clone(), n_head, keep.clone(), starts.clone(), precision);
        let y = match CausalAttention(precision).prepare::<C>([qkv.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((qkv.primitive, saved.clone(), keep, starts, n_head), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(saved))
    }
}

/// Whether a kernel argument is f32 (the CPU kernels are written for f32 alone).
trait IsF32 {
    fn is_f32(&self) -> bool;
}

impl IsF32 for burn::backend::flex::FlexTensor {
    fn is_f32(&self) -> bool {
        self.dtype() == DType::F32
    }
}

impl<T: IsF32> IsF32 for Option<T> {
    fn is_f32(&self) -> bool {
        self.as_ref().is_none_or(T::is_f32)
    }
}

impl<T: IsF32> IsF32 for (T, T) {
    fn is_f32(&self) -> bool {
        self.0.is_f32() && self.1.is_f32()
    }
}

/// Each listed op runs `cpu_kernels::$op` when the float arguments named after `f32:` are all
/// f32, else `composite::$op` (bf16 products, for one).
macro_rules! f32_kernels {
    ($(fn $method:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty { f32: [$($float:ident),*] => $op:ident })*) => {
        $(
            fn $method($($arg: $ty),*) -> $ret {
                if $($float.is_f32())&&* {
                    cpu_kernels::$op($($arg),*)
                } else {
                    composite::$op::<Self>($($arg),*)
                }
            }
        )*
    };
}

type FlexFloat = FloatTensor<Flex>;
type Moments = Option<(FlexFloat, FlexFloat)>;

impl FusedOps for Flex {
    /// The probabilities carry the mask (zero outside it), so `starts` is not needed here.
    fn causal_attention_backward(
        qkv: FlexFloat,
        probs: FlexFloat,
        keep: Option<FlexFloat>,
        _starts: Option<IntTensor<Self>>,
        grad: FlexFloat,
        n_head: usize,
        precision: Precision,
    ) -> FlexFloat {
        if [&qkv, &probs, &grad].iter().all(|t| t.is_f32()) && keep.is_f32() {
            cpu_kernels::causal_attention_backward(qkv, probs, keep, grad, n_head, precision)
        } else {
            composite::causal_attention_backward::<Self>(qkv, probs, keep, grad, n_head, precision)
        }
    }

    f32_kernels! {
        fn fused_linear(x: FlexFloat, weight: FlexFloat, bias: Option<FlexFloat>, precision: Precision) -> FlexFloat {
            f32: [x, weight, bias] => linear
        }
        fn fused_linear_backward(
            x: FlexFloat,
            weight: FlexFloat,
            grad: FlexFloat,
            wanted: LinearGradsWanted,
            precision: Precision,
        ) -> LinearGrads<Self> {
            f32: [x, weight, grad] => linear_backward
        }
        fn adam_step(param: FlexFloat, grad: FlexFloat, moments: Moments, update: AdamUpdate) -> (FlexFloat, FlexFloat, FlexFloat) {
            f32: [param, grad, moments] => adam_step
        }
        fn fused_layer_norm(x: FlexFloat, gamma: FlexFloat, beta: FlexFloat, epsilon: f64) -> (FlexFloat, FlexFloat, FlexFloat) {
            f32: [x, gamma, beta] => layer_norm
        }
        fn fused_layer_norm_backward(
            x: FlexFloat,
            gamma: FlexFloat,
            mean: FlexFloat,
            rstd: FlexFloat,
            grad: FlexFloat,
        ) -> (FlexFloat, FlexFloat, FlexFloat) {
            f32: [x, gamma, mean, rstd, grad] => layer_norm_backward
        }
        fn gelu_new(x: FlexFloat) -> FlexFloat {
            f32: [x] => gelu_new
        }
        fn gelu_new_backward(x: FlexFloat, grad: FlexFloat) -> FlexFloat {
            f32: [x, grad] => gelu_new_backward
        }
        fn cross_entropy(logits: FlexFloat, targets: IntTensor<Self>) -> (FlexFloat, FlexFloat) {
            f32: [logits] => cross_entropy
        }
        fn cross_entropy_backward(logits: FlexFloat, targets: IntTensor<Self>, lse: FlexFloat, grad: FlexFloat) -> FlexFloat {
            f32: [logits, lse, grad] => cross_entropy_backward
        }
        fn causal_attention(
            qkv: FlexFloat,
            n_head: usize,
            keep: Option<FlexFloat>,
            starts: Option<IntTensor<Self>>,
            precision: Precision,
        ) -> (FlexFloat, FlexFloat) {
            f32: [qkv, keep] => causal_attention
        }
    }
}
