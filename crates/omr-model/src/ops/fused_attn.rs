//! The decoder layer's attention half as one autograd unit on the fused path:
//! [`decoder_attention`], `x + attention(rot(q), rot(k), v)·Woᵀ` with q, k, v projected from
//! `rmsnorm(x)`. Its intermediates (the norm's output, the projections before and after the
//! rotary, the attention's output) are kept inside the unit, not as candle graph nodes (each
//! of those gets a `zeros_like` + add in candle's backward), and the norm's output and the
//! pre-rotary q and k are not kept at all: the backward recomputes the norm's output with one
//! RMSNorm forward, and needs no pre-rotary value. The block op's first half is the same
//! code ([`attn_half`]).

use super::fused_linear::{bias_grad, project, Projected};
use super::HalfGrads;
use crate::block::Adapter;
use candle_core::{Result, Tensor};
use omr_kernels::AttnMask;

/// The attention half's weights (O, I layouts), biases, LoRA adapters (q, k, v, o; adapters
/// that draw no dropout mask in this forward), the input RMSNorm (weight as stored,
/// epsilon) and the head shapes.
pub struct AttnWeights<'a> {
    pub norm: (&'a Tensor, f64),
    pub qkv: Qkv<'a>,
    pub o: (&'a Tensor, Option<&'a Tensor>),
    /// q, k, v, o; with [`Qkv::Packed`], the packed projection's adapter in q's place and
    /// none in k's and v's.
    pub lora: [Option<&'a Adapter>; 4],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// An input projection's weight and bias.
pub type Proj<'a> = (&'a Tensor, Option<&'a Tensor>);

/// The attention's input projections.
pub enum Qkv<'a> {
    /// q, k and v each their own (the decoder's `q_proj`, `k_proj`, `v_proj`).
    Split([Proj<'a>; 3]),
    /// One (3·H·D, C) projection whose output holds each token's q, k and v in a row (the
    /// vision tower's `attn.qkv`; as many key/value heads as heads).
    Packed(Proj<'a>),
}

impl<'a> AttnWeights<'a> {
    /// Weight and bias of q, k, v (the packed projection in q's place) and o.
    fn projections(&self) -> [Option<Proj<'a>>; 4] {
        match self.qkv {
            Qkv::Split([q, k, v]) => [Some(q), Some(k), Some(v), Some(self.o)],
            Qkv::Packed(qkv) => [Some(qkv), None, None, Some(self.o)],
        }
    }
}

/// The decoder layer's attention half (and a vision block's), `x + attention(rot(q), rot(k),
/// v)·Woᵀ (+ bo)` with `q, k, v = rmsnorm(x)·W{q,k,v}ᵀ + b` (each projection plus its
/// adapter's `(h·Aᵀ)·(scale·B)ᵀ`), the rotary half tables cos/sin (B, T, D/2) f32 and the
/// pass's mask, as one unit (the chain of `block::attach_chain`, whose last op adds the
/// residual). The values and gradients of the per-op path (fused RMSNorm, projections,
/// rotary, attention, o_proj + residual) to summation order. x: (B, T, C), or (N, C) as one
/// batch row of N (a vision tower's patches) → x's shape
pub fn decoder_attention(
    x: &Tensor,
    w: &AttnWeights,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttnMask,
) -> Result<Tensor> {
    let x = &x.contiguous()?;
    let params = attn_params(w);
    let need: Vec<bool> = params
        .iter()
        .map(|p| p.is_some_and(Tensor::track_op))
        .collect();
    let (y, backward) = attn_half(x, x.track_op(), w, cos, sin, mask)?;
    crate::block::attach_chain(x, &params, &need, y, backward)
}

/// The tensors whose gradients [`attn_half`]'s backward returns, in its order: the norm's
/// weight, q's weight and bias (the packed projection's), k's, v's, o's weight, the (A, B)
/// of the q, k, v and o adapters, o's bias.
pub(crate) fn attn_params<'a>(w: &AttnWeights<'a>) -> Vec<Option<&'a Tensor>> {
    let [q, k, v, o] = w.projections();
    let mut params = vec![Some(w.norm.0)];
    for p in [q, k, v] {
        params.push(p.map(|p| p.0));
        params.push(p.and_then(|p| p.1));
    }
    params.push(o.map(|o| o.0));
    for ad in &w.lora {
        params.push(ad.map(|ad| &ad.a));
        params.push(ad.map(|ad| &ad.b));
    }
    params.push(w.o.1);
    params
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
/// Gradients before the adapters' (norm, weights, biases but o's).
const BASE: usize = 8;
/// o's bias, after the adapters'.
const O_BIAS: usize = BASE + 8;

/// The attention half (the unit's forward and backward, also the block op's first half): its
/// output `x + attention·Woᵀ (+ bo)` as its two parts (x detached, the o projection: the
/// caller's op adds them), computed without a graph from x (B, T, C) or (N, C), and its
/// backward, dL/dy → (dL/dx when `x_grad`, a gradient for each of [`attn_params`] whose
/// tensor tracks an op).
pub(crate) fn attn_half(
    x: &Tensor,
    x_grad: bool,
    w: &AttnWeights,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttnMask,
) -> Result<(
    (Tensor, Tensor),
    impl Fn(&Tensor) -> Result<HalfGrads> + Send + Sync + 'static,
)> {
    let x_dims = x.dims().to_vec();
    let (b, t, c) = match *x_dims.as_slice() {
        [n, c] => (1, n, c),
        _ => x.dims3()?,
    };
    let (h, kv, d) = (w.heads, w.kv_heads, w.head_dim);
    let (norm, eps) = w.norm;
    let packed = matches!(w.qkv, Qkv::Packed(_));
    let shapes = match packed {
        false => [(h * d, c), (kv * d, c), (kv * d, c), (c, h * d)],
        true => [(3 * h * d, c), (0, 0), (0, 0), (c, h * d)],
    };
    let projections = w.projections();
    let fits = projections.iter().zip(shapes).all(|(p, s)| match p {
        Some((w, b)) => w.dims2().ok() == Some(s) && b.is_none_or(|b| b.dims() == [s.0]),
        None => true,
    }) && w
        .lora
        .iter()
        .zip(&projections)
        .zip(shapes)
        .all(|((ad, p), (o, i))| ad.is_none_or(|ad| p.is_some() && ad.fits(o, i)))
        && norm.dims() == [c]
        && (!packed || kv == h);
    if !fits || h == 0 || kv == 0 || h % kv != 0 || b * t == 0 {
        candle_core::bail!(
            "decoder_attention: x {:?}, {h} heads / {kv} kv heads of {d}{}, weights {:?}, norm \
             {:?} do not fit",
            x.dims(),
            if packed { " (packed q, k, v)" } else { "" },
            projections.map(|p| p.map(|p| p.0.dims().to_vec())),
            norm.dims()
        )
    }
    let dt = x.dtype();
    let rows = b * t;
    let need: Vec<bool> = attn_params(w)
        .iter()
        .map(|p| p.is_some_and(Tensor::track_op))
        .collect();
    let xd = x.detach();
    let w_in = norm.detach().to_dtype(dt)?;
    let norm_dtype = norm.dtype();
    let ws = projections.map(|p| p.map(|p| p.0.detach()));
    let bs = projections.map(|p| p.and_then(|p| p.1).map(Tensor::detach));
    let mut ads: [Option<Adapter>; 4] = Default::default();
    for (slot, ad) in ads.iter_mut().zip(&w.lora) {
        *slot = ad.map(Adapter::prepared).transpose()?;
    }
    // Projection p of x, and x Aᵀ for the backward.
    let lin = |p: usize, x: &Tensor| match &ws[p] {
        Some(w) => project(x, w, bs[p].as_ref(), ads[p].as_ref()),
        None => candle_core::bail!("decoder_attention: no projection {p}"),
    };
    let hs = omr_kernels::rmsnorm(&xd, &w_in, eps)?;
    let ((q, xa_q), (k, xa_k), (v, xa_v)) = match packed {
        false => (lin(Q, &hs)?, lin(K, &hs)?, lin(V, &hs)?),
        true => {
            let (qkv, xa) = lin(Q, &hs)?;
            let qkv = qkv.reshape((b, t, 3, h, d))?;
            let part = |i: usize| qkv.narrow(2, i, 1)?.contiguous();
            ((part(0)?, xa), (part(1)?, None), (part(2)?, None))
        }
    };
    drop(hs);
    let qr = omr_kernels::rotary(&q.reshape((b, t, h, d))?, cos, sin)?;
    let kr = omr_kernels::rotary(&k.reshape((b, t, kv, d))?, cos, sin)?;
    let v = v.reshape((b, t, kv, d))?;
    drop((q, k));
    let scale = 1.0 / (d as f64).sqrt();
    let (a, attn) = crate::kept_attn::forward(&qr, &kr, &v, mask, scale)?;
    let a2 = a.reshape((b, t, h * d))?;
    let (ao, xa_o) = lin(O, &a2)?;
    let y = (xd.clone(), ao.reshape(x_dims.as_slice())?);
    let xa = [xa_q, xa_k, xa_v, xa_o];
    let (cos, sin) = (cos.clone(), sin.clone());
    // dL/dy → (dL/dx, the gradient of each parameter in `attn_params`' order).
    let backward = move |dy: &Tensor| -> Result<HalfGrads> {
        let mut grads: Vec<Option<Tensor>> = vec![None; O_BIAS + 1];
        let flat = |x: &Tensor| x.reshape((rows, x.elem_count() / rows));
        // dW = gᵀ·x in the weight's (O, I) layout, for parameter i.
        let dw = |i: usize, g: &Tensor, x: &Tensor| -> Result<Option<Tensor>> {
            match need[i] {
                true => Ok(Some(flat(g)?.t()?.matmul(&flat(x)?)?)),
                false => Ok(None),
            }
        };
        // The bias gradient of parameter i.
        let db = |i: usize, g: &Tensor| -> Result<Option<Tensor>> {
            need[i].then(|| bias_grad(&flat(g)?)).transpose()
        };
        // Through projection p with output gradient g2 and input x2 (rows flattened): dL/dx,
        // and its adapter's (A, B) gradients.
        let mut back = |p: usize, g2: &Tensor, x2: Option<&Tensor>| -> Result<Tensor> {
            let pr = Projected {
                ad: ads[p].as_ref(),
            };
            let gb = pr.gb(g2)?;
            let need = (need[BASE + 2 * p], need[BASE + 2 * p + 1]);
            (grads[BASE + 2 * p], grads[BASE + 2 * p + 1]) =
                pr.adapter_grads(g2, &gb, x2, xa[p].as_ref(), need)?;
            match &ws[p] {
                Some(w) => pr.dx(g2, w, &gb),
                None => candle_core::bail!("decoder_attention: no projection {p}"),
            }
        };
        let dy = dy.to_dtype(dt)?;
        let da = back(O, &flat(&dy)?, Some(&flat(&a2)?))?.reshape((b, t, h, d))?;
        let d_o = dw(7, &dy, &a2)?;
        let d_ob = db(O_BIAS, &dy)?;
        let (dqr, dkr, dv) = attn.backward(&qr, &kr, &v, &a, &da)?;
        let dq = omr_kernels::rotary::rotary_inverse(&dqr.to_dtype(dt)?, &cos, &sin)?;
        let dk = omr_kernels::rotary::rotary_inverse(&dkr.to_dtype(dt)?, &cos, &sin)?;
        let dv = dv.to_dtype(dt)?;
        // The norm's output again (the forward's bits), where a weight's or an A's gradient
        // needs it.
        let hs = match [1, 3, 5, BASE, BASE + 2, BASE + 4].iter().any(|&i| need[i]) {
            true => Some(flat(&omr_kernels::rmsnorm(&xd, &w_in, eps)?)?),
            false => None,
        };
        let hs = hs.as_ref();
        let dhs = match packed {
            false => {
                let (dq, dk, dv) = (flat(&dq)?, flat(&dk)?, flat(&dv)?);
                let (gq, gk, gv) = (back(Q, &dq, hs)?, back(K, &dk, hs)?, back(V, &dv, hs)?);
                if let Some(hs) = hs {
                    grads[1] = dw(1, &dq, hs)?;
                    grads[3] = dw(3, &dk, hs)?;
                    grads[5] = dw(5, &dv, hs)?;
                }
                grads[2] = db(2, &dq)?;
                grads[4] = db(4, &dk)?;
                grads[6] = db(6, &dv)?;
                // Summed in the order candle's GradStore sums the per-op path's: v's, k's,
                // then q's.
                ((gv + gk)? + gq)?
            }
            true => {
                // Each token's q, k and v in a row, as the projection wrote them.
                let dqkv = flat(&Tensor::stack(&[dq, dk, dv], 2)?)?;
                let g = back(Q, &dqkv, hs)?;
                if let Some(hs) = hs {
                    grads[1] = dw(1, &dqkv, hs)?;
                }
                grads[2] = db(2, &dqkv)?;
                g
            }
        };
        let dhs = dhs.reshape(x_dims.as_slice())?;
        grads[7] = d_o;
        grads[O_BIAS] = d_ob;
        if !(x_grad || need[0]) {
            return Ok((None, grads));
        }
        let (dxn, dw_in) = omr_kernels::rmsnorm::backward(&xd, &w_in, &dhs, eps)?;
        grads[0] = match need[0] {
            true => Some(dw_in.to_dtype(norm_dtype)?),
            false => None,
        };
        // The residual's gradient first, as candle's GradStore sums them.
        let dx = match x_grad {
            true => Some((dy + dxn)?),
            false => None,
        };
        Ok((dx, grads))
    };
    Ok((y, backward))
}

#[cfg(test)]
mod tests;
