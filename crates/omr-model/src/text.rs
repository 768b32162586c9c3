//! The Qwen2 language model: decoder layers (GQA with q/k/v biases, M-RoPE, SwiGLU MLP,
//! RMSNorm) with an optional key/value cache for generation.

use crate::attention::attend;
use crate::config::TextConfig;
use crate::linear::{Ctx, Linear};
use crate::ops;
use crate::params::Params;
use candle_core::{Result, Tensor};

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

/// Keys and values of one layer after rotary, (B, KV, S, D), grown along S.
#[derive(Clone, Default)]
pub struct LayerCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

/// The cache of every layer.
#[derive(Clone, Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.k.as_ref())
            .map_or(0, |k| k.dim(2).unwrap_or(0))
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keeps only batch rows `rows` (finished rows leave the batch during generation).
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

/// What every decoder layer of one pass shares: rotary tables (B, 1, T, D) and the attention
/// mask over cache + T keys, in the pass's dtype. Built by the model from positions and
/// segments.
pub struct Tables {
    pub cos: Tensor,
    pub sin: Tensor,
    /// (B, 1, T, S) additive bias, S = cached + T.
    pub bias: Tensor,
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
            cache
                .layers
                .resize(self.layers.len(), LayerCache::default());
        }
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(c, &x, tables, lc, ctx)?;
        }
        self.final_norm(&x, ctx)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Decoder layer `i` alone (no cache): the unit activation checkpointing recomputes.
    pub fn layer(&self, i: usize, x: &Tensor, tables: &Tables, ctx: &Ctx) -> Result<Tensor> {
        self.layers[i].forward(&self.cfg, x, tables, None, ctx)
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor, _ctx: &Ctx) -> Result<Tensor> {
        ops::rmsnorm(x, &self.norm, self.cfg.rms_norm_eps)
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
        let (cos, sin, bias) = (&tables.cos, &tables.sin, &tables.bias);
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let hs = ops::rmsnorm(x, &self.input_norm, c.rms_norm_eps)?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2);
        let q = heads(self.q.forward(&hs, ctx)?, h)?;
        let k = heads(self.k.forward(&hs, ctx)?, kv)?;
        let v = heads(self.v.forward(&hs, ctx)?, kv)?;
        let q = ops::apply_rotary(&q, cos, sin)?;
        let mut k = ops::apply_rotary(&k, cos, sin)?.contiguous()?;
        let mut v = v.contiguous()?;
        if let Some(lc) = cache {
            if let (Some(pk), Some(pv)) = (&lc.k, &lc.v) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            lc.k = Some(k.clone());
            lc.v = Some(v.clone());
        }
        let a = attend(&q, &k, &v, bias)?;
        let x = (x + self.o.forward(&a, ctx)?)?;
        let hs = ops::rmsnorm(&x, &self.post_norm, c.rms_norm_eps)?;
        let g = self.gate.forward(&hs, ctx)?.silu()?;
        let m = self.down.forward(&(g * self.up.forward(&hs, ctx)?)?, ctx)?;
        x + m
    }
}
