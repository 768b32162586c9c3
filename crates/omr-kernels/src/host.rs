//! Host-side helpers shared by the CPU references: reading a CPU storage of any layout as f32,
//! writing f32 results back in the op's dtype (f32 or bf16, rounded once at the end), and
//! tensors ↔ f32 vectors for the backward passes.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use half::bf16;

/// The elements of `s` seen through the contiguous layout `l`, as f32 (f32, bf16, f16). The
/// public entry points make every input contiguous before applying an op.
pub(crate) fn read_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("omr-kernels: op input is not contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        other => bail!("omr-kernels: dtype {:?} is not supported", other.dtype()),
    })
}

/// f32 values stored as `dtype` (round to nearest even for bf16).
pub(crate) fn store(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        other => bail!("omr-kernels: dtype {other:?} is not supported"),
    })
}

/// Rounds an f32 to `dtype` and back (what storing an intermediate in that dtype does).
pub(crate) fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// A tensor's elements in row-major order as f32 (copied to the host).
pub(crate) fn tensor_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// A tensor of `shape` and `dtype` on `device` from f32 values.
pub(crate) fn tensor_from(
    v: Vec<f32>,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// Checks that a tensor is f32 or bf16 (the dtypes the kernels are built for).
pub(crate) fn check_float(op: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 => Ok(()),
        other => bail!("{op}: dtype {other:?} is not supported (f32 or bf16)"),
    }
}

/// An op's output computed before the op is applied (from detached inputs), which its forward
/// only hands over, once: how the ops that compute their gradients in the forward
/// (`linear_ce`) or recompute them blockwise (`gemm_attn`) attach to candle's graph.
pub(crate) struct Precomputed {
    op: &'static str,
    value: std::sync::Mutex<Option<Tensor>>,
}

impl Precomputed {
    pub(crate) fn new(op: &'static str, value: Tensor) -> Precomputed {
        Precomputed {
            op,
            value: std::sync::Mutex::new(Some(value)),
        }
    }

    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.op)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.op)))
    }

    /// The value's storage, for `cpu_fwd`.
    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let t = self.take()?;
        let (s, l) = t.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => bail!("{}: output on another device", self.op),
        }
    }

    /// The value's storage, for `cuda_fwd`.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let t = self.take()?;
        let (s, l) = t.storage_and_layout();
        Ok((crate::cuda::storage(&s)?.try_clone(l)?, l.shape().clone()))
    }
}

/// The backward of an [`Attached2`] op: the gradients of its two inputs from the incoming one.
pub(crate) trait Backward2: Send + Sync {
    fn grads(&self, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// A two-input op whose forward hands over a value computed beforehand from detached inputs
/// ([`Precomputed`]) and whose backward is `B`'s: how the fused linear cross-entropy and
/// log-probabilities attach to candle's graph.
pub(crate) struct Attached2<B> {
    pub(crate) name: &'static str,
    pub(crate) value: Precomputed,
    pub(crate) backward: B,
}

impl<B: Backward2> candle_core::CustomOp2 for Attached2<B> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.cuda()
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A parameter's gradient (the lm head's) past the GradStore's zeros + add.
        let (g1, g2) = self.backward.grads(grad)?;
        Ok((
            crate::grad_sink::route(a1, g1)?,
            crate::grad_sink::route(a2, g2)?,
        ))
    }
}

/// A tensor a forward keeps for its backward (the attention ops' row log-sum-exp).
pub(crate) struct Saved {
    op: &'static str,
    value: std::sync::Mutex<Option<Tensor>>,
}

impl Saved {
    pub(crate) fn new(op: &'static str) -> Saved {
        Saved {
            op,
            value: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn put(&self, t: Tensor) -> Result<()> {
        *self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.op)))? = Some(t);
        Ok(())
    }

    pub(crate) fn get(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.op)))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: backward before forward", self.op)))
    }
}
