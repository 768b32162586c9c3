//! The same step in torch + transformers (`scripts/bench/train_step.py`, embedded in the
//! binary) on the same batch and config, for `omr bench train --python`.

use super::BenchTrainArgs;
use omr_train::bench_step::SyntheticBatch;
use serde_json::Value;

const TORCH_SCRIPT: &str = include_str!("../../../../scripts/bench/train_step.py");

/// Runs scripts/bench/train_step.py on the same batch and config; its JSON report.
pub(super) fn run(
    py: &str,
    cfg_path: &std::path::Path,
    batch: &SyntheticBatch,
    a: &BenchTrainArgs,
    threads: usize,
    reference_precision: &str,
) -> crate::Result<Value> {
    let dir = tempfile::tempdir()?;
    let batch_path = dir.path().join("batch.safetensors");
    batch.save(&batch_path)?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "--config".into(),
        cfg_path.into(),
        "--batch".into(),
        batch_path.into(),
    ];
    let mut flag = |k: &str, v: String| {
        args.push(k.into());
        args.push(v.into());
    };
    flag("--steps", a.steps.to_string());
    flag("--warmup", a.warmup.max(1).to_string());
    flag("--device", a.device.clone());
    flag("--threads", threads.to_string());
    flag("--seed", a.seed.to_string());
    flag("--precision", reference_precision.to_string());
    if a.lora_rank > 0 {
        flag("--lora-rank", a.lora_rank.to_string());
    }
    if a.grad_accum > 1 {
        flag("--grad-accum", a.grad_accum.to_string());
    }
    if a.activation_checkpointing != "none" {
        args.push("--gradient-checkpointing".into());
    }
    if a.freeze_vision {
        args.push("--freeze-vision".into());
    }
    if a.freeze_language {
        args.push("--freeze-language".into());
    }
    crate::bench_common::run_python(py, "train_step.py", TORCH_SCRIPT, &args)
}
