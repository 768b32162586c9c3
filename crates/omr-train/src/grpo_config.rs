//! The GRPO run config: the same component tables as SFT (`[run]`, `[model]`, `[data]`,
//! `[optim]`, `[schedule]`, `[eval]`, `[checkpoint]`, `[export]`) plus `[grpo]` (rollouts),
//! `[objective]` (the loss, `grpo_loss::ObjectiveConfig`), `[rewards]` and its own `[train]`.
//! Every table is `deny_unknown_fields`; `--set` works as for SFT.
//!
//! One step of the run is one rollout batch: `prompts_per_step` prompts × `group_size`
//! completions, then `num_iterations` optimizer updates on it (TRL's μ). `train.max_steps`
//! counts rollout steps; the schedule's horizon is `max_steps × num_iterations` updates.

use crate::checkpoint::CheckpointConfig;
use crate::config::{
    load_with_sets, parse_with_sets, ConfigError, EvalConfig, ExportConfig, ModelSection, RunConfig,
};
use crate::grpo_loss::ObjectiveConfig;
use crate::optim::OptimConfig;
use crate::rewards::RewardsConfig;
use crate::schedule::ScheduleConfig;
use omr_data::config::DataConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    pub run: RunConfig,
    pub model: ModelSection,
    pub data: DataConfig,
    #[serde(default)]
    pub grpo: GrpoSection,
    #[serde(default)]
    pub objective: ObjectiveConfig,
    #[serde(default)]
    pub rewards: RewardsConfig,
    #[serde(default)]
    pub train: GrpoTrain,
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
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Prompts per rollout step (B).
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// Generation limit in tokens; also dr_grpo's normaliser.
    pub max_completion_length: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// Optimizer updates per rollout batch (μ); above 1 the clip is active.
    pub num_iterations: u64,
    /// Completions per forward/backward (gradient accumulation inside an update).
    pub micro_batch_size: usize,
    /// Rows per generation call.
    pub generation_batch_size: usize,
    /// Drop groups whose rewards are all equal (zero advantage) and sample more prompts.
    pub dynamic_sampling: bool,
    /// Sampling rounds per step with dynamic sampling; a step with fewer full groups trains on
    /// what it has.
    pub max_sampling_rounds: u64,
    /// Write the completions of the first `completions_groups` groups to
    /// `RUN/completions.jsonl` every N steps (0 = never).
    pub completions_every: u64,
    pub completions_groups: usize,
}

impl Default for GrpoSection {
    fn default() -> Self {
        GrpoSection {
            prompts_per_step: 8,
            group_size: 8,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            num_iterations: 1,
            micro_batch_size: 8,
            generation_batch_size: 64,
            dynamic_sampling: false,
            max_sampling_rounds: 3,
            completions_every: 10,
            completions_groups: 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoTrain {
    /// Rollout steps of the run.
    pub max_steps: u64,
    /// Seed of sampling and LoRA dropout (every draw is keyed by seed, step and round).
    pub seed: u64,
    pub max_nonfinite_steps: u64,
    /// Act as if preempted after this many steps of this process (tests, time-boxed runs).
    pub stop_after_steps: Option<u64>,
    /// Fault injection: make the loss of these (1-based) steps NaN.
    pub inject_nonfinite_steps: Vec<u64>,
    /// "none" | "decoder" | "vision" | "all": stacks recomputed in the backward of the
    /// policy update (as in `omr sft`).
    pub activation_checkpointing: crate::plan::Checkpointing,
    /// Recompute the checkpointed blocks' attentions too (as in `omr sft`; off: kept).
    pub recompute_attention: bool,
    /// The last N decoder layers not recomputed (as in `omr sft`; "auto": as many as the
    /// GRPO plan, `plan::input_from_grpo`, finds room for on the run's device).
    pub kept_decoder_layers: crate::plan::KeptLayers,
}

impl Default for GrpoTrain {
    fn default() -> Self {
        GrpoTrain {
            max_steps: 100,
            seed: 0,
            max_nonfinite_steps: 5,
            stop_after_steps: None,
            inject_nonfinite_steps: Vec::new(),
            activation_checkpointing: crate::plan::Checkpointing::None,
            recompute_attention: false,
            kept_decoder_layers: crate::plan::KeptLayers::Count(0),
        }
    }
}

impl GrpoConfig {
    pub fn load(path: &Path, sets: &[String]) -> Result<GrpoConfig, ConfigError> {
        load_with_sets(path, sets, Self::from_toml_str)
    }

    pub fn from_toml_str(text: &str, path: &str, sets: &[String]) -> Result<Self, ConfigError> {
        let mut cfg: GrpoConfig = parse_with_sets(text, path, sets)?;
        cfg.data.validate(path)?;
        cfg.check().map_err(|message| ConfigError::Invalid {
            path: path.into(),
            message,
        })?;
        cfg.objective.max_completion_length = cfg.grpo.max_completion_length;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let g = &self.grpo;
        let o = &self.objective;
        if self.train.max_steps == 0 {
            return Err("train.max_steps must be at least 1".into());
        }
        for (k, v) in [
            ("grpo.prompts_per_step", g.prompts_per_step),
            ("grpo.group_size", g.group_size),
            ("grpo.max_completion_length", g.max_completion_length),
            ("grpo.micro_batch_size", g.micro_batch_size),
            ("grpo.generation_batch_size", g.generation_batch_size),
        ] {
            if v == 0 {
                return Err(format!("{k} must be at least 1"));
            }
        }
        if g.group_size < 2 {
            return Err(
                "grpo.group_size must be at least 2: advantages compare completions of a prompt"
                    .into(),
            );
        }
        if g.num_iterations == 0 || g.max_sampling_rounds == 0 {
            return Err(
                "grpo.num_iterations and grpo.max_sampling_rounds must be at least 1".into(),
            );
        }
        if !(g.temperature > 0.0) {
            return Err(format!(
                "grpo.temperature = {}: GRPO samples, it needs a temperature above 0",
                g.temperature
            ));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(format!("grpo.top_p = {} must be in (0, 1]", g.top_p));
        }
        if o.max_completion_length != ObjectiveConfig::default().max_completion_length
            && o.max_completion_length != g.max_completion_length
        {
            return Err(
                "objective.max_completion_length is taken from grpo.max_completion_length: set only that one"
                    .into(),
            );
        }
        if !(o.epsilon >= 0.0 && o.epsilon < 1.0 && o.epsilon_high >= 0.0) {
            return Err(format!(
                "objective.epsilon = {} must be in [0, 1) and epsilon_high = {} ≥ 0",
                o.epsilon, o.epsilon_high
            ));
        }
        if !(o.beta >= 0.0) {
            return Err(format!("objective.beta = {} must be ≥ 0", o.beta));
        }
        self.rewards.check(g.max_completion_length)?;
        if self.checkpoint.keep_last == 0 {
            return Err("checkpoint.keep_last must be at least 1".into());
        }
        self.model.check()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a deserialized config serializes")
    }

    /// Optimizer updates of the whole run (the schedule's horizon).
    pub fn total_updates(&self) -> u64 {
        self.train.max_steps * self.grpo.num_iterations
    }
}

/// Whether a saved run config (a checkpoint's `config.toml`) is a GRPO one.
pub fn is_grpo_toml(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| {
        t.contains_key("grpo") || t.contains_key("rewards") || t.contains_key("objective")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[run]
dir = "runs/g"
[model]
path = "m"
[[data.sources]]
path = "d"
"#;

    #[test]
    fn defaults_sets_and_round_trip() {
        let c = GrpoConfig::from_toml_str(
            MIN,
            "g.toml",
            &[
                "objective.loss_type=\"bnpo\"".into(),
                "grpo.group_size=4".into(),
                "grpo.max_completion_length=64".into(),
                "rewards.format=0.25".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.objective.loss_type, crate::grpo_loss::LossType::Bnpo);
        assert_eq!(c.objective.max_completion_length, 64);
        assert_eq!(c.rewards.format, 0.25);
        let again = GrpoConfig::from_toml_str(&c.to_toml(), "r.toml", &[]).unwrap();
        assert_eq!(again, c);
        assert!(is_grpo_toml(&c.to_toml()));
    }

    #[test]
    fn bad_values_are_named() {
        for (set, needle) in [
            ("grpo.group_size=1", "group_size"),
            ("grpo.temperature=0", "temperature"),
            ("objective.beta=-1", "beta"),
            ("objective.max_completion_length=7", "max_completion_length"),
            ("objective.loss_typ=\"grpo\"", "loss_typ"),
        ] {
            let e = GrpoConfig::from_toml_str(MIN, "g.toml", &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{set}: {e}");
        }
        let e = GrpoConfig::from_toml_str(
            MIN,
            "g.toml",
            &["rewards.format=0".into(), "rewards.accuracy=0".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nothing to learn"), "{e}");
    }

    #[test]
    fn presets_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/grpo");
        for name in ["tiny.toml", "qwen2.5-vl-7b.toml"] {
            let path = root.join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("# "),
                "{name}: a preset starts with its command"
            );
            GrpoConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
