//! `omr plan`: peak training memory predicted from the model's dims and the run's shapes, before
//! anything is allocated, and a verdict against the device's memory.
//!
//! The model is the training step as `sft::run` runs it: forward with the loss (everything the
//! graph keeps, [`activations`]), backward (parameter gradients, the gradients candle leaves in
//! its `GradStore` for untracked inputs, and the in-flight ones), then the AdamW step (its
//! per-tensor temporaries). The peak is the larger of the two phases: activations are gone
//! before the optimizer runs. Checked against a counting allocator and peak RSS on the CPU
//! (`tests/plan_memory.rs`: within 10%, on the low side); not yet against a GPU.
//!
//! Notable choices:
//! - **Precision policy** (one place): compute copies of every weight in the compute dtype;
//!   trainable parameters also keep an f32 master unless the compute dtype is f32 (then the
//!   compute copy *is* the master, as on the CPU today); AdamW moments are f32; gradients come
//!   out of backward in the compute dtype (on the compute copies) and are summed in f32 by
//!   `optim::GradAccum` only with several micro-batches (one is stepped on as it is).
//! - **The optimizer** with the fused kernels (a GPU) updates masters, moments and compute
//!   copies in place (`omr_kernels::adamw_step_in_place`): no temporaries; with candle ops
//!   each tensor's update has its temporaries.
//! - **Worst case of the data**: every row is `T` tokens long, and the larger of two plans
//!   counts ([`worst_case`]): image-heavy rows (images at `max_pixels`, one per sample: 1 per
//!   row when padding, `ceil(T / process.max_length)` when packing, every text token after
//!   them labelled) and text-only rows (every token labelled, the lm head's worst case).
//! - **Attention** is counted as the code runs it: `eager` (today's candle ops keep ~6 score
//!   tensors of (B, H, T, T)) or `fused` (the flash-style kernels of the CUDA issue).
//! - **Activation checkpointing** (`[train] activation_checkpointing`): a recomputed stack keeps
//!   each block's input plus one block's activations at a time (`omr_model::recompute`).
//! - **Data parallel** (`world` > 1): between backward and the step, the gradients are summed
//!   over the ranks (`dist::Group::sum_grads`), in buckets concatenated on the device in the
//!   gradients' dtype for one copy to the host each; the sums come back as f32 tensors, so
//!   the step holds f32 gradients even with one micro-batch ([`exchange_bytes`]).
//! - The CUDA context and cuBLAS workspace are outside the model: `headroom` (default 1 GiB)
//!   is subtracted from the device's memory.

pub mod activations;
mod exchange;
mod grpo;
mod input;
mod params;
mod report;
#[cfg(test)]
mod run_tests;
#[cfg(test)]
mod tests;
mod units;

use omr_model::config::ModelConfig;
use omr_model::lora::LoraConfig;
use serde::{Deserialize, Serialize};

pub use activations::Activations;
pub use exchange::{exchange_bucket, exchange_bytes};
pub use grpo::{input_from_grpo, prefill_rows, rollout_growth, rollout_input, GrpoShape};
pub use input::{
    auto_kept_decoder_layers, check_run_memory, configs_dir, input_from_sft, out_of_memory_error,
    run_kept_decoder_layers, shipped_config, PlanOptions,
};
use params::lora_modules;
pub use params::{count_params, ParamCounts};
pub use report::{most_kept_decoder_layers, parse_bytes, peak_phase, refusal, render, suggestions};

/// Bytes of an f32.
pub const F32: u64 = 4;
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
/// max_pixels of Qwen2-VL / Qwen2.5-VL's `preprocessor_config.json` on the Hub (16384·28²).
pub const QWEN_DEFAULT_MAX_PIXELS: u64 = 12_845_056;
/// Tensors of a part's largest size alive at once in its backward (see `plan`).
const IN_FLIGHT: u64 = 6;

/// Which stacks recompute their blocks in backward instead of keeping their activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    #[default]
    None,
    Decoder,
    Vision,
    All,
}

impl Checkpointing {
    pub fn decoder(self) -> bool {
        matches!(self, Checkpointing::Decoder | Checkpointing::All)
    }
    pub fn vision(self) -> bool {
        matches!(self, Checkpointing::Vision | Checkpointing::All)
    }
    /// What the model recomputes (`Qwen2VL::forward_backward`), keeping the attentions
    /// (`Recompute::with_attention` to recompute those too).
    pub fn recompute(self) -> omr_model::Recompute {
        omr_model::Recompute {
            vision: self.vision(),
            decoder: self.decoder(),
            attention: false,
            decoder_kept: 0,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Checkpointing::None => "none",
            Checkpointing::Decoder => "decoder",
            Checkpointing::Vision => "vision",
            Checkpointing::All => "all",
        }
    }
}

/// `[train] kept_decoder_layers`: how many of the last decoder layers keep their activations
/// under decoder checkpointing: a number, or `"auto"`: as many as the plan finds room for on the
/// run's device ([`most_kept_decoder_layers`]), chosen at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "KeptRepr", into = "KeptRepr")]
pub enum KeptLayers {
    Count(usize),
    Auto,
}

impl Default for KeptLayers {
    fn default() -> Self {
        KeptLayers::Count(0)
    }
}

/// How [`KeptLayers`] is written in TOML: an integer or "auto".
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum KeptRepr {
    Count(u64),
    Word(String),
}

impl TryFrom<KeptRepr> for KeptLayers {
    type Error = String;
    fn try_from(r: KeptRepr) -> std::result::Result<Self, String> {
        match r {
            KeptRepr::Count(n) => Ok(KeptLayers::Count(n as usize)),
            KeptRepr::Word(w) if w == "auto" => Ok(KeptLayers::Auto),
            KeptRepr::Word(w) => Err(format!("a number of decoder layers or \"auto\", not `{w}`")),
        }
    }
}

impl From<KeptLayers> for KeptRepr {
    fn from(k: KeptLayers) -> KeptRepr {
        match k {
            KeptLayers::Count(n) => KeptRepr::Count(n as u64),
            KeptLayers::Auto => KeptRepr::Word("auto".into()),
        }
    }
}

impl KeptLayers {
    /// The count as planned ahead of a run: "auto" plans as 0 (then `omr plan` prints what it
    /// would choose).
    pub fn planned(self) -> usize {
        match self {
            KeptLayers::Count(n) => n,
            KeptLayers::Auto => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Plain candle ops (`omr_model::attention`): scores are materialised.
    Eager,
    /// The fused kernels (`Kernels::Fused`): attention keeps output and log-sum-exp only,
    /// and the loss is the fused linear cross-entropy (no N × V logits).
    Fused,
}

/// Which parts train (full fine-tuning of that part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trainable {
    pub vision: bool,
    pub merger: bool,
    pub language: bool,
}

/// Everything the memory model needs.
#[derive(Clone, Debug)]
pub struct PlanInput {
    pub model: ModelConfig,
    /// B: rows per micro-batch.
    pub batch: usize,
    /// T: tokens per row.
    pub seq: usize,
    /// Images per row, each `image_hw` patches.
    pub images_per_row: usize,
    /// (h, w) in patches of one image (multiples of the merge size).
    pub image_hw: (usize, usize),
    /// Labelled tokens of the whole micro-batch (rows the lm head runs on).
    pub labelled: usize,
    pub trainable: Trainable,
    pub lora: Option<LoraConfig>,
    /// Bytes per element of the compute dtype (2 for bf16, 4 for f32).
    pub compute_bytes: u64,
    pub attention: AttentionImpl,
    pub checkpointing: Checkpointing,
    /// Checkpointed blocks recompute their attentions too (else the fused path keeps each
    /// attention's output and log-sum-exp).
    pub recompute_attention: bool,
    /// With decoder checkpointing: the last N decoder layers keep their activations.
    pub kept_decoder_layers: usize,
    pub grad_accum: u64,
    /// Processes of a data-parallel job (`WORLD_SIZE`); above 1 the gradients are summed over
    /// them before each step.
    pub world: usize,
    /// A GRPO run's policy update (None: SFT): completion tokens scored by GRPO's token
    /// log-probabilities, the frozen reference, the rollout phase (`plan/grpo.rs`).
    pub grpo: Option<GrpoShape>,
}

impl PlanInput {
    /// Vision patches of the micro-batch (before the 2×2 merge).
    pub fn patches(&self) -> usize {
        self.batch * self.images_per_row * self.image_hw.0 * self.image_hw.1
    }
    /// Image tokens per row (after the merge).
    pub fn image_tokens_per_row(&self) -> usize {
        self.images_per_row * self.image_hw.0 * self.image_hw.1 / self.model.vision.merge_unit()
    }
    pub fn labelled_rows(&self) -> usize {
        self.labelled
    }
    /// Whether the vision blocks keep a graph: they train, or adapters in them do.
    pub fn tracks_vision_blocks(&self) -> bool {
        self.trainable.vision || self.lora_in("visual.blocks.")
    }
    /// Whether the merger keeps a graph: it or anything before it trains.
    pub fn tracks_merger(&self) -> bool {
        self.tracks_vision_blocks() || self.trainable.merger || self.lora_in("visual.merger.")
    }
    fn lora_in(&self, prefix: &str) -> bool {
        self.lora
            .as_ref()
            .is_some_and(|l| lora_modules(&self.model, l).any(|(n, _)| n.starts_with(prefix)))
    }
    /// Patch counts of the windows of a windowed vision block, one entry per window of the
    /// whole batch (transformers' `get_window_index` over a grid of `image_hw`).
    pub fn vision_windows(&self) -> Vec<u64> {
        let v = &self.model.vision;
        let Some(window) = v.window_size else {
            return self.full_attention_lens();
        };
        let merge = v.spatial_merge_size;
        let ws = window / merge / v.patch_size;
        let (gh, gw) = (self.image_hw.0 / merge, self.image_hw.1 / merge);
        let mut one = Vec::new();
        for wh in 0..gh.div_ceil(ws) {
            for ww in 0..gw.div_ceil(ws) {
                let rows = ws.min(gh - wh * ws);
                let cols = ws.min(gw - ww * ws);
                one.push((rows * cols * v.merge_unit()) as u64);
            }
        }
        let images = self.batch * self.images_per_row;
        (0..images).flat_map(|_| one.iter().copied()).collect()
    }
    /// One range per image for full-attention blocks.
    pub fn full_attention_lens(&self) -> Vec<u64> {
        let per = (self.image_hw.0 * self.image_hw.1) as u64;
        vec![per; self.batch * self.images_per_row]
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub category: String,
    pub bytes: u64,
    pub note: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The forward/backward phase, by category.
    pub train_rows: Vec<Row>,
    pub train_peak: u64,
    /// The optimizer phase (activations freed), by category.
    pub optim_rows: Vec<Row>,
    pub optim_peak: u64,
    /// The gradient exchange of a data-parallel job (between backward and the step), by
    /// category; empty for one process.
    pub exchange_rows: Vec<Row>,
    pub exchange_peak: u64,
    /// GRPO's rollout phase (generation; no activations, no gradients), by category; empty
    /// for SFT.
    pub rollout_rows: Vec<Row>,
    pub rollout_peak: u64,
    pub peak: u64,
    /// What a step adds to memory that holds weights and optimizer state: the peak minus the
    /// state that exists before the first step (weights, masters, moments).
    pub step_growth: u64,
    /// That resident state (weights, masters, moments, a GRPO reference).
    pub state_bytes: u64,
    #[serde(skip)]
    pub params: ParamCounts,
    #[serde(skip)]
    pub activations: Activations,
}

pub fn plan(p: &PlanInput) -> Plan {
    let s = p.compute_bytes;
    let pc = count_params(p);
    let acts = activations::count(p);
    let train_n = pc.trainable + pc.lora;

    let weights = pc.total * s + pc.lora * s;
    let masters = if s == F32 { 0 } else { train_n * F32 };
    let moments = train_n * 2 * F32;
    // The gradients backward returns (compute dtype); GradAccum sums them in f32 only when
    // there are several micro-batches (one micro-batch's are stepped on as they are).
    let grads_store = train_n * s;
    let grads_sum = if p.grad_accum == 1 { 0 } else { train_n * F32 };
    // Backward, in its order (loss first): gradients candle leaves for untracked inputs pile up
    // in the GradStore, and at each part the gradients of its largest tensor are in flight:
    // the incoming one, the zeros + sum of `GradStore::or_insert`, and the products of the
    // Div/Mul rules (g/rhs, g·lhs, rhs², their quotient): six of that size at the softmax.
    // A recomputed block (and the head, when the decoder is recomputed) exists only while the
    // backward is at it, and is back-propagated on its own (`omr_model::recompute`): its
    // activations are counted there, and its store, with the gradients it leaked, is dropped
    // after it instead of piling up.
    let alone = |name: &str| match name {
        "vision block" => p.checkpointing.vision(),
        "decoder layer" | "lm head + loss" => p.checkpointing.decoder(),
        _ => false,
    };
    // The fused path's ops have no Div/Mul chains: the incoming gradient, the zeros and the sum.
    let in_flight = match p.attention {
        AttentionImpl::Eager => IN_FLIGHT,
        AttentionImpl::Fused => 3,
    };
    let (mut piled, mut bwd_extra, mut leak_at_peak, mut block_at_peak) = (0u64, 0u64, 0u64, 0u64);
    for st in &acts.stages {
        let leak = piled + st.leak;
        // The leaf copy of its input, the incoming gradient and the `out · g` product.
        let block = if alone(st.name) {
            st.bytes + 3 * st.input
        } else {
            0
        };
        if block == 0 {
            piled += st.leak;
        }
        let here = block + leak + in_flight * st.largest;
        if here > bwd_extra {
            bwd_extra = here;
            leak_at_peak = leak;
            block_at_peak = block;
        }
    }
    let bwd_transient = bwd_extra - leak_at_peak - block_at_peak;
    let logits_loss = if p.checkpointing.decoder() {
        0
    } else {
        acts.logits_loss
    };
    // AdamW on one tensor at a time: with candle ops, scaled gradient, new m, new v, decayed
    // p, denominator, quotient, step, result (optim.rs), all f32 of the largest trainable
    // tensor; the fused kernels' update writes in place.
    let opt_transient = match p.attention {
        AttentionImpl::Eager => 8 * pc.largest_trainable * F32,
        AttentionImpl::Fused => 0,
    };
    // What the optimizer step holds: the f32 sums when there are any (several micro-batches,
    // or sums over the ranks), else backward's own.
    let data_parallel = p.world > 1;
    let opt_grads = if grads_sum > 0 || data_parallel {
        train_n * F32
    } else {
        grads_store
    };

    let row = |category: &str, bytes: u64, note: String| Row {
        category: category.into(),
        bytes,
        note,
    };
    let dtype = if s == F32 { "f32" } else { "bf16" };
    let ckpt = |on: bool| if on { ", checkpointed" } else { "" };
    let state = vec![
        row(
            "weights",
            weights,
            format!(
                "{:.3} B params{} in {dtype}",
                pc.total as f64 / 1e9,
                if pc.lora > 0 {
                    format!(" + {:.1} M LoRA", pc.lora as f64 / 1e6)
                } else {
                    String::new()
                }
            ),
        ),
        row(
            "master weights (f32)",
            masters,
            format!("{:.3} B trainable", train_n as f64 / 1e9),
        ),
        row(
            "AdamW moments (f32)",
            moments,
            "exp_avg + exp_avg_sq".into(),
        ),
    ];
    let mut state = state;
    let reference = grpo::reference_bytes(p, pc.total, pc.lora);
    if reference > 0 {
        state.push(row(
            "reference model",
            reference,
            format!("frozen copy in {dtype} (objective.beta > 0)"),
        ));
    }
    let mut train_rows = state.clone();
    train_rows.extend([
        row(
            "gradients",
            grads_store + grads_sum,
            format!(
                "{dtype} from backward{}",
                if grads_sum > 0 { " + f32 sums" } else { "" }
            ),
        ),
        row(
            "activations: vision blocks",
            acts.vision_stem + acts.vision_blocks,
            format!(
                "{} patches, {} blocks × {:.1} MiB{}",
                p.patches(),
                p.model.vision.depth,
                acts.vision_block as f64 / 1048576.0,
                ckpt(p.checkpointing.vision())
            ),
        ),
        row("activations: merger", acts.merger, String::new()),
        row(
            "activations: decoder layers",
            acts.text_stem + acts.decoder_layers,
            format!(
                "{} × {:.1} MiB{}",
                p.model.text.num_hidden_layers,
                acts.decoder_layer as f64 / 1048576.0,
                ckpt(p.checkpointing.decoder())
            ),
        ),
        row(
            "logits + loss",
            logits_loss,
            format!(
                "{} labelled rows × {} vocab",
                p.labelled, p.model.text.vocab_size
            ),
        ),
        row(
            "recomputed block",
            block_at_peak,
            "the block the backward is at (checkpointing)".into(),
        ),
        row(
            "backward: untracked grads",
            leak_at_peak,
            "mask, softmax max, rotary tables, frozen norms".into(),
        ),
        row(
            "backward in-flight",
            bwd_transient,
            format!("{in_flight} × largest tensor of the peak's part"),
        ),
    ]);
    let mut optim_rows = state.clone();
    optim_rows.extend([
        row(
            "gradients",
            opt_grads,
            if data_parallel {
                format!("f32 sums over the {} ranks", p.world)
            } else if p.grad_accum == 1 {
                format!("{dtype}, as backward made them")
            } else {
                "f32 sums".into()
            },
        ),
        row(
            "AdamW temporaries",
            opt_transient,
            match p.attention {
                AttentionImpl::Eager => "8 × largest trainable tensor (f32)".into(),
                AttentionImpl::Fused => "none: the fused update writes in place".into(),
            },
        ),
    ]);
    let exchange_rows = if data_parallel {
        let mut rows = state.clone();
        rows.extend(exchange::rows(
            p,
            train_n,
            pc.largest_trainable,
            grads_sum > 0,
        ));
        rows
    } else {
        Vec::new()
    };
    let rollout_rows = match &p.grpo {
        Some(g) => {
            let mut rows = state.clone();
            rows.extend(grpo::rollout_rows(p, g));
            rows
        }
        None => Vec::new(),
    };
    let sum = |rows: &[Row]| rows.iter().map(|r| r.bytes).sum::<u64>();
    let (train_peak, optim_peak) = (sum(&train_rows), sum(&optim_rows));
    let rollout_peak = sum(&rollout_rows);
    let exchange_peak = sum(&exchange_rows);
    let peak = train_peak
        .max(optim_peak)
        .max(rollout_peak)
        .max(exchange_peak);
    Plan {
        step_growth: peak - sum(&state),
        state_bytes: sum(&state),
        train_rows,
        train_peak,
        optim_rows,
        optim_peak,
        exchange_rows,
        exchange_peak,
        rollout_rows,
        rollout_peak,
        peak,
        params: pc,
        activations: acts,
    }
}

/// The same rows without images, every token after the first labelled (GRPO: every completion
/// token, as in the image-heavy rows): the lm head's and the decoder's worst case, where the
/// image-heavy rows are the vision tower's.
pub fn text_only(p: &PlanInput) -> PlanInput {
    let mut q = p.clone();
    q.images_per_row = 0;
    if q.grpo.is_none() {
        q.labelled = q.batch * q.seq.saturating_sub(1);
    }
    q
}

/// The larger of the image-heavy and the text-only plan, with which one it is.
pub fn worst_case(p: &PlanInput) -> (PlanInput, Plan, &'static str) {
    let (a, t) = (plan(p), text_only(p));
    let b = plan(&t);
    if b.peak > a.peak {
        (t, b, "text-only rows (every token labelled)")
    } else {
        (p.clone(), a, "image-heavy rows")
    }
}
