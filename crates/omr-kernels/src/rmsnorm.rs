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
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        x.push(&mut b);
        w.push(&mut b);
        y.push(&mut b);
        b.arg(&rows_i).arg(&c_i).arg(&inv_c).arg(&eps);
        cuda::run(b, cuda::cfg(rows.min(65535), 256, 0))?;
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

/// Rows are spread over at most this many blocks; dw is reduced from that many partial rows.
#[cfg(feature = "cuda")]
const BWD_BLOCKS: usize = 264;

#[cfg(feature = "cuda")]
fn cuda_bwd(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    use crate::cuda::{self, In, Out, PushKernelArg};
    let dev = cuda::device_of(x)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let c = w.elem_count();
    let rows = x.elem_count() / c.max(1);
    let blocks = rows.clamp(1, BWD_BLOCKS);
    if c * 4 > 48 * 1024 {
        bail!("rmsnorm (cuda): C = {c} needs more than 48 KiB of shared memory")
    }
    let f = cuda::kernel(
        &dev,
        "rmsnorm",
        &format!("rmsnorm_bwd_{}", cuda::suffix(x.dtype())?),
    )?;
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
    cuda::run(b, cuda::cfg(blocks, 256, (c * 4) as u32))?;
    let dw = part
        .into_tensor(&dev, (blocks, c))
        .sum(0)?
        .to_dtype(w.dtype())?;
    Ok((dx.into_tensor(&dev, x.shape()), dw))
}
