//! The decoder's gated MLP as one autograd unit on the fused path: [`swiglu_mlp`] (gate, up
//! and SwiGLU) and [`swiglu_mlp_residual`] (the whole MLP with its down projection and the
//! residual add). Their intermediates are kept inside the op, not as candle graph nodes
//! (each of those gets a `zeros_like` + add in candle's backward), and the weights'
//! gradients go through `omr_kernels::grad_sink::route`.

use super::attach::{attach_grad3, attach_swiglu3};
use super::fused_linear::{linear_residual, Gemm};
use super::{matmul_nt, matmul_t};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use omr_kernels::grad_sink::route;
use std::sync::{Arc, Mutex};

/// The gated MLP up to its down projection, `silu(x·Wgᵀ) · (x·Wuᵀ)`, as one op over
/// (x, Wg, Wu) (the fused path's decoder MLP; projections without bias). Through
/// `linear_op` ×2 + SwiGLU, the gate's and the up projection's outputs were graph nodes of
/// their own: each (…, I), the widest activations of the layer, got a `zeros_like` + add in
/// candle's backward. Here they are kept inside the op; the output is computed in its forward
/// by the SwiGLU kernel from them (no copy), and the backward is SwiGLU's, then the four
/// GEMMs: dx = dg·Wg + du·Wu, dWg = dgᵀ·x, dWu = duᵀ·x (weights' gradients through
/// [`route`]). The same values and gradients, bit for bit, as the three ops.
/// x: (…, C), wg, wu: (I, C) → (…, I)
pub fn swiglu_mlp(x: &Tensor, wg: &Tensor, wu: &Tensor) -> Result<Tensor> {
    let x = &x.contiguous()?;
    let dims = x.dims().to_vec();
    let c = *dims.last().expect("mlp input has a last dimension");
    let rows = x.elem_count() / c.max(1);
    if wg.dims2()? != wu.dims2()? || wg.dim(1)? != c {
        candle_core::bail!(
            "swiglu_mlp: x (…, {c}), gate {:?} and up {:?} do not fit",
            wg.dims(),
            wu.dims()
        )
    }
    let i = wg.dim(0)?;
    let (xd, wgd, wud) = (x.detach(), wg.detach(), wu.detach());
    let g = matmul_t(&xd, &wgd)?;
    let u = matmul_t(&xd, &wud)?;
    let need = [x.track_op(), wg.track_op(), wu.track_op()];
    if !need.iter().any(|&n| n) {
        return omr_kernels::swiglu(&g, &u);
    }
    let (gk, uk) = (g.clone(), u.clone());
    let ws = need[0].then(|| (wgd.clone(), wud.clone()));
    let xk = (need[1] || need[2])
        .then(|| xd.reshape((rows, c)))
        .transpose()?;
    let grads = move |dy: &Tensor| -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = omr_kernels::swiglu::backward(&gk, &uk, dy)?;
        let dx = match &ws {
            Some((wg, wu)) => Some((matmul_nt(&dg, wg)? + matmul_nt(&du, wu)?)?),
            None => None,
        };
        let (dg2, du2) = (dg.reshape((rows, i))?, du.reshape((rows, i))?);
        let dw = |d: &Tensor, on: bool| -> Result<Option<Tensor>> {
            match (&xk, on) {
                (Some(x2), true) => Ok(Some(d.t()?.matmul(x2)?)),
                _ => Ok(None),
            }
        };
        Ok((dx, dw(&dg2, need[1])?, dw(&du2, need[2])?))
    };
    attach_swiglu3([x, wg, wu], g, u, grads)
}

/// The decoder's whole gated MLP with its residual add,
/// `r + (silu(x·Wgᵀ) · (x·Wuᵀ))·Wdᵀ`, as one unit (the fused path's decoder MLP when gate,
/// up and down have neither bias nor adapter).
///
/// Against [`swiglu_mlp`] + [`linear_residual`] (the same bits, values and gradients):
/// - the activation `silu(g)·u` (…, I) is not kept from the forward to the backward: it is
///   dropped once the down projection's forward has read it, and the backward recomputes it
///   in the SwiGLU backward's own pass (`omr_kernels::swiglu::backward_with_act`: one more
///   write of (…, I) there, against (…, I) less per layer for the whole step: at 3B and
///   T 2048, 36 × 2048 × 11008 bf16 = 1.6 GB);
/// - the activation is not a node of candle's graph either (its gradient, the layer's
///   widest, got a `zeros_like` + add in the backward).
///
/// candle's ops take at most three arguments, so the unit is two ops: the first attaches a
/// one-element token to (x, Wg, Wu), the second computes the output from the token, Wd and
/// r (the down projection on the activation it holds until then, and the residual add, in its
/// forward). The second op's backward, which the backward pass reaches first, computes every
/// gradient and leaves x's, Wg's and Wu's for the first. Only the arguments that track an op
/// get one. x: (…, C), wg, wu: (I, C), wd: (O, I), r: rows · O elements → r's shape
pub fn swiglu_mlp_residual(
    x: &Tensor,
    wg: &Tensor,
    wu: &Tensor,
    wd: &Tensor,
    r: &Tensor,
) -> Result<Tensor> {
    let x = &x.contiguous()?;
    let dims = x.dims().to_vec();
    let c = *dims.last().expect("mlp input has a last dimension");
    let rows = x.elem_count() / c.max(1);
    let (o, i) = wd.dims2()?;
    if wg.dims2()? != wu.dims2()? || wg.dims2()? != (i, c) || r.elem_count() != rows * o {
        candle_core::bail!(
            "swiglu_mlp_residual: x {dims:?}, gate {:?}, up {:?}, down {:?} and residual {:?} \
             do not fit",
            wg.dims(),
            wu.dims(),
            wd.dims(),
            r.dims()
        )
    }
    if rows == 0 || i == 0 || o == 0 || c == 0 {
        return linear_residual(&swiglu_mlp(x, wg, wu)?, wd, r);
    }
    let need = [
        x.track_op(),
        wg.track_op(),
        wu.track_op(),
        wd.track_op(),
        r.track_op(),
    ];
    let (xd, wgd, wud, wdd) = (x.detach(), wg.detach(), wu.detach(), wd.detach());
    let g = matmul_t(&xd, &wgd)?;
    let u = matmul_t(&xd, &wud)?;
    // The activation, held by the second op until its forward has run.
    let act = omr_kernels::swiglu(&g, &u)?;
    // Gradients through the activation: x's, Wg's or Wu's.
    let inner = need[0] || need[1] || need[2];
    let stash: Stash = Arc::new(Mutex::new(None));
    let token = Tensor::zeros(1, x.dtype(), x.device())?;
    let token = match inner {
        true => {
            let stash = stash.clone();
            attach_grad3([x, wg, wu], token, move |_| {
                stash
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("mlp: poisoned".into()))?
                    .take()
                    .ok_or_else(|| {
                        candle_core::Error::Msg(
                            "mlp: the backward reached x before the output".into(),
                        )
                    })
            })?
        }
        false => token,
    };
    // What the backward keeps: g and u always (the activation is recomputed from them), Wd
    // for the gradient into the activation, Wg and Wu for x's, x for the weights'.
    let ws = need[0].then_some((wgd, wud));
    let xk = (need[1] || need[2])
        .then(|| xd.reshape((rows, c)))
        .transpose()?;
    let act_dims = g.dims().to_vec();
    let grads = move |dy: &Tensor| -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy2 = dy.reshape((rows, o))?;
        // Through the down projection: dL/d(activation), then SwiGLU's backward, which also
        // gives the activation back (the forward's bits).
        let act = match inner {
            false if !need[3] => None,
            false => Some(omr_kernels::swiglu(&g, &u)?),
            true => {
                let da = dy2.matmul(&wdd)?.reshape(act_dims.as_slice())?;
                let (dg, du, act) = omr_kernels::swiglu::backward_with_act(&g, &u, &da)?;
                let dx = match &ws {
                    Some((wg, wu)) => Some((matmul_nt(&dg, wg)? + matmul_nt(&du, wu)?)?),
                    None => None,
                };
                let (dg2, du2) = (dg.reshape((rows, i))?, du.reshape((rows, i))?);
                let dw = |d: &Tensor, on: bool| -> Result<Option<Tensor>> {
                    match (&xk, on) {
                        (Some(x2), true) => Ok(Some(d.t()?.matmul(x2)?)),
                        _ => Ok(None),
                    }
                };
                let first = (dx, dw(&dg2, need[1])?, dw(&du2, need[2])?);
                *stash
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("mlp: poisoned".into()))? = Some(first);
                Some(act)
            }
        };
        let dwd = match (need[3], act) {
            (true, Some(act)) => Some(dy2.t()?.matmul(&act.reshape((rows, i))?)?),
            _ => None,
        };
        // A residual's gradient is the incoming one, as candle's add gives it.
        Ok((dwd, need[4].then(|| dy.clone())))
    };
    token.apply_op3(
        wd,
        r,
        MlpOut {
            gemm: Gemm {
                rows,
                i,
                o,
                out: r.shape().clone(),
                residual: true,
            },
            act: Mutex::new(Some(act)),
            grad: Arc::new(grads),
        },
    )
}

/// The gradients of x, Wg and Wu, from the MLP's second op to its first.
type Stash = Arc<Mutex<Option<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>>>;

type MlpGrad = dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync;

/// The MLP's second op over (token, Wd, r): `r + act·Wdᵀ` in its forward, from the
/// activation it holds until then; every gradient in its backward.
struct MlpOut {
    gemm: Gemm,
    act: Mutex<Option<Tensor>>,
    grad: Arc<MlpGrad>,
}

impl MlpOut {
    fn take_act(&self) -> Result<Tensor> {
        self.act
            .lock()
            .map_err(|_| candle_core::Error::Msg("mlp: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("mlp: forward ran twice".into()))
    }
}

impl CustomOp3 for MlpOut {
    fn name(&self) -> &'static str {
        "omr-swiglu-mlp-residual"
    }
    fn cpu_fwd(
        &self,
        _token: &CpuStorage,
        _tl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let act = self.take_act()?;
        let (s, l) = act.storage_and_layout();
        let candle_core::Storage::Cpu(a) = &*s else {
            candle_core::bail!("mlp: the activation is not on the CPU")
        };
        self.gemm.forward(a, l, w, wl, Some((r, rl)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _token: &candle_core::CudaStorage,
        _tl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        r: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let act = self.take_act()?;
        let (s, l) = act.storage_and_layout();
        let candle_core::Storage::Cuda(a) = &*s else {
            candle_core::bail!("mlp: the activation is not on the CUDA device")
        };
        self.gemm.forward(a, l, w, wl, Some((r, rl)))
    }
    fn bwd(
        &self,
        token: &Tensor,
        wd: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dwd, dr) = (self.grad)(grad_res)?;
        // The token's gradient: a one-element zero (the edge carries no value).
        let dt = match token.track_op() {
            true => Some(Tensor::zeros(1, token.dtype(), token.device())?),
            false => None,
        };
        Ok((dt, route(wd, dwd)?, route(r, dr)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{bits, rand};
    use super::*;
    use crate::ops::linear_op;
    use candle_core::{DType, Var};

    /// `swiglu_mlp` gives the bits of the three ops it replaces (`linear_op` for gate and up,
    /// then SwiGLU): the output and every gradient, f32 and bf16, with every argument tracked
    /// and with frozen weights (then only x gets one, and with a frozen x only the weights).
    #[test]
    fn swiglu_mlp_equals_its_three_ops() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            for (tx, tw) in [(true, true), (true, false), (false, true)] {
                let mk = |t: Tensor, on: bool| -> Result<Tensor> {
                    let t = t.to_dtype(dtype)?;
                    Ok(if on {
                        Var::from_tensor(&t)?.as_tensor().clone()
                    } else {
                        t
                    })
                };
                let x = mk(rand(1, &[2, 5, 12])?, tx)?;
                let wg = mk((rand(2, &[20, 12])? * 0.3)?, tw)?;
                let wu = mk((rand(3, &[20, 12])? * 0.3)?, tw)?;
                let k = rand(4, &[2, 5, 20])?.to_dtype(dtype)?;
                let one = swiglu_mlp(&x, &wg, &wu)?;
                let three =
                    omr_kernels::swiglu(&linear_op(&x, &wg, None)?, &linear_op(&x, &wu, None)?)?;
                let what = format!("{dtype:?}, x tracked {tx}, weights tracked {tw}");
                assert_eq!(bits(&one)?, bits(&three)?, "{what}: output");
                let g1 = (&one * &k)?.sum_all()?.backward()?;
                let g3 = (&three * &k)?.sum_all()?.backward()?;
                for (name, t, on) in [("x", &x, tx), ("wg", &wg, tw), ("wu", &wu, tw)] {
                    match (g1.get(t), g3.get(t)) {
                        (Some(a), Some(b)) => assert_eq!(bits(a)?, bits(b)?, "{what}: d{name}"),
                        (None, None) => assert!(!on, "{what}: no d{name}"),
                        _ => panic!("{what}: d{name} present in one only"),
                    }
                }
            }
        }
        assert!(swiglu_mlp(
            &rand(1, &[3, 12])?,
            &rand(2, &[20, 12])?,
            &rand(3, &[20, 11])?
        )
        .is_err());
        Ok(())
    }

    /// `swiglu_mlp_residual` gives the bits of `swiglu_mlp` + `linear_residual`: the output
    /// and every gradient, f32 and bf16, for each combination of tracked x, gate/up weights,
    /// down weight and residual (an untracked argument gets no gradient), including the
    /// case where only the down projection trains (the activation then comes from the
    /// forward kernel alone).
    #[test]
    fn swiglu_mlp_residual_equals_its_two_ops() -> Result<()> {
        for dtype in [DType::F32, DType::BF16] {
            for mask in 1u32..16 {
                let on = |k: u32| mask & (1 << k) != 0;
                let mk = |t: Tensor, on: bool| -> Result<Tensor> {
                    let t = t.to_dtype(dtype)?;
                    Ok(if on {
                        Var::from_tensor(&t)?.as_tensor().clone()
                    } else {
                        t
                    })
                };
                let x = mk(rand(1, &[2, 5, 12])?, on(0))?;
                let wg = mk((rand(2, &[20, 12])? * 0.3)?, on(1))?;
                let wu = mk((rand(3, &[20, 12])? * 0.3)?, on(1))?;
                let wd = mk((rand(4, &[12, 20])? * 0.3)?, on(2))?;
                let r = mk(rand(5, &[2, 5, 12])?, on(3))?;
                let k = rand(6, &[2, 5, 12])?.to_dtype(dtype)?;
                let one = swiglu_mlp_residual(&x, &wg, &wu, &wd, &r)?;
                let two = linear_residual(&swiglu_mlp(&x, &wg, &wu)?, &wd, &r)?;
                let what = format!(
                    "{dtype:?}, tracked x {} w_gate/up {} w_down {} r {}",
                    on(0),
                    on(1),
                    on(2),
                    on(3)
                );
                assert_eq!(one.dims(), [2, 5, 12], "{what}");
                assert_eq!(bits(&one)?, bits(&two)?, "{what}: output");
                let g1 = (&one * &k)?.sum_all()?.backward()?;
                let g2 = (&two * &k)?.sum_all()?.backward()?;
                let args = [("x", &x), ("wg", &wg), ("wu", &wu), ("wd", &wd), ("r", &r)];
                for (name, t) in args {
                    match (g1.get(t), g2.get(t), t.track_op()) {
                        (Some(a), Some(b), true) => {
                            assert_eq!(a.dims(), t.dims(), "{what}: d{name} shape");
                            assert_eq!(bits(a)?, bits(b)?, "{what}: d{name}")
                        }
                        (None, _, false) => {}
                        _ => panic!("{what}: d{name} missing or extra"),
                    }
                }
            }
        }
        // Shapes that do not fit are an error, not a panic.
        let (x, w) = (rand(1, &[3, 12])?, rand(2, &[20, 12])?);
        let r = rand(5, &[3, 12])?;
        assert!(swiglu_mlp_residual(&x, &w, &w, &rand(4, &[12, 19])?, &r).is_err());
        assert!(
            swiglu_mlp_residual(&x, &w, &w, &rand(4, &[12, 20])?, &rand(5, &[3, 11])?).is_err()
        );
        assert!(
            swiglu_mlp_residual(&x, &w, &rand(3, &[20, 11])?, &rand(4, &[12, 20])?, &r).is_err()
        );
        // No rows: the two ops' answer (an empty output).
        let e = swiglu_mlp_residual(
            &rand(1, &[0, 12])?,
            &w,
            &w,
            &rand(4, &[12, 20])?,
            &rand(5, &[0, 12])?,
        )?;
        assert_eq!(e.dims(), [0, 12]);
        Ok(())
    }
}
