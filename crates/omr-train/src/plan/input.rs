//! The plan's input from an SFT config: the model's config.json (local, shipped for the Hub
//! ids, or the Hub's), the processor's max_pixels, the batching mode's rows and images.

use super::{AttentionImpl, PlanInput, Trainable, QWEN_DEFAULT_MAX_PIXELS};
use crate::config::{ModelInit, ModelSection, SftConfig};
use omr_data::collate::CollateMode;
use omr_model::config::ModelConfig;
use std::path::{Path, PathBuf};

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
    /// Processes of a data-parallel job (1: one process).
    pub world: usize,
}

impl PlanOptions {
    /// These options for a job of `world` data-parallel processes.
    pub fn with_world(&self, world: usize) -> PlanOptions {
        PlanOptions {
            world,
            ..self.clone()
        }
    }
}

/// The plan input of an SFT config, and notes on where each number came from.
pub fn input_from_sft(
    cfg: &SftConfig,
    o: &PlanOptions,
) -> Result<(PlanInput, Vec<String>), String> {
    let mut notes = Vec::new();
    let model = model_config(&cfg.model, o.model_config.as_deref(), &mut notes)?;
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
    let max_pixels = max_pixels(o, cfg.processor_ref(), &mut notes);
    // A sample never has more tokens than process.max_length (longer ones are rejected).
    let image_hw = image_hw(&model, max_pixels, process_len.saturating_sub(2));
    let mut input = PlanInput {
        model,
        batch: b.batch_size,
        seq,
        images_per_row,
        image_hw,
        labelled: 0,
        trainable: trainable(&cfg.model),
        lora: cfg.model.lora.clone(),
        compute_bytes: o.compute_bytes,
        attention: o.attention,
        checkpointing: cfg.train.activation_checkpointing,
        recompute_attention: cfg.train.recompute_attention,
        kept_decoder_layers: cfg.train.kept_decoder_layers.planned(),
        grad_accum: cfg.train.grad_accum,
        world: o.world,
        grpo: None,
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

/// The image area cap: `--max-pixels`, else the processor folder's.
pub(super) fn max_pixels(o: &PlanOptions, processor: &str, notes: &mut Vec<String>) -> u64 {
    match o.max_pixels {
        Some(m) => {
            notes.push(format!("max_pixels {m} (--max-pixels)"));
            m
        }
        None => processor_max_pixels(Path::new(processor), notes),
    }
}

/// (h, w) in patches of one image at `max_pixels`, at most `cap` image tokens: smart_resize
/// keeps h·w ≤ max_pixels in units of (patch · merge)² px; the grid is the squarest one.
pub(super) fn image_hw(model: &ModelConfig, max_pixels: u64, cap: usize) -> (usize, usize) {
    let v = &model.vision;
    let unit_px = (v.patch_size * v.spatial_merge_size) as u64;
    let tokens = ((max_pixels / (unit_px * unit_px)) as usize).min(cap);
    let gh = (tokens as f64).sqrt().floor().max(1.0) as usize;
    let gw = (tokens / gh).max(1);
    (gh * v.spatial_merge_size, gw * v.spatial_merge_size)
}

/// Which parts train: LoRA freezes the whole base (`lora::apply`).
pub(super) fn trainable(m: &ModelSection) -> Trainable {
    Trainable {
        vision: !m.freeze_vision && m.lora.is_none(),
        merger: !m.freeze_merger && m.lora.is_none(),
        language: !m.freeze_language && m.lora.is_none(),
    }
}

/// The model's config.json: `--model-config`, the tiny spec, a local folder, a fixture under
/// configs/models/ for the Hub ids we ship, or the Hugging Face cache.
pub(super) fn model_config(
    m: &ModelSection,
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
pub(super) fn processor_max_pixels(dir: &Path, notes: &mut Vec<String>) -> u64 {
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

/// `[train] kept_decoder_layers` of a run on `rt`'s device: the count given, or for "auto" the
/// most the plan finds room for ([`auto_kept_decoder_layers`] on the input `input` builds from
/// the run's compute dtype and kernels), logged with why. "auto" on a device whose memory is
/// unknown recomputes every checkpointed layer (and warns).
pub fn run_kept_decoder_layers(
    kept: super::KeptLayers,
    rt: &crate::runtime::Runtime,
    input: impl FnOnce(&PlanOptions) -> Result<(PlanInput, Vec<String>), String>,
) -> Result<usize, String> {
    let super::KeptLayers::Auto = kept else {
        return Ok(kept.planned());
    };
    let Some(bytes) = rt.device_memory() else {
        tracing::warn!(
            "kept_decoder_layers = \"auto\": the device's memory is unknown; every \
             checkpointed decoder layer is recomputed"
        );
        return Ok(0);
    };
    let (input, _) = input(&run_options(rt))?;
    let (n, why) = auto_kept_decoder_layers(&input, bytes);
    tracing::info!("{why}");
    Ok(n)
}

/// What a run may plan for on a device of `bytes`: all but 1 GiB, kept free for the CUDA
/// context, cuBLAS's workspace and the allocator (`omr plan`'s default headroom).
fn usable(bytes: u64) -> u64 {
    bytes.saturating_sub(super::GIB as u64)
}

/// What a run on `rt` plans with: its compute dtype and kernels, the config's own model and
/// processor.
fn run_options(rt: &crate::runtime::Runtime) -> PlanOptions {
    PlanOptions {
        model_config: None,
        compute_bytes: rt.compute.size_in_bytes() as u64,
        attention: match rt.kernels {
            omr_model::Kernels::Fused => AttentionImpl::Fused,
            omr_model::Kernels::Candle => AttentionImpl::Eager,
        },
        max_pixels: None,
        images_per_row: None,
        world: 1,
    }
}

/// `[runtime] memory_check` at a run's start-up, before its model is built: the plan's
/// worst-case peak ([`super::worst_case`] of the config as written; `kept_decoder_layers =
/// "auto"` counts none kept, the least it can choose) against the device's memory less 1 GiB
/// (as `omr plan`). When it does not fit: `Refuse` returns [`super::refusal`]'s text (the
/// caller exits 2), `Warn` logs it. Nothing when it fits, when the check is off, when the
/// device's memory is unknown, or when the plan cannot be made (a model whose config.json is
/// not reachable yet: logged, and the run goes on to report its own error).
pub fn check_run_memory(
    what: &str,
    rt: &crate::runtime::Runtime,
    input: impl FnOnce(&PlanOptions) -> Result<(PlanInput, Vec<String>), String>,
) -> Result<(), String> {
    use crate::runtime::MemoryCheck;
    if matches!(rt.memory_check, MemoryCheck::Off) {
        return Ok(());
    }
    let Some(bytes) = rt.device_memory() else {
        tracing::warn!("[runtime] memory_check: the device's memory is unknown; not checked");
        return Ok(());
    };
    let input = match input(&run_options(rt)) {
        Ok((input, _)) => input,
        Err(e) => {
            tracing::warn!("[runtime] memory_check: no plan for this config ({e}); not checked");
            return Ok(());
        }
    };
    let usable = usable(bytes);
    let (_, plan, _) = super::worst_case(&input);
    let gib = |b: u64| b as f64 / super::GIB;
    if plan.peak <= usable {
        tracing::info!(
            "memory plan: peak {:.2} GiB of {:.2} GiB usable",
            gib(plan.peak),
            gib(usable)
        );
        return Ok(());
    }
    let why = super::refusal(what, &input, &plan, usable);
    match rt.memory_check {
        MemoryCheck::Warn => {
            tracing::warn!("{why}\n(training anyway: [runtime] memory_check = \"warn\")");
            Ok(())
        }
        _ => Err(format!(
            "{why}\n`omr plan --config …` prints the plan by category; [runtime] memory_check = \"warn\" trains anyway"
        )),
    }
}

/// `[train] kept_decoder_layers = "auto"` for the run `input` plans on a device of
/// `device_bytes`: the most decoder layers whose activations fit next to everything else at the
/// config's worst case ([`super::most_kept_decoder_layers`], 1 GiB kept free as `omr plan`
/// does). 0 without decoder checkpointing or when even full checkpointing does not fit. Also a
/// line for the log saying why.
pub fn auto_kept_decoder_layers(input: &PlanInput, device_bytes: u64) -> (usize, String) {
    let usable = usable(device_bytes);
    let layers = input.model.text.num_hidden_layers;
    let gib = |b: u64| b as f64 / super::GIB;
    let Some((n, peak)) = super::most_kept_decoder_layers(input, usable) else {
        let why = if input.checkpointing.decoder() {
            format!(
                "the plan's peak with every layer recomputed is {:.2} GiB, over the {:.2} GiB usable",
                gib(super::worst_case(input).1.peak),
                gib(usable)
            )
        } else {
            "no decoder checkpointing".to_string()
        };
        return (0, format!("kept_decoder_layers = \"auto\": 0 ({why})"));
    };
    (
        n,
        format!(
            "kept_decoder_layers = \"auto\": {n} of {layers} decoder layers not recomputed \
             (planned peak {:.2} GiB of {:.2} GiB usable)",
            gib(peak),
            gib(usable)
        ),
    )
}

/// A run's error, made [`crate::TrainError::OutOfMemory`] when it is the device running out
/// of memory ([`crate::TrainError::is_out_of_memory`]): the device's message, what the plan
/// predicts for this config on `rt`'s device, and [`super::suggestions`]' changes. Any other
/// error is returned as it is.
pub fn out_of_memory_error(
    e: crate::TrainError,
    rt: &crate::runtime::Runtime,
    input: impl FnOnce(&PlanOptions) -> Result<(PlanInput, Vec<String>), String>,
) -> crate::TrainError {
    if !e.is_out_of_memory() {
        return e;
    }
    let gib = |b: u64| b as f64 / super::GIB;
    let mut msg = format!(
        "the {} ran out of memory during training ({e})",
        if rt.device.is_cuda() { "GPU" } else { "device" }
    );
    match (input(&run_options(rt)), rt.device_memory()) {
        (Ok((input, _)), Some(bytes)) => {
            let usable = usable(bytes);
            let (_, plan, which) = super::worst_case(&input);
            msg.push_str(&format!(
                ". The plan for this config: peak {:.2} GiB ({}, {which}) of {:.2} GiB usable",
                gib(plan.peak),
                super::peak_phase(&plan),
                gib(usable)
            ));
            // The plan fitting and the run not means the plan is short here: count as fitting
            // only what brings its peak 10% lower.
            let target = usable.min(plan.peak.saturating_mul(9) / 10);
            let tips = super::suggestions(&input, &plan, target);
            if !tips.is_empty() {
                msg.push_str(&format!(
                    "; what each change gives (\"fits\": at most {:.2} GiB):\n  - ",
                    gib(target)
                ));
                msg.push_str(&tips.join("\n  - "));
            }
        }
        (Err(why), _) => msg.push_str(&format!(" (no plan for this config: {why})")),
        (_, None) => {}
    }
    msg.push_str(
        "\nCheckpoints already committed are intact; `omr plan --config …` prints the plan by category.",
    );
    crate::TrainError::OutOfMemory(msg)
}
