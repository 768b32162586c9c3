//! Held-out evaluation during and after training: loss on labelled samples and answer accuracy
//! from greedy generation, with per-group (task family, modality) breakdowns.
//!
//! The held-out set is read once, in file order (not shuffled), from the same sources as the
//! training data with the eval split, so every evaluation of a run scores the same samples.
//! Accuracy is the OpenMedReason-Bench rule: the letter inside the first `<answer>…</answer>`
//! equals the reference letter; a reply without one is wrong (and counted as a format miss).
//!
//! In a data-parallel run every process evaluates every W-th batch of the set (the batches
//! one process would make), and the per-batch loss sums are added in batch order: the same
//! numbers as one process's evaluation, in 1/W of its time.

use crate::batch;
use crate::card::EvalResult;
use crate::config::EvalConfig;
use crate::dist::Group;
use crate::setup::Built;
use candle_core::{Device, Tensor};
use omr_data::collate::collate;
use omr_data::pipeline::{Processor, Prompt};
use omr_data::sample::{Mcq, Origin, Rubric};
use omr_data::source::{self, SourceSpec};
use omr_data::{mcq, Encoded};
use omr_model::generate::{generate, SamplingConfig};
use omr_model::model::{Input, Qwen2VL};
use std::collections::BTreeMap;

/// A prompt with its reference answer and its group tags.
pub struct GenItem {
    pub prompt: Prompt,
    pub answer: String,
    /// Number of options (chance accuracy is 1/options; 0 for open questions).
    pub options: usize,
    pub groups: Vec<(String, String)>,
    /// Where the record came from (names it in per-item reports).
    pub origin: Origin,
    /// The question, its options and answer (for grading), the reference trace and the
    /// rubric (for judging traces).
    pub mcq: Mcq,
    pub reference: Option<String>,
    pub rubric: Option<Rubric>,
}

pub struct EvalSet {
    pub loss_items: Vec<Encoded>,
    pub gen_items: Vec<GenItem>,
    /// Records that could not be used, with the reason.
    pub skipped: Vec<String>,
}

/// Reads up to `n_loss` encoded samples and `n_gen` prompts from `split` of `specs`, in order
/// (sources in turn until each count is reached).
pub fn load_eval_set(
    specs: &[SourceSpec],
    split: &str,
    processor: &Processor,
    n_loss: usize,
    n_gen: usize,
) -> Result<EvalSet, source::SourceError> {
    let mut set = EvalSet {
        loss_items: Vec::new(),
        gen_items: Vec::new(),
        skipped: Vec::new(),
    };
    for spec in specs {
        let mut spec = spec.clone();
        spec.split = split.to_string();
        let src = source::open(&spec)?;
        for b in 0..src.blocks().len() {
            if set.loss_items.len() >= n_loss && set.gen_items.len() >= n_gen {
                return Ok(set);
            }
            for rec in src.read_block(b)? {
                let s = match rec {
                    Ok(s) => s,
                    Err((o, r)) => {
                        set.skipped.push(format!("{}#{}: {r}", o.shard, o.row));
                        continue;
                    }
                };
                if set.loss_items.len() < n_loss {
                    match processor.encode(&s) {
                        Ok(e) => set.loss_items.push(e),
                        Err(r) => set
                            .skipped
                            .push(format!("{}#{}: {r}", s.origin.shard, s.origin.row)),
                    }
                }
                let Some(q) = &s.mcq else { continue };
                if set.gen_items.len() < n_gen {
                    match processor.encode_prompt(&s) {
                        Ok(prompt) => set.gen_items.push(GenItem {
                            prompt,
                            answer: q.answer.clone(),
                            options: q.options.len(),
                            groups: ["task_family", "modality", "task"]
                                .iter()
                                .filter_map(|k| s.meta.get(*k).map(|v| (k.to_string(), v.clone())))
                                .collect(),
                            origin: s.origin.clone(),
                            mcq: q.clone(),
                            reference: s.reasoning.clone(),
                            rubric: s.rubric.clone(),
                        }),
                        Err(r) => set
                            .skipped
                            .push(format!("{}#{}: {r}", s.origin.shard, s.origin.row)),
                    }
                }
            }
        }
    }
    Ok(set)
}

/// Mean loss per assistant token over `items`, in padded batches of `batch_size`.
pub fn eval_loss(
    model: &Qwen2VL,
    items: &[Encoded],
    batch_size: usize,
    pad_id: u32,
) -> omr_model::Result<f64> {
    let parts = eval_loss_batches(model, items, batch_size, pad_id, (0, 1))?;
    Ok(loss_of(&[parts]))
}

/// The summed token loss and token count of the padded batches of `batch_size` numbered
/// rank, rank + world, … (`stripe` = (rank, world)).
pub fn eval_loss_batches(
    model: &Qwen2VL,
    items: &[Encoded],
    batch_size: usize,
    pad_id: u32,
    stripe: (usize, usize),
) -> omr_model::Result<Vec<(f64, usize)>> {
    let mut out = Vec::new();
    let (rank, world) = stripe;
    for chunk in items
        .chunks(batch_size.max(1))
        .skip(rank)
        .step_by(world.max(1))
    {
        let rows: Vec<Vec<&Encoded>> = chunk.iter().map(|e| vec![e]).collect();
        let b = collate(&rows, pad_id, 8);
        let (input, labels) = batch::to_input(&b, model.device())?;
        // No backward: one layer's intermediates at a time.
        let ctx = omr_model::linear::Ctx {
            no_grad: true,
            ..model.ctx()
        };
        let (s, n) = model.loss(&input, &labels, &ctx)?;
        out.push((s.to_scalar::<f32>()? as f64, n));
    }
    Ok(out)
}

/// Mean token loss from every rank's [`eval_loss_batches`] (rank order): summed in batch
/// order, batch b being rank b mod W's (b / W)-th.
fn loss_of(ranks: &[Vec<(f64, usize)>]) -> f64 {
    let world = ranks.len().max(1);
    let batches: usize = ranks.iter().map(Vec::len).sum();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for b in 0..batches {
        if let Some(&(s, n)) = ranks[b % world].get(b / world) {
            sum += s;
            count += n;
        }
    }
    sum / count.max(1) as f64
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accuracy {
    pub total: usize,
    pub correct: usize,
    /// Replies with a parsable `<answer>` tag.
    pub formatted: usize,
    /// (group key, group value) → (correct, total)
    pub by_group: BTreeMap<(String, String), (usize, usize)>,
}

impl Accuracy {
    /// Counts of several parts of a set added up.
    pub fn merge(parts: Vec<Accuracy>) -> Accuracy {
        let mut m = Accuracy::default();
        for p in parts {
            m.total += p.total;
            m.correct += p.correct;
            m.formatted += p.formatted;
            for (k, (c, t)) in p.by_group {
                let e = m.by_group.entry(k).or_default();
                e.0 += c;
                e.1 += t;
            }
        }
        m
    }

    pub fn value(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
    pub fn format_rate(&self) -> f64 {
        self.formatted as f64 / self.total.max(1) as f64
    }
}

/// Expected accuracy of guessing uniformly among the options.
pub fn chance(items: &[GenItem]) -> f64 {
    let with: Vec<f64> = items
        .iter()
        .filter(|g| g.options > 0)
        .map(|g| 1.0 / g.options as f64)
        .collect();
    with.iter().sum::<f64>() / with.len().max(1) as f64
}

/// Greedy answers to `items` in left-padded batches; `decode` turns tokens into text. Only
/// the batches numbered rank, rank + world, … (`stripe` = (rank, world); (0, 1): all).
pub fn eval_accuracy(
    model: &Qwen2VL,
    items: &[GenItem],
    batch_size: usize,
    pad_id: u32,
    sampling: &SamplingConfig,
    decode: &dyn Fn(&[u32]) -> String,
    stripe: (usize, usize),
) -> omr_model::Result<Accuracy> {
    let mut acc = Accuracy::default();
    let (rank, world) = stripe;
    for chunk in items
        .chunks(batch_size.max(1))
        .skip(rank)
        .step_by(world.max(1))
    {
        let input = left_padded(chunk.iter().map(|g| &g.prompt), pad_id, model.device())?;
        let outs = generate(model, &input, sampling)?;
        for (item, out) in chunk.iter().zip(outs) {
            let text = decode(&out.tokens);
            let got = mcq::answer_tag(&text);
            let ok = got.as_deref() == Some(item.answer.as_str());
            acc.total += 1;
            acc.correct += usize::from(ok);
            acc.formatted += usize::from(got.is_some());
            for g in &item.groups {
                let e = acc.by_group.entry(g.clone()).or_default();
                e.0 += usize::from(ok);
                e.1 += 1;
            }
        }
    }
    Ok(acc)
}

/// Prompts → a left-padded `Input` (generation appends on the right).
pub fn left_padded<'a>(
    prompts: impl Iterator<Item = &'a Prompt>,
    pad_id: u32,
    device: &Device,
) -> omr_model::Result<Input> {
    let prompts: Vec<&Prompt> = prompts.collect();
    let t = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len());
    let mut mask = Vec::with_capacity(prompts.len());
    let mut pixels: Vec<f32> = Vec::new();
    let mut grids = Vec::new();
    let mut patch_dim = 0;
    for p in &prompts {
        let pad = t - p.input_ids.len();
        let mut row = vec![pad_id; pad];
        row.extend_from_slice(&p.input_ids);
        ids.push(row);
        let mut m = vec![0u32; pad];
        m.resize(t, 1);
        mask.push(m);
        pixels.extend_from_slice(&p.pixel_values);
        grids.extend(p.image_grid_thw.iter().map(|g| g.map(|x| x as usize)));
        if !p.image_grid_thw.is_empty() {
            patch_dim = p.patch_dim;
        }
    }
    let pixel_values = if grids.is_empty() {
        None
    } else {
        let n = pixels.len() / patch_dim;
        Some(Tensor::from_vec(pixels, (n, patch_dim), device)?)
    };
    Input::padded(ids, &mask, pixel_values, grids)
}

/// Held-out loss and greedy answer accuracy of a run, as model-card eval rows, evaluated by
/// every rank of `group` (its share of the batches) and the same on each.
pub fn evaluate_run(
    model: &Qwen2VL,
    set: &EvalSet,
    cfg: &EvalConfig,
    sources: &[SourceSpec],
    processor: &Processor,
    built: &Built,
    group: &mut Group,
) -> crate::Result<Vec<EvalResult>> {
    let stripe = (group.rank(), group.world());
    let split = cfg.split.clone();
    let dataset = sources
        .first()
        .map(|s| s.display_name())
        .unwrap_or_default();
    let row = |metric: &str, value: f64| EvalResult {
        task: "visual-question-answering".into(),
        dataset: dataset.clone(),
        split: split.clone(),
        metric: metric.into(),
        value,
    };
    let mut out = Vec::new();
    if !set.loss_items.is_empty() {
        let mine = eval_loss_batches(
            model,
            &set.loss_items,
            cfg.batch_size,
            processor.pad_id(),
            stripe,
        )?;
        out.push(row("loss", loss_of(&group.all_gather_value(&mine)?)));
    }
    if !set.gen_items.is_empty() {
        let sampling = SamplingConfig {
            max_new_tokens: cfg.max_new_tokens,
            eos_token_ids: built.eos_token_ids.clone(),
            ..Default::default()
        };
        let tok = processor.encoder().tokenizer();
        let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_default();
        let acc = eval_accuracy(
            model,
            &set.gen_items,
            cfg.batch_size,
            processor.pad_id(),
            &sampling,
            &decode,
            stripe,
        )?;
        let acc = Accuracy::merge(group.all_gather_value(&acc)?);
        out.push(row("accuracy", acc.value()));
        out.push(row("format_rate", acc.format_rate()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_loss_sums_add_in_one_process_batch_order() {
        // Batches 0..4 as one process makes them; rank 0 scored 0 and 2, rank 1 scored 1 and 3.
        // In batch order 1e16 + 1 rounds to 1e16, so the sum is 1; rank by rank it would be 2.
        let ranks = vec![vec![(1e16, 1), (-1e16, 1)], vec![(1.0, 1), (1.0, 1)]];
        assert_eq!(loss_of(&ranks), 1.0 / 4.0);
        let one = vec![vec![(1e16, 1), (1.0, 1), (-1e16, 1), (1.0, 1)]];
        assert_eq!(loss_of(&one), loss_of(&ranks));
        assert_eq!(loss_of(&[vec![]]), 0.0, "no batch: 0, not NaN");
    }

    #[test]
    fn accuracy_counts_merge() {
        let part = |c, t, g: &str| Accuracy {
            total: t,
            correct: c,
            formatted: t,
            by_group: [(("modality".to_string(), g.to_string()), (c, t))].into(),
        };
        let m = Accuracy::merge(vec![part(1, 2, "ct"), part(2, 3, "ct"), part(0, 1, "mri")]);
        assert_eq!((m.correct, m.total, m.formatted), (3, 6, 6));
        assert_eq!(m.by_group[&("modality".into(), "ct".into())], (3, 5));
        assert_eq!(m.by_group[&("modality".into(), "mri".into())], (0, 1));
    }
}
