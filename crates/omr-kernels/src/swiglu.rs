//! SwiGLU gate `silu(g) · u` as one op with a backward (the MLP of the Qwen2 decoder and of the
//! Qwen2.5-VL vision blocks). f32 arithmetic, one rounding of each output to the input dtype.
//!
//! g, u: (…, I) → y: (…, I). The backward recomputes sigmoid(g) and returns dg and du from one
//! pass ([`backward`]), and y as well when asked ([`backward_with_act`]: for callers that do
//! not keep y). CPU: [`fwd_ref`] / [`bwd_ref`]; CUDA: `kernels/swiglu.cu`.

use crate::host;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// `silu(g) · u`. g, u: same shape and dtype (f32 | bf16).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    host::check_float("swiglu", g.dtype())?;
    if g.shape() != u.shape() || g.dtype() != u.dtype() {
        bail!(
            "swiglu: g {:?} {:?} and u {:?} {:?} differ",
            g.dims(),
            g.dtype(),
            u.dims(),
            u.dtype()
        )
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Forward reference. g, u: (n) → y: (n)
pub fn fwd_ref(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect()
}

/// Backward reference: (dg, du).
pub fn bwd_ref(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = Vec::with_capacity(g.len());
    let mut du = Vec::with_capacity(g.len());
    for ((&g, &u), &d) in g.iter().zip(u).zip(dy) {
        let s = sigmoid(g);
        dg.push(d * u * s * (1.0 + g * (1.0 - s)));
        du.push(d * g * s);
    }
    (dg, du)
}

/// dg and du on any device (CPU reference or the CUDA kernel).
pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let (dg, du, _) = backward_impl(g, u, dy, false)?;
    Ok((dg, du))
}

/// [`backward`] that also returns the forward's value `silu(g) · u` (the bits [`swiglu`]
/// gives), computed in the same pass: for a caller that drops the activation after the
/// forward and needs it again in the backward (the decoder MLP's down projection, for its
/// weight gradient). On CUDA one kernel reads g, u, dy once and writes dg, du and y.
pub fn backward_with_act(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (dg, du, y) = backward_impl(g, u, dy, true)?;
    let y = y.ok_or_else(|| candle_core::Error::Msg("swiglu: no activation".into()))?;
    Ok((dg, du, y))
}

fn backward_impl(
    g: &Tensor,
    u: &Tensor,
    dy: &Tensor,
    act: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    if g.shape() != u.shape() || g.elem_count() != dy.elem_count() || g.dtype() != u.dtype() {
        bail!(
            "swiglu backward: g {:?} {:?}, u {:?} {:?} and dy {:?} differ",
            g.dims(),
            g.dtype(),
            u.dims(),
            u.dtype(),
            dy.dims()
        )
    }
    let dy = dy.to_dtype(g.dtype())?.contiguous()?;
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() {
        return cuda_bwd(g, u, &dy, act);
    }
    let (gf, uf) = (host::tensor_f32(g)?, host::tensor_f32(u)?);
    let (dg, du) = bwd_ref(&gf, &uf, &host::tensor_f32(&dy)?);
    let y = match act {
        true => Some(host::tensor_from(
            fwd_ref(&gf, &uf),
            g.shape(),
            g.dtype(),
            g.device(),
        )?),
        false => None,
    };
    Ok((
        host::tensor_from(dg, g.shape(), g.dtype(), g.device())?,
        host::tensor_from(du, u.shape(), u.dtype(), u.device())?,
        y,
    ))
}

/// The op [`swiglu`] applies; its `cpu_fwd` / `cuda_fwd` also serve callers that hold g and u
/// themselves and write `silu(g)·u` straight into their own op's output
/// (`omr_model::ops::swiglu_mlp`).
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "omr-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = fwd_ref(&host::read_f32(gs, gl)?, &host::read_f32(us, ul)?);
        Ok((host::store(y, gs.dtype())?, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{self, In, Out, PushKernelArg};
        let dev = gs.device().clone();
        let n = gl.shape().elem_count();
        let f = cuda::kernel(
            &dev,
            "swiglu",
            &format!("swiglu_fwd_{}", cuda::suffix(gs.dtype())?),
        )?;
        let (g, u) = (In::new(gs, gl)?, In::new(us, ul)?);
        let mut y = Out::alloc(&dev, gs.dtype(), n)?;
        let n_i = n as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        g.push(&mut b);
        u.push(&mut b);
        y.push(&mut b);
        b.arg(&n_i);
        cuda::run(b, cuda::cfg(cuda::vec16_blocks(n, gs.dtype()), 256, 0))?;
        Ok((y.into_storage(&dev), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = backward(g, u, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

#[cfg(feature = "cuda")]
fn cuda_bwd(
    g: &Tensor,
    u: &Tensor,
    dy: &Tensor,
    act: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    use crate::cuda::{self, In, Out, PushKernelArg};
    let dev = cuda::device_of(g)?;
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let n = g.elem_count();
    let name = if act { "swiglu_bwd_act" } else { "swiglu_bwd" };
    let f = cuda::kernel(
        &dev,
        "swiglu",
        &format!("{name}_{}", cuda::suffix(g.dtype())?),
    )?;
    let (gs, gl) = g.storage_and_layout();
    let (us, ul) = u.storage_and_layout();
    let (ds, dl) = dy.storage_and_layout();
    let (gi, ui, di) = (
        In::new(cuda::storage(&gs)?, gl)?,
        In::new(cuda::storage(&us)?, ul)?,
        In::new(cuda::storage(&ds)?, dl)?,
    );
    let mut dg = Out::alloc(&dev, g.dtype(), n)?;
    let mut du = Out::alloc(&dev, g.dtype(), n)?;
    let mut y = match act {
        true => Some(Out::alloc(&dev, g.dtype(), n)?),
        false => None,
    };
    let n_i = n as i64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    gi.push(&mut b);
    ui.push(&mut b);
    di.push(&mut b);
    dg.push(&mut b);
    du.push(&mut b);
    if let Some(y) = y.as_mut() {
        y.push(&mut b);
    }
    b.arg(&n_i);
    cuda::run(b, cuda::cfg(cuda::vec16_blocks(n, g.dtype()), 256, 0))?;
    Ok((
        dg.into_tensor(&dev, g.shape()),
        du.into_tensor(&dev, g.shape()),
        y.map(|y| y.into_tensor(&dev, g.shape())),
    ))
}
