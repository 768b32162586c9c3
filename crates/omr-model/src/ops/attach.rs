//! Ops that attach a value computed without a graph to tracked arguments, with a backward
//! given as a closure ([`attach_grad`] and its two- and three-argument forms): a frozen
//! weight in a tracked computation without candle computing (and keeping) its gradient, the
//! block op's hand-chained backward, LoRA. The value is copied into the op's output, or its
//! last elementwise step (a sum, SwiGLU) is computed there from two tensors. Gradients of
//! leaves go through `omr_kernels::grad_sink::route`.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape,
    Tensor,
};
use omr_kernels::grad_sink::route;
use std::sync::{Arc, Mutex};

type GradFn = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;
pub(super) type GradFn3 =
    dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> + Send + Sync;

/// Returns a tensor equal to `value` whose backward sends `grad_x(dL/dvalue)` to `x` and nothing
/// anywhere else. `value` must have been computed without a graph (from `x.detach()`); it is
/// moved into the op and released once copied, so the graph keeps one copy of the output.
pub fn attach_grad(
    x: &Tensor,
    value: Tensor,
    grad_x: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    x.apply_op1(Attach1 {
        value: Value::new(value)?,
        grad: Arc::new(grad_x),
    })
}

/// [`attach_grad`] with two differentiable arguments; `grads(dL/dvalue)` returns the gradient
/// of each.
pub fn attach_grad2(
    args: [&Tensor; 2],
    value: Tensor,
    grads: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
) -> Result<Tensor> {
    args[0].apply_op2(
        args[1],
        Attach2 {
            value: Value::new(value)?,
            grad: Arc::new(grads),
        },
    )
}

/// [`attach_grad`] with three differentiable arguments (a fused frozen linear + LoRA:
/// x, lora_A, lora_B); `grads(dL/dvalue)` returns the gradient of each.
pub fn attach_grad3(
    args: [&Tensor; 3],
    value: Tensor,
    grads: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    args[0].apply_op3(
        args[1],
        args[2],
        Attach3 {
            value: Value::new(value)?,
            grad: Arc::new(grads),
        },
    )
}

/// [`attach_grad3`] of the value `a + b`, added in the op's forward (candle's add on the two
/// storages: the bits of `a.add(&b)`) straight into the op's output, instead of a sum that
/// the op would then copy: a frozen linear's output plus its LoRA adapter's.
pub fn attach_sum3(
    args: [&Tensor; 3],
    a: Tensor,
    b: Tensor,
    grads: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    check_sum(&a, &b)?;
    attach_parts3(args, Parts::Sum(a, b), grads)
}

/// [`attach_sum3`] with two arguments.
pub fn attach_sum2(
    args: [&Tensor; 2],
    a: Tensor,
    b: Tensor,
    grads: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
) -> Result<Tensor> {
    check_sum(&a, &b)?;
    args[0].apply_op2(
        args[1],
        Attach2 {
            value: Value(Mutex::new(Some(Parts::Sum(a, b)))),
            grad: Arc::new(grads),
        },
    )
}

fn check_sum(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        candle_core::bail!(
            "attach-sum: {:?} {:?} + {:?} {:?}",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        )
    }
    Ok(())
}

/// [`attach_grad3`] of the value `silu(g) · u`, computed in the op's forward by omr_kernels'
/// SwiGLU on the two storages (`ops::swiglu_mlp`).
pub(super) fn attach_swiglu3(
    args: [&Tensor; 3],
    g: Tensor,
    u: Tensor,
    grads: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    attach_parts3(args, Parts::Swiglu(g, u), grads)
}

fn attach_parts3(
    args: [&Tensor; 3],
    parts: Parts,
    grads: impl Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    args[0].apply_op3(
        args[1],
        args[2],
        Attach3 {
            value: Value(Mutex::new(Some(parts))),
            grad: Arc::new(grads),
        },
    )
}

/// What an attach op's forward writes: a precomputed tensor (copied), or the last elementwise
/// step computed in the forward from two tensors (no copy).
enum Parts {
    Ready(Tensor),
    /// `a + b`.
    Sum(Tensor, Tensor),
    /// `silu(g) · u` (omr_kernels' SwiGLU).
    Swiglu(Tensor, Tensor),
}

/// A two-input forward on one backend's storages (the SwiGLU op's).
type BinaryFwd<S> = fn(&S, &Layout, &S, &Layout) -> Result<(S, Shape)>;

/// The output's [`Parts`], handed over once to the forward.
struct Value(Mutex<Option<Parts>>);

impl Value {
    fn new(t: Tensor) -> Result<Value> {
        Ok(Value(Mutex::new(Some(Parts::Ready(t.contiguous()?)))))
    }

    fn take_parts(&self) -> Result<Parts> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("attach-grad: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach-grad: forward ran twice".into()))
    }

    /// The output from its two parts on the backend `pick` selects: `a + b` as `Tensor::add`
    /// runs it, or `silu(g)·u` by `swiglu` (the SwiGLU op's forward there); `Err(t)`: a ready
    /// tensor, for the caller to copy.
    fn compute<S: BackendStorage>(
        parts: Parts,
        pick: fn(&candle_core::Storage) -> Option<&S>,
        swiglu: BinaryFwd<S>,
    ) -> Result<std::result::Result<(S, Shape), Tensor>> {
        let (a, b, sum) = match parts {
            Parts::Ready(t) => return Ok(Err(t)),
            Parts::Sum(a, b) => (a, b, true),
            Parts::Swiglu(g, u) => (g, u, false),
        };
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (Some(x), Some(y)) = (pick(&sa), pick(&sb)) else {
            candle_core::bail!("attach-grad: the parts are not on the op's device")
        };
        Ok(Ok(match sum {
            true => (
                x.binary_impl::<candle_core::op::Add>(y, la, lb)?,
                la.shape().clone(),
            ),
            false => swiglu(x, la, y, lb)?,
        }))
    }

    fn take_cpu(&self) -> Result<(CpuStorage, Shape)> {
        fn pick(s: &candle_core::Storage) -> Option<&CpuStorage> {
            match s {
                candle_core::Storage::Cpu(c) => Some(c),
                _ => None,
            }
        }
        let swiglu = |g: &CpuStorage, gl: &Layout, u: &CpuStorage, ul: &Layout| {
            omr_kernels::swiglu::SwiGlu.cpu_fwd(g, gl, u, ul)
        };
        let t = match Value::compute(self.take_parts()?, pick, swiglu)? {
            Ok(out) => return Ok(out),
            Err(t) => t,
        };
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            candle_core::bail!("attach-grad: value is not on the CPU");
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("attach-grad: value not contiguous".into()))?;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
            other => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    other.dtype(),
                    "attach-grad",
                ))
            }
        };
        Ok((out, layout.shape().clone()))
    }

    /// A device copy of the value's elements (its storage may be a larger buffer, as a
    /// narrowed view's is; the op's output must start at offset 0 and hold just these).
    #[cfg(feature = "cuda")]
    fn take_cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda::{
            cudarc::driver::CudaSlice, CudaStorage, CudaStorageSlice, WrapErr,
        };
        fn pick(s: &candle_core::Storage) -> Option<&CudaStorage> {
            match s {
                candle_core::Storage::Cuda(c) => Some(c),
                _ => None,
            }
        }
        let swiglu = |g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout| {
            omr_kernels::swiglu::SwiGlu.cuda_fwd(g, gl, u, ul)
        };
        let t = match Value::compute(self.take_parts()?, pick, swiglu)? {
            Ok(out) => return Ok(out),
            Err(t) => t,
        };
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            candle_core::bail!("attach-grad: value is not on a CUDA device");
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("attach-grad: value not contiguous".into()))?;
        fn copy<T: candle_core::cuda::CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr>(
            v: &CudaSlice<T>,
            range: std::ops::Range<usize>,
            dev: &candle_core::CudaDevice,
        ) -> Result<CudaStorage> {
            let c = dev.cuda_stream().clone_dtod(&v.slice(range)).w()?;
            Ok(CudaStorage::wrap_cuda_slice(c, dev.clone()))
        }
        let (dev, range) = (s.device(), start..end);
        let out = match &s.slice {
            CudaStorageSlice::F32(v) => copy(v, range, dev)?,
            CudaStorageSlice::F64(v) => copy(v, range, dev)?,
            CudaStorageSlice::BF16(v) => copy(v, range, dev)?,
            CudaStorageSlice::F16(v) => copy(v, range, dev)?,
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    s.dtype(),
                    "attach-grad",
                ))
            }
        };
        Ok((out, layout.shape().clone()))
    }
}

struct Attach1 {
    value: Value,
    grad: Arc<GradFn>,
}

impl CustomOp1 for Attach1 {
    fn name(&self) -> &'static str {
        "attach-grad"
    }
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.take_cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.take_cuda()
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        route(x, Some((self.grad)(grad_res)?))
    }
}

type GradFn2 = dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync;

struct Attach2 {
    value: Value,
    grad: Arc<GradFn2>,
}

impl CustomOp2 for Attach2 {
    fn name(&self) -> &'static str {
        "attach-grad2"
    }
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.take_cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.take_cuda()
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g1, g2) = (self.grad)(grad_res)?;
        Ok((route(a1, g1)?, route(a2, g2)?))
    }
}

struct Attach3 {
    value: Value,
    grad: Arc<GradFn3>,
}

impl CustomOp3 for Attach3 {
    fn name(&self) -> &'static str {
        "attach-grad3"
    }
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.take_cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        _s3: &candle_core::CudaStorage,
        _l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.take_cuda()
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g1, g2, g3) = (self.grad)(grad_res)?;
        Ok((route(a1, g1)?, route(a2, g2)?, route(a3, g3)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// `attach_sum3` gives the bits of `a.add(&b)` (a strided b included) and sends the
    /// closure's gradients to its three arguments; parts that do not fit are an error.
    #[test]
    fn attach_sum_is_candles_add() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let a = Tensor::arange(0f32, 24., &dev)?
                .affine(0.37, -3.1)?
                .reshape((2, 3, 4))?
                .to_dtype(dtype)?;
            let b = Tensor::arange(0f32, 24., &dev)?
                .affine(-0.11, 0.9)?
                .reshape((2, 4, 3))?
                .transpose(1, 2)?
                .to_dtype(dtype)?;
            let x = Var::from_tensor(&a)?;
            let (p, q) = (Var::new(&[1f32, 2.], &dev)?, Var::new(&[3f32], &dev)?);
            let (pq, qq) = (p.as_tensor().clone(), q.as_tensor().clone());
            let y = attach_sum3(
                [x.as_tensor(), p.as_tensor(), q.as_tensor()],
                a.clone(),
                b.clone(),
                move |g| {
                    Ok((
                        Some(g.clone()),
                        Some(pq.ones_like()?),
                        Some(qq.ones_like()?),
                    ))
                },
            )?;
            let want = a.add(&b)?;
            let bits = |t: &Tensor| -> Result<Vec<f32>> {
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
            };
            assert_eq!(bits(&y)?, bits(&want)?, "{dtype:?}");
            let g = y.sum_all()?.backward()?;
            assert!(g.get(x.as_tensor()).is_some() && g.get(p.as_tensor()).is_some());
            assert!(g.get(q.as_tensor()).is_some());
        }
        let a = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let x = Var::from_tensor(&a)?;
        let none = |_: &Tensor| Ok((None, None, None));
        let args = [x.as_tensor(), x.as_tensor(), x.as_tensor()];
        assert!(attach_sum3(args, a.clone(), a.t()?, none).is_err());
        Ok(())
    }
}
