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
//! - Training rows are packed: each `prompt + completion` is one segment (positions from 0,
//!   attending only to itself), so positions (M-RoPE) and attention match generation's, and
//!   the rows carry no padding but at their ends ([`seq_batch`]).
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
/// prefilled once for all its rows. Chunk c's draws are keyed by `seed_parts` and
/// c·world + rank (`stripe` = (rank, world) of a data-parallel run, (0, 1) otherwise): with one
/// prompt per chunk, rank r's c-th prompt draws as a single process's (c·world + r)-th.
#[allow(clippy::too_many_arguments)]
pub fn generate_groups(
    model: &Qwen2VL,
    prompts: &[PromptItem],
    group_size: usize,
    sampling: &SamplingConfig,
    seed_parts: &[u64],
    chunk_rows: usize,
    pad_id: u32,
    stripe: (usize, usize),
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
        parts.push((c * stripe.1 + stripe.0) as u64);
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

/// One micro-batch of training sequences, packed into rows ([`seq_batch`]).
pub struct SeqBatch {
    /// (R, W): R ≤ N rows of W = the longest sequence's tokens, sequences end to end.
    pub input: Input,
    /// (R, W): completion tokens at their positions, −100 elsewhere.
    pub labels: Vec<Vec<i64>>,
    /// (N, Tc) completion mask, 1 on real completion tokens.
    pub mask: Tensor,
    /// (N, Tc) the generating policy's log-probs, 0 on padding.
    pub old_logp: Tensor,
    pub tc: usize,
    /// Completion tokens of each sequence.
    pub lens: Vec<usize>,
    /// Where each sequence's completion tokens start among the batch's labelled positions
    /// ((row, position) order).
    pub starts: Vec<usize>,
}

/// Rows `(prompt, completion)` → a [`SeqBatch`], the sequences packed: each `prompt +
/// completion` is one segment (positions from 0, attending only to itself, as generation saw
/// it), placed first-fit, longest first, into rows as long as the longest sequence, each row
/// padded at its end. A padded batch's rows would carry `max prompt + max completion` tokens
/// each, most of them padding when completion lengths vary.
pub fn seq_batch(
    rows: &[(&Prompt, &Completion)],
    pad_id: u32,
    device: &Device,
) -> omr_model::Result<SeqBatch> {
    let tc = rows
        .iter()
        .map(|(_, c)| c.tokens.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let seq_len = |i: usize| rows[i].0.input_ids.len() + rows[i].1.tokens.len();
    let n = rows.len();
    let width = (0..n).map(seq_len).max().unwrap_or(0).max(1);
    // First fit, longest first (ties in input order): the sequences of each packed row.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seq_len(i)));
    let mut packed: Vec<(usize, Vec<usize>)> = Vec::new(); // (tokens, sequences)
    for i in order {
        match packed
            .iter_mut()
            .find(|(used, _)| used + seq_len(i) <= width)
        {
            Some((used, seqs)) => {
                *used += seq_len(i);
                seqs.push(i);
            }
            None => packed.push((seq_len(i), vec![i])),
        }
    }
    let mut ids = Vec::with_capacity(packed.len());
    let mut labels = Vec::with_capacity(packed.len());
    let mut seq_lens = Vec::with_capacity(packed.len());
    let mut pixels: Vec<f32> = Vec::new();
    let mut grids = Vec::new();
    let mut patch_dim = 0;
    // Where each sequence's completion tokens start among the labelled positions, which come
    // in (row, position) order.
    let mut starts = vec![0usize; n];
    let mut labelled = 0;
    for (_, seqs) in &packed {
        let mut row = Vec::with_capacity(width);
        let mut l = Vec::with_capacity(width);
        for &i in seqs {
            let (p, c) = rows[i];
            row.extend_from_slice(&p.input_ids);
            row.extend_from_slice(&c.tokens);
            l.extend(std::iter::repeat_n(
                omr_model::loss::IGNORE,
                p.input_ids.len(),
            ));
            l.extend(c.tokens.iter().map(|&x| x as i64));
            starts[i] = labelled;
            labelled += c.tokens.len();
            pixels.extend_from_slice(&p.pixel_values);
            grids.extend(p.image_grid_thw.iter().map(|g| g.map(|x| x as usize)));
            if !p.image_grid_thw.is_empty() {
                patch_dim = p.patch_dim;
            }
        }
        row.resize(width, pad_id);
        l.resize(width, omr_model::loss::IGNORE);
        ids.push(row);
        labels.push(l);
        seq_lens.push(seqs.iter().map(|&i| seq_len(i)).collect::<Vec<_>>());
    }
    let mut mask = Vec::with_capacity(n * tc);
    let mut old = Vec::with_capacity(n * tc);
    let mut lens = Vec::with_capacity(n);
    for (_, c) in rows {
        let len = c.tokens.len();
        lens.push(len);
        for j in 0..tc {
            mask.push(if j < len { 1f32 } else { 0.0 });
            old.push(if j < len { c.logprobs[j] } else { 0.0 });
        }
    }
    let pixel_values = if grids.is_empty() {
        None
    } else {
        let np = pixels.len() / patch_dim;
        Some(Tensor::from_vec(pixels, (np, patch_dim), device)?)
    };
    Ok(SeqBatch {
        input: Input::packed(ids, &seq_lens, pixel_values, grids)?,
        labels,
        mask: Tensor::from_vec(mask, (n, tc), device)?,
        old_logp: Tensor::from_vec(old, (n, tc), device)?,
        tc,
        lens,
        starts,
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
    let (picked, targets) = model.labelled_rows(h, &b.labels)?; // (K, C)
    let k = targets.len();
    let dev = h.device().clone();
    // logp (K,) and the summed entropy
    let (logp, entropy) = model.head_logps(&picked, &targets, temperature, suppress, ctx)?;
    // Gather the K values into (N, Tc): sequence i's completion tokens are the labelled
    // positions starts[i]..starts[i] + lens[i] (K: the zero appended for padding).
    let total: usize = b.lens.iter().sum();
    if total != k {
        return Err(omr_model::ModelError::Input(format!(
            "{k} labelled positions for {total} completion tokens"
        )));
    }
    let n = b.lens.len();
    let mut gather = Vec::with_capacity(n * b.tc);
    for (&start, &len) in b.starts.iter().zip(&b.lens) {
        for j in 0..b.tc {
            gather.push(if j < len {
                (start + j) as u32
            } else {
                k as u32
            });
        }
    }
    let all = Tensor::cat(&[&logp, &Tensor::zeros(1, DType::F32, &dev)?], 0)?;
    let gather = Tensor::from_vec(gather, (n * b.tc,), &dev)?;
    Ok((all.index_select(&gather, 0)?.reshape((n, b.tc))?, entropy))
}

pub fn truncated(c: &Completion) -> bool {
    c.finish == Finish::Length
}
