//! The same step in torch + transformers (`scripts/bench/train_step.py`, embedded in the
//! binary) on the same batch and config, for `omr bench train --python`.

use super::BenchTrainArgs;
use crate::exit::{Exit, Tag};
use anyhow::Context;
use omr_train::bench_step::SyntheticBatch;
use serde_json::Value;
use std::process::Command;

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
    let script = dir.path().join("train_step.py");
    std::fs::write(&script, TORCH_SCRIPT)?;
    let mut cmd = Command::new(py);
    cmd.arg(&script)
        .arg("--config")
        .arg(cfg_path)
        .arg("--batch")
        .arg(&batch_path)
        .args(["--steps", &a.steps.to_string()])
        .args(["--warmup", &a.warmup.max(1).to_string()])
        .args(["--device", &a.device])
        .args(["--threads", &threads.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .args(["--precision", reference_precision]);
    if a.activation_checkpointing != "none" {
        cmd.arg("--gradient-checkpointing");
    }
    if a.freeze_vision {
        cmd.arg("--freeze-vision");
    }
    if a.freeze_language {
        cmd.arg("--freeze-language");
    }
    if a.lora_rank > 0 {
        cmd.args(["--lora-rank", &a.lora_rank.to_string()]);
    }
    if a.grad_accum > 1 {
        cmd.args(["--grad-accum", &a.grad_accum.to_string()]);
    }
    let out = cmd
        .output()
        .with_context(|| {
            format!("running {py} (pass --python PATH to a Python with torch and transformers)")
        })
        .usage()?;
    if !out.status.success() {
        return Err(Exit::usage(anyhow::anyhow!(
            "{py} {}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    Ok(serde_json::from_str(line)
        .with_context(|| format!("the reference printed no JSON report: {stdout}"))?)
}
