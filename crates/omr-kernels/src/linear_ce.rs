//! Fused linear cross-entropy: `Σ_n −log softmax(h_n · Wᵀ)[target_n]` and its gradients dH,
//! dW without ever holding the N × V logits (Liger's fused linear cross-entropy, chunked over
//! vocabulary as well as rows).
//!
//! For each block of `rows` rows and each block of `vocab` vocabulary entries: a logits tile
//! `H_r · W_vᵀ` (candle matmul: cuBLAS on CUDA), folded into a running log-sum-exp by the tile
//! statistics kernel (max, Σexp, target logit: the online softmax); then, with the row's
//! log-sum-exp known, each tile is turned into `dL = softmax − onehot` by the tile gradient
//! kernel, and `dH_r += dL · W_v`, `dW_v += dLᵀ · H_r` (accumulated in f32). The row chunk's
//! tiles are kept from the statistics to the gradient pass when they fit
//! [`LceChunks::keep_bytes`] (2048 rows × Qwen's 151 936 entries in bf16: 594 MiB), so the op
//! runs three GEMMs of N·C·V instead of four; past that budget each tile is recomputed and the
//! peak extra memory is one rows × vocab tile. dH and dW come on top. The gradients are computed in the forward (the loss is a scalar, so the
//! backward only scales them by the incoming gradient), each only when its input is tracked:
//! a frozen lm head (LoRA, or a frozen tied embedding) skips the dW products and their
//! V × C f32 accumulator, a quarter of the op's GEMM work.
//!
//! h: (N, C) f32|bf16, w: (V, C) same dtype, targets: (N) u32 < V → scalar f32 (the sum; the
//! caller normalises, as `omr_model::loss::causal_lm_loss`). Rows are the labelled positions
//! only (the caller gathers them, as the model's loss does). Logits tiles are in the compute
//! dtype (bf16 products on CUDA), their statistics in f32.
//! Kernels: `kernels/linear_ce.cu`; CPU: [`tile_stats_ref`], [`tile_grad_ref`].

use crate::host::{self, Precomputed};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// Tile sizes: rows of H and entries of the vocabulary per logits tile, and how many bytes of
/// one row chunk's logits the loss may keep between its two passes.
#[derive(Clone, Copy, Debug)]
pub struct LceChunks {
    pub rows: usize,
    pub vocab: usize,
    /// A row chunk's logits tiles (rows × V in the compute dtype) are kept from the statistics
    /// pass to the gradient pass when they take at most this many bytes, instead of being
    /// computed again (a fourth GEMM of rows·C·V). One tile is always kept when one vocab block
    /// covers V. 0: recompute whenever there are several vocab blocks.
    pub keep_bytes: usize,
}

impl Default for LceChunks {
    /// 2048 × 32768: a 256 MiB f32 (128 MiB bf16) tile, against 1.2 GB of bf16 logits for
    /// 4096 tokens of Qwen2.5's 151 936-entry vocabulary. Keeps up to 1 GiB of a row chunk's
    /// tiles: all of Qwen's in bf16 (594 MiB), none of them in f32 (1.16 GiB).
    fn default() -> Self {
        LceChunks {
            rows: 2048,
            vocab: 32768,
            keep_bytes: 1 << 30,
        }
    }
}

impl LceChunks {
    /// Whether a row chunk of `rows` rows keeps its logits tiles over a vocabulary of `v`
    /// entries of `elem` bytes each (the gradient pass then reuses them).
    pub fn keeps_tiles(&self, rows: usize, v: usize, elem: usize) -> bool {
        v <= self.vocab || rows.saturating_mul(v).saturating_mul(elem) <= self.keep_bytes
    }
}

thread_local! {
    static TILE_PRODUCTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many logits tiles `H_r · W_vᵀ` the loss has multiplied out on this thread so far: the
/// tests' way to see the gradient pass reuse kept tiles instead of computing them again.
#[doc(hidden)]
pub fn logits_tile_products() -> u64 {
    TILE_PRODUCTS.with(|c| c.get())
}

fn logits_tile(hr: &Tensor, wv: &Tensor) -> Result<Tensor> {
    TILE_PRODUCTS.with(|c| c.set(c.get() + 1));
    hr.matmul(&wv.t()?)
}

/// Σ −log softmax(h · wᵀ)[targets] as a scalar f32 tensor, differentiable in h and w.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunks: LceChunks,
) -> Result<Tensor> {
    host::check_float("linear_cross_entropy", h.dtype())?;
    let (n, c) = h.dims2()?;
    let (_v, cw) = w.dims2()?;
    if cw != c || w.dtype() != h.dtype() || targets.dims() != [n] || targets.dtype() != DType::U32 {
        bail!(
            "linear_cross_entropy: h (N, C), w (V, C) of one dtype and targets (N) u32; got {:?} {:?}, {:?} {:?}, {:?} {:?}",
            h.dims(), h.dtype(), w.dims(), w.dtype(), targets.dims(), targets.dtype()
        )
    }
    if chunks.rows == 0 || chunks.vocab == 0 {
        bail!("linear_cross_entropy: chunk sizes must be > 0")
    }
    let need = Need {
        dh: h.track_op(),
        dw: w.track_op(),
    };
    let (loss, dh, dw) = run(
        &h.detach(),
        &w.detach(),
        &targets.contiguous()?,
        chunks,
        need,
    )?;
    if dh.is_none() && dw.is_none() {
        Ok(loss)
    } else {
        h.apply_op2(
            w,
            host::Attached2 {
                name: "omr-linear-ce",
                value: Precomputed::new("linear_cross_entropy", loss),
                backward: Scale {
                    held: std::sync::Mutex::new(Some((dh, dw))),
                },
            },
        )
    }
}

/// Which gradients the caller needs: those of the tracked inputs.
#[derive(Clone, Copy, Debug)]
struct Need {
    dh: bool,
    dw: bool,
}

/// The loss and the gradients `need` asks for, in the dtypes of h and w.
fn run(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    ch: LceChunks,
    need: Need,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let need_grad = need.dh || need.dw;
    let (n, _c) = h.dims2()?;
    let v = w.dim(0)?;
    let vblocks: Vec<(usize, usize)> = (0..v)
        .step_by(ch.vocab)
        .map(|v0| (v0, ch.vocab.min(v - v0)))
        .collect();
    let one_chunk = n <= ch.rows;
    let mut loss = Tensor::zeros((), DType::F32, h.device())?;
    let mut dh_parts = Vec::new();
    let mut dw_acc: Vec<Option<Tensor>> = vec![None; vblocks.len()];
    for r0 in (0..n).step_by(ch.rows) {
        let r = ch.rows.min(n - r0);
        let hr = h.narrow(0, r0, r)?;
        let tr = targets.narrow(0, r0, r)?.contiguous()?;
        let mut run_stats: Option<(Tensor, Tensor, Tensor)> = None;
        let keep = need_grad && ch.keeps_tiles(r, v, h.dtype().size_in_bytes());
        let mut kept: Vec<Option<Tensor>> = Vec::new();
        for &(v0, vc) in &vblocks {
            let logits = logits_tile(&hr, &w.narrow(0, v0, vc)?)?;
            // This op computes dH and dW itself; nothing backpropagates through it.
            let st = tile_stats(&logits, &tr, v0)?;
            let (mt, st_, tt) = (
                st.narrow(1, 0, 1)?.squeeze(1)?,
                st.narrow(1, 1, 1)?.squeeze(1)?,
                st.narrow(1, 2, 1)?.squeeze(1)?,
            );
            run_stats = Some(match run_stats {
                None => (mt, st_, tt),
                Some((m, s, t)) => {
                    let m1 = m.maximum(&mt)?;
                    let s1 = ((s * (m - &m1)?.exp()?)? + (st_ * (mt - &m1)?.exp()?)?)?;
                    (m1, s1, (t + tt)?)
                }
            });
            if keep {
                kept.push(Some(logits));
            }
        }
        let (m, s, t) = run_stats.expect("at least one vocab block");
        let lse = (m + s.log()?)?;
        loss = (loss + (&lse - t)?.sum_all()?)?;
        if !need_grad {
            continue;
        }
        let mut dh_r: Option<Tensor> = None;
        for (k, &(v0, vc)) in vblocks.iter().enumerate() {
            let wv = w.narrow(0, v0, vc)?;
            // Taken from the kept tiles (each freed once used), else computed again.
            let logits = match kept.get_mut(k).and_then(Option::take) {
                Some(l) => l,
                None => logits_tile(&hr, &wv)?,
            };
            // The gradient tile, computed by hand (see above).
            let dl = tile_grad(&logits, &tr, &lse, v0, 1.0)?;
            if need.dh {
                let dh_k = dl.matmul(&wv)?.to_dtype(DType::F32)?;
                dh_r = Some(match dh_r {
                    None => dh_k,
                    Some(a) => (a + dh_k)?,
                });
            }
            if need.dw {
                // In w's dtype when one row chunk covers every row (nothing to accumulate: the
                // same values as the f32 round trip, without it); summed in f32 otherwise.
                let dw_k = dl.t()?.matmul(&hr)?;
                dw_acc[k] = Some(match dw_acc[k].take() {
                    None if one_chunk => dw_k,
                    None => dw_k.to_dtype(DType::F32)?,
                    Some(a) => (a + dw_k.to_dtype(DType::F32)?)?,
                });
            }
        }
        if let Some(d) = dh_r {
            dh_parts.push(d);
        }
    }
    let dh = match need.dh {
        false => None,
        true if n == 0 => Some(h.zeros_like()?),
        true => Some(Tensor::cat(&dh_parts, 0)?.to_dtype(h.dtype())?),
    };
    let dw = match need.dw {
        false => None,
        true if n == 0 => Some(w.zeros_like()?),
        true => {
            // Each part in w's dtype, then one copy into place.
            let parts: Vec<Tensor> = dw_acc
                .into_iter()
                .map(|t| t.expect("every vocab block").to_dtype(w.dtype()))
                .collect::<Result<_>>()?;
            Some(Tensor::cat(&parts, 0)?)
        }
    };
    Ok((loss, dh, dw))
}

/// Per row of a logits tile (R, Vc) starting at vocab id v0: (max, Σ exp(l − max), l[target]
/// or 0 when the target is outside the tile) → (R, 3) f32, by the kernel on CUDA and
/// [`tile_stats_ref`] on the CPU. `targets`: (R) u32, contiguous. Not differentiable (the
/// loss computes its gradients by hand).
pub fn tile_stats(logits: &Tensor, targets: &Tensor, v0: usize) -> Result<Tensor> {
    let op = TileStats {
        targets: targets.clone(),
        v0,
    };
    logits.apply_op1_no_bwd(&op) // no-grad ok
}

/// `scale · (exp(l − lse) − onehot)` over a logits tile (R, Vc) starting at vocab id v0, in
/// the logits' dtype; `lse`: (R) f32. By the kernel on CUDA and [`tile_grad_ref`] on the CPU.
pub fn tile_grad(
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    v0: usize,
    scale: f32,
) -> Result<Tensor> {
    let op = TileGrad {
        targets: targets.clone(),
        v0,
        scale,
    };
    logits.apply_op2_no_bwd(lse, &op) // no-grad ok
}

/// Per row of a logits tile (R, Vc) starting at vocab id v0: (max, Σ exp(l − max), l[target]
/// or 0 when the target is outside the tile). → (R·3)
pub fn tile_stats_ref(logits: &[f32], targets: &[u32], vc: usize, v0: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(targets.len() * 3);
    for (row, &t) in logits.chunks(vc).zip(targets) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let s: f32 = row.iter().map(|&l| (l - m).exp()).sum();
        let t = t as usize;
        let tl = if (v0..v0 + vc).contains(&t) {
            row[t - v0]
        } else {
            0.0
        };
        out.extend([m, s, tl]);
    }
    out
}

/// `scale · (exp(l − lse) − onehot)` over a tile (R, Vc) starting at vocab id v0.
pub fn tile_grad_ref(
    logits: &[f32],
    targets: &[u32],
    lse: &[f32],
    vc: usize,
    v0: usize,
    scale: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for ((row, &t), &z) in logits.chunks(vc).zip(targets).zip(lse) {
        for (j, &l) in row.iter().enumerate() {
            let y = if t as usize == v0 + j { 1.0 } else { 0.0 };
            out.push(scale * ((l - z).exp() - y));
        }
    }
    out
}

struct TileStats {
    targets: Tensor,
    v0: usize,
}

impl CustomOp1 for TileStats {
    fn name(&self) -> &'static str {
        "omr-ce-tile-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, vc) = l.shape().dims2()?;
        let t: Vec<u32> = self.targets.to_vec1()?;
        let out = tile_stats_ref(&host::read_f32(s, l)?, &t, vc, self.v0);
        Ok((CpuStorage::F32(out), Shape::from((r, 3))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, Scalar};
        let (r, vc) = l.shape().dims2()?;
        let (ts, tl) = self.targets.storage_and_layout();
        let t = cuda::In::new(cuda::storage(&ts)?, tl)?;
        let out = cuda::launch_rowwise(
            s,
            l,
            &[t],
            "linear_ce",
            "ce_tile_stats",
            (DType::F32, r * 3),
            &[
                Scalar::I32(r as i32),
                Scalar::I32(vc as i32),
                Scalar::I32(self.v0 as i32),
            ],
            cuda::tile_stats_cfg(r),
        )?;
        Ok((out, Shape::from((r, 3))))
    }
}

struct TileGrad {
    targets: Tensor,
    v0: usize,
    scale: f32,
}

impl CustomOp2 for TileGrad {
    fn name(&self) -> &'static str {
        "omr-ce-tile-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        zs: &CpuStorage,
        zl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_r, vc) = l.shape().dims2()?;
        let t: Vec<u32> = self.targets.to_vec1()?;
        let out = tile_grad_ref(
            &host::read_f32(s, l)?,
            &t,
            &host::read_f32(zs, zl)?,
            vc,
            self.v0,
            self.scale,
        );
        Ok((host::store(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        zs: &candle_core::CudaStorage,
        zl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, In, Scalar};
        let (r, vc) = l.shape().dims2()?;
        let (ts, tl) = self.targets.storage_and_layout();
        let side = [In::new(cuda::storage(&ts)?, tl)?, In::new(zs, zl)?];
        let out = cuda::launch_rowwise(
            s,
            l,
            &side,
            "linear_ce",
            "ce_tile_grad",
            (s.dtype(), r * vc),
            &[
                Scalar::I32(r as i32),
                Scalar::I32(vc as i32),
                Scalar::I32(self.v0 as i32),
                Scalar::F32(self.scale),
            ],
            cuda::tile_grad_cfg(r, vc, s.dtype()),
        )?;
        Ok((out, l.shape().clone()))
    }
}

/// The gradients the forward computed (`None` for an input that is not tracked), handed to the
/// one backward through the op scaled by the incoming gradient of the loss: in place on CUDA
/// (`grad_accum::grad_scale_owned`), and taken, so they are freed as soon as the backward has
/// summed them instead of living as long as the graph (dW alone is V × C: 1.1 GB at the 7B
/// shape in bf16). A second backward through the same graph is an error.
struct Scale {
    held: std::sync::Mutex<Option<(Option<Tensor>, Option<Tensor>)>>,
}

impl host::Backward2 for Scale {
    fn grads(&self, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let taken = match self.held.lock() {
            Ok(mut held) => held.take(),
            Err(_) => {
                bail!("linear_cross_entropy: a backward panicked while holding its gradients")
            }
        };
        let Some((dh, dw)) = taken else {
            bail!(
                "linear_cross_entropy: its gradients went to an earlier backward of this graph; \
                 compute the loss again for another backward"
            )
        };
        let scale = |d: Option<Tensor>| {
            d.map(|d| crate::grad_accum::grad_scale_owned(d, grad))
                .transpose()
        };
        Ok((scale(dh)?, scale(dw)?))
    }
}
