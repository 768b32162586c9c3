//! A linear layer that is cheap when frozen and can carry a LoRA adapter.
//!
//! Trainable weights go through a plain matmul (candle's backward gives both gradients).
//! Frozen weights go through [`ops::frozen_linear`], whose backward computes only the input
//! gradient: with LoRA on a frozen base, no weight gradient of the base is ever computed or kept.

use crate::lora::LoraAdapter;
use crate::ops;
use crate::params::Params;
use candle_core::{Result, Tensor};

#[derive(Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

/// Which implementation the forward's ops use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// Compositions of candle ops (the reference; the fastest on CPU).
    #[default]
    Candle,
    /// The fused ops of omr-kernels (CUDA kernels on a GPU, their CPU references on CPU).
    Fused,
}

impl Kernels {
    /// Fused on CUDA, candle ops on CPU.
    pub fn auto(device: &candle_core::Device) -> Kernels {
        if device.is_cuda() {
            Kernels::Fused
        } else {
            Kernels::Candle
        }
    }
}

/// Per-forward settings that reach every layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ctx {
    /// Ops implementation.
    pub kernels: Kernels,
    /// Seed of this forward's dropout masks (LoRA dropout); `None` disables dropout (eval,
    /// generation). The mask of a layer depends only on (seed, layer name), so a forward is
    /// reproducible, and a recomputed forward (activation checkpointing) draws the same masks.
    pub dropout_seed: Option<u64>,
    /// Nothing will backpropagate through this forward (generation, a frozen reference's
    /// scores): each decoder layer's and vision block's output is detached, so candle frees a
    /// block's intermediates as soon as the next block starts instead of keeping the whole
    /// forward's graph (the weights are variables, so every op output tracks them).
    pub no_grad: bool,
}

impl Linear {
    /// `name` is the module path (`model.layers.0.self_attn.q_proj`); the weight is
    /// `{name}.weight` and the bias `{name}.bias` when `bias`.
    pub fn load(params: &Params, name: &str, bias: bool) -> crate::Result<Linear> {
        Ok(Linear {
            name: name.to_string(),
            weight: params.get(&format!("{name}.weight"))?,
            bias: if bias {
                Some(params.get(&format!("{name}.bias"))?)
            } else {
                None
            },
            lora: LoraAdapter::load(params, name)?,
        })
    }

    /// The weight alone when the layer is `x·Wᵀ` (no bias, no LoRA adapter): what a fused op
    /// over several projections may take in place of [`Linear::forward`].
    pub fn plain_weight(&self) -> Option<&Tensor> {
        match (&self.bias, &self.lora) {
            (None, None) => Some(&self.weight),
            _ => None,
        }
    }

    /// The weight and the adapter (without dropout) when the layer is `x·Wᵀ` plus, perhaps, a
    /// LoRA adapter that draws no dropout mask in this forward: what a fused unit over several
    /// projections with their adapters may take (`ops::decoder_mlp`).
    pub fn unit_part(&self, ctx: &Ctx) -> Option<(&Tensor, Option<crate::block::Adapter>)> {
        match self.unit_parts(ctx) {
            Some((w, None, ad)) => Some((w, ad)),
            _ => None,
        }
    }

    /// [`Linear::unit_part`] of a layer that may have a bias: weight, bias, adapter
    /// (`ops::decoder_attention`'s q, k, v).
    pub fn unit_parts(
        &self,
        ctx: &Ctx,
    ) -> Option<(&Tensor, Option<&Tensor>, Option<crate::block::Adapter>)> {
        match &self.lora {
            None => Some((&self.weight, self.bias.as_ref(), None)),
            Some(l) => l
                .without_dropout(ctx)
                .map(|a| (&self.weight, self.bias.as_ref(), Some(a))),
        }
    }

    /// x: (…, I) → (…, O)
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if let Some(l) = &self.lora {
            return l.forward(x, &self.weight, self.bias.as_ref(), &self.name, ctx);
        }
        let trainable = self.weight.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        if trainable && ctx.kernels == Kernels::Fused {
            ops::linear_op(x, &self.weight, self.bias.as_ref())
        } else if trainable {
            ops::linear(x, &self.weight, self.bias.as_ref())
        } else {
            ops::frozen_linear(x, &self.weight, self.bias.as_ref())
        }
    }

    /// `r + forward(x)` shaped like r (a residual add after the projection), x's elements
    /// taken I at a time as in [`Linear::forward_to`]. On the fused path, for a projection
    /// without bias or adapter, one op ([`ops::linear_residual`]): the projection's output is
    /// not a graph node of its own.
    pub fn forward_residual(&self, x: &Tensor, r: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let trainable = self.weight.track_op();
        let tracked = trainable || x.track_op() || r.track_op();
        if let (Some(w), Kernels::Fused, true) = (self.plain_weight(), ctx.kernels, tracked) {
            return match trainable {
                true => ops::linear_residual(x, w, r),
                false => ops::linear_residual(x, &w.detach(), r),
            };
        }
        r + self.forward_to(x, r.dims(), ctx)?
    }

    /// [`Linear::forward`] of x's elements taken I at a time, shaped `out`: attention heads in
    /// (x: (B, T, H, D)) or out (`out` = (B, T, H, D)). On the fused path without an adapter
    /// the projection writes that shape itself ([`ops::linear_op_to`]: no reshape nodes in the
    /// graph); otherwise `forward` between two reshapes.
    pub fn forward_to(&self, x: &Tensor, out: &[usize], ctx: &Ctx) -> Result<Tensor> {
        let trainable = self.weight.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        if self.lora.is_none() && ctx.kernels == Kernels::Fused && (trainable || x.track_op()) {
            return match trainable {
                true => ops::linear_op_to(x, &self.weight, self.bias.as_ref(), out),
                // frozen_linear's op: only x's gradient.
                false => ops::linear_op_to(
                    x,
                    &self.weight.detach(),
                    self.bias.as_ref().map(|b| b.detach()).as_ref(),
                    out,
                ),
            };
        }
        // x as (out's leading dims, I) when that fits, so `forward` returns `out` as is.
        let i = self.weight.dim(1)?;
        let lead = &out[..out.len().saturating_sub(1)];
        let x = match x.dims().last() == Some(&i) {
            true => x.clone(),
            false if lead.iter().product::<usize>() * i == x.elem_count() => {
                x.reshape([lead, &[i]].concat())?
            }
            false => x.reshape((x.elem_count() / i.max(1), i))?,
        };
        let y = self.forward(&x, ctx)?;
        match y.dims() == out {
            true => Ok(y),
            false => y.reshape(out),
        }
    }
}
