//! The global L2 norm of many gradients (torch's `clip_grad_norm_` total norm): squares
//! summed in f64, per tensor in element order and then over tensors in the order given, as
//! omr-train's optimizer computes it, so the CPU reference gives the same bits.
//!
//! grads: tensors of any shapes, all f32 or all bf16, on one device → a scalar f64 tensor on
//! that device. CUDA (`kernels/grad_norm.cu`): two launches for any number of tensors (a table
//! of device addresses, one block per 64 Ki-element chunk, then one block over the partials);
//! deterministic, equal to the CPU reference within the reordering of f64 additions.

use crate::host;
use candle_core::{bail, Device, Result, Tensor};

/// Elements per block of the CUDA kernel.
pub const CHUNK: usize = 1 << 16;

/// sqrt(Σ over tensors Σ x²) as a scalar f64 tensor on the tensors' device (0 for none).
pub fn global_grad_norm(grads: &[Tensor]) -> Result<Tensor> {
    let Some(first) = grads.first() else {
        return Tensor::new(0f64, &Device::Cpu);
    };
    for g in grads {
        if g.dtype() != first.dtype() || !g.device().same_device(first.device()) {
            bail!("global_grad_norm: every gradient must have one dtype and device")
        }
    }
    host::check_float("global_grad_norm", first.dtype())?;
    #[cfg(feature = "cuda")]
    if first.device().is_cuda() {
        return cuda_norm(grads);
    }
    let mut parts = Vec::with_capacity(grads.len());
    for g in grads {
        parts.push(host::tensor_f32(g)?);
    }
    Tensor::new(norm_ref(&parts), first.device())
}

/// The reference: f64 squares summed per tensor in order, then over tensors in order.
pub fn norm_ref(grads: &[Vec<f32>]) -> f64 {
    let mut total = 0f64;
    for g in grads {
        let mut s = 0f64;
        for &x in g {
            let x = x as f64;
            s += x * x;
        }
        total += s;
    }
    total.sqrt()
}

#[cfg(feature = "cuda")]
fn cuda_norm(grads: &[Tensor]) -> Result<Tensor> {
    use crate::cuda::{self, In};
    use candle_core::cuda::cudarc::driver::{DevicePtr, PushKernelArg};
    let dev = cuda::device_of(&grads[0])?;
    let stream = dev.cuda_stream();
    let grads: Vec<Tensor> = grads
        .iter()
        .map(|g| g.contiguous())
        .collect::<Result<_>>()?;
    let guards: Vec<_> = grads.iter().map(|g| g.storage_and_layout()).collect();
    let views = cuda::views(&guards)?;
    let mut ptrs = Vec::with_capacity(views.len());
    let mut syncs = Vec::with_capacity(views.len());
    for v in &views {
        let (p, sync) = match v {
            In::F32(v) => v.device_ptr(&stream),
            In::Bf16(v) => v.device_ptr(&stream),
            In::U32(_) => bail!("global_grad_norm: u32 gradient"),
        };
        ptrs.push(p as u64);
        syncs.push(sync);
    }
    let sizes: Vec<i64> = grads.iter().map(|g| g.elem_count() as i64).collect();
    let mut starts = Vec::with_capacity(grads.len() + 1);
    let mut total = 0usize;
    for g in &grads {
        starts.push(total as i32);
        total += g.elem_count().div_ceil(CHUNK);
    }
    if total == 0 {
        return Tensor::new(0f64, grads[0].device());
    }
    let ptrs_d = dev.clone_htod(&ptrs)?;
    let sizes_d = dev.clone_htod(&sizes)?;
    let starts_d = dev.clone_htod(&starts)?;
    let mut part = dev.alloc_zeros::<f64>(total)?;
    let f = cuda::kernel(
        &dev,
        "grad_norm",
        &format!("sumsq_chunks_{}", cuda::suffix(grads[0].dtype())?),
    )?;
    let (n_t, chunk) = (grads.len() as i32, CHUNK as i64);
    let mut b = stream.launch_builder(&f);
    b.arg(&ptrs_d)
        .arg(&sizes_d)
        .arg(&starts_d)
        .arg(&n_t)
        .arg(&chunk)
        .arg(&mut part);
    cuda::run(b, cuda::cfg(total, 256, 0))?;
    drop(syncs);
    let mut out = dev.alloc_zeros::<f64>(1)?;
    let fin = cuda::kernel(&dev, "grad_norm", "sumsq_finish")?;
    let n_p = total as i32;
    let mut b = stream.launch_builder(&fin);
    b.arg(&part).arg(&n_p).arg(&mut out);
    cuda::run(b, cuda::cfg(1, 1024, 0))?;
    Ok(Tensor::from_storage(
        candle_core::Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())),
        (),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}
