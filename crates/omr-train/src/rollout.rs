//! GRPO rollouts: prompts → G completions each from the in-process generation engine (the
//! trainer's own weights: no weight sync, no second copy), and the tensors the loss needs.
//!
//! Notable choices:
//! - The log-probs the engine returns with each sampled token are the "old" log-probs of the
//!   clipped objective: they are log softmax(logits / temperature) of the policy that
//!   generated, which is what TRL recomputes with an extra forward pass. The training forward
//!   scales its logits by the same temperature, so the importance ratio starts at 1.
//! - Sampling is keyed by (seed, step, round, chunk) and the row inside the chunk, so a resumed
//!   run draws the same completions as the uninterrupted one.
//! - A training row is `[left padding | prompt | completion | right padding]`: the prompt block
//!   exactly as generation saw it, so positions (M-RoPE) and attention match generation.
//! - Only completion positions go through the lm head (`Qwen2VL::loss`'s trick): the (N, V)
//!   logits of a big vocabulary exist for completion tokens only.

use crate::eval::left_padded;
use candle_core::{DType, Device, Tensor};
use omr_data::mixture::derive_seed;
use omr_data::pipeline::Prompt;
use omr_data::Mcq;
use omr_model::generate::{generate_repeated, Completion, Finish, SamplingConfig};
use omr_model::linear::Ctx;
use omr_model::model::{Input, Qwen2VL};
use std::collections::BTreeMap;

/// A prompt of the training stream with what its completions are rewarded against.
#[derive(Clone, Debug)]
pub struct PromptItem {
    pub prompt: Prompt,
    pub item: Mcq,
    /// `shard#row` of the record.
    pub id: String,
    pub meta: BTreeMap<String, String>,
}

/// G completions for every prompt, grouped consecutively: row `p·G + k` is the k-th completion
/// of prompt p. Generation runs in chunks of `chunk_rows` rows; within a chunk each prompt is
/// prefilled once for all its rows.
pub fn generate_groups(
    model: &Qwen2VL,
    prompts: &[PromptItem],
    group_size: usize,
    sampling: &SamplingConfig,
    seed_parts: &[u64],
    chunk_rows: usize,
    pad_id: u32,
) -> omr_model::Result<Vec<Completion>> {
    let rows: Vec<&Prompt> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(&p.prompt, group_size))
        .collect();
    let mut out = Vec::with_capacity(rows.len());
    for (c, chunk) in rows.chunks(chunk_rows.max(1)).enumerate() {
        // A group's rows are one prompt: prefilled once (vision tower included), its cache
        // copied to the group's rows (generate_repeated).
        let mut distinct: Vec<&Prompt> = Vec::new();
        let mut repeats: Vec<usize> = Vec::new();
        for &p in chunk {
            match distinct.last() {
                Some(&last) if std::ptr::eq(last, p) => *repeats.last_mut().expect("a run") += 1,
                _ => {
                    distinct.push(p);
                    repeats.push(1);
                }
            }
        }
        let input = left_padded(distinct.iter().copied(), pad_id, model.device())?;
        let mut parts = seed_parts.to_vec();
        parts.push(c as u64);
        let cfg = SamplingConfig {
            seed: derive_seed(&parts),
            ..sampling.clone()
        };
        out.extend(generate_repeated(
            model,
            &input,
            &repeats,
            &cfg,
            &model.ctx(),
        )?);
    }
    Ok(out)
}

/// One micro-batch of training rows.
pub struct SeqBatch {
    pub input: Input,
    /// (N, T): completion tokens at their positions, −100 elsewhere.
    pub labels: Vec<Vec<i64>>,
    /// (N, Tc) completion mask, 1 on real completion tokens.
    pub mask: Tensor,
    /// (N, Tc) the generating policy's log-probs, 0 on padding.
    pub old_logp: Tensor,
    pub tc: usize,
    pub lens: Vec<usize>,
}

/// Rows `(prompt, completion)` → a [`SeqBatch`].
pub fn seq_batch(
    rows: &[(&Prompt, &Completion)],
    pad_id: u32,
    device: &Device,
) -> omr_model::Result<SeqBatch> {
    let tp = rows
        .iter()
        .map(|(p, _)| p.input_ids.len())
        .max()
        .unwrap_or(0);
    let tc = rows
        .iter()
        .map(|(_, c)| c.tokens.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let t = tp + tc;
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut attn = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut mask = Vec::with_capacity(n * tc);
    let mut old = Vec::with_capacity(n * tc);
    let mut pixels: Vec<f32> = Vec::new();
    let mut grids = Vec::new();
    let mut patch_dim = 0;
    let mut lens = Vec::with_capacity(n);
    for (p, c) in rows {
        let pad = tp - p.input_ids.len();
        let len = c.tokens.len();
        lens.push(len);
        let mut row = vec![pad_id; pad];
        row.extend_from_slice(&p.input_ids);
        row.extend_from_slice(&c.tokens);
        row.resize(t, pad_id);
        let mut m = vec![0u32; pad];
        m.resize(tp + len, 1);
        m.resize(t, 0);
        let mut l = vec![omr_model::loss::IGNORE; tp];
        l.extend(c.tokens.iter().map(|&x| x as i64));
        l.resize(t, omr_model::loss::IGNORE);
        ids.push(row);
        attn.push(m);
        labels.push(l);
        for j in 0..tc {
            mask.push(if j < len { 1f32 } else { 0.0 });
            old.push(if j < len { c.logprobs[j] } else { 0.0 });
        }
        pixels.extend_from_slice(&p.pixel_values);
        grids.extend(p.image_grid_thw.iter().map(|g| g.map(|x| x as usize)));
        if !p.image_grid_thw.is_empty() {
            patch_dim = p.patch_dim;
        }
    }
    let pixel_values = if grids.is_empty() {
        None
    } else {
        let np = pixels.len() / patch_dim;
        Some(Tensor::from_vec(pixels, (np, patch_dim), device)?)
    };
    Ok(SeqBatch {
        input: Input::padded(ids, &attn, pixel_values, grids)?,
        labels,
        mask: Tensor::from_vec(mask, (n, tc), device)?,
        old_logp: Tensor::from_vec(old, (n, tc), device)?,
        tc,
        lens,
    })
}

/// Per-token log-probs of the completion tokens under `model`, (N, Tc), 0 on padding;
/// differentiable when `model` has trainable weights. Also the summed entropy of the (tempered)
/// next-token distributions at those positions, detached.
/// `suppress`: ids the engine never samples (`SamplingConfig::suppress_tokens`), excluded from
/// the softmax here too so that both sides compute the same distribution.
pub fn completion_logps(
    model: &Qwen2VL,
    b: &SeqBatch,
    temperature: f64,
    suppress: &[u32],
    ctx: &Ctx,
) -> omr_model::Result<(Tensor, f64)> {
    let h = model.hidden(&b.input, ctx)?; // (N, T, C)
    logps_from_hidden(model, &h, b, temperature, suppress, ctx)
}

/// [`completion_logps`] from the final hidden states `h` (N, T, C) of `b.input`.
pub fn logps_from_hidden(
    model: &Qwen2VL,
    h: &Tensor,
    b: &SeqBatch,
    temperature: f64,
    suppress: &[u32],
    ctx: &Ctx,
) -> omr_model::Result<(Tensor, f64)> {
    let n = h.dim(0)?;
    let (picked, targets) = model.labelled_rows(h, &b.labels)?; // (K, C)
    let k = targets.len();
    let dev = h.device().clone();
    // logp (K,) and the summed entropy
    let (logp, entropy) = model.head_logps(&picked, &targets, temperature, suppress, ctx)?;
    // Scatter the K values into (N, Tc): labelled rows come in (row, position) order, and the
    // completion tokens of row i are its first lens[i] labelled positions.
    let mut gather = Vec::with_capacity(n * b.tc);
    let mut next = 0u32;
    for &len in &b.lens {
        for j in 0..b.tc {
            if j < len {
                gather.push(next);
                next += 1;
            } else {
                gather.push(k as u32);
            }
        }
    }
    if next as usize != k {
        return Err(omr_model::ModelError::Input(format!(
            "{k} labelled positions for {next} completion tokens"
        )));
    }
    let all = Tensor::cat(&[&logp, &Tensor::zeros(1, DType::F32, &dev)?], 0)?;
    let gather = Tensor::from_vec(gather, (n * b.tc,), &dev)?;
    Ok((all.index_select(&gather, 0)?.reshape((n, b.tc))?, entropy))
}

pub fn truncated(c: &Completion) -> bool {
    c.finish == Finish::Length
}
