//! The decoder layer's attention half as one autograd unit on the fused path:
//! [`decoder_attention`], `x + attention(rot(q), rot(k), v)·Woᵀ` with q, k, v projected from
//! `rmsnorm(x)`. Its intermediates (the norm's output, the projections before and after the
//! rotary, the attention's output) are kept inside the unit, not as candle graph nodes (each
//! of those gets a `zeros_like` + add in candle's backward), and the norm's output and the
//! pre-rotary q and k are not kept at all: the backward recomputes the norm's output with one
//! RMSNorm forward, and needs no pre-rotary value. The block op's first half is the same
//! code ([`attn_half`]).

use super::fused_linear::{project, Projected};
use super::HalfGrads;
use crate::block::Adapter;
use candle_core::{Result, Tensor};
use omr_kernels::AttnMask;

/// The attention half's weights (O, I layouts), biases, LoRA adapters (q, k, v, o; adapters
/// that draw no dropout mask in this forward), the input RMSNorm (weight as stored,
/// epsilon) and the head shapes.
pub struct AttnWeights<'a> {
    pub norm: (&'a Tensor, f64),
    pub q: (&'a Tensor, Option<&'a Tensor>),
    pub k: (&'a Tensor, Option<&'a Tensor>),
    pub v: (&'a Tensor, Option<&'a Tensor>),
    pub o: &'a Tensor,
    pub lora: [Option<&'a Adapter>; 4],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The decoder layer's attention half, `x + attention(rot(q), rot(k), v)·Woᵀ` with
/// `q, k, v = rmsnorm(x)·W{q,k,v}ᵀ + b` (each plus its adapter's `(h·Aᵀ)·(scale·B)ᵀ`), the
/// rotary half tables cos/sin (B, T, D/2) f32 and the pass's mask, as one unit (the chain of
/// `block::attach_chain`, whose last op adds the residual). The values and gradients of the
/// per-op path (fused RMSNorm, projections, rotary, attention, o_proj + residual) to
/// summation order. x: (B, T, C) → (B, T, C)
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
/// weight, q's weight and bias, k's, v's, o's weight, the (A, B) of the q, k, v and o
/// adapters.
pub(crate) fn attn_params<'a>(w: &AttnWeights<'a>) -> Vec<Option<&'a Tensor>> {
    let mut params = vec![
        Some(w.norm.0),
        Some(w.q.0),
        w.q.1,
        Some(w.k.0),
        w.k.1,
        Some(w.v.0),
        w.v.1,
        Some(w.o),
    ];
    for ad in &w.lora {
        params.push(ad.map(|ad| &ad.a));
        params.push(ad.map(|ad| &ad.b));
    }
    params
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
/// Gradients before the adapters' (norm, weights, biases).
const BASE: usize = 8;

/// The attention half (the unit's forward and backward, also the block op's first half): its
/// output `x + attention·Woᵀ` as its two parts (x detached, the o projection: the caller's
/// op adds them), computed without a graph from x (B, T, C), and its backward, dL/dy →
/// (dL/dx when `x_grad`, a gradient for each of [`attn_params`] whose tensor tracks an op).
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
    let (b, t, c) = x.dims3()?;
    let (h, kv, d) = (w.heads, w.kv_heads, w.head_dim);
    let (norm, eps) = w.norm;
    let shapes = [(h * d, c), (kv * d, c), (kv * d, c), (c, h * d)];
    let weights = [w.q.0, w.k.0, w.v.0, w.o];
    let biases = [w.q.1, w.k.1, w.v.1, None];
    let fits = weights
        .iter()
        .zip(shapes)
        .all(|(w, s)| w.dims2().ok() == Some(s))
        && biases
            .iter()
            .zip(shapes)
            .all(|(b, (o, _))| b.is_none_or(|b| b.dims() == [o]))
        && w.lora
            .iter()
            .zip(shapes)
            .all(|(ad, (o, i))| ad.is_none_or(|ad| ad.fits(o, i)))
        && norm.dims() == [c];
    if !fits || h == 0 || kv == 0 || h % kv != 0 || b * t == 0 {
        candle_core::bail!(
            "decoder_attention: x {:?}, {h} heads / {kv} kv heads of {d}, weights {:?}, norm {:?} \
             do not fit",
            x.dims(),
            weights.map(|w| w.dims().to_vec()),
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
    let ws = weights.map(|w| w.detach());
    let bs = biases.map(|b| b.map(Tensor::detach));
    let mut ads: [Option<Adapter>; 4] = Default::default();
    for (slot, ad) in ads.iter_mut().zip(&w.lora) {
        *slot = ad.map(Adapter::prepared).transpose()?;
    }
    // Projection p of x, and x Aᵀ for the backward.
    let lin = |p: usize, x: &Tensor| project(x, &ws[p], bs[p].as_ref(), ads[p].as_ref());
    let hs = omr_kernels::rmsnorm(&xd, &w_in, eps)?;
    let (q, xa_q) = lin(Q, &hs)?;
    let (k, xa_k) = lin(K, &hs)?;
    let (v, xa_v) = lin(V, &hs)?;
    drop(hs);
    let qr = omr_kernels::rotary(&q.reshape((b, t, h, d))?, cos, sin)?;
    let kr = omr_kernels::rotary(&k.reshape((b, t, kv, d))?, cos, sin)?;
    let v = v.reshape((b, t, kv, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let (a, attn) = crate::kept_attn::forward(&qr, &kr, &v, mask, scale)?;
    let a2 = a.reshape((b, t, h * d))?;
    let (ao, xa_o) = lin(O, &a2)?;
    let y = (xd.clone(), ao);
    let xa = [xa_q, xa_k, xa_v, xa_o];
    let (cos, sin) = (cos.clone(), sin.clone());
    // dL/dy → (dL/dx, the gradient of each parameter in `attn_params`' order).
    let backward = move |dy: &Tensor| -> Result<HalfGrads> {
        let mut grads: Vec<Option<Tensor>> = vec![None; BASE + 8];
        let flat = |x: &Tensor| x.reshape((rows, x.elem_count() / rows));
        // dW = gᵀ·x in the weight's (O, I) layout, for parameter i.
        let dw = |i: usize, g: &Tensor, x: &Tensor| -> Result<Option<Tensor>> {
            match need[i] {
                true => Ok(Some(flat(g)?.t()?.matmul(&flat(x)?)?)),
                false => Ok(None),
            }
        };
        // db = 1ᵀ·g, for parameter i.
        let db = |i: usize, g: &Tensor| -> Result<Option<Tensor>> {
            if !need[i] {
                return Ok(None);
            }
            let g = flat(g)?;
            let n = g.dim(1)?;
            Ok(Some(
                Tensor::ones((1, rows), g.dtype(), g.device())?
                    .matmul(&g)?
                    .reshape(n)?,
            ))
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
            pr.dx(g2, &ws[p], &gb)
        };
        let dy = dy.to_dtype(dt)?;
        let da = back(O, &flat(&dy)?, Some(&flat(&a2)?))?.reshape((b, t, h, d))?;
        let d_o = dw(7, &dy, &a2)?;
        let (dqr, dkr, dv) = attn.backward(&qr, &kr, &v, &a, &da)?;
        let dq = omr_kernels::rotary::rotary_inverse(&dqr.to_dtype(dt)?, &cos, &sin)?;
        let dk = omr_kernels::rotary::rotary_inverse(&dkr.to_dtype(dt)?, &cos, &sin)?;
        let dv = dv.to_dtype(dt)?;
        let (dq, dk, dv) = (flat(&dq)?, flat(&dk)?, flat(&dv)?);
        // The norm's output again (the forward's bits), where a weight's or an A's gradient
        // needs it.
        let hs = match [1, 3, 5, BASE, BASE + 2, BASE + 4].iter().any(|&i| need[i]) {
            true => Some(flat(&omr_kernels::rmsnorm(&xd, &w_in, eps)?)?),
            false => None,
        };
        let hs = hs.as_ref();
        let (gq, gk, gv) = (back(Q, &dq, hs)?, back(K, &dk, hs)?, back(V, &dv, hs)?);
        // Summed in the order candle's GradStore sums the per-op path's: v's, k's, then q's.
        let dhs = ((gv + gk)? + gq)?.reshape((b, t, c))?;
        if let Some(hs) = hs {
            grads[1] = dw(1, &dq, hs)?;
            grads[3] = dw(3, &dk, hs)?;
            grads[5] = dw(5, &dv, hs)?;
        }
        grads[2] = db(2, &dq)?;
        grads[4] = db(4, &dk)?;
        grads[6] = db(6, &dv)?;
        grads[7] = d_o;
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
mod tests {
    use super::super::test_values::{assert_same_grads, bits, rand};
    use super::*;
    use crate::linear::{Ctx, Kernels};
    use crate::lora::LoraAdapter;
    use crate::ops::{frozen_linear, linear_op_to, linear_residual};
    use candle_core::{DType, Var};

    /// `decoder_attention` against the per-op path it replaces (the fused RMSNorm op, q / k /
    /// v through `linear_op_to` or the LoRA op, rotary, the flash attention op, o_proj +
    /// residual), packed rows with two segments, GQA (4 heads, 2 kv heads): the output and
    /// every gradient, f32 and bf16, a full fine-tune (norm, weights and biases trainable),
    /// LoRA on a frozen base (adapters on q, v, o), and a frozen layer that only passes x's
    /// gradient on. Equal bit for bit.
    #[test]
    fn decoder_attention_equals_the_per_op_path() -> Result<()> {
        let (b, t, c, h, kv, d) = (2, 6, 16, 4, 2, 4);
        let ctx = Ctx {
            kernels: Kernels::Fused,
            ..Ctx::default()
        };
        let segs = vec![vec![1, 1, 1, 2, 2, 2], vec![1, 1, 1, 1, 1, 0]];
        let mask = crate::fused::text_mask(&segs, t, &candle_core::Device::Cpu)?;
        let theta = ((rand(9, &[b, t, d / 2])? + 1.0)? * 3.0)?;
        let (cos, sin) = (theta.cos()?, theta.sin()?);
        for dtype in [DType::F32, DType::BF16] {
            for (frozen, lora) in [(false, false), (true, true), (true, false)] {
                let var = |t: Tensor| -> Result<Tensor> {
                    Ok(Var::from_tensor(&t.to_dtype(dtype)?)?.as_tensor().clone())
                };
                let base = |t: Tensor| -> Result<Tensor> {
                    match frozen {
                        true => t.to_dtype(dtype),
                        false => var(t),
                    }
                };
                let x = var(rand(1, &[b, t, c])?)?;
                let norm = match frozen {
                    true => ((rand(2, &[c])? * 0.5)? + 1.0)?,
                    false => Var::from_tensor(&((rand(2, &[c])? * 0.5)? + 1.0)?)?
                        .as_tensor()
                        .clone(),
                };
                let outs = [h * d, kv * d, kv * d, c];
                let ins = [c, c, c, h * d];
                let mut ws = Vec::new();
                let mut bs = Vec::new();
                for p in 0..4 {
                    ws.push(base((rand(10 + p as u64, &[outs[p], ins[p]])? * 0.4)?)?);
                    bs.push(match p {
                        3 => None,
                        _ => Some(base((rand(20 + p as u64, &[outs[p]])? * 0.2)?)?),
                    });
                }
                let adapters: Vec<Option<Adapter>> = (0..4)
                    .map(|p| -> Result<Option<Adapter>> {
                        Ok((lora && p != 1).then_some(Adapter {
                            a: var((rand(30 + p as u64, &[3, ins[p]])? * 0.5)?)?,
                            b: var((rand(40 + p as u64, &[outs[p], 3])? * 0.5)?)?,
                            scale: 2.0,
                        }))
                    })
                    .collect::<Result<_>>()?;
                let w = AttnWeights {
                    norm: (&norm, 1e-6),
                    q: (&ws[0], bs[0].as_ref()),
                    k: (&ws[1], bs[1].as_ref()),
                    v: (&ws[2], bs[2].as_ref()),
                    o: &ws[3],
                    lora: [
                        adapters[0].as_ref(),
                        adapters[1].as_ref(),
                        adapters[2].as_ref(),
                        adapters[3].as_ref(),
                    ],
                    heads: h,
                    kv_heads: kv,
                    head_dim: d,
                };
                let one = decoder_attention(&x, &w, &cos, &sin, &mask)?;
                // The per-op path (text.rs before the unit).
                let proj = |p: usize, x: &Tensor, out: &[usize]| -> Result<Tensor> {
                    match &adapters[p] {
                        Some(ad) => LoraAdapter::from_parts(ad.a.clone(), ad.b.clone(), 2.0, 0.0)
                            .forward(x, &ws[p], bs[p].as_ref(), "m", &ctx)?
                            .reshape(out),
                        None if frozen => frozen_linear(x, &ws[p], bs[p].as_ref())?.reshape(out),
                        None => linear_op_to(x, &ws[p], bs[p].as_ref(), out),
                    }
                };
                let hs = omr_kernels::rmsnorm(&x, &norm.to_dtype(dtype)?, 1e-6)?;
                let q = omr_kernels::rotary(&proj(0, &hs, &[b, t, h, d])?, &cos, &sin)?;
                let k = omr_kernels::rotary(&proj(1, &hs, &[b, t, kv, d])?, &cos, &sin)?;
                let v = proj(2, &hs, &[b, t, kv, d])?;
                let a = omr_kernels::flash_attn(&q, &k, &v, &mask, 1.0 / (d as f64).sqrt())?;
                let ops = match &adapters[3] {
                    Some(_) => (&x + proj(3, &a.reshape((b, t, h * d))?, &[b, t, c])?)?,
                    None => linear_residual(&a, &ws[3], &x)?,
                };
                let what = format!("{dtype:?}, frozen base {frozen}, LoRA {lora}");
                assert_eq!(one.dims(), [b, t, c]);
                assert_eq!(bits(&one)?, bits(&ops)?, "{what}: output");
                let k = rand(7, &[b, t, c])?.to_dtype(dtype)?;
                let g1 = (&one * &k)?.sum_all()?.backward()?;
                let g2 = (&ops * &k)?.sum_all()?.backward()?;
                let mut args: Vec<(String, &Tensor)> =
                    vec![("x".into(), &x), ("norm".into(), &norm)];
                for p in 0..4 {
                    args.push((format!("w{p}"), &ws[p]));
                    if let Some(b) = &bs[p] {
                        args.push((format!("b{p}"), b));
                    }
                    if let Some(ad) = &adapters[p] {
                        args.push((format!("A{p}"), &ad.a));
                        args.push((format!("B{p}"), &ad.b));
                    }
                }
                assert_same_grads(&what, &g1, &g2, &args)?;
            }
        }
        Ok(())
    }
}
