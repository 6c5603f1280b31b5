//! The fused operations through burn's fusion wrapper (`Fusion<B>`, which `Cuda` and `Wgpu`
//! are): each is registered on the fusion client as a custom operation that runs the inner
//! backend's version when the stream reaches it. Without this, a kernel implemented for the
//! inner backend alone would never run under `Cuda`.

use core::marker::PhantomData;

use burn::tensor::backend::BackendTypes;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Element, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::model::fused::{composite, AdamUpdate, AttentionArgs, FusedOps};
use crate::model::gpt2::Precision;
use crate::model::sampling::Sampling;

/// Which of the inner backend's operations a custom operation runs.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    /// Inputs: param, grad (first update) or param, grad, m, v.
    Adam {
        update: AdamUpdate,
        first: bool,
    },
    LayerNorm {
        epsilon: f64,
    },
    LayerNormBackward,
    ColumnSums,
    Gelu,
    GeluBackward,
    /// Inputs: logits, targets (int).
    CrossEntropy,
    /// Inputs: logits, targets (int), lse, grad.
    CrossEntropyBackward,
    /// Inputs: qkv, then the dropout mask and the starts (int) where given.
    Attention {
        n_head: usize,
        precision: Precision,
        dropout: bool,
        packed: bool,
    },
    /// Inputs: qkv, saved, then the dropout mask and the starts (int) where given, then grad.
    AttentionBackward {
        n_head: usize,
        precision: Precision,
        dropout: bool,
        packed: bool,
    },
    /// Input: logits; output: the drawn token (int).
    SampleToken {
        sampling: Sampling,
        draw: f64,
    },
}

#[derive(Debug)]
struct Custom<B> {
    desc: CustomOpIr,
    kernel: Kernel,
    backend: PhantomData<fn() -> B>,
}

impl<B: FusionBackend + FusedOps> Operation<B::FusionRuntime> for Custom<B> {
    fn execute(&self, handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let mut float = |i: usize| handles.get_float_tensor::<B>(&inputs[i]);
        let outputs: Vec<FloatTensor<B>> = match self.kernel {
            Kernel::Adam { update, first } => {
                let (param, grad) = (float(0), float(1));
                let moments = (!first).then(|| (float(2), float(3)));
                let (param, m, v) = B::adam_step(param, grad, moments, update);
                vec![param, m, v]
            }
            Kernel::LayerNorm { epsilon } => {
                let (y, mean, rstd) = B::fused_layer_norm(float(0), float(1), float(2), epsilon);
                vec![y, mean, rstd]
            }
            Kernel::LayerNormBackward => {
                let (dx, dgamma, dbeta) =
                    B::fused_layer_norm_backward(float(0), float(1), float(2), float(3), float(4));
                vec![dx, dgamma, dbeta]
            }
            Kernel::ColumnSums => vec![B::column_sums(float(0))],
            Kernel::Gelu => vec![B::gelu_new(float(0))],
            Kernel::GeluBackward => vec![B::gelu_new_backward(float(0), float(1))],
            Kernel::CrossEntropy => {
                let logits = float(0);
                let targets = handles.get_int_tensor::<B>(&inputs[1]);
                let (nll, lse) = B::cross_entropy(logits, targets);
                vec![nll, lse]
            }
            Kernel::CrossEntropyBackward => {
                let logits = float(0);
                let targets = handles.get_int_tensor::<B>(&inputs[1]);
                let (lse, grad) =
                    (handles.get_float_tensor::<B>(&inputs[2]), handles.get_float_tensor::<B>(&inputs[3]));
                vec![B::cross_entropy_backward(logits, targets, lse, grad)]
            }
            Kernel::Attention { n_head, precision, dropout, packed } => {
                let qkv = float(0);
                let keep = dropout.then(|| float(1));
                let starts = packed.then(|| handles.get_int_tensor::<B>(&inputs[1 + dropout as usize]));
                let (y, saved) =
                    B::causal_attention(qkv, AttentionArgs { n_head, keep, starts, gaps: None, precision });
                vec![y, saved]
            }
            Kernel::AttentionBackward { n_head, precision, dropout, packed } => {
                let (qkv, saved) = (float(0), float(1));
                let keep = dropout.then(|| float(2));
                let starts = packed.then(|| handles.get_int_tensor::<B>(&inputs[2 + dropout as usize]));
                let grad = handles.get_float_tensor::<B>(&inputs[inputs.len() - 1]);
                vec![B::causal_attention_backward(
                    qkv,
                    saved,
                    grad,
                    AttentionArgs { n_head, keep, starts, gaps: None, precision },
                )]
            }
            Kernel::SampleToken { sampling, draw } => {
                let token = B::sample_token(float(0), sampling, draw);
                handles.register_int_tensor::<B>(&self.desc.outputs[0].id, token);
                vec![]
            }
        };
        for (output, tensor) in self.desc.outputs.iter().zip(outputs) {
            handles.register_float_tensor::<B>(&output.id, tensor);
        }
    }
}

/// Registers `kernel` on the fusion stream of its first input; returns its outputs, each of
/// the given shape and element type (float, or int for a drawn token).
fn register<B: FusionBackend + FusedOps, const N: usize>(
    kernel: Kernel,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: [(Shape, DType); N],
) -> [FusionTensor<B::FusionRuntime>; N] {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs = outputs.map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new("pipe_fused_op", &inputs, &outputs);
    let op = Custom::<B> { desc: desc.clone(), kernel, backend: PhantomData };
    match client.register(streams, OperationIr::Custom(desc), op).try_into() {
        Ok(outputs) => outputs,
        Err(_) => unreachable!("the fusion client returns one tensor per output it was given"),
    }
}

fn like<R: FusionRuntime>(t: &FusionTensor<R>) -> (Shape, DType) {
    (t.shape.clone(), t.dtype)
}

/// [rows] with the element type of `t`, whose first axis is the rows.
fn per_row<R: FusionRuntime>(t: &FusionTensor<R>) -> (Shape, DType) {
    (Shape::new([t.shape[0]]), t.dtype)
}

impl<B: FusionBackend + FusedOps> FusedOps for Fusion<B> {
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moments: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        update: AdamUpdate,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let out = like(&param);
        let first = moments.is_none();
        let mut inputs = vec![param, grad];
        inputs.extend(moments.into_iter().flat_map(|(m, v)| [m, v]));
        let [param, m, v] = register::<B, 3>(Kernel::Adam { update, first }, inputs, [out.clone(), out.clone(), out]);
        (param, m, v)
    }

    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let outputs = [like(&x), per_row(&x), per_row(&x)];
        let [y, mean, rstd] = register::<B, 3>(Kernel::LayerNorm { epsilon }, vec![x, gamma, beta], outputs);
        (y, mean, rstd)
    }

    fn fused_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let outputs = [like(&x), like(&gamma), like(&gamma)];
        let [dx, dgamma, dbeta] =
            register::<B, 3>(Kernel::LayerNormBackward, vec![x, gamma, mean, rstd, grad], outputs);
        (dx, dgamma, dbeta)
    }

    fn column_sums(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = (Shape::new([x.shape[1]]), x.dtype);
        let [sums] = register::<B, 1>(Kernel::ColumnSums, vec![x], [out]);
        sums
    }

    fn gelu_new(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = like(&x);
        let [y] = register::<B, 1>(Kernel::Gelu, vec![x], [out]);
        y
    }

    fn gelu_new_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = like(&x);
        let [dx] = register::<B, 1>(Kernel::GeluBackward, vec![x, grad], [out]);
        dx
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let outputs = [per_row(&logits), per_row(&logits)];
        let [nll, lse] = register::<B, 2>(Kernel::CrossEntropy, vec![logits, targets], outputs);
        (nll, lse)
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let out = like(&logits);
        let [dlogits] = register::<B, 1>(Kernel::CrossEntropyBackward, vec![logits, targets, lse, grad], [out]);
        dlogits
    }

    fn causal_attention(qkv: FloatTensor<Self>, args: AttentionArgs<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // The composite version runs through fusion itself, so that its element-wise ops fuse;
        // it is also the one for rows with gaps, which the kernels do not take.
        let kernels = B::attention_saved_shape(&qkv.shape, args.n_head, qkv.dtype).filter(|_| args.gaps.is_none());
        let Some(saved) = kernels else {
            return composite::causal_attention::<Self>(qkv, args);
        };
        let AttentionArgs { n_head, keep, starts, precision, .. } = args;
        let [batch, seq, three_d] = qkv.shape.dims();
        let (y, saved) = ((Shape::new([batch, seq, three_d / 3]), qkv.dtype), (saved, qkv.dtype));
        let kernel = Kernel::Attention { n_head, precision, dropout: keep.is_some(), packed: starts.is_some() };
        let inputs = [Some(qkv), keep, starts].into_iter().flatten().collect();
        let [y, saved] = register::<B, 2>(kernel, inputs, [y, saved]);
        (y, saved)
    }

    fn causal_attention_backward(
        qkv: FloatTensor<Self>,
        saved: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        args: AttentionArgs<Self>,
    ) -> FloatTensor<Self> {
        let kernels = B::attention_saved_shape(&qkv.shape, args.n_head, qkv.dtype).filter(|_| args.gaps.is_none());
        if kernels.is_none_or(|shape| shape != saved.shape) {
            return composite::causal_attention_backward::<Self>(qkv, saved, grad, args);
        }
        let AttentionArgs { n_head, keep, starts, precision, .. } = args;
        let out = like(&qkv);
        let kernel = Kernel::AttentionBackward { n_head, precision, dropout: keep.is_some(), packed: starts.is_some() };
        let inputs = [Some(qkv), Some(saved), keep, starts, Some(grad)].into_iter().flatten().collect();
        let [dqkv] = register::<B, 1>(kernel, inputs, [out]);
        dqkv
    }

    fn attention_saved_shape(qkv: &Shape, n_head: usize, dtype: DType) -> Option<Shape> {
        B::attention_saved_shape(qkv, n_head, dtype)
    }

    fn sample_token(logits: FloatTensor<Self>, sampling: Sampling, draw: f64) -> IntTensor<Self> {
        let out = (Shape::new([1]), <B as BackendTypes>::IntElem::dtype());
        let [token] = register::<B, 1>(Kernel::SampleToken { sampling, draw }, vec![logits], [out]);
        token
    }
}
