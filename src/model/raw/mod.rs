//! The one room for pipe's unsafe CPU plumbing: strided matrix views over f32 buffers, an
//! output pointer that parallel tasks share, the single- and multi-threaded matrix products
//! (gemm), vectors handed out before they are zeroed, and the `vectorised!` dispatch to AVX2
//! copies of inner loops; `bf16_gemm` holds the products with bf16 operands. The op kernels in
//! `cpu_kernels` build on these.
//!
//! Invariants: a view never reaches outside the buffer it was made from (checked by
//! `debug_assert!` in debug builds when a product uses it); parallel tasks writing through one
//! `SharedMut` write disjoint elements (the callers' comments say why theirs are).

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

mod bf16_gemm;
pub use bf16_gemm::{bf16_matmul, native as bf16_native};

/// `fn name(args) -> ret { body }` with the body compiled twice, for the baseline CPU and for
/// AVX2 with FMA, the second chosen at run time on CPUs that have them. (A named inner function
/// marked `inline(always)` is what reliably lands in the `target_feature` copy; a closure
/// passed to a generic wrapper is not inlined there.)
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                // SAFETY: the CPU has the features just checked.
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorised;

/// A raw pointer that rayon's tasks may share: each task writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
pub struct SharedMut {
    ptr: *mut f32,
    /// Elements from `ptr` to the end of the buffer.
    len: usize,
}
// SAFETY: used only where the tasks' writes are disjoint (one (batch, head) slot or one block
// of output columns each); every user says why its writes are.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub fn new(buffer: &mut [f32]) -> Self {
        Self { ptr: buffer.as_mut_ptr(), len: buffer.len() }
    }

    /// Write `values` at element `offset` of the buffer.
    ///
    /// # Safety
    /// No other thread may read or write those elements meanwhile.
    pub unsafe fn copy_in(self, offset: usize, values: &[f32]) {
        assert!(offset + values.len() <= self.len, "{} values at {offset} past a buffer of {}", values.len(), self.len);
        // SAFETY: inside the buffer (just checked); the caller vouches for exclusive access.
        unsafe { self.ptr.add(offset).copy_from_nonoverlapping(values.as_ptr(), values.len()) };
    }

    /// The output matrix at element `offset` of the buffer, rows `row` elements apart.
    pub fn row_major(self, offset: usize, row: usize) -> Out {
        self.strided(offset, row as isize, 1)
    }

    /// The output matrix at element `offset`, element (r, c) at `offset + r·row + c·col`.
    pub fn strided(self, offset: usize, row: isize, col: isize) -> Out {
        debug_assert!(offset <= self.len, "output offset {offset} past a buffer of {}", self.len);
        Out { ptr: self.ptr.wrapping_add(offset), len: self.len.saturating_sub(offset), row, col }
    }
}

/// Whether a [rows, cols] matrix with strides (row, col) starting at a pointer reaches only
/// the `len` elements after it. Strides are non-negative in pipe's views.
fn fits(len: usize, rows: usize, cols: usize, row: isize, col: isize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    row >= 0 && col >= 0 && (rows - 1) * (row as usize) + (cols - 1) * (col as usize) < len
}

/// Element (r, c)'s offset from a view's start, and the elements left after it there.
fn shift(len: usize, row: isize, col: isize, r: usize, c: usize) -> (isize, usize) {
    let offset = r as isize * row + c as isize * col;
    debug_assert!(offset >= 0 && offset as usize <= len, "sub-matrix ({r}, {c}) outside its buffer");
    (offset, len.saturating_sub(offset as usize))
}

/// One matrix of a strided, read-only f32 buffer: element (r, c) at `ptr + r·row + c·col`.
#[derive(Clone, Copy)]
pub struct Mat {
    ptr: *const f32,
    /// Elements from `ptr` to the end of the buffer.
    len: usize,
    row: isize,
    col: isize,
}

// SAFETY: read-only views, shared by tasks that only read them.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// The matrix at element `offset` of `buffer`, rows `row` elements apart, columns adjacent.
    pub fn row_major(buffer: &[f32], offset: usize, row: usize) -> Self {
        Self::strided(buffer, offset, row as isize, 1)
    }

    /// The matrix at element `offset`, element (r, c) at `offset + r·row + c·col`.
    pub fn strided(buffer: &[f32], offset: usize, row: isize, col: isize) -> Self {
        assert!(offset <= buffer.len(), "view offset {offset} past a buffer of {}", buffer.len());
        Self { ptr: buffer[offset..].as_ptr(), len: buffer.len() - offset, row, col }
    }

    /// A 2-D f32 tensor as it lies in memory (a transposed view stays a view).
    pub fn of(t: &FlexTensor) -> Self {
        let layout = t.layout();
        let (row, col) = (layout.strides()[0], layout.strides()[1]);
        Self::strided(t.storage::<f32>(), layout.start_offset(), row, col)
    }

    /// The transpose, as a view of the same memory.
    pub fn t(self) -> Self {
        Self { row: self.col, col: self.row, ..self }
    }

    /// The sub-matrix whose element (0, 0) is this one's (r, c).
    pub fn offset_to(self, r: usize, c: usize) -> Self {
        let (offset, len) = shift(self.len, self.row, self.col, r, c);
        Self { ptr: self.ptr.wrapping_offset(offset), len, ..self }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        fits(self.len, rows, cols, self.row, self.col)
    }
}

/// The output side of a product: where element (r, c) goes.
#[derive(Clone, Copy)]
pub struct Out {
    ptr: *mut f32,
    len: usize,
    row: isize,
    col: isize,
}

// SAFETY: as SharedMut, which every Out comes from.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The transpose, as a view of the same memory.
    fn transposed(self) -> Self {
        Self { row: self.col, col: self.row, ..self }
    }

    /// The sub-matrix whose element (0, 0) is this one's (r, c).
    pub fn offset_to(self, r: usize, c: usize) -> Self {
        let (offset, len) = shift(self.len, self.row, self.col, r, c);
        Self { ptr: self.ptr.wrapping_offset(offset), len, ..self }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        fits(self.len, rows, cols, self.row, self.col)
    }
}

/// dst[m×n] = (dst if `accumulate`) + scale · lhs[m×k] · rhs[k×n], on the calling thread.
///
/// # Safety
/// `dst` must not overlap the inputs, and no other thread may read or write the elements of
/// `dst` this product writes while it runs. (That every view lies inside its buffer is checked
/// in debug builds.)
pub unsafe fn matmul([m, n, k]: [usize; 3], dst: Out, lhs: Mat, rhs: Mat, scale: f32, accumulate: bool) {
    debug_assert!(lhs.fits(m, k) && rhs.fits(k, n) && dst.fits(m, n), "a [{m}, {n}, {k}] product outside its buffers");
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.col,
        dst.row,
        accumulate,
        lhs.ptr,
        lhs.col,
        lhs.row,
        rhs.ptr,
        rhs.col,
        rhs.row,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `matmul` split across rayon's threads by blocks of output columns (rows, when the output is
/// taller than wide), one single-threaded product each: at the shapes of a GPT-2 step this is
/// faster than gemm's own threading (docs/speed.md).
///
/// # Safety
/// As `matmul`.
pub unsafe fn par_matmul([m, n, k]: [usize; 3], dst: Out, lhs: Mat, rhs: Mat, accumulate: bool) {
    // Tiny products (a small model's one-token steps) are not worth a trip through the pool; a
    // small model's training products (a few hundred rows of width 128) are (docs/speed.md).
    const PARALLEL_FROM: usize = 64 * 64 * 64;
    let parts = if m * n * k < PARALLEL_FROM { 1 } else { rayon::current_num_threads().max(1) };
    if parts == 1 {
        return matmul([m, n, k], dst, lhs, rhs, 1.0, accumulate);
    }
    let by_columns = n >= m;
    let extent = if by_columns { n } else { m };
    // Blocks of whole 16-wide tiles, so that no block ends in a ragged microkernel tile.
    let block = extent.div_ceil(parts).next_multiple_of(16);
    (0..extent.div_ceil(block)).into_par_iter().for_each(|i| {
        let (start, len) = (i * block, block.min(extent - i * block));
        // SAFETY: each block writes its own columns (rows) of dst; the caller vouches for the rest.
        unsafe {
            if by_columns {
                matmul([m, len, k], dst.offset_to(0, start), lhs, rhs.offset_to(0, start), 1.0, accumulate);
            } else {
                matmul([len, n, k], dst.offset_to(start, 0), lhs.offset_to(start, 0), rhs, 1.0, accumulate);
            }
        }
    });
}

/// A vector of `len` elements that `fill` writes through the shared pointer it is given,
/// handed out without being zeroed first.
///
/// # Safety
/// `fill` must write every one of the `len` elements.
pub unsafe fn filled(len: usize, fill: impl FnOnce(SharedMut)) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(len);
    fill(SharedMut { ptr: v.spare_capacity_mut().as_mut_ptr().cast(), len });
    // SAFETY: the caller promised that `fill` wrote all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// A bf16 value's f32 (exact: bf16 is f32's upper half).
#[inline(always)]
pub fn widen(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Σ x·widen(w) in f32, in order (the portable path and the vector kernels' remainders).
#[inline(always)]
fn dot_bf16_scalar(x: &[f32], w: &[u16]) -> f32 {
    x.iter().zip(w).map(|(&x, &w)| x * widen(w)).sum()
}

/// Products of f32 rows with bf16 weight rows: y[o·n + r] = Σᵢ x[r·d + i]·w[o·d + i] for the
/// n rows of `x` ([n, d]) and the rows of `w` ([rows, d], bf16 bits), accumulated in f32. With
/// AVX-512 (else AVX2 and FMA), four weight rows at a time share each load of x, 16 (8) lanes
/// each; the bf16 bits widen to f32 by a shift, so memory carries two bytes per weight.
pub fn bf16_products(y: &mut [f32], w: &[u16], x: &[f32], d: usize) {
    let (n, rows) = (x.len() / d, w.len() / d);
    assert!(x.len() == n * d && w.len() == rows * d && y.len() == rows * n, "bf16_products: shapes disagree");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature just checked; the shapes were checked above.
        return unsafe { bf16_products_avx512(y, w, x, d) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features just checked; the shapes were checked above.
        return unsafe { bf16_products_avx2(y, w, x, d) };
    }
    for (w, y) in w.chunks_exact(d).zip(y.chunks_exact_mut(n)) {
        for (y, x) in y.iter_mut().zip(x.chunks_exact(d)) {
            *y = dot_bf16_scalar(x, w);
        }
    }
}

/// `bf16_products` with AVX-512. Each 512-bit load of weights is 32 bf16 values, which are
/// 16 f32 lanes' upper halves (the odd positions: a mask) and lower halves (the even ones: a
/// shift), so no lane crosses; x is split once into its even and odd positions to match. The
/// next four rows are prefetched as these are read, so memory streams ahead of the sums.
///
/// # Safety
/// As `bf16_products_avx2`, with AVX-512F for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_products_avx512(y: &mut [f32], w: &[u16], x: &[f32], d: usize) {
    use std::arch::x86_64::*;
    let n = x.len() / d;
    let whole = d - d % 32;
    // Each row of x as blocks of 32: its 16 even positions, then its 16 odd ones.
    let mut split = vec![0.0f32; n * whole];
    for (row, out) in x.chunks_exact(d).zip(split.chunks_exact_mut(whole.max(1))) {
        for (b, out) in row[..whole].chunks_exact(32).zip(out.chunks_exact_mut(32)) {
            for i in 0..16 {
                (out[i], out[16 + i]) = (b[2 * i], b[2 * i + 1]);
            }
        }
    }
    let odd_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let dot = |xs: &[f32], x: &[f32], rows: [&[u16]; 4]| {
        // Even positions' sums at 2k, odd ones' at 2k + 1, for weight row k.
        let mut acc = [_mm512_setzero_ps(); 8];
        for at in (0..whole).step_by(32) {
            debug_assert!(at + 32 <= xs.len() && rows.iter().all(|w| at + 32 <= w.len()));
            // SAFETY: at + 32 ≤ whole ≤ d, the length of xs and of every weight row; unaligned loads.
            let (even, odd) =
                unsafe { (_mm512_loadu_ps(xs.as_ptr().add(at)), _mm512_loadu_ps(xs.as_ptr().add(at + 16))) };
            for k in 0..4 {
                // The next four rows' weights at this position: a prefetch never faults, and
                // the pointer is only formed (wrapping), never read through, past the slice.
                _mm_prefetch::<_MM_HINT_T0>(rows[k].as_ptr().wrapping_add(at + 4 * d).cast());
                // SAFETY: as above.
                let bits = unsafe { _mm512_loadu_si512(rows[k].as_ptr().add(at).cast()) };
                let (w_even, w_odd) = (_mm512_slli_epi32::<16>(bits), _mm512_and_si512(bits, odd_halves));
                acc[2 * k] = _mm512_fmadd_ps(even, _mm512_castsi512_ps(w_even), acc[2 * k]);
                acc[2 * k + 1] = _mm512_fmadd_ps(odd, _mm512_castsi512_ps(w_odd), acc[2 * k + 1]);
            }
        }
        std::array::from_fn::<f32, 4, _>(|k| {
            _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * k], acc[2 * k + 1]))
                + dot_bf16_scalar(&x[whole..], &rows[k][whole..])
        })
    };
    let xs = |r: usize| &split[r * whole..(r + 1) * whole];
    let mut groups = w.chunks_exact(4 * d);
    let mut outs = y.chunks_exact_mut(4 * n);
    for (w4, y4) in (&mut groups).zip(&mut outs) {
        let rows: [&[u16]; 4] = std::array::from_fn(|k| &w4[k * d..(k + 1) * d]);
        for (r, x) in x.chunks_exact(d).enumerate() {
            for (k, sum) in dot(xs(r), x, rows).into_iter().enumerate() {
                y4[k * n + r] = sum;
            }
        }
    }
    // The last rows (fewer than four): the same sums, the missing rows read as the first.
    let rest = groups.remainder();
    for (i, y) in outs.into_remainder().chunks_exact_mut(n).enumerate() {
        let rows = [&rest[i * d..(i + 1) * d]; 4];
        for (r, (y, x)) in y.iter_mut().zip(x.chunks_exact(d)).enumerate() {
            *y = dot(xs(r), x, rows)[0];
        }
    }
}

/// `bf16_products` with AVX2 and FMA.
///
/// # Safety
/// The CPU has AVX2 and FMA; x is [n, d], w is [rows, d] and y is [rows, n] (so every load
/// below, at most `d` elements into a row, stays inside its slice: checked in debug builds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_products_avx2(y: &mut [f32], w: &[u16], x: &[f32], d: usize) {
    use std::arch::x86_64::*;
    let n = x.len() / d;
    let whole = d - d % 8;
    // Eight weights at `w[at..]` as f32: zero-extend the 16-bit values, shift into the top half.
    let load_weights = |w: &[u16], at: usize| {
        debug_assert!(at + 8 <= w.len());
        // SAFETY: at + 8 ≤ whole ≤ the row's length (the caller's shapes); unaligned loads.
        let bits = unsafe { _mm_loadu_si128(w.as_ptr().add(at).cast()) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
    };
    let sum_lanes = |v: __m256| {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<1>(pairs, pairs)))
    };
    let mut groups = w.chunks_exact(4 * d);
    let mut outs = y.chunks_exact_mut(4 * n);
    for (w4, y4) in (&mut groups).zip(&mut outs) {
        let rows: [&[u16]; 4] = std::array::from_fn(|k| &w4[k * d..(k + 1) * d]);
        for (r, x) in x.chunks_exact(d).enumerate() {
            let mut acc = [_mm256_setzero_ps(); 4];
            for at in (0..whole).step_by(8) {
                debug_assert!(at + 8 <= x.len());
                // SAFETY: as for the weights: at + 8 ≤ d = x's row length.
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) };
                for k in 0..4 {
                    acc[k] = _mm256_fmadd_ps(xv, load_weights(rows[k], at), acc[k]);
                }
            }
            for k in 0..4 {
                y4[k * n + r] = sum_lanes(acc[k]) + dot_bf16_scalar(&x[whole..], &rows[k][whole..]);
            }
        }
    }
    for (w, y) in groups.remainder().chunks_exact(d).zip(outs.into_remainder().chunks_exact_mut(n)) {
        for (y, x) in y.iter_mut().zip(x.chunks_exact(d)) {
            let mut acc = _mm256_setzero_ps();
            for at in (0..whole).step_by(8) {
                debug_assert!(at + 8 <= x.len());
                // SAFETY: at + 8 ≤ d = x's row length.
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(at)) };
                acc = _mm256_fmadd_ps(xv, load_weights(w, at), acc);
            }
            *y = sum_lanes(acc) + dot_bf16_scalar(&x[whole..], &w[whole..]);
        }
    }
}
