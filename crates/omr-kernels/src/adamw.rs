//! One fused AdamW step on an fp32 master weight and its fp32 moments, writing the new
//! master, the new moments and the bf16 compute copy in one pass.
//!
//! Semantics are omr-train's optimizer (`omr_train::optim::AdamW`, itself torch's AdamW):
//! decoupled weight decay, bias corrections, the gradient scaled by `grad_coef` (accumulation
//! scale × clip coefficient) first. Every f32 operation is the optimizer's, in its order and
//! with its f32 constants, so [`adamw_ref`] (and the CUDA kernel, which uses correctly rounded
//! intrinsics and no FMA) equals the optimizer's update bit for bit (`tests/adamw.rs`).
//!
//! p, m, v: (…) f32; g: (…) f32|bf16 or `None` (a zero gradient) → [`AdamWOut`].

use crate::host;
use candle_core::{bail, DType, Result, Tensor};
use half::bf16;

/// One parameter's hyper-parameters for this step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWHyper {
    /// The learning rate of this step (peak × schedule factor).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The step number t ≥ 1 (after counting this step) of the bias corrections.
    pub step: u64,
    /// Multiplies the gradient first: accumulation scale × clip coefficient.
    pub grad_coef: f64,
}

/// The f32 constants of the update, made from f64 exactly as the optimizer's candle ops make
/// them (each `affine(mul, add)` casts its f64 arguments to f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Consts {
    pub coef: f32,
    pub b1: f32,
    pub omb1: f32,
    pub b2: f32,
    pub omb2: f32,
    pub decay: f32,
    pub inv_b2: f32,
    pub eps: f32,
    pub step: f32,
}

impl AdamWHyper {
    pub fn consts(&self) -> Consts {
        let t = self.step.min(i32::MAX as u64) as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        Consts {
            coef: self.grad_coef as f32,
            b1: self.beta1 as f32,
            omb1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            omb2: (1.0 - self.beta2) as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            inv_b2: (1.0 / bias2_sqrt) as f32,
            eps: self.eps as f32,
            step: (self.lr / bias1) as f32,
        }
    }
}

/// The new master (f32), moments (f32) and bf16 compute copy.
pub struct AdamWOut {
    pub p: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    pub p_bf16: Tensor,
}

/// One element of the update: (p', m', v'). `+ 0.0` mirrors candle's `affine(mul, 0)`.
#[inline]
pub fn update(p: f32, m: f32, v: f32, g: f32, c: &Consts) -> (f32, f32, f32) {
    let gs = g * c.coef + 0.0;
    let m1 = (m * c.b1 + 0.0) + (gs * c.omb1 + 0.0);
    let v1 = (v * c.b2 + 0.0) + ((gs * gs) * c.omb2 + 0.0);
    let pd = p * c.decay + 0.0;
    let den = v1.sqrt() * c.inv_b2 + c.eps;
    let p1 = pd - ((m1 / den) * c.step + 0.0);
    (p1, m1, v1)
}

/// Reference over whole tensors: (p', m', v'). `g = None` is a zero gradient.
pub fn adamw_ref(
    p: &[f32],
    m: &[f32],
    v: &[f32],
    g: Option<&[f32]>,
    c: &Consts,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = p.len();
    let (mut po, mut mo, mut vo) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for i in 0..n {
        // A missing gradient is the zero tensor the optimizer makes.
        let (a, b, d) = update(p[i], m[i], v[i], g.map_or(0.0, |g| g[i]), c);
        po.push(a);
        mo.push(b);
        vo.push(d);
    }
    (po, mo, vo)
}

/// One AdamW step on any device (CPU reference or the CUDA kernel).
pub fn adamw_step(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    h: &AdamWHyper,
) -> Result<AdamWOut> {
    for (name, t) in [("p", p), ("m", m), ("v", v)] {
        if t.dtype() != DType::F32 || t.shape() != p.shape() {
            bail!(
                "adamw_step: {name} must be f32 {:?}, got {:?} {:?}",
                p.dims(),
                t.dtype(),
                t.dims()
            )
        }
    }
    if let Some(g) = g {
        host::check_float("adamw_step", g.dtype())?;
        if g.shape() != p.shape() {
            bail!(
                "adamw_step: g {:?} is not p's shape {:?}",
                g.dims(),
                p.dims()
            )
        }
    }
    let c = h.consts();
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() {
        return cuda_step(p, m, v, g, &c);
    }
    let gv = g.map(host::tensor_f32).transpose()?;
    let (po, mo, vo) = adamw_ref(
        &host::tensor_f32(p)?,
        &host::tensor_f32(m)?,
        &host::tensor_f32(v)?,
        gv.as_deref(),
        &c,
    );
    let pb: Vec<bf16> = po.iter().map(|&x| bf16::from_f32(x)).collect();
    let dev = p.device();
    Ok(AdamWOut {
        p: Tensor::from_vec(po, p.shape(), dev)?,
        m: Tensor::from_vec(mo, p.shape(), dev)?,
        v: Tensor::from_vec(vo, p.shape(), dev)?,
        p_bf16: Tensor::from_vec(pb, p.shape(), dev)?,
    })
}

/// The allocating step on CUDA: copies of p, m, v and a fresh bf16 copy, updated in place by
/// the optimizer's kernel (checks and the CPU-side API; training calls the in-place step).
#[cfg(feature = "cuda")]
fn cuda_step(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    c: &Consts,
) -> Result<AdamWOut> {
    let fresh = |t: &Tensor| t.contiguous()?.copy();
    let (po, mo, vo) = (fresh(p)?, fresh(m)?, fresh(v)?);
    let pb = Tensor::zeros(p.shape(), DType::BF16, p.device())?;
    cuda_step_in_place(&po, &mo, &vo, g, c, Some(&pb))?;
    Ok(AdamWOut {
        p: po,
        m: mo,
        v: vo,
        p_bf16: pb,
    })
}

/// One AdamW step written into `p`, `m` and `v` themselves (f32, contiguous, one shape), and
/// into `copy` (bf16, p's shape) when given: the optimizer's update on a GPU, one pass over
/// memory with no new buffers. The same arithmetic as [`adamw_step`], bit for bit. CUDA only
/// (an error elsewhere: CPU tensors cannot be written in place; use [`adamw_step`]).
pub fn adamw_step_in_place(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    h: &AdamWHyper,
    copy: Option<&Tensor>,
) -> Result<()> {
    for (name, t) in [("p", p), ("m", m), ("v", v)] {
        if t.dtype() != DType::F32 || t.shape() != p.shape() || !t.is_contiguous() {
            bail!(
                "adamw_step_in_place: {name} must be contiguous f32 {:?}, got {:?} {:?}",
                p.dims(),
                t.dtype(),
                t.dims()
            )
        }
    }
    if let Some(c) = copy {
        if c.dtype() != DType::BF16 || c.shape() != p.shape() || !c.is_contiguous() {
            bail!(
                "adamw_step_in_place: the copy must be contiguous bf16 {:?}, got {:?} {:?}",
                p.dims(),
                c.dtype(),
                c.dims()
            )
        }
    }
    if let Some(g) = g {
        host::check_float("adamw_step_in_place", g.dtype())?;
        if g.shape() != p.shape() {
            bail!(
                "adamw_step_in_place: g {:?} is not p's shape {:?}",
                g.dims(),
                p.dims()
            )
        }
    }
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() {
        return cuda_step_in_place(p, m, v, g, &h.consts(), copy);
    }
    let _ = h;
    bail!(
        "adamw_step_in_place: CUDA tensors only (got {:?})",
        p.device()
    )
}

#[cfg(feature = "cuda")]
fn cuda_step_in_place(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: Option<&Tensor>,
    c: &Consts,
    copy: Option<&Tensor>,
) -> Result<()> {
    use crate::cuda::{self, In, PushKernelArg};
    let dev = cuda::device_of(p)?;
    let g = g.map(|g| g.contiguous()).transpose()?;
    let n = p.elem_count();
    // Without a gradient the kernel never reads g, without a copy it never writes one; p
    // stands in for those pointers.
    let gt = g.as_ref().unwrap_or(p);
    let ct = copy.unwrap_or(p);
    let f = cuda::kernel(
        &dev,
        "adamw",
        &format!("adamw_step_{}", cuda::suffix(gt.dtype())?),
    )?;
    let (ps, pl) = p.storage_and_layout();
    let (ms, ml) = m.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (gs, gl) = gt.storage_and_layout();
    let (cs, cl) = ct.storage_and_layout();
    // The kernel reads each element of p, m, v and then writes it back, through the same
    // pointers (stream-ordered after every reader of the old values, like any candle op).
    let (pi, mi, vi, gi, ci) = (
        In::new(cuda::storage(&ps)?, pl)?,
        In::new(cuda::storage(&ms)?, ml)?,
        In::new(cuda::storage(&vs)?, vl)?,
        In::new(cuda::storage(&gs)?, gl)?,
        In::new(cuda::storage(&cs)?, cl)?,
    );
    let has_g = g.is_some() as i32;
    let has_pb = copy.is_some() as i32;
    let n_i = n as i64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    pi.push(&mut b);
    mi.push(&mut b);
    vi.push(&mut b);
    gi.push(&mut b);
    b.arg(&has_g);
    pi.push(&mut b);
    mi.push(&mut b);
    vi.push(&mut b);
    ci.push(&mut b);
    b.arg(&has_pb);
    b.arg(&n_i)
        .arg(&c.coef)
        .arg(&c.b1)
        .arg(&c.omb1)
        .arg(&c.b2)
        .arg(&c.omb2)
        .arg(&c.decay)
        .arg(&c.inv_b2)
        .arg(&c.eps)
        .arg(&c.step);
    cuda::run(b, cuda::cfg(n.div_ceil(256).min(132 * 16), 256, 0))
}
