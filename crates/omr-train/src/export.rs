//! The end of a run: the trained model as a folder that transformers and vLLM load as is, with
//! a model card. Used at the end of `omr sft` and by `omr export --checkpoint DIR`.
//!
//! Full fine-tuning (or LoRA with `merge_lora`) writes the HF layout of the model crate
//! (`pretrained::save`: sharded safetensors, config, tokenizer, template, processor); LoRA
//! without merging writes a PEFT adapter folder plus the processor files. Both get `README.md`:
//! YAML front matter, data provenance and licence read from each dataset's own card, the
//! eval results, and the not-for-clinical-use statement (`card.rs`).

use crate::card::{DatasetInfo, EvalResult, ModelCard};
use crate::checkpoint;
use crate::config::{ExportConfig, SftConfig};
use crate::error::{Result, TrainError};
use crate::grpo_config::{is_grpo_toml, GrpoConfig};
use crate::setup::{self, Built};
use crate::snapshot::{eval_rows, read_saved_state};
use candle_core::{DType, Device};
use omr_model::export::{copy_processor_files, parse_size};
use omr_model::{lora, pretrained};
use std::path::Path;

pub fn export(
    built: &Built,
    cfg: &SftConfig,
    out: &Path,
    merge_lora: bool,
    step: u64,
    eval: &[EvalResult],
) -> Result<()> {
    let card = model_card(built, cfg, step, adapter_only(built, merge_lora), eval);
    export_with_card(built, &cfg.export, out, merge_lora, &card)
}

/// The export of a GRPO run: the same folder, with the GRPO recipe in the card.
pub fn export_grpo(
    built: &Built,
    cfg: &GrpoConfig,
    out: &Path,
    merge_lora: bool,
    step: u64,
    eval: &[EvalResult],
) -> Result<()> {
    let card = grpo_model_card(built, cfg, step, adapter_only(built, merge_lora), eval);
    export_with_card(built, &cfg.export, out, merge_lora, &card)
}

fn adapter_only(built: &Built, merge_lora: bool) -> bool {
    built.params.lora.is_some() && !merge_lora
}

/// Weights (HF layout or PEFT adapter) + processor files + `README.md` from `card`.
pub fn export_with_card(
    built: &Built,
    export: &ExportConfig,
    out: &Path,
    merge_lora: bool,
    card: &ModelCard,
) -> Result<()> {
    let dtype = match export.dtype.as_str() {
        "float32" | "f32" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "f16" => DType::F16,
        other => {
            return Err(TrainError::Usage(format!(
                "export.dtype = {other:?}: use float32, bfloat16 or float16"
            )))
        }
    };
    let max_shard_bytes = parse_size(&export.max_shard_size)
        .map_err(|e| TrainError::Usage(format!("export.max_shard_size: {e}")))?;
    let is_lora = built.params.lora.is_some();
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    if is_lora && !merge_lora {
        lora::save_adapter(&built.params, out, &built.base_id)?;
        copy_processor_files(&built.processor_dir, out)?;
    } else {
        let tensors: Vec<_> = if is_lora {
            lora::merged(&built.params)?.into_iter().collect()
        } else {
            pretrained::base_tensors(&built.params)
        };
        let opts = pretrained::SaveOptions {
            base_dir: Some(&built.processor_dir),
            dtype,
            max_shard_bytes,
        };
        pretrained::save(out, &built.cfg, &tensors, &opts)?;
        write_generation_config(built, out)?;
    }
    let path = out.join("README.md");
    std::fs::write(&path, card.render()).map_err(TrainError::io(&path))?;
    Ok(())
}

/// A tiny model has no generation config of its own: write the eos ids generation stops at.
fn write_generation_config(built: &Built, out: &Path) -> Result<()> {
    let path = out.join("generation_config.json");
    if path.exists() {
        return Ok(());
    }
    let bos = built.cfg.raw.get("bos_token_id").cloned();
    let gen = serde_json::json!({
        "bos_token_id": bos,
        "eos_token_id": built.eos_token_ids,
        "pad_token_id": bos,
        "transformers_version": "4.57.1"
    });
    let text = serde_json::to_string_pretty(&gen).expect("json") + "\n";
    std::fs::write(&path, text).map_err(TrainError::io(&path))
}

fn model_card(
    built: &Built,
    cfg: &SftConfig,
    step: u64,
    adapter: bool,
    eval: &[EvalResult],
) -> ModelCard {
    let (n, trainable) = built.params.counts();
    let mut training = vec![
        (
            "recipe".to_string(),
            "supervised fine-tuning (omr sft)".to_string(),
        ),
        ("optimizer steps".into(), step.to_string()),
        ("peak learning rate".into(), format!("{:e}", cfg.optim.lr)),
        (
            "schedule".into(),
            format!("{:?}", cfg.schedule.kind).to_lowercase(),
        ),
        (
            "gradient accumulation".into(),
            cfg.train.grad_accum.to_string(),
        ),
        (
            "batch".into(),
            format!(
                "{} rows, {:?}",
                cfg.data.batch.batch_size, cfg.data.batch.mode
            )
            .to_lowercase(),
        ),
        (
            "parameters (trainable / total)".into(),
            format!("{trainable} / {n}"),
        ),
        ("seed".into(), cfg.train.seed.to_string()),
        ("omr version".into(), env!("CARGO_PKG_VERSION").to_string()),
    ];
    if let Some(l) = &cfg.model.lora {
        training.push((
            "LoRA".into(),
            format!(
                "r {} alpha {} targets {}{}",
                l.r,
                l.alpha,
                l.targets.join(","),
                if adapter {
                    " (adapter only)"
                } else {
                    " (merged)"
                }
            ),
        ));
    }
    ModelCard {
        model_name: cfg
            .run
            .dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "omr-sft".into()),
        repo_id: String::new(),
        base_model: built.base_id.clone(),
        datasets: cfg
            .data
            .sources
            .iter()
            .map(|s| dataset_info(s, &cfg.export.data_license))
            .collect(),
        license: cfg.export.license.clone(),
        tags: vec!["sft".into(), "qwen2.5-vl".into()],
        pipeline_tag: "image-text-to-text".into(),
        recipe: "SFT".into(),
        training,
        eval: eval.to_vec(),
    }
}

/// Provenance and licence of a training source, from its own dataset card when it has one.
fn grpo_model_card(
    built: &Built,
    cfg: &GrpoConfig,
    step: u64,
    adapter: bool,
    eval: &[EvalResult],
) -> ModelCard {
    let (n, trainable) = built.params.counts();
    let g = &cfg.grpo;
    let o = &cfg.objective;
    let r = &cfg.rewards;
    let mut training = vec![
        (
            "recipe".to_string(),
            "GRPO reinforcement learning (omr grpo)".to_string(),
        ),
        ("rollout steps".into(), step.to_string()),
        (
            "prompts × completions per step".into(),
            format!("{} × {}", g.prompts_per_step, g.group_size),
        ),
        (
            "objective".into(),
            format!(
                "{:?}, scale_rewards {:?}, epsilon {} / {}, beta {}",
                o.loss_type, o.scale_rewards, o.epsilon, o.epsilon_high, o.beta
            )
            .to_lowercase(),
        ),
        (
            "rewards (weights)".into(),
            format!(
                "accuracy {}, format {}, overlong {}",
                r.accuracy, r.format, r.overlong
            ),
        ),
        (
            "sampling".into(),
            format!(
                "temperature {}, top_p {}, top_k {}, max {} tokens",
                g.temperature, g.top_p, g.top_k, g.max_completion_length
            ),
        ),
        ("peak learning rate".into(), format!("{:e}", cfg.optim.lr)),
        (
            "parameters (trainable / total)".into(),
            format!("{trainable} / {n}"),
        ),
        ("seed".into(), cfg.train.seed.to_string()),
        ("omr version".into(), env!("CARGO_PKG_VERSION").to_string()),
    ];
    if let Some(l) = &cfg.model.lora {
        training.push((
            "LoRA".into(),
            format!(
                "r {} alpha {} targets {}{}",
                l.r,
                l.alpha,
                l.targets.join(","),
                if adapter {
                    " (adapter only)"
                } else {
                    " (merged)"
                }
            ),
        ));
    }
    ModelCard {
        model_name: cfg
            .run
            .dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "omr-grpo".into()),
        repo_id: String::new(),
        base_model: built.base_id.clone(),
        datasets: cfg
            .data
            .sources
            .iter()
            .map(|s| dataset_info(s, &cfg.export.data_license))
            .collect(),
        license: cfg.export.license.clone(),
        tags: vec![
            "grpo".into(),
            "reinforcement-learning".into(),
            "qwen2.5-vl".into(),
        ],
        pipeline_tag: "image-text-to-text".into(),
        recipe: "GRPO".into(),
        training,
        eval: eval.to_vec(),
    }
}

fn dataset_info(s: &omr_data::source::SourceSpec, default_licence: &str) -> DatasetInfo {
    if let Some(hub) = &s.hub {
        return DatasetInfo {
            id: hub.clone(),
            licence: default_licence.to_string(),
            provenance: format!("Hugging Face Hub dataset {hub}, split {}", s.split),
        };
    }
    let path = s.path.clone().unwrap_or_default();
    let front = std::fs::read_to_string(path.join("README.md")).unwrap_or_default();
    let field = |key: &str| {
        front
            .lines()
            .skip(1)
            .take_while(|l| *l != "---")
            .find_map(|l| {
                l.strip_prefix(key)
                    .map(|v| v.trim().trim_matches('"').to_string())
            })
    };
    let synthetic = front.contains("- synthetic");
    let name = field("pretty_name:").unwrap_or_else(|| path.display().to_string());
    DatasetInfo {
        id: path.display().to_string(),
        licence: field("license:").unwrap_or_else(|| default_licence.to_string()),
        provenance: if synthetic {
            format!("{name}: synthetic images and questions generated by `omr data synth` (no patient data), split {}", s.split)
        } else {
            format!(
                "{name} (local shards at {}), split {}",
                path.display(),
                s.split
            )
        },
    }
}

/// `omr export --checkpoint DIR`: rebuilds the run's model from the checkpoint's own config,
/// loads its weights (after verifying the manifest) and exports it with a model card.
pub fn export_checkpoint(dir: &Path, out: &Path, merge_lora: bool) -> Result<()> {
    checkpoint::verify(dir).map_err(|e| TrainError::Usage(e.to_string()))?;
    let cfg_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).map_err(TrainError::io(&cfg_path))?;
    let device = Device::Cpu;
    let saved = read_saved_state(dir)?;
    if is_grpo_toml(&text) {
        let cfg = GrpoConfig::load(&cfg_path, &[])?;
        let built = setup::build(&cfg.model, cfg.train.seed, &device)?;
        setup::restore_trainable(&built.params, &dir.join("weights.safetensors"), &device)?;
        let eval = eval_rows(&cfg.data.sources, &cfg.eval.split, &saved.eval);
        return export_grpo(
            &built,
            &cfg,
            out,
            merge_lora || cfg.export.merge_lora,
            saved.train.step,
            &eval,
        );
    }
    let cfg = SftConfig::load(&cfg_path, &[])?;
    let built = setup::build(&cfg.model, cfg.train.seed, &device)?;
    setup::restore_trainable(&built.params, &dir.join("weights.safetensors"), &device)?;
    let eval = eval_rows(&cfg.data.sources, &cfg.eval.split, &saved.eval);
    crate::export::export(
        &built,
        &cfg,
        out,
        merge_lora || cfg.export.merge_lora,
        saved.train.step,
        &eval,
    )
}
