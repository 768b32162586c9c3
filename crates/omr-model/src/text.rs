//! The Qwen2 language model: decoder layers (GQA with q/k/v biases, M-RoPE, SwiGLU MLP,
//! RMSNorm) with an optional key/value cache for generation.
//!
//! Norms and the MLP gate go through [`fused`] (candle ops or fused kernels, per the ctx);
//! rotary and attention follow the [`Tables`] of the pass: candle ops on (B, H, T, D), or the
//! fused rotary and flash attention on the projections' own (B, T, H, D) layout.

use crate::attention::attend;
use crate::block::{self, DecoderDims, DecoderWeights};
use crate::config::TextConfig;
use crate::fused;
use crate::linear::{Ctx, Kernels, Linear};
use crate::ops;
use crate::params::Params;
use candle_core::{bail, Result, Tensor};
use omr_kernels::AttnMask;

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Keys and values of one layer after rotary, in buffers preallocated along S: (B, KV, cap, D)
/// when the candle path fills it, (B, cap, KV, D) (the flash kernel's layout) when the fused
/// path does; the first `len` positions are filled. A pass writes its keys and values in place
/// after them and attends through a view of the first `len + T` (no copy of the cache per
/// step: at 128 rows × 5120 positions of the 7B shape, concatenating would copy 37 GB a step).
/// Not `Clone`: clones would share the buffers that passes write in place.
#[derive(Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// [`KvCache::with_capacity`]'s positions.
    reserve: usize,
}

/// The cache of every layer.
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// The kernels of the passes that filled it, which fix its layout (see [`LayerCache`]).
    pub kernels: Kernels,
    /// Positions the buffers hold from the second pass on ([`KvCache::with_capacity`]; 0: as
    /// the passes need, a pass beyond the capacity reallocating to at least twice it).
    reserve: usize,
}

impl KvCache {
    /// An empty cache whose buffers hold `positions` positions (generation: prompt + new
    /// tokens) from the second pass on, so no later pass reallocates. The first pass (the
    /// prefill) keeps its own keys and values: no more memory next to its activations.
    pub fn with_capacity(positions: usize) -> KvCache {
        KvCache {
            reserve: positions,
            ..KvCache::default()
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Positions the buffers hold before a pass reallocates them.
    pub fn capacity(&self) -> usize {
        let seq_dim = self.seq_dim();
        self.layers
            .first()
            .and_then(|l| l.k.as_ref())
            .map_or(0, |k| k.dim(seq_dim).unwrap_or(0))
    }
    /// Batch rows held.
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.k.as_ref())
            .map_or(0, |k| k.dim(0).unwrap_or(0))
    }
    /// The sequence axis of the buffers (see [`LayerCache`]).
    pub fn seq_dim(&self) -> usize {
        match self.kernels {
            Kernels::Candle => 2,
            Kernels::Fused => 1,
        }
    }
    /// Keeps only batch rows `rows` (finished rows leave the batch during generation); the
    /// buffers keep their capacity.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for l in &mut self.layers {
            if let Some(k) = &l.k {
                l.k = Some(k.index_select(rows, 0)?);
            }
            if let Some(v) = &l.v {
                l.v = Some(v.index_select(rows, 0)?);
            }
        }
        Ok(())
    }
}

/// What every decoder layer of one pass shares: rotary tables and the attention mask over
/// cache + T keys (S = cached + T), in the form its kernels take. Built by the model from
/// positions and segments.
pub enum Tables {
    /// cos/sin (B, 1, T, D) in the pass's dtype; (B, 1, T, S) additive bias in f32 (attention
    /// adds it to f32 scores).
    Candle {
        cos: Tensor,
        sin: Tensor,
        bias: Tensor,
    },
    /// Half tables cos/sin (B, T, D/2) f32; causal mask with segment ids (B, T) / (B, S).
    Fused {
        cos: Tensor,
        sin: Tensor,
        mask: AttnMask,
    },
}

impl Tables {
    /// The kernels these tables are for.
    pub fn kernels(&self) -> Kernels {
        match self {
            Tables::Candle { .. } => Kernels::Candle,
            Tables::Fused { .. } => Kernels::Fused,
        }
    }
}

pub struct TextModel {
    cfg: TextConfig,
    pub(crate) embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
}

impl TextModel {
    pub fn load(cfg: &TextConfig, params: &Params) -> crate::Result<TextModel> {
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("model.layers.{i}");
            let lin = |m: &str, bias: bool| Linear::load(params, &format!("{l}.{m}"), bias);
            layers.push(Layer {
                input_norm: params.get(&format!("{l}.input_layernorm.weight"))?,
                post_norm: params.get(&format!("{l}.post_attention_layernorm.weight"))?,
                q: lin("self_attn.q_proj", true)?,
                k: lin("self_attn.k_proj", true)?,
                v: lin("self_attn.v_proj", true)?,
                o: lin("self_attn.o_proj", false)?,
                gate: lin("mlp.gate_proj", false)?,
                up: lin("mlp.up_proj", false)?,
                down: lin("mlp.down_proj", false)?,
            });
        }
        Ok(TextModel {
            cfg: cfg.clone(),
            embed: params.get("model.embed_tokens.weight")?,
            layers,
            norm: params.get("model.norm.weight")?,
        })
    }

    /// ids: (B, T) u32 → (B, T, C)
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// x: (B, T, C) embeddings. Returns the final normed hidden states (B, T, C) and extends
    /// `cache` when given.
    pub fn forward(
        &self,
        x: &Tensor,
        tables: &Tables,
        mut cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        if let Some(cache) = cache.as_deref_mut() {
            if cache.is_empty() {
                cache.kernels = tables.kernels();
            } else if cache.kernels != tables.kernels() {
                bail!(
                    "the key/value cache was filled by {:?} kernels and cannot be extended by {:?}",
                    cache.kernels,
                    tables.kernels()
                )
            }
            cache
                .layers
                .resize_with(self.layers.len(), LayerCache::default);
            let reserve = cache.reserve;
            cache.layers.iter_mut().for_each(|l| l.reserve = reserve);
        }
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(c, &x, tables, lc, ctx)?;
            if ctx.no_grad {
                x = x.detach();
            }
        }
        let h = self.final_norm(&x, ctx)?;
        Ok(if ctx.no_grad { h.detach() } else { h })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layer `i` alone (no cache): the unit activation checkpointing recomputes.
    pub fn layer(&self, i: usize, x: &Tensor, tables: &Tables, ctx: &Ctx) -> Result<Tensor> {
        self.layers[i].forward(&self.cfg, x, tables, None, ctx)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        fused::rmsnorm(x, &self.norm, self.cfg.rms_norm_eps, ctx)
    }
}

impl Layer {
    /// x: (B, T, C) → (B, T, C); extends `cache` when given.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        c: &TextConfig,
        x: &Tensor,
        tables: &Tables,
        cache: Option<&mut LayerCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        if let (Tables::Fused { cos, sin, mask }, None) = (tables, &cache) {
            if self.as_one_op(x, ctx) {
                return block::decoder_layer(
                    x,
                    &self.weights(ctx),
                    DecoderDims {
                        heads: h,
                        kv_heads: kv,
                        head_dim: d,
                        eps: c.rms_norm_eps,
                    },
                    cos,
                    sin,
                    mask,
                );
            }
        }
        let unit = match (tables, &cache, ctx.kernels) {
            (Tables::Fused { cos, sin, mask }, None, Kernels::Fused)
                if x.elem_count() > 0 && fused::attn_unit_enabled() =>
            {
                self.attn_weights(c, ctx).map(|w| (w, cos, sin, mask))
            }
            _ => None,
        };
        let x = if let Some((w, cos, sin, mask)) = unit {
            // The input norm, q, k, v, rotary, attention, o and the residual as one unit,
            // LoRA adapters included: ops::decoder_attention (the norm's output and the
            // pre-rotary q, k are not kept for the backward).
            let w = w.borrowed();
            fused::decoder_attention(x, &w, cos, sin, mask)?
        } else {
            let hs = fused::rmsnorm(x, &self.input_norm, c.rms_norm_eps, ctx)?;
            // (B, T, n, D), the projections' layout, written so by them on the fused path
            let q = self.q.forward_to(&hs, &[b, t, h, d], ctx)?;
            let k = self.k.forward_to(&hs, &[b, t, kv, d], ctx)?;
            let v = self.v.forward_to(&hs, &[b, t, kv, d], ctx)?;
            let a = match tables {
                Tables::Candle { cos, sin, bias } => {
                    let q = ops::apply_rotary(&q.transpose(1, 2)?, cos, sin)?;
                    let k = ops::apply_rotary(&k.transpose(1, 2)?, cos, sin)?.contiguous()?;
                    let (k, v) = extend(cache, k, v.transpose(1, 2)?, 2)?;
                    attend(&q, &k, &v, bias)? // (B, T, H·D)
                }
                Tables::Fused { cos, sin, mask } => {
                    let q = fused::rotary(&q, cos, sin)?;
                    let k = fused::rotary(&k, cos, sin)?;
                    let (k, v) = extend(cache, k, v, 1)?;
                    fused::attention(&q, &k, &v, mask)? // (B, T, H, D)
                }
            };
            self.o.forward_residual(&a, x, ctx)?
        };
        if let (Some(g), Some(u), Some(d), Kernels::Fused, true) = (
            self.gate.unit_part(ctx),
            self.up.unit_part(ctx),
            self.down.unit_part(ctx),
            ctx.kernels,
            x.elem_count() > 0 && fused::mlp_unit_enabled(),
        ) {
            // The post-attention norm, the whole MLP and the residual as one unit, LoRA
            // adapters included: ops::decoder_mlp (neither the norm's output nor the
            // activation is kept for the backward).
            let w = ops::MlpWeights {
                gate: g.0,
                up: u.0,
                down: d.0,
                bias: [None; 3],
                lora: [g.1.as_ref(), u.1.as_ref(), d.1.as_ref()],
                norm: Some((&self.post_norm, c.rms_norm_eps)),
            };
            return fused::decoder_mlp(&x, &w);
        }
        let hs = fused::rmsnorm(&x, &self.post_norm, c.rms_norm_eps, ctx)?;
        let g = match (
            self.gate.plain_weight(),
            self.up.plain_weight(),
            ctx.kernels,
        ) {
            // Gate, up and SwiGLU as one op (no LoRA, no bias; down has a bias or an
            // adapter with dropout): ops::swiglu_mlp.
            (Some(wg), Some(wu), Kernels::Fused) => fused::swiglu_mlp(&hs, wg, wu)?,
            _ => fused::swiglu(
                &self.gate.forward(&hs, ctx)?,
                &self.up.forward(&hs, ctx)?,
                ctx,
            )?,
        };
        self.down.forward_residual(&g, &x, ctx)
    }
}

impl Layer {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// Whether this layer runs as one op ([`block`]): opted in, fused kernels, no LoRA
    /// dropout mask in this forward.
    fn as_one_op(&self, x: &Tensor, ctx: &Ctx) -> bool {
        ctx.kernels == Kernels::Fused
            && block::block_op_enabled()
            && block::supports(x)
            && self
                .linears()
                .iter()
                .all(|l| l.lora.as_ref().is_none_or(|a| !a.draws_dropout(ctx)))
            && [&self.o, &self.gate, &self.up, &self.down]
                .iter()
                .all(|l| l.bias.is_none())
    }

    /// The attention half's weights when it runs as one unit: adapters without dropout.
    fn attn_weights(&self, c: &TextConfig, ctx: &Ctx) -> Option<AttnParts<'_>> {
        Some(AttnParts {
            parts: [
                self.q.unit_parts(ctx)?,
                self.k.unit_parts(ctx)?,
                self.v.unit_parts(ctx)?,
                self.o.unit_parts(ctx)?,
            ],
            norm: &self.input_norm,
            eps: c.rms_norm_eps,
            dims: (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        })
    }

    fn weights(&self, ctx: &Ctx) -> DecoderWeights {
        let wb = |l: &Linear| (l.weight.clone(), l.bias.clone());
        DecoderWeights {
            input_norm: self.input_norm.clone(),
            q: wb(&self.q),
            k: wb(&self.k),
            v: wb(&self.v),
            o: self.o.weight.clone(),
            post_norm: self.post_norm.clone(),
            gate: self.gate.weight.clone(),
            up: self.up.weight.clone(),
            down: self.down.weight.clone(),
            lora: self
                .linears()
                .map(|l| l.lora.as_ref().and_then(|a| a.without_dropout(ctx))),
        }
    }
}

/// A layer's attention-half weights with the adapters they own (`Layer::attn_weights`).
struct AttnParts<'a> {
    /// q, k, v, o: weight, bias, adapter.
    parts: [(&'a Tensor, Option<&'a Tensor>, Option<block::Adapter>); 4],
    norm: &'a Tensor,
    eps: f64,
    /// Heads, key/value heads, head dim.
    dims: (usize, usize, usize),
}

impl AttnParts<'_> {
    fn borrowed(&self) -> ops::AttnWeights<'_> {
        let [q, k, v, o] = &self.parts;
        ops::AttnWeights {
            norm: (self.norm, self.eps),
            qkv: ops::Qkv::Split([(q.0, q.1), (k.0, k.1), (v.0, v.1)]),
            o: (o.0, o.1),
            lora: [q.2.as_ref(), k.2.as_ref(), v.2.as_ref(), o.2.as_ref()],
            heads: self.dims.0,
            kv_heads: self.dims.1,
            head_dim: self.dims.2,
        }
    }
}

/// Keys and values of the cache followed by this pass's along the sequence axis `seq_dim`.
/// The cache's buffers take this pass's keys and values in place (detached: nothing
/// backpropagates through a cache; kept with their graph, every step's would reach back to
/// every earlier step's) and the pass attends through a view of the buffers, which is
/// contiguous per batch row (the flash kernel takes the batch stride; candle's matmul the
/// strides). A first pass, and one whose keys carry a graph, attend to their own tensors (so a
/// gradient reaches this pass's keys and values). The first pass's keys and values become the
/// buffers as they are; the next pass reallocates them to [`KvCache::with_capacity`]'s size.
fn extend(
    cache: Option<&mut LayerCache>,
    k: Tensor,
    v: Tensor,
    seq_dim: usize,
) -> Result<(Tensor, Tensor)> {
    let Some(lc) = cache else {
        return Ok((k, v));
    };
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let (len, t) = (lc.len, k.dim(seq_dim)?);
    let (Some(kb), Some(vb)) = (&lc.k, &lc.v) else {
        // The first pass's keys and values are the buffers, exactly as long: the prefill holds
        // no more than the prompt's cache next to its activations; the next pass reallocates.
        lc.k = Some(k.detach());
        lc.v = Some(v.detach());
        lc.len = t;
        return Ok((k, v));
    };
    if kb.dim(0)? != k.dim(0)? {
        bail!("the key/value cache holds other batch rows than this pass")
    }
    let (pk, pv) = (kb.narrow(seq_dim, 0, len)?, vb.narrow(seq_dim, 0, len)?);
    let cap = kb.dim(seq_dim)?;
    if len + t > cap {
        // Reallocate, keeping what is filled: to the reserved capacity when it holds this pass,
        // else to at least twice the old.
        let mut dims = k.dims().to_vec();
        dims[seq_dim] = if lc.reserve >= len + t {
            lc.reserve
        } else {
            (len + t).max(2 * cap)
        };
        let grow = |old: &Tensor| -> Result<Tensor> {
            let buf = Tensor::zeros(dims.as_slice(), k.dtype(), k.device())?;
            buf.slice_set(old, seq_dim, 0)?;
            Ok(buf)
        };
        let (nk, nv) = (grow(kb)?, grow(vb)?);
        lc.k = Some(nk);
        lc.v = Some(nv);
    }
    let (kb, vb) = (
        lc.k.as_ref().expect("allocated"),
        lc.v.as_ref().expect("allocated"),
    );
    kb.slice_set(&k.detach(), seq_dim, len)?;
    vb.slice_set(&v.detach(), seq_dim, len)?;
    lc.len = len + t;
    if k.track_op() || v.track_op() {
        Ok((
            Tensor::cat(&[&pk, &k], seq_dim)?,
            Tensor::cat(&[&pv, &v], seq_dim)?,
        ))
    } else {
        Ok((
            kb.narrow(seq_dim, 0, len + t)?,
            vb.narrow(seq_dim, 0, len + t)?,
        ))
    }
}
