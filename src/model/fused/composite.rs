//! The fused ops written with burn's tensor API: what every backend runs unless it has faster
//! kernels, and what those kernels are tested against.

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

pub fn rms_norm<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    epsilon: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = float::<B, 2>(x);
    let rstd = (x.clone().square().mean_dim(1) + epsilon).sqrt().recip(); // [rows, 1]
    let y = x * rstd.clone() * float::<B, 1>(weight).unsqueeze::<2>();
    (y.into_primitive().tensor(), rstd.squeeze_dim::<1>(1).into_primitive().tensor())
}

/// With x̂ = x·rstd and g = grad·weight: dx = rstd·(g − x̂·mean(g·x̂)), dweight = Σ grad·x̂ over
/// the rows.
pub fn rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    rstd: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x, grad) = (float::<B, 2>(x), float::<B, 2>(grad));
    let d = x.dims()[1];
    let rstd = float::<B, 1>(rstd).unsqueeze_dim::<2>(1); // [rows, 1]
    let x_hat = x * rstd.clone(); // [rows, d]
    let g = grad.clone() * float::<B, 1>(weight).unsqueeze::<2>();
    let dx = (g.clone() - x_hat.clone() * (g * x_hat.clone()).mean_dim(1)) * rstd;
    let dweight = (grad * x_hat).sum_dim(0).reshape([d]);
    (dx.into_primitive().tensor(), dweight.into_primitive().tensor())
}

pub fn swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let (gate, up) = (float::<B, 2>(gate), float::<B, 2>(up));
    (burn::tensor::activation::silu(gate) * up).into_primitive().tensor()
}

/// With s = σ(gate): d silu(gate)/d gate = s·(1 + gate·(1 − s)); dup = grad·silu(gate).
pub fn swiglu_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (gate, up, grad) = (float::<B, 2>(gate), float::<B, 2>(up), float::<B, 2>(grad));
    let s = sigmoid(gate.clone());
    let slope = s.clone() * ((s.clone().neg() + 1.0) * gate.clone() + 1.0);
    let dgate = grad.clone() * up * slope;
    let dup = grad * gate * s;
    (dgate.into_primitive().tensor(), dup.into_primitive().tensor())
}

/// x·cos + rotate_half(x)·sin, where rotate_half(x) = (−x₂, x₁) for a head's halves x₁, x₂ (as
/// transformers' `apply_rotary_pos_emb`); with `inverse`, the rotation back (sin negated).
/// x: [rows, n, head_dim], cos, sin: [rows, head_dim / 2] → [rows, n, head_dim]
pub fn rotate<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>, inverse: bool) -> Tensor<B, 3> {
    let half = x.dims()[2] / 2;
    let whole = |t: &Tensor<B, 2>| Tensor::cat(vec![t.clone(), t.clone()], 1).unsqueeze_dim::<3>(1); // [rows, 1, head_dim]
    let (x1, x2) = (x.clone().narrow(2, 0, half), x.clone().narrow(2, half, half));
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    let sin = if inverse { whole(sin).neg() } else { whole(sin) };
    x * whole(cos) + rotated * sin
}

pub fn rotary_qkv<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    rotary: RotaryArgs<B>,
) -> FloatTensor<B> {
    let (cos, sin) = (float::<B, 2>(rotary.cos), float::<B, 2>(rotary.sin));
    let (heads, kv_heads, group) = (rotary.heads, rotary.kv_heads, rotary.heads / rotary.kv_heads);
    let (q, k, v) = (float::<B, 2>(q), float::<B, 2>(k), float::<B, 2>(v));
    let [rows, width] = q.dims();
    let head_dim = width / heads;
    let heads_of = |t: Tensor<B, 2>, n: usize| t.reshape([rows, n, head_dim]);
    let spread =
        |t: Tensor<B, 3>| t.unsqueeze_dim::<4>(2).expand([rows, kv_heads, group, head_dim]).reshape([rows, width]);
    let q = rotate(heads_of(q, heads), &cos, &sin, false).reshape([rows, width]);
    let k = spread(rotate(heads_of(k, kv_heads), &cos, &sin, false));
    let v = spread(heads_of(v, kv_heads));
    Tensor::cat(vec![q, k, v], 1).into_primitive().tensor()
}

pub fn rotary_qkv_backward<B: Backend>(
    grad: FloatTensor<B>,
    rotary: RotaryArgs<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (cos, sin) = (float::<B, 2>(rotary.cos), float::<B, 2>(rotary.sin));
    let (heads, kv_heads, group) = (rotary.heads, rotary.kv_heads, rotary.heads / rotary.kv_heads);
    let grad = float::<B, 2>(grad);
    let [rows, packed] = grad.dims();
    let width = packed / 3;
    let head_dim = width / heads;
    let part = |i: usize| grad.clone().narrow(1, i * width, width);
    // The heads a key/value head serves are adjacent: their gradients sum to its own.
    let gather =
        |t: Tensor<B, 2>| t.reshape([rows, kv_heads, group, head_dim]).sum_dim(2).reshape([rows, kv_heads, head_dim]);
    let dq = rotate(part(0).reshape([rows, heads, head_dim]), &cos, &sin, true).reshape([rows, width]);
    let dk = rotate(gather(part(1)), &cos, &sin, true).reshape([rows, kv_heads * head_dim]);
    let dv = gather(part(2)).reshape([rows, kv_heads * head_dim]);
    (dq.into_primitive().tensor(), dk.into_primitive().tensor(), dv.into_primitive().tensor())
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

pub fn cross_entropy<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
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
    [0, 1, 2].map(|part| qkv.clone().narrow(2, part * d, d).reshape([batch, seq, n_head, d / n_head]).swap_dims(1, 2))
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

pub fn causal_attention<B: Backend>(qkv: FloatTensor<B>, args: AttentionArgs<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let AttentionArgs { n_head, keep, starts, gaps, precision } = args;
    let [q, k, v] = split_heads(float::<B, 3>(qkv), n_head);
    let [batch, heads, seq, head_dim] = q.dims();
    let device = q.device();
    let scores = matmul(q, k.swap_dims(2, 3), precision) / (head_dim as f64).sqrt(); // [batch, heads, seq, seq]

    // Expanded to the scores' shape: mask_fill does not broadcast on every backend.
    let future = Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, &device).unsqueeze::<3>().expand([batch, seq, seq]);
    let keys = || Tensor::<B, 1, Int>::arange(0..seq as i64, &device).unsqueeze::<3>().expand([batch, seq, seq]);
    // A per-query bound, across the keys. [batch, seq] → [batch, seq, seq]
    let per_query = |bound: Tensor<B, 2, Int>| bound.unsqueeze_dim::<3>(2).expand([batch, seq, seq]);
    let hidden = match starts {
        // Keys before the query's own example are hidden too.
        Some(starts) => future.bool_or(keys().lower(per_query(Tensor::from_primitive(starts)))),
        None => future,
    };
    let hidden = match gaps {
        // And the keys in the query's gap.
        Some(gaps) => {
            let gaps = Tensor::<B, 3, Int>::from_primitive(gaps); // [batch, seq, 2]
            let bound = |i: usize| per_query(gaps.clone().narrow(2, i, 1).squeeze_dim::<2>(2));
            hidden.bool_or(keys().greater_equal(bound(0)).bool_and(keys().lower(bound(1))))
        }
        None => hidden,
    };
    let hidden = hidden.unsqueeze_dim::<4>(1).expand([batch, heads, seq, seq]);
    let probs = softmax(scores.mask_fill(hidden, f32::NEG_INFINITY), 3); // [batch, heads, seq, seq]
    let y = merge_heads(matmul(dropped(probs.clone(), keep), v, precision)); // [batch, seq, d_model]
    (y.into_primitive().tensor(), probs.into_primitive().tensor())
}

/// The probabilities carry the mask (zero outside it), so `args.starts` and `args.gaps` are not
/// needed here.
pub fn causal_attention_backward<B: Backend>(
    qkv: FloatTensor<B>,
    probs: FloatTensor<B>,
    grad: FloatTensor<B>,
    args: AttentionArgs<B>,
) -> FloatTensor<B> {
    let AttentionArgs { n_head, keep, precision, .. } = args;
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
