//! The SFT run config: one TOML table per component, each a serde struct with
//! `deny_unknown_fields`, so a typo fails at start-up naming the key (STYLE.md rule 5).
//!
//! `--set section.key=value` edits the parsed TOML tree before it is deserialized, so an
//! override is checked exactly like the file (unknown keys, types). The value is read as a TOML
//! value when it parses as one (`3`, `1e-4`, `true`, `"x"`, `[1, 2]`) and as a bare string
//! otherwise (`--set model.path=runs/tiny`). The resolved config (`to_toml`) is saved in the
//! run directory and in every checkpoint.

use crate::checkpoint::CheckpointConfig;
use crate::optim::OptimConfig;
use crate::schedule::ScheduleConfig;
pub use omr_data::config::ConfigError;
use omr_data::config::DataConfig;
use omr_model::lora::LoraConfig;
use omr_model::tiny::TinySpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    pub run: RunConfig,
    pub model: ModelSection,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub export: ExportConfig,
    /// Device, precision and kernels (`auto`: a GPU in bf16 with the fused kernels when
    /// there is one, else the CPU in fp32).
    #[serde(default)]
    pub runtime: crate::runtime::RuntimeConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run directory: checkpoints, metrics, logs, the final export.
    pub dir: PathBuf,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelInit {
    /// Load `path` (a folder or a Hub id) with its weights.
    #[default]
    Pretrained,
    /// A fresh seeded tiny model ([`TinySpec`]) over the tokenizer in `processor`.
    Tiny,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub init: ModelInit,
    /// Folder or Hub id of the pretrained model (init = "pretrained").
    pub path: String,
    /// Folder with tokenizer, chat template and preprocessor config; empty = `path`.
    pub processor: String,
    /// Seed of the tiny model's initialisation.
    pub seed: u64,
    pub tiny: TinySpec,
    pub freeze_vision: bool,
    pub freeze_merger: bool,
    pub freeze_language: bool,
    /// LoRA adapters instead of full fine-tuning (the base is frozen).
    pub lora: Option<LoraConfig>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            init: ModelInit::Pretrained,
            path: String::new(),
            processor: String::new(),
            seed: 0,
            tiny: TinySpec::default(),
            freeze_vision: false,
            freeze_merger: false,
            freeze_language: false,
            lora: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps of the whole run (the schedule's horizon).
    pub max_steps: u64,
    /// Micro-batches per optimizer step; the loss is normalised by the assistant tokens of all
    /// of them together.
    pub grad_accum: u64,
    /// Seed of everything random in training (LoRA dropout masks).
    pub seed: u64,
    /// Consecutive non-finite steps tolerated before exit 65.
    pub max_nonfinite_steps: u64,
    /// Act as if preempted after this many micro-batches of this process: commit a checkpoint
    /// and exit 75 (time-boxed runs, and the resume tests; a value that is not a multiple of
    /// `grad_accum` stops inside an accumulation).
    pub stop_after_micro_batches: Option<u64>,
    /// Fault injection: make the loss of these (1-based) steps NaN, to exercise the skip path.
    pub inject_nonfinite_steps: Vec<u64>,
    /// "none" | "decoder" | "vision" | "all": which stacks keep only their block inputs in the
    /// forward and recompute each block in the backward (one more forward of those blocks, for
    /// most of their activation memory). `omr plan` counts it the same way.
    pub activation_checkpointing: crate::plan::Checkpointing,
    /// With checkpointing on the fused path, recompute each block's attention too. Off (the
    /// default), the first forward keeps every attention's output and row log-sum-exp
    /// (B·T·H·D + B·H·T f32 per block) and the recompute reuses them: one attention forward
    /// less per block (at T 8192 on the 3B shape, about half the recompute's time).
    pub recompute_attention: bool,
    /// With decoder checkpointing, the last N decoder layers keep their activations and are
    /// not recomputed: N layers' recompute saved for N layers' activations. `omr plan` prints
    /// the most that fit the device; "auto" takes that many for the run's device at start-up
    /// (its memory; the CPU's available RAM). 0 (the default): every layer is recomputed.
    pub kept_decoder_layers: crate::plan::KeptLayers,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 1000,
            grad_accum: 1,
            seed: 0,
            max_nonfinite_steps: 5,
            stop_after_micro_batches: None,
            inject_nonfinite_steps: Vec::new(),
            activation_checkpointing: crate::plan::Checkpointing::None,
            recompute_attention: false,
            kept_decoder_layers: crate::plan::KeptLayers::Count(0),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every N optimizer steps (0 = only at the end).
    pub every_steps: u64,
    /// Held-out split, read from the same places as the training sources.
    pub split: String,
    /// Samples scored for the held-out loss.
    pub loss_samples: usize,
    /// Samples answered by greedy generation for accuracy (0 = skip).
    pub generate_samples: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every_steps: 0,
            split: "test".into(),
            loss_samples: 64,
            generate_samples: 64,
            max_new_tokens: 256,
            batch_size: 8,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Export the final model (HF layout + model card) into `<run>/export`.
    pub at_end: bool,
    /// float32 | bfloat16 | float16
    pub dtype: String,
    pub max_shard_size: String,
    /// With LoRA: merge the adapters into the base (a full model) instead of a PEFT adapter.
    pub merge_lora: bool,
    /// Licence of the exported weights (the model card's `license`).
    pub license: String,
    /// Licence of the training data as the dataset card states it.
    pub data_license: String,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            at_end: true,
            dtype: "bfloat16".into(),
            max_shard_size: "5GB".into(),
            merge_lora: false,
            license: "apache-2.0".into(),
            data_license: "cc-by-4.0".into(),
        }
    }
}

impl SftConfig {
    /// Reads `path`, applies `--set` overrides, deserializes and checks the result.
    pub fn load(path: &Path, sets: &[String]) -> Result<SftConfig, ConfigError> {
        load_with_sets(path, sets, Self::from_toml_str)
    }

    pub fn from_toml_str(text: &str, path: &str, sets: &[String]) -> Result<Self, ConfigError> {
        let cfg: SftConfig = parse_with_sets(text, path, sets)?;
        cfg.data.validate(path)?;
        cfg.check().map_err(|message| ConfigError::Invalid {
            path: path.into(),
            message,
        })?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        if self.train.max_steps == 0 {
            return Err("train.max_steps must be at least 1".into());
        }
        if self.train.grad_accum == 0 {
            return Err("train.grad_accum must be at least 1".into());
        }
        if self.checkpoint.keep_last == 0 {
            return Err("checkpoint.keep_last must be at least 1".into());
        }
        self.model.check()
    }

    /// The resolved config as TOML (saved in the run directory and in checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a deserialized config serializes")
    }

    /// Folder holding tokenizer, chat template and preprocessor config.
    pub fn processor_ref(&self) -> &str {
        self.model.processor_ref()
    }
}

impl ModelSection {
    /// Folder holding tokenizer, chat template and preprocessor config: `processor`, else
    /// `path`.
    pub fn processor_ref(&self) -> &str {
        if self.processor.is_empty() {
            &self.path
        } else {
            &self.processor
        }
    }

    /// A pretrained init needs a path; a tiny one needs the processor folder.
    pub fn check(&self) -> Result<(), String> {
        match self.init {
            ModelInit::Pretrained if self.path.is_empty() => Err(
                "model.path is empty: give a model folder or Hub id, or set model.init = \"tiny\""
                    .into(),
            ),
            ModelInit::Tiny if self.processor.is_empty() => Err(
                "model.init = \"tiny\" needs model.processor (a folder with the tokenizer)".into(),
            ),
            _ => Ok(()),
        }
    }
}

/// Reads `path` and hands its text to `parse` (a recipe config's `from_toml_str`).
pub(crate) fn load_with_sets<T>(
    path: &Path,
    sets: &[String],
    parse: impl Fn(&str, &str, &[String]) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: p.clone(),
        source,
    })?;
    parse(&text, &p, sets)
}

/// TOML text with `--set` overrides applied, deserialized (unknown keys named by serde).
pub(crate) fn parse_with_sets<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &str,
    sets: &[String],
) -> Result<T, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.into(),
        message,
    };
    let mut tree: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    for s in sets {
        apply_set(&mut tree, s).map_err(|m| invalid(format!("--set {s}: {m}")))?;
    }
    toml::Value::Table(tree)
        .try_into()
        .map_err(|e: toml::de::Error| invalid(e.to_string()))
}

/// `a.b.c=value` → tree["a"]["b"]["c"] = value (tables created as needed).
fn apply_set(tree: &mut toml::Table, set: &str) -> Result<(), String> {
    let (key, raw) = set
        .split_once('=')
        .ok_or("expected section.key=value".to_string())?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("bad key `{key}`"));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let (last, heads) = parts.split_last().expect("non-empty");
    let mut at = tree;
    let mut i = 0;
    while i < heads.len() {
        let h = heads[i];
        let mut entry = at
            .entry(h.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        // `data.sources.0.path`: an index into an array of tables.
        if let toml::Value::Array(items) = entry {
            let idx: usize = heads
                .get(i + 1)
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| format!("`{h}` is a list: index it, e.g. {h}.0.key"))?;
            let n = items.len();
            entry = items
                .get_mut(idx)
                .ok_or_else(|| format!("`{h}` has {n} entries, no index {idx}"))?;
            i += 1;
        }
        at = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{h}` is not a table"))?;
        i += 1;
    }
    at.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[run]
dir = "runs/x"
[model]
path = "m"
[[data.sources]]
path = "d"
"#;

    #[test]
    fn set_overrides_and_types() {
        let c = SftConfig::from_toml_str(
            MIN,
            "t.toml",
            &[
                "optim.lr=3e-4".into(),
                "train.grad_accum=4".into(),
                "model.path=runs/tiny".into(),
                "data.batch.mode=\"pack\"".into(),
                "data.sources.0.path=elsewhere/d".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 3e-4);
        assert_eq!(c.train.grad_accum, 4);
        assert_eq!(c.model.path, "runs/tiny");
        assert_eq!(c.data.batch.mode, omr_data::collate::CollateMode::Pack);
        assert_eq!(c.data.sources[0].path, Some(PathBuf::from("elsewhere/d")));
        // The resolved config reads back to the same value.
        let again = SftConfig::from_toml_str(&c.to_toml(), "r.toml", &[]).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = SftConfig::from_toml_str(MIN, "t.toml", &["optim.lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lrr"), "{e}");
        let e = SftConfig::from_toml_str(&format!("{MIN}\n[train]\nmax_step = 3\n"), "t.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_step") && e.contains("t.toml"), "{e}");
        let e = SftConfig::from_toml_str(MIN, "t.toml", &["train.max_steps=0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_steps"), "{e}");
    }

    #[test]
    fn presets_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/sft");
        for name in ["tiny.toml", "qwen2.5-vl-7b.toml"] {
            let path = root.join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("# "),
                "{name}: a preset starts with its command"
            );
            SftConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
