//! A decoder layer (and a Qwen2.5-VL vision block) as one autograd op on the fused path
//! (opt-in: `OMR_BLOCK_OP=1`, or [`with_block_op`]). Decoder layers carry LoRA adapters
//! (without dropout) in the op too.
//!
//! candle's backward starts every gradient it accumulates from `zeros_like` and adds into it
//! (`GradStore::or_insert`), once per graph node and argument: about 40 adds per decoder
//! layer through the per-op path (norms, three projections, reshapes, rotary, attention,
//! residuals, the MLP), ~70 ms of the 3B step on an H200 (run 6 profile). Here the layer's
//! forward runs without a graph and its backward is chained by hand from the fused ops'
//! backward functions (RMSNorm, SwiGLU, rotary inverse, attention, the GEMMs of each linear),
//! so only the layer input and its trainable weights meet the `GradStore`.
//!
//! candle's custom ops take at most three arguments, so the layer's output is attached to its
//! input and weights by a short chain of attach ops: the last one (reached first by the
//! backward) computes every gradient of the layer and leaves the others for the earlier ones,
//! which pass dL/dy along unchanged. Same function and gradients as the per-op path
//! (`tests/block.rs` compares them on CPU).

use crate::ops::{
    self, attach_grad, attach_grad2, attach_grad3, attach_sum2, attach_sum3, matmul_nt, matmul_t,
    mlp_half,
};
use candle_core::{DType, Result, Tensor};
use omr_kernels::AttnMask;
use std::cell::Cell;
use std::sync::{Arc, Mutex};

thread_local! {
    static FORCE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether decoder layers on the fused path run as one op: [`with_block_op`]'s choice on this
/// thread, else `OMR_BLOCK_OP=1`.
pub fn block_op_enabled() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    FORCE.with(Cell::get).unwrap_or_else(|| {
        *ENV.get_or_init(|| std::env::var("OMR_BLOCK_OP").is_ok_and(|v| v == "1"))
    })
}

/// Runs `f` with the block op switched on or off on this thread (forwards run on the calling
/// thread; the backward uses what the forward built).
pub fn with_block_op<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = FORCE.with(|c| c.replace(Some(on)));
    let r = f();
    FORCE.with(|c| c.set(before));
    r
}

/// A LoRA adapter of one linear, y += scale · (x Aᵀ) Bᵀ with A (r, I) and B (O, r), in a
/// forward that draws no dropout mask.
#[derive(Clone)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// The weights of one decoder layer (compute copies on a GPU), in the order their gradients
/// are returned: norms as stored (their gradient is cast back), projections (O, I), then A and
/// B of each adapter.
pub struct DecoderWeights {
    pub input_norm: Tensor,
    pub q: (Tensor, Option<Tensor>),
    pub k: (Tensor, Option<Tensor>),
    pub v: (Tensor, Option<Tensor>),
    pub o: Tensor,
    pub post_norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// Adapters of q, k, v, o, gate, up, down (in [`LINEARS`]' order).
    pub lora: [Option<Adapter>; 7],
}

/// The layer's linears, the order of [`DecoderWeights::lora`].
const LINEARS: usize = 7;
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;
/// Parameters before the adapters' A and B (norms, weights, biases).
const BASE_PARAMS: usize = 12;

impl DecoderWeights {
    fn params(&self) -> Vec<Option<&Tensor>> {
        let mut p = vec![
            Some(&self.input_norm),
            Some(&self.q.0),
            self.q.1.as_ref(),
            Some(&self.k.0),
            self.k.1.as_ref(),
            Some(&self.v.0),
            self.v.1.as_ref(),
            Some(&self.o),
            Some(&self.post_norm),
            Some(&self.gate),
            Some(&self.up),
            Some(&self.down),
        ];
        for ad in &self.lora {
            p.push(ad.as_ref().map(|a| &a.a));
            p.push(ad.as_ref().map(|a| &a.b));
        }
        p
    }
}

/// Shapes of the layer: heads, key/value heads, head dim, RMSNorm epsilon.
#[derive(Clone, Copy, Debug)]
pub struct DecoderDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
}

/// One decoder layer, x: (B, T, C) → (B, T, C), with the fused ops and the rotary half
/// tables cos/sin (B, T, D/2) of the pass.
pub fn decoder_layer(
    x: &Tensor,
    w: &DecoderWeights,
    dims: DecoderDims,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttnMask,
) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let DecoderDims {
        heads: h,
        kv_heads: kv,
        head_dim: d,
        eps,
    } = dims;
    let dt = x.dtype();
    let xd = x.detach();
    let det = |t: &Tensor| t.detach();
    // The attention's adapters with B scaled once here (O × r), not each (…, O) output (the
    // MLP half scales its own).
    let mut ads: [Option<Adapter>; LINEARS] = Default::default();
    for (slot, ad) in ads.iter_mut().zip(&w.lora).take(O + 1) {
        if let Some(ad) = ad {
            *slot = Some(Adapter {
                a: det(&ad.a),
                b: (det(&ad.b) * ad.scale)?,
                scale: ad.scale,
            });
        }
    }
    // Linear `li` on x: x Wᵀ (+ b) + (x Aᵀ)(scale · B)ᵀ, and x Aᵀ for the backward.
    let lin = |li: usize, x: &Tensor, w: &Tensor, bias: Option<&Tensor>| {
        let y = ops::linear(x, &det(w), bias.map(det).as_ref())?;
        match &ads[li] {
            None => Ok::<_, candle_core::Error>((y, None)),
            Some(ad) => {
                let xa = matmul_t(x, &ad.a)?;
                let y = (y + matmul_t(&xa, &ad.b)?)?;
                Ok((y, Some(xa)))
            }
        }
    };
    crate::fused::count_block();
    // Forward without a graph; what the backward needs is kept.
    let w_in = det(&w.input_norm).to_dtype(dt)?;
    let hs = omr_kernels::rmsnorm(&xd, &w_in, eps)?;
    let (q, xa_q) = lin(Q, &hs, &w.q.0, w.q.1.as_ref())?;
    let (k, xa_k) = lin(K, &hs, &w.k.0, w.k.1.as_ref())?;
    let (v, xa_v) = lin(V, &hs, &w.v.0, w.v.1.as_ref())?;
    let q = q.reshape((b, t, h, d))?;
    let k = k.reshape((b, t, kv, d))?;
    let v = v.reshape((b, t, kv, d))?;
    let qr = omr_kernels::rotary(&q, cos, sin)?;
    let kr = omr_kernels::rotary(&k, cos, sin)?;
    let scale = 1.0 / (d as f64).sqrt();
    let (a, attn) = crate::kept_attn::forward(&qr, &kr, &v, mask, scale)?;
    let a2 = a.reshape((b, t, h * d))?;
    let (ao, xa_o) = lin(O, &a2, &w.o, None)?;
    let x2 = (&xd + ao)?;
    // The second half, `x2 + mlp(rmsnorm(x2))`, as the fused path's MLP unit runs it
    // (`ops::decoder_mlp`: the norm's output and the activation recomputed in the backward);
    // its output parts are added by the chain's last op.
    let mlp_w = crate::ops::MlpWeights {
        gate: &w.gate,
        up: &w.up,
        down: &w.down,
        lora: [
            w.lora[GATE].as_ref(),
            w.lora[UP].as_ref(),
            w.lora[DOWN].as_ref(),
        ],
        norm: Some((&w.post_norm, eps)),
    };
    let (y, mlp_back) = mlp_half(&x2, true, &mlp_w, None)?;

    let params = w.params();
    let need: Vec<bool> = params
        .iter()
        .map(|p| p.is_some_and(Tensor::track_op))
        .collect();
    let norm_dtype = w.input_norm.dtype();
    let ws = [&w.q.0, &w.k.0, &w.v.0, &w.o].map(det);
    let xa = [xa_q, xa_k, xa_v, xa_o];
    let (cos, sin) = (cos.clone(), sin.clone());
    let rows = b * t;
    let need_c = need.clone();
    // dL/dy → (dL/dx, the gradient of each parameter that needs one).
    let backward = move |dy: &Tensor| -> Result<(Option<Tensor>, Vec<Option<Tensor>>)> {
        let gr = Grads {
            rows,
            need: &need_c,
        };
        let (dw, db, flat) = (
            |i, g: &Tensor, x: &Tensor| gr.dw(i, g, x),
            |i, g: &Tensor| gr.db(i, g),
            |x: &Tensor| gr.flat(x),
        );
        let mut lora_grads: Vec<Option<Tensor>> = vec![None; 2 * LINEARS];
        // Through linear `li` with output gradient g: dL/dx, and g (scale · B) when it has an
        // adapter.
        let back_dx = |li: usize, g: &Tensor| -> Result<(Tensor, Option<Tensor>)> {
            let dx = matmul_nt(g, &ws[li])?;
            let Some(ad) = &ads[li] else {
                return Ok((dx, None));
            };
            let gb = matmul_nt(g, &ad.b)?; // g (scale · B): (…, r)
            Ok(((dx + matmul_nt(&gb, &ad.a)?)?, Some(gb)))
        };
        // The adapter gradients of linear `li` with input x, output gradient g and g·B (gb),
        // into `lora_grads`.
        let mut adapter_grads = |li: usize, g: &Tensor, gb: Option<Tensor>, x: &Tensor| {
            let (Some(ad), Some(xa), Some(gb)) = (&ads[li], &xa[li], gb) else {
                return Ok::<_, candle_core::Error>(());
            };
            let (ia, ib) = (BASE_PARAMS + 2 * li, BASE_PARAMS + 2 * li + 1);
            lora_grads[2 * li] = gr.dw(ia, &gb, x)?; // (r, I)
            lora_grads[2 * li + 1] = match gr.dw(ib, g, xa)? {
                Some(g) => Some((g * ad.scale)?), // scale · gᵀ (x Aᵀ): (O, r)
                None => None,
            };
            Ok(())
        };
        let dy = dy.to_dtype(dt)?;
        // MLP: y = x2 + mlp(rmsnorm(x2)); dL/dx2 includes the residual's dy.
        let (dx2, mlp_grads) = mlp_back(&dy)?;
        let dx2 = dx2.ok_or_else(|| candle_core::Error::Msg("decoder block: no dL/dx2".into()))?;
        // Through linear `li` with input x and output gradient g: dL/dx, and its adapter's
        // gradients into `lora_grads`.
        let mut back = |li: usize, g: &Tensor, x: &Tensor| -> Result<Tensor> {
            let (dx, gb) = back_dx(li, g)?;
            adapter_grads(li, g, gb, x)?;
            Ok(dx)
        };
        // Attention: x2 = x + attn(rot(q), rot(k), v)·Woᵀ
        let da = back(O, &dx2, &a2)?.reshape((b, t, h, d))?;
        let d_o = dw(7, &dx2, &a2)?;
        let (dqr, dkr, dv) = attn.backward(&qr, &kr, &v, &a, &da)?;
        let dq = omr_kernels::rotary::rotary_inverse(&dqr.to_dtype(dt)?, &cos, &sin)?;
        let dk = omr_kernels::rotary::rotary_inverse(&dkr.to_dtype(dt)?, &cos, &sin)?;
        let dv = dv.to_dtype(dt)?;
        let (dq, dk, dv) = (flat(&dq)?, flat(&dk)?, flat(&dv)?);
        let dhs =
            (back(Q, &dq, &hs)? + back(K, &dk, &hs)? + back(V, &dv, &hs)?)?.reshape((b, t, c))?;
        let (dxn, dw_in) = omr_kernels::rmsnorm::backward(&xd, &w_in, &dhs, eps)?;
        // The MLP half's gradients, in `mlp_params`' order: gate, up, down, (r), the gate's,
        // up's and down's (A, B), the norm.
        let mut m = mlp_grads;
        let mut grads = vec![
            gr.norm(0, dw_in, norm_dtype)?,
            dw(1, &dq, &hs)?,
            db(2, &dq)?,
            dw(3, &dk, &hs)?,
            db(4, &dk)?,
            dw(5, &dv, &hs)?,
            db(6, &dv)?,
            d_o,
            m[10].take(),
            m[0].take(),
            m[1].take(),
            m[2].take(),
        ];
        for (li, k) in [(GATE, 4), (UP, 6), (DOWN, 8)] {
            lora_grads[2 * li] = m[k].take();
            lora_grads[2 * li + 1] = m[k + 1].take();
        }
        grads.extend(lora_grads);
        Ok((Some((dx2 + dxn)?), grads))
    };
    attach_chain(x, &params, &need, y, backward)
}

/// The weights of one Qwen2.5-VL vision block (RMSNorm, SwiGLU MLP, every linear with a
/// bias), in the order their gradients are returned.
pub struct VisionWeights {
    pub norm1: Tensor,
    pub qkv: (Tensor, Tensor),
    pub proj: (Tensor, Tensor),
    pub norm2: Tensor,
    pub gate: (Tensor, Tensor),
    pub up: (Tensor, Tensor),
    pub down: (Tensor, Tensor),
}

impl VisionWeights {
    fn params(&self) -> [Option<&Tensor>; 12] {
        [
            Some(&self.norm1),
            Some(&self.qkv.0),
            Some(&self.qkv.1),
            Some(&self.proj.0),
            Some(&self.proj.1),
            Some(&self.norm2),
            Some(&self.gate.0),
            Some(&self.gate.1),
            Some(&self.up.0),
            Some(&self.up.1),
            Some(&self.down.0),
            Some(&self.down.1),
        ]
    }
}

/// One Qwen2.5-VL vision block, x: (N, C) → (N, C), with `heads` heads, the 2-D rotary half
/// tables cos/sin (1, N, D/2) and the block-diagonal mask (whole images or windows) of the
/// pass; RMSNorm epsilon 1e-6 as the per-op path.
pub fn vision_layer(
    x: &Tensor,
    w: &VisionWeights,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttnMask,
) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let (h, d, eps) = (heads, c / heads, 1e-6);
    let dt = x.dtype();
    let xd = x.detach();
    let det = |t: &Tensor| t.detach();
    let lin = |x: &Tensor, (w, b): &(Tensor, Tensor)| ops::linear(x, &det(w), Some(&det(b)));
    crate::fused::count_block();
    let w1 = det(&w.norm1).to_dtype(dt)?;
    let hs = omr_kernels::rmsnorm(&xd, &w1, eps)?;
    let qkv = lin(&hs, &w.qkv)?.reshape((n, 3, h, d))?;
    // One batch row of N patches: (1, N, H, D).
    let part = |i: usize| qkv.narrow(1, i, 1)?.reshape((1, n, h, d))?.contiguous();
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let qr = omr_kernels::rotary(&q, cos, sin)?;
    let kr = omr_kernels::rotary(&k, cos, sin)?;
    let (a, attn) = crate::kept_attn::forward(&qr, &kr, &v, mask, 1.0 / (d as f64).sqrt())?;
    let a2 = a.reshape((n, c))?;
    let x2 = (&xd + lin(&a2, &w.proj)?)?;
    let w2 = det(&w.norm2).to_dtype(dt)?;
    let hs2 = omr_kernels::rmsnorm(&x2, &w2, eps)?;
    let gt = lin(&hs2, &w.gate)?;
    let up = lin(&hs2, &w.up)?;
    let g = omr_kernels::swiglu(&gt, &up)?;
    let y = (x2.clone(), lin(&g, &w.down)?);

    let params = w.params();
    let need: Vec<bool> = params
        .iter()
        .map(|p| p.is_some_and(Tensor::track_op))
        .collect();
    let norm_dtypes = (w.norm1.dtype(), w.norm2.dtype());
    let (wqkv, wp, wg, wu, wd) = (
        det(&w.qkv.0),
        det(&w.proj.0),
        det(&w.gate.0),
        det(&w.up.0),
        det(&w.down.0),
    );
    let (cos, sin) = (cos.clone(), sin.clone());
    let need_c = need.clone();
    let backward = move |dy: &Tensor| -> Result<(Option<Tensor>, Vec<Option<Tensor>>)> {
        let gr = Grads {
            rows: n,
            need: &need_c,
        };
        let dy = dy.to_dtype(dt)?;
        // MLP
        let dg = matmul_nt(&dy, &wd)?;
        let (dgt, dup) = omr_kernels::swiglu::backward(&gt, &up, &dg)?;
        let dhs2 = (matmul_nt(&dgt, &wg)? + matmul_nt(&dup, &wu)?)?;
        let (dx2n, dw2) = omr_kernels::rmsnorm::backward(&x2, &w2, &dhs2, eps)?;
        let dx2 = (&dy + dx2n)?;
        // Attention
        let da = matmul_nt(&dx2, &wp)?.reshape((1, n, h, d))?;
        let (dqr, dkr, dv) = attn.backward(&qr, &kr, &v, &a, &da)?;
        let dq = omr_kernels::rotary::rotary_inverse(&dqr.to_dtype(dt)?, &cos, &sin)?;
        let dk = omr_kernels::rotary::rotary_inverse(&dkr.to_dtype(dt)?, &cos, &sin)?;
        let dqkv = Tensor::stack(
            &[
                dq.reshape((n, h, d))?,
                dk.reshape((n, h, d))?,
                dv.to_dtype(dt)?.reshape((n, h, d))?,
            ],
            1,
        )?
        .reshape((n, 3 * c))?;
        let dhs = dqkv.matmul(&wqkv)?;
        let (dxn, dw1) = omr_kernels::rmsnorm::backward(&xd, &w1, &dhs, eps)?;
        let grads = vec![
            gr.norm(0, dw1, norm_dtypes.0)?,
            gr.dw(1, &dqkv, &hs)?,
            gr.db(2, &dqkv)?,
            gr.dw(3, &dx2, &a2)?,
            gr.db(4, &dx2)?,
            gr.norm(5, dw2, norm_dtypes.1)?,
            gr.dw(6, &dgt, &hs2)?,
            gr.db(7, &dgt)?,
            gr.dw(8, &dup, &hs2)?,
            gr.db(9, &dup)?,
            gr.dw(10, &dy, &g)?,
            gr.db(11, &dy)?,
        ];
        Ok((Some((dx2 + dxn)?), grads))
    };
    attach_chain(x, &params, &need, y, backward)
}

/// The weight and bias gradients of a layer's linears, for the parameters that need one.
struct Grads<'a> {
    rows: usize,
    need: &'a [bool],
}

impl Grads<'_> {
    /// x as (rows, features).
    fn flat(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count() / self.rows;
        x.reshape((self.rows, n))
    }

    /// dW = gᵀ·x in the weight's (O, I) layout, for parameter i.
    fn dw(&self, i: usize, g: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
        match self.need[i] {
            true => Ok(Some(self.flat(g)?.t()?.matmul(&self.flat(x)?)?)),
            false => Ok(None),
        }
    }

    /// db = 1ᵀ·g, for parameter i.
    fn db(&self, i: usize, g: &Tensor) -> Result<Option<Tensor>> {
        if !self.need[i] {
            return Ok(None);
        }
        let g = self.flat(g)?;
        let n = g.dim(1)?;
        Ok(Some(
            Tensor::ones((1, self.rows), g.dtype(), g.device())?
                .matmul(&g)?
                .reshape(n)?,
        ))
    }

    /// A norm weight's gradient, cast back to the parameter's dtype.
    fn norm(&self, i: usize, g: Tensor, dtype: DType) -> Result<Option<Tensor>> {
        match self.need[i] {
            true => Ok(Some(g.to_dtype(dtype)?)),
            false => Ok(None),
        }
    }
}

/// The gradients the chain's last op computed, taken by the others.
type Stash = Arc<Mutex<Option<(Option<Tensor>, Vec<Option<Tensor>>)>>>;

/// `y = y.0 + y.1` attached to `x` and the parameters that need a gradient, through ops of
/// at most three arguments: x and two parameters first, then the previous op's output and two
/// more each. Only the last op outputs `y`, adding the two parts in its forward (a layer's
/// residual and its last projection: no copy of a precomputed sum); the others output a
/// one-element token (the chain's edges need no values), whose gradient is a one-element zero.
pub(crate) fn attach_chain(
    x: &Tensor,
    params: &[Option<&Tensor>],
    need: &[bool],
    y: (Tensor, Tensor),
    backward: impl Fn(&Tensor) -> Result<(Option<Tensor>, Vec<Option<Tensor>>)> + Send + Sync + 'static,
) -> Result<Tensor> {
    let tracked: Vec<usize> = (0..params.len()).filter(|&i| need[i]).collect();
    let x_tracks = x.track_op();
    if tracked.is_empty() && !x_tracks {
        return y.0 + y.1;
    }
    let stash: Stash = Arc::new(Mutex::new(None));
    let y_dims = y.0.dims().to_vec();
    let (dtype, device) = (y.0.dtype(), y.0.device().clone());
    let token_device = device.clone();
    // The gradients of parameters `idx`, and what goes to the op's first argument (dx for the
    // first op, a token's zero for the others). The last op, which every backward pass reaches
    // first (with dL/dy), computes all of them; the others read them.
    let take = move |dy: &Tensor,
                     idx: &[usize],
                     first: bool,
                     last: bool|
          -> Result<(Option<Tensor>, Vec<Option<Tensor>>)> {
        let mut s = stash
            .lock()
            .map_err(|_| candle_core::Error::Msg("decoder block: poisoned".into()))?;
        if last {
            if dy.dims() != y_dims.as_slice() {
                candle_core::bail!("decoder block: dL/dy is {:?}, not {y_dims:?}", dy.dims())
            }
            let (dx, g) = backward(dy)?;
            *s = Some((dx, g));
        }
        let Some((dx, g)) = s.as_ref() else {
            candle_core::bail!("decoder block: the backward reached a token before the output")
        };
        let out = idx.iter().map(|&i| g[i].clone()).collect();
        let first_arg = match first {
            true => dx.clone().filter(|_| x_tracks),
            false => Some(Tensor::zeros(1, dtype, &device)?),
        };
        if first {
            // The first op is the last one the backward reaches: nothing else reads these.
            *s = None;
        }
        Ok((first_arg, out))
    };
    let take = Arc::new(take);
    if tracked.is_empty() {
        return attach_grad(x, (y.0 + y.1)?, move |dy| {
            let (dx, _) = take(dy, &[], true, true)?;
            dx.ok_or_else(|| candle_core::Error::Msg("decoder block: no input gradient".into()))
        });
    }
    let mut carrier = x.clone();
    let ops = tracked.len().div_ceil(2);
    let mut y = Some(y);
    for (n, idx) in tracked.chunks(2).enumerate() {
        let (idx, take, first, last) = (idx.to_vec(), take.clone(), n == 0, n + 1 == ops);
        let args: Vec<&Tensor> = idx
            .iter()
            .map(|&i| params[i].expect("tracked parameters exist"))
            .collect();
        let parts = match last {
            true => y.take(),
            false => None,
        };
        let token = || Tensor::zeros(1, dtype, &token_device);
        carrier = match (idx.len(), parts) {
            (2, parts) => {
                let grads = move |dy: &Tensor| {
                    let (c, mut g) = take(dy, &idx, first, last)?;
                    let g1 = g.pop().flatten();
                    let g0 = g.pop().flatten();
                    Ok((c, g0, g1))
                };
                match parts {
                    Some((a, b)) => attach_sum3([&carrier, args[0], args[1]], a, b, grads)?,
                    None => attach_grad3([&carrier, args[0], args[1]], token()?, grads)?,
                }
            }
            (_, parts) => {
                let grads = move |dy: &Tensor| {
                    let (c, mut g) = take(dy, &idx, first, last)?;
                    Ok((c, g.pop().flatten()))
                };
                match parts {
                    Some((a, b)) => attach_sum2([&carrier, args[0]], a, b, grads)?,
                    None => attach_grad2([&carrier, args[0]], token()?, grads)?,
                }
            }
        };
    }
    Ok(carrier)
}

/// A dtype check the callers share: the block op runs where the fused ops do (f32 or bf16).
pub fn supports(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::F32 | DType::BF16)
}
