//! The CPU backend's fused ops: `cpu_kernels` where every float argument is f32, else the
//! composite versions.

use super::*;

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

impl IsF32 for RotaryArgs<Flex> {
    fn is_f32(&self) -> bool {
        self.cos.is_f32() && self.sin.is_f32()
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
    /// The probabilities carry the mask (zero outside it), so `args.starts` and `args.gaps` are
    /// not needed here.
    fn causal_attention_backward(
        qkv: FlexFloat,
        probs: FlexFloat,
        grad: FlexFloat,
        args: AttentionArgs<Self>,
    ) -> FlexFloat {
        if [&qkv, &probs, &grad].iter().all(|t| t.is_f32()) && args.keep.is_f32() {
            cpu_kernels::causal_attention_backward(qkv, probs, grad, args)
        } else {
            composite::causal_attention_backward::<Self>(qkv, probs, grad, args)
        }
    }

    fn causal_attention(qkv: FlexFloat, args: AttentionArgs<Self>) -> (FlexFloat, FlexFloat) {
        if qkv.is_f32() && args.keep.is_f32() {
            cpu_kernels::causal_attention(qkv, args)
        } else {
            composite::causal_attention::<Self>(qkv, args)
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
        fn fused_rms_norm(x: FlexFloat, weight: FlexFloat, epsilon: f64) -> (FlexFloat, FlexFloat) {
            f32: [x, weight] => rms_norm
        }
        fn fused_rms_norm_backward(x: FlexFloat, weight: FlexFloat, rstd: FlexFloat, grad: FlexFloat) -> (FlexFloat, FlexFloat) {
            f32: [x, weight, rstd, grad] => rms_norm_backward
        }
        fn swiglu(gate: FlexFloat, up: FlexFloat) -> FlexFloat {
            f32: [gate, up] => swiglu
        }
        fn swiglu_backward(gate: FlexFloat, up: FlexFloat, grad: FlexFloat) -> (FlexFloat, FlexFloat) {
            f32: [gate, up, grad] => swiglu_backward
        }
        fn rotary_qkv(q: FlexFloat, k: FlexFloat, v: FlexFloat, rotary: RotaryArgs<Self>) -> FlexFloat {
            f32: [q, k, v, rotary] => rotary_qkv
        }
        fn rotary_qkv_backward(grad: FlexFloat, rotary: RotaryArgs<Self>) -> (FlexFloat, FlexFloat, FlexFloat) {
            f32: [grad, rotary] => rotary_qkv_backward
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
    }
}
