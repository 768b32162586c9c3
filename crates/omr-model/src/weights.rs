//! A checkpoint folder read into named tensors, which the model builder then takes one by one.
//!
//! The folder layouts are the ones transformers reads: `model.safetensors`, or
//! `model.safetensors.index.json` plus the shards its `weight_map` names, or (without an index)
//! one `*.safetensors` file of any name. Files are memory-mapped and each tensor is copied once
//! onto the device in the stored dtype, then cast there to the requested float dtype. Names are
//! mapped to canonical ones by [`crate::names`], so a transformers 5.x file loads like a 4.x
//! one. The builder `take`s every tensor it expects with its expected shape, and `remaining`
//! then lists what the checkpoint held that the model did not use.

use crate::names::canonical;
use crate::{ModelError, Result};
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of one checkpoint folder, under canonical names.
pub struct Checkpoint {
    pub dir: PathBuf,
    /// name → (tensor, the file it came from)
    tensors: BTreeMap<String, (Tensor, PathBuf)>,
    taken: BTreeSet<String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.tensors.len())
            .field("taken", &self.taken.len())
            .finish()
    }
}

impl Checkpoint {
    /// Reads every tensor of the checkpoint in `dir`; floats (bf16/f16/f32/f64) become `dtype`,
    /// other dtypes stay as stored.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
        let (files, index) = weight_files(dir)?;
        let mut tensors: BTreeMap<String, (Tensor, PathBuf)> = BTreeMap::new();
        for file in &files {
            let bad = |msg: String| ModelError::Safetensors {
                path: file.clone(),
                msg,
            };
            // SAFETY: the map is read-only and dropped before this function returns; a file
            // changed underneath by another process is the usual mmap caveat, as in transformers.
            let st = unsafe { MmapedSafetensors::new(file) }.map_err(|e| bad(e.to_string()))?;
            for (stored, view) in st.tensors() {
                let name = canonical(&stored).into_owned();
                if let Some((_, first)) = tensors.get(&name) {
                    return Err(ModelError::DuplicateTensor {
                        name,
                        first: first.clone(),
                        second: file.clone(),
                    });
                }
                let t = view
                    .load(device)
                    .map_err(|e| bad(format!("tensor `{stored}`: {e}")))?;
                let t = match t.dtype() {
                    DType::BF16 | DType::F16 | DType::F32 | DType::F64 if t.dtype() != dtype => {
                        t.to_dtype(dtype)?
                    }
                    _ => t,
                };
                tensors.insert(name, (t, file.clone()));
            }
        }
        if let Some((index_path, weight_map)) = index {
            for (stored, shard) in weight_map {
                if !tensors.contains_key(canonical(&stored).as_ref()) {
                    return Err(ModelError::config(
                        index_path,
                        format!(
                            "lists tensor `{stored}` in `{shard}`, which has no such tensor; the \
                             shard is from another save or the index is stale: fetch the model again"
                        ),
                    ));
                }
            }
        }
        tracing::info!(
            "loaded {} tensors from {} file(s) in {}",
            tensors.len(),
            files.len(),
            dir.display()
        );
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            tensors,
            taken: BTreeSet::new(),
        })
    }

    /// Removes and returns tensor `name` (any alias accepted), checking its shape.
    pub fn take(&mut self, name: &str, expected_shape: &[usize]) -> Result<Tensor> {
        let name = canonical(name).into_owned();
        let Some((t, path)) = self.tensors.get(&name) else {
            return Err(ModelError::MissingTensor {
                dir: self.dir.clone(),
                hint: self.hint(&name),
                name,
            });
        };
        if t.dims() != expected_shape {
            return Err(ModelError::BadShape {
                name,
                path: path.clone(),
                expected: expected_shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        let (t, _) = self.tensors.remove(&name).expect("present above");
        self.taken.insert(name);
        Ok(t)
    }

    /// Tensor `name` (any alias accepted) if it is still there, without taking it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(canonical(name).as_ref()).map(|(t, _)| t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(canonical(name).as_ref())
    }

    /// The file tensor `name` was read from, if it is still there.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(canonical(name).as_ref())
            .map(|(_, p)| p.as_path())
    }

    /// Canonical names not taken yet, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensors nobody took: what the checkpoint holds that the model does not use.
    pub fn remaining(self) -> Vec<String> {
        self.tensors.into_keys().collect()
    }

    /// Why `name` might be missing, for the error message (empty when nothing is known).
    fn hint(&self, name: &str) -> String {
        if self.taken.contains(name) {
            return " (it was already taken: the model builder asks for it twice)".into();
        }
        if name == "lm_head.weight" && self.contains("model.embed_tokens.weight") {
            return " (the checkpoint has no lm_head, so its embeddings are tied: set \
                    `tie_word_embeddings: true` in config.json)"
                .into();
        }
        let all = || self.tensors.keys().chain(self.taken.iter());
        let other: Vec<&str> = all()
            .filter(|s| s.ends_with(&format!(".{name}")) || name.ends_with(&format!(".{s}")))
            .map(String::as_str)
            .take(3)
            .collect();
        if !other.is_empty() {
            return format!(
                " (found {}: the checkpoint names tensors under another prefix; merge LoRA \
                 adapters and save with transformers `save_pretrained` or `omr export`)",
                other
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for prefix in ["model.layers.", "visual.blocks."] {
            let Some(i) = layer_of(name, prefix) else {
                continue;
            };
            let n = all()
                .filter_map(|s| layer_of(s, prefix))
                .max()
                .map_or(0, |m| m + 1);
            if i >= n {
                return format!(
                    " (the checkpoint has {n} `{prefix}*` layers: the layer count in config.json \
                     does not match the weights)"
                );
            }
        }
        String::new()
    }
}

/// `i` of `<prefix><i>.…`.
fn layer_of(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.split('.').next()?.parse().ok()
}

/// `weight_map` of an index: tensor name → shard file.
pub type WeightMap = BTreeMap<String, String>;

/// The index file and its weight map, when a folder is sharded.
pub type Index = (PathBuf, WeightMap);

/// The weight files of `dir`, in reading order, and the index if one is used.
pub fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<Index>)> {
    if !dir.is_dir() {
        return Err(ModelError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "checkpoint folder not found (expected a folder with config.json and *.safetensors)",
            ),
        ));
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let weight_map = read_index(&index_path)?;
        let shards: BTreeSet<&String> = weight_map.values().collect();
        let mut files = Vec::with_capacity(shards.len());
        for shard in shards {
            let plain = Path::new(shard)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain {
                return Err(ModelError::config(
                    &index_path,
                    format!("shard `{shard}` is not a file name inside the folder"),
                ));
            }
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(ModelError::MissingShard {
                    index: index_path,
                    dir: dir.to_path_buf(),
                    shard: shard.clone(),
                });
            }
            files.push(path);
        }
        return Ok((files, Some((index_path, weight_map))));
    }
    let listing = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut found = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| ModelError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && entry.path().is_file() {
            found.push(name);
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok((vec![dir.join(one)], None)),
        [] => Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
            found: "none".into(),
        }),
        many => Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
            found: format!(
                "{} without an index, which cannot tell which belong to the model",
                many.join(", ")
            ),
        }),
    }
}

/// The `weight_map` of a `model.safetensors.index.json`.
pub fn read_index(path: &Path) -> Result<WeightMap> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: Option<WeightMap>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    index.weight_map.ok_or_else(|| {
        ModelError::config(
            path,
            "no `weight_map`: not a safetensors index; fetch the model again",
        )
    })
}
