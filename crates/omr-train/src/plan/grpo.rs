//! The plan of a GRPO run (`omr plan` on a GRPO config; `kept_decoder_layers = "auto"` in
//! `omr grpo`): the policy update is a training step like SFT's on a micro-batch of
//! `grpo.micro_batch_size` rows of prompt + completion, with only the completion tokens scored
//! (GRPO's token log-probabilities instead of the cross-entropy), plus what SFT does not have:
//! - the frozen reference model of the KL term (`objective.beta > 0`), in the compute dtype,
//!   resident for the whole run (`grpo/reference.rs`);
//! - the rollout phase: `grpo.generation_batch_size` rows generated with the key/value cache
//!   (`omr_model::generate`), while the optimizer state is resident but no activations are.
//!
//! Worst case of the data, as for SFT: every prompt `data.process.max_length` tokens with one
//! image at the processor's max_pixels, every completion `grpo.max_completion_length` tokens.

use super::input::{image_hw, max_pixels, model_config, trainable};
use super::{AttentionImpl, Checkpointing, PlanInput, PlanOptions, Row, Trainable, F32};
use crate::grpo_config::GrpoConfig;
use omr_model::config::ModelConfig;

/// What a GRPO run adds to the policy update's [`PlanInput`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpoShape {
    /// `objective.beta > 0`: a frozen copy of the initial weights in the compute dtype.
    pub reference: bool,
    /// Rows per generation call (`grpo.generation_batch_size`).
    pub rollout_rows: usize,
    /// Distinct prompts a generation call prefills: a group's rows share one prefill
    /// (`generate_repeated`), so `rollout_rows / group_size` when groups tile the calls.
    pub prefill_rows: usize,
    /// Prompt tokens of a row (worst case: `data.process.max_length`).
    pub prompt_tokens: usize,
    /// Completion tokens of a row (`grpo.max_completion_length`): the rows the head scores.
    pub completion_tokens: usize,
}

/// The plan input of a GRPO config: the policy update's micro-batch, its GRPO shape, and
/// notes on where each number came from.
pub fn input_from_grpo(
    cfg: &GrpoConfig,
    o: &PlanOptions,
) -> Result<(PlanInput, Vec<String>), String> {
    let mut notes = Vec::new();
    let model = model_config(&cfg.model, o.model_config.as_deref(), &mut notes)?;
    let g = &cfg.grpo;
    let prompt = cfg.data.process.max_length;
    let seq = prompt + g.max_completion_length;
    let max_pixels = max_pixels(o, cfg.model.processor_ref(), &mut notes);
    // One image per prompt, no more image tokens than the prompt holds.
    let image_hw = image_hw(&model, max_pixels, prompt.saturating_sub(2));
    let batch = g.micro_batch_size;
    if !g.prompts_per_step.is_multiple_of(o.world.max(1)) {
        return Err(format!(
            "grpo.prompts_per_step = {} does not split over {} processes: make it a multiple \
             of {}",
            g.prompts_per_step, o.world, o.world
        ));
    }
    let input = PlanInput {
        model,
        batch,
        seq,
        images_per_row: o.images_per_row.unwrap_or(1),
        image_hw,
        labelled: batch * g.max_completion_length,
        trainable: trainable(&cfg.model),
        lora: cfg.model.lora.clone(),
        compute_bytes: o.compute_bytes,
        attention: o.attention,
        checkpointing: cfg.train.activation_checkpointing,
        recompute_attention: cfg.train.recompute_attention,
        kept_decoder_layers: cfg.train.kept_decoder_layers.planned(),
        // Micro-batches of one update: several when a rollout batch has more rows.
        // Each rank of a data-parallel job takes its share of the step's prompts.
        grad_accum: (g.prompts_per_step / o.world.max(1) * g.group_size).div_ceil(batch.max(1))
            as u64,
        world: o.world,
        grpo: Some(GrpoShape {
            reference: cfg.objective.beta > 0.0,
            rollout_rows: g.generation_batch_size,
            prefill_rows: prefill_rows(g.generation_batch_size, g.group_size),
            prompt_tokens: prompt,
            completion_tokens: g.max_completion_length,
        }),
    };
    notes.push(format!(
        "policy update: {batch} rows of {prompt} prompt + {} completion tokens ({} image tokens), \
         {} scored; rollouts of {} rows; {}",
        g.max_completion_length,
        input.image_tokens_per_row(),
        input.labelled,
        g.generation_batch_size,
        if cfg.objective.beta > 0.0 {
            "a frozen reference model (objective.beta > 0)"
        } else {
            "no reference model (objective.beta = 0)"
        }
    ));
    Ok((input, notes))
}

/// The plan input of one generation call alone, every part trainable and nothing else resident
/// but the weights: what `omr bench generate` and the rollout test compare with. `image_px` is
/// the side of each prompt's square image (0: none).
#[allow(clippy::too_many_arguments)]
pub fn rollout_input(
    model: &ModelConfig,
    compute_bytes: u64,
    attention: AttentionImpl,
    rows: usize,
    prompt: usize,
    image_px: usize,
    new: usize,
) -> PlanInput {
    let side = image_px / model.vision.patch_size;
    PlanInput {
        model: model.clone(),
        batch: 1,
        seq: prompt + new,
        images_per_row: usize::from(image_px > 0),
        image_hw: (side, side),
        labelled: new,
        trainable: Trainable {
            vision: true,
            merger: true,
            language: true,
        },
        lora: None,
        compute_bytes,
        attention,
        checkpointing: Checkpointing::None,
        recompute_attention: false,
        kept_decoder_layers: 0,
        grad_accum: 1,
        world: 1,
        grpo: Some(GrpoShape {
            reference: false,
            rollout_rows: rows,
            prefill_rows: rows,
            prompt_tokens: prompt,
            completion_tokens: new,
        }),
    }
}

/// Distinct prompts in a generation call of `rows` rows cut from consecutive groups of `group`
/// rows: `rows / group` when groups tile the calls, else as many as a call starting inside a
/// group can touch.
pub fn prefill_rows(rows: usize, group: usize) -> usize {
    let group = group.max(1);
    if rows.is_multiple_of(group) {
        rows / group
    } else {
        (rows + group - 1).div_ceil(group).min(rows)
    }
}

/// What the rollout phase adds to the resident state.
pub fn rollout_growth(plan: &super::Plan) -> u64 {
    plan.rollout_peak.saturating_sub(plan.state_bytes)
}

/// Bytes of the frozen reference: every weight (and adapter) in the compute dtype.
pub(super) fn reference_bytes(p: &PlanInput, total: u64, lora: u64) -> u64 {
    match &p.grpo {
        Some(g) if g.reference => (total + lora) * p.compute_bytes,
        _ => 0,
    }
}

/// The rollout phase beyond the resident state, the largest of its three moments. Generation
/// runs with `Ctx::no_grad` (`omr_model::generate`): each decoder layer's and vision block's
/// output is detached, so a block's intermediates live until the block ends, as many as a
/// training forward keeps of that block, plus what the fused MLP unit recomputes instead of
/// keeping ([`super::activations`] on the rollout's shapes):
/// - the vision tower over every row's image: the pixel values' compute-dtype copy, the
///   residual stream and the largest block (the f32 pixel values live through the whole call);
/// - the decoder's prefill over every prompt token: the key/value cache of the prompt, the
///   stem (embeddings, rotary tables, mask) and one decoder layer;
/// - the last decoding step: the cache at full length (its buffers, allocated at the first
///   step for the whole generation, are written in place), one layer's copy while finished
///   rows leave the batch (`KvCache::select_rows`, a layer at a time; the first step's
///   reallocation also holds one layer's old buffer) and the step's logits (compute dtype and
///   the f32 copy read back).
///
/// Checked against a counting allocator on the CPU (`tests/plan_memory.rs`).
pub(super) fn rollout_rows(p: &PlanInput, g: &GrpoShape) -> Vec<Row> {
    let t = &p.model.text;
    let s = p.compute_bytes;
    let rows = g.rollout_rows as u64;
    let len = (g.prompt_tokens + g.completion_tokens) as u64;
    let layers = t.num_hidden_layers as u64;
    let kv_dim = (t.num_key_value_heads * t.head_dim) as u64;
    let cache_per_token = 2 * kv_dim * s * layers;

    // Decoding's last step: the buffers sized at the first step for the whole generation, and one
    // layer's copy when finished rows leave.
    let cache = rows * len * cache_per_token;
    let compaction = rows * len * 2 * kv_dim * s;
    let logits = rows * t.vocab_size as u64 * (s + F32);
    let decode = cache + compaction + logits;

    // The prompts' forward, as a training forward of these shapes counts it.
    // Distinct prompts only: a group's rows share one prefill, whose cache and logits are then
    // copied to them (less than the decoding step holds).
    let mut probe = p.clone();
    probe.batch = g.prefill_rows.clamp(1, g.rollout_rows.max(1));
    probe.seq = g.prompt_tokens;
    probe.labelled = 0;
    probe.checkpointing = Checkpointing::None;
    probe.kept_decoder_layers = 0;
    probe.grpo = None;
    let acts = super::activations::count(&probe);
    let prompt_cache = probe.batch as u64 * g.prompt_tokens as u64 * cache_per_token;
    let prefill = prompt_cache + acts.text_stem + acts.decoder_layer_forward;
    let patches = probe.patches() as u64;
    let v = &p.model.vision;
    // The pixel values' compute-dtype copy (none in f32), the residual stream, one block.
    let cast = if s == F32 { 0 } else { s };
    let vision = if patches > 0 {
        patches * v.patch_dim() as u64 * cast
            + patches * v.hidden_size as u64 * s
            + acts.vision_block_max
    } else {
        0
    };

    // The prompts' pixel values (f32) live through the whole call.
    let pixels = patches * v.patch_dim() as u64 * F32;
    let peak = decode.max(prefill).max(vision);
    let (moment, when) = if peak == decode {
        (0, "none: the last decoding step is the peak")
    } else if peak == prefill {
        (
            prefill - decode,
            "the prefill: prompt cache, stem, one layer",
        )
    } else {
        (vision - decode, "the vision tower: pixels, one block")
    };
    vec![
        Row {
            category: "generation KV cache".into(),
            bytes: cache + compaction,
            note: format!(
                "{rows} rows × {len} tokens × {layers} layers, +1 layer while rows leave"
            ),
        },
        Row {
            category: "generation logits".into(),
            bytes: logits,
            note: format!("{rows} rows × {} vocab, the last step", t.vocab_size),
        },
        Row {
            category: "prompt pixel values".into(),
            bytes: pixels,
            note: format!("{patches} patches (f32), through the whole call"),
        },
        Row {
            category: "generation peak beyond these".into(),
            bytes: moment,
            note: when.into(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::prefill_rows;

    #[test]
    fn a_group_shares_one_prefill() {
        // 128 rows of groups of 8: 16 prompts; groups of 1: every row its own.
        assert_eq!(prefill_rows(128, 8), 16);
        assert_eq!(prefill_rows(16, 1), 16);
        // 12 rows cut from groups of 8: a call can start 7 rows into a group and end 3 rows
        // into the third (7 + 12 = 19 rows of 3 groups).
        assert_eq!(prefill_rows(12, 8), 3);
        // Fewer rows than a group: at most two groups, never more prompts than rows.
        assert_eq!(prefill_rows(5, 8), 2);
        assert_eq!(prefill_rows(1, 8), 1);
    }
}
