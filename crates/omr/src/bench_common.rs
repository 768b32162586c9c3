//! What the `omr bench` commands that build a model share: the runtime from the `--device`,
//! `--precision` and `--kernels` flags, the model's config.json by name, and running a torch
//! reference script.

use crate::exit::{Exit, Tag};
use anyhow::Context;
use omr_train::plan;
use omr_train::runtime::RuntimeConfig;
use std::path::PathBuf;

/// The `[runtime]` of `--device`, `--precision` and `--kernels` (bad words exit 2).
pub fn runtime(
    device: &str,
    precision: &str,
    kernels: &str,
) -> crate::Result<omr_train::runtime::Runtime> {
    let words = |e: String| Exit::usage(anyhow::anyhow!(e));
    RuntimeConfig {
        device: device.parse().map_err(words)?,
        precision: precision.parse().map_err(words)?,
        kernels: kernels.parse().map_err(words)?,
        ..Default::default()
    }
    .resolve()
    .map_err(|e| Exit::usage(anyhow::anyhow!("{e}")))
}

/// `tiny` / `3b` / `7b` or a path → the config.json path.
pub fn config_path(name: &str) -> PathBuf {
    let models = plan::configs_dir().join("models");
    match name {
        "tiny" => models.join("tiny.json"),
        "3b" | "qwen2.5-vl-3b" => models.join("qwen2.5-vl-3b.json"),
        "7b" | "qwen2.5-vl-7b" => models.join("qwen2.5-vl-7b.json"),
        other => PathBuf::from(other),
    }
}

/// Runs the reference `script` (its text, embedded in the binary, written to a temporary
/// `name`) with `py` and `args`; its JSON report, the last line of stdout that starts with `{`.
/// A missing Python, a failing script (the tail of its stderr) or no report exit 2.
pub fn run_python(
    py: &str,
    name: &str,
    script: &str,
    args: &[std::ffi::OsString],
) -> crate::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    std::fs::write(&path, script)?;
    let out = std::process::Command::new(py)
        .arg(&path)
        .args(args)
        .output()
        .with_context(|| {
            format!("running {py} (pass --python PATH to a Python with torch and transformers)")
        })
        .usage()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        return Err(Exit::usage(anyhow::anyhow!(
            "{py} {}: {}",
            path.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
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
