//! Causal self-attention on the GPU backends, flash-style: the probabilities are never written.
//! The forward keeps each query row's output and log-sum-exp; the backward recomputes each
//! probability from them (P = exp(s − lse)), so attention's memory grows with the sequence, not
//! its square (the dropout mask, when training with attention dropout, is still [seq, seq]).
//!
//! A cube takes `BLOCK` rows of one (batch, head), one unit a row: queries in the forward and
//! for dQ, keys for dK and dV. The other side streams through shared memory a tile of `BLOCK`
//! rows at a time, as far as causality lets it (keys up to the block's last query; queries from
//! the block's first key). Each unit keeps its row and accumulators in registers, and computes
//! in f32 whatever the element type. The products are plain f32 arithmetic (no tensor cores):
//! `precision` is not applied here.
//!
//! The backward is FlashAttention-2's: D = dY·Y per query row (what the softmax backward's row
//! sum Σ P ⊙ dP reduces to, dropout included), then dS = P ⊙ (keep ⊙ dY·Vᵀ − D), dQ = dS·K·scale,
//! dK = dSᵀ·Q·scale, dV = (P ⊙ keep)ᵀ·dY, dQ in one kernel and dK, dV in another, so no two
//! units write the same gradient.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

use super::kernels::{self, LOWEST};
use crate::model::fused::{gpu_attention, GpuAttention, GPU_ATTENTION_MAX_HEAD_DIM};

/// Rows a cube takes, one unit each, and rows of the other side a tile brings into shared memory.
const BLOCK: usize = 32;

/// Where the kernels take attention over qkv of this shape and element type (unless the
/// process chose the composite version, or the heads are too large), what their forward keeps
/// for the backward: each query row's output (its head's slice) and log-sum-exp.
/// qkv: [batch, seq, 3·d_model] → [batch, heads, seq, head_dim + 1]
pub fn saved_shape(qkv: &Shape, n_head: usize, dtype: DType) -> Option<Shape> {
    let (batch, seq, head_dim) = (qkv[0], qkv[1], qkv[2] / 3 / n_head);
    let kernels =
        gpu_attention() == GpuAttention::Kernels && kernels::supported(dtype) && head_dim <= GPU_ATTENTION_MAX_HEAD_DIM;
    kernels.then(|| Shape::new([batch, n_head, seq, head_dim + 1]))
}

/// Whether key j is visible from query i: not in its future, not before its example's start.
#[cube]
fn visible(i: usize, j: usize, start: usize) -> bool {
    j <= i && j >= start
}

/// Where query/key `row`'s part (0 q, 1 k, 2 v) of head `h` begins in qkv [batch, seq, 3·d_model].
#[cube]
fn qkv_at(
    b: usize,
    row: usize,
    part: usize,
    h: usize,
    seq: usize,
    #[comptime] heads: usize,
    #[comptime] head_dim: usize,
) -> usize {
    let d_model = heads * head_dim;
    (b * seq + row) * 3 * d_model + part * d_model + h * head_dim
}

/// Copies row `row` (if it exists) of part `part` into `tile` at the unit's slot.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_row<F: Float>(
    qkv: &Tensor<F>,
    tile: &mut SharedMemory<f32>,
    b: usize,
    row: usize,
    part: usize,
    h: usize,
    seq: usize,
    #[comptime] heads: usize,
    #[comptime] head_dim: usize,
) {
    if row < seq {
        let at = qkv_at(b, row, part, h, seq, heads, head_dim);
        let slot = UNIT_POS_X as usize * head_dim;
        #[unroll]
        for c in 0..head_dim {
            tile[slot + c] = f32::cast_from(qkv[at + c]);
        }
    }
}

/// The start of the example query `i` belongs to (0 without packed rows).
#[cube]
fn start_of<I: Int>(starts: &Tensor<I>, b: usize, i: usize, seq: usize, #[comptime] packed: bool) -> usize {
    let mut start = 0usize;
    if packed {
        start = usize::cast_from(starts[b * seq + i]);
    }
    start
}

/// The dropout factor of probability (i, j) of head bh = b·heads + h (1 without dropout).
#[cube]
fn kept<F: Float>(keep: &Tensor<F>, bh: usize, i: usize, j: usize, seq: usize, #[comptime] dropout: bool) -> f32 {
    let mut factor = f32::new(1.0);
    if dropout {
        factor = f32::cast_from(keep[(bh * seq + i) * seq + j]);
    }
    factor
}

/// Output and log-sum-exp of each query row, the softmax online over tiles of keys.
/// qkv: [batch, seq, 3·d_model], keep: [batch, heads, seq, seq] (read with `dropout`),
/// starts: [batch, seq] (read when `packed`) → y: [batch, seq, d_model], saved: see `saved_shape`
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float, I: Int>(
    qkv: &Tensor<F>,
    keep: &Tensor<F>,
    starts: &Tensor<I>,
    y: &mut Tensor<F>,
    saved: &mut Tensor<F>,
    scale: f32,
    #[comptime] heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] dropout: bool,
    #[comptime] packed: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let seq = qkv.shape(1);
    let bh = CUBE_POS_Y as usize;
    let (b, h) = (bh / heads, bh % heads);
    let first = CUBE_POS_X as usize * BLOCK;
    let i = first + UNIT_POS_X as usize;
    let live = i < seq;

    let mut q = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    let mut start = 0usize;
    if live {
        let at = qkv_at(b, i, 0, h, seq, heads, head_dim);
        #[unroll]
        for c in 0..head_dim {
            q[c] = f32::cast_from(qkv[at + c]) * scale;
        }
        start = start_of(starts, b, i, seq, packed);
    }
    #[unroll]
    for c in 0..head_dim {
        acc[c] = 0.0;
    }
    let mut k_tile = SharedMemory::<f32>::new(BLOCK * head_dim);
    let mut v_tile = SharedMemory::<f32>::new(BLOCK * head_dim);
    let (mut most, mut total) = (f32::new(LOWEST), f32::new(0.0));
    let mut end = first + BLOCK; // the block's last query + 1
    if end > seq {
        end = seq;
    }
    let mut tile = 0usize;
    while tile < end {
        load_row(qkv, &mut k_tile, b, tile + UNIT_POS_X as usize, 1, h, seq, heads, head_dim);
        load_row(qkv, &mut v_tile, b, tile + UNIT_POS_X as usize, 2, h, seq, heads, head_dim);
        sync_cube();
        if live {
            for jj in 0..BLOCK {
                let j = tile + jj;
                if visible(i, j, start) {
                    let mut s = f32::new(0.0);
                    #[unroll]
                    for c in 0..head_dim {
                        s += q[c] * k_tile[jj * head_dim + c];
                    }
                    if s > most {
                        let shrink = (most - s).exp();
                        total *= shrink;
                        #[unroll]
                        for c in 0..head_dim {
                            acc[c] *= shrink;
                        }
                        most = s;
                    }
                    let p = (s - most).exp();
                    total += p;
                    let w = p * kept(keep, bh, i, j, seq, dropout);
                    #[unroll]
                    for c in 0..head_dim {
                        acc[c] += w * v_tile[jj * head_dim + c];
                    }
                }
            }
        }
        // The next tile may not overwrite this one before every unit is done with it.
        sync_cube();
        tile += BLOCK;
    }
    if live {
        // Query i always sees key i, so total ≥ 1.
        let d_model = heads * head_dim;
        let out = (b * seq + i) * d_model + h * head_dim;
        let row = (bh * seq + i) * (head_dim + 1);
        #[unroll]
        for c in 0..head_dim {
            let value = acc[c] / total;
            y[out + c] = F::cast_from(value);
            saved[row + c] = F::cast_from(value);
        }
        saved[row + head_dim] = F::cast_from(most + total.ln());
    }
}

/// D = dY·Y for each query row of each head. grad: [batch, seq, d_model], saved: see
/// `saved_shape` → delta: [batch, heads, seq]
#[cube(launch)]
fn delta_kernel<F: Float>(
    grad: &Tensor<F>,
    saved: &Tensor<F>,
    delta: &mut Tensor<F>,
    #[comptime] heads: usize,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS < delta.len() {
        let seq = saved.shape(2);
        let (bh, i) = (ABSOLUTE_POS / seq, ABSOLUTE_POS % seq);
        let (b, h) = (bh / heads, bh % heads);
        let dy = (b * seq + i) * heads * head_dim + h * head_dim;
        let y = ABSOLUTE_POS * (head_dim + 1);
        let mut sum = f32::new(0.0);
        #[unroll]
        for c in 0..head_dim {
            sum += f32::cast_from(grad[dy + c]) * f32::cast_from(saved[y + c]);
        }
        delta[ABSOLUTE_POS] = F::cast_from(sum);
    }
}

/// dQ for each query row: its keys streamed in tiles, each probability recomputed.
/// → the q part of dqkv [batch, seq, 3·d_model]
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_queries_kernel<F: Float, I: Int>(
    qkv: &Tensor<F>,
    keep: &Tensor<F>,
    starts: &Tensor<I>,
    saved: &Tensor<F>,
    delta: &Tensor<F>,
    grad: &Tensor<F>,
    dqkv: &mut Tensor<F>,
    scale: f32,
    #[comptime] heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] dropout: bool,
    #[comptime] packed: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let seq = qkv.shape(1);
    let d_model = heads * head_dim;
    let bh = CUBE_POS_Y as usize;
    let (b, h) = (bh / heads, bh % heads);
    let first = CUBE_POS_X as usize * BLOCK;
    let i = first + UNIT_POS_X as usize;
    let live = i < seq;

    let mut q = Array::<f32>::new(head_dim);
    let mut dy = Array::<f32>::new(head_dim);
    let mut dq = Array::<f32>::new(head_dim);
    let (mut start, mut lse, mut d) = (0usize, f32::new(0.0), f32::new(0.0));
    if live {
        let at = qkv_at(b, i, 0, h, seq, heads, head_dim);
        let g = (b * seq + i) * d_model + h * head_dim;
        #[unroll]
        for c in 0..head_dim {
            q[c] = f32::cast_from(qkv[at + c]) * scale;
            dy[c] = f32::cast_from(grad[g + c]);
        }
        start = start_of(starts, b, i, seq, packed);
        lse = f32::cast_from(saved[(bh * seq + i) * (head_dim + 1) + head_dim]);
        d = f32::cast_from(delta[bh * seq + i]);
    }
    #[unroll]
    for c in 0..head_dim {
        dq[c] = 0.0;
    }
    let mut k_tile = SharedMemory::<f32>::new(BLOCK * head_dim);
    let mut v_tile = SharedMemory::<f32>::new(BLOCK * head_dim);
    let mut end = first + BLOCK;
    if end > seq {
        end = seq;
    }
    let mut tile = 0usize;
    while tile < end {
        load_row(qkv, &mut k_tile, b, tile + UNIT_POS_X as usize, 1, h, seq, heads, head_dim);
        load_row(qkv, &mut v_tile, b, tile + UNIT_POS_X as usize, 2, h, seq, heads, head_dim);
        sync_cube();
        if live {
            for jj in 0..BLOCK {
                let j = tile + jj;
                if visible(i, j, start) {
                    let (mut s, mut dp) = (f32::new(0.0), f32::new(0.0));
                    #[unroll]
                    for c in 0..head_dim {
                        s += q[c] * k_tile[jj * head_dim + c];
                        dp += dy[c] * v_tile[jj * head_dim + c];
                    }
                    let p = (s - lse).exp();
                    let ds = p * (dp * kept(keep, bh, i, j, seq, dropout) - d) * scale;
                    #[unroll]
                    for c in 0..head_dim {
                        dq[c] += ds * k_tile[jj * head_dim + c];
                    }
                }
            }
        }
        sync_cube();
        tile += BLOCK;
    }
    if live {
        let at = qkv_at(b, i, 0, h, seq, heads, head_dim);
        #[unroll]
        for c in 0..head_dim {
            dqkv[at + c] = F::cast_from(dq[c]);
        }
    }
}

/// dK and dV for each key row: the queries that see it streamed in tiles, each probability
/// recomputed. → the k and v parts of dqkv [batch, seq, 3·d_model]
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_keys_kernel<F: Float, I: Int>(
    qkv: &Tensor<F>,
    keep: &Tensor<F>,
    starts: &Tensor<I>,
    saved: &Tensor<F>,
    delta: &Tensor<F>,
    grad: &Tensor<F>,
    dqkv: &mut Tensor<F>,
    scale: f32,
    #[comptime] heads: usize,
    #[comptime] head_dim: usize,
    #[comptime] dropout: bool,
    #[comptime] packed: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let seq = qkv.shape(1);
    let d_model = heads * head_dim;
    let bh = CUBE_POS_Y as usize;
    let (b, h) = (bh / heads, bh % heads);
    let first = CUBE_POS_X as usize * BLOCK;
    let unit = UNIT_POS_X as usize;
    let j = first + unit;
    let live = j < seq;

    let mut k = Array::<f32>::new(head_dim);
    let mut v = Array::<f32>::new(head_dim);
    let mut dk = Array::<f32>::new(head_dim);
    let mut dv = Array::<f32>::new(head_dim);
    if live {
        let (at_k, at_v) = (qkv_at(b, j, 1, h, seq, heads, head_dim), qkv_at(b, j, 2, h, seq, heads, head_dim));
        #[unroll]
        for c in 0..head_dim {
            k[c] = f32::cast_from(qkv[at_k + c]) * scale;
            v[c] = f32::cast_from(qkv[at_v + c]);
        }
    }
    #[unroll]
    for c in 0..head_dim {
        dk[c] = 0.0;
        dv[c] = 0.0;
    }
    let mut q_tile = SharedMemory::<f32>::new(BLOCK * head_dim);
    let mut dy_tile = SharedMemory::<f32>::new(BLOCK * head_dim);
    let mut lse_tile = SharedMemory::<f32>::new(BLOCK);
    let mut delta_tile = SharedMemory::<f32>::new(BLOCK);
    let mut start_tile = SharedMemory::<u32>::new(BLOCK);
    // Queries before the block's first key see none of its keys.
    let mut tile = first;
    while tile < seq {
        let i = tile + unit;
        load_row(qkv, &mut q_tile, b, i, 0, h, seq, heads, head_dim);
        if i < seq {
            let g = (b * seq + i) * d_model + h * head_dim;
            #[unroll]
            for c in 0..head_dim {
                dy_tile[unit * head_dim + c] = f32::cast_from(grad[g + c]);
            }
            lse_tile[unit] = f32::cast_from(saved[(bh * seq + i) * (head_dim + 1) + head_dim]);
            delta_tile[unit] = f32::cast_from(delta[bh * seq + i]);
            start_tile[unit] = u32::cast_from(start_of(starts, b, i, seq, packed));
        }
        sync_cube();
        if live {
            for ii in 0..BLOCK {
                let i = tile + ii;
                if i < seq && visible(i, j, usize::cast_from(start_tile[ii])) {
                    let (mut s, mut dp) = (f32::new(0.0), f32::new(0.0));
                    #[unroll]
                    for c in 0..head_dim {
                        s += q_tile[ii * head_dim + c] * k[c];
                        dp += dy_tile[ii * head_dim + c] * v[c];
                    }
                    let p = (s - lse_tile[ii]).exp();
                    let factor = kept(keep, bh, i, j, seq, dropout);
                    let ds = p * (dp * factor - delta_tile[ii]) * scale;
                    let pk = p * factor;
                    #[unroll]
                    for c in 0..head_dim {
                        dk[c] += ds * q_tile[ii * head_dim + c];
                        dv[c] += pk * dy_tile[ii * head_dim + c];
                    }
                }
            }
        }
        sync_cube();
        tile += BLOCK;
    }
    if live {
        let (at_k, at_v) = (qkv_at(b, j, 1, h, seq, heads, head_dim), qkv_at(b, j, 2, h, seq, heads, head_dim));
        #[unroll]
        for c in 0..head_dim {
            dqkv[at_k + c] = F::cast_from(dk[c]);
            dqkv[at_v + c] = F::cast_from(dv[c]);
        }
    }
}

/// The launch for `rows` rows of each of `batch_heads` heads: a cube of `BLOCK` units per
/// block of rows.
fn per_block(rows: usize, batch_heads: usize) -> (CubeCount, CubeDim) {
    (CubeCount::new_2d(rows.div_ceil(BLOCK) as u32, batch_heads as u32), CubeDim::new_1d(BLOCK as u32))
}

/// The mask and starts arguments: the tensors when given, else stand-ins the kernel never reads.
fn optional_inputs<R: CubeRuntime>(
    qkv: &CubeTensor<R>,
    keep: Option<CubeTensor<R>>,
    starts: Option<CubeTensor<R>>,
    int_dtype: DType,
) -> (CubeTensor<R>, CubeTensor<R>, bool, bool) {
    let (dropout, packed) = (keep.is_some(), starts.is_some());
    let keep = keep.map(into_contiguous).unwrap_or_else(|| qkv.clone());
    let starts = starts.map(into_contiguous).unwrap_or_else(|| kernels::dense_output(qkv, Shape::new([1]), int_dtype));
    (keep, starts, dropout, packed)
}

/// See `FusedOps::causal_attention`, where `saved_shape` says the kernels apply; returns the
/// output and what the backward needs. qkv: [batch, seq, 3·d_model] → ([batch, seq, d_model], saved)
pub fn causal_attention<R: CubeRuntime>(
    qkv: CubeTensor<R>,
    n_head: usize,
    keep: Option<CubeTensor<R>>,
    starts: Option<CubeTensor<R>>,
    int_dtype: DType,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let qkv = into_contiguous(qkv);
    let [batch, seq, three_d] = qkv.shape().dims();
    let head_dim = three_d / 3 / n_head;
    let (keep, starts, dropout, packed) = optional_inputs(&qkv, keep, starts, int_dtype);
    let empty = |shape: Shape| kernels::dense_output(&qkv, shape, qkv.dtype);
    let saved = Shape::new([batch, n_head, seq, head_dim + 1]);
    let (y, saved) = (empty(Shape::new([batch, seq, three_d / 3])), empty(saved));
    let (count, dim) = per_block(seq, batch * n_head);
    let dtypes = [qkv.dtype.into(), starts.dtype.into()];
    forward_kernel::launch::<R>(
        &qkv.client.clone(),
        count,
        dim,
        qkv.into_tensor_arg(),
        keep.into_tensor_arg(),
        starts.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        saved.clone().into_tensor_arg(),
        1.0 / (head_dim as f32).sqrt(),
        n_head,
        head_dim,
        dropout,
        packed,
        dtypes,
    );
    (y, saved)
}

/// See `FusedOps::causal_attention_backward`, from what `causal_attention` saved.
/// qkv: [batch, seq, 3·d_model], grad: [batch, seq, d_model] → [batch, seq, 3·d_model]
pub fn causal_attention_backward<R: CubeRuntime>(
    qkv: CubeTensor<R>,
    saved: CubeTensor<R>,
    keep: Option<CubeTensor<R>>,
    starts: Option<CubeTensor<R>>,
    grad: CubeTensor<R>,
    n_head: usize,
    int_dtype: DType,
) -> CubeTensor<R> {
    let (qkv, saved, grad) = (into_contiguous(qkv), into_contiguous(saved), into_contiguous(grad));
    let [batch, seq, three_d] = qkv.shape().dims();
    let head_dim = three_d / 3 / n_head;
    let (keep, starts, dropout, packed) = optional_inputs(&qkv, keep, starts, int_dtype);
    let client = qkv.client.clone();
    let empty = |shape: Shape| kernels::dense_output(&qkv, shape, qkv.dtype);

    let delta = empty(Shape::new([batch, n_head, seq]));
    let rows = batch * n_head * seq;
    let dim = CubeDim::new(&client, rows);
    delta_kernel::launch::<R>(
        &client,
        calculate_cube_count_elemwise(&client, rows, dim),
        dim,
        grad.clone().into_tensor_arg(),
        saved.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        n_head,
        head_dim,
        qkv.dtype.into(),
    );

    // Every element of dqkv is written once: its q part by the first kernel, k and v by the second.
    let dqkv = empty(qkv.shape());
    let scale = 1.0 / (head_dim as f32).sqrt();
    let dtypes = [qkv.dtype.into(), starts.dtype.into()];
    let (count, dim) = per_block(seq, batch * n_head);
    backward_queries_kernel::launch::<R>(
        &client,
        count.clone(),
        dim,
        qkv.clone().into_tensor_arg(),
        keep.clone().into_tensor_arg(),
        starts.clone().into_tensor_arg(),
        saved.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        dqkv.clone().into_tensor_arg(),
        scale,
        n_head,
        head_dim,
        dropout,
        packed,
        dtypes,
    );
    backward_keys_kernel::launch::<R>(
        &client,
        count,
        dim,
        qkv.into_tensor_arg(),
        keep.into_tensor_arg(),
        starts.into_tensor_arg(),
        saved.into_tensor_arg(),
        delta.into_tensor_arg(),
        grad.into_tensor_arg(),
        dqkv.clone().into_tensor_arg(),
        scale,
        n_head,
        head_dim,
        dropout,
        packed,
        dtypes,
    );
    dqkv
}
