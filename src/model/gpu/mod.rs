//! The fused operations on the GPU backends: cubecl kernels (`kernels`, flash-style
//! `attention`, the next token's draw in `sampling`) for burn's cube backend, and the same
//! kernels reached through burn's fusion wrapper, which is what `Cuda` and `Wgpu` are. The
//! linear layers' products stay burn's autotuned matmuls (their bias gradients are
//! `column_sums` here).
//!
//! `tests/wgpu.rs` holds every kernel to its composite version, forward and backward, on both
//! types.

mod attention;
mod fusion;
mod kernels;
mod sampling;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::fused::{composite, AdamUpdate, FusedOps};
use super::gpt2::Precision;
use crate::generate::Sampling;

impl<R, F, I, BT> FusedOps for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        update: AdamUpdate,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if kernels::supported(param.dtype()) {
            kernels::adam_step(param, grad, moments, update)
        } else {
            composite::adam_step::<Self>(param, grad, moments, update)
        }
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if kernels::supported(x.dtype()) {
            kernels::layer_norm(x, gamma, beta, epsilon)
        } else {
            composite::layer_norm::<Self>(x, gamma, beta, epsilon)
        }
    }

    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if kernels::supported(x.dtype()) {
            kernels::layer_norm_backward(x, gamma, mean, rstd, grad)
        } else {
            composite::layer_norm_backward::<Self>(x, gamma, mean, rstd, grad)
        }
    }

    fn column_sums(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if kernels::supported(x.dtype()) {
            kernels::column_sums(x)
        } else {
            composite::column_sums::<Self>(x)
        }
    }

    fn gelu_new(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if kernels::supported(x.dtype()) {
            kernels::gelu_new(x)
        } else {
            composite::gelu_new::<Self>(x)
        }
    }

    fn gelu_new_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if kernels::supported(x.dtype()) {
            kernels::gelu_new_backward(x, grad)
        } else {
            composite::gelu_new_backward::<Self>(x, grad)
        }
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if kernels::supported(logits.dtype()) {
            kernels::cross_entropy(logits, targets)
        } else {
            composite::cross_entropy::<Self>(logits, targets)
        }
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if kernels::supported(logits.dtype()) {
            kernels::cross_entropy_backward(logits, targets, lse, grad)
        } else {
            composite::cross_entropy_backward::<Self>(logits, targets, lse, grad)
        }
    }

    fn causal_attention(
        qkv: FloatTensor<Self>,
        n_head: usize,
        keep: Option<FloatTensor<Self>>,
        starts: Option<IntTensor<Self>>,
        precision: Precision,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match attention::saved_shape(&qkv.shape(), n_head, qkv.dtype()) {
            Some(_) => attention::causal_attention(qkv, n_head, keep, starts, I::dtype()),
            None => composite::causal_attention::<Self>(qkv, n_head, keep, starts, precision),
        }
    }

    fn causal_attention_backward(
        qkv: FloatTensor<Self>,
        saved: FloatTensor<Self>,
        keep: Option<FloatTensor<Self>>,
        starts: Option<IntTensor<Self>>,
        grad: FloatTensor<Self>,
        n_head: usize,
        precision: Precision,
    ) -> FloatTensor<Self> {
        // `saved` is what the forward kept: the kernels' rows or the composite's probabilities.
        if attention::saved_shape(&qkv.shape(), n_head, qkv.dtype()).is_some_and(|shape| shape == saved.shape()) {
            attention::causal_attention_backward(qkv, saved, keep, starts, grad, n_head, I::dtype())
        } else {
            composite::causal_attention_backward::<Self>(qkv, saved, keep, grad, n_head, precision)
        }
    }

    fn attention_saved_shape(qkv: &Shape, n_head: usize, dtype: DType) -> Option<Shape> {
        attention::saved_shape(qkv, n_head, dtype)
    }

    fn sample_token(logits: FloatTensor<Self>, sampling: Sampling, draw: f64) -> IntTensor<Self> {
        if kernels::supported(logits.dtype()) {
            sampling::sample(logits, I::dtype(), sampling, draw)
        } else {
            composite::sample_token::<Self>(logits, sampling, draw)
        }
    }
}
