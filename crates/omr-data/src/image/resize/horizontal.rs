//! Pillow's horizontal bicubic pass, [`ROWS`] source rows at a time.
//!
//! One row alone has only 3 channels to work on in parallel, too few for SIMD. So a block of
//! `ROWS` rows is first transposed into "column-major" order (`tmp[x][r][c]`, 3·ROWS bytes per
//! source column), after which every output pixel is a plain dot product of `K` contiguous
//! 3·ROWS-byte columns with `K` scalar weights: 24 independent i32 lanes that the compiler keeps
//! in registers and vectorizes (3 AVX2 or 6 SSE2 registers). Integer sums do not depend on the
//! order they are formed in, so the result is bit-identical to Pillow's one-pixel-at-a-time loop.
//!
//! Every window is widened to one fixed tap count `K` (zero weights, see [`Fixed`]) so the tap
//! loop is unrolled at compile time for the usual 4..=9 taps.

use super::{clip8, mac, Coeffs, HALF};

/// Source rows per block: 8 rows x 3 channels = 24 i32 accumulators.
const ROWS: usize = 8;
const LANES: usize = ROWS * 3;

/// The horizontal weights re-laid out with one fixed width `k` for every output pixel: each
/// window is shifted left where needed so that `start + k <= in_size`, and the extra taps get
/// weight 0. Integer sums are unchanged, and a compile-time `k` lets the inner loop unroll.
pub(super) struct Fixed {
    k: usize,
    start: Vec<usize>,
    weights: Vec<i32>,
}

pub(super) fn fixed(c: &Coeffs, in_size: usize) -> Fixed {
    let k = c.len.iter().copied().max().unwrap_or(0);
    let mut start = Vec::with_capacity(c.start.len());
    let mut weights = vec![0i32; c.start.len() * k];
    for (xx, (&s, &n)) in c.start.iter().zip(&c.len).enumerate() {
        let s_fixed = s.min(in_size - k);
        let off = s - s_fixed;
        weights[xx * k + off..][..n].copy_from_slice(&c.weights[xx * c.ksize..][..n]);
        start.push(s_fixed);
    }
    Fixed { k, start, weights }
}

/// `src` (rows, W_in, 3) → `dst` (rows, W_out, 3).
pub(super) fn horizontal(src: &[u8], dst: &mut [u8], w_in: usize, w_out: usize, f: &Fixed) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { avx2::horizontal(src, dst, w_in, w_out, f) };
    }
    horizontal_generic(src, dst, w_in, w_out, f)
}

/// The same loop compiled for AVX2 (8-lane 32-bit multiply), picked at run time. Integer results
/// do not depend on the instruction set.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Fixed;

    #[target_feature(enable = "avx2")]
    pub(super) fn horizontal(src: &[u8], dst: &mut [u8], w_in: usize, w_out: usize, f: &Fixed) {
        super::horizontal_generic(src, dst, w_in, w_out, f)
    }
}

#[inline(always)]
fn horizontal_generic(src: &[u8], dst: &mut [u8], w_in: usize, w_out: usize, f: &Fixed) {
    // (W_in, ROWS, 3); rows past the end of a short last block hold stale bytes whose outputs
    // are computed and dropped.
    let mut tmp = vec![0u8; w_in * LANES];
    for (src_rows, dst_rows) in src
        .chunks(w_in * 3 * ROWS)
        .zip(dst.chunks_mut(w_out * 3 * ROWS))
    {
        transpose(src_rows, &mut tmp, w_in);
        match f.k {
            // Bicubic upscaling reads 4-5 taps, mild downscaling up to ~9.
            4 => block::<4>(&tmp, dst_rows, w_out, f),
            5 => block::<5>(&tmp, dst_rows, w_out, f),
            6 => block::<6>(&tmp, dst_rows, w_out, f),
            7 => block::<7>(&tmp, dst_rows, w_out, f),
            8 => block::<8>(&tmp, dst_rows, w_out, f),
            9 => block::<9>(&tmp, dst_rows, w_out, f),
            _ => block::<0>(&tmp, dst_rows, w_out, f),
        }
    }
}

/// Up to ROWS rows (n, W_in, 3) → `tmp` (W_in, ROWS, 3), leaving rows n.. untouched.
#[inline(always)]
fn transpose(rows: &[u8], tmp: &mut [u8], w_in: usize) {
    for (r, row) in rows.chunks_exact(w_in * 3).enumerate() {
        for (col, px) in tmp.chunks_exact_mut(LANES).zip(row.chunks_exact(3)) {
            col[r * 3..r * 3 + 3].copy_from_slice(px);
        }
    }
}

/// One block: each output pixel `xx` is Σ_t weights[xx][t] · tmp[start[xx] + t] over 24 lanes,
/// then clipped and scattered back to the block's rows. `K = 0` means "`f.k`, known at run time"
/// (strong downscales).
#[inline(always)]
fn block<const K: usize>(tmp: &[u8], dst_rows: &mut [u8], w_out: usize, f: &Fixed) {
    let k_len = if K == 0 { f.k } else { K };
    let n_rows = dst_rows.len() / (w_out * 3);
    for (xx, (&s, k)) in f
        .start
        .iter()
        .zip(f.weights.chunks_exact(k_len))
        .enumerate()
    {
        let window = &tmp[s * LANES..][..k_len * LANES];
        let mut acc = [HALF; LANES];
        for (col, &kx) in window.chunks_exact(LANES).zip(k) {
            for (a, &p) in acc.iter_mut().zip(col) {
                *a = mac(*a, p, kx);
            }
        }
        let px: [u8; LANES] = acc.map(clip8);
        for (r, out) in px.chunks_exact(3).take(n_rows).enumerate() {
            dst_rows[(r * w_out + xx) * 3..][..3].copy_from_slice(out);
        }
    }
}
