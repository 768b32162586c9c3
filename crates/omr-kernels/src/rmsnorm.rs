//! RMSNorm (Qwen2RMSNorm) as one op with a backward: `y = round(x · r) · w` with
//! `r = 1 / sqrt(mean(x²) + eps)`, computed in f32 whatever the input dtype and rounded to it
//! before the weight, as `omr_model::ops::rmsnorm` (and transformers) do.
//!
//! x: (…, C), w: (C) → y: (…, C). The backward recomputes r from x (nothing is saved but the
//! inputs) and returns dx and dw; dw is summed over rows in f32 (per-block partials on CUDA,
//! then one reduction: deterministic). CPU: [`fwd_ref`] / [`bwd_ref`]; CUDA: `kernels/rmsnorm.cu`.

use crate::host::{self, round_to};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// RMSNorm over the last dimension. x: (…, C) f32|bf16, w: (C) same dtype.
pub fn rmsnorm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    host::check_float("rmsnorm", x.dtype())?;
    if w.dtype() != x.dtype() || w.dims() != [x.dim(candle_core::D::Minus1)?] {
        bail!(
            "rmsnorm: w must be ({}) {:?}, got {:?} {:?}",
            x.dim(candle_core::D::Minus1)?,
            x.dtype(),
            w.dims(),
            w.dtype()
        )
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

/// `1 / sqrt(Σx² · (1/C) + eps)`: the mean as candle's `mean_keepdim` takes it (times 1/C).
fn rstd(ss: f32, c: usize, eps: f64) -> f32 {
    1.0 / (ss * (1.0 / c as f64) as f32 + eps as f32).sqrt()
}

/// Forward reference on f32 values; `dtype` says where to round (bf16: like the model does).
/// x: (R·C), w: (C) → y: (R·C)
pub fn fwd_ref(x: &[f32], w: &[f32], eps: f64, dtype: DType) -> Vec<f32> {
    let c = w.len();
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(c) {
        let r = rstd(row.iter().map(|v| v * v).sum(), c, eps);
        y.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &wi)| round_to(round_to(v * r, dtype) * wi, dtype)),
        );
    }
    y
}

/// Backward reference: (dx (R·C), dw (C)) from x, w, dy, all f32 (dx and dw not yet rounded).
pub fn bwd_ref(x: &[f32], w: &[f32], dy: &[f32], eps: f64, dtype: DType) -> (Vec<f32>, Vec<f32>) {
    let c = w.len();
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![0f32; c];
    for (row, g) in x.chunks(c).zip(dy.chunks(c)) {
        let r = rstd(row.iter().map(|v| v * v).sum(), c, eps);
        let dot: f32 = row
            .iter()
            .zip(g)
            .zip(w)
            .map(|((&v, &gi), &wi)| gi * wi * v)
            .sum();
        let m = dot * r / c as f32;
        for i in 0..c {
            let n = row[i] * r;
            dx.push(r * (g[i] * w[i] - n * m));
            dw[i] += g[i] * round_to(n, dtype);
        }
    }
    (dx, dw)
}

/// dx and dw for x, w, dy on any device (CPU reference or the CUDA kernel).
pub fn backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let dy = dy.to_dtype(x.dtype())?.contiguous()?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda_bwd(x, w, &dy, eps);
    }
    let (dx, dw) = bwd_ref(
        &host::tensor_f32(x)?,
        &host::tensor_f32(w)?,
        &host::tensor_f32(&dy)?,
        eps,
        x.dtype(),
    );
    Ok((
        host::tensor_from(dx, x.shape(), x.dtype(), x.device())?,
        host::tensor_from(dw, w.shape(), w.dtype(), w.device())?,
    ))
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "omr-rmsnorm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = fwd_ref(
            &host::read_f32(xs, xl)?,
            &host::read_f32(ws, wl)?,
            self.eps,
            xs.dtype(),
        );
        Ok((host::store(y, xs.dtype())?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, In, Out, PushKernelArg};
        let dev = xs.device().clone();
        let c = wl.shape().elem_count();
        let rows = xl.shape().elem_count() / c.max(1);
        let f = cuda::kernel(
            &dev,
            "rmsnorm",
            &format!("rmsnorm_fwd_{}", cuda::suffix(xs.dtype())?),
        )?;
        let (x, w) = (In::new(xs, xl)?, In::new(ws, wl)?);
        let mut y = Out::alloc(&dev, xs.dtype(), rows * c)?;
        let (rows_i, c_i) = (rows as i32, c as i32);
        let (inv_c, eps) = ((1.0 / c as f64) as f32, self.eps as f32);
        // Small blocks (one group of 128 threads for C = 3584 bf16: 8 rows in flight per
        // multiprocessor), one per row group; the kernel strides over rows beyond the grid.
        let (tpr, groups) = row_layout(c, FWD_VEC * (16 / xs.dtype().size_in_bytes()), 128);
        let blocks = rows.div_ceil(groups).clamp(1, 1 << 20);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        x.push(&mut b);
        w.push(&mut b);
        y.push(&mut b);
        b.arg(&rows_i).arg(&c_i).arg(&inv_c).arg(&eps);
        cuda::run(b, row_cfg(blocks, tpr, groups))?;
        Ok((y.into_storage(&dev), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = backward(x, w, dy, self.eps)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// 16-byte accesses per thread and row that the forward holds in registers (rmsnorm.cu's
/// kFwdVec): 32 bf16 / 16 f32 columns per thread; a longer row's others are streamed.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const FWD_VEC: usize = 4;

/// Columns per thread of the backward, which must cover the row: rmsnorm.cu's kBwdVec = 3
/// 16-byte accesses of 8 bf16 / 4 f32, so C ≤ 1024 × this.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn bwd_cols_per_thread(dtype: DType) -> usize {
    3 * (16 / dtype.size_in_bytes())
}

/// Row groups per backward block for `tpr` threads per row: up to 512 threads, and while
/// the groups' dw accumulators (C f32 each, in dynamic shared memory beside one copy of w)
/// stay within 48 KiB.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn bwd_groups(c: usize, tpr: usize) -> usize {
    (512 / tpr).min(12 * 1024 / c.max(1)).max(1)
}

/// Block shape of the row kernels for rows of `c` columns, `per_thread` columns per thread:
/// (threads per row, a multiple of 32 that covers the row, at most 1024; rows per block, as
/// many as fit in `block` threads). Few threads per row and many rows in flight per
/// multiprocessor keep enough bytes moving; a row's sums need one barrier.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn row_layout(c: usize, per_thread: usize, block: usize) -> (usize, usize) {
    let tpr = c.div_ceil(per_thread).next_multiple_of(32).clamp(32, 1024);
    (tpr, (block / tpr).max(1))
}

#[cfg(feature = "cuda")]
fn row_cfg(blocks: usize, tpr: usize, groups: usize) -> crate::cuda::LaunchConfig {
    crate::cuda::LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (tpr as u32, groups as u32, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(feature = "cuda")]
fn cuda_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    use crate::cuda::{self, In, Out, PushKernelArg};
    let dev = cuda::device_of(x)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let c = w.elem_count();
    let rows = x.elem_count() / c.max(1);
    let per_thread = bwd_cols_per_thread(x.dtype());
    if c.div_ceil(per_thread) > 1024 {
        bail!("rmsnorm (cuda): C = {c} is more than the backward's 1024 × {per_thread} columns")
    }
    let (tpr, _) = row_layout(c, per_thread, 0);
    let groups = bwd_groups(c, tpr);
    // The groups' dw accumulators (f32), then one copy of w.
    let smem = groups * c * 4 + c * x.dtype().size_in_bytes();
    let sfx = cuda::suffix(x.dtype())?;
    let f = cuda::kernel(&dev, "rmsnorm", &format!("rmsnorm_bwd_{sfx}"))?;
    if smem > 47 * 1024 {
        // Beyond the default 48 KiB per block (less the kernel's 1 KiB of static shared memory).
        cuda::allow_dynamic_smem(&f, smem as u32)?;
    }
    // One wave of blocks, all resident at once: as many rows in flight as the multiprocessors
    // hold, and few partial rows of dw (one per block) to sum afterwards.
    let resident = cuda::resident_blocks(&dev, &f, (tpr * groups) as u32, smem)?;
    let blocks = resident.min(rows.div_ceil(groups)).max(1);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let (xi, wi, gi) = (
        In::new(cuda::storage(&xs)?, xl)?,
        In::new(cuda::storage(&ws)?, wl)?,
        In::new(cuda::storage(&gs)?, gl)?,
    );
    let mut dx = Out::alloc(&dev, x.dtype(), rows * c)?;
    let mut part = Out::alloc(&dev, DType::F32, blocks * c)?;
    let (rows_i, c_i) = (rows as i32, c as i32);
    let (inv_c, eps) = ((1.0 / c as f64) as f32, eps as f32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    xi.push(&mut b);
    wi.push(&mut b);
    gi.push(&mut b);
    dx.push(&mut b);
    part.push(&mut b);
    b.arg(&rows_i).arg(&c_i).arg(&inv_c).arg(&eps);
    let mut cfg = row_cfg(blocks, tpr, groups);
    cfg.shared_mem_bytes = smem as u32;
    cuda::run(b, cfg)?;
    // dw: the partial rows summed in a fixed order, written in w's dtype.
    let f = cuda::kernel(&dev, "rmsnorm", &format!("rmsnorm_dw_{sfx}"))?;
    let mut dw = Out::alloc(&dev, w.dtype(), c)?;
    let p_i = blocks as i32;
    let mut b = stream.launch_builder(&f);
    part.push(&mut b);
    dw.push(&mut b);
    b.arg(&p_i).arg(&c_i);
    let cfg = cuda::LaunchConfig {
        grid_dim: (c.div_ceil(32).max(1) as u32, 1, 1),
        block_dim: (32, 32, 1),
        shared_mem_bytes: 0,
    };
    cuda::run(b, cfg)?;
    Ok((
        dx.into_tensor(&dev, x.shape()),
        dw.into_tensor(&dev, w.shape()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The launch shapes the H200 measurements were taken with, and rows always covered.
    #[test]
    fn launch_shapes() {
        // Forward, C = 3584 bf16: 448 accesses of 16 bytes over 128 threads (4 held each).
        assert_eq!(row_layout(3584, FWD_VEC * 8, 128), (128, 1));
        // f32: 896 accesses over 224 threads.
        assert_eq!(row_layout(3584, FWD_VEC * 4, 128), (224, 1));
        // Short rows: one warp per row, several rows per block.
        assert_eq!(row_layout(96, FWD_VEC * 8, 128), (32, 4));
        // Long rows: at most 1024 threads (the forward streams what registers don't hold).
        assert_eq!(row_layout(100_000, FWD_VEC * 8, 128), (1024, 1));
        // Backward, C = 3584 bf16: 160 threads of 3 accesses, 3 rows per block.
        let per = bwd_cols_per_thread(DType::BF16);
        assert_eq!(per, 24);
        let (tpr, _) = row_layout(3584, per, 0);
        assert_eq!((tpr, bwd_groups(3584, tpr)), (160, 3));
        assert_eq!(bwd_cols_per_thread(DType::F32), 12);
        for dtype in [DType::F32, DType::BF16] {
            let per = bwd_cols_per_thread(dtype);
            for c in [1, 7, 96, 1280, 3584, 3585, 8192, 12_288] {
                let (tpr, _) = row_layout(c, per, 0);
                let g = bwd_groups(c, tpr);
                assert!(tpr * per >= c && tpr % 32 == 0 && tpr * g <= 1024, "{c}");
                assert!(g * c * 4 <= 48 * 1024 || g == 1, "{c}");
            }
        }
    }
}
