//! The decoder's gated MLP as one autograd unit on the fused path: [`swiglu_mlp`] (gate, up
//! and SwiGLU) and [`swiglu_mlp_residual`] (the whole MLP with its down projection and the
//! residual add). Their intermediates are kept inside the op, not as candle graph nodes
//! (each of those gets a `zeros_like` + add in candle's backward), and the weights'
//! gradients go through `omr_kernels::grad_sink::route`.

use super::attach::attach_swiglu3;
use super::fused_linear::{bias_grad, linear_residual, project, Projected};
use super::{matmul_nt, matmul_t};
use crate::block::Adapter;
use candle_core::{Result, Tensor};

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

/// The gated MLP's projections, each (O, I), their biases (none in the decoder; all three in
/// a Qwen2.5-VL vision block), the LoRA adapters on them (gate, up, down; adapters that draw
/// no dropout mask in this forward), and the RMSNorm before it (for [`decoder_mlp`]).
pub struct MlpWeights<'a> {
    pub gate: &'a Tensor,
    pub up: &'a Tensor,
    pub down: &'a Tensor,
    pub bias: [Option<&'a Tensor>; 3],
    pub lora: [Option<&'a Adapter>; 3],
    /// The post-attention RMSNorm's weight (as stored) and epsilon; [`decoder_mlp`] only.
    pub norm: Option<(&'a Tensor, f64)>,
}

/// The decoder's whole gated MLP with its residual add,
/// `r + (silu(x·Wgᵀ) · (x·Wuᵀ))·Wdᵀ` (each projection plus its adapter's
/// `(x·Aᵀ)·(scale·B)ᵀ`), as one unit. Against [`swiglu_mlp`] + [`linear_residual`], or the
/// LoRA ops and SwiGLU (the same bits, values and gradients):
/// - the activation `silu(g)·u` (…, I) is not kept from the forward to the backward: it is
///   dropped once the down projection has read it, and the backward recomputes it in the
///   SwiGLU backward's own pass (`omr_kernels::swiglu::backward_with_act`: one more write of
///   (…, I) there, against (…, I) less per layer for the whole step: at 3B and T 2048,
///   36 × 2048 × 11008 bf16 = 1.6 GB);
/// - neither the activation nor the projections' outputs are nodes of candle's graph (each
///   gradient got a `zeros_like` + add in the backward).
///
/// candle's ops take at most three arguments, so the unit is `block::attach_chain`'s chain
/// of ops over x, the weights, r and the adapters' A and B; its last op adds r and the down
/// projection in its forward. The last op's backward, which the backward pass reaches first,
/// computes every gradient and leaves the others' to them. Only the arguments that track an
/// op get one. x: (…, C), gate, up: (I, C), down: (O, I), r: rows · O elements → r's shape
pub fn swiglu_mlp_residual(x: &Tensor, w: &MlpWeights, r: &Tensor) -> Result<Tensor> {
    if w.norm.is_some() {
        candle_core::bail!("swiglu_mlp_residual: a norm is decoder_mlp's")
    }
    let empty = x.elem_count() == 0 || w.gate.elem_count() == 0 || w.down.elem_count() == 0;
    if empty && w.lora.iter().all(Option::is_none) && w.bias.iter().all(Option::is_none) {
        // candle's matmul special-cases empty products; so do the two ops.
        return linear_residual(&swiglu_mlp(x, w.gate, w.up)?, w.down, r);
    }
    unit(x, w, Some(r))
}

/// The decoder layer's second half as one unit, `x + mlp(rmsnorm(x))` with
/// [`swiglu_mlp_residual`]'s MLP (each projection plus its bias, when it has one) and
/// `w.norm`'s RMSNorm (omr_kernels' op, the weight cast to x's dtype): the fused path's
/// decoder MLP, and a Qwen2.5-VL vision block's, when their adapters draw no dropout.
/// Besides the activation, the norm's output (…, C) is not kept either (the backward
/// recomputes it from x, which the unit keeps for the norm's backward anyway),
/// and x's gradient, the residual's plus the norm's, is summed here instead of in candle's
/// `GradStore`. The same bits as `fused::rmsnorm` + [`swiglu_mlp_residual`].
/// x: (…, C) → (…, C)
pub fn decoder_mlp(x: &Tensor, w: &MlpWeights) -> Result<Tensor> {
    if w.norm.is_none() {
        candle_core::bail!("decoder_mlp: no norm")
    }
    unit(x, w, None)
}

/// The unit: `r + mlp(h)`, h = rmsnorm(x) with `w.norm` or x itself; r = x when `None`.
fn unit(x: &Tensor, w: &MlpWeights, r: Option<&Tensor>) -> Result<Tensor> {
    let x = &x.contiguous()?;
    let params = mlp_params(w, r);
    let need: Vec<bool> = params
        .iter()
        .map(|p| p.is_some_and(Tensor::track_op))
        .collect();
    let (y, backward) = mlp_half(x, x.track_op(), w, r)?;
    crate::block::attach_chain(x, &params, &need, y, backward)
}

/// The tensors whose gradients [`mlp_half`]'s backward returns, in its order: gate, up,
/// down, r, the (A, B) of the gate's, up's and down's adapters, the norm's weight, the
/// gate's, up's and down's biases.
pub(crate) fn mlp_params<'a>(w: &MlpWeights<'a>, r: Option<&'a Tensor>) -> Vec<Option<&'a Tensor>> {
    let mut params: Vec<Option<&Tensor>> = vec![Some(w.gate), Some(w.up), Some(w.down), r];
    for ad in &w.lora {
        params.push(ad.map(|ad| &ad.a));
        params.push(ad.map(|ad| &ad.b));
    }
    params.push(w.norm.map(|(n, _)| n));
    params.extend(w.bias);
    params
}

/// Where [`mlp_params`] puts the gate's, up's and down's biases.
const BIAS: usize = 11;

/// The gradients a half's backward returns: dL/dx (when asked for), then one per parameter.
pub(crate) type HalfGrads = (Option<Tensor>, Vec<Option<Tensor>>);

/// The MLP half (the unit's forward and backward, also the block op's second half): its
/// output `y = r + mlp(h)` as its two parts (r, the down projection: the caller's op adds
/// them), computed without a graph from x (contiguous), and its backward, dL/dy →
/// (dL/dx when `x_grad`, a gradient for each of [`mlp_params`] whose tensor tracks an op).
pub(crate) fn mlp_half(
    x: &Tensor,
    x_grad: bool,
    w: &MlpWeights,
    r: Option<&Tensor>,
) -> Result<(
    (Tensor, Tensor),
    impl Fn(&Tensor) -> Result<HalfGrads> + Send + Sync + 'static,
)> {
    let dims = x.dims().to_vec();
    let c = *dims.last().expect("mlp input has a last dimension");
    let rows = x.elem_count() / c.max(1);
    let (wg, wu, wd) = (w.gate, w.up, w.down);
    let (o, i) = wd.dims2()?;
    let res = r.unwrap_or(x);
    let adapters_fit = w
        .lora
        .iter()
        .zip([(i, c), (i, c), (o, i)])
        .all(|(ad, (out, inp))| ad.is_none_or(|ad| ad.fits(out, inp)));
    let norm_fits = w.norm.is_none_or(|(n, _)| n.dims() == [c]);
    let biases_fit = w
        .bias
        .iter()
        .zip([i, i, o])
        .all(|(b, n)| b.is_none_or(|b| b.dims() == [n]));
    if wg.dims2()? != wu.dims2()?
        || wg.dims2()? != (i, c)
        || res.elem_count() != rows * o
        || !adapters_fit
        || !norm_fits
        || !biases_fit
    {
        candle_core::bail!(
            "swiglu_mlp_residual: x {dims:?}, gate {:?}, up {:?}, down {:?}, residual {:?}, \
             norm {:?}, biases {:?} and adapters (A, B) {:?} do not fit",
            wg.dims(),
            wu.dims(),
            wd.dims(),
            res.dims(),
            w.norm.map(|(n, _)| n.dims().to_vec()),
            w.bias.map(|b| b.map(|b| b.dims().to_vec())),
            w.lora
                .map(|ad| ad.map(|ad| (ad.a.dims().to_vec(), ad.b.dims().to_vec())))
        )
    }
    if rows == 0 || i == 0 || o == 0 || c == 0 {
        candle_core::bail!(
            "swiglu_mlp_residual: empty shapes (x {dims:?}, down {:?})",
            wd.dims()
        )
    }
    let dt = x.dtype();
    let need: Vec<bool> = mlp_params(w, r)
        .iter()
        .map(|p| p.is_some_and(Tensor::track_op))
        .collect();
    let x_tracks = x_grad;
    let (xd, wgd, wud, wdd) = (x.detach(), wg.detach(), wu.detach(), wd.detach());
    // The norm's weight in x's dtype, and its stored dtype for the gradient.
    let norm = match w.norm {
        Some((n, eps)) => Some((n.detach().to_dtype(dt)?, eps, n.dtype())),
        None => None,
    };
    let h = match &norm {
        Some((n, eps, _)) => omr_kernels::rmsnorm(&xd, n, *eps)?,
        None => xd.clone(),
    };
    let ads: [Option<Adapter>; 3] = [
        w.lora[0].map(Adapter::prepared).transpose()?,
        w.lora[1].map(Adapter::prepared).transpose()?,
        w.lora[2].map(Adapter::prepared).transpose()?,
    ];
    let bs = w.bias.map(|b| b.map(Tensor::detach));
    let proj = |x: &Tensor, w: &Tensor, p: usize| project(x, w, bs[p].as_ref(), ads[p].as_ref());
    let (g, xa_g) = proj(&h, &wgd, 0)?;
    let (u, xa_u) = proj(&h, &wud, 1)?;
    let (down, xa_d) = {
        // The activation: read by the down projection, then dropped.
        let act = omr_kernels::swiglu(&g, &u)?;
        proj(&act, &wdd, 2)?
    };
    let y = (res.detach(), down.reshape(res.dims())?);
    // Gradients through h: x's or the norm's; through the activation: those, or the gate's
    // and up's parameters' (W, A, B, bias).
    let through_h = x_tracks || need[10];
    let inner = through_h || [0, 1, 4, 5, 6, 7, BIAS, BIAS + 1].iter().any(|&k| need[k]);
    // What the backward keeps: g and u (the activation is recomputed from them), Wd for the
    // gradient into the activation, Wg and Wu for h's, and h for the weights' and the A's
    // (recomputed from x, which the norm's backward needs anyway, when there is a norm).
    let ws = through_h.then_some((wgd, wud));
    let h_needed = need[0] || need[1] || need[4] || need[6];
    let keep_x = match &norm {
        Some(_) => through_h || h_needed,
        None => h_needed,
    };
    let xk = keep_x.then_some(xd);
    drop(h);
    let xa = [xa_g, xa_u, xa_d];
    let act_dims = g.dims().to_vec();
    let residual_is_x = r.is_none();
    // dL/dy → (dL/dx, the gradient of each parameter in `mlp_params`' order).
    let backward = move |dy: &Tensor| -> Result<HalfGrads> {
        let need = &need;
        let mut grads: Vec<Option<Tensor>> = vec![None; BIAS + 3];
        let db = |k: usize, g2: &Tensor| need[k].then(|| bias_grad(g2)).transpose();
        let dy2 = dy.reshape((rows, o))?;
        let pr = |p: usize| Projected {
            ad: ads[p].as_ref(),
        };
        // Adapter p's (A, B) gradients, A from the projection's input x2.
        let adapter = |p: usize, g2: &Tensor, gb: &Option<Tensor>, x2: Option<&Tensor>| {
            let need = (need[4 + 2 * p], need[5 + 2 * p]);
            pr(p).adapter_grads(g2, gb, x2, xa[p].as_ref(), need)
        };
        // Through the down projection: dL/d(activation), then SwiGLU's backward, which also
        // gives the activation back (the forward's bits).
        let gb_d = pr(2).gb(&dy2)?;
        let (act, gate_up) = match inner {
            false if !(need[2] || need[8]) => (None, None),
            false => (Some(omr_kernels::swiglu(&g, &u)?), None),
            true => {
                let da = pr(2).dx(&dy2, &wdd, &gb_d)?.reshape(act_dims.as_slice())?;
                let (dg, du, act) = omr_kernels::swiglu::backward_with_act(&g, &u, &da)?;
                (Some(act), Some((dg, du)))
            }
        };
        let act = act.map(|a| a.reshape((rows, i))).transpose()?;
        (grads[8], grads[9]) = adapter(2, &dy2, &gb_d, act.as_ref())?;
        grads[BIAS + 2] = db(BIAS + 2, &dy2)?;
        if let (true, Some(act)) = (need[2], &act) {
            grads[2] = Some(dy2.t()?.matmul(act)?);
        }
        drop(act);
        // A residual's gradient is the incoming one, as candle's add gives it.
        grads[3] = need[3].then(|| dy.clone());
        let residual_dx = (residual_is_x && x_tracks).then(|| dy.clone());
        let Some((dg, du)) = gate_up else {
            return Ok((residual_dx, grads));
        };
        let (dg2, du2) = (dg.reshape((rows, i))?, du.reshape((rows, i))?);
        let (gb_g, gb_u) = (pr(0).gb(&dg2)?, pr(1).gb(&du2)?);
        grads[BIAS] = db(BIAS, &dg2)?;
        grads[BIAS + 1] = db(BIAS + 1, &du2)?;
        // h as the forward had it (rows, C), where a gradient needs it.
        let h2 = match (&norm, &xk, h_needed) {
            (_, None, _) | (_, _, false) => None,
            (Some((n, eps, _)), Some(x), true) => {
                Some(omr_kernels::rmsnorm(x, n, *eps)?.reshape((rows, c))?)
            }
            (None, Some(x), true) => Some(x.reshape((rows, c))?),
        };
        (grads[4], grads[5]) = adapter(0, &dg2, &gb_g, h2.as_ref())?;
        (grads[6], grads[7]) = adapter(1, &du2, &gb_u, h2.as_ref())?;
        for (k, d) in [(0, &dg2), (1, &du2)] {
            if let (true, Some(h2)) = (need[k], &h2) {
                grads[k] = Some(d.t()?.matmul(h2)?);
            }
        }
        drop(h2);
        let Some((wg, wu)) = &ws else {
            return Ok((residual_dx, grads));
        };
        let dh =
            (pr(0).dx(&dg2, wg, &gb_g)? + pr(1).dx(&du2, wu, &gb_u)?)?.reshape(dims.as_slice())?;
        let dx_in = match (&norm, &xk) {
            (Some((n, eps, stored)), Some(x)) => {
                let (dxn, dwn) = omr_kernels::rmsnorm::backward(x, n, &dh, *eps)?;
                grads[10] = match need[10] {
                    true => Some(dwn.to_dtype(*stored)?),
                    false => None,
                };
                dxn
            }
            _ => dh,
        };
        let dx = match residual_dx {
            // The residual's gradient first, as candle's GradStore sums them.
            Some(d) => Some((d + dx_in)?),
            None => x_tracks.then_some(dx_in),
        };
        Ok((dx, grads))
    };
    Ok((y, backward))
}

#[cfg(test)]
mod tests;
