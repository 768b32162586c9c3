//! Writes a model folder in the layout transformers' `save_pretrained` writes, so transformers,
//! vLLM and the Hub read our exports as their own.
//!
//! - weights: `model.safetensors`, or `model-0000k-of-0000N.safetensors` shards plus
//!   `model.safetensors.index.json`, split greedily in the given tensor order exactly as
//!   huggingface_hub's `split_torch_state_dict_into_shards` does (a tensor bigger than the limit
//!   gets a shard of its own, placed before the shard being filled); each file carries the
//!   metadata `{"format": "pt"}` that transformers checks;
//! - `config.json` with the exported dtype, written like `PretrainedConfig.to_json_string`;
//! - the tokenizer, processor and chat-template files copied from the base model
//!   ([`copy_processor_files`], in `export/processor.rs`).
//!
//! Writes are atomic: weights go to a temp folder next to the target, which is renamed into
//! place when it does not exist yet; into an existing folder, the old weight files are removed
//! first and the new ones renamed in with the index (or the single file) last. A crash thus
//! never leaves a folder whose index promises shards that are not all there.

mod processor;

pub use processor::{copy_processor_files, PROCESSOR_FILES};

use crate::weights::{INDEX_FILE, SINGLE_FILE};
use crate::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// transformers' default `max_shard_size`.
pub const DEFAULT_MAX_SHARD: &str = "5GB";

/// Writes `tensors` (in this order) as safetensors into `out_dir`, floats cast to `dtype`.
/// Returns the files written: the weight files in order, then the index when sharded.
pub fn write_safetensors(
    out_dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: u64,
    dtype: DType,
) -> Result<Vec<PathBuf>> {
    dtype_name(dtype)?;
    if tensors.is_empty() {
        return Err(ModelError::Input(format!(
            "no tensors to write to {}",
            out_dir.display()
        )));
    }
    let mut seen = BTreeSet::new();
    for (name, _) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(ModelError::Input(format!(
                "tensor `{name}` given twice for export to {}",
                out_dir.display()
            )));
        }
    }
    let cast = |t: &Tensor| match t.dtype() {
        DType::BF16 | DType::F16 | DType::F32 | DType::F64 => dtype,
        other => other,
    };
    let sizes: Vec<u64> = tensors
        .iter()
        .map(|(_, t)| (t.elem_count() * cast(t).size_in_bytes()) as u64)
        .collect();
    let shards = plan_shards(&sizes, max_shard_bytes);
    let n = shards.len();
    let file_name = |k: usize| match n {
        1 => SINGLE_FILE.to_string(),
        _ => format!("model-{:05}-of-{n:05}.safetensors", k + 1),
    };

    let stage = Stage::new(out_dir)?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let mut weight_map = BTreeMap::new();
    let mut names = Vec::with_capacity(n + 1);
    for (k, members) in shards.iter().enumerate() {
        let file = file_name(k);
        let mut data = Vec::with_capacity(members.len());
        for &i in members {
            let (name, t) = &tensors[i];
            let t = t.to_dtype(cast(t))?.to_device(&Device::Cpu)?.contiguous()?;
            data.push((name.as_str(), t));
            weight_map.insert(name.clone(), Value::String(file.clone()));
        }
        let path = stage.dir.join(&file);
        safetensors::serialize_to_file(data, metadata.clone(), &path).map_err(|e| {
            ModelError::Safetensors {
                path: path.clone(),
                msg: format!("writing: {e}"),
            }
        })?;
        names.push(file);
    }
    if n > 1 {
        let params: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
        let index = json!({
            "metadata": {"total_parameters": params, "total_size": sizes.iter().sum::<u64>()},
            "weight_map": weight_map,
        });
        let path = stage.dir.join(INDEX_FILE);
        let text = py_json(&index, true, &path)? + "\n";
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
        names.push(INDEX_FILE.to_string());
    }
    stage.commit(&names)
}

/// Shards as lists of tensor positions, for tensors of `sizes` bytes in this order: greedy,
/// with oversized tensors alone, as huggingface_hub's `split_state_dict_into_shards_factory`.
fn plan_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// A temp folder next to the target that becomes (part of) the target on `commit`.
struct Stage {
    target: PathBuf,
    dir: PathBuf,
}

impl Stage {
    fn new(target: &Path) -> Result<Stage> {
        let name = target
            .file_name()
            .ok_or_else(|| ModelError::Input(format!("{}: not a folder name", target.display())))?;
        let parent = target.parent().unwrap_or(Path::new("."));
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!(
            ".{}.partial-{}-{nanos}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::create_dir(&dir).map_err(|e| ModelError::io(&dir, e))?;
        Ok(Stage {
            target: target.to_path_buf(),
            dir,
        })
    }

    /// Moves the staged `files` (the last one is the completeness marker) into the target.
    fn commit(self, files: &[String]) -> Result<Vec<PathBuf>> {
        let out: Vec<PathBuf> = files.iter().map(|f| self.target.join(f)).collect();
        if !self.target.exists() {
            std::fs::rename(&self.dir, &self.target)
                .map_err(|e| ModelError::io(&self.target, e))?;
            return Ok(out);
        }
        remove_old_weights(&self.target)?;
        for f in files {
            let to = self.target.join(f);
            std::fs::rename(self.dir.join(f), &to).map_err(|e| ModelError::io(&to, e))?;
        }
        Ok(out)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // Gone after a successful commit; after an error this removes the partial files.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes the weight files a previous save left in `dir`: the index first, so the folder never
/// looks complete with shards missing.
fn remove_old_weights(dir: &Path) -> Result<()> {
    let rm = |p: PathBuf| match std::fs::remove_file(&p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ModelError::io(&p, e)),
        _ => Ok(()),
    };
    rm(dir.join(INDEX_FILE))?;
    rm(dir.join(SINGLE_FILE))?;
    for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let entry = entry.map_err(|e| ModelError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_shard_name(&name) {
            rm(entry.path())?;
        }
    }
    Ok(())
}

/// `model-00001-of-00004.safetensors`
fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name
        .strip_prefix("model-")
        .and_then(|s| s.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    mid.split_once("-of-")
        .is_some_and(|(a, b)| digits(a) && digits(b))
}

/// A shard size as `save_pretrained(max_shard_size=...)` takes it: plain bytes, or a number
/// with a unit among KB, MB, GB, TB (powers of ten, case-insensitive, `"0.5GB"` allowed).
pub fn parse_size(text: &str) -> Result<u64> {
    let s = text.trim();
    if let Ok(bytes) = s.parse::<u64>() {
        return Ok(bytes);
    }
    let bad = |why: &str| {
        ModelError::Input(format!(
            "max shard size `{text}`: {why}; write bytes or a number with KB, MB, GB or TB (e.g. \"5GB\")"
        ))
    };
    let split = s.len().saturating_sub(2);
    let (value, unit) = match (s.get(..split), s.get(split..)) {
        (Some(v), Some(u)) => (v, u),
        _ => return Err(bad("no unit")),
    };
    let mult: f64 = match unit.to_ascii_uppercase().as_str() {
        "TB" => 1e12,
        "GB" => 1e9,
        "MB" => 1e6,
        "KB" => 1e3,
        _ => return Err(bad("unknown unit")),
    };
    let value: f64 = value.trim().parse().map_err(|_| bad("not a number"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(bad("must be positive"));
    }
    Ok((value * mult) as u64)
}

/// The transformers name of a float dtype (`torch.bfloat16` → `"bfloat16"`).
pub fn dtype_name(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("float32"),
        DType::BF16 => Ok("bfloat16"),
        DType::F16 => Ok("float16"),
        other => Err(ModelError::Input(format!(
            "cannot export weights as {other:?}; use float32, bfloat16 or float16"
        ))),
    }
}

/// Writes `config.json` into `out_dir`: `config` as given with `torch_dtype` and `dtype` set to
/// the exported dtype (also in `text_config` / `vision_config` where those already name one),
/// as `json.dumps(config, indent=2, sort_keys=True) + "\n"`.
pub fn write_config(out_dir: &Path, config: &Value, dtype: DType) -> Result<PathBuf> {
    let name = dtype_name(dtype)?;
    let path = out_dir.join("config.json");
    let Value::Object(map) = config else {
        return Err(ModelError::config(
            &path,
            "the config to write is not a JSON object",
        ));
    };
    let mut map = map.clone();
    map.insert("torch_dtype".into(), name.into());
    map.insert("dtype".into(), name.into());
    for sub in ["text_config", "vision_config"] {
        if let Some(Value::Object(s)) = map.get_mut(sub) {
            for key in ["torch_dtype", "dtype"] {
                if s.contains_key(key) {
                    s.insert(key.into(), name.into());
                }
            }
        }
    }
    let text = py_json(&Value::Object(map), true, &path)? + "\n";
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// `json.dumps(value, indent=2, sort_keys=True, ensure_ascii=...)`, as transformers writes its
/// JSON files; `path` names the file in the (nesting too deep) error.
pub(crate) fn py_json(value: &Value, ensure_ascii: bool, path: &Path) -> Result<String> {
    omr_data::chat::pyjson::dumps(value, 2, true, ensure_ascii)
        .map_err(|e| ModelError::config(path, e.to_string()))
}

/// Writes `path` through a temp file in the same folder, so it is either old or new, never half.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_follow_huggingface_hub_greedy_split() {
        // The example of `split_state_dict_into_shards_factory`'s docstring: limit 10,
        // sizes [6, 6, 2, 6, 2, 2] → [6], [6+2], [6+2+2].
        assert_eq!(
            plan_shards(&[6, 6, 2, 6, 2, 2], 10),
            [vec![0], vec![1, 2], vec![3, 4, 5]]
        );
        // An oversized tensor gets its own shard ahead of the one being filled.
        assert_eq!(plan_shards(&[2, 11, 3], 10), [vec![1], vec![0, 2]]);
        assert_eq!(plan_shards(&[1, 2, 3], 100), [vec![0, 1, 2]]);
    }

    #[test]
    fn sizes_parse_like_huggingface_hub() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size(" 500MB ").unwrap(), 500_000_000);
        assert_eq!(parse_size("0.5gb").unwrap(), 500_000_000);
        assert_eq!(parse_size("2 KB").unwrap(), 2_000);
        assert_eq!(parse_size("1TB").unwrap(), 1_000_000_000_000);
        assert_eq!(parse_size("12345").unwrap(), 12345);
        for bad in ["5GiB", "GB", "", "-1MB", "fiveGB", "5G"] {
            let e = parse_size(bad).expect_err(bad).to_string();
            assert!(e.contains("KB, MB, GB or TB"), "{e}");
        }
    }

    #[test]
    fn shard_names_are_recognised() {
        assert!(is_shard_name("model-00001-of-00004.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
        assert!(!is_shard_name("model-1-of-4.safetensors"));
        assert!(!is_shard_name("adapter_model.safetensors"));
    }

    #[test]
    fn config_gets_the_dtype_and_python_layout() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "eos_token_id": [151645, 151643],
            "torch_dtype": "bfloat16", "text_config": {"dtype": "bfloat16", "hidden_size": 8}});
        let path = write_config(dir.path(), &config, DType::F32).unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        let want = r#"{
  "architectures": [
    "Qwen2VLForConditionalGeneration"
  ],
  "dtype": "float32",
  "eos_token_id": [
    151645,
    151643
  ],
  "model_type": "qwen2_vl",
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "text_config": {
    "dtype": "float32",
    "hidden_size": 8
  },
  "torch_dtype": "float32"
}
"#;
        assert_eq!(text, want);
        let e = write_config(dir.path(), &config, DType::U8).unwrap_err();
        assert!(
            e.to_string().contains("float32, bfloat16 or float16"),
            "{e}"
        );
    }
}
