//! Projections whose forward runs inside their own candle op ([`linear_op`], [`linear_op_to`],
//! [`linear_residual`]; the decoder's MLP as one op is `ops/fused_mlp.rs`): the fused
//! path's way to keep candle's graph small. Each output is written by the op itself (no copy
//! of a precomputed value), no reshape or residual add around a projection is a graph node of
//! its own, and the weights' gradients go through `omr_kernels::grad_sink::route`.

use super::attach::GradFn3;
use super::{attach_grad2, attach_grad3, linear};
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use omr_kernels::grad_sink::route;
use std::sync::Arc;

/// `x @ wᵀ (+ b)` as one op whose backward is three GEMMs (the fused kernels' path):
/// dx = g·w, dw = gᵀ·x in w's own (O, I) layout, db = 1ᵀ·g. Through candle's ops the weight
/// gradient arrives as the transpose of a (I, O) product and the bias gradient as a strided
/// reduction; each then costs a strided copy or add per step on a GPU. Gradients are computed
/// only for the arguments that track one. The forward runs inside the op (`LinearOp`):
/// candle's matmul and bias add on the op's own storages, the bits `linear` gives, written
/// straight into the op's output (an attached precomputed value would be copied in once
/// more: a device copy of every projection's output per step). x: (…, I), w: (O, I), b: (O)
/// → (…, O)
pub fn linear_op(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let i = *x.dims().last().expect("linear input has a last dimension");
    if w.dim(1)? != i {
        candle_core::bail!("linear: x (…, {i}) and w {:?} do not fit", w.dims())
    }
    let mut out = x.dims().to_vec();
    *out.last_mut().expect("non-empty") = w.dim(0)?;
    linear_op_to(x, w, b, &out)
}

/// [`linear_op`] whose input's rows are its elements taken I at a time and whose output has
/// the shape `out` (rows · O elements): a projection from attention heads (B, T, H, D) or to
/// them (B, T, H, D) without a reshape node in the graph on either side (each would take
/// a `zeros_like` + add of its size in candle's backward). The same bits as `linear_op` and a
/// reshape. x: I · rows elements, w: (O, I), b: (O) → `out`
pub fn linear_op_to(x: &Tensor, w: &Tensor, b: Option<&Tensor>, out: &[usize]) -> Result<Tensor> {
    linear_impl(x, w, b, None, out)
}

/// `r + x @ wᵀ` as one op (the residual add after o_proj and down_proj): the bits of
/// `r + linear_op_to(x, w, None, r's shape)` (the add is in the op's forward, on its
/// storages), without the projection's output as a graph node of its own (a `zeros_like` +
/// add of (B, T, C) in candle's backward, and (B, T, C) the graph keeps alive until then).
/// x: I · rows elements, w: (O, I), r: rows · O elements → r's shape
pub fn linear_residual(x: &Tensor, w: &Tensor, r: &Tensor) -> Result<Tensor> {
    linear_impl(x, w, None, Some(r), r.dims())
}

fn linear_impl(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    r: Option<&Tensor>,
    out: &[usize],
) -> Result<Tensor> {
    let x = &x.contiguous()?;
    let dims = x.dims().to_vec();
    let (o, i) = w.dims2()?;
    let rows = x.elem_count() / i.max(1);
    if i == 0
        || rows * i != x.elem_count()
        || out.iter().product::<usize>() != rows * o
        || b.is_some_and(|b| b.dims() != [o])
    {
        candle_core::bail!(
            "linear: x {dims:?}, w {:?}, b {:?} and output {out:?} do not fit",
            w.dims(),
            b.map(|b| b.dims().to_vec())
        )
    }
    let need = [x.track_op(), w.track_op(), b.is_some_and(|b| b.track_op())];
    // The backward keeps w for dx and x for dw, each only when that gradient is wanted (a
    // frozen linear keeps its input alive for nothing otherwise).
    let wd = need[0].then(|| w.detach());
    let xd = need[1].then(|| x.detach());
    let grads = move |g: &Tensor| -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g2 = g.reshape((rows, o))?;
        let dx = match &wd {
            Some(wd) => Some(g2.matmul(wd)?.reshape(dims.as_slice())?),
            None => None,
        };
        let dw = match &xd {
            Some(xd) => Some(g2.t()?.matmul(&xd.reshape((rows, i))?)?),
            None => None,
        };
        let db = match need[2] {
            true => Some(bias_grad(&g2)?),
            false => None,
        };
        Ok((dx, dw, db))
    };
    let op = LinearOp {
        gemm: Gemm {
            rows,
            i,
            o,
            out: Shape::from(out),
            residual: r.is_some(),
        },
        grad: Arc::new(grads),
    };
    if let Some(r) = r {
        if rows == 0 || o == 0 {
            return r + linear_impl(x, w, None, None, out)?;
        }
        return x.apply_op3(w, r, op);
    }
    if rows == 0 || o == 0 {
        // candle's matmul special-cases empty products; so does `linear`.
        let x2 = x.detach().reshape((rows, i))?;
        let y = linear(&x2, &w.detach(), b.map(|b| b.detach()).as_ref())?.reshape(out)?;
        let grad = op.grad.clone();
        return match b {
            Some(b) => attach_grad3([x, w, b], y, move |g| grad(g)),
            None => attach_grad2([x, w], y, move |g| {
                let (dx, dw, _) = grad(g)?;
                Ok((dx, dw))
            }),
        };
    }
    match b {
        Some(b) => x.apply_op3(w, b, op),
        None => x.apply_op2(w, op),
    }
}

/// [`linear_op`]'s op: its [`Gemm`] in the forward, its closure's gradients in the backward.
struct LinearOp {
    gemm: Gemm,
    grad: Arc<GradFn3>,
}

/// `x @ wᵀ (+ b | + r)` on storages (x contiguous, viewed as (rows, I); w read transposed
/// through its layout; b broadcast over the rows), exactly the calls `matmul_t` and
/// `broadcast_add` (or `r + y`) make: the forward of [`linear_op`]'s op and of the MLP op's
/// down projection (`ops::swiglu_mlp_residual`).
pub(super) struct Gemm {
    pub rows: usize,
    pub i: usize,
    pub o: usize,
    pub out: Shape,
    /// The third storage is a residual r (output `r + x @ wᵀ`), not a bias.
    pub residual: bool,
}

impl Gemm {
    pub fn forward<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        w: &S,
        wl: &Layout,
        b: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)> {
        if !xl.is_contiguous() {
            candle_core::bail!("linear: x must be contiguous here")
        }
        let x2 = Layout::contiguous_with_offset((self.rows, self.i), xl.start_offset());
        let wt = wl.transpose(0, 1)?;
        let y = x.matmul(w, (1, self.rows, self.o, self.i), &x2, &wt)?;
        let y = match b {
            None => y,
            // `r + y`, as candle's add of the two tensors runs it.
            Some((r, rl)) if self.residual => r.binary_impl::<candle_core::op::Add>(
                &y,
                rl,
                &Layout::contiguous(self.out.clone()),
            )?,
            Some((b, bl)) => y.binary_impl::<candle_core::op::Add>(
                b,
                &Layout::contiguous((self.rows, self.o)),
                &bl.broadcast_as((self.rows, self.o))?,
            )?,
        };
        Ok((y, self.out.clone()))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "omr-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.gemm.forward(s1, l1, s2, l2, None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.gemm.forward(s1, l1, s2, l2, None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = (self.grad)(grad_res)?;
        Ok((route(x, dx)?, route(w, dw)?))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        if self.gemm.residual {
            "omr-linear-residual"
        } else {
            "omr-linear-bias"
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.gemm.forward(s1, l1, s2, l2, Some((s3, l3)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.gemm.forward(s1, l1, s2, l2, Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = (self.grad)(grad_res)?;
        // A residual's gradient is the incoming one, as candle's add gives it.
        let db = match self.gemm.residual {
            true => b.track_op().then(|| grad_res.clone()),
            false => db,
        };
        Ok((route(x, dx)?, route(w, dw)?, route(b, db)?))
    }
}

impl crate::block::Adapter {
    /// Whether A is (r, `inp`) and B (`out`, r).
    pub(crate) fn fits(&self, out: usize, inp: usize) -> bool {
        self.a.dims().len() == 2
            && self.a.dim(1).ok() == Some(inp)
            && self.b.dims() == [out, self.a.dim(0).unwrap_or(usize::MAX)]
    }

    /// The adapter as a fused unit runs it: A and B detached, B scaled once (O × r) rather
    /// than each (…, O) output.
    pub(crate) fn prepared(&self) -> Result<crate::block::Adapter> {
        Ok(crate::block::Adapter {
            a: self.a.detach(),
            b: (self.b.detach() * self.scale)?,
            scale: self.scale,
        })
    }
}

/// A bias's gradient from its projection's output gradient g2 (rows, O): `1ᵀ·g2` as one GEMM
/// (a column sum through candle's reduction is a strided one on a GPU). → (O)
pub(crate) fn bias_grad(g2: &Tensor) -> Result<Tensor> {
    let (rows, o) = g2.dims2()?;
    Tensor::ones((1, rows), g2.dtype(), g2.device())?
        .matmul(g2)?
        .reshape(o)
}

/// A unit's projection without a graph: `x Wᵀ (+ b)` (the bits of `linear`) plus a
/// [`prepared`](crate::block::Adapter::prepared) adapter's `(x Aᵀ)(scale · B)ᵀ` (the LoRA op's
/// bits), and x Aᵀ, which the adapter's B gradient needs.
pub(crate) fn project(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    ad: Option<&crate::block::Adapter>,
) -> Result<(Tensor, Option<Tensor>)> {
    let y = linear(x, w, b)?;
    match ad {
        None => Ok((y, None)),
        Some(ad) => {
            let xa = super::matmul_t(x, &ad.a)?;
            Ok(((y + super::matmul_t(&xa, &ad.b)?)?, Some(xa)))
        }
    }
}

/// The backward through a unit's projection with output gradient g2 (rows, O), in three
/// steps a unit may interleave with others ([`Projected::gb`] first).
pub(crate) struct Projected<'a> {
    pub ad: Option<&'a crate::block::Adapter>,
}

impl Projected<'_> {
    /// g2 (scale · B) (rows, r), when there is an adapter.
    pub fn gb(&self, g2: &Tensor) -> Result<Option<Tensor>> {
        self.ad.map(|ad| g2.matmul(&ad.b)).transpose()
    }

    /// dL/d(input) (rows, I): g2 · W (+ gb · A).
    pub fn dx(&self, g2: &Tensor, w: &Tensor, gb: &Option<Tensor>) -> Result<Tensor> {
        let dx = g2.matmul(w)?;
        match (self.ad, gb) {
            (Some(ad), Some(gb)) => dx + gb.matmul(&ad.a)?,
            _ => Ok(dx),
        }
    }

    /// The adapter's (A, B) gradients where `need` asks: A = gbᵀ · x2 from the projection's
    /// input x2 (rows, I), B = scale · g2ᵀ · (x Aᵀ) (xa: rows × r elements).
    pub fn adapter_grads(
        &self,
        g2: &Tensor,
        gb: &Option<Tensor>,
        x2: Option<&Tensor>,
        xa: Option<&Tensor>,
        need: (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (Some(ad), Some(gb)) = (self.ad, gb) else {
            return Ok((None, None));
        };
        let ga = match (need.0, x2) {
            (true, Some(x2)) => Some(gb.t()?.matmul(x2)?), // (r, I)
            _ => None,
        };
        let gbw = match (need.1, xa) {
            (true, Some(h)) => {
                let h = h.reshape((g2.dim(0)?, ()))?;
                Some((g2.t()?.matmul(&h)? * ad.scale)?) // (O, r)
            }
            _ => None,
        };
        Ok((ga, gbw))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{bits, rand};
    use super::*;
    use candle_core::{DType, Var};

    /// `linear_op` computes its output inside the op: the bits of `linear` (candle's matmul +
    /// broadcast add), for 2-D and 3-D inputs, a narrowed (offset) and a transposed
    /// (non-contiguous) one, with and without bias, f32 and bf16; its gradients are candle
    /// autograd's through `linear` (to summation order) and only tracked arguments get one.
    #[test]
    fn linear_op_matches_linear() -> Result<()> {
        let base = rand(1, &[2, 9, 12])?;
        let inputs = [
            ("2-D", base.reshape((18, 12))?),
            ("3-D", base.clone()),
            ("narrowed", base.narrow(1, 2, 5)?),
            ("transposed", rand(2, &[2, 12, 9])?.transpose(1, 2)?),
        ];
        for dtype in [DType::F32, DType::BF16] {
            let w = Var::from_tensor(&rand(3, &[7, 12])?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&rand(4, &[7])?.to_dtype(dtype)?)?;
            for (name, x) in &inputs {
                let x = Var::from_tensor(&x.to_dtype(dtype)?)?;
                for bias in [None, Some(b.as_tensor())] {
                    let what = format!("{name} {dtype:?} bias {}", bias.is_some());
                    let y = linear_op(x.as_tensor(), w.as_tensor(), bias)?;
                    let y_ref = linear(x.as_tensor(), w.as_tensor(), bias)?;
                    assert_eq!(y.dims(), y_ref.dims(), "{what}");
                    let (a, r) = (y.to_dtype(DType::F32)?, y_ref.to_dtype(DType::F32)?);
                    let (a, r) = (a.flatten_all()?.to_vec1::<f32>()?, r.flatten_all()?);
                    assert_eq!(a, r.to_vec1::<f32>()?, "{what}: forward bits");
                    // A weighted sum, so each output's gradient differs.
                    let k = rand(5, y.dims())?.to_dtype(dtype)?;
                    let g = (&y * &k)?.sum_all()?.backward()?;
                    let g_ref = (&y_ref * &k)?.sum_all()?.backward()?;
                    let mut args = vec![("x", x.as_tensor()), ("w", w.as_tensor())];
                    if let Some(b) = bias {
                        args.push(("b", b));
                    }
                    for (arg, t) in args {
                        let (got, want) = (g.get(t).expect(arg), g_ref.get(t).expect(arg));
                        let d = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                            .abs()?
                            .max_all()?
                            .to_scalar::<f32>()?;
                        let tol = if dtype == DType::F32 { 1e-5 } else { 0.1 };
                        assert!(d <= tol, "{what}: d{arg} differs by {d}");
                    }
                }
            }
        }
        // Heads in and out (linear_op_to): the bits of linear_op and reshapes, gradients too.
        for dtype in [DType::F32, DType::BF16] {
            let x = Var::from_tensor(&rand(6, &[2, 3, 4, 6])?.to_dtype(dtype)?)?; // (B, T, H, D)
            let w = Var::from_tensor(&rand(7, &[8, 24])?.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&rand(8, &[8])?.to_dtype(dtype)?)?;
            let y = linear_op_to(
                x.as_tensor(),
                w.as_tensor(),
                Some(b.as_tensor()),
                &[2, 3, 2, 4],
            )?;
            let flat_x = x.as_tensor().reshape((2, 3, 24))?;
            let y_ref =
                linear_op(&flat_x, w.as_tensor(), Some(b.as_tensor()))?.reshape((2, 3, 2, 4))?;
            assert_eq!(bits(&y)?, bits(&y_ref)?, "{dtype:?}: heads in and out");
            let k = rand(9, &[2, 3, 2, 4])?.to_dtype(dtype)?;
            let g = (&y * &k)?.sum_all()?.backward()?;
            let g_ref = (&y_ref * &k)?.sum_all()?.backward()?;
            for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
                let (a, r) = (g.get(t).expect("grad"), g_ref.get(t).expect("grad"));
                assert_eq!(a.dims(), t.dims());
                assert_eq!(bits(a)?, bits(r)?, "{dtype:?}: gradient");
            }
        }
        // The residual form: r + projection, the bits of the add after linear_op_to, and the
        // same gradients for x, w and r (r tracked or not).
        for dtype in [DType::F32, DType::BF16] {
            for r_tracked in [true, false] {
                let x = Var::from_tensor(&rand(10, &[2, 3, 4, 6])?.to_dtype(dtype)?)?;
                let w = Var::from_tensor(&rand(11, &[8, 24])?.to_dtype(dtype)?)?;
                let r0 = rand(12, &[2, 3, 8])?.to_dtype(dtype)?;
                let r = match r_tracked {
                    true => Var::from_tensor(&r0)?.as_tensor().clone(),
                    false => r0,
                };
                let y = linear_residual(x.as_tensor(), w.as_tensor(), &r)?;
                let y_ref = (&r + linear_op_to(x.as_tensor(), w.as_tensor(), None, &[2, 3, 8])?)?;
                assert_eq!(y.dims(), [2, 3, 8]);
                assert_eq!(bits(&y)?, bits(&y_ref)?, "{dtype:?}: residual");
                let k = rand(13, &[2, 3, 8])?.to_dtype(dtype)?;
                let g = (&y * &k)?.sum_all()?.backward()?;
                let g_ref = (&y_ref * &k)?.sum_all()?.backward()?;
                for t in [x.as_tensor(), w.as_tensor(), &r] {
                    // (candle's add gives an untracked r a gradient nobody asks for; this op
                    // gives it none.)
                    match (g.get(t), g_ref.get(t), t.track_op()) {
                        (Some(a), Some(b), true) => assert_eq!(bits(a)?, bits(b)?, "{dtype:?}"),
                        (None, _, false) => {}
                        _ => panic!("{dtype:?}: a gradient missing or extra"),
                    }
                }
            }
        }
        assert!(linear_residual(&base, &rand(3, &[7, 12])?, &rand(4, &[2, 9, 6])?).is_err());
        assert!(linear_op_to(&base, &rand(3, &[7, 12])?, None, &[2, 9, 6]).is_err());
        assert!(linear_op_to(&base, &rand(3, &[7, 10])?, None, &[2, 9, 7]).is_err());
        // Only tracked arguments get a gradient; a frozen weight gets none.
        let x = Var::from_tensor(&base)?;
        let w = rand(3, &[7, 12])?;
        let y = linear_op(x.as_tensor(), &w, None)?;
        let g = y.sum_all()?.backward()?;
        assert!(g.get(x.as_tensor()).is_some() && g.get(&w).is_none());
        // Shapes that do not fit are an error, not a panic.
        assert!(linear_op(&base, &rand(3, &[7, 11])?, None).is_err());
        assert!(linear_op(&base, &w, Some(&rand(4, &[6])?)).is_err());
        Ok(())
    }
}
