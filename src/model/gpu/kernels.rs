//! cubecl kernels for the fused operations, and their launchers on burn's cube tensors.
//!
//! Every kernel reads and writes its tensors in their own element type (f32, or bf16/f16 once a
//! tensor is cast) and computes in f32. Row kernels give one cube to a row and stride over the
//! cubes when there are more rows than cubes; their sums are tree reductions in shared memory
//! (no subgroup operations: lavapipe, where CI runs them, has none). Inputs are made contiguous
//! first, so a tensor is indexed as its flat row-major buffer.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

use crate::model::fused::{composite, AdamUpdate};

/// Units in a row kernel's cube: a power of two, so the tree reductions halve evenly.
const ROW_UNITS: u32 = 256;
/// At most this many cubes along x for the row kernels (the smallest limit among the APIs);
/// each cube strides over the rows.
const MAX_ROW_CUBES: usize = 65_535;
/// Rows one unit adds up in a round of column sums.
const ROWS_PER_PARTIAL: usize = 64;

const GELU_A: f32 = composite::GELU_A as f32;
const GELU_B: f32 = composite::GELU_B as f32;
/// Starts a running maximum: below any finite logit, and a literal every shading language takes
/// (WGSL refuses an infinite one).
pub(super) const LOWEST: f32 = -3.0e38;

/// The sum of `value` over the units of the cube, returned to every unit.
/// The cube must have `shared.len()` units, a power of two.
#[cube]
pub(super) fn cube_sum(shared: &mut SharedMemory<f32>, value: f32) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            shared[unit] = shared[unit] + shared[unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    // No unit may write the next reduction's value before every unit has read this one.
    sync_cube();
    total
}

/// The maximum of `value` over the units of the cube, returned to every unit.
#[cube]
#[allow(clippy::collapsible_if)] // the nesting is the guard (below)
pub(super) fn cube_max<N: Numeric>(shared: &mut SharedMemory<N>, value: N) -> N {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        // Nested, not `&&`: a cube condition evaluates both sides, and units at or past
        // `stride` would read past the shared memory.
        if unit < stride {
            if shared[unit + stride] > shared[unit] {
                shared[unit] = shared[unit + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let most = shared[0];
    sync_cube();
    most
}

/// x·σ(x·(A + B·x²)), GPT-2's tanh GELU (see `composite::GELU_A`). x, y: [n]
#[cube(launch)]
fn gelu_new_kernel<F: Float>(x: &Tensor<F>, y: &mut Tensor<F>, #[define(F)] _dtype: StorageType) {
    if ABSOLUTE_POS < y.len() {
        let v = f32::cast_from(x[ABSOLUTE_POS]);
        let u = v * (GELU_A + GELU_B * v * v);
        y[ABSOLUTE_POS] = F::cast_from(v / (1.0 + (-u).exp()));
    }
}

/// grad·(σ(u) + x·σ(u)·(1 − σ(u))·(A + 3B·x²)). x, grad, dx: [n]
#[cube(launch)]
fn gelu_new_backward_kernel<F: Float>(
    x: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS < dx.len() {
        let v = f32::cast_from(x[ABSOLUTE_POS]);
        let v2 = v * v;
        let s = 1.0 / (1.0 + (-(v * (GELU_A + GELU_B * v2))).exp());
        let slope = s + v * s * (1.0 - s) * (GELU_A + 3.0 * GELU_B * v2);
        dx[ABSOLUTE_POS] = F::cast_from(slope * f32::cast_from(grad[ABSOLUTE_POS]));
    }
}

/// Each row's log-sum-exp and its target's negative log-likelihood, reading the logits twice
/// (maximum, then the sum of exponentials) and writing nothing of their size.
/// logits: [rows, vocab], targets: [rows] → nll, lse: [rows]
#[cube(launch)]
fn cross_entropy_kernel<F: Float, I: Numeric>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    nll: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    #[comptime] units: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let (rows, vocab) = (logits.shape(0), logits.shape(1));
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(units);
    let mut row = CUBE_POS_X as usize;
    while row < rows {
        let base = row * vocab;
        let mut most = f32::new(LOWEST);
        let mut col = unit;
        while col < vocab {
            let v = f32::cast_from(logits[base + col]);
            if v > most {
                most = v;
            }
            col += units;
        }
        let most = cube_max(&mut shared, most);
        let mut sum = f32::new(0.0);
        let mut col = unit;
        while col < vocab {
            sum += (f32::cast_from(logits[base + col]) - most).exp();
            col += units;
        }
        let total = cube_sum(&mut shared, sum);
        if unit == 0 {
            let log_sum = most + total.ln();
            let target = u32::cast_from(targets[row]) as usize;
            lse[row] = F::cast_from(log_sum);
            nll[row] = F::cast_from(log_sum - f32::cast_from(logits[base + target]));
        }
        row += CUBE_COUNT_X as usize;
    }
}

/// (softmax − one-hot)·grad, one unit per logit; the one-hot is a comparison, never a tensor.
/// logits, dlogits: [rows, vocab], targets, lse, grad: [rows]
#[cube(launch)]
fn cross_entropy_backward_kernel<F: Float, I: Numeric>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    lse: &Tensor<F>,
    grad: &Tensor<F>,
    dlogits: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    if ABSOLUTE_POS < dlogits.len() {
        let vocab = logits.shape(1);
        let row = ABSOLUTE_POS / vocab;
        let g = f32::cast_from(grad[row]);
        let mut d = (f32::cast_from(logits[ABSOLUTE_POS]) - f32::cast_from(lse[row])).exp() * g;
        if ABSOLUTE_POS % vocab == u32::cast_from(targets[row]) as usize {
            d -= g;
        }
        dlogits[ABSOLUTE_POS] = F::cast_from(d);
    }
}

/// LayerNorm of each row with its mean and 1/σ: mean first, then the biased variance around it.
/// x, y: [rows, d], gamma, beta: [d], mean, rstd: [rows]
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    beta: &Tensor<F>,
    y: &mut Tensor<F>,
    mean: &mut Tensor<F>,
    rstd: &mut Tensor<F>,
    epsilon: f32,
    #[comptime] units: usize,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, d) = (x.shape(0), x.shape(1));
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(units);
    let mut row = CUBE_POS_X as usize;
    while row < rows {
        let base = row * d;
        let mut sum = f32::new(0.0);
        let mut col = unit;
        while col < d {
            sum += f32::cast_from(x[base + col]);
            col += units;
        }
        let mu = cube_sum(&mut shared, sum) / f32::cast_from(d as u32);
        let mut squares = f32::new(0.0);
        let mut col = unit;
        while col < d {
            let centred = f32::cast_from(x[base + col]) - mu;
            squares += centred * centred;
            col += units;
        }
        let variance = cube_sum(&mut shared, squares) / f32::cast_from(d as u32);
        let r = 1.0 / (variance + epsilon).sqrt();
        let mut col = unit;
        while col < d {
            let normed = (f32::cast_from(x[base + col]) - mu) * r;
            y[base + col] = F::cast_from(normed * f32::cast_from(gamma[col]) + f32::cast_from(beta[col]));
            col += units;
        }
        if unit == 0 {
            mean[row] = F::cast_from(mu);
            rstd[row] = F::cast_from(r);
        }
        row += CUBE_COUNT_X as usize;
    }
}

/// LayerNorm's input gradient, a row per cube: with x̂ = (x − mean)·rstd and g = grad·gamma,
/// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)); and grad·x̂, whose column sums are gamma's gradient.
/// x, grad, dx, grad_x_hat: [rows, d], gamma: [d], mean, rstd: [rows]
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_backward_kernel<F: Float>(
    x: &Tensor<F>,
    gamma: &Tensor<F>,
    mean: &Tensor<F>,
    rstd: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    grad_x_hat: &mut Tensor<F>,
    #[comptime] units: usize,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, d) = (x.shape(0), x.shape(1));
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(units);
    let mut row = CUBE_POS_X as usize;
    while row < rows {
        let base = row * d;
        let (mu, r) = (f32::cast_from(mean[row]), f32::cast_from(rstd[row]));
        let mut sum_g = f32::new(0.0);
        let mut sum_g_xhat = f32::new(0.0);
        let mut col = unit;
        while col < d {
            let g = f32::cast_from(grad[base + col]) * f32::cast_from(gamma[col]);
            sum_g += g;
            sum_g_xhat += g * (f32::cast_from(x[base + col]) - mu) * r;
            col += units;
        }
        let mean_g = cube_sum(&mut shared, sum_g) / f32::cast_from(d as u32);
        let mean_g_xhat = cube_sum(&mut shared, sum_g_xhat) / f32::cast_from(d as u32);
        let mut col = unit;
        while col < d {
            let dy = f32::cast_from(grad[base + col]);
            let g = dy * f32::cast_from(gamma[col]);
            let x_hat = (f32::cast_from(x[base + col]) - mu) * r;
            dx[base + col] = F::cast_from((g - mean_g - x_hat * mean_g_xhat) * r);
            grad_x_hat[base + col] = F::cast_from(dy * x_hat);
            col += units;
        }
        row += CUBE_COUNT_X as usize;
    }
}

/// Partial column sums: each unit adds one column over a block of `rows_per_partial` rows.
/// x: [rows, cols] → parts: [blocks, cols]
#[cube(launch)]
fn column_partial_sums_kernel<F: Float>(
    x: &Tensor<F>,
    parts: &mut Tensor<F>,
    #[comptime] rows_per_partial: usize,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS < parts.len() {
        let (rows, cols) = (x.shape(0), x.shape(1));
        let (part, col) = (ABSOLUTE_POS / cols, ABSOLUTE_POS % cols);
        let mut row = part * rows_per_partial;
        let stop = row + rows_per_partial;
        let mut sum = f32::new(0.0);
        while row < stop {
            if row < rows {
                sum += f32::cast_from(x[row * cols + col]);
            }
            row += 1;
        }
        parts[ABSOLUTE_POS] = F::cast_from(sum);
    }
}

/// The Adam/AdamW arithmetic of `composite::adam_step`, one unit per element, in the same order.
/// `l2` is Adam's coupled decay (0 for AdamW), `decay` AdamW's factor 1 − lr·wd (1 for Adam),
/// `correction_1/2` the bias corrections 1 − βᵗ. On the first update (`first`) the moments are
/// not read. param, grad, m, v and the three outputs: [n]
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adam_kernel<F: Float>(
    param: &Tensor<F>,
    grad: &Tensor<F>,
    m: &Tensor<F>,
    v: &Tensor<F>,
    new_param: &mut Tensor<F>,
    new_m: &mut Tensor<F>,
    new_v: &mut Tensor<F>,
    lr: f32,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    l2: f32,
    decay: f32,
    correction_1: f32,
    correction_2: f32,
    #[comptime] first: bool,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS < new_param.len() {
        let p = f32::cast_from(param[ABSOLUTE_POS]);
        let g = p * l2 + f32::cast_from(grad[ABSOLUTE_POS]);
        let mut m_next = g * (1.0 - beta_1);
        let mut v_next = g * g * (1.0 - beta_2);
        if !first {
            m_next += f32::cast_from(m[ABSOLUTE_POS]) * beta_1;
            v_next += f32::cast_from(v[ABSOLUTE_POS]) * beta_2;
        }
        let m_hat = m_next / correction_1;
        let v_hat = v_next / correction_2;
        let delta = m_hat / (v_hat.sqrt() + epsilon);
        new_param[ABSOLUTE_POS] = F::cast_from(p * decay - delta * lr);
        new_m[ABSOLUTE_POS] = F::cast_from(m_next);
        new_v[ABSOLUTE_POS] = F::cast_from(v_next);
    }
}

fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape) -> CubeTensor<R> {
    dense_output(like, shape, like.dtype)
}

/// A new tensor laid out densely, row after row, as every kernel here writes its outputs.
/// (burn's plain allocation may pad each row to an aligned pitch, as CUDA's does: the strides
/// then say so, and a kernel writing rows back to back would leave every row but the first
/// misplaced.)
pub(super) fn dense_output<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    let tensor = empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, dtype);
    debug_assert!(tensor.is_contiguous(), "a dense allocation has row-major strides");
    tensor
}

/// A one-dimensional launch with a unit for each of `n` elements.
fn elementwise<R: CubeRuntime>(like: &CubeTensor<R>, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&like.client, n);
    (calculate_cube_count_elemwise(&like.client, n, dim), dim)
}

/// A launch with a cube of `units` for each row, up to `MAX_ROW_CUBES` (the cubes then stride).
pub(super) fn per_row<R: CubeRuntime>(like: &CubeTensor<R>, rows: usize) -> (CubeCount, CubeDim, usize) {
    let most = like.client.properties().hardware.max_cube_dim.0.min(ROW_UNITS);
    let units = 1 << most.ilog2(); // a power of two at most the hardware's limit
    (CubeCount::new_1d(rows.clamp(1, MAX_ROW_CUBES) as u32), CubeDim::new_1d(units), units as usize)
}

pub fn gelu_new<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let y = empty_like(&x, x.shape());
    let (count, dim) = elementwise(&x, x.shape().num_elements());
    let dtype = x.dtype;
    gelu_new_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        dtype.into(),
    );
    y
}

pub fn gelu_new_backward<R: CubeRuntime>(x: CubeTensor<R>, grad: CubeTensor<R>) -> CubeTensor<R> {
    let (x, grad) = (into_contiguous(x), into_contiguous(grad));
    let dx = empty_like(&x, x.shape());
    let (count, dim) = elementwise(&x, x.shape().num_elements());
    let dtype = x.dtype;
    gelu_new_backward_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        grad.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        dtype.into(),
    );
    dx
}

pub fn cross_entropy<R: CubeRuntime>(logits: CubeTensor<R>, targets: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
    let (logits, targets) = (into_contiguous(logits), into_contiguous(targets));
    let rows = logits.shape()[0];
    let (nll, lse) = (empty_like(&logits, Shape::new([rows])), empty_like(&logits, Shape::new([rows])));
    let (count, dim, units) = per_row(&logits, rows);
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    cross_entropy_kernel::launch::<R>(
        &logits.client.clone(),
        count,
        dim,
        logits.into_tensor_arg(),
        targets.into_tensor_arg(),
        nll.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        units,
        dtypes,
    );
    (nll, lse)
}

pub fn cross_entropy_backward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> CubeTensor<R> {
    let (logits, targets, lse, grad) =
        (into_contiguous(logits), into_contiguous(targets), into_contiguous(lse), into_contiguous(grad));
    let dlogits = empty_like(&logits, logits.shape());
    let (count, dim) = elementwise(&logits, logits.shape().num_elements());
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    cross_entropy_backward_kernel::launch::<R>(
        &logits.client.clone(),
        count,
        dim,
        logits.into_tensor_arg(),
        targets.into_tensor_arg(),
        lse.into_tensor_arg(),
        grad.into_tensor_arg(),
        dlogits.clone().into_tensor_arg(),
        dtypes,
    );
    dlogits
}

pub fn layer_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    beta: CubeTensor<R>,
    epsilon: f64,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let (x, gamma, beta) = (into_contiguous(x), into_contiguous(gamma), into_contiguous(beta));
    let rows = x.shape()[0];
    let y = empty_like(&x, x.shape());
    let (mean, rstd) = (empty_like(&x, Shape::new([rows])), empty_like(&x, Shape::new([rows])));
    let (count, dim, units) = per_row(&x, rows);
    let dtype = x.dtype;
    layer_norm_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        gamma.into_tensor_arg(),
        beta.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        mean.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        epsilon as f32,
        units,
        dtype.into(),
    );
    (y, mean, rstd)
}

/// dx and grad·x̂ from the row kernel; dgamma and dbeta as the column sums of grad·x̂ and grad.
pub fn layer_norm_backward<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    mean: CubeTensor<R>,
    rstd: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let (x, gamma, mean, rstd, grad) = (
        into_contiguous(x),
        into_contiguous(gamma),
        into_contiguous(mean),
        into_contiguous(rstd),
        into_contiguous(grad),
    );
    let rows = x.shape()[0];
    let (dx, grad_x_hat) = (empty_like(&x, x.shape()), empty_like(&x, x.shape()));
    let (count, dim, units) = per_row(&x, rows);
    let dtype = x.dtype;
    layer_norm_backward_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        gamma.into_tensor_arg(),
        mean.into_tensor_arg(),
        rstd.into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        grad_x_hat.clone().into_tensor_arg(),
        units,
        dtype.into(),
    );
    (dx, column_sums(grad_x_hat), column_sums(grad))
}

/// Each column's sum over the rows, by rounds of partial sums over blocks of rows (without
/// burn's reductions, whose column sums over 65,536 rows or more come out wrong on lavapipe).
/// x: [rows, cols] → [cols]
pub fn column_sums<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let mut x = into_contiguous(x);
    loop {
        let [rows, cols] = x.shape().dims::<2>();
        let blocks = rows.div_ceil(ROWS_PER_PARTIAL).max(1);
        let parts = empty_like(&x, Shape::new([blocks, cols]));
        let (count, dim) = elementwise(&x, blocks * cols);
        let dtype = x.dtype;
        column_partial_sums_kernel::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            parts.clone().into_tensor_arg(),
            ROWS_PER_PARTIAL,
            dtype.into(),
        );
        if blocks == 1 {
            return burn_cubecl::ops::reshape(parts, Shape::new([cols]));
        }
        x = parts;
    }
}

pub fn adam_step<R: CubeRuntime>(
    param: CubeTensor<R>,
    grad: CubeTensor<R>,
    moments: Option<(CubeTensor<R>, CubeTensor<R>)>,
    u: AdamUpdate,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let (param, grad) = (into_contiguous(param), into_contiguous(grad));
    let shape = param.shape();
    let first = moments.is_none();
    // The first update reads no moments: the gradient stands in for them, unread.
    let (m, v) = match moments {
        Some((m, v)) => (into_contiguous(m), into_contiguous(v)),
        None => (grad.clone(), grad.clone()),
    };
    let (new_param, new_m, new_v) =
        (empty_like(&param, shape.clone()), empty_like(&param, shape.clone()), empty_like(&param, shape.clone()));
    let time = u.time as i32;
    let (count, dim) = elementwise(&param, shape.num_elements());
    let (client, dtype) = (param.client.clone(), param.dtype);
    adam_kernel::launch::<R>(
        &client,
        count,
        dim,
        param.into_tensor_arg(),
        grad.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        new_param.clone().into_tensor_arg(),
        new_m.clone().into_tensor_arg(),
        new_v.clone().into_tensor_arg(),
        u.lr as f32,
        u.beta_1,
        u.beta_2,
        u.epsilon,
        if u.decoupled { 0.0 } else { u.weight_decay },
        if u.decoupled { (1.0 - u.lr * u.weight_decay as f64) as f32 } else { 1.0 },
        1.0 - u.beta_1.powi(time),
        1.0 - u.beta_2.powi(time),
        first,
        dtype.into(),
    );
    (new_param, new_m, new_v)
}

/// Whether a tensor's element type is one the kernels compute for (floats; f64 would lose its
/// precision in the f32 arithmetic, so it keeps the composite versions).
pub fn supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}
