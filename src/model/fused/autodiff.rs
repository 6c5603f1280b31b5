//! The fused ops under autodiff: each forward runs the inner backend's op (its kernel or the
//! composite version) and records a hand-written backward pass.

use super::*;

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

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct RmsNorm;
        impl<B: FusedOps> Backward<B, 2> for RmsNorm {
            type State = [FloatTensor<B>; 3]; // x, weight, rstd
            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let [x, weight, rstd] = ops.state;
                let (dx, dweight) = B::fused_rms_norm_backward(x, weight, rstd, grad);
                for (parent, grad) in ops.parents.into_iter().zip([dx, dweight]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }
        let (y, rstd) = B::fused_rms_norm(x.primitive.clone(), weight.primitive.clone(), epsilon);
        let y = match RmsNorm.prepare::<C>([x.node, weight.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish([x.primitive, weight.primitive, rstd.clone()], y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(rstd))
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwiGlu;
        impl<B: FusedOps> Backward<B, 2> for SwiGlu {
            type State = (FloatTensor<B>, FloatTensor<B>); // gate, up
            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let (gate, up) = ops.state;
                let (dgate, dup) = B::swiglu_backward(gate, up, grad);
                for (parent, grad) in ops.parents.into_iter().zip([dgate, dup]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }
        let y = B::swiglu(gate.primitive.clone(), up.primitive.clone());
        match SwiGlu.prepare::<C>([gate.node, up.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((gate.primitive, up.primitive), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn rotary_qkv(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        rotary: RotaryArgs<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RotaryQkv;
        impl<B: FusedOps> Backward<B, 3> for RotaryQkv {
            // The rotation alone: the backward needs none of the inputs.
            type State = RotaryArgs<B>;
            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) = B::rotary_qkv_backward(grad, ops.state);
                for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }
        // The angles are constants: no gradient flows to them.
        let RotaryArgs { cos, sin, heads, kv_heads } = rotary;
        let rotary = RotaryArgs { cos: cos.primitive, sin: sin.primitive, heads, kv_heads };
        let y = B::rotary_qkv(q.primitive, k.primitive, v.primitive, rotary.clone());
        match RotaryQkv.prepare::<C>([q.node, k.node, v.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(rotary, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
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

    fn lm_head_nll(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        precision: Precision,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct LmHeadNll(Precision);
        impl<B: FusedOps> Backward<B, 2> for LmHeadNll {
            // x, weight, targets, lse: the logits are recomputed a block at a time, never kept.
            type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>, FloatTensor<B>);
            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let (x, weight, targets, lse) = ops.state;
                let [x_node, weight_node] = ops.parents;
                let (dx, dw) = lm_head_nll_backward::<B>(x, weight, targets, lse, grad, weight_node.is_some(), self.0);
                if let Some(node) = x_node {
                    grads.register::<B>(node.id, dx);
                }
                if let (Some(node), Some(dw)) = (weight_node, dw) {
                    grads.register::<B>(node.id, dw);
                }
            }
        }
        let (nll, lse) = B::lm_head_nll(x.primitive.clone(), weight.primitive.clone(), targets.clone(), precision);
        let nll = match LmHeadNll(precision).prepare::<C>([x.node, weight.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, weight.primitive, targets, lse.clone()), nll),
            OpsKind::UnTracked(prep) => prep.finish(nll),
        };
        (nll, Self::from_inner(lse))
    }

    fn causal_attention(qkv: FloatTensor<Self>, args: AttentionArgs<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct CausalAttention;
        impl<B: FusedOps> Backward<B, 1> for CausalAttention {
            // qkv, what the forward saved, the forward's arguments
            type State = (FloatTensor<B>, FloatTensor<B>, AttentionArgs<B>);
            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let (qkv, saved, args) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::causal_attention_backward(qkv, saved, grad, args)
                });
            }
        }
        // The mask is a constant: no gradient flows to it.
        let AttentionArgs { n_head, keep, starts, gaps, precision } = args;
        let args = AttentionArgs { n_head, keep: keep.map(|k| k.primitive), starts, gaps, precision };
        let (y, saved) = B::causal_attention(qkv.primitive.clone(), args.clone());
        let y = match CausalAttention.prepare::<C>([qkv.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((qkv.primitive, saved.clone(), args), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, Self::from_inner(saved))
    }
}
