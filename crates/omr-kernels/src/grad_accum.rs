//! Gradient accumulation over micro-batches (`kernels/grad_accum.cu`): the running sum of a
//! parameter's gradients in f32. [`grad_sum`] makes a new sum from two tensors (the second
//! micro-batch: the first one's gradient is kept as it came, bf16 on a compute copy);
//! [`grad_add_in_place`] adds a gradient into an f32 sum where it is (every later micro-batch,
//! CUDA only). Both are `f32(a) + f32(b)`, exactly candle's `a.to_dtype(F32)? + b.to_dtype(F32)?`
//! (exact casts, one correctly rounded f32 addition), so the optimizer's candle-op path and
//! this one give the same bits on any device. [`grad_scale_owned`] scales a gradient by a
//! scalar on the device, in place on CUDA (the fused linear cross-entropy's backward).

use crate::host;
use candle_core::{bail, DType, Result, Tensor};

/// The reference: element by element `a + b` in f32.
pub fn sum_ref(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| x + y).collect()
}

fn check(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    host::check_float(op, a.dtype())?;
    host::check_float(op, b.dtype())?;
    if a.shape() != b.shape() {
        bail!("{op}: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    if !a.device().same_device(b.device()) {
        bail!("{op}: the two tensors are on different devices")
    }
    Ok(())
}

/// A new f32 tensor `f32(a) + f32(b)` (a, b: f32 or bf16, one shape) on their device.
pub fn grad_sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check("grad_sum", a, b)?;
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() && a.elem_count() > 0 {
        let dev = crate::cuda::device_of(a)?;
        let out = crate::cuda::Out::alloc(&dev, DType::F32, a.elem_count())?;
        let out = out.into_tensor(&dev, a.shape());
        cuda_sum(&a.contiguous()?, &b.contiguous()?, Some(&out))?;
        return Ok(out);
    }
    let v = sum_ref(&host::tensor_f32(a)?, &host::tensor_f32(b)?);
    Tensor::from_vec(v, a.shape(), a.device())
}

/// `sum += f32(g)` where `sum` is (contiguous f32, g's shape; g f32 or bf16): one pass, no
/// new buffer. CUDA only (CPU tensors cannot be written in place; use [`grad_sum`]). The
/// caller must own `sum`: any other tensor sharing its storage sees the change.
pub fn grad_add_in_place(sum: &Tensor, g: &Tensor) -> Result<()> {
    check("grad_add_in_place", sum, g)?;
    if sum.dtype() != DType::F32 || !sum.is_contiguous() {
        bail!(
            "grad_add_in_place: the sum must be contiguous f32, got {:?}",
            sum.dtype()
        )
    }
    #[cfg(feature = "cuda")]
    if sum.device().is_cuda() {
        if sum.elem_count() == 0 {
            return Ok(());
        }
        return cuda_sum(sum, &g.contiguous()?, None);
    }
    bail!(
        "grad_add_in_place: CUDA tensors only (got {:?})",
        sum.device()
    )
}

/// `g · s` for a one-element f32 `s` (a loss's incoming gradient), `s` rounded to g's dtype
/// first: candle's `g.broadcast_mul(&s.to_dtype(g.dtype()))` bit for bit. On CUDA a contiguous
/// `g` is scaled where it is (`grad_scale_*` in `kernels/grad_accum.cu`: no new buffer, and
/// `s` stays on the device) and handed back, so the caller must own it: any other tensor
/// sharing its storage sees the change. Elsewhere, and for other inputs, candle's product.
pub fn grad_scale_owned(g: Tensor, s: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if g.device().is_cuda()
        && g.is_contiguous()
        && matches!(g.dtype(), DType::F32 | DType::BF16)
        && s.dtype() == DType::F32
        && s.elem_count() == 1
        && s.device().same_device(g.device())
    {
        if g.elem_count() > 0 {
            cuda_scale(&g, &s.contiguous()?)?;
        }
        return Ok(g);
    }
    g.broadcast_mul(&s.to_dtype(g.dtype())?)
}

/// `g *= T(s[0])` on the device, in place (g contiguous f32|bf16, s one f32).
#[cfg(feature = "cuda")]
fn cuda_scale(g: &Tensor, s: &Tensor) -> Result<()> {
    use crate::cuda::{self, In, PushKernelArg};
    let dev = cuda::device_of(g)?;
    let n = g.elem_count();
    let f = cuda::kernel(
        &dev,
        "grad_accum",
        &format!("grad_scale_{}", cuda::suffix(g.dtype())?),
    )?;
    let (gs, gl) = g.storage_and_layout();
    let (ss, sl) = s.storage_and_layout();
    let gi = In::new(cuda::storage(&gs)?, gl)?;
    let si = In::new(cuda::storage(&ss)?, sl)?;
    let n_i = n as i64;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    // Written through the input's pointer: stream-ordered after every earlier reader, like any
    // candle op.
    gi.push(&mut l);
    si.push(&mut l);
    l.arg(&n_i);
    cuda::run(l, cuda::cfg(cuda::vec16_blocks(n, g.dtype()), 256, 0))
}

/// `out = f32(a) + f32(b)` on the device (`out`: contiguous f32; `None`: into `a` itself).
#[cfg(feature = "cuda")]
fn cuda_sum(a: &Tensor, b: &Tensor, out: Option<&Tensor>) -> Result<()> {
    use crate::cuda::{self, In, PushKernelArg};
    let dev = cuda::device_of(a)?;
    let n = a.elem_count();
    let f = cuda::kernel(
        &dev,
        "grad_accum",
        &format!(
            "grad_sum_{}_{}",
            cuda::suffix(a.dtype())?,
            cuda::suffix(b.dtype())?
        ),
    )?;
    let (as_, al) = a.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let og = out.map(|o| o.storage_and_layout());
    let ai = In::new(cuda::storage(&as_)?, al)?;
    let bi = In::new(cuda::storage(&bs)?, bl)?;
    let oi = match &og {
        Some((os, ol)) => Some(In::new(cuda::storage(os)?, ol)?),
        None => None,
    };
    let n_i = n as i64;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    ai.push(&mut l);
    bi.push(&mut l);
    // In place (no `out`): the kernel reads each element of `a`, then writes it, through the
    // same pointer (stream-ordered after every earlier reader, like any candle op).
    oi.as_ref().unwrap_or(&ai).push(&mut l);
    l.arg(&n_i);
    cuda::run(l, cuda::cfg(n.div_ceil(256).min(132 * 16), 256, 0))
}
