//! `omr plan --config RUN.toml [--set k=v] [--device-memory 80GiB]`: the peak memory of a
//! training step predicted from the run config (`omr_train::plan`), printed as a table by
//! category, and exit 2 with what to change when it does not fit. An SFT config plans its
//! training step; a GRPO config (one with `[grpo]`, `[objective]` or `[rewards]`) its policy
//! update, frozen reference and rollout phase (`omr_train::plan::input_from_grpo`).
//!
//! The defaults describe bf16 compute with f32 masters on an 80 GiB H100 with eager attention
//! (candle ops, scores materialised: the conservative case); `--attention fused` plans for the
//! fused kernels a CUDA build runs by default (`[runtime] kernels = "auto"`: flash-style
//! attention and the fused linear cross-entropy), `--compute-dtype f32` for the CPU runtime.

use crate::exit::{Exit, Tag};
use anyhow::anyhow;
use clap::Args;
use omr_train::config::SftConfig;
use omr_train::grpo_config::GrpoConfig;
use omr_train::plan::{self, parse_bytes, AttentionImpl, PlanOptions, GIB};
use std::path::PathBuf;

#[derive(Args)]
pub struct PlanArgs {
    /// Run config (TOML): SFT (configs/sft/qwen2.5-vl-7b.toml) or GRPO (configs/grpo/…).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value: --set data.batch.batch_size=2 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Memory of the device: 80GiB (H100), 141GB (H200), 24GiB, or bytes.
    #[arg(long, alias = "gpu-mem", default_value = "80GiB")]
    pub device_memory: String,
    /// Kept free for the CUDA context, cuBLAS workspace and allocator slack.
    #[arg(long, default_value = "1GiB")]
    pub headroom: String,
    /// bf16 (the GPU path: bf16 compute, f32 masters) | f32 (the CPU runtime).
    #[arg(long, default_value = "bf16")]
    pub compute_dtype: String,
    /// eager (candle ops: attention scores and N × V logits materialised) | fused (the fused
    /// kernels of a CUDA build: flash-style attention, fused linear cross-entropy).
    #[arg(long, default_value = "eager")]
    pub attention: String,
    /// config.json of the model instead of the one model.path points to.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Image area cap instead of the processor's max_pixels.
    #[arg(long)]
    pub max_pixels: Option<u64>,
    /// Images per row instead of 1 (padding) or ceil(T / process.max_length) (packing).
    #[arg(long)]
    pub images_per_row: Option<usize>,
    /// Processes of a data-parallel job (WORLD_SIZE / SLURM_NTASKS of the run): above 1 the
    /// plan adds the gradient exchange between backward and the step, and f32 gradients.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub world: u64,
    /// Also write the plan as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Whether the config at `path` is a GRPO run's: it has a `[grpo]`, `[objective]` or
/// `[rewards]` section (an SFT config refuses those keys).
fn is_grpo_config(path: &std::path::Path) -> crate::Result<bool> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Exit::usage(anyhow!("{}: {e}", path.display())))?;
    let tree: toml::Table =
        toml::from_str(&text).map_err(|e| Exit::usage(anyhow!("{}: {e}", path.display())))?;
    Ok(["grpo", "objective", "rewards"]
        .iter()
        .any(|k| tree.contains_key(*k)))
}

pub fn run(a: PlanArgs) -> crate::Result<()> {
    let device =
        parse_bytes(&a.device_memory).map_err(|e| Exit::usage(anyhow!("--device-memory {e}")))?;
    let headroom = parse_bytes(&a.headroom).map_err(|e| Exit::usage(anyhow!("--headroom {e}")))?;
    let compute_bytes = match a.compute_dtype.as_str() {
        "bf16" | "bfloat16" => 2,
        "f32" | "float32" => 4,
        o => return Err(Exit::usage(anyhow!("--compute-dtype {o}: bf16 or f32"))),
    };
    let attention = match a.attention.as_str() {
        "eager" => AttentionImpl::Eager,
        "fused" | "flash" => AttentionImpl::Fused,
        o => return Err(Exit::usage(anyhow!("--attention {o}: eager or fused"))),
    };
    let opts = PlanOptions {
        model_config: a.model_config.clone(),
        compute_bytes,
        attention,
        max_pixels: a.max_pixels,
        images_per_row: a.images_per_row,
        world: a.world as usize,
    };
    let (input, notes, kept_setting) = if is_grpo_config(&a.config)? {
        let cfg = GrpoConfig::load(&a.config, &a.sets).usage()?;
        let (input, notes) =
            plan::input_from_grpo(&cfg, &opts).map_err(|e| Exit::usage(anyhow!(e)))?;
        (input, notes, cfg.train.kept_decoder_layers)
    } else {
        let cfg = SftConfig::load(&a.config, &a.sets).usage()?;
        let (input, notes) =
            plan::input_from_sft(&cfg, &opts).map_err(|e| Exit::usage(anyhow!(e)))?;
        (input, notes, cfg.train.kept_decoder_layers)
    };
    let base = input;
    let (input, p, which) = plan::worst_case(&base);
    println!("omr plan: {}", a.config.display());
    for n in &notes {
        println!("  {n}");
    }
    println!("  the larger of image-heavy and text-only rows: {which}");
    print!("{}", plan::render(&input, &p, device, headroom));
    let usable = device.saturating_sub(headroom);
    // Memory that full checkpointing leaves over buys back recompute: layers that can keep
    // their activations.
    let most_kept = plan::most_kept_decoder_layers(&base, usable);
    if let Some((k, peak)) = most_kept.filter(|&(k, _)| k > base.kept_decoder_layers) {
        let what = if kept_setting == plan::KeptLayers::Auto {
            format!("train.kept_decoder_layers = \"auto\" keeps {k} on this device")
        } else {
            format!("room for train.kept_decoder_layers = {k}")
        };
        println!(
            "{what} ({k} of {} decoder layers not recomputed: peak {:.2} GiB)",
            base.model.text.num_hidden_layers,
            peak as f64 / GIB
        );
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "config": a.config.display().to_string(),
            "device_bytes": device,
            "headroom_bytes": headroom,
            "fits": p.peak <= usable,
            "max_kept_decoder_layers": most_kept.map(|(k, _)| k),
            "plan": p,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")?;
    }
    if p.peak > usable {
        let what = a.config.display().to_string();
        return Err(Exit::usage(anyhow!(plan::refusal(
            &what, &base, &p, usable
        ))));
    }
    Ok(())
}
