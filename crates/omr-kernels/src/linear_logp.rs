//! Fused linear log-probabilities: per row n, `logp_n = log softmax(z_n)[target_n]` and the
//! entropy `H_n = −Σ_j p_nj log p_nj` of `z_n = zscale · h_n · Wᵀ + bias`, without the N × V
//! logits: the per-token scores of GRPO (`zscale` = 1 / temperature, `bias` −1e30 on the
//! vocabulary ids sampling never draws), which with a Qwen vocabulary are otherwise the largest
//! tensors of the policy update (N × 151 936 f32 logits, their log-softmax and its gradient).
//!
//! Forward, for each block of `rows` rows and each block of `vocab` vocabulary entries (the
//! tiling of [`crate::linear_ce`]): a logits tile `H_r · W_vᵀ` (candle matmul: cuBLAS on CUDA),
//! folded into per-row statistics by the tile statistics kernel (max, Σ exp, the target's
//! score, Σ exp · z), merged across vocabulary blocks as flash attention merges key blocks.
//! `lse = max + ln Σexp`, `logp = z[target] − lse`, `H = lse − Σ p z`.
//!
//! Backward: unlike the cross-entropy, the incoming gradient differs per row (GRPO weights each
//! token by its advantage and clip), so dW cannot be formed in the forward. The op keeps h, W,
//! the targets and `lse` (N f32) and recomputes each tile: `dL = g · zscale · (onehot − p)` by
//! the tile gradient kernel, `dH_r += dL · W_v`, `dW_v += dLᵀ · H_r` (f32 accumulation), each
//! only when its input is tracked. Extra memory: one rows × vocab tile plus dH and dW.
//!
//! h: (N, C) f32|bf16, w: (V, C) same dtype, targets: (N) u32 < V, bias: (V) f32, finite →
//! (logp (N) f32, differentiable in h and w; entropy (N) f32, no gradient). Logits tiles are in
//! the compute dtype (bf16 products on CUDA), their statistics in f32.
//! Kernels: `kernels/linear_ce.cu` (`lp_tile_*`); CPU: [`tile_stats_ref`], [`tile_grad_ref`].

use crate::host::{self, Precomputed};
use crate::linear_ce::LceChunks;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// How the logits are scored: `z = zscale · h · Wᵀ + bias`.
#[derive(Clone, Debug)]
pub struct LogpScore {
    /// 1 / temperature.
    pub zscale: f32,
    /// (V) f32 added to the scaled logits (0, or −1e30 for an id never drawn); finite.
    pub bias: Tensor,
}

/// (logp (N) f32 differentiable in h and w, entropy (N) f32 without gradient).
pub fn linear_logp(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    score: &LogpScore,
    chunks: LceChunks,
) -> Result<(Tensor, Tensor)> {
    host::check_float("linear_logp", h.dtype())?;
    let (n, c) = h.dims2()?;
    let (v, cw) = w.dims2()?;
    if cw != c || w.dtype() != h.dtype() || targets.dims() != [n] || targets.dtype() != DType::U32 {
        bail!(
            "linear_logp: h (N, C), w (V, C) of one dtype and targets (N) u32; got {:?} {:?}, {:?} {:?}, {:?} {:?}",
            h.dims(), h.dtype(), w.dims(), w.dtype(), targets.dims(), targets.dtype()
        )
    }
    if score.bias.dims() != [v] || score.bias.dtype() != DType::F32 {
        bail!(
            "linear_logp: bias must be ({v}) f32, got {:?} {:?}",
            score.bias.dims(),
            score.bias.dtype()
        )
    }
    if !score.zscale.is_finite() || score.zscale <= 0.0 {
        bail!(
            "linear_logp: zscale must be finite and > 0, got {}",
            score.zscale
        )
    }
    if chunks.rows == 0 || chunks.vocab == 0 {
        bail!("linear_logp: chunk sizes must be > 0")
    }
    let dev = h.device();
    if n == 0 {
        let empty = Tensor::zeros(0, DType::F32, dev)?;
        return Ok((empty.clone(), empty));
    }
    let saved = Saved {
        h: h.detach(),
        w: w.detach(),
        targets: targets.contiguous()?,
        score: LogpScore {
            zscale: score.zscale,
            bias: score.bias.contiguous()?,
        },
        chunks,
    };
    let (logp, entropy, lse) = saved.forward()?;
    let need = Need {
        dh: h.track_op(),
        dw: w.track_op(),
    };
    if !(need.dh || need.dw) {
        return Ok((logp, entropy));
    }
    let logp = h.apply_op2(
        w,
        host::Attached2 {
            name: "omr-linear-logp",
            value: Precomputed::new("linear_logp", logp),
            backward: Recompute { saved, lse, need },
        },
    )?;
    Ok((logp, entropy))
}

/// Which gradients the caller needs: those of the tracked inputs.
#[derive(Clone, Copy, Debug)]
struct Need {
    dh: bool,
    dw: bool,
}

/// What the forward and the backward read: detached h and w, the targets, the score.
struct Saved {
    h: Tensor,
    w: Tensor,
    targets: Tensor,
    score: LogpScore,
    chunks: LceChunks,
}

impl Saved {
    fn vblocks(&self) -> Result<Vec<(usize, usize)>> {
        let v = self.w.dim(0)?;
        let step = self.chunks.vocab;
        Ok((0..v)
            .step_by(step)
            .map(|v0| (v0, step.min(v - v0)))
            .collect())
    }

    fn rblocks(&self) -> Result<Vec<(usize, usize)>> {
        let n = self.h.dim(0)?;
        let step = self.chunks.rows;
        Ok((0..n)
            .step_by(step)
            .map(|r0| (r0, step.min(n - r0)))
            .collect())
    }

    /// (logp, entropy, lse), each (N) f32.
    fn forward(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let vblocks = self.vblocks()?;
        let (mut logp, mut ent, mut lse) = (Vec::new(), Vec::new(), Vec::new());
        for (r0, r) in self.rblocks()? {
            let hr = self.h.narrow(0, r0, r)?;
            let tr = self.targets.narrow(0, r0, r)?.contiguous()?;
            // Running (max, Σ exp(z − max), z[target], Σ exp(z − max) · z) of the row block.
            let mut run: Option<[Tensor; 4]> = None;
            for &(v0, vc) in &vblocks {
                let logits = hr.matmul(&self.w.narrow(0, v0, vc)?.t()?)?;
                let op = TileStats {
                    targets: tr.clone(),
                    bias: self.score.bias.clone(),
                    v0,
                    zscale: self.score.zscale,
                };
                // Statistics only: the gradients are this op's own backward.
                let st = logits.apply_op1_no_bwd(&op)?; // no-grad ok
                let col = |i| -> Result<Tensor> { st.narrow(1, i, 1)?.squeeze(1) };
                let tile = [col(0)?, col(1)?, col(2)?, col(3)?];
                run = Some(match run {
                    None => tile,
                    Some([m, s, t, u]) => {
                        let [mt, st_, tt, ut] = tile;
                        let m1 = m.maximum(&mt)?;
                        let (a, b) = ((m - &m1)?.exp()?, (mt - &m1)?.exp()?);
                        [
                            m1,
                            ((s * &a)? + (st_ * &b)?)?,
                            (t + tt)?,
                            ((u * &a)? + (ut * &b)?)?,
                        ]
                    }
                });
            }
            let [m, s, t, u] = run.expect("at least one vocab block");
            let l = (m + s.log()?)?;
            logp.push((t - &l)?);
            ent.push((&l - (u / s)?)?);
            lse.push(l);
        }
        Ok((
            Tensor::cat(&logp, 0)?,
            Tensor::cat(&ent, 0)?,
            Tensor::cat(&lse, 0)?,
        ))
    }

    /// (dh, dw) for the incoming gradient g (N) of logp, in the dtypes of h and w.
    fn backward(
        &self,
        lse: &Tensor,
        g: &Tensor,
        need: Need,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let vblocks = self.vblocks()?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        let mut dh_parts = Vec::new();
        let mut dw_acc: Vec<Option<Tensor>> = vec![None; vblocks.len()];
        for (r0, r) in self.rblocks()? {
            let hr = self.h.narrow(0, r0, r)?;
            let op = |v0| -> Result<TileGrad> {
                Ok(TileGrad {
                    targets: self.targets.narrow(0, r0, r)?.contiguous()?,
                    bias: self.score.bias.clone(),
                    lse: lse.narrow(0, r0, r)?.contiguous()?,
                    g: g.narrow(0, r0, r)?.contiguous()?,
                    v0,
                    zscale: self.score.zscale,
                })
            };
            let mut dh_r: Option<Tensor> = None;
            for (k, &(v0, vc)) in vblocks.iter().enumerate() {
                let wv = self.w.narrow(0, v0, vc)?;
                let logits = hr.matmul(&wv.t()?)?;
                // The gradient tile, computed by hand (module doc).
                let dl = logits.apply_op1_no_bwd(&op(v0)?)?; // no-grad ok
                if need.dh {
                    let d = dl.matmul(&wv)?.to_dtype(DType::F32)?;
                    dh_r = Some(match dh_r {
                        None => d,
                        Some(a) => (a + d)?,
                    });
                }
                if need.dw {
                    let d = dl.t()?.matmul(&hr)?.to_dtype(DType::F32)?;
                    dw_acc[k] = Some(match dw_acc[k].take() {
                        None => d,
                        Some(a) => (a + d)?,
                    });
                }
            }
            dh_parts.extend(dh_r);
        }
        let dh = match need.dh {
            false => None,
            true => Some(Tensor::cat(&dh_parts, 0)?.to_dtype(self.h.dtype())?),
        };
        let dw = match need.dw {
            false => None,
            true => {
                let parts: Vec<Tensor> = dw_acc.into_iter().flatten().collect();
                Some(Tensor::cat(&parts, 0)?.to_dtype(self.w.dtype())?)
            }
        };
        Ok((dh, dw))
    }
}

/// Per row of a logits tile (R, Vc) starting at vocab id v0, with z = zscale · l + bias[v0 + j]:
/// (max z, Σ exp(z − max), z[target] or 0 when the target is outside the tile,
/// Σ exp(z − max) · z). → (R·4)
pub fn tile_stats_ref(
    logits: &[f32],
    targets: &[u32],
    bias: &[f32],
    vc: usize,
    v0: usize,
    zscale: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(targets.len() * 4);
    let b = &bias[v0..v0 + vc];
    for (row, &t) in logits.chunks(vc).zip(targets) {
        let z: Vec<f32> = row.iter().zip(b).map(|(&l, &b)| zscale * l + b).collect();
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let s: f32 = z.iter().map(|&z| (z - m).exp()).sum();
        let u: f32 = z.iter().map(|&z| (z - m).exp() * z).sum();
        let t = t as usize;
        let tz = if (v0..v0 + vc).contains(&t) {
            z[t - v0]
        } else {
            0.0
        };
        out.extend([m, s, tz, u]);
    }
    out
}

/// `g[r] · zscale · (onehot − exp(z − lse[r]))` over a tile (R, Vc) starting at vocab id v0.
#[allow(clippy::too_many_arguments)]
pub fn tile_grad_ref(
    logits: &[f32],
    targets: &[u32],
    bias: &[f32],
    lse: &[f32],
    g: &[f32],
    vc: usize,
    v0: usize,
    zscale: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for (((row, &t), &z0), &gr) in logits.chunks(vc).zip(targets).zip(lse).zip(g) {
        for (j, &l) in row.iter().enumerate() {
            let z = zscale * l + bias[v0 + j];
            let y = if t as usize == v0 + j { 1.0 } else { 0.0 };
            out.push(gr * zscale * (y - (z - z0).exp()));
        }
    }
    out
}

struct TileStats {
    targets: Tensor,
    bias: Tensor,
    v0: usize,
    zscale: f32,
}

impl CustomOp1 for TileStats {
    fn name(&self) -> &'static str {
        "omr-logp-tile-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, vc) = l.shape().dims2()?;
        let t: Vec<u32> = self.targets.to_vec1()?;
        let b: Vec<f32> = self.bias.to_vec1()?;
        let out = tile_stats_ref(&host::read_f32(s, l)?, &t, &b, vc, self.v0, self.zscale);
        Ok((CpuStorage::F32(out), Shape::from((r, 4))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, Scalar};
        let (r, vc) = l.shape().dims2()?;
        let guards = [
            self.targets.storage_and_layout(),
            self.bias.storage_and_layout(),
        ];
        let out = cuda::launch_rowwise(
            s,
            l,
            &cuda::views(&guards)?,
            "linear_ce",
            "lp_tile_stats",
            (DType::F32, r * 4),
            &[
                Scalar::I32(r as i32),
                Scalar::I32(vc as i32),
                Scalar::I32(self.v0 as i32),
                Scalar::F32(self.zscale),
            ],
            cuda::tile_stats_cfg(r),
        )?;
        Ok((out, Shape::from((r, 4))))
    }
}

struct TileGrad {
    targets: Tensor,
    bias: Tensor,
    lse: Tensor,
    g: Tensor,
    v0: usize,
    zscale: f32,
}

impl CustomOp1 for TileGrad {
    fn name(&self) -> &'static str {
        "omr-logp-tile-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_r, vc) = l.shape().dims2()?;
        let out = tile_grad_ref(
            &host::read_f32(s, l)?,
            &self.targets.to_vec1::<u32>()?,
            &self.bias.to_vec1::<f32>()?,
            &self.lse.to_vec1::<f32>()?,
            &self.g.to_vec1::<f32>()?,
            vc,
            self.v0,
            self.zscale,
        );
        Ok((host::store(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, Scalar};
        let (r, vc) = l.shape().dims2()?;
        let guards = [
            self.targets.storage_and_layout(),
            self.bias.storage_and_layout(),
            self.lse.storage_and_layout(),
            self.g.storage_and_layout(),
        ];
        let out = cuda::launch_rowwise(
            s,
            l,
            &cuda::views(&guards)?,
            "linear_ce",
            "lp_tile_grad",
            (s.dtype(), r * vc),
            &[
                Scalar::I32(r as i32),
                Scalar::I32(vc as i32),
                Scalar::I32(self.v0 as i32),
                Scalar::F32(self.zscale),
            ],
            cuda::tile_grad_cfg(r, vc, s.dtype()),
        )?;
        Ok((out, l.shape().clone()))
    }
}

/// The backward: the tiles recomputed from what `saved` holds.
struct Recompute {
    saved: Saved,
    lse: Tensor,
    need: Need,
}

impl host::Backward2 for Recompute {
    fn grads(&self, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.saved.backward(&self.lse, grad, self.need)
    }
}
