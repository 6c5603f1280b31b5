//! Drawing the next token on the device: temperature, top-k and top-p in one cube, with no sort
//! (burn 0.21's sort reads back to the host) and nothing of the vocabulary's size written.
//!
//! `generate::distribution` defines what is drawn: tokens in rank order (larger logit first,
//! ties by lower id), the first k kept, then the shortest prefix whose mass reaches p, and the
//! draw u ∈ [0, 1) picks the first token whose cumulative mass exceeds u. Each of those cuts is
//! "the last token in rank order whose weight before it is below a limit", where the weight is a
//! count (top-k) or the exponentials (top-p, the draw). A place in rank order is a pair (key,
//! id), the key an unsigned image of the logit that sorts the larger first; the cut is found by
//! building the key and then the id bit by bit from the top, each bit one pass over the logits
//! and a sum over the cube. So the kernel draws the token the host would draw from the same u,
//! up to the rounding of the sums (f32 here, f64 there) when u falls within it of a boundary.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::kernels::{cube_max, cube_sum, dense_output, per_row, LOWEST};
use crate::model::sampling::Sampling;

/// The place of a logit in rank order: larger logits get smaller keys.
#[cube]
fn rank_key(logit: f32) -> u32 {
    let bits = u32::reinterpret(logit);
    // IEEE order as unsigned order: a negative has every bit flipped, a positive its sign set.
    let mut ascending = bits | 0x8000_0000u32;
    if bits >= 0x8000_0000u32 {
        ascending = !bits;
    }
    !ascending
}

/// Whether place (key, id) comes strictly before place (at_key, at_id) in rank order.
#[cube]
fn before(key: u32, id: u32, at_key: u32, at_id: u32) -> bool {
    key < at_key || (key == at_key && id < at_id)
}

/// The cut's condition on the weight before a place: below `limit`, or at most it (`or_equal`).
#[cube]
fn within(weight: f32, limit: f32, #[comptime] or_equal: bool) -> bool {
    if or_equal {
        weight <= limit
    } else {
        weight < limit
    }
}

/// What a cut searches over: the tokens not after `bound`, each weighing 1 (`counting`) or
/// exp((logit − most)/temperature).
#[derive(CubeType, Clone, Copy)]
struct Kept {
    bound_key: u32,
    bound_id: u32,
    most: f32,
    temperature: f32,
}

/// The summed weight of the kept tokens placed strictly before (at_key, at_id), to every unit.
#[cube]
fn weight_before<F: Float>(
    logits: &Tensor<F>,
    shared: &mut SharedMemory<f32>,
    kept: Kept,
    at_key: u32,
    at_id: u32,
    #[comptime] counting: bool,
) -> f32 {
    let mut sum = f32::new(0.0);
    let mut id = UNIT_POS_X as usize;
    while id < logits.len() {
        let logit = f32::cast_from(logits[id]);
        let key = rank_key(logit);
        let i = id as u32;
        if before(key, i, at_key, at_id) && !before(kept.bound_key, kept.bound_id, key, i) {
            if counting {
                sum += 1.0;
            } else {
                sum += ((logit - kept.most) / kept.temperature).exp();
            }
        }
        id += CUBE_DIM_X as usize;
    }
    cube_sum(shared, sum)
}

/// A place in rank order.
#[derive(CubeType, Clone, Copy)]
struct Place {
    key: u32,
    id: u32,
}

/// The last place whose weight before it is within `limit` (ids below 2^id_bits): built from
/// the top bit down, the key's 32 and then the id's, each bit kept when the place it makes
/// still qualifies (the weight grows along rank order).
#[cube]
#[allow(clippy::too_many_arguments)]
fn cut<F: Float>(
    logits: &Tensor<F>,
    shared: &mut SharedMemory<f32>,
    kept: Kept,
    limit: f32,
    id_bits: u32,
    #[comptime] counting: bool,
    #[comptime] or_equal: bool,
) -> Place {
    let mut key = 0u32;
    let mut id = 0u32;
    let mut bit = 32u32 + id_bits;
    while bit > 0 {
        bit -= 1;
        let mut at_key = key;
        let mut at_id = id;
        if bit >= id_bits {
            at_key = key | (1u32 << (bit - id_bits));
        } else {
            at_id = id | (1u32 << bit);
        }
        if within(weight_before(logits, shared, kept, at_key, at_id, counting), limit, or_equal) {
            key = at_key;
            id = at_id;
        }
    }
    Place { key, id }
}

/// One token drawn from `logits` as `generate::sample_with_draw` draws it with `draw`. `top_k`
/// 0 or ≥ vocab keeps all; `top_p` ≥ 1 keeps all. One cube. logits: [vocab] → token: [1]
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn sample_kernel<F: Float, I: Int>(
    logits: &Tensor<F>,
    token: &mut Tensor<I>,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    draw: f32,
    id_bits: u32,
    #[comptime] units: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(units);
    let mut most = f32::new(LOWEST);
    let mut id = unit;
    while id < logits.len() {
        most = f32::max(most, f32::cast_from(logits[id]));
        id += units;
    }
    let most = cube_max(&mut shared, most);
    // Every token, until a cut bounds them.
    let mut kept = Kept { bound_key: u32::MAX, bound_id: u32::MAX, most, temperature };

    if top_k > 0 && (top_k as usize) < logits.len() {
        let bound = cut(logits, &mut shared, kept, f32::cast_from(top_k), id_bits, true, false);
        kept.bound_key = bound.key;
        kept.bound_id = bound.id;
    }
    if top_p < 1.0 {
        let limit = top_p * weight_before(logits, &mut shared, kept, u32::MAX, u32::MAX, false);
        let bound = cut(logits, &mut shared, kept, limit, id_bits, false, false);
        kept.bound_key = bound.key;
        kept.bound_id = bound.id;
    }
    let limit = draw * weight_before(logits, &mut shared, kept, u32::MAX, u32::MAX, false);
    let drawn = cut(logits, &mut shared, kept, limit, id_bits, false, true);
    let key = drawn.key;
    let id = drawn.id;

    // The drawn token is the last kept one placed at or before the cut (key, id). The cut is
    // that token's place unless rounding ran it past the last kept token (u within an ulp of 1).
    let mut shared_places = SharedMemory::<u32>::new(units);
    let mut last_key = 0u32;
    let mut t = unit;
    while t < logits.len() {
        let at = rank_key(f32::cast_from(logits[t]));
        let i = t as u32;
        if !before(key, id, at, i) && !before(kept.bound_key, kept.bound_id, at, i) {
            last_key = u32::max(last_key, at);
        }
        t += units;
    }
    let last_key = cube_max(&mut shared_places, last_key);
    let mut last_id = 0u32;
    let mut t = unit;
    while t < logits.len() {
        let i = t as u32;
        if rank_key(f32::cast_from(logits[t])) == last_key
            && !before(key, id, last_key, i)
            && !before(kept.bound_key, kept.bound_id, last_key, i)
        {
            last_id = u32::max(last_id, i);
        }
        t += units;
    }
    let last_id = cube_max(&mut shared_places, last_id);
    if unit == 0 {
        token[0] = I::cast_from(last_id);
    }
}

/// Launches `sample_kernel` on one position's logits. logits: [vocab] or [1, vocab] → [1]
pub fn sample<R: CubeRuntime>(logits: CubeTensor<R>, int_dtype: DType, sampling: Sampling, draw: f64) -> CubeTensor<R> {
    let logits = into_contiguous(logits);
    let vocab = logits.shape().num_elements();
    let token = dense_output(&logits, Shape::new([1]), int_dtype);
    let (count, dim, units) = per_row(&logits, 1);
    let id_bits = u32::BITS - (vocab as u32).leading_zeros();
    let dtypes = [logits.dtype.into(), int_dtype.into()];
    sample_kernel::launch::<R>(
        &logits.client.clone(),
        count,
        dim,
        logits.into_tensor_arg(),
        token.clone().into_tensor_arg(),
        sampling.temperature as f32,
        sampling.top_k.min(u32::MAX as usize) as u32,
        sampling.top_p as f32,
        draw as f32,
        id_bits,
        units,
        dtypes,
    );
    token
}
