//! The ops with two implementations, chosen per forward by [`Ctx::kernels`]: compositions of
//! candle ops (`Kernels::Candle`, the reference and the fast path on CPU) or the fused ops of
//! omr-kernels (`Kernels::Fused`: CUDA kernels on a GPU, their plain-Rust references on CPU).
//!
//! RMSNorm and the SwiGLU gate dispatch here on the ctx. Rotary and attention take different
//! layouts in the two paths (candle: (B, H, T, D) after a transpose; fused: the projections'
//! own (B, T, H, D), no transpose), so text.rs and vision.rs branch on the tables of the pass
//! and call the fused versions below, which also build those tables (rotary half tables,
//! segment-id masks). Every fused call is counted per thread ([`calls`]): tests use it to check
//! which path really ran.

use crate::linear::{Ctx, Kernels};
use crate::ops;
use candle_core::{Device, Result, Tensor};
use omr_kernels::linear_ce::LceChunks;
use omr_kernels::AttnMask;
use std::cell::Cell;
use std::sync::OnceLock;

/// How many times each fused op ran on this thread (attention: computed, not replayed from
/// [`crate::kept_attn`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FusedCalls {
    pub rmsnorm: usize,
    pub swiglu: usize,
    pub rotary: usize,
    pub attention: usize,
    pub linear_ce: usize,
    pub linear_logp: usize,
    /// Halves of a decoder layer or vision block run as one unit ([`decoder_attention`],
    /// [`decoder_mlp`]).
    pub unit: usize,
}

thread_local! {
    static CALLS: Cell<FusedCalls> = const {
        Cell::new(FusedCalls {
            rmsnorm: 0,
            swiglu: 0,
            rotary: 0,
            attention: 0,
            linear_ce: 0,
            linear_logp: 0,
            unit: 0,
        })
    };
    static UNITS: Cell<Option<bool>> = const { Cell::new(None) };
}

/// The fused-op calls made so far by this thread (forwards run on the calling thread).
pub fn calls() -> FusedCalls {
    CALLS.with(Cell::get)
}

fn count(f: impl FnOnce(&mut FusedCalls)) {
    CALLS.with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    });
}

/// A decoder layer or vision block ran as one op ([`crate::block`]): its two rotary calls (its
/// attention counts itself, in [`crate::kept_attn::forward`]).
pub(crate) fn count_block() {
    count(|c| c.rotary += 2);
}

/// An attention was computed (not replayed from [`crate::kept_attn`]'s tape).
pub(crate) fn count_attention() {
    count(|c| c.attention += 1);
}

/// Qwen2RMSNorm over the last dimension. x: (…, C), w: (C) → (…, C)
pub fn rmsnorm(x: &Tensor, w: &Tensor, eps: f64, ctx: &Ctx) -> Result<Tensor> {
    match ctx.kernels {
        Kernels::Candle => ops::rmsnorm(x, w, eps),
        Kernels::Fused => {
            count(|c| c.rmsnorm += 1);
            omr_kernels::rmsnorm(x, &w.to_dtype(x.dtype())?, eps)
        }
    }
}

/// The SwiGLU gate `silu(g) · u`. g, u: (…, I) → (…, I)
pub fn swiglu(g: &Tensor, u: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    match ctx.kernels {
        Kernels::Candle => g.silu()? * u,
        Kernels::Fused => {
            count(|c| c.swiglu += 1);
            omr_kernels::swiglu(g, u)
        }
    }
}

/// The decoder's gated MLP up to its down projection, `silu(x·Wgᵀ) · (x·Wuᵀ)`, as one op
/// ([`ops::swiglu_mlp`]; counted as a SwiGLU). x: (…, C), wg, wu: (I, C) → (…, I)
pub fn swiglu_mlp(x: &Tensor, wg: &Tensor, wu: &Tensor) -> Result<Tensor> {
    count(|c| c.swiglu += 1);
    ops::swiglu_mlp(x, wg, wu)
}

/// Whether the input norm + attention of decoder layers and (Qwen2.5-VL) vision blocks run as
/// one unit on the fused path ([`decoder_attention`]): [`with_units`]' choice on this thread,
/// else unless `OMR_ATTN_UNIT=0` (the per-op path, for measuring it).
pub fn attn_unit_enabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    UNITS
        .with(Cell::get)
        .unwrap_or_else(|| !switched_off(&OFF, "OMR_ATTN_UNIT"))
}

/// Runs `f` with both halves' units switched on or off on this thread, whatever
/// `OMR_ATTN_UNIT` / `OMR_MLP_UNIT` say (forwards run on the calling thread; the backward uses
/// what the forward built).
pub fn with_units<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_forced(&UNITS, on, f)
}

/// Runs `f` with the per-thread switch `cell` set to `on`, restoring it after
/// ([`with_units`], `block::with_block_op`).
pub(crate) fn with_forced<R>(
    cell: &'static std::thread::LocalKey<Cell<Option<bool>>>,
    on: bool,
    f: impl FnOnce() -> R,
) -> R {
    let before = cell.with(|c| c.replace(Some(on)));
    let r = f();
    cell.with(|c| c.set(before));
    r
}

/// Whether the environment variable `var` is "0", read once per process into `cell`.
fn switched_off(cell: &'static OnceLock<bool>, var: &str) -> bool {
    *cell.get_or_init(|| std::env::var(var).is_ok_and(|v| v == "0"))
}

/// The decoder layer's (or a vision block's) attention half, `x + attention(rot(q), rot(k),
/// v)·Woᵀ` from `rmsnorm(x)` (LoRA adapters without dropout included), as one unit
/// ([`ops::decoder_attention`]: neither the norm's output nor the pre-rotary q, k kept for the
/// backward; counted as an RMSNorm and two rotaries, its attention counts itself).
/// x: (B, T, C) → (B, T, C)
pub fn decoder_attention(
    x: &Tensor,
    w: &ops::AttnWeights,
    cos: &Tensor,
    sin: &Tensor,
    mask: &AttnMask,
) -> Result<Tensor> {
    count(|c| {
        c.rmsnorm += 1;
        c.rotary += 2;
        c.unit += 1
    });
    ops::decoder_attention(x, w, cos, sin, mask)
}

/// Whether the post-attention norm + MLP of decoder layers and (Qwen2.5-VL) vision blocks run
/// as one unit on the fused path ([`decoder_mlp`]): [`with_units`]' choice on this thread,
/// else unless `OMR_MLP_UNIT=0` (the per-op path as before the unit, for measuring it; the
/// same bits either way).
pub fn mlp_unit_enabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    UNITS
        .with(Cell::get)
        .unwrap_or_else(|| !switched_off(&OFF, "OMR_MLP_UNIT"))
}

/// The decoder layer's (or a vision block's) MLP half, `x + mlp(rmsnorm(x))` (LoRA adapters
/// without dropout included), as one unit ([`ops::decoder_mlp`]: neither the norm's output
/// nor the activation kept for the backward; counted as an RMSNorm and a SwiGLU).
/// x: (…, C) → (…, C)
pub fn decoder_mlp(x: &Tensor, w: &ops::MlpWeights) -> Result<Tensor> {
    count(|c| {
        c.rmsnorm += 1;
        c.swiglu += 1;
        c.unit += 1
    });
    ops::decoder_mlp(x, w)
}

/// Rotary by half tables. x: (B, T, H, D), cos/sin: (B, T, D/2) f32 → (B, T, H, D)
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    count(|c| c.rotary += 1);
    omr_kernels::rotary(x, cos, sin)
}

/// Flash attention with scale 1/√D, queries at key positions S − T + t.
/// q: (B, T, H, D), k/v: (B, S, KV, D) → (B, T, H, D)
/// Inside a checkpointed block's forward or recompute, through [`crate::kept_attn`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    if crate::kept_attn::active() {
        return crate::kept_attn::attention(q, k, v, mask, scale);
    }
    count_attention();
    omr_kernels::flash_attn(q, k, v, mask, scale)
}

/// Σ −log softmax(h · wᵀ)[target] without the N × V logits. h: (N, C), w: (V, C),
/// targets: (N) u32 → scalar f32 (the sum).
pub fn linear_ce(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    count(|c| c.linear_ce += 1);
    omr_kernels::linear_cross_entropy(h, w, targets, LceChunks::default())
}

/// Per-row `log softmax(z)[target]` and entropy of `z = zscale · h · wᵀ + bias` without the
/// N × V logits (GRPO's token scores). h: (N, C), w: (V, C), targets: (N) u32, bias: (V) f32
/// → (logp (N) f32 differentiable in h and w, entropy (N) f32 without gradient).
pub fn linear_logp(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    zscale: f32,
    bias: &Tensor,
) -> Result<(Tensor, Tensor)> {
    count(|c| c.linear_logp += 1);
    let score = omr_kernels::LogpScore {
        zscale,
        bias: bias.clone(),
    };
    omr_kernels::linear_logp(h, w, targets, &score, LceChunks::default())
}

/// The decoder's mask: causal, and a query attends only keys of its own segment.
/// `segments[b][s]` covers cache + T keys (0 = padding); the queries are the last `t`.
pub fn text_mask(segments: &[Vec<u32>], t: usize, device: &Device) -> Result<AttnMask> {
    let b = segments.len();
    let s = segments.first().map_or(0, Vec::len);
    let flat: Vec<u32> = segments.iter().flatten().copied().collect();
    let q_host: Vec<u32> = segments
        .iter()
        .flat_map(|r| r[s - t..].iter().copied())
        .collect();
    let k_seg = Tensor::from_slice(&flat, (b, s), device)?;
    let q_seg = Tensor::from_slice(&q_host, (b, t), device)?;
    Ok(AttnMask {
        causal: true,
        window: 0,
        q_seg: Some(q_seg),
        k_seg: Some(k_seg),
        host: Some(std::sync::Arc::new((q_host, flat))),
        plans: Default::default(),
    })
}

/// The vision tower's block-diagonal mask: rows of range `cu[i]..cu[i+1]` get segment i + 1
/// and attend only inside it. One batch row: (1, N) ids.
pub fn ranges_mask(cu: &[usize], device: &Device) -> Result<AttnMask> {
    let n = cu.last().copied().unwrap_or(0);
    let mut ids = vec![0u32; n];
    for (i, w) in cu.windows(2).enumerate() {
        ids[w[0]..w[1]].fill(i as u32 + 1);
    }
    let seg = Tensor::from_slice(&ids, (1, n), device)?;
    Ok(AttnMask {
        causal: false,
        window: 0,
        q_seg: Some(seg.clone()),
        k_seg: Some(seg),
        host: Some(std::sync::Arc::new((ids.clone(), ids))),
        plans: Default::default(),
    })
}
