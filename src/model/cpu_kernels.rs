//! The CPU backend's kernels for the fused ops: plain loops over contiguous f32 rows, split
//! across rayon's threads, the inner loops compiled a second time with AVX2 and FMA for CPUs
//! that have them (LLVM vectorises them to the widest instructions it is allowed). `exp` is a
//! polynomial that vectorises, unlike libm's `expf`; it is within 2 ulp of it (test below).
//! The matrix products and every other unsafe piece they need live in `raw`.

use std::borrow::Cow;

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::Flex;
use burn::tensor::{Bytes, DType, Shape};
use rayon::prelude::*;

use super::fused::composite::{GELU_A, GELU_B};
use super::fused::{AdamUpdate, AttentionArgs, LinearGradsWanted, RotaryArgs};
use super::gpt2::Precision;
use super::raw::{bf16_matmul, filled, matmul, par_matmul, vectorised, Mat, Out, SharedMut};

/// Elements per parallel task in element-wise kernels: large enough to amortise scheduling.
const CHUNK: usize = 16 * 1024;

/// Whether work over `len` elements is worth handing to rayon's pool: entering it from a
/// thread outside it costs a cross-thread wake-up, more than a small kernel (one generated
/// token's LayerNorm, a bias's Adam update) takes.
fn worth_threads(len: usize) -> bool {
    len > CHUNK
}

/// e^x for f32, branch-free so that loops over it vectorise: x = n·ln 2 + r with |r| ≤ ln 2 / 2,
/// e^r by Cephes' degree-6 polynomial, 2^n built in the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    let two_n = f32::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    e_r * two_n
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// A tensor's f32 elements in row-major order (copied only if the layout is not contiguous).
fn f32s(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("contiguous f32").to_vec()),
    }
}

/// Index tensor elements as usize (burn's int tensors are i32 or i64 by backend and origin).
fn indices(t: &FlexTensor) -> Vec<usize> {
    let t = t.to_contiguous();
    match t.dtype() {
        DType::I32 => t.as_slice::<i32>().expect("contiguous").iter().map(|&i| i as usize).collect(),
        DType::I64 => t.as_slice::<i64>().expect("contiguous").iter().map(|&i| i as usize).collect(),
        other => panic!("index tensor of dtype {other:?}"),
    }
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(shape), DType::F32)
}

/// Sum and max over 16 independent lanes, so the loops vectorise (a single running f32 would
/// have to be summed in order).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(x);
        }
    }
    tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

#[inline(always)]
fn row_sum_exp(row: &[f32], shift: f32) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += exp(x - shift);
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&x| exp(x - shift)).sum::<f32>()
}

vectorised! {
    pub(super) fn gelu_chunk(y: &mut [f32], x: &[f32]) {
        let (a, b) = (GELU_A as f32, GELU_B as f32);
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * sigmoid(x * (a + b * x * x));
        }
    }
}

vectorised! {
    fn gelu_backward_chunk(dx: &mut [f32], x: &[f32], grad: &[f32]) {
        let (a, b) = (GELU_A as f32, GELU_B as f32);
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(grad) {
            let x2 = x * x;
            let s = sigmoid(x * (a + b * x2));
            *dx = g * (s + x * s * (1.0 - s) * (a + 3.0 * b * x2));
        }
    }
}

pub fn gelu_new(x: FlexTensor) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let x = f32s(&x);
    let mut y = vec![0.0f32; x.len()];
    let kernel = |(y, x): (&mut [f32], &[f32])| gelu_chunk(y, x);
    match worth_threads(x.len()) {
        true => y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(kernel),
        false => kernel((&mut y, &x)),
    }
    tensor(y, shape)
}

pub fn gelu_new_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let (x, grad) = (f32s(&x), f32s(&grad));
    let mut dx = vec![0.0f32; x.len()];
    let kernel = |(dx, (x, grad)): (&mut [f32], (&[f32], &[f32]))| gelu_backward_chunk(dx, x, grad);
    match worth_threads(x.len()) {
        true => dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK))).for_each(kernel),
        false => kernel((&mut dx, (&x, &grad))),
    }
    tensor(dx, shape)
}

vectorised! {
    /// log Σ e^x over a row.
    fn log_sum_exp(row: &[f32]) -> f32 {
        let max = row_max(row);
        max + row_sum_exp(row, max).ln()
    }
}

vectorised! {
    /// Logits → g · softmax(logits), in place, given the row's log-sum-exp.
    fn scaled_softmax(row: &mut [f32], lse: f32, g: f32) {
        for x in row.iter_mut() {
            *x = g * exp(*x - lse);
        }
    }
}

pub fn cross_entropy(logits: FlexTensor, targets: FlexTensor) -> (FlexTensor, FlexTensor) {
    let [rows, vocab] = logits.layout().shape().dims::<2>();
    let (logits, targets) = (f32s(&logits), indices(&targets));
    let mut nll = vec![0.0f32; rows];
    let mut lse = vec![0.0f32; rows];
    (logits.par_chunks(vocab), nll.par_iter_mut(), lse.par_iter_mut(), targets).into_par_iter().for_each(
        |(row, nll, lse, target)| {
            *lse = log_sum_exp(row);
            *nll = *lse - row[target];
        },
    );
    (tensor(nll, Shape::new([rows])), tensor(lse, Shape::new([rows])))
}

/// The logits' gradient, written over the logits themselves when nothing else holds them (the
/// usual case: only this op's saved state does), which spares a [rows, vocab] buffer.
pub fn cross_entropy_backward(
    logits: FlexTensor,
    targets: FlexTensor,
    lse: FlexTensor,
    grad: FlexTensor,
) -> FlexTensor {
    let [rows, vocab] = logits.layout().shape().dims::<2>();
    let (targets, lse, grad) = (indices(&targets), f32s(&lse), f32s(&grad));
    let mut dlogits = owned(logits);
    let values = &mut dlogits.storage_mut::<f32>()[..rows * vocab];
    values.par_chunks_mut(vocab).enumerate().for_each(|(i, row)| {
        let g = grad[i];
        // Rows outside the loss (prompt, padding) have a zero gradient.
        if g == 0.0 {
            row.fill(0.0);
            return;
        }
        scaled_softmax(row, lse[i], g);
        row[targets[i]] -= g;
    });
    dlogits
}

/// x·weight + bias, the product in `precision`, the bias written first and the product added
/// onto it, into memory that is not zeroed first.
/// x: [rows, in], weight: [in, out] (any strides), bias: [out] → [rows, out]
pub fn linear(x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>, precision: Precision) -> FlexTensor {
    let product = product(precision);
    let [rows, d_in] = x.layout().shape().dims::<2>();
    let d_out = weight.layout().shape().dims::<2>()[1];
    let x = f32s(&x);
    let x_mat = Mat::row_major(&x, 0, d_in);
    let bias = bias.as_ref().map(f32s);
    // SAFETY: the product writes every element of the [rows, d_out] output (onto the bias rows
    // when there is a bias); the output is new, so nothing else reads or writes it.
    let y = unsafe {
        filled(rows * d_out, |out| {
            if let Some(bias) = &bias {
                (0..rows).for_each(|r| out.copy_in(r * d_out, bias));
            }
            product([rows, d_out, d_in], out.row_major(0, d_out), x_mat, Mat::of(&weight), bias.is_some());
        })
    };
    tensor(y, Shape::new([rows, d_out]))
}

/// The matrix product a precision runs: f32's, or bf16 operands with f32 sums.
fn product(precision: Precision) -> unsafe fn([usize; 3], Out, Mat, Mat, bool) {
    match precision {
        Precision::F32 => par_matmul,
        Precision::Bf16 => bf16_matmul,
    }
}

/// The gradients of `linear`: dx = grad·weightᵀ, dweight = xᵀ·grad (laid out as the weight is,
/// so a transposed weight view gets a transposed gradient), dbias = the column sums of grad.
pub fn linear_backward(
    x: FlexTensor,
    weight: FlexTensor,
    grad: FlexTensor,
    wanted: LinearGradsWanted,
    precision: Precision,
) -> (FlexTensor, Option<FlexTensor>, Option<FlexTensor>) {
    let product = product(precision);
    let [rows, d_in] = x.layout().shape().dims::<2>();
    let d_out = weight.layout().shape().dims::<2>()[1];
    let (x, grad) = (f32s(&x), f32s(&grad));
    let x_mat = Mat::row_major(&x, 0, d_in);
    let grad_mat = Mat::row_major(&grad, 0, d_out);
    // SAFETY: the product writes every element of the new [rows, d_in] output.
    let dx = unsafe {
        filled(rows * d_in, |out| {
            product([rows, d_in, d_out], out.row_major(0, d_in), grad_mat, Mat::of(&weight).t(), false)
        })
    };
    let db = wanted.bias.then(|| tensor(column_sums(&grad, d_out), Shape::new([d_out])));
    let dx = tensor(dx, Shape::new([rows, d_in]));
    if !wanted.weight {
        return (dx, None, db);
    }
    // A column-major weight (the tied LM head's transposed embedding) gets a column-major gradient.
    let column_major = weight.layout().strides()[0] == 1 && d_out > 1;
    let (row, col) = if column_major { (1, d_in as isize) } else { (d_out as isize, 1) };
    // SAFETY: the product writes every one of the d_in·d_out elements, in either layout.
    let dw = unsafe {
        filled(d_in * d_out, |out| product([d_in, d_out, rows], out.strided(0, row, col), x_mat.t(), grad_mat, false))
    };
    let dw =
        FlexTensor::new(Bytes::from_elems(dw), Layout::new(Shape::new([d_in, d_out]), vec![row, col], 0), DType::F32);
    (dx, Some(dw), db)
}

vectorised! {
    fn column_sum_block(rows: &[f32], cols: usize) -> Vec<f32> {
        let mut sum = vec![0.0f32; cols];
        for row in rows.chunks_exact(cols) {
            sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        sum
    }
}

/// Sums of the columns of a row-major [rows, cols] matrix: one partial sum per thread's block
/// of rows, then the partials added.
fn column_sums(values: &[f32], cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let block = rows.div_ceil(rayon::current_num_threads().max(1)).max(1);
    let kernel = |rows: &[f32]| column_sum_block(rows, cols);
    let partials: Vec<Vec<f32>> = match worth_threads(values.len()) {
        true => values.par_chunks(block * cols).map(kernel).collect(),
        false => vec![kernel(values)],
    };
    partials
        .into_iter()
        .reduce(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0.0; cols])
}

/// Rows of a (batch, head)'s attention computed together: each block of queries is multiplied
/// only with the keys up to its last row, so the products skip most of the masked half.
const QUERY_BLOCK: usize = 64;

/// A sequence's blocks of queries: (first row, rows).
fn query_blocks(seq: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq).step_by(QUERY_BLOCK).map(move |first| (first, QUERY_BLOCK.min(seq - first)))
}

/// Causal self-attention per (batch, head), reading the heads straight out of the packed
/// projections and writing the output in [batch, seq, d_model] order, so that no head
/// split/merge copies are made. With a dropout mask `keep`, the output is (P ⊙ keep)·V. Returns
/// the output and the attention probabilities P (before dropout). The products are f32 at
/// either precision: at attention's sizes (k = head width, or a block of rows) packing bf16
/// operands costs more than their products save (docs/speed.md).
pub fn causal_attention(qkv: FlexTensor, args: AttentionArgs<Flex>) -> (FlexTensor, FlexTensor) {
    let AttentionArgs { n_head, keep, starts, gaps, .. } = args;
    let [batch, seq, three_d] = qkv.layout().shape().dims::<3>();
    let (d, qkv) = (three_d / 3, f32s(&qkv));
    let keep = keep.as_ref().map(f32s);
    let starts = starts.as_ref().map(indices); // [batch·seq]
    let gaps = gaps.as_ref().map(indices); // [batch·seq·2]
    let head_dim = d / n_head;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut y = vec![0.0f32; batch * seq * d];
    let mut probs = vec![0.0f32; batch * n_head * seq * seq];
    let y_out = SharedMut::new(&mut y);
    probs.par_chunks_mut(seq * seq).enumerate().for_each(|(bh, p)| {
        let (b, h) = (bh / n_head, bh % n_head);
        let base = b * seq * three_d + h * head_dim;
        let part = |i: usize| Mat::row_major(&qkv, base + i * d, three_d);
        let (q, k, v) = (part(0), part(1), part(2));
        let spans = RowSpans {
            starts: starts.as_ref().map(|s| &s[b * seq..(b + 1) * seq]),
            gaps: gaps.as_ref().map(|g| &g[2 * b * seq..2 * (b + 1) * seq]),
        };
        for (first, rows) in query_blocks(seq) {
            let keys = first + rows; // the keys up to the block's last row
            let block = &mut p[first * seq..keys * seq];
            // SAFETY: block is this task's own.
            unsafe {
                matmul(
                    [rows, keys, head_dim],
                    SharedMut::new(block).row_major(0, seq),
                    q.offset_to(first, 0),
                    k.t(),
                    scale,
                    false,
                );
                // scores [rows, keys]
            }
            causal_softmax_rows(block, seq, first, spans);
        }
        let dropped = keep.as_ref().map(|keep| times(p, &keep[bh * seq * seq..(bh + 1) * seq * seq]));
        let p = Mat::row_major(dropped.as_deref().unwrap_or(p), 0, seq);
        for (first, rows) in query_blocks(seq) {
            let keys = first + rows;
            let y_rows = y_out.row_major(b * seq * d + first * d + h * head_dim, d);
            // SAFETY: y's head-h columns of batch b are written by this task alone.
            unsafe { matmul([rows, head_dim, keys], y_rows, p.offset_to(first, 0), v, 1.0, false) };
            // [rows, head_dim]
        }
    });
    (tensor(y, Shape::new([batch, seq, d])), tensor(probs, Shape::new([batch, n_head, seq, seq])))
}

/// One row of packed sequences' key spans (`KeySpans`): each query's example start, and its
/// gap as (from, to) pairs. starts: [seq], gaps: [seq·2]
#[derive(Clone, Copy)]
struct RowSpans<'a> {
    starts: Option<&'a [usize]>,
    gaps: Option<&'a [usize]>,
}

impl RowSpans<'_> {
    /// The keys query `i` skips: those before `start`, and those in `gap`, which lies in
    /// start..i (clamped there, so the query always sees itself).
    fn of(&self, i: usize) -> (usize, std::ops::Range<usize>) {
        let start = self.starts.map_or(0, |s| s[i].min(i));
        let gap = self.gaps.map_or(start..start, |g| g[2 * i].clamp(start, i)..g[2 * i + 1].clamp(start, i));
        (start, gap.start..gap.end.max(gap.start))
    }
}

vectorised! {
/// Row i of the rows starting at `first` (query `first + i`) keeps columns start..=first + i
/// but its gap (`RowSpans::of`; start 0 and no gap for one example a row): softmax over
/// those, zeros elsewhere.
fn causal_softmax_rows(scores: &mut [f32], seq: usize, first: usize, spans: RowSpans<'_>) {
    for (row, scores) in scores.chunks_exact_mut(seq).enumerate() {
        let i = first + row;
        let (upto, masked) = scores.split_at_mut(i + 1);
        let (start, gap) = spans.of(i);
        let (before, kept) = upto.split_at_mut(start);
        before.fill(0.0);
        // kept = [start, gap.start) ∪ [gap.end, i]; the gap's scores are zeroed after.
        let (head, rest) = kept.split_at_mut(gap.start - start);
        let (skipped, tail) = rest.split_at_mut(gap.len());
        let max = row_max(head).max(row_max(tail));
        let exp_sum = |xs: &mut [f32]| {
            let mut sum = 0.0;
            for x in xs.iter_mut() {
                *x = exp(*x - max);
                sum += *x;
            }
            sum
        };
        let inv = 1.0 / (exp_sum(head) + exp_sum(tail));
        head.iter_mut().for_each(|x| *x *= inv);
        tail.iter_mut().for_each(|x| *x *= inv);
        skipped.fill(0.0);
        masked.fill(0.0);
    }
}
}

vectorised! {
    /// a ⊙ b.
    fn times(a: &[f32], b: &[f32]) -> Vec<f32> {
        a.iter().zip(b).map(|(a, b)| a * b).collect()
    }
}

vectorised! {
    /// a ⊙= b.
    fn times_in_place(a: &mut [f32], b: &[f32]) {
        a.iter_mut().zip(b).for_each(|(a, b)| *a *= b);
    }
}

/// The gradient of `causal_attention` with respect to the packed projections, from the saved
/// probabilities P and dropout mask M (1 without dropout): dV = (P⊙M)ᵀ·dY, dP = (dY·Vᵀ) ⊙ M,
/// dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = s·dS·K, dK = s·dSᵀ·Q, the products f32 (as forward).
/// P and dS are zero above the diagonal, so each block of rows (of dP, dQ) takes the columns up
/// to its last row, and each block of columns (of dV, dK) the rows from its first.
/// grad: [batch, seq, d_model] → [batch, seq, 3·d_model]
pub fn causal_attention_backward(
    qkv: FlexTensor,
    probs: FlexTensor,
    grad: FlexTensor,
    args: AttentionArgs<Flex>,
) -> FlexTensor {
    let AttentionArgs { n_head, keep, .. } = args;
    let [batch, seq, three_d] = qkv.layout().shape().dims::<3>();
    let (d, qkv, probs, grad) = (three_d / 3, f32s(&qkv), f32s(&probs), f32s(&grad));
    let keep = keep.as_ref().map(f32s);
    let head_dim = d / n_head;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut dqkv = vec![0.0f32; batch * seq * three_d];
    let out = SharedMut::new(&mut dqkv);
    probs.par_chunks(seq * seq).enumerate().for_each(|(bh, p)| {
        let (b, h) = (bh / n_head, bh % n_head);
        let base = b * seq * three_d + h * head_dim;
        let part = |i: usize| Mat::row_major(&qkv, base + i * d, three_d);
        let (q, k, v) = (part(0), part(1), part(2));
        let dy = Mat::row_major(&grad, b * seq * d + h * head_dim, d);
        let keep = keep.as_ref().map(|keep| &keep[bh * seq * seq..(bh + 1) * seq * seq]);
        let dropped = keep.map(|keep| times(p, keep));
        let p_mat = Mat::row_major(dropped.as_deref().unwrap_or(p), 0, seq);
        let mut ds = vec![0.0f32; seq * seq];
        let ds_out = SharedMut::new(&mut ds);
        // Row `first` of part `i`'s gradient, for this (batch, head).
        let slot = |i: usize, first: usize| out.row_major(base + first * three_d + i * d, three_d);
        // SAFETY: this task alone writes the head-h columns of batch b in dqkv; ds is its own.
        unsafe {
            for (first, len) in query_blocks(seq) {
                // Block columns of P see the queries from `first` on; block rows of dP the keys to its end.
                let (queries, keys) = (seq - first, first + len);
                let (dv, dp) = (slot(2, first), ds_out.row_major(first * seq, seq));
                matmul(
                    [len, head_dim, queries],
                    dv,
                    p_mat.offset_to(first, first).t(),
                    dy.offset_to(first, 0),
                    1.0,
                    false,
                ); // dV [len, head_dim]
                matmul([len, keys, head_dim], dp, dy.offset_to(first, 0), v.t(), 1.0, false);
                // dP [len, keys]
            }
        }
        if let Some(keep) = keep {
            times_in_place(&mut ds, keep);
        }
        softmax_backward_rows(&mut ds, p, seq);
        let ds = Mat::row_major(&ds, 0, seq);
        // SAFETY: as above.
        unsafe {
            for (first, len) in query_blocks(seq) {
                let (queries, keys) = (seq - first, first + len);
                matmul([len, head_dim, keys], slot(0, first), ds.offset_to(first, 0), k, scale, false); // dQ
                matmul(
                    [len, head_dim, queries],
                    slot(1, first),
                    ds.offset_to(first, first).t(),
                    q.offset_to(first, 0),
                    scale,
                    false,
                ); // dK
            }
        }
    });
    tensor(dqkv, Shape::new([batch, seq, three_d]))
}

vectorised! {
/// dP → dS in place, row by row: dS = P ⊙ (dP − Σ dP ⊙ P). Masked entries (P = 0) become 0.
fn softmax_backward_rows(dp: &mut [f32], p: &[f32], seq: usize) {
    for (i, (row, p)) in dp.chunks_exact_mut(seq).zip(p.chunks_exact(seq)).enumerate() {
        let (ds, masked) = row.split_at_mut(i + 1);
        let p = &p[..=i];
        let dot: f32 = ds.iter().zip(p).map(|(g, p)| g * p).sum();
        ds.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
        masked.fill(0.0);
    }
}
}

/// Rows per parallel task in row-wise kernels: about `CHUNK` elements.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

pub fn layer_norm(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    epsilon: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [rows, d] = x.layout().shape().dims::<2>();
    let (x, gamma, beta) = (f32s(&x), f32s(&gamma), f32s(&beta));
    let (mut y, mut mean, mut rstd) = (vec![0.0f32; rows * d], vec![0.0f32; rows], vec![0.0f32; rows]);
    let block = rows_per_task(d);
    let kernel = |(y, x, mean, rstd): (&mut [f32], &[f32], &mut [f32], &mut [f32])| {
        layer_norm_rows(y, x, mean, rstd, &gamma, &beta, epsilon as f32)
    };
    if worth_threads(rows * d) {
        (y.par_chunks_mut(block * d), x.par_chunks(block * d), mean.par_chunks_mut(block), rstd.par_chunks_mut(block))
            .into_par_iter()
            .for_each(kernel);
    } else {
        kernel((&mut y, &x, &mut mean, &mut rstd));
    }
    (tensor(y, Shape::new([rows, d])), tensor(mean, Shape::new([rows])), tensor(rstd, Shape::new([rows])))
}

vectorised! {
    pub(super) fn layer_norm_rows(
        y: &mut [f32],
        x: &[f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        gamma: &[f32],
        beta: &[f32],
        epsilon: f32,
    ) {
        let d = gamma.len();
        for (((y, x), mean), rstd) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(mean).zip(rstd) {
            *mean = lane_sum(x) / d as f32;
            // Variance about the mean (two passes: no cancellation for off-centre rows).
            y.iter_mut().zip(x).for_each(|(c, v)| *c = (v - *mean) * (v - *mean));
            *rstd = 1.0 / (lane_sum(y) / d as f32 + epsilon).sqrt();
            for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                *y = (x - *mean) * *rstd * g + b;
            }
        }
    }
}

/// Sum over 16 independent lanes, so that the loop vectorises.
#[inline(always)]
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, v)| *l += v);
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

vectorised! {
    /// dx for a block of rows, and the block's sums for dgamma and dbeta.
    fn layer_norm_backward_rows(
        dx: &mut [f32],
        x: &[f32],
        grad: &[f32],
        mean: &[f32],
        rstd: &[f32],
        gamma: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let d = gamma.len();
        let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
        let rows = dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(grad.chunks_exact(d));
        for (((dx, x), dy), (&mean, &rstd)) in rows.zip(mean.iter().zip(rstd)) {
            // dx first holds x̂, then the gradient.
            dx.iter_mut().zip(x).for_each(|(h, &x)| *h = (x - mean) * rstd);
            let (mut sum_g, mut sum_gx) = (0.0f32, 0.0f32);
            for ((((&h, &dy), &gm), dg), db) in dx.iter().zip(dy).zip(gamma).zip(dgamma.iter_mut()).zip(dbeta.iter_mut()) {
                let g = dy * gm;
                sum_g += g;
                sum_gx += g * h;
                *dg += dy * h;
                *db += dy;
            }
            let (mean_g, mean_gx) = (sum_g / d as f32, sum_gx / d as f32);
            for ((h, &dy), &gm) in dx.iter_mut().zip(dy).zip(gamma) {
                *h = rstd * (dy * gm - mean_g - *h * mean_gx);
            }
        }
        (dgamma, dbeta)
    }
}

/// dx row by row; dgamma and dbeta as per-task partial sums, then added.
pub fn layer_norm_backward(
    x: FlexTensor,
    gamma: FlexTensor,
    mean: FlexTensor,
    rstd: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [rows, d] = x.layout().shape().dims::<2>();
    let (x, gamma, mean, rstd, grad) = (f32s(&x), f32s(&gamma), f32s(&mean), f32s(&rstd), f32s(&grad));
    let mut dx = vec![0.0f32; rows * d];
    let block = rows_per_task(d);
    type Block<'a> = (&'a mut [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);
    let kernel = |(dx, x, grad, mean, rstd): Block<'_>| layer_norm_backward_rows(dx, x, grad, mean, rstd, &gamma);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = if worth_threads(rows * d) {
        let blocks = (
            dx.par_chunks_mut(block * d),
            x.par_chunks(block * d),
            grad.par_chunks(block * d),
            mean.par_chunks(block),
            rstd.par_chunks(block),
        );
        blocks.into_par_iter().map(kernel).collect()
    } else {
        vec![kernel((&mut dx, &x, &grad, &mean, &rstd))]
    };
    let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
    for (g, b) in partials {
        dgamma.iter_mut().zip(g).for_each(|(a, v)| *a += v);
        dbeta.iter_mut().zip(b).for_each(|(a, v)| *a += v);
    }
    (tensor(dx, Shape::new([rows, d])), tensor(dgamma, Shape::new([d])), tensor(dbeta, Shape::new([d])))
}

pub fn rms_norm(x: FlexTensor, weight: FlexTensor, epsilon: f64) -> (FlexTensor, FlexTensor) {
    let [rows, d] = x.layout().shape().dims::<2>();
    let (x, weight) = (f32s(&x), f32s(&weight));
    let (mut y, mut rstd) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
    let block = rows_per_task(d);
    let kernel = |(y, x, rstd): (&mut [f32], &[f32], &mut [f32])| rms_norm_rows(y, x, rstd, &weight, epsilon as f32);
    if worth_threads(rows * d) {
        (y.par_chunks_mut(block * d), x.par_chunks(block * d), rstd.par_chunks_mut(block))
            .into_par_iter()
            .for_each(kernel);
    } else {
        kernel((&mut y, &x, &mut rstd));
    }
    (tensor(y, Shape::new([rows, d])), tensor(rstd, Shape::new([rows])))
}

vectorised! {
    pub(super) fn rms_norm_rows(y: &mut [f32], x: &[f32], rstd: &mut [f32], weight: &[f32], epsilon: f32) {
        let d = weight.len();
        for ((y, x), rstd) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(rstd) {
            y.iter_mut().zip(x).for_each(|(s, v)| *s = v * v);
            *rstd = 1.0 / (lane_sum(y) / d as f32 + epsilon).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                *y = x * *rstd * w;
            }
        }
    }
}

vectorised! {
    /// dx for a block of rows, and the block's sum for dweight.
    fn rms_norm_backward_rows(dx: &mut [f32], x: &[f32], grad: &[f32], rstd: &[f32], weight: &[f32]) -> Vec<f32> {
        let d = weight.len();
        let mut dweight = vec![0.0f32; d];
        let rows = dx.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(grad.chunks_exact(d));
        for (((dx, x), dy), &rstd) in rows.zip(rstd) {
            // dx first holds g·x̂, then the gradient.
            for ((((h, &x), &dy), &w), dw) in dx.iter_mut().zip(x).zip(dy).zip(weight).zip(dweight.iter_mut()) {
                let x_hat = x * rstd;
                *h = dy * w * x_hat;
                *dw += dy * x_hat;
            }
            let mean_gx = lane_sum(dx) / d as f32;
            for (((h, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(weight) {
                *h = rstd * (dy * w - x * rstd * mean_gx);
            }
        }
        dweight
    }
}

/// dx row by row; dweight as per-task partial sums, then added.
pub fn rms_norm_backward(
    x: FlexTensor,
    weight: FlexTensor,
    rstd: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let [rows, d] = x.layout().shape().dims::<2>();
    let (x, weight, rstd, grad) = (f32s(&x), f32s(&weight), f32s(&rstd), f32s(&grad));
    let mut dx = vec![0.0f32; rows * d];
    let block = rows_per_task(d);
    type Block<'a> = (&'a mut [f32], &'a [f32], &'a [f32], &'a [f32]);
    let kernel = |(dx, x, grad, rstd): Block<'_>| rms_norm_backward_rows(dx, x, grad, rstd, &weight);
    let partials: Vec<Vec<f32>> = if worth_threads(rows * d) {
        let blocks =
            (dx.par_chunks_mut(block * d), x.par_chunks(block * d), grad.par_chunks(block * d), rstd.par_chunks(block));
        blocks.into_par_iter().map(kernel).collect()
    } else {
        vec![kernel((&mut dx, &x, &grad, &rstd))]
    };
    let mut dweight = vec![0.0f32; d];
    for partial in partials {
        dweight.iter_mut().zip(partial).for_each(|(a, v)| *a += v);
    }
    (tensor(dx, Shape::new([rows, d])), tensor(dweight, Shape::new([d])))
}

vectorised! {
    pub(super) fn swiglu_chunk(y: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
            *y = g * sigmoid(g) * u;
        }
    }
}

pub fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
    let shape = gate.layout().shape().clone();
    let (gate, up) = (f32s(&gate), f32s(&up));
    let mut y = vec![0.0f32; gate.len()];
    let kernel = |(y, (gate, up)): (&mut [f32], (&[f32], &[f32]))| swiglu_chunk(y, gate, up);
    match worth_threads(y.len()) {
        true => y.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(kernel),
        false => kernel((&mut y, (&gate, &up))),
    }
    tensor(y, shape)
}

vectorised! {
    /// With s = σ(gate): dgate = grad·up·s·(1 + gate·(1 − s)), dup = grad·gate·s.
    fn swiglu_backward_chunk(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], grad: &[f32]) {
        for ((((dg, du), &g), &u), &dy) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(grad) {
            let s = sigmoid(g);
            *dg = dy * u * (s * (1.0 + g * (1.0 - s)));
            *du = dy * g * s;
        }
    }
}

pub fn swiglu_backward(gate: FlexTensor, up: FlexTensor, grad: FlexTensor) -> (FlexTensor, FlexTensor) {
    let shape = gate.layout().shape().clone();
    let (gate, up, grad) = (f32s(&gate), f32s(&up), f32s(&grad));
    let (mut dgate, mut dup) = (vec![0.0f32; gate.len()], vec![0.0f32; gate.len()]);
    type Chunk<'a> = ((&'a mut [f32], &'a mut [f32]), (&'a [f32], (&'a [f32], &'a [f32])));
    let kernel = |((dg, du), (gate, (up, grad))): Chunk<'_>| swiglu_backward_chunk(dg, du, gate, up, grad);
    if worth_threads(gate.len()) {
        let outputs = dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK));
        outputs.zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))).for_each(kernel);
    } else {
        kernel(((&mut dgate, &mut dup), (&gate, (&up, &grad))));
    }
    (tensor(dgate, shape.clone()), tensor(dup, shape))
}

vectorised! {
    /// One head rotated (`sign` 1) or rotated back (`sign` −1): y₁ = x₁·cos − sign·x₂·sin,
    /// y₂ = x₂·cos + sign·x₁·sin, for the head's halves.
    pub(super) fn rotate_head(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], sign: f32) {
        let half = cos.len();
        let (y1, y2) = y.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        for ((((y1, y2), (&x1, &x2)), &c), &s) in y1.iter_mut().zip(y2).zip(x1.iter().zip(x2)).zip(cos).zip(sin) {
            let s = sign * s;
            *y1 = x1 * c - x2 * s;
            *y2 = x2 * c + x1 * s;
        }
    }
}

/// Rows per parallel task for the rotary kernels, whose rows are `3·width` wide.
fn rotary_rows_per_task(width: usize) -> usize {
    rows_per_task(3 * width)
}

/// Each row's queries rotated, its keys rotated and spread, its values spread, into the packed
/// row `causal_attention` reads.
pub fn rotary_qkv(q: FlexTensor, k: FlexTensor, v: FlexTensor, rotary: RotaryArgs<Flex>) -> FlexTensor {
    let [rows, width] = q.layout().shape().dims::<2>();
    let (heads, kv_heads) = (rotary.heads, rotary.kv_heads);
    let (head_dim, group) = (width / heads, heads / kv_heads);
    let half = head_dim / 2;
    let (q, k, v, cos, sin) = (f32s(&q), f32s(&k), f32s(&v), f32s(&rotary.cos), f32s(&rotary.sin));
    let kv_width = kv_heads * head_dim;
    let mut out = vec![0.0f32; rows * 3 * width];
    let block = rotary_rows_per_task(width);
    let kernel = |(first, out): (usize, &mut [f32])| {
        for (r, out) in (first * block..).zip(out.chunks_exact_mut(3 * width)) {
            let (cos, sin) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            let (out_q, rest) = out.split_at_mut(width);
            let (out_k, out_v) = rest.split_at_mut(width);
            let (q, k, v) = (
                &q[r * width..(r + 1) * width],
                &k[r * kv_width..(r + 1) * kv_width],
                &v[r * kv_width..(r + 1) * kv_width],
            );
            for (y, x) in out_q.chunks_exact_mut(head_dim).zip(q.chunks_exact(head_dim)) {
                rotate_head(y, x, cos, sin, 1.0);
            }
            for (h, (y_k, y_v)) in out_k.chunks_exact_mut(head_dim).zip(out_v.chunks_exact_mut(head_dim)).enumerate() {
                let source = (h / group) * head_dim..(h / group + 1) * head_dim;
                rotate_head(y_k, &k[source.clone()], cos, sin, 1.0);
                y_v.copy_from_slice(&v[source]);
            }
        }
    };
    if worth_threads(rows * 3 * width) {
        out.par_chunks_mut(block * 3 * width).enumerate().for_each(kernel);
    } else {
        kernel((0, &mut out));
    }
    tensor(out, Shape::new([rows, 3 * width]))
}

/// The packed row's gradient back to the projections': the heads a key/value head serves
/// summed, then the rotation undone.
pub fn rotary_qkv_backward(grad: FlexTensor, rotary: RotaryArgs<Flex>) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [rows, packed] = grad.layout().shape().dims::<2>();
    let width = packed / 3;
    let (heads, kv_heads) = (rotary.heads, rotary.kv_heads);
    let (head_dim, group) = (width / heads, heads / kv_heads);
    let half = head_dim / 2;
    let kv_width = kv_heads * head_dim;
    let (grad, cos, sin) = (f32s(&grad), f32s(&rotary.cos), f32s(&rotary.sin));
    let (mut dq, mut dk, mut dv) =
        (vec![0.0f32; rows * width], vec![0.0f32; rows * kv_width], vec![0.0f32; rows * kv_width]);
    let block = rotary_rows_per_task(width);
    type Block<'a> = (usize, (&'a mut [f32], (&'a mut [f32], &'a mut [f32])));
    let kernel = |(first, (dq, (dk, dv))): Block<'_>| {
        let mut summed = vec![0.0f32; head_dim];
        let rows = dq.chunks_exact_mut(width).zip(dk.chunks_exact_mut(kv_width).zip(dv.chunks_exact_mut(kv_width)));
        for (r, (dq, (dk, dv))) in (first * block..).zip(rows) {
            let (cos, sin) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            let row = &grad[r * packed..(r + 1) * packed];
            let (gq, rest) = row.split_at(width);
            let (gk, gv) = rest.split_at(width);
            for (y, g) in dq.chunks_exact_mut(head_dim).zip(gq.chunks_exact(head_dim)) {
                rotate_head(y, g, cos, sin, -1.0);
            }
            for (j, (dk, dv)) in dk.chunks_exact_mut(head_dim).zip(dv.chunks_exact_mut(head_dim)).enumerate() {
                let served = j * group * head_dim..(j + 1) * group * head_dim;
                summed.fill(0.0);
                for (g_k, g_v) in gk[served.clone()].chunks_exact(head_dim).zip(gv[served].chunks_exact(head_dim)) {
                    summed.iter_mut().zip(g_k).for_each(|(s, g)| *s += g);
                    dv.iter_mut().zip(g_v).for_each(|(s, g)| *s += g);
                }
                rotate_head(dk, &summed, cos, sin, -1.0);
            }
        }
    };
    if worth_threads(rows * packed) {
        let outputs = dq
            .par_chunks_mut(block * width)
            .zip(dk.par_chunks_mut(block * kv_width).zip(dv.par_chunks_mut(block * kv_width)));
        outputs.enumerate().for_each(kernel);
    } else {
        kernel((0, (&mut dq, (&mut dk, &mut dv))));
    }
    let shape = |cols: usize| Shape::new([rows, cols]);
    (tensor(dq, shape(width)), tensor(dk, shape(kv_width)), tensor(dv, shape(kv_width)))
}

/// A tensor's f32 buffer to update in place: its own if it is contiguous and not shared,
/// else a contiguous copy.
fn owned(t: FlexTensor) -> FlexTensor {
    let whole = t.is_contiguous() && t.layout().start_offset() == 0;
    let mut t = if whole { t } else { t.to_contiguous() };
    let _ = t.storage_mut::<f32>(); // copies now if shared, so the updates below stay ours
    t
}

/// The per-element constants of one Adam update: betas, bias corrections c = 1 − βᵗ, ε, the L2
/// term (Adam), the learning rate and the decoupled decay factor `decay` = 1 − lr·wd (AdamW).
#[derive(Clone, Copy)]
struct AdamScalars {
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    eps: f32,
    l2: f32,
    lr: f32,
    decay: f32,
}

vectorised! {
    fn adam_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: AdamScalars) {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = *p * k.l2 + g;
            *m = *m * k.b1 + g * (1.0 - k.b1);
            *v = *v * k.b2 + g * g * (1.0 - k.b2);
            let delta = (*m / k.c1) / ((*v / k.c2).sqrt() + k.eps);
            *p = *p * k.decay - delta * k.lr;
        }
    }
}

/// Adam(W), one pass over the parameter, its gradient and moments, in place, in parallel
/// chunks; the same arithmetic as `composite::adam_step`.
pub fn adam_step(
    param: FlexTensor,
    grad: FlexTensor,
    moments: Option<(FlexTensor, FlexTensor)>,
    u: AdamUpdate,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = param.layout().shape().clone();
    let grad = f32s(&grad);
    let (mut param, (mut moment_1, mut moment_2)) = (
        owned(param),
        match moments {
            Some((m, v)) => (owned(m), owned(v)),
            None => (FlexTensor::zeros(shape.clone(), DType::F32), FlexTensor::zeros(shape.clone(), DType::F32)),
        },
    );
    let (b1, b2, eps, wd) = (u.beta_1, u.beta_2, u.epsilon, u.weight_decay);
    let (c1, c2) = (1.0 - b1.powi(u.time as i32), 1.0 - b2.powi(u.time as i32));
    let (l2, lr) = (if u.decoupled { 0.0 } else { wd }, u.lr as f32);
    let decay = if u.decoupled { (1.0 - u.lr * wd as f64) as f32 } else { 1.0 };
    let n = grad.len();
    let p = &mut param.storage_mut::<f32>()[..n];
    let (m, v) = (&mut moment_1.storage_mut::<f32>()[..n], &mut moment_2.storage_mut::<f32>()[..n]);
    let scalars = AdamScalars { b1, b2, c1, c2, eps, l2, lr, decay };
    let kernel = |(p, m, v, g): (&mut [f32], &mut [f32], &mut [f32], &[f32])| adam_chunk(p, m, v, g, scalars);
    if worth_threads(n) {
        (p.par_chunks_mut(CHUNK), m.par_chunks_mut(CHUNK), v.par_chunks_mut(CHUNK), grad.par_chunks(CHUNK))
            .into_par_iter()
            .for_each(kernel);
    } else {
        kernel((p, m, v, &grad));
    }
    (param, moment_1, moment_2)
}

/// The GEMM rate of this machine in `precision` as pipe's own products reach it, in GFLOP/s:
/// the best of `reps` square products of `size`, on all of rayon's threads (`pipe bench`'s
/// yardstick, so that figures compare across CPUs).
pub fn gemm_gflops(size: usize, reps: usize, precision: Precision) -> f64 {
    let product = product(precision);
    let a: Vec<f32> = (0..size * size).map(|i| (i % 7) as f32 * 0.25).collect();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let started = std::time::Instant::now();
        // SAFETY: the product writes every element of the new size×size output.
        let c = unsafe {
            filled(size * size, |out| {
                let m = Mat::row_major(&a, 0, size);
                product([size, size, size], out.row_major(0, size), m, m, false)
            })
        };
        best = best.min(started.elapsed().as_secs_f64());
        std::hint::black_box(c);
    }
    2.0 * (size as f64).powi(3) / best / 1e9
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }
}
