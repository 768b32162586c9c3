//! One training step on a synthetic batch, timed by phase: what `omr bench train` runs and what
//! the memory test measures against `plan`.
//!
//! The step is the SFT recipe's (`sft::run`): `Qwen2VL::loss` (sum over labelled tokens),
//! `backward`, `GradAccum::add`, then `AdamW::step_accumulated` with the loss normalised by the
//! labelled tokens. The device is synchronised between phases. candle runs the vision tower
//! inside the loss forward and the whole backward as one pass, so the vision forward is timed
//! by a separate probe (`image_features` on the same pixels, outside the step's time) and the
//! language-model forward is the loss forward minus that probe.
//!
//! The batch is seeded and not zero-filled: random token ids below the special tokens, random
//! pixel values in the range of normalised images, rows of exactly T tokens, each
//! `[prompt][<vision_start> <image_pad>×k <vision_end>][answer]` with the answer labelled.

use crate::optim::{AdamW, StepOutcome};
use candle_core::{DType, Device, Tensor};
use omr_model::config::ModelConfig;
use omr_model::linear::{Ctx, Kernels};
use omr_model::loss::IGNORE;
use omr_model::model::{Input, Qwen2VL};
use omr_model::Recompute;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Prompt tokens before each row's image.
const PROMPT: usize = 8;

/// A batch of B rows of exactly T tokens with one square image each.
#[derive(Clone, Debug)]
pub struct SyntheticBatch {
    /// (B, T)
    pub input_ids: Vec<Vec<u32>>,
    /// (B, T), `IGNORE` outside the answer.
    pub labels: Vec<Vec<i64>>,
    /// (N, C·T·P·P) patches of all images, row order.
    pub pixel_values: Vec<f32>,
    pub patch_dim: usize,
    /// (t, h, w) per image.
    pub grids: Vec<[usize; 3]>,
}

impl SyntheticBatch {
    /// `image_px`: side of each row's square image (a multiple of patch·merge, 28 for Qwen);
    /// 0 for text only.
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        seq: usize,
        image_px: usize,
        seed: u64,
    ) -> Result<SyntheticBatch, String> {
        let v = &cfg.vision;
        let unit = v.patch_size * v.spatial_merge_size;
        if !image_px.is_multiple_of(unit) {
            return Err(format!(
                "image side {image_px} px must be a multiple of patch·merge = {unit}"
            ));
        }
        let side = image_px / v.patch_size;
        let image_tokens = side * side / v.merge_unit();
        let marks = if image_px > 0 { 2 } else { 0 };
        if seq < PROMPT + image_tokens + marks + 2 {
            return Err(format!(
                "T = {seq} tokens cannot hold {PROMPT} prompt tokens, an image of {image_tokens} tokens \
                 and an answer: raise --seq or lower --image-px"
            ));
        }
        let specials = cfg.vision_ids();
        let top = specials
            .iter()
            .chain(&cfg.eos_token_ids)
            .copied()
            .min()
            .unwrap_or(u32::MAX)
            .min(cfg.text.vocab_size as u32);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut input_ids, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..batch {
            let mut ids: Vec<u32> = (0..PROMPT).map(|_| rng.random_range(0..top)).collect();
            if image_px > 0 {
                ids.push(cfg.vision_start_token_id);
                ids.extend(std::iter::repeat_n(cfg.image_token_id, image_tokens));
                ids.push(cfg.vision_end_token_id);
            }
            let prompt_len = ids.len();
            while ids.len() < seq {
                ids.push(rng.random_range(0..top));
            }
            let lab = ids
                .iter()
                .enumerate()
                .map(|(i, &x)| if i < prompt_len { IGNORE } else { x as i64 })
                .collect();
            input_ids.push(ids);
            labels.push(lab);
        }
        let (grids, n) = if image_px > 0 {
            (vec![[1, side, side]; batch], batch * side * side)
        } else {
            (Vec::new(), 0)
        };
        // CLIP-normalised pixels lie in about [-1.8, 2.1].
        let pixel_values = (0..n * v.patch_dim())
            .map(|_| rng.random_range(-1.8f32..2.1))
            .collect();
        Ok(SyntheticBatch {
            input_ids,
            labels,
            pixel_values,
            patch_dim: v.patch_dim(),
            grids,
        })
    }

    pub fn tokens(&self) -> usize {
        self.input_ids.iter().map(Vec::len).sum()
    }
    pub fn labelled(&self) -> usize {
        // Position 0 of a row predicts nothing (labels are shifted inside the loss).
        self.labels
            .iter()
            .map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE).count())
            .sum()
    }
    pub fn patches(&self) -> usize {
        self.pixel_values.len() / self.patch_dim.max(1)
    }

    /// The model input on `device` (pixels in `dtype`) and the labels.
    pub fn input(&self, device: &Device, dtype: DType) -> omr_model::Result<Input> {
        let mask: Vec<Vec<u32>> = self.input_ids.iter().map(|r| vec![1; r.len()]).collect();
        let pv = if self.grids.is_empty() {
            None
        } else {
            let t =
                Tensor::from_slice(&self.pixel_values, (self.patches(), self.patch_dim), device)?;
            Some(t.to_dtype(dtype)?)
        };
        Input::padded(self.input_ids.clone(), &mask, pv, self.grids.clone())
    }

    /// The batch as transformers takes it (`input_ids`, `attention_mask`, `labels` i64,
    /// `pixel_values` f32, `image_grid_thw` i64), for the reference side of the benchmark.
    pub fn save(&self, path: &Path) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (b, t) = (self.input_ids.len(), self.input_ids[0].len());
        let ids: Vec<i64> = self.input_ids.iter().flatten().map(|&x| x as i64).collect();
        let labels: Vec<i64> = self.labels.iter().flatten().copied().collect();
        let mut m: HashMap<String, Tensor> = HashMap::new();
        m.insert("input_ids".into(), Tensor::from_vec(ids, (b, t), &dev)?);
        m.insert(
            "attention_mask".into(),
            Tensor::ones((b, t), DType::I64, &dev)?,
        );
        m.insert("labels".into(), Tensor::from_vec(labels, (b, t), &dev)?);
        if !self.grids.is_empty() {
            m.insert(
                "pixel_values".into(),
                Tensor::from_slice(&self.pixel_values, (self.patches(), self.patch_dim), &dev)?,
            );
            let g: Vec<i64> = self.grids.iter().flatten().map(|&x| x as i64).collect();
            m.insert(
                "image_grid_thw".into(),
                Tensor::from_vec(g, (self.grids.len(), 3), &dev)?,
            );
        }
        candle_core::safetensors::save(&m, path)
    }
}

/// Seconds of each phase of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// The vision probe (not part of `step`).
    pub vision_forward: f64,
    /// Loss forward, vision included.
    pub forward: f64,
    pub backward: f64,
    /// Gradient accumulation + clip + AdamW.
    pub optimizer: f64,
    /// forward + backward + optimizer.
    pub step: f64,
}

/// The objective a timed step trains through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepHead {
    /// SFT's summed cross-entropy (`Qwen2VL::head_loss`).
    CrossEntropy,
    /// GRPO's: −Σ log p of the labelled tokens under softmax(logits) with the vision ids
    /// suppressed (`Qwen2VL::head_logps`; unit advantages).
    TokenLogps,
}

/// The objective of `head` on final hidden states `h`, and the labelled tokens it counts.
fn head_objective(
    model: &Qwen2VL,
    h: &Tensor,
    labels: &[Vec<i64>],
    ctx: &Ctx,
    head: StepHead,
) -> omr_model::Result<(Tensor, usize)> {
    match head {
        StepHead::CrossEntropy => model.head_loss(h, labels, ctx),
        StepHead::TokenLogps => {
            let (picked, targets) = model.labelled_rows(h, labels)?;
            let suppress = model.cfg.vision_ids().to_vec();
            let (logp, _) = model.head_logps(&picked, &targets, 1.0, &suppress, ctx)?;
            Ok((logp.sum_all()?.neg()?, targets.len()))
        }
    }
}

/// One training step on `micro_batches` forward + backward passes of `input` accumulated (at least
/// one); returns the mean loss over labelled tokens and the phase times, each summed over the
/// micro-batches. With `probe_vision`, the vision tower's forward is timed on its own first.
/// With `recompute` (of the gradients of `wrt`), forward and backward are one phase (the
/// backward recomputes blocks): its time is reported as backward. `kernels`: the ops
/// implementation; `head`: SFT's objective or GRPO's.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Qwen2VL,
    opt: &mut AdamW,
    input: &Input,
    labels: &[Vec<i64>],
    probe_vision: bool,
    recompute: Recompute,
    wrt: &[Tensor],
    kernels: Kernels,
    micro_batches: usize,
    head: StepHead,
) -> crate::Result<(f64, PhaseTimes)> {
    let dev = model.device().clone();
    let ctx = Ctx {
        kernels,
        ..Ctx::default()
    };
    let mut t = PhaseTimes::default();
    if probe_vision {
        if let Some(pv) = &input.pixel_values {
            dev.synchronize()?;
            let t0 = Instant::now();
            let feats = model.image_features(pv, &input.grids, &ctx)?;
            dev.synchronize()?;
            t.vision_forward = t0.elapsed().as_secs_f64();
            drop(feats);
        }
    }
    let mut acc = opt.grad_accum();
    let (mut loss, mut n) = (0.0, 0);
    for _ in 0..micro_batches.max(1) {
        dev.synchronize()?;
        let t0 = Instant::now();
        let (l, k, grads) = if recompute == Recompute::NONE {
            let h = model.hidden(input, &ctx)?;
            let (sum, k) = head_objective(model, &h, labels, &ctx, head)?;
            let l = sum.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
            t.forward += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let grads = omr_kernels::grad_sink::backward(&sum)?;
            dev.synchronize()?;
            t.backward += t1.elapsed().as_secs_f64();
            (l, k, grads)
        } else {
            let mut k = 0;
            let out =
                model.forward_backward::<crate::TrainError>(input, &ctx, recompute, wrt, |h| {
                    let (sum, m) = head_objective(model, h, labels, &ctx, head)?;
                    k = m;
                    Ok(sum)
                })?;
            dev.synchronize()?;
            t.backward += t0.elapsed().as_secs_f64();
            let grads = out.grads.ok_or_else(|| {
                crate::TrainError::Internal("non-finite loss on a synthetic batch".into())
            })?;
            (out.loss, k, grads)
        };
        let t2 = Instant::now();
        acc.add(&grads)
            .map_err(|e| crate::TrainError::Internal(e.to_string()))?;
        drop(grads);
        dev.synchronize()?;
        t.optimizer += t2.elapsed().as_secs_f64();
        loss += l;
        n += k;
    }
    // The loss of the whole accumulated batch is normalised by all its labelled tokens, as
    // sft::run does.
    let t3 = Instant::now();
    let outcome = opt
        .step_accumulated(&mut acc, 1.0, 1.0 / n.max(1) as f64)
        .map_err(|e| crate::TrainError::Internal(e.to_string()))?;
    dev.synchronize()?;
    t.optimizer += t3.elapsed().as_secs_f64();
    t.step = t.forward + t.backward + t.optimizer;
    if let StepOutcome::NonFinite { grad_norm } = outcome {
        return Err(crate::TrainError::Internal(format!(
            "non-finite gradient norm {grad_norm} on a synthetic batch"
        )));
    }
    Ok((loss / n.max(1) as f64, t))
}
