//! Pillow's vertical bicubic pass over whole rows.
//!
//! Output row `yy` is Σ_t weights[yy][t] · source row (start[yy] + t), the same scalar weight for
//! every byte of a row, so the work is a weighted sum of contiguous byte rows: it is done
//! [`CHUNK`] bytes at a time with the accumulators held in registers across all taps (no
//! accumulator array round-tripping through memory per tap). Integer sums do not depend on the
//! evaluation order, so this is bit-identical to Pillow.

use super::{clip8, mac, Coeffs, HALF};
use std::mem::MaybeUninit;

/// Bytes per column chunk: 32 i32 accumulators (4 AVX2 / 8 SSE2 registers).
const CHUNK: usize = 32;

/// `src` is (H_src, stride) whose row 0 is source row `row0`; returns (H_out, stride).
pub(super) fn vertical(
    src: &[u8],
    stride: usize,
    row0: usize,
    c: &Coeffs,
    h_out: usize,
) -> Vec<u8> {
    let n = h_out * stride;
    // Filled in place without zeroing first: every byte is written exactly once below.
    let mut out = Vec::with_capacity(n);
    let dst = &mut out.spare_capacity_mut()[..n];
    #[cfg(target_arch = "x86_64")]
    let done = if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { avx2::vertical(src, dst, stride, row0, c) };
        true
    } else {
        false
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = false;
    if !done {
        vertical_generic(src, dst, stride, row0, c);
    }
    // SAFETY: `vertical_generic` writes all `stride` bytes of each of the h_out rows (whole
    // CHUNKs, then the remainder).
    unsafe { out.set_len(n) };
    out
}

/// The same loop compiled for AVX2 (8-lane 32-bit multiply), picked at run time. Integer results
/// do not depend on the instruction set.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Coeffs;
    use std::mem::MaybeUninit;

    #[target_feature(enable = "avx2")]
    pub(super) fn vertical(
        src: &[u8],
        out: &mut [MaybeUninit<u8>],
        stride: usize,
        row0: usize,
        c: &Coeffs,
    ) {
        super::vertical_generic(src, out, stride, row0, c)
    }
}

#[inline(always)]
fn vertical_generic(
    src: &[u8],
    out: &mut [MaybeUninit<u8>],
    stride: usize,
    row0: usize,
    c: &Coeffs,
) {
    for (yy, dst) in out.chunks_exact_mut(stride).enumerate() {
        let k = &c.weights[yy * c.ksize..][..c.len[yy]];
        let rows = &src[(c.start[yy] - row0) * stride..][..k.len() * stride];
        for (i, d) in dst.chunks_exact_mut(CHUNK).enumerate() {
            let mut acc = [HALF; CHUNK];
            for (row, &ky) in rows.chunks_exact(stride).zip(k) {
                let p = &row[i * CHUNK..][..CHUNK];
                for (a, &p) in acc.iter_mut().zip(p) {
                    *a = mac(*a, p, ky);
                }
            }
            for (o, &a) in d.iter_mut().zip(&acc) {
                o.write(clip8(a));
            }
        }
        // The last stride % CHUNK bytes.
        for x in stride / CHUNK * CHUNK..stride {
            let mut acc = HALF;
            for (row, &ky) in rows.chunks_exact(stride).zip(k) {
                acc = mac(acc, row[x], ky);
            }
            dst[x].write(clip8(acc));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::coeffs;
    use super::*;

    #[test]
    fn chunked_pass_equals_the_pillow_loop() {
        // Strides with and without a remainder past the 32-byte chunks; up- and downscales.
        for (h_in, h_out, stride) in [(37, 91, 3 * 45), (100, 61, 96), (90, 7, 3), (1, 4, 30)] {
            let src: Vec<u8> = (0..h_in * stride).map(|i| (i * 7919 % 256) as u8).collect();
            let c = coeffs(h_in, h_out);
            // Pillow's loop over rows that start at source row `row0` = 0.
            let mut want = Vec::new();
            for yy in 0..h_out {
                let k = &c.weights[yy * c.ksize..][..c.len[yy]];
                for x in 0..stride {
                    let acc = k.iter().enumerate().fold(HALF, |acc, (t, &ky)| {
                        mac(acc, src[(c.start[yy] + t) * stride + x], ky)
                    });
                    want.push(clip8(acc));
                }
            }
            let mut got = vec![MaybeUninit::new(0u8); h_out * stride];
            vertical_generic(&src, &mut got, stride, 0, &c);
            // SAFETY: every element was initialized (MaybeUninit::new) before the pass.
            let got: Vec<u8> = got.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(got, want, "generic {h_in}->{h_out}");
            assert_eq!(vertical(&src, stride, 0, &c, h_out), want, "dispatched");
        }
    }
}
