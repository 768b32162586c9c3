//! `from_pretrained` and `save_pretrained`: a model folder (or Hub id) to config + parameters,
//! and parameters back to a folder transformers loads with no missing or unexpected keys.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::export;
use crate::params::{param_shapes, Params};
use crate::weights::Checkpoint;
use candle_core::{DType, Device, Tensor};
use omr_data::source::hub::HubEnv;
use std::path::{Path, PathBuf};

/// A loaded model: where it came from, its config and its parameters.
pub struct Pretrained {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub params: Params,
    /// Tensors in the checkpoint that the model does not use (reported, not fatal).
    pub unexpected: Vec<String>,
}

/// Loads `id_or_path` (a folder, or a Hub id resolved through the HF cache) in `dtype`.
pub fn load(id_or_path: &str, dtype: DType, device: &Device) -> Result<Pretrained> {
    let dir = crate::hub::resolve_model(id_or_path, None, &HubEnv::from_process())?;
    load_dir(&dir, dtype, device)
}

/// Loads a local model folder. Every parameter the config implies must be present with its
/// shape; a tied `lm_head.weight` saved anyway is accepted and ignored.
pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Pretrained> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let mut ckpt = Checkpoint::load(dir, dtype, device)?;
    let mut tensors = Vec::new();
    for (name, shape) in param_shapes(&config) {
        let t = ckpt.take(&name, &shape)?;
        tensors.push((name, t));
    }
    if config.tie_word_embeddings && ckpt.contains("lm_head.weight") {
        ckpt.take(
            "lm_head.weight",
            &[config.text.vocab_size, config.text.hidden_size],
        )?;
    }
    let unexpected = ckpt.remaining();
    if !unexpected.is_empty() {
        let shown: Vec<&str> = unexpected.iter().take(8).map(String::as_str).collect();
        tracing::warn!(
            "{}: {} tensors are not used by the model: {}{}",
            dir.display(),
            unexpected.len(),
            shown.join(", "),
            if unexpected.len() > 8 { ", …" } else { "" }
        );
    }
    let params = Params::from_tensors(tensors, device, dtype)?;
    Ok(Pretrained {
        dir: dir.to_path_buf(),
        config,
        params,
        unexpected,
    })
}

/// What [`save`] writes besides the weights.
pub struct SaveOptions<'a> {
    /// Folder whose tokenizer, chat template, processor and generation config are copied.
    pub base_dir: Option<&'a Path>,
    pub dtype: DType,
    pub max_shard_bytes: u64,
}

/// Writes a transformers-loadable folder: weights (sharded when over the limit, tied
/// `lm_head` omitted as transformers omits it), `config.json` with the dtype, and the base's
/// processor files. `tensors` are the base parameters (LoRA already merged or left out).
pub fn save(
    out: &Path,
    config: &ModelConfig,
    tensors: &[(String, Tensor)],
    opts: &SaveOptions,
) -> Result<Vec<String>> {
    let expected = param_shapes(config);
    for (name, shape) in &expected {
        let t =
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| ModelError::MissingTensor {
                    dir: out.to_path_buf(),
                    name: name.clone(),
                    hint: " (nothing to export for it)".into(),
                })?;
        if t.1.dims() != shape.as_slice() {
            return Err(ModelError::BadShape {
                name: name.clone(),
                path: out.to_path_buf(),
                expected: shape.clone(),
                found: t.1.dims().to_vec(),
            });
        }
    }
    let ordered: Vec<(String, Tensor)> = expected
        .iter()
        .map(|(n, _)| {
            let t = &tensors
                .iter()
                .find(|(m, _)| m == n)
                .expect("checked above")
                .1;
            (n.clone(), t.clone())
        })
        .collect();
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    export::write_safetensors(out, &ordered, opts.max_shard_bytes, opts.dtype)?;
    let mut raw = config.raw.clone();
    if raw.get("architectures").is_none() {
        raw["architectures"] = serde_json::json!([config.arch.architecture()]);
    }
    export::write_config(out, &raw, opts.dtype)?;
    match opts.base_dir {
        Some(base) => export::copy_processor_files(base, out),
        None => Ok(Vec::new()),
    }
}

/// The current values of every base parameter of `params` (adapters excluded).
pub fn base_tensors(params: &Params) -> Vec<(String, Tensor)> {
    params
        .iter()
        .filter(|(n, _)| !n.contains(".lora_A.") && !n.contains(".lora_B."))
        .map(|(n, v)| (n.to_string(), v.as_tensor().detach()))
        .collect()
}
