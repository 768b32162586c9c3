//! Qwen2-VL / Qwen2.5-VL for conditional generation: token embeddings with image features
//! scattered into the `<|image_pad|>` positions, the decoder, and the LM head.
//!
//! [`Input`] describes a batch the way both training and generation need it: token ids,
//! per-token segment ids (0 = padding, 1… = the packed samples of a row, or 1 for every real
//! token of a padded row), and the images. Positions (M-RoPE) and the attention bias are derived
//! from it, so padded and packed batches go through the same code.

use crate::attention;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::fused;
use crate::linear::{Ctx, Kernels, Linear};
use crate::params::Params;
use crate::rope::{mrope_cos_sin, rope_index};
use crate::text::{KvCache, Tables, TextModel};
use crate::vision::VisionTower;
use candle_core::{DType, Device, Tensor};

pub struct Input {
    /// (B, T) token ids.
    pub ids: Vec<Vec<u32>>,
    /// (B, T) segment of each token: 0 padding, equal non-zero ids attend to each other.
    pub segments: Vec<Vec<u32>>,
    /// (N, C·T·P·P) patches of every image, images in row then position order.
    pub pixel_values: Option<Tensor>,
    /// (t, h, w) patch grid of every image, same order.
    pub grids: Vec<[usize; 3]>,
}

/// M-RoPE positions `[axis][b][t]` and, per row, the offset that turns a cache length into the
/// next text position (`rope_deltas` in transformers).
pub struct Positions {
    pub pos: [Vec<Vec<i64>>; 3],
    pub deltas: Vec<i64>,
}

impl Input {
    /// A padded batch; `attention_mask[b][t]` is 1 for real tokens (left or right padding).
    pub fn padded(
        ids: Vec<Vec<u32>>,
        attention_mask: &[Vec<u32>],
        pixel_values: Option<Tensor>,
        grids: Vec<[usize; 3]>,
    ) -> Result<Input> {
        let segments = attention_mask
            .iter()
            .map(|r| r.iter().map(|&m| u32::from(m != 0)).collect())
            .collect();
        Input::new(ids, segments, pixel_values, grids)
    }

    /// A packed batch: row b holds samples of lengths `seq_lens[b]`, then padding.
    pub fn packed(
        ids: Vec<Vec<u32>>,
        seq_lens: &[Vec<usize>],
        pixel_values: Option<Tensor>,
        grids: Vec<[usize; 3]>,
    ) -> Result<Input> {
        let mut segments = Vec::with_capacity(ids.len());
        for (row, lens) in ids.iter().zip(seq_lens) {
            let mut seg = Vec::with_capacity(row.len());
            for (i, &l) in lens.iter().enumerate() {
                seg.extend(std::iter::repeat_n(i as u32 + 1, l));
            }
            if seg.len() > row.len() {
                return Err(ModelError::Input(format!(
                    "seq_lens {lens:?} exceed the row length {}",
                    row.len()
                )));
            }
            seg.resize(row.len(), 0);
            segments.push(seg);
        }
        Input::new(ids, segments, pixel_values, grids)
    }

    pub fn new(
        ids: Vec<Vec<u32>>,
        segments: Vec<Vec<u32>>,
        pixel_values: Option<Tensor>,
        grids: Vec<[usize; 3]>,
    ) -> Result<Input> {
        let t = ids.first().map_or(0, Vec::len);
        if ids.is_empty() || t == 0 {
            return Err(ModelError::Input("empty batch".into()));
        }
        if ids.iter().any(|r| r.len() != t)
            || segments.len() != ids.len()
            || segments.iter().any(|r| r.len() != t)
        {
            return Err(ModelError::Input(
                "input_ids and attention mask/segments must be rectangular and of equal shape"
                    .into(),
            ));
        }
        if pixel_values.is_some() == grids.is_empty() {
            return Err(ModelError::Input(
                "pixel_values and image_grid_thw must be given together".into(),
            ));
        }
        Ok(Input {
            ids,
            segments,
            pixel_values,
            grids,
        })
    }

    pub fn batch(&self) -> usize {
        self.ids.len()
    }
    pub fn len(&self) -> usize {
        self.ids[0].len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions as transformers' `get_rope_index` computes them, per segment: padding gets
    /// position 1, and every packed sample starts again at 0.
    pub fn positions(&self, cfg: &ModelConfig) -> Result<Positions> {
        let (b, t) = (self.batch(), self.len());
        let mut pos: [Vec<Vec<i64>>; 3] = std::array::from_fn(|_| vec![vec![1i64; t]; b]);
        let mut deltas = Vec::with_capacity(b);
        let mut grids = self.grids.iter().copied();
        for bi in 0..b {
            let seg = &self.segments[bi];
            // Each segment (its tokens, in order) is one sequence starting at position 0.
            let mut segs: Vec<(u32, Vec<usize>)> = Vec::new();
            for (j, &s) in seg.iter().enumerate().filter(|(_, &s)| s != 0) {
                match segs.iter_mut().find(|(id, _)| *id == s) {
                    Some((_, v)) => v.push(j),
                    None => segs.push((s, vec![j])),
                }
            }
            let mut max = -1i64;
            for (_, idx) in &segs {
                let toks: Vec<u32> = idx.iter().map(|&j| self.ids[bi][j]).collect();
                let p = rope_index(&toks, &mut grids, cfg)?;
                for (k, &j) in idx.iter().enumerate() {
                    for a in 0..3 {
                        pos[a][bi][j] = p[a][k];
                        max = max.max(p[a][k]);
                    }
                }
            }
            deltas.push(max + 1 - t as i64);
        }
        if grids.next().is_some() {
            return Err(ModelError::Input(
                "image_grid_thw has more rows than there are images in input_ids".into(),
            ));
        }
        Ok(Positions { pos, deltas })
    }
}

pub struct Qwen2VL {
    pub cfg: ModelConfig,
    pub(crate) vision: VisionTower,
    pub(crate) text: TextModel,
    lm_head: Linear,
    device: Device,
    /// The ops of [`Qwen2VL::ctx`]: what callers that pass no `Ctx` of their own (generation,
    /// evaluation) run with. `Candle` unless set by [`Qwen2VL::with_kernels`].
    pub kernels: Kernels,
}

impl Qwen2VL {
    /// Builds the modules from `params` (trainable or frozen as `params` says).
    pub fn new(cfg: &ModelConfig, params: &Params) -> Result<Qwen2VL> {
        let lm_head = if cfg.tie_word_embeddings {
            Linear {
                name: "lm_head".into(),
                weight: params.get("model.embed_tokens.weight")?,
                bias: None,
                lora: None,
            }
        } else {
            Linear::load(params, "lm_head", false)?
        };
        Ok(Qwen2VL {
            cfg: cfg.clone(),
            vision: VisionTower::load(cfg, params)?,
            text: TextModel::load(&cfg.text, params)?,
            lm_head,
            device: params.device().clone(),
            kernels: Kernels::Candle,
        })
    }

    /// The same model running `kernels` by default.
    pub fn with_kernels(mut self, kernels: Kernels) -> Qwen2VL {
        self.kernels = kernels;
        self
    }

    /// A `Ctx` with this model's kernels and no dropout (evaluation, generation).
    pub fn ctx(&self) -> Ctx {
        Ctx {
            kernels: self.kernels,
            dropout_seed: None,
            no_grad: false,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Vision tower + merger: (N, C·T·P·P) → (image tokens, C).
    pub fn image_features(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
        ctx: &Ctx,
    ) -> Result<Tensor> {
        Ok(self.vision.forward(pixel_values, grids, ctx)?)
    }

    /// Token embeddings with image features in the image-token positions: (B, T, C).
    pub fn embed(&self, input: &Input, ctx: &Ctx) -> Result<Tensor> {
        let feats = match &input.pixel_values {
            Some(pv) => Some(self.image_features(pv, &input.grids, ctx)?),
            None => None,
        };
        self.embed_with(input, feats.as_ref())
    }

    /// [`Qwen2VL::embed`] with the image features `feats` (image tokens, C) already computed.
    pub fn embed_with(&self, input: &Input, feats: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = (input.batch(), input.len());
        let flat: Vec<u32> = input.ids.iter().flatten().copied().collect();
        let vocab = self.cfg.text.vocab_size as u32;
        if let Some(&bad) = flat.iter().find(|&&x| x >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({vocab} entries)"
            )));
        }
        let ids = Tensor::from_slice(&flat, (b, t), &self.device)?;
        let embeds = self.text.embed(&ids)?;
        let Some(feats) = feats else {
            return Ok(embeds);
        };
        let n_feats = feats.dim(0)?;
        let image_id = self.cfg.image_token_id;
        let n_tokens = flat.iter().filter(|&&x| x == image_id).count();
        if n_tokens != n_feats {
            return Err(ModelError::Input(format!(
                "image features and image tokens do not match: {n_tokens} <|image_pad|> tokens, \
                 {n_feats} features from image_grid_thw"
            )));
        }
        // Gather from [text embeddings; image features]: row p takes itself, or feature k for
        // the k-th image token. Differentiable into both.
        let mut k = 0u32;
        let idx: Vec<u32> = flat
            .iter()
            .enumerate()
            .map(|(p, &x)| {
                if x == image_id {
                    k += 1;
                    (b * t) as u32 + k - 1
                } else {
                    p as u32
                }
            })
            .collect();
        let c = self.cfg.text.hidden_size;
        let all = Tensor::cat(
            &[
                &embeds.reshape((b * t, c))?,
                &feats.to_dtype(embeds.dtype())?,
            ],
            0,
        )?;
        let idx = Tensor::from_vec(idx, (b * t,), &self.device)?;
        Ok(all.index_select(&idx, 0)?.reshape((b, t, c))?)
    }

    /// Final normed hidden states (B, T, C) of a full forward.
    pub fn hidden(&self, input: &Input, ctx: &Ctx) -> Result<Tensor> {
        let x = self.embed(input, ctx)?;
        let p = input.positions(&self.cfg)?;
        self.decoder(&x, &p.pos, &input.segments, None, ctx)
    }

    /// Logits (B, T, V) of a full forward.
    pub fn forward(&self, input: &Input, ctx: &Ctx) -> Result<Tensor> {
        let h = self.hidden(input, ctx)?;
        Ok(self.lm_head.forward(&h, ctx)?)
    }

    /// Training loss (sum over labelled tokens, count) with the lm head applied only where a
    /// label is scored: the head is the largest matmul of a small model and (B, T, V) logits
    /// the largest activation of a big-vocabulary one, and most positions carry no label.
    pub fn loss(&self, input: &Input, labels: &[Vec<i64>], ctx: &Ctx) -> Result<(Tensor, usize)> {
        let h = self.hidden(input, ctx)?; // (B, T, C)
        self.head_loss(&h, labels, ctx)
    }

    /// The hidden states of the positions that predict a label, (N, C), and those labels (the
    /// next tokens): the only rows the lm head needs. h: (B, T, C), labels (B, T).
    pub fn labelled_rows(&self, h: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, Vec<u32>)> {
        let (b, t, c) = h.dims3()?;
        if labels.len() != b || labels.iter().any(|r| r.len() != t) {
            return Err(ModelError::Input(format!(
                "labels must be ({b}, {t}) like the input"
            )));
        }
        let (rows, targets) = crate::loss::shifted_targets(labels, self.cfg.text.vocab_size)?;
        let idx = Tensor::from_vec(rows, targets.len(), h.device())?;
        Ok((h.reshape((b * t, c))?.index_select(&idx, 0)?, targets))
    }

    /// The loss of [`Qwen2VL::loss`] from final hidden states `h` (B, T, C).
    pub fn head_loss(&self, h: &Tensor, labels: &[Vec<i64>], ctx: &Ctx) -> Result<(Tensor, usize)> {
        let (picked, targets) = self.labelled_rows(h, labels)?; // (N, C)
        let n = targets.len();
        if n == 0 {
            return Ok((Tensor::zeros((), candle_core::DType::F32, &self.device)?, 0));
        }
        let head = &self.lm_head;
        if ctx.kernels == Kernels::Fused && head.lora.is_none() && head.bias.is_none() {
            // Fused linear cross-entropy: no (N, V) logits; a frozen head (not tracked) costs
            // no weight-gradient products.
            let targets = Tensor::from_vec(targets, (n,), &self.device)?;
            let w = no_grad_if(head.weight.to_dtype(picked.dtype())?, ctx);
            let sum = fused::linear_ce(&picked, &w, &targets)?;
            return Ok((sum, n));
        }
        let logits = self
            .lm_head
            .forward(&picked, ctx)?
            .to_dtype(candle_core::DType::F32)?; // (N, V)
        Ok((crate::loss::token_nll(&logits, &targets)?.sum_all()?, n))
    }

    /// Per-row log-probabilities of `targets` under `softmax(logits / temperature)` with the
    /// `suppress` ids excluded (GRPO's token scores, matching how generation sampled), and the
    /// summed entropy of those distributions (for the logs). h: (K, C) hidden states of the
    /// scored positions, targets: K ids → (logp (K) f32, differentiable; Σ entropy).
    ///
    /// With the fused kernels (and a plain head: no LoRA, no bias), the (K, V) logits never
    /// exist (`omr_kernels::linear_logp`); otherwise they are materialised in f32.
    pub fn head_logps(
        &self,
        h: &Tensor,
        targets: &[u32],
        temperature: f64,
        suppress: &[u32],
        ctx: &Ctx,
    ) -> Result<(Tensor, f64)> {
        let k = h.dim(0)?;
        let dev = h.device();
        let v = self.cfg.text.vocab_size;
        // −1e30 rather than −∞: zero probability without 0·∞ in the entropy.
        let mut bias = vec![0f32; v];
        for &t in suppress {
            if let Some(x) = bias.get_mut(t as usize) {
                *x = -1e30;
            }
        }
        let bias = Tensor::from_vec(bias, v, dev)?;
        let head = &self.lm_head;
        if ctx.kernels == Kernels::Fused && head.lora.is_none() && head.bias.is_none() {
            let w = no_grad_if(head.weight.to_dtype(h.dtype())?, ctx);
            let t = Tensor::from_vec(targets.to_vec(), k, dev)?;
            let (logp, entropy) = fused::linear_logp(h, &w, &t, (1.0 / temperature) as f32, &bias)?;
            let entropy = entropy.sum_all()?.to_scalar::<f32>()? as f64;
            return Ok((logp, entropy));
        }
        let logits = (self.logits(h, ctx)?.to_dtype(DType::F32)? / temperature)?; // (K, V)
        let logits = match suppress.is_empty() {
            true => logits,
            false => logits.broadcast_add(&bias.unsqueeze(0)?)?,
        };
        let logp = crate::loss::token_nll(&logits, targets)?.neg()?; // (K,)
        let ls = crate::loss::log_softmax(&logits.detach())?;
        let entropy = (ls.exp()? * &ls)?.sum_all()?.neg()?.to_scalar::<f32>()? as f64;
        Ok((logp, entropy))
    }

    /// Logits from hidden states: (…, C) → (…, V).
    pub fn logits(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden, ctx)?)
    }

    /// One decoder pass over `x` (B, T, C) at positions `pos`, attending to the cache plus
    /// itself and extending the cache; returns the final hidden states (B, T, C).
    /// `segments` covers cache + T. Used by generation.
    pub fn decode_hidden(
        &self,
        x: &Tensor,
        pos: &[Vec<Vec<i64>>; 3],
        segments: &[Vec<u32>],
        cache: &mut KvCache,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        self.decoder(x, pos, segments, Some(cache), ctx)
    }

    /// The decoder with rotary tables and attention bias built from positions and segments.
    fn decoder(
        &self,
        x: &Tensor,
        pos: &[Vec<Vec<i64>>; 3],
        segments: &[Vec<u32>],
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let tables = self.decoder_tables(pos, segments, x, ctx)?;
        Ok(self.text.forward(x, &tables, cache, ctx)?)
    }

    /// Rotary tables and attention mask of a decoder pass over `x`, for `ctx.kernels`:
    /// candle's cos/sin in x's dtype and an f32 bias, or the fused ops' f32 half tables and
    /// segment-id mask.
    pub(crate) fn decoder_tables(
        &self,
        pos: &[Vec<Vec<i64>>; 3],
        segments: &[Vec<u32>],
        x: &Tensor,
        ctx: &Ctx,
    ) -> Result<Tables> {
        let (text, t) = (&self.cfg.text, x.dim(1)?);
        Ok(match ctx.kernels {
            Kernels::Candle => {
                let dtype = x.dtype();
                let (cos, sin) = mrope_cos_sin(pos, text, &self.device)?;
                Tables::Candle {
                    cos: cos.to_dtype(dtype)?,
                    sin: sin.to_dtype(dtype)?,
                    bias: attention::bias(segments, t, &self.device)?,
                }
            }
            Kernels::Fused => {
                let (cos, sin) = omr_kernels::mrope_tables(
                    pos,
                    &text.mrope_section,
                    text.rope_theta,
                    text.head_dim,
                    &self.device,
                )?;
                Tables::Fused {
                    cos,
                    sin,
                    mask: fused::text_mask(segments, t, &self.device)?,
                }
            }
        })
    }
}

/// `t` detached under `ctx.no_grad`: a fused head then skips its weight-gradient products.
fn no_grad_if(t: Tensor, ctx: &Ctx) -> Tensor {
    if ctx.no_grad {
        t.detach()
    } else {
        t
    }
}
