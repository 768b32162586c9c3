//! A decoder layer (and a Qwen2.5-VL vision block) as one autograd op on the fused path
//! (opt-in: `OMR_BLOCK_OP=1`, or [`with_block_op`]). Decoder layers carry LoRA adapters
//! (without dropout) in the op too.
//!
//! candle's backward starts every gradient it accumulates from `zeros_like` and adds into it
//! (`GradStore::or_insert`), once per graph node and argument: about 40 adds per decoder
//! layer through the per-op path (norms, three projections, reshapes, rotary, attention,
//! residuals, the MLP), ~70 ms of the 3B step on an H200 (run 6 profile). Here the layer's
//! forward runs without a graph and its backward is chained by hand from the two units'
//! halves (`ops::attn_half`, `ops::mlp_half`: the fused ops' backward functions and the
//! GEMMs of each linear), so only the layer input and its trainable weights meet the
//! `GradStore`.
//!
//! candle's custom ops take at most three arguments, so the layer's output is attached to its
//! input and weights by a short chain of attach ops: the last one (reached first by the
//! backward) computes every gradient of the layer and leaves the others for the earlier ones,
//! which pass dL/dy along unchanged. Same function and gradients as the per-op path
//! (`tests/block.rs` compares them on CPU).

use crate::ops::{
    self, attach_grad, attach_grad2, attach_grad3, attach_sum2, attach_sum3, attn_half,
    attn_params, mlp_half, mlp_params, HalfGrads,
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
    crate::fused::with_forced(&FORCE, on, f)
}

/// A LoRA adapter of one linear, y += scale · (x Aᵀ) Bᵀ with A (r, I) and B (O, r), in a
/// forward that draws no dropout mask.
#[derive(Clone)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// The weights of one decoder layer (compute copies on a GPU): norms as stored (their gradient
/// is cast back), projections (O, I), and the adapters.
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
    /// Adapters of q, k, v, o, gate, up, down (indices [`Q`] … [`DOWN`]).
    pub lora: [Option<Adapter>; 7],
}

// The layer's linears, the order of [`DecoderWeights::lora`].
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

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
    crate::fused::count_block();
    let x = &x.contiguous()?;
    let lora = |li: usize| w.lora[li].as_ref();
    let attn_w = ops::AttnWeights {
        norm: (&w.input_norm, dims.eps),
        qkv: ops::Qkv::Split([
            (&w.q.0, w.q.1.as_ref()),
            (&w.k.0, w.k.1.as_ref()),
            (&w.v.0, w.v.1.as_ref()),
        ]),
        o: (&w.o, None),
        lora: [lora(Q), lora(K), lora(V), lora(O)],
        heads: dims.heads,
        kv_heads: dims.kv_heads,
        head_dim: dims.head_dim,
    };
    let mlp_w = ops::MlpWeights {
        gate: &w.gate,
        up: &w.up,
        down: &w.down,
        bias: [None; 3],
        lora: [lora(GATE), lora(UP), lora(DOWN)],
        norm: Some((&w.post_norm, dims.eps)),
    };
    two_halves(x, &attn_w, &mlp_w, cos, sin, mask)
}

/// The weights of one Qwen2.5-VL vision block (RMSNorm, SwiGLU MLP, every linear with a
/// bias).
pub struct VisionWeights {
    pub norm1: Tensor,
    pub qkv: (Tensor, Tensor),
    pub proj: (Tensor, Tensor),
    pub norm2: Tensor,
    pub gate: (Tensor, Tensor),
    pub up: (Tensor, Tensor),
    pub down: (Tensor, Tensor),
}

/// One Qwen2.5-VL vision block, x: (N, C) → (N, C), with `heads` heads, the 2-D rotary half
/// tables cos/sin (1, N, D/2) and the block-diagonal mask (whole images or windows) of the
/// pass; RMSNorm epsilon 1e-6 as the per-op path. The two halves as the fused path's units
/// run them (`ops::decoder_attention` with the packed qkv, `ops::decoder_mlp` with biases),
/// chained in one op.
pub fn vision_layer(
    x: &Tensor,
    w: &VisionWeights,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttnMask,
) -> Result<Tensor> {
    crate::fused::count_block();
    let x = &x.contiguous()?;
    let (_, c) = x.dims2()?;
    let eps = 1e-6;
    let attn_w = ops::AttnWeights {
        norm: (&w.norm1, eps),
        qkv: ops::Qkv::Packed((&w.qkv.0, Some(&w.qkv.1))),
        o: (&w.proj.0, Some(&w.proj.1)),
        lora: [None; 4],
        heads,
        kv_heads: heads,
        head_dim: c / heads,
    };
    let mlp_w = ops::MlpWeights {
        gate: &w.gate.0,
        up: &w.up.0,
        down: &w.down.0,
        bias: [Some(&w.gate.1), Some(&w.up.1), Some(&w.down.1)],
        lora: [None; 3],
        norm: Some((&w.norm2, eps)),
    };
    two_halves(x, &attn_w, &mlp_w, cos, sin, mask)
}

/// The two halves as the fused path's units run them (`ops::attn_half`, `ops::mlp_half`),
/// chained in one op: x2 = x + attention, y = x2 + mlp. Its parameters are the halves' own
/// lists one after the other (`attn_params`, then `mlp_params` without a residual), and so
/// are the gradients the backward returns. x contiguous.
fn two_halves(
    x: &Tensor,
    attn_w: &ops::AttnWeights,
    mlp_w: &ops::MlpWeights,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttnMask,
) -> Result<Tensor> {
    let ((xd, ao), attn_back) = attn_half(x, x.track_op(), attn_w, cos, sin, mask)?;
    let x2 = (xd + ao)?;
    let (y, mlp_back) = mlp_half(&x2, true, mlp_w, None)?;
    drop(x2);
    let mut params = attn_params(attn_w);
    params.extend(mlp_params(mlp_w, None));
    let need: Vec<bool> = params
        .iter()
        .map(|p| p.is_some_and(Tensor::track_op))
        .collect();
    let backward = move |dy: &Tensor| -> Result<HalfGrads> {
        let (dx2, m) = mlp_back(dy)?;
        let dx2 = dx2.ok_or_else(|| candle_core::Error::Msg("block op: no dL/dx2".into()))?;
        let (dx, mut grads) = attn_back(&dx2)?;
        grads.extend(m);
        Ok((dx, grads))
    };
    attach_chain(x, &params, &need, y, backward)
}

/// The gradients the chain's last op computed, taken by the others.
type Stash = Arc<Mutex<Option<HalfGrads>>>;

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
    backward: impl Fn(&Tensor) -> Result<HalfGrads> + Send + Sync + 'static,
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
