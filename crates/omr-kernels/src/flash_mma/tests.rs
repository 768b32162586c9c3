use super::*;

fn dims(b: usize, t: usize, s: usize) -> Dims {
    Dims {
        b,
        t,
        s,
        h: 2,
        kv: 1,
        d: 64,
    }
}

/// Brute force: every pair a span leaves out is disallowed by the mask.
fn check(qs: &[u32], ks: &[u32], d: &Dims, mask: &AttnMask, w: Tiling) {
    let (fwd, bwd) = spans(qs, ks, d, mask, w);
    let (fwd_rows, bwd_keys) = (w.fwd_rows(), w.bwd_keys());
    let off = d.s - d.t;
    let ok = |bi: usize, i: usize, j: usize| {
        let (a, z) = (qs[bi * d.t + i], ks[bi * d.s + j]);
        a != 0
            && a == z
            && (!mask.causal || j <= i + off)
            && (mask.window == 0 || j + mask.window > i + off)
    };
    let nq = d.t.div_ceil(fwd_rows);
    let nk = d.s.div_ceil(bwd_keys);
    for bi in 0..d.b {
        for i in 0..d.t {
            for j in 0..d.s {
                if !ok(bi, i, j) {
                    continue;
                }
                let f = 2 * (bi * nq + i / fwd_rows);
                assert!(
                    (fwd[f] as usize..fwd[f + 1] as usize).contains(&j),
                    "forward span misses ({bi}, {i}, {j})"
                );
                let k = 2 * (bi * nk + j / bwd_keys);
                assert!(
                    (bwd[k] as usize..bwd[k + 1] as usize).contains(&i),
                    "backward span misses ({bi}, {i}, {j})"
                );
            }
        }
    }
}

#[test]
fn spans_cover_every_allowed_pair() {
    // Two rows: packed segments with padding, and one segment; S > T (a cache).
    let (t, s) = (150usize, 170usize);
    let mut qs = Vec::new();
    let mut ks = Vec::new();
    for bi in 0..2u32 {
        let seg = |p: usize| if bi == 0 { 1 + (p / 45) as u32 } else { 1 };
        ks.extend((0..s).map(|p| if bi == 0 && p >= 160 { 0 } else { seg(p) }));
        qs.extend((0..t).map(|i| ks[bi as usize * s + i + (s - t)]));
    }
    for (causal, window) in [(true, 0), (false, 0), (true, 37), (false, 20)] {
        let mask = AttnMask {
            causal,
            window,
            ..AttnMask::default()
        };
        for spec in ["", "f8,b8", "f8", "f4x2,b8,q4", "b8r64"] {
            check(
                &qs,
                &ks,
                &dims(2, t, s),
                &mask,
                Tiling::parse(spec).unwrap(),
            );
        }
    }
}

#[test]
fn misaligned_views_are_copied() -> Result<()> {
    let x = Tensor::arange(0f32, 40., &candle_core::Device::Cpu)?;
    let view = x.narrow(0, 3, 16)?;
    let a = aligned(&view)?;
    assert_eq!(a.layout().start_offset(), 0);
    assert_eq!(a.to_vec1::<f32>()?, view.to_vec1::<f32>()?);
    assert_eq!(aligned(&x.narrow(0, 8, 16)?)?.layout().start_offset(), 8);
    Ok(())
}

#[test]
fn spans_skip_what_causality_forbids() {
    let (t, s) = (256usize, 256usize);
    let ones = vec![1u32; t];
    let mask = AttnMask {
        causal: true,
        ..AttnMask::default()
    };
    let (fwd, bwd) = spans(&ones, &ones, &dims(1, t, s), &mask, Tiling::default());
    // Query block 0 sees keys [0, 64); key block 3 is seen by queries [192, 256).
    assert_eq!(&fwd[..2], &[0, 64]);
    assert_eq!(&bwd[6..8], &[192, 256]);
}
