//! What the `omr bench` commands that build a model share: the runtime from the `--device`,
//! `--precision` and `--kernels` flags, and the model's config.json by name.

use crate::exit::Exit;
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
