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

use super::fused::{composite, AdamUpdate, AttentionArgs, FusedOps};
use crate::model::sampling::Sampling;

/// Each listed op runs `kernels::$op` when the tensor named after `dtype of` has an element
/// type the kernels compute for (`kernels::supported`), else `composite::$op`.
macro_rules! cube_kernels {
    ($(fn $method:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty { dtype of $by:ident => $op:ident })*) => {
        $(
            fn $method($($arg: $ty),*) -> $ret {
                if kernels::supported($by.dtype()) {
                    kernels::$op($($arg),*)
                } else {
                    composite::$op::<Self>($($arg),*)
                }
            }
        )*
    };
}

impl<R, F, I, BT> FusedOps for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    cube_kernels! {
        fn adam_step(
            param: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
            update: AdamUpdate,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            dtype of param => adam_step
        }
        fn fused_layer_norm(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            epsilon: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            dtype of x => layer_norm
        }
        fn fused_layer_norm_backward(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            mean: FloatTensor<Self>,
            rstd: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            dtype of x => layer_norm_backward
        }
        fn column_sums(x: FloatTensor<Self>) -> FloatTensor<Self> {
            dtype of x => column_sums
        }
        fn gelu_new(x: FloatTensor<Self>) -> FloatTensor<Self> {
            dtype of x => gelu_new
        }
        fn gelu_new_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
            dtype of x => gelu_new_backward
        }
        fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
            dtype of logits => cross_entropy
        }
        fn cross_entropy_backward(
            logits: FloatTensor<Self>,
            targets: IntTensor<Self>,
            lse: FloatTensor<Self>,
            grad: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            dtype of logits => cross_entropy_backward
        }
    }

    fn causal_attention(qkv: FloatTensor<Self>, args: AttentionArgs<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // The kernels take no gaps: rows with gaps take the composite version.
        match attention::saved_shape(&qkv.shape(), args.n_head, qkv.dtype()).filter(|_| args.gaps.is_none()) {
            Some(_) => attention::causal_attention(qkv, args.n_head, args.keep, args.starts, I::dtype()),
            None => composite::causal_attention::<Self>(qkv, args),
        }
    }

    fn causal_attention_backward(
        qkv: FloatTensor<Self>,
        saved: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        args: AttentionArgs<Self>,
    ) -> FloatTensor<Self> {
        // `saved` is what the forward kept: the kernels' rows or the composite's probabilities.
        let kernels = attention::saved_shape(&qkv.shape(), args.n_head, qkv.dtype()).filter(|_| args.gaps.is_none());
        if kernels.is_some_and(|shape| shape == saved.shape()) {
            let AttentionArgs { n_head, keep, starts, .. } = args;
            attention::causal_attention_backward(qkv, saved, keep, starts, grad, n_head, I::dtype())
        } else {
            composite::causal_attention_backward::<Self>(qkv, saved, grad, args)
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
