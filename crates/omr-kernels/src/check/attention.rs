//! The attention comparisons of [`super::compare_on`]: every attention path (the CUDA-core
//! kernel, the GEMM path, the tensor-core tilings) and the decoding step, forward and
//! gradients, against the CPU reference.

use super::*;

/// Attention by one of the paths the checks compare: "gemm", "mma" (tensor cores, the default
/// tiling), "mma:SPEC" (tensor cores tiled as `OMR_MMA=SPEC` would, e.g. "mma:f8,b8") on
/// CUDA; on the CPU every path is the reference.
fn attend_by(
    path: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor> {
    use crate::flash_mma::{flash_mma_tiled, Tiling};
    let cuda = q.device().is_cuda();
    let spec = path.strip_prefix("mma").map(|s| s.trim_start_matches(':'));
    match (path, spec) {
        ("gemm", _) if cuda => crate::gemm_attn::gemm_attn(q, k, v, mask, scale),
        (_, Some(spec)) if cuda => {
            let tiling = Tiling::parse(spec).map_err(candle_core::Error::msg)?;
            flash_mma_tiled(q, k, v, mask, scale, tiling)
        }
        _ => crate::flash_attn::flash_attn_kernel(q, k, v, mask, scale),
    }
}

/// o, dq, dk, dv of attention by `path` (as [`attend_by`] takes it) on q, k, v = t[0..3],
/// scale 1/√D, against the cotangent `r`.
fn attention_grads(path: &str, t: &[Tensor], mask: &AttnMask, r: &Tensor) -> Result<Vec<Tensor>> {
    let (q, k, v) = (
        Var::from_tensor(&t[0])?,
        Var::from_tensor(&t[1])?,
        Var::from_tensor(&t[2])?,
    );
    let scale = 1.0 / (t[0].dim(3)? as f64).sqrt();
    let o = attend_by(
        path,
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        mask,
        scale,
    )?;
    grads_of(&o, r, &[&q, &k, &v])
}

fn grads_of(out: &Tensor, r: &Tensor, vars: &[&Var]) -> Result<Vec<Tensor>> {
    let g = (out.to_dtype(DType::F32)? * r.to_device(out.device())?)?
        .sum_all()?
        .backward()?;
    let mut v = vec![out.clone()];
    for x in vars {
        v.push(
            g.get(x.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))?
                .clone(),
        );
    }
    Ok(v)
}

/// Flash attention: packed causal text with padding (GQA), a window, vision blocks; `paths`
/// as [`attend_by`] takes them.
pub(super) fn attention_checks(
    c: &mut Checks,
    dt: DType,
    name: &str,
    tol: f64,
    paths: &[&str],
) -> Result<()> {
    for (d, causal, window, kv) in [
        (64usize, true, 0usize, 2usize),
        (128, true, 37, 1),
        (80, false, 0, 4),
    ] {
        let (b, t_, h_) = (2usize, 300usize, 4usize);
        let segs: Vec<u32> = (0..b * t_)
            .map(|i| {
                let p = i % t_;
                if i / t_ == 0 && p >= 290 {
                    0
                } else {
                    1 + (p / 97) as u32
                }
            })
            .collect();
        let seg = Tensor::from_vec(segs, (b, t_), &Device::Cpu)?;
        let q = rand(40 + d as u64, &[b, t_, h_, d], 1.5, dt)?;
        let k = rand(41 + d as u64, &[b, t_, kv, d], 1.5, dt)?;
        let v = rand(42 + d as u64, &[b, t_, kv, d], 1.0, dt)?;
        let live = seg.ne(0u32)?.to_dtype(DType::F32)?.reshape((b, t_, 1, 1))?;
        let r = rand(43, &[b, t_, h_, d], 1.0, DType::F32)?.broadcast_mul(&live)?;
        for &path in paths {
            // The tensor-core kernels take bf16 only.
            if path.starts_with("mma") && dt != DType::BF16 {
                continue;
            }
            let case = format!("d{d} causal={causal} window={window} {name}");
            c.cmp_shared(
                &format!("flash attn {path} {case}"),
                Some(&case),
                tol,
                &[&q, &k, &v, &seg, &r],
                |t| {
                    let mask = AttnMask {
                        causal,
                        window,
                        q_seg: Some(t[3].clone()),
                        k_seg: Some(t[3].clone()),
                        host: None,
                        plans: Default::default(),
                    };
                    // Padding rows are 0 on both devices; r is 0 there too.
                    attention_grads(path, t, &mask, &t[4])
                },
            )?;
        }
    }
    Ok(())
}

/// Decoding steps as generation runs them: T (1 or 3) queries over S cached keys that are a
/// view of a longer buffer (batch rows `cap` positions apart: the CUDA kernel reads them in
/// place, the CPU reference a contiguous copy), 7 heads per key/value head, causal. The key
/// range cut into splits as the device's size asks (2048 keys: up to 8 splits of 8 tiles) and,
/// forced, in one block a row group.
pub(super) fn decode_checks(c: &mut Checks, dt: DType, name: &str, tol: f64) -> Result<()> {
    for (t_, s_, cap, d, one_block) in [
        (1usize, 2048usize, 2100usize, 128usize, false),
        (1, 2048, 2100, 128, true),
        (3, 200, 256, 64, false),
    ] {
        let (b, h_, kv) = (3usize, 14usize, 2usize);
        let q = rand(70 + t_ as u64, &[b, t_, h_, d], 1.5, dt)?;
        let kb = rand(71 + t_ as u64, &[b, cap, kv, d], 1.5, dt)?;
        let vb = rand(72 + t_ as u64, &[b, cap, kv, d], 1.0, dt)?;
        let how = if one_block { ", unsplit" } else { "" };
        c.cmp(
            &format!("flash attn decode T {t_} over S {s_} of a {cap}-position cache{how} {name}"),
            tol,
            &[&q, &kb, &vb],
            |t| {
                let (k, v) = (t[1].narrow(1, 0, s_)?, t[2].narrow(1, 0, s_)?);
                let mask = AttnMask {
                    causal: true,
                    ..AttnMask::default()
                };
                let scale = 1.0 / (d as f64).sqrt();
                let attend = || crate::flash_attn::flash_attn(&t[0], &k, &v, &mask, scale);
                let o = if one_block {
                    crate::flash_attn::with_splits(1, attend)?
                } else {
                    attend()?
                };
                Ok(vec![o])
            },
        )?;
    }
    Ok(())
}

/// Attention over one long segment, with a cache (S > T) in the second case: whole tiles,
/// where the tensor-core kernels skip the per-element mask, next to the diagonal's (bf16).
pub(super) fn long_segment_checks(c: &mut Checks, paths: &[&str]) -> Result<()> {
    for (d, causal, window, kv, t_, s_) in [
        (128usize, true, 0usize, 2usize, 333usize, 333usize),
        (64, true, 100, 1, 270, 333),
    ] {
        let (b, h_, dt) = (1usize, 4usize, DType::BF16);
        let q = rand(60 + d as u64, &[b, t_, h_, d], 1.5, dt)?;
        let k = rand(61 + d as u64, &[b, s_, kv, d], 1.5, dt)?;
        let v = rand(62 + d as u64, &[b, s_, kv, d], 1.0, dt)?;
        let r = rand(63, &[b, t_, h_, d], 1.0, DType::F32)?;
        for &path in paths {
            let case = format!("d{d} one segment S {s_} T {t_} window={window} bf16");
            c.cmp_shared(
                &format!("flash attn {path} {case}"),
                Some(&case),
                3e-2,
                &[&q, &k, &v, &r],
                |t| {
                    let mask = AttnMask {
                        causal,
                        window,
                        ..AttnMask::default()
                    };
                    attention_grads(path, t, &mask, &t[3])
                },
            )?;
        }
    }
    Ok(())
}
