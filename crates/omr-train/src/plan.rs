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
//! - The CUDA context and cuBLAS workspace are outside the model: `headroom` (default 1 GiB)
//!   is subtracted from the device's memory.

pub mod activations;
#[cfg(test)]
mod tests;

use crate::config::{ModelInit, SftConfig};
use omr_data::collate::CollateMode;
use omr_model::config::ModelConfig;
use omr_model::lora::{self, LoraConfig};
use omr_model::params::{param_shapes, Part};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use activations::Activations;

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
    /// What the model recomputes (`Qwen2VL::forward_backward`).
    pub fn recompute(self) -> omr_model::Recompute {
        omr_model::Recompute {
            vision: self.vision(),
            decoder: self.decoder(),
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
    pub grad_accum: u64,
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

/// (module, (out, in)) of every linear layer that `lora` adapts.
fn lora_modules<'a>(
    cfg: &ModelConfig,
    l: &'a LoraConfig,
) -> impl Iterator<Item = (String, (usize, usize))> + 'a {
    lora::linear_modules(cfg)
        .into_iter()
        .filter(move |(n, _)| lora::selects(&l.targets, n))
}

/// Parameter counts by role.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamCounts {
    pub total: u64,
    /// Base parameters that train (full fine-tuning of their part).
    pub trainable: u64,
    /// LoRA A and B (all trainable).
    pub lora: u64,
    /// Largest trainable tensor (the AdamW step's temporaries scale with it).
    pub largest_trainable: u64,
    pub vision: u64,
    pub merger: u64,
    pub language: u64,
}

pub fn count_params(p: &PlanInput) -> ParamCounts {
    let mut c = ParamCounts::default();
    for (name, shape) in param_shapes(&p.model) {
        let n: u64 = shape.iter().map(|&x| x as u64).product();
        c.total += n;
        let part = Part::of(&name);
        match part {
            Part::Vision => c.vision += n,
            Part::Merger => c.merger += n,
            Part::Language => c.language += n,
        }
        let trains = p.lora.is_none()
            && match part {
                Part::Vision => p.trainable.vision,
                Part::Merger => p.trainable.merger,
                Part::Language => p.trainable.language,
            };
        if trains {
            c.trainable += n;
            c.largest_trainable = c.largest_trainable.max(n);
        }
    }
    if let Some(l) = &p.lora {
        for (_, (out, inp)) in lora_modules(&p.model, l) {
            let (a, b) = ((l.r * inp) as u64, (out * l.r) as u64);
            c.lora += a + b;
            c.largest_trainable = c.largest_trainable.max(a.max(b));
        }
    }
    c
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
    pub peak: u64,
    /// What a step adds to memory that holds weights and optimizer state: the peak minus the
    /// state that exists before the first step (weights, masters, moments).
    pub step_growth: u64,
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
    let opt_grads = if p.grad_accum == 1 {
        grads_store
    } else {
        train_n * F32
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
            if p.grad_accum == 1 {
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
    let sum = |rows: &[Row]| rows.iter().map(|r| r.bytes).sum::<u64>();
    let (train_peak, optim_peak) = (sum(&train_rows), sum(&optim_rows));
    let peak = train_peak.max(optim_peak);
    Plan {
        step_growth: peak - sum(&state),
        train_rows,
        train_peak,
        optim_rows,
        optim_peak,
        peak,
        params: pc,
        activations: acts,
    }
}

/// The same rows without images, every token after the first labelled: the lm head's and the
/// decoder's worst case, where the image-heavy rows are the vision tower's.
pub fn text_only(p: &PlanInput) -> PlanInput {
    let mut q = p.clone();
    q.images_per_row = 0;
    q.labelled = q.batch * q.seq.saturating_sub(1);
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

/// What the user asks of `omr plan` besides the run config.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// config.json to use instead of the one `model.path` points to.
    pub model_config: Option<PathBuf>,
    pub compute_bytes: u64,
    pub attention: AttentionImpl,
    /// Overrides the processor's max_pixels.
    pub max_pixels: Option<u64>,
    /// Overrides the images per row the batching mode implies.
    pub images_per_row: Option<usize>,
}

/// The plan input of an SFT config, and notes on where each number came from.
pub fn input_from_sft(
    cfg: &SftConfig,
    o: &PlanOptions,
) -> Result<(PlanInput, Vec<String>), String> {
    let mut notes = Vec::new();
    let model = model_config(cfg, o.model_config.as_deref(), &mut notes)?;
    let b = &cfg.data.batch;
    let process_len = cfg.data.process.max_length;
    let (seq, per_row) = match b.mode {
        CollateMode::Pack => (b.max_length, b.max_length.div_ceil(process_len.max(1))),
        CollateMode::Pad => (
            process_len.div_ceil(b.pad_to_multiple.max(1)) * b.pad_to_multiple.max(1),
            1,
        ),
    };
    let images_per_row = o.images_per_row.unwrap_or(per_row);
    let max_pixels = match o.max_pixels {
        Some(m) => {
            notes.push(format!("max_pixels {m} (--max-pixels)"));
            m
        }
        None => processor_max_pixels(Path::new(cfg.processor_ref()), &mut notes),
    };
    let v = &model.vision;
    let unit_px = (v.patch_size * v.spatial_merge_size) as u64;
    // Image tokens of one image: smart_resize keeps h·w ≤ max_pixels in units of 28×28 px; a
    // sample never has more tokens than process.max_length (longer ones are rejected).
    let tokens = ((max_pixels / (unit_px * unit_px)) as usize).min(process_len.saturating_sub(2));
    let gh = (tokens as f64).sqrt().floor().max(1.0) as usize;
    let gw = (tokens / gh).max(1);
    let merge = v.spatial_merge_size;
    let mut input = PlanInput {
        model,
        batch: b.batch_size,
        seq,
        images_per_row,
        image_hw: (gh * merge, gw * merge),
        labelled: 0,
        // LoRA freezes the whole base (`lora::apply`).
        trainable: Trainable {
            vision: !cfg.model.freeze_vision && cfg.model.lora.is_none(),
            merger: !cfg.model.freeze_merger && cfg.model.lora.is_none(),
            language: !cfg.model.freeze_language && cfg.model.lora.is_none(),
        },
        lora: cfg.model.lora.clone(),
        compute_bytes: o.compute_bytes,
        attention: o.attention,
        checkpointing: cfg.train.activation_checkpointing,
        grad_accum: cfg.train.grad_accum,
    };
    // Image tokens (and their start/end markers) never fit in more than a row.
    while input.images_per_row > 0 && input.image_tokens_per_row() + 2 * input.images_per_row > seq
    {
        input.images_per_row -= 1;
    }
    let text = seq - input.image_tokens_per_row() - 2 * input.images_per_row;
    input.labelled = input.batch * text.saturating_sub(1);
    notes.push(format!(
        "image-heavy rows: {} tokens, {} image(s) of {}×{} patches ({} image tokens), {} labelled tokens",
        seq,
        input.images_per_row,
        input.image_hw.0,
        input.image_hw.1,
        input.image_tokens_per_row(),
        text.saturating_sub(1)
    ));
    Ok((input, notes))
}

/// The model's config.json: `--model-config`, the tiny spec, a local folder, a fixture under
/// configs/models/ for the Hub ids we ship, or the Hugging Face cache.
fn model_config(
    cfg: &SftConfig,
    explicit: Option<&Path>,
    notes: &mut Vec<String>,
) -> Result<ModelConfig, String> {
    let read = |p: &Path, notes: &mut Vec<String>| {
        notes.push(format!("model dims from {}", p.display()));
        ModelConfig::from_file(p).map_err(|e| e.to_string())
    };
    if let Some(p) = explicit {
        return read(p, notes);
    }
    let m = &cfg.model;
    if m.init == ModelInit::Tiny {
        let proc = Path::new(&m.processor);
        let ids = omr_model::tiny::TokenIds::from_tokenizer_dir(proc).map_err(|e| {
            format!("model.init = \"tiny\" takes its vocabulary from model.processor: {e} (make it with `omr data synth`, or pass --model-config)")
        })?;
        notes.push(format!(
            "model dims from [model.tiny] and the tokenizer in {}",
            proc.display()
        ));
        return ModelConfig::from_value(m.tiny.config_json(&ids), Path::new("<tiny spec>"))
            .map_err(|e| e.to_string());
    }
    let local = Path::new(&m.path).join("config.json");
    if local.is_file() {
        return read(&local, notes);
    }
    if let Some(f) = shipped_config(&m.path) {
        return read(&f, notes);
    }
    // Only config.json from the Hub (or its cache), never the weights.
    use omr_data::source::hub_repo::{HubEnv, HubRepo, RepoType};
    let env = HubEnv::from_process();
    if let Ok(p) =
        HubRepo::open(&m.path, RepoType::Model, None, &env).and_then(|r| r.fetch("config.json"))
    {
        return read(&p, notes);
    }
    Err(format!(
        "no config.json for model.path = {:?}: not a folder, not a shipped fixture under configs/models/, \
         not in the Hugging Face cache; pass --model-config FILE",
        m.path
    ))
}

/// configs/models/<name>.json for the Hub ids whose config.json is shipped with the repository.
pub fn shipped_config(hub_id: &str) -> Option<PathBuf> {
    let name = match hub_id {
        "Qwen/Qwen2.5-VL-3B-Instruct" | "Qwen/Qwen2.5-VL-3B" => "qwen2.5-vl-3b.json",
        "Qwen/Qwen2.5-VL-7B-Instruct" | "Qwen/Qwen2.5-VL-7B" => "qwen2.5-vl-7b.json",
        _ => return None,
    };
    let p = configs_dir().join("models").join(name);
    p.is_file().then_some(p)
}

/// The repository's configs/ (beside the binary's crate at build time; the current directory's
/// `configs/` when run elsewhere).
pub fn configs_dir() -> PathBuf {
    let here = PathBuf::from("configs");
    if here.join("models").is_dir() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

/// max_pixels of the processor folder's preprocessor_config.json, else the Qwen default.
fn processor_max_pixels(dir: &Path, notes: &mut Vec<String>) -> u64 {
    let path = dir.join("preprocessor_config.json");
    let found = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v.get("max_pixels")
                .and_then(|x| x.as_u64())
                .or_else(|| v.get("size")?.get("longest_edge")?.as_u64())
        });
    match found {
        Some(m) => {
            notes.push(format!("max_pixels {m} from {}", path.display()));
            m
        }
        None => {
            notes.push(format!(
                "max_pixels {QWEN_DEFAULT_MAX_PIXELS} (the Qwen2.5-VL processor default; {} not readable; --max-pixels overrides)",
                path.display()
            ));
            QWEN_DEFAULT_MAX_PIXELS
        }
    }
}

/// The plan as a table: both phases by category, the peak and the verdict.
pub fn render(p: &PlanInput, plan: &Plan, device_bytes: u64, headroom: u64) -> String {
    let gib = |b: u64| b as f64 / GIB;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "B {} × T {} tokens, {} patches, {}, attention {}, checkpointing {}, grad_accum {}",
        p.batch,
        p.seq,
        p.patches(),
        if p.compute_bytes == F32 {
            "f32 compute"
        } else {
            "bf16 compute, f32 masters"
        },
        match p.attention {
            AttentionImpl::Eager => "eager",
            AttentionImpl::Fused => "fused",
        },
        p.checkpointing.name(),
        p.grad_accum
    );
    for (title, rows, total) in [
        ("forward + backward", &plan.train_rows, plan.train_peak),
        ("optimizer step", &plan.optim_rows, plan.optim_peak),
    ] {
        let _ = writeln!(out, "\n| {title:<30} | {:>10} | {:<48} |", "GiB", "");
        let _ = writeln!(out, "|{:-<32}|{:->12}|{:-<50}|", "", "", "");
        for r in rows.iter() {
            let _ = writeln!(
                out,
                "| {:<30} | {:>10.3} | {:<48} |",
                r.category,
                gib(r.bytes),
                r.note
            );
        }
        let _ = writeln!(
            out,
            "| {:<30} | {:>10.3} | {:<48} |",
            "total",
            gib(total),
            ""
        );
    }
    let usable = device_bytes.saturating_sub(headroom);
    let _ = writeln!(
        out,
        "\npeak {:.2} GiB ({}) vs device {:.2} GiB − {:.2} GiB headroom = {:.2} GiB usable: {}",
        gib(plan.peak),
        if plan.train_peak >= plan.optim_peak {
            "forward + backward"
        } else {
            "optimizer step"
        },
        gib(device_bytes),
        gib(headroom),
        gib(usable),
        if plan.peak <= usable {
            "fits"
        } else {
            "does NOT fit"
        }
    );
    out
}

/// What to change when a plan does not fit, smallest resulting peak first, each alone, and the
/// three changes that need no smaller batch together. `p` is the image-heavy input; every
/// variant is planned at its worst case.
pub fn suggestions(p: &PlanInput, plan: &Plan, usable: u64) -> Vec<String> {
    let mut out: Vec<(u64, String)> = Vec::new();
    let try_with = |f: &dyn Fn(&mut PlanInput)| {
        let mut q = p.clone();
        f(&mut q);
        worst_case(&q).1.peak
    };
    let push = |out: &mut Vec<(u64, String)>, peak: u64, what: String| {
        if peak < plan.peak {
            let fits = if peak <= usable {
                "fits"
            } else {
                "still too large"
            };
            out.push((
                peak,
                format!("{what}: {:.2} GiB ({fits})", peak as f64 / GIB),
            ));
        }
    };
    if p.attention == AttentionImpl::Eager {
        push(
            &mut out,
            try_with(&|q| q.attention = AttentionImpl::Fused),
            "fused attention (the CUDA kernels)".into(),
        );
    }
    if p.checkpointing != Checkpointing::All {
        push(
            &mut out,
            try_with(&|q| q.checkpointing = Checkpointing::All),
            "train.activation_checkpointing = \"all\"".into(),
        );
    }
    if p.batch > 1 {
        let half = p.batch / 2;
        push(
            &mut out,
            try_with(&|q| {
                q.labelled = q.labelled / q.batch * half;
                q.batch = half;
            }),
            format!("data.batch.batch_size = {half} (and double train.grad_accum)"),
        );
    }
    if p.seq >= 256 {
        let half = p.seq / 2;
        push(
&mut out,
            try_with(&|q| {
                q.labelled = q.labelled * half / q.seq;
                q.seq = half;
                while q.images_per_row > 0 && q.image_tokens_per_row() + 2 * q.images_per_row > half {
                    q.images_per_row -= 1;
                }
            }),
            format!("max_length {half} (data.batch.max_length when packing, data.process.max_length when padding)"),
        );
    }
    if p.lora.is_none() {
        push(
            &mut out,
            try_with(&|q| {
                q.trainable = Trainable {
                    vision: false,
                    merger: false,
                    language: false,
                };
                q.lora = Some(LoraConfig {
                    r: 16,
                    alpha: 32.0,
                    dropout: 0.0,
                    targets: vec!["all-linear".into()],
                })
            }),
            "LoRA r = 16 on all-linear ([model.lora])".into(),
        );
    }
    if out.iter().all(|(peak, _)| *peak > usable) {
        let lora = LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: vec!["all-linear".into()],
        };
        push(
            &mut out,
            try_with(&|q| {
                q.attention = AttentionImpl::Fused;
                q.checkpointing = Checkpointing::All;
                q.trainable = Trainable {
                    vision: false,
                    merger: false,
                    language: false,
                };
                q.lora = Some(lora.clone());
            }),
            "fused attention + checkpointing \"all\" + LoRA r = 16 together".into(),
        );
    }
    out.sort_by_key(|(peak, _)| *peak);
    out.into_iter().map(|(_, s)| s).collect()
}
