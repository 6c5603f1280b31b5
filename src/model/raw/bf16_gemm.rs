//! Matrix products with bf16 operands and f32 accumulation, for `run.precision = "bf16"`:
//! dst = bf16(lhs)·bf16(rhs), each operand rounded to the nearest bf16 as it is packed, every
//! product of two bf16 values exact in f32 and summed in f32.
//!
//! On CPUs with AVX512-BF16 the microkernel is `vdpbf16ps`: each of its 16 lanes adds two
//! bf16 products per instruction, twice the multiply-adds of an f32 FMA. Operands are packed
//! (converted and laid out once per product) into panels the microkernel reads in order: pairs
//! of consecutive-k values in one 32-bit word (the even k in the low half), MR rows of lhs
//! broadcast against NR columns of rhs. On other CPUs the same rounded operands go through
//! the f32 product, so the numbers differ only in the order of the f32 sums.
//!
//! Invariants: as for `matmul` — the views lie inside their buffers (checked in debug builds),
//! the output overlaps no input, and parallel tasks write disjoint column blocks of it.

use rayon::prelude::*;

use super::{par_matmul, Mat, Out};

/// Rows of lhs per microkernel tile (each broadcast against the tile's columns).
const MR: usize = 14;
/// Columns of rhs per tile: two 16-lane vectors. (14 × 2 vectors measured fastest of the
/// shapes that fit the 32 vector registers; docs/speed.md.)
const NR: usize = 32;
/// k-pairs per block: GPT-2 small's width (768) in one block, so that most products write
/// each output tile once; a tile's rhs panel of a block (KC · NR words, 48 KiB) stays in L2.
const KC: usize = 384;
/// lhs panels per block of rows: MC · MR rows × KC pairs of words (336 KiB) stay in L2 while
/// the task's rhs panels pass them.
const MC: usize = 16;

/// An f32 value's nearest bf16 (ties to even), as the low 16 bits; NaN stays a quiet NaN.
/// Branch-free, so packing loops vectorise.
#[inline(always)]
fn round_bf16(x: f32) -> u32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    if x.is_nan() {
        0x7FC0
    } else {
        rounded
    }
}

/// An operand laid out for the microkernel: for each panel of `width` lanes (rows of lhs,
/// columns of rhs), for each pair of consecutive k, one word per lane: [panel][pair][lane].
/// Words past the matrix's k or lanes are zero, so tiles never need a ragged k. The words
/// start on a 64-byte boundary, so no vector load of a panel straddles two cache lines. The
/// buffer is the calling thread's to reuse (`SPARE`): a fresh one would cost a page fault per
/// 4 KiB on every product.
struct Packed {
    words: Vec<u32>,
    /// Where the aligned words start in `words`.
    start: usize,
    pairs: usize,
    width: usize,
}

impl Packed {
    /// `src` seen as [k, lanes] (element (i, l) at i·along_k + l·along_lanes), rounded to bf16.
    fn new(src: Mat, k: usize, lanes: usize, along_k: isize, along_lanes: isize, width: usize) -> Self {
        let pairs = k.div_ceil(2);
        let panels = lanes.div_ceil(width);
        debug_assert!(super::fits(src.len, k, lanes, along_k, along_lanes), "a packed operand outside its buffer");
        let len = panels * pairs * width;
        let mut words = SPARE.with_borrow_mut(|spare| spare.pop()).unwrap_or_default();
        if words.len() < len + 15 {
            words.resize(len + 15, 0);
        }
        let start = words.as_ptr().align_offset(64).min(15);
        let pack_panel = |(p, panel): (usize, &mut [u32])| {
            let src = &src; // the whole view, which tasks may share (its pointer alone may not)
            let first = p * width;
            let used = width.min(lanes - first);
            // SAFETY: every element read is (i < k, l < lanes) of `src`, inside its buffer (above).
            let at = |i: usize, l: usize| unsafe {
                *src.ptr.offset(i as isize * along_k + (first + l) as isize * along_lanes)
            };
            if along_lanes == 1 {
                // Lanes adjacent in memory: two rows of k at a time, a vector of lanes each.
                for (pair, out) in panel.chunks_exact_mut(width).enumerate() {
                    // SAFETY: row 2·pair (and 2·pair + 1 when < k) holds `used` lanes from `first`.
                    let row = |i: usize| unsafe {
                        std::slice::from_raw_parts(src.ptr.offset(i as isize * along_k + first as isize), used)
                    };
                    let even = row(2 * pair);
                    match 2 * pair + 1 < k {
                        true => interleave(&mut out[..used], even, row(2 * pair + 1)),
                        false => out[..used].iter_mut().zip(even).for_each(|(w, &e)| *w = round_bf16(e)),
                    }
                }
            } else if along_k == 1 {
                // Each lane's k adjacent in memory: rounded as one run (a loop that vectorises),
                // then its pairs spread across the panel.
                let mut run = vec![0u16; 2 * pairs]; // an odd k's last pair ends in a zero
                for l in 0..used {
                    // SAFETY: lane l's k elements lie inside `src` (above).
                    let lane =
                        unsafe { std::slice::from_raw_parts(src.ptr.offset((first + l) as isize * along_lanes), k) };
                    round_run(&mut run[..k], lane);
                    for (out, pair) in panel.chunks_exact_mut(width).zip(run.chunks_exact(2)) {
                        out[l] = pair[0] as u32 | (pair[1] as u32) << 16;
                    }
                }
            } else {
                // Neither adjacent: element by element.
                for l in 0..used {
                    for (pair, out) in panel.chunks_exact_mut(width).enumerate() {
                        let odd = if 2 * pair + 1 < k { round_bf16(at(2 * pair + 1, l)) } else { 0 };
                        out[l] = round_bf16(at(2 * pair, l)) | odd << 16;
                    }
                }
            }
            // The last panel's lanes past the matrix still hold the reused buffer's old words.
            if used < width {
                panel.chunks_exact_mut(width).for_each(|out| out[used..].fill(0));
            }
        };
        match len > 64 * 1024 {
            true => words[start..start + len].par_chunks_mut(pairs * width).enumerate().for_each(pack_panel),
            false => words[start..start + len].chunks_mut(pairs * width).enumerate().for_each(pack_panel),
        }
        Self { words, start, pairs, width }
    }

    /// Panel `p`'s words for pairs [from, from + len).
    fn block(&self, p: usize, from: usize, len: usize) -> &[u32] {
        let at = self.start + (p * self.pairs + from) * self.width;
        &self.words[at..at + len * self.width]
    }
}

impl Drop for Packed {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        SPARE.with_borrow_mut(|spare| {
            // A product packs two operands: keep the two largest buffers.
            spare.push(words);
            spare.sort_by_key(|w| std::cmp::Reverse(w.len()));
            spare.truncate(2);
        });
    }
}

thread_local! {
    /// Packing buffers the thread's next products reuse, largest first.
    static SPARE: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

super::vectorised! {
    /// out[i] = the bf16 nearest src[i].
    fn round_run(out: &mut [u16], src: &[f32]) {
        for (o, &x) in out.iter_mut().zip(src) {
            *o = round_bf16(x) as u16;
        }
    }
}

super::vectorised! {
    /// out[l] = the bf16 pair (even[l], odd[l]).
    fn interleave(out: &mut [u32], even: &[f32], odd: &[f32]) {
        for ((w, &e), &o) in out.iter_mut().zip(even).zip(odd) {
            *w = round_bf16(e) | round_bf16(o) << 16;
        }
    }
}

/// Whether this CPU runs the bf16 microkernel (else the rounded operands take the f32 path).
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// dst[m×n] = (dst if `accumulate`) + bf16(lhs[m×k])·bf16(rhs[k×n]), accumulated in f32,
/// split across rayon's threads. The signature is `par_matmul`'s, so callers pick either.
///
/// # Safety
/// As `matmul`: `dst` overlaps neither input, and no other thread touches the elements of
/// `dst` this product writes while it runs.
pub unsafe fn bf16_matmul(shape: [usize; 3], dst: Out, lhs: Mat, rhs: Mat, accumulate: bool) {
    // SAFETY: the caller's promises, passed on.
    unsafe { bf16_matmul_on(shape, native(), dst, lhs, rhs, accumulate) }
}

/// `bf16_matmul` with the microkernel (`native`, which the CPU must support) or without.
///
/// # Safety
/// As `bf16_matmul`.
unsafe fn bf16_matmul_on([m, n, k]: [usize; 3], native: bool, dst: Out, lhs: Mat, rhs: Mat, accumulate: bool) {
    debug_assert!(lhs.fits(m, k) && rhs.fits(k, n) && dst.fits(m, n), "a [{m}, {n}, {k}] product outside its buffers");
    if m == 0 || n == 0 {
        return;
    }
    if dst.col != 1 {
        // The microkernel writes rows; a column-major dst is the transposed product's row-major one.
        return unsafe { bf16_matmul_on([n, m, k], native, dst.transposed(), rhs.t(), lhs.t(), accumulate) };
    }
    if !native {
        let (lhs, rhs) = (rounded(lhs, m, k), rounded(rhs, k, n));
        return unsafe {
            par_matmul([m, n, k], dst, Mat::row_major(&lhs, 0, k), Mat::row_major(&rhs, 0, n), accumulate)
        };
    }
    let lhs = Packed::new(lhs, k, m, lhs.col, lhs.row, MR);
    let rhs = Packed::new(rhs, k, n, rhs.row, rhs.col, NR);
    let (row_panels, column_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // Tasks own whole column panels, so their writes to dst are disjoint; a few per thread
    // keep both threads busy when panels cost unevenly (the last one is ragged).
    let tasks = if m * n * k < 192 * 192 * 192 { 1 } else { 4 * rayon::current_num_threads() };
    let per_task = column_panels.div_ceil(tasks.min(column_panels));
    let task = |first: usize| {
        for from in (0..lhs.pairs).step_by(KC) {
            let len = KC.min(lhs.pairs - from);
            let add = accumulate || from > 0;
            // The lhs panels of a block of rows stay in L2 while the task's rhs panels pass.
            for rows_from in (0..row_panels).step_by(MC) {
                for j in first..column_panels.min(first + per_task) {
                    let b = rhs.block(j, from, len);
                    let cols = NR.min(n - j * NR);
                    for i in rows_from..row_panels.min(rows_from + MC) {
                        let rows = MR.min(m - i * MR);
                        let c = dst.offset_to(i * MR, j * NR);
                        debug_assert!(c.fits(rows, cols));
                        // SAFETY: `native` says the CPU has the instructions; the blocks hold `len` pairs of MR
                        // and NR words; the tile's rows × cols lie inside dst (checked in debug
                        // builds) and belong to this task's column panels.
                        unsafe { tile(len, lhs.block(i, from, len), b, c.ptr, c.row, rows, cols, add) };
                    }
                }
            }
        }
    };
    (0..column_panels).step_by(per_task).collect::<Vec<_>>().into_par_iter().for_each(task);
}

/// A [rows, cols] view's elements rounded to bf16 and back, row-major.
fn rounded(src: Mat, rows: usize, cols: usize) -> Vec<f32> {
    // SAFETY: (r < rows, c < cols) lies inside the view's buffer (the caller's debug check).
    let at = |r: usize, c: usize| unsafe { *src.ptr.offset(r as isize * src.row + c as isize * src.col) };
    (0..rows).flat_map(|r| (0..cols).map(move |c| f32::from_bits(round_bf16(at(r, c)) << 16))).collect()
}

/// One MR×NR tile over `pairs` k-pairs: c[r][0..cols] = (c if `add`) + Σ a·b, r < rows.
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; `a` holds pairs·MR words and `b` pairs·NR; c's rows
/// (`ldc` apart) hold `cols` writable f32 each for `rows` rows, touched by no other thread.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(pairs: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: isize, rows: usize, cols: usize, add: bool) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() == pairs * MR && b.len() == pairs * NR && rows <= MR && cols <= NR);
    let mut acc = [[_mm512_setzero_ps(); NR / 16]; MR];
    for (a, b) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        // SAFETY: b holds NR words here, NR / 16 vectors of 16.
        let bv: [__m512bh; NR / 16] =
            std::array::from_fn(|v| unsafe { std::mem::transmute(_mm512_loadu_si512(b.as_ptr().add(16 * v).cast())) });
        for (acc, &word) in acc.iter_mut().zip(a) {
            // SAFETY: a bit-pattern reinterpretation between two 512-bit vector types.
            let av: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(word as i32)) };
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_dpbf16_ps(*acc, av, bv);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (v, &sum) in acc.iter().enumerate() {
            let first = 16 * v;
            if first >= cols {
                break;
            }
            let mask: __mmask16 = if cols - first >= 16 { 0xFFFF } else { (1 << (cols - first)) - 1 };
            // SAFETY: columns first.. first + popcount(mask) of row r are inside c (the caller's).
            unsafe {
                let at = c.offset(r as isize * ldc + first as isize);
                let sum = if add { _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, at)) } else { sum };
                _mm512_mask_storeu_ps(at, mask, sum);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(_: usize, _: &[u32], _: &[u32], _: *mut f32, _: isize, _: usize, _: usize, _: bool) {
    unreachable!("the bf16 microkernel is only called where native() is true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::raw::SharedMut;

    #[test]
    fn rounding_matches_the_half_crate_on_every_kind_of_value() {
        let specials = [0.0f32, -0.0, 1.0, -1.5, f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY, f32::NEG_INFINITY];
        // Ties (the low half exactly 0x8000) to even in both directions, and just either side.
        let ties = [0x3F80_8000u32, 0x3F81_8000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7F_FFFF];
        let values = specials
            .into_iter()
            .chain(ties.map(f32::from_bits))
            .chain((0..10_000).map(|i| (i as f32 * 0.7311).sin() * 1e3));
        for x in values {
            assert_eq!(round_bf16(x) as u16, half::bf16::from_f32(x).to_bits(), "{x:e} ({:#x})", x.to_bits());
        }
        assert!(f32::from_bits(round_bf16(f32::NAN) << 16).is_nan());
    }

    /// Every product, with the microkernel (where the CPU has it) and without, against an f64
    /// sum of the same bf16-rounded operands: row-major and transposed views, ragged tiles and
    /// an odd k, accumulation onto dst, a column-major dst.
    /// Tolerance: 1e-5 of the sum of the terms' magnitudes (f32 sums of up to 801 exact terms,
    /// rounded once per term: ~√801 roundings' worth in practice, 801 at the very worst).
    #[test]
    fn bf16_products_match_an_f64_sum_of_the_rounded_operands() {
        // The last splits k into blocks, rows into blocks and columns across threads' tasks.
        for (m, n, k) in [(1, 1, 1), (9, 49, 3), (37, 130, 257), (200, 97, 600), (300, 70, 801), (300, 520, 200)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 / 500.0) - 1.0).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 104_729 % 2111) as f32 / 1000.0) - 1.05).collect();
            let bf = |x: f32| half::bf16::from_f32(x).to_f64();
            let cases = [(false, false, false), (true, true, true)];
            for ((transposed_lhs, column_major_dst, accumulate), native) in cases
                .into_iter()
                .flat_map(|case| [(case, false), (case, native())])
                .collect::<std::collections::BTreeSet<_>>()
            {
                // The transposed case reads lhs as the transpose of a [k, m] buffer.
                let transposed: Vec<f32> = (0..k * m).map(|e| lhs[(e % m) * k + e / m]).collect();
                let lhs_view =
                    if transposed_lhs { Mat::row_major(&transposed, 0, m).t() } else { Mat::row_major(&lhs, 0, k) };
                let mut dst = vec![0.5f32; m * n];
                let out = SharedMut::new(&mut dst);
                let out = if column_major_dst { out.strided(0, 1, m as isize) } else { out.row_major(0, n) };
                // SAFETY: dst is a separate buffer of m·n elements and only this thread uses it.
                unsafe { bf16_matmul_on([m, n, k], native, out, lhs_view, Mat::row_major(&rhs, 0, n), accumulate) };
                for r in 0..m {
                    for c in 0..n {
                        let terms = (0..k).map(|i| bf(lhs[r * k + i]) * bf(rhs[i * n + c]));
                        let (sum, magnitude) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                        let want = sum + if accumulate { 0.5 } else { 0.0 };
                        let got = dst[if column_major_dst { c * m + r } else { r * n + c }] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + magnitude),
                            "({m},{n},{k}) native {native} [{r},{c}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
