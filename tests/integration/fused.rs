//! The CPU kernels of the fused ops against the composite versions built from burn's own ops
//! (which tests/integration/fidelity.rs holds to transformers), forward and backward, including the
//! autodiff wiring: gradients through a fused op equal burn's autodiff through the composite.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use pipe::model::fused::{composite, cross_entropy, gelu_new, AttentionArgs, FusedOps, LinearGradsWanted, RotaryArgs};
use pipe::model::gpt2::Precision::{Bf16, F32};

use crate::common::{drawn, kept, normal};

type Ad = Autodiff<Flex>;

fn random<B: Backend, const D: usize>(shape: [usize; D], scale: f32, seed: u64) -> Tensor<B, D> {
    drawn(shape, seed, normal(scale))
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0.0f32, f32::max);
    assert!(worst <= tol, "{what}: worst relative difference {worst:e} > {tol:e}");
}

fn float<const D: usize>(x: FloatTensor<Flex>) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

fn prim<const D: usize>(x: &Tensor<Flex, D>) -> FloatTensor<Flex> {
    x.clone().into_primitive().tensor()
}

fn prim_ad<const D: usize>(x: &Tensor<Ad, D>) -> FloatTensor<Ad> {
    x.clone().into_primitive().tensor()
}

/// Targets over the whole vocabulary, including its first and last ids.
fn targets<B: Backend>(rows: usize, vocab: usize) -> Tensor<B, 1, Int> {
    let ids: Vec<i64> = (0..rows).map(|i| ((i * 7919) % vocab) as i64).chain([0, vocab as i64 - 1]).collect();
    Tensor::from_data(TensorData::new(ids, [rows + 2]), &Default::default())
}

#[test]
fn gelu_kernel_matches_composite_forward_and_backward() {
    // Wide range, odd length (not a multiple of any vector width or chunk).
    let x = random::<Flex, 2>([37, 1031], 4.0, 1);
    let grad = random::<Flex, 2>([37, 1031], 1.0, 2);
    let fused = float::<2>(Flex::gelu_new(prim(&x)));
    let plain = float::<2>(composite::gelu_new::<Flex>(prim(&x)));
    assert_close(&values(fused), &values(plain), 1e-6, "gelu forward");
    let fused = float::<2>(Flex::gelu_new_backward(prim(&x), prim(&grad)));
    let plain = float::<2>(composite::gelu_new_backward::<Flex>(prim(&x), prim(&grad)));
    assert_close(&values(fused), &values(plain), 1e-6, "gelu backward");
}

#[test]
fn gelu_gradient_through_autodiff_matches_burns_own() {
    let x = random::<Ad, 2>([16, 300], 3.0, 3).require_grad();
    let weights = random::<Ad, 2>([16, 300], 1.0, 4);
    let fused = (gelu_new(x.clone()) * weights.clone()).sum().backward();
    // The same function composed from burn's ops, differentiated by burn's autodiff.
    let plain = x.clone()
        * burn::tensor::activation::sigmoid(x.clone() * (x.clone().square() * composite::GELU_B + composite::GELU_A));
    let plain = (plain * weights).sum().backward();
    assert_close(&values(x.grad(&fused).unwrap()), &values(x.grad(&plain).unwrap()), 1e-5, "gelu gradient");
}

#[test]
fn cross_entropy_kernel_matches_composite() {
    for (rows, vocab) in [(5, 8192), (3, 50257), (4, 17)] {
        let logits = random::<Flex, 2>([rows + 2, vocab], 5.0, rows as u64);
        let targets = targets::<Flex>(rows, vocab);
        let (nll, lse) = Flex::cross_entropy(prim(&logits), targets.clone().into_primitive());
        let (want_nll, want_lse) = composite::cross_entropy::<Flex>(prim(&logits), targets.clone().into_primitive());
        assert_close(&values(float::<1>(nll)), &values(float::<1>(want_nll.clone())), 1e-5, "nll");
        assert_close(&values(float::<1>(lse.clone())), &values(float::<1>(want_lse)), 1e-5, "logsumexp");

        // A zero row gradient (a masked token) must give a zero row.
        let mut g: Vec<f32> = (0..rows + 2).map(|i| 0.5 + i as f32).collect();
        g[1] = 0.0;
        let grad = Tensor::<Flex, 1>::from_data(TensorData::new(g, [rows + 2]), &Default::default());
        let fused =
            Flex::cross_entropy_backward(prim(&logits), targets.clone().into_primitive(), lse.clone(), prim(&grad));
        let plain =
            composite::cross_entropy_backward::<Flex>(prim(&logits), targets.into_primitive(), lse, prim(&grad));
        let (fused, plain) = (values(float::<2>(fused)), values(float::<2>(plain)));
        assert_close(&fused, &plain, 1e-6, "cross-entropy backward");
        assert!(fused[vocab..2 * vocab].iter().all(|&v| v == 0.0), "masked row has a gradient");
    }
}

#[test]
fn cross_entropy_gradient_through_autodiff_matches_log_softmax() {
    let (rows, vocab) = (6, 1000);
    let logits = random::<Ad, 2>([rows + 2, vocab], 3.0, 9).require_grad();
    let targets = targets::<Ad>(rows, vocab);
    let weights = random::<Ad, 1>([rows + 2], 1.0, 10);
    let fused_nll = cross_entropy(logits.clone(), targets.clone());
    let fused = (fused_nll.clone() * weights.clone()).sum().backward();
    let log_probs = burn::tensor::activation::log_softmax(logits.clone(), 1);
    let plain_nll = log_probs.gather(1, targets.unsqueeze_dim::<2>(1)).neg().squeeze_dim::<1>(1);
    assert_close(&values(fused_nll), &values(plain_nll.clone()), 1e-5, "nll through autodiff");
    let plain = (plain_nll * weights).sum().backward();
    assert_close(&values(logits.grad(&fused).unwrap()), &values(logits.grad(&plain).unwrap()), 1e-6, "logit gradient");
}

#[test]
fn cross_entropy_takes_strided_logits() {
    // A transposed (non-contiguous) logits tensor is read in its logical order.
    let logits = random::<Flex, 2>([300, 4], 2.0, 11);
    let targets = targets::<Flex>(2, 300);
    let (rows_view, copied) = (logits.clone().transpose(), logits.transpose().into_data());
    let copied = Tensor::<Flex, 2>::from_data(copied, &Default::default());
    let (a, _) = Flex::cross_entropy(prim(&rows_view), targets.clone().into_primitive());
    let (b, _) = Flex::cross_entropy(prim(&copied), targets.into_primitive());
    assert_eq!(values(float::<1>(a)), values(float::<1>(b)));
}

/// A dropout mask as the model draws one: 0, or 1/(1 − p) with probability 1 − p.
fn keep_mask<B: Backend>(shape: [usize; 4], p: f32, seed: u64) -> Tensor<B, 4> {
    drawn(shape, seed, kept(p))
}

#[test]
fn attention_kernel_matches_composite_forward_and_backward() {
    // Odd sizes: a sequence and head width no kernel tiles evenly.
    let (batch, seq, n_head, head_dim) = (3, 37, 5, 12);
    let d = n_head * head_dim;
    let qkv = random::<Flex, 3>([batch, seq, 3 * d], 1.5, 21);
    let grad = random::<Flex, 3>([batch, seq, d], 1.0, 22);
    let keep = keep_mask::<Flex>([batch, n_head, seq, seq], 0.3, 23);
    // Packed rows: row 0 holds examples from 0, 10 and 25; row 1 one; row 2 from 0 and 36.
    let example_starts = |row: usize, i: usize| -> i32 {
        let starts: &[i32] = [&[0, 10, 25][..], &[0], &[0, 36]][row];
        *starts.iter().rev().find(|&&s| s as usize <= i).unwrap()
    };
    let starts: Vec<i32> = (0..batch * seq).map(|k| example_starts(k / seq, k % seq)).collect();
    let starts = Tensor::<Flex, 2, Int>::from_data(TensorData::new(starts, [batch, seq]), &Default::default());
    // Gaps, as a pair's second continuation skips the first: row 0's queries 18 to 24 skip
    // keys 12 to 17 of their example; row 1's from 30 on skip keys 5 to 29.
    let gap_of = |row: usize, i: usize| -> (usize, usize) {
        match (row, i) {
            (0, 18..25) => (12, 18),
            (1, 30..) => (5, 30),
            _ => (i, i),
        }
    };
    let gaps: Vec<i32> =
        (0..batch * seq).flat_map(|k| <[usize; 2]>::from(gap_of(k / seq, k % seq)).map(|g| g as i32)).collect();
    let gaps = Tensor::<Flex, 3, Int>::from_data(TensorData::new(gaps, [batch, seq, 2]), &Default::default());
    let cases = [
        (None, None, None),
        (Some(prim(&keep)), None, None),
        (None, Some(starts.clone()), None),
        (Some(prim(&keep)), Some(starts.clone()), None),
        (None, Some(starts.clone()), Some(gaps.clone())),
        (Some(prim(&keep)), Some(starts), Some(gaps)),
    ];
    for (keep, starts, gaps) in cases {
        let (packed, gapped) = (starts.is_some(), gaps.is_some());
        let what = format!(
            "{} dropout{}{}",
            if keep.is_some() { "with" } else { "without" },
            if packed { ", packed" } else { "" },
            if gapped { ", with gaps" } else { "" }
        );
        let (starts, gaps) = (starts.map(|s| s.into_primitive()), gaps.map(|g| g.into_primitive()));
        let args = AttentionArgs { n_head, keep, starts, gaps, precision: F32 };
        let (y, probs) = Flex::causal_attention(prim(&qkv), args.clone());
        let (want_y, want_probs) = composite::causal_attention::<Flex>(prim(&qkv), args.clone());
        assert_close(&values(float::<3>(y)), &values(float::<3>(want_y)), 1e-5, &format!("output {what}"));
        let probs_values = values(float::<4>(probs.clone()));
        assert_close(&probs_values, &values(float::<4>(want_probs)), 1e-6, &format!("probabilities {what}"));
        // Causal: nothing attends to a later position; packed, nothing to another example.
        for (r, row) in probs_values.chunks(seq).enumerate() {
            let (b, i) = (r / (n_head * seq), r % seq);
            assert!(row[i + 1..].iter().all(|&p| p == 0.0), "row {r} attends to the future");
            let start = if packed { example_starts(b, i) as usize } else { 0 };
            assert!(row[..start].iter().all(|&p| p == 0.0), "row {r} attends to an earlier example");
            let gap = if gapped { gap_of(b, i) } else { (i, i) };
            let seen = (start..=i).filter(|&j| !(gap.0..gap.1).contains(&j));
            assert!(seen.map(|j| row[j]).all(|p| p > 0.0), "row {r} attends to all of its own example");
            assert!(row[gap.0..gap.1].iter().all(|&p| p == 0.0), "row {r} attends to its gap");
        }
        let args = AttentionArgs { starts: None, gaps: None, ..args };
        let fused = Flex::causal_attention_backward(prim(&qkv), probs.clone(), prim(&grad), args.clone());
        let plain = composite::causal_attention_backward::<Flex>(prim(&qkv), probs, prim(&grad), args);
        assert_close(&values(float::<3>(fused)), &values(float::<3>(plain)), 1e-5, &format!("backward {what}"));
    }
}

#[test]
fn attention_dropout_gradient_through_autodiff_matches_burns_ops() {
    let (batch, seq, n_head, head_dim) = (2, 17, 3, 8);
    let d = n_head * head_dim;
    let qkv = random::<Ad, 3>([batch, seq, 3 * d], 1.0, 33).require_grad();
    let weights = random::<Ad, 3>([batch, seq, d], 1.0, 34);
    let keep = keep_mask::<Ad>([batch, n_head, seq, seq], 0.25, 35);
    let args = AttentionArgs { n_head, keep: Some(prim_ad(&keep)), starts: None, gaps: None, precision: F32 };
    let (fused_y, _) = Ad::causal_attention(qkv.clone().into_primitive().tensor(), args);
    let fused_y = Tensor::<Ad, 3>::from_primitive(TensorPrimitive::Float(fused_y));
    // The same attention from burn's ops: masked softmax, dropped, times V.
    let heads =
        |part: usize| qkv.clone().narrow(2, part * d, d).reshape([batch, seq, n_head, head_dim]).swap_dims(1, 2);
    let scores = heads(0).matmul(heads(1).swap_dims(2, 3)) / (head_dim as f64).sqrt();
    let future = Tensor::<Ad, 2, burn::tensor::Bool>::tril_mask([seq, seq], 0, &Default::default())
        .unsqueeze::<4>()
        .expand([batch, n_head, seq, seq]);
    let probs = burn::tensor::activation::softmax(scores.mask_fill(future, f32::NEG_INFINITY), 3);
    let plain_y = (probs * keep).matmul(heads(2)).swap_dims(1, 2).reshape([batch, seq, d]);
    assert_close(&values(fused_y.clone()), &values(plain_y.clone()), 1e-5, "attention output with dropout");
    let fused = (fused_y * weights.clone()).sum().backward();
    let plain = (plain_y * weights).sum().backward();
    assert_close(&values(qkv.grad(&fused).unwrap()), &values(qkv.grad(&plain).unwrap()), 1e-5, "qkv gradient");
}

#[test]
fn attention_dropout_applies_while_training_only_and_changes_with_the_seed() {
    let (batch, seq, n_head, d) = (2, 12, 2, 16);
    let qkv = random::<Ad, 3>([batch, seq, 3 * d], 1.0, 36);
    let run = |p: f64, seed: u64| {
        Ad::seed(&Default::default(), seed);
        values(pipe::model::fused::causal_attention(qkv.clone(), n_head, p, None, F32))
    };
    assert_ne!(run(0.5, 1), run(0.0, 1), "dropout changed nothing while training");
    assert_ne!(run(0.5, 1), run(0.5, 2), "another seed, another mask");
    // That the same seed draws the same mask is checked where a run has the process's generator
    // to itself: resume.rs and data_parallel.rs repeat runs with dropout and compare their losses.
    // Here the tests beside this one draw from it too (a model's initial weights).
    // Without autodiff (evaluation, generation) there is no dropout.
    let inner = qkv.inner();
    assert_eq!(
        values(pipe::model::fused::causal_attention(inner.clone(), n_head, 0.5, None, F32)),
        values(pipe::model::fused::causal_attention(inner, n_head, 0.0, None, F32))
    );
}

#[test]
fn attention_gradient_through_autodiff_matches_burns_attention() {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let (batch, seq, n_head, head_dim) = (2, 19, 3, 8);
    let d = n_head * head_dim;
    let qkv = random::<Ad, 3>([batch, seq, 3 * d], 1.0, 31).require_grad();
    let weights = random::<Ad, 3>([batch, seq, d], 1.0, 32);
    let fused_y = pipe::model::fused::causal_attention(qkv.clone(), n_head, 0.0, None, F32);
    // burn's own attention op on the split heads, differentiated by burn's autodiff.
    let heads =
        |part: usize| qkv.clone().narrow(2, part * d, d).reshape([batch, seq, n_head, head_dim]).swap_dims(1, 2);
    let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
    let plain_y = attention(heads(0), heads(1), heads(2), None, None, options).swap_dims(1, 2).reshape([batch, seq, d]);
    assert_close(&values(fused_y.clone()), &values(plain_y.clone()), 1e-5, "attention output");
    let fused = (fused_y * weights.clone()).sum().backward();
    let plain = (plain_y * weights).sum().backward();
    assert_close(&values(qkv.grad(&fused).unwrap()), &values(qkv.grad(&plain).unwrap()), 1e-5, "qkv gradient");
}

#[test]
fn linear_kernel_matches_burns_linear_forward_and_backward() {
    // Sizes that split unevenly across threads and tiles; the second case is big enough to run
    // in parallel blocks, by columns and then by rows.
    for (rows, d_in, d_out) in [(7, 33, 45), (300, 200, 520), (600, 150, 130)] {
        let x = random::<Flex, 2>([rows, d_in], 1.0, 41);
        let weight = random::<Flex, 2>([d_in, d_out], 0.2, 42);
        let bias = random::<Flex, 1>([d_out], 0.5, 43);
        let grad = random::<Flex, 2>([rows, d_out], 1.0, 44);
        let y = Flex::fused_linear(prim(&x), prim(&weight), Some(prim(&bias)), F32);
        let want = composite::linear::<Flex>(prim(&x), prim(&weight), Some(prim(&bias)), F32);
        assert_close(&values(float::<2>(y)), &values(float::<2>(want)), 1e-5, "linear forward");
        let all = LinearGradsWanted { weight: true, bias: true };
        let (dx, dw, db) = Flex::fused_linear_backward(prim(&x), prim(&weight), prim(&grad), all, F32);
        let (want_dx, want_dw, want_db) =
            composite::linear_backward::<Flex>(prim(&x), prim(&weight), prim(&grad), all, F32);
        let want_dx = values(float::<2>(want_dx));
        assert_close(&values(float::<2>(dx)), &want_dx, 1e-5, "linear dx");
        assert_close(&values(float::<2>(dw.unwrap())), &values(float::<2>(want_dw.unwrap())), 1e-5, "linear dweight");
        // A sum over up to 600 rows in another order.
        assert_close(&values(float::<1>(db.unwrap())), &values(float::<1>(want_db.unwrap())), 3e-5, "linear dbias");
        // A frozen layer (LoRA's base): only the input's gradient, the same one.
        let frozen = LinearGradsWanted { weight: false, bias: false };
        let (frozen_dx, dw, db) = Flex::fused_linear_backward(prim(&x), prim(&weight), prim(&grad), frozen, F32);
        assert!(dw.is_none() && db.is_none(), "a frozen layer's backward computes no weight or bias gradient");
        assert_close(&values(float::<2>(frozen_dx)), &want_dx, 1e-5, "frozen linear dx");
    }
}

#[test]
fn linear_through_a_transposed_weight_matches_and_its_gradient_keeps_the_weight_layout() {
    // The tied LM head: hidden · embeddingᵀ, the weight a transposed view, no bias.
    let (rows, d, vocab) = (260, 64, 1000);
    let hidden = random::<Ad, 2>([rows, d], 1.0, 51).require_grad();
    let embedding = random::<Ad, 2>([vocab, d], 0.5, 52).require_grad();
    let weights = random::<Ad, 2>([rows, vocab], 1.0, 53);
    let fused_y = pipe::model::fused::linear(hidden.clone(), embedding.clone().transpose(), None, F32);
    let plain_y = hidden.clone().matmul(embedding.clone().transpose());
    assert_close(&values(fused_y.clone()), &values(plain_y.clone()), 1e-5, "LM head logits");
    let fused = (fused_y * weights.clone()).sum().backward();
    let plain = (plain_y * weights).sum().backward();
    assert_close(&values(hidden.grad(&fused).unwrap()), &values(hidden.grad(&plain).unwrap()), 1e-5, "hidden grad");
    let grad = embedding.grad(&fused).unwrap();
    assert_eq!(grad.dims(), [vocab, d]);
    assert_close(&values(grad), &values(embedding.grad(&plain).unwrap()), 1e-5, "embedding grad");

    // The weight gradient comes back in the weight's (column-major) layout, so that transposed
    // back it is the embedding's own row-major layout and adds to its gradient without a copy.
    let (hidden, embedding) = (random::<Flex, 2>([rows, d], 1.0, 54), random::<Flex, 2>([vocab, d], 0.5, 55));
    let grad = random::<Flex, 2>([rows, vocab], 1.0, 56);
    let wanted = LinearGradsWanted { weight: true, bias: false };
    let (_, dw, _) = Flex::fused_linear_backward(prim(&hidden), prim(&embedding.transpose()), prim(&grad), wanted, F32);
    assert_eq!(dw.unwrap().layout().strides(), &[1, d as isize]);
}

/// A tensor's values rounded to the nearest bf16 (ties to even) and held as f32 again. (Not
/// burn's cast: flex casts through f64 with half's `from_f64`, which drops the f64's low 32
/// bits first and so rounds values just above a tie down.)
fn rounded_to_bf16<const D: usize>(x: &Tensor<Flex, D>) -> Tensor<Flex, D> {
    let rounded: Vec<f32> = values(x.clone()).into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect();
    Tensor::from_data(TensorData::new(rounded, x.dims()), &Default::default())
}

#[test]
fn bf16_linear_is_the_f32_linear_of_bf16_rounded_operands_forward_and_backward() {
    // Forward: bf16(x)·bf16(weight) + bias; backward: dx = bf16(grad)·bf16(weight)ᵀ, dweight =
    // bf16(x)ᵀ·bf16(grad), dbias from the unrounded grad — all summed and returned in f32. The
    // second case is the tied LM head (a transposed weight view, its gradient in that layout).
    let all = LinearGradsWanted { weight: true, bias: true };
    for (rows, d_in, d_out, transposed) in [(300, 200, 520, false), (260, 64, 1000, true)] {
        let x = random::<Flex, 2>([rows, d_in], 1.0, 71);
        let stored = random::<Flex, 2>(if transposed { [d_out, d_in] } else { [d_in, d_out] }, 0.2, 72);
        let as_weight = |w: Tensor<Flex, 2>| if transposed { w.transpose() } else { w };
        let (weight, wr) = (as_weight(stored.clone()), as_weight(rounded_to_bf16(&stored)));
        let bias = random::<Flex, 1>([d_out], 0.5, 73);
        let grad = random::<Flex, 2>([rows, d_out], 1.0, 74);
        let (xr, gr) = (rounded_to_bf16(&x), rounded_to_bf16(&grad));

        let y = values(float::<2>(Flex::fused_linear(prim(&x), prim(&weight), Some(prim(&bias)), Bf16)));
        let want = values(float::<2>(Flex::fused_linear(prim(&xr), prim(&wr), Some(prim(&bias)), F32)));
        assert_close(&y, &want, 1e-5, "bf16 linear forward");
        let unrounded = values(float::<2>(Flex::fused_linear(prim(&x), prim(&weight), Some(prim(&bias)), F32)));
        let off = y.iter().zip(&unrounded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(off > 1e-3, "bf16 forward is measurably off f32 (so bf16 ran): {off:e}");

        let (dx, dw, db) = Flex::fused_linear_backward(prim(&x), prim(&weight), prim(&grad), all, Bf16);
        let (want_dx, want_dw, _) = Flex::fused_linear_backward(prim(&xr), prim(&wr), prim(&gr), all, F32);
        let (_, _, want_db) = Flex::fused_linear_backward(prim(&x), prim(&weight), prim(&grad), all, F32);
        let dw = dw.unwrap();
        assert_eq!(dw.layout().strides(), want_dw.as_ref().unwrap().layout().strides(), "dweight layout");
        assert_close(&values(float::<2>(dx)), &values(float::<2>(want_dx)), 1e-5, "bf16 linear dx");
        assert_close(&values(float::<2>(dw)), &values(float::<2>(want_dw.unwrap())), 1e-5, "bf16 linear dweight");
        assert_close(
            &values(float::<1>(db.unwrap())),
            &values(float::<1>(want_db.unwrap())),
            1e-6,
            "bf16 linear dbias",
        );
    }
}

#[test]
fn bf16_attention_runs_its_products_in_bf16_on_the_gpu_composite_and_in_f32_on_the_cpu() {
    let (batch, seq, n_head, head_dim) = (2, 45, 3, 16);
    let d = n_head * head_dim;
    let qkv = random::<Flex, 3>([batch, seq, 3 * d], 1.5, 81);
    let grad = random::<Flex, 3>([batch, seq, d], 1.0, 82);
    let keep = Some(prim(&keep_mask::<Flex>([batch, n_head, seq, seq], 0.3, 83)));
    let args = |precision| AttentionArgs { n_head, keep: keep.clone(), starts: None, gaps: None, precision };
    let cpu = |precision| {
        let (y, probs) = Flex::causal_attention(prim(&qkv), args(precision));
        let dqkv = Flex::causal_attention_backward(prim(&qkv), probs, prim(&grad), args(precision));
        (values(float::<3>(y)), values(float::<3>(dqkv)))
    };
    // The CPU kernel's products are f32 at either precision (faster there; docs/speed.md).
    assert_eq!(cpu(Bf16), cpu(F32), "the CPU's bf16 attention is its f32 attention");
    // The composite (what the GPU backends run) casts every product's operands to bf16 and
    // its result back: within bf16's rounding of f32 (scores of a few units rounded to 8
    // significant bits move the probabilities by about 1% each), and measurably off it.
    let composite = |precision| {
        let (y, probs) = composite::causal_attention::<Flex>(prim(&qkv), args(precision));
        let dqkv = composite::causal_attention_backward::<Flex>(prim(&qkv), probs, prim(&grad), args(precision));
        (values(float::<3>(y)), values(float::<3>(dqkv)))
    };
    let ((y, dqkv), (y_f32, dqkv_f32)) = (composite(Bf16), composite(F32));
    // The worst of thousands of entries, each within bf16's rounding: loose on purpose; the
    // check below makes sure the products did run in bf16.
    assert_close(&y, &y_f32, 1.2e-1, "bf16 composite attention output");
    assert_close(&dqkv, &dqkv_f32, 1.2e-1, "bf16 composite attention gradient");
    let off = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(off(&y, &y_f32) > 1e-4 && off(&dqkv, &dqkv_f32) > 1e-4, "the bf16 composite ran in f32");
}

#[test]
fn adam_kernel_matches_composite_for_adam_and_adamw() {
    use pipe::model::fused::AdamUpdate;
    for decoupled in [false, true] {
        let param = random::<Flex, 2>([37, 1100], 1.0, 61);
        let (mut fused, mut plain) = ((prim(&param), None), (prim(&param), None));
        for time in 1..=3 {
            let grad = random::<Flex, 2>([37, 1100], 0.1, 61 + time as u64);
            let update =
                AdamUpdate { lr: 1e-2, beta_1: 0.9, beta_2: 0.95, epsilon: 1e-8, weight_decay: 0.1, decoupled, time };
            let (p, m, v) = Flex::adam_step(fused.0, prim(&grad), fused.1, update);
            fused = (p, Some((m, v)));
            let (p, m, v) = composite::adam_step::<Flex>(plain.0, prim(&grad), plain.1, update);
            plain = (p, Some((m, v)));
        }
        let what = if decoupled { "AdamW" } else { "Adam" };
        let (fused_m, plain_m) = (fused.1.clone().unwrap().0, plain.1.clone().unwrap().0);
        assert_close(&values(float::<2>(fused_m)), &values(float::<2>(plain_m)), 1e-6, &format!("{what} moment"));
        let (fused_p, plain_p) = (values(float::<2>(fused.0)), values(float::<2>(plain.0)));
        assert_close(&fused_p, &plain_p, 1e-6, &format!("{what} parameter"));
        assert!(fused_p != values(param.clone()), "{what} did not move the parameter");
    }
}

#[test]
fn adam_leaves_a_shared_parameter_untouched() {
    use pipe::model::fused::AdamUpdate;
    // The update writes in place only into buffers nobody else holds.
    let param = random::<Flex, 1>([5000], 1.0, 71);
    let before = values(param.clone());
    let grad = random::<Flex, 1>([5000], 1.0, 72);
    let update =
        AdamUpdate { lr: 0.1, beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.0, decoupled: true, time: 1 };
    let _ = Flex::adam_step(prim(&param), prim(&grad), None, update);
    assert_eq!(values(param), before);
}

#[test]
fn layer_norm_kernel_matches_composite_forward_and_backward() {
    for (rows, d) in [(3, 5), (130, 256), (9, 1031)] {
        let x = random::<Flex, 2>([rows, d], 3.0, 81).add_scalar(2.0); // off-centre rows
        let (gamma, beta) = (random::<Flex, 1>([d], 1.0, 82), random::<Flex, 1>([d], 1.0, 83));
        let grad = random::<Flex, 2>([rows, d], 1.0, 84);
        let (y, mean, rstd) = Flex::fused_layer_norm(prim(&x), prim(&gamma), prim(&beta), 1e-5);
        let (want_y, want_mean, want_rstd) = composite::layer_norm::<Flex>(prim(&x), prim(&gamma), prim(&beta), 1e-5);
        assert_close(&values(float::<2>(y)), &values(float::<2>(want_y)), 1e-5, "layer norm");
        assert_close(&values(float::<1>(mean.clone())), &values(float::<1>(want_mean)), 1e-6, "mean");
        assert_close(&values(float::<1>(rstd.clone())), &values(float::<1>(want_rstd)), 1e-5, "1/sigma");
        let fused = Flex::fused_layer_norm_backward(prim(&x), prim(&gamma), mean.clone(), rstd.clone(), prim(&grad));
        let plain = composite::layer_norm_backward::<Flex>(prim(&x), prim(&gamma), mean, rstd, prim(&grad));
        assert_close(&values(float::<2>(fused.0)), &values(float::<2>(plain.0)), 1e-4, "layer norm dx");
        assert_close(&values(float::<1>(fused.1)), &values(float::<1>(plain.1)), 1e-4, "dgamma");
        assert_close(&values(float::<1>(fused.2)), &values(float::<1>(plain.2)), 1e-4, "dbeta");
    }
}

#[test]
fn layer_norm_gradient_through_autodiff_matches_burns_layer_norm() {
    use burn::module::Param;
    use burn::nn::LayerNormConfig;
    let (rows, d) = (40, 96);
    let x = random::<Ad, 2>([rows, d], 2.0, 91).require_grad();
    let weights = random::<Ad, 2>([rows, d], 1.0, 92);
    let mut burns = LayerNormConfig::new(d).init::<Ad>(&Default::default());
    burns.gamma = Param::from_tensor(random::<Ad, 1>([d], 1.0, 93));
    burns.beta = Some(Param::from_tensor(random::<Ad, 1>([d], 1.0, 94)));
    let (gamma, beta) = (burns.gamma.val(), burns.beta.as_ref().unwrap().val());
    let fused_y = pipe::model::fused::layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5);
    let plain_y = burns.forward(x.clone());
    assert_close(&values(fused_y.clone()), &values(plain_y.clone()), 1e-5, "layer norm");
    let fused = (fused_y * weights.clone()).sum().backward();
    let plain = (plain_y * weights).sum().backward();
    assert_close(&values(x.grad(&fused).unwrap()), &values(x.grad(&plain).unwrap()), 1e-4, "x gradient");
    assert_close(&values(gamma.grad(&fused).unwrap()), &values(gamma.grad(&plain).unwrap()), 1e-4, "gamma gradient");
    assert_close(&values(beta.grad(&fused).unwrap()), &values(beta.grad(&plain).unwrap()), 1e-4, "beta gradient");
}

#[test]
fn rms_norm_kernel_matches_composite_forward_and_backward() {
    for (rows, d) in [(3, 5), (130, 576), (9, 1031)] {
        let x = random::<Flex, 2>([rows, d], 3.0, 101).add_scalar(1.0);
        let weight = random::<Flex, 1>([d], 1.0, 102);
        let grad = random::<Flex, 2>([rows, d], 1.0, 103);
        let (y, rstd) = Flex::fused_rms_norm(prim(&x), prim(&weight), 1e-6);
        let (want_y, want_rstd) = composite::rms_norm::<Flex>(prim(&x), prim(&weight), 1e-6);
        assert_close(&values(float::<2>(y)), &values(float::<2>(want_y)), 1e-5, "rms norm");
        assert_close(&values(float::<1>(rstd.clone())), &values(float::<1>(want_rstd)), 1e-6, "1/rms");
        let fused = Flex::fused_rms_norm_backward(prim(&x), prim(&weight), rstd.clone(), prim(&grad));
        let plain = composite::rms_norm_backward::<Flex>(prim(&x), prim(&weight), rstd, prim(&grad));
        assert_close(&values(float::<2>(fused.0)), &values(float::<2>(plain.0)), 1e-4, "rms norm dx");
        assert_close(&values(float::<1>(fused.1)), &values(float::<1>(plain.1)), 1e-4, "dweight");
    }
}

#[test]
fn rms_norm_gradient_through_autodiff_matches_burns_own() {
    let (rows, d) = (40, 96);
    let x = random::<Ad, 2>([rows, d], 2.0, 111).require_grad();
    let weight = random::<Ad, 1>([d], 1.0, 112).require_grad();
    let weights = random::<Ad, 2>([rows, d], 1.0, 113);
    let fused_y = pipe::model::fused::rms_norm(x.clone(), weight.clone(), 1e-6);
    // transformers' LlamaRMSNorm, written with burn's ops.
    let plain_y = x.clone() * (x.clone().powi_scalar(2).mean_dim(1) + 1e-6).sqrt().recip() * weight.clone().unsqueeze();
    assert_close(&values(fused_y.clone()), &values(plain_y.clone()), 1e-5, "rms norm");
    let fused = (fused_y * weights.clone()).sum().backward();
    let plain = (plain_y * weights).sum().backward();
    assert_close(&values(x.grad(&fused).unwrap()), &values(x.grad(&plain).unwrap()), 1e-4, "x gradient");
    assert_close(&values(weight.grad(&fused).unwrap()), &values(weight.grad(&plain).unwrap()), 1e-4, "weight gradient");
}

#[test]
fn swiglu_kernel_matches_composite_forward_and_backward() {
    // Wide range, odd length (not a multiple of any vector width or chunk).
    let (gate, up) = (random::<Flex, 2>([37, 1031], 4.0, 121), random::<Flex, 2>([37, 1031], 2.0, 122));
    let grad = random::<Flex, 2>([37, 1031], 1.0, 123);
    let fused = float::<2>(Flex::swiglu(prim(&gate), prim(&up)));
    let plain = float::<2>(composite::swiglu::<Flex>(prim(&gate), prim(&up)));
    assert_close(&values(fused), &values(plain), 1e-6, "swiglu forward");
    let fused = Flex::swiglu_backward(prim(&gate), prim(&up), prim(&grad));
    let plain = composite::swiglu_backward::<Flex>(prim(&gate), prim(&up), prim(&grad));
    assert_close(&values(float::<2>(fused.0)), &values(float::<2>(plain.0)), 1e-6, "swiglu dgate");
    assert_close(&values(float::<2>(fused.1)), &values(float::<2>(plain.1)), 1e-6, "swiglu dup");
}

#[test]
fn swiglu_gradient_through_autodiff_matches_burns_own() {
    let gate = random::<Ad, 2>([24, 80], 3.0, 131).require_grad();
    let up = random::<Ad, 2>([24, 80], 1.0, 132).require_grad();
    let weights = random::<Ad, 2>([24, 80], 1.0, 133);
    let fused_y = pipe::model::fused::swiglu(gate.clone(), up.clone());
    let plain_y = burn::tensor::activation::silu(gate.clone()) * up.clone();
    assert_close(&values(fused_y.clone()), &values(plain_y.clone()), 1e-6, "swiglu");
    let fused = (fused_y * weights.clone()).sum().backward();
    let plain = (plain_y * weights).sum().backward();
    assert_close(&values(gate.grad(&fused).unwrap()), &values(gate.grad(&plain).unwrap()), 1e-5, "gate gradient");
    assert_close(&values(up.grad(&fused).unwrap()), &values(up.grad(&plain).unwrap()), 1e-5, "up gradient");
}

/// Angles of a rotary embedding at positions that restart (as packed rows do), for `half`
/// frequencies. → cos, sin: [rows, half]
fn rotary_angles<B: Backend>(rows: usize, half: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let angles: Vec<f32> = (0..rows)
        .flat_map(|r| (0..half).map(move |i| (r % 7) as f32 / 10_000f32.powf(2.0 * i as f32 / (2 * half) as f32)))
        .collect();
    let angles = Tensor::<B, 2>::from_data(TensorData::new(angles, [rows, half]), &Default::default());
    (angles.clone().cos(), angles.sin())
}

#[test]
fn rotary_qkv_kernel_matches_composite_forward_and_backward() {
    // Grouped (3 heads a key/value head), multi-head (as many) and multi-query (one) attention;
    // enough rows for several parallel tasks.
    for (rows, heads, kv_heads, head_dim) in [(5, 6, 2, 8), (300, 9, 3, 64), (33, 4, 4, 16), (17, 4, 1, 6)] {
        let q = random::<Flex, 2>([rows, heads * head_dim], 1.0, 141);
        let k = random::<Flex, 2>([rows, kv_heads * head_dim], 1.0, 142);
        let v = random::<Flex, 2>([rows, kv_heads * head_dim], 1.0, 143);
        let grad = random::<Flex, 2>([rows, 3 * heads * head_dim], 1.0, 144);
        let (cos, sin) = rotary_angles::<Flex>(rows, head_dim / 2);
        let args = RotaryArgs { cos: prim(&cos), sin: prim(&sin), heads, kv_heads };
        let fused = Flex::rotary_qkv(prim(&q), prim(&k), prim(&v), args.clone());
        let plain = composite::rotary_qkv::<Flex>(prim(&q), prim(&k), prim(&v), args.clone());
        let shape = format!("{rows} rows, {heads} heads on {kv_heads}");
        assert_close(&values(float::<2>(fused)), &values(float::<2>(plain)), 1e-6, &format!("rotary qkv, {shape}"));
        let fused = Flex::rotary_qkv_backward(prim(&grad), args.clone());
        let plain = composite::rotary_qkv_backward::<Flex>(prim(&grad), args);
        for (what, got, want) in [("dq", fused.0, plain.0), ("dk", fused.1, plain.1), ("dv", fused.2, plain.2)] {
            assert_close(&values(float::<2>(got)), &values(float::<2>(want)), 1e-5, &format!("{what}, {shape}"));
        }
    }
}

#[test]
fn rotary_qkv_gradient_through_autodiff_matches_burns_rotation_and_spread() {
    let (rows, heads, kv_heads, head_dim) = (12, 6, 2, 8);
    let q = random::<Ad, 2>([rows, heads * head_dim], 1.0, 151).require_grad();
    let k = random::<Ad, 2>([rows, kv_heads * head_dim], 1.0, 152).require_grad();
    let v = random::<Ad, 2>([rows, kv_heads * head_dim], 1.0, 153).require_grad();
    let weights = random::<Ad, 2>([rows, 3 * heads * head_dim], 1.0, 154);
    let (cos, sin) = rotary_angles::<Ad>(rows, head_dim / 2);
    let fused_y =
        pipe::model::fused::rotary_qkv(q.clone(), k.clone(), v.clone(), cos.clone(), sin.clone(), heads, kv_heads);
    // transformers' apply_rotary_pos_emb and repeat_kv, written with burn's ops.
    let whole = |t: &Tensor<Ad, 2>| Tensor::cat(vec![t.clone(), t.clone()], 1).unsqueeze_dim::<3>(1);
    let rotate = |x: Tensor<Ad, 2>, n: usize| {
        let x = x.reshape([rows, n, head_dim]);
        let (x1, x2) = (x.clone().narrow(2, 0, head_dim / 2), x.clone().narrow(2, head_dim / 2, head_dim / 2));
        x * whole(&cos) + Tensor::cat(vec![x2.neg(), x1], 2) * whole(&sin)
    };
    let spread = |x: Tensor<Ad, 3>| {
        let group = heads / kv_heads;
        x.unsqueeze_dim::<4>(2).expand([rows, kv_heads, group, head_dim]).reshape([rows, heads * head_dim])
    };
    let plain_q = rotate(q.clone(), heads).reshape([rows, heads * head_dim]);
    let plain_k = spread(rotate(k.clone(), kv_heads));
    let plain_v = spread(v.clone().reshape([rows, kv_heads, head_dim]));
    let plain_y = Tensor::cat(vec![plain_q, plain_k, plain_v], 1);
    assert_close(&values(fused_y.clone()), &values(plain_y.clone()), 1e-6, "rotary qkv");
    let fused = (fused_y * weights.clone()).sum().backward();
    let plain = (plain_y * weights).sum().backward();
    assert_close(&values(q.grad(&fused).unwrap()), &values(q.grad(&plain).unwrap()), 1e-5, "q gradient");
    assert_close(&values(k.grad(&fused).unwrap()), &values(k.grad(&plain).unwrap()), 1e-5, "k gradient");
    assert_close(&values(v.grad(&fused).unwrap()), &values(v.grad(&plain).unwrap()), 1e-5, "v gradient");
}
