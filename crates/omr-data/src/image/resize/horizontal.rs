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
use std::mem::MaybeUninit;

/// Source rows per block: 8 rows x 3 channels = 24 i32 accumulators.
const ROWS: usize = 8;
const LANES: usize = ROWS * 3;
/// Bytes per transposed column: the lanes plus padding, so that 4-byte stores stay inside.
const COL: usize = 32;

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

/// `src` (rows, W_in, 3) → (rows, W_out, 3).
pub(super) fn horizontal(src: &[u8], w_in: usize, w_out: usize, f: &Fixed) -> Vec<u8> {
    let n = src.len() / (w_in * 3) * w_out * 3;
    // Filled in place without zeroing first: every byte is written exactly once below.
    let mut out = Vec::with_capacity(n);
    let dst = &mut out.spare_capacity_mut()[..n];
    #[cfg(target_arch = "x86_64")]
    let done = if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { avx2::horizontal(src, dst, w_in, w_out, f) };
        true
    } else {
        false
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = false;
    if !done {
        horizontal_generic(src, dst, w_in, w_out, f);
    }
    // SAFETY: `transpose_out` writes all 3 bytes of each of the W_out pixels of every row.
    unsafe { out.set_len(n) };
    out
}

/// The same loop compiled for AVX2 (8-lane 32-bit multiply), picked at run time. Integer results
/// do not depend on the instruction set.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Fixed;
    use std::mem::MaybeUninit;

    #[target_feature(enable = "avx2")]
    pub(super) fn horizontal(
        src: &[u8],
        dst: &mut [MaybeUninit<u8>],
        w_in: usize,
        w_out: usize,
        f: &Fixed,
    ) {
        super::horizontal_generic(src, dst, w_in, w_out, f)
    }
}

#[inline(always)]
fn horizontal_generic(
    src: &[u8],
    dst: &mut [MaybeUninit<u8>],
    w_in: usize,
    w_out: usize,
    f: &Fixed,
) {
    // (W_in, COL) and (W_out, COL): a block in column-major order, lanes [0, 3·ROWS) used. Rows
    // past the end of a short last block hold stale bytes whose outputs are computed and dropped.
    let mut tmp = vec![0u8; w_in * COL];
    let mut res = vec![0u8; w_out * COL];
    for (src_rows, dst_rows) in src
        .chunks(w_in * 3 * ROWS)
        .zip(dst.chunks_mut(w_out * 3 * ROWS))
    {
        transpose_in(src_rows, &mut tmp, w_in);
        match f.k {
            // Bicubic upscaling reads 4-5 taps, mild downscaling up to ~9.
            4 => block::<4>(&tmp, &mut res, f),
            5 => block::<5>(&tmp, &mut res, f),
            6 => block::<6>(&tmp, &mut res, f),
            7 => block::<7>(&tmp, &mut res, f),
            8 => block::<8>(&tmp, &mut res, f),
            9 => block::<9>(&tmp, &mut res, f),
            _ => block::<0>(&tmp, &mut res, f),
        }
        transpose_out(&res, dst_rows, w_out);
    }
}

/// Up to ROWS rows (n, W_in, 3) → `tmp` (W_in, COL), lanes [3r, 3r+3) for row r.
///
/// Pixels move as 4-byte words (one load, one store) instead of 3 single bytes: the extra byte
/// lands on lane 3r+3, which row r+1 overwrites afterwards (rows go in increasing order), or on
/// the unused padding lane 3·ROWS. The last pixel of a row has no 4th byte to read and is copied
/// as 3 bytes.
#[inline(always)]
fn transpose_in(rows: &[u8], tmp: &mut [u8], w_in: usize) {
    for (r, row) in rows.chunks_exact(w_in * 3).enumerate() {
        let lanes = r * 3..r * 3 + 4;
        let last_px = &row[row.len() - 3..];
        let (head_cols, last_col) = tmp.split_at_mut((w_in - 1) * COL);
        for (col, at) in head_cols.chunks_exact_mut(COL).zip((0..).step_by(3)) {
            col[lanes.clone()].copy_from_slice(&row[at..at + 4]);
        }
        last_col[r * 3..r * 3 + 3].copy_from_slice(last_px);
    }
}

/// `res` (W_out, COL) → up to ROWS rows (n, W_out, 3).
#[inline(always)]
fn transpose_out(res: &[u8], dst_rows: &mut [MaybeUninit<u8>], w_out: usize) {
    for (r, row) in dst_rows.chunks_exact_mut(w_out * 3).enumerate() {
        for (px, col) in row.chunks_exact_mut(3).zip(res.chunks_exact(COL)) {
            for (d, &s) in px.iter_mut().zip(&col[r * 3..r * 3 + 3]) {
                d.write(s);
            }
        }
    }
}

/// Each output pixel `xx` is Σ_t weights[xx][t] · tmp[start[xx] + t] over the 3·ROWS lanes,
/// clipped into res[xx]. `K = 0` means "`f.k`, known at run time" (strong downscales).
#[inline(always)]
fn block<const K: usize>(tmp: &[u8], res: &mut [u8], f: &Fixed) {
    let k_len = if K == 0 { f.k } else { K };
    for ((out, &s), k) in res
        .chunks_exact_mut(COL)
        .zip(&f.start)
        .zip(f.weights.chunks_exact(k_len))
    {
        let window = &tmp[s * COL..][..k_len * COL];
        let mut acc = [HALF; LANES];
        for (col, &kx) in window.chunks_exact(COL).zip(k) {
            for (a, &p) in acc.iter_mut().zip(col) {
                *a = mac(*a, p, kx);
            }
        }
        for (o, &a) in out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::coeffs;
    use super::*;

    /// Pillow's loop as written: one pixel, one channel, one tap at a time.
    fn pillow_loop(src: &[u8], w_in: usize, w_out: usize, c: &Coeffs) -> Vec<u8> {
        let mut out = Vec::new();
        for row in src.chunks_exact(w_in * 3) {
            for xx in 0..w_out {
                for ch in 0..3 {
                    let k = &c.weights[xx * c.ksize..][..c.len[xx]];
                    let acc = k.iter().enumerate().fold(HALF, |acc, (t, &kx)| {
                        mac(acc, row[(c.start[xx] + t) * 3 + ch], kx)
                    });
                    out.push(clip8(acc));
                }
            }
        }
        out
    }

    #[test]
    fn blocked_pass_equals_the_pillow_loop() {
        // Up- and downscales, fixed tap counts 4..9 and the run-time one (1 and 70 taps), row
        // counts that leave short last blocks, and a 1-pixel-wide source.
        for (w_in, w_out, rows) in [
            (37, 91, 11),
            (100, 61, 8),
            (1000, 28, 3),
            (2, 1, 17),
            (1, 5, 9),
        ] {
            let mut seed = 12345u32;
            let src: Vec<u8> = (0..w_in * 3 * rows)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    // Mostly extremes, so that clipping at both ends is exercised.
                    match seed >> 30 {
                        0 => 0,
                        1 => 255,
                        _ => (seed >> 16) as u8,
                    }
                })
                .collect();
            let c = coeffs(w_in, w_out);
            let f = fixed(&c, w_in);
            let want = pillow_loop(&src, w_in, w_out, &c);
            let mut got = vec![MaybeUninit::new(0u8); rows * w_out * 3];
            horizontal_generic(&src, &mut got, w_in, w_out, &f);
            // SAFETY: every element was initialized (MaybeUninit::new) before the pass.
            let got: Vec<u8> = got.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(got, want, "generic {w_in}->{w_out} x{rows}");
            let got = horizontal(&src, w_in, w_out, &f);
            assert_eq!(got, want, "dispatched {w_in}->{w_out} x{rows}");
        }
    }
}
