//! Learning-rate schedules: a multiplier in [0, 1] of each group's peak learning rate, as a
//! pure function of the optimizer step, so resuming needs no scheduler state.
//!
//! Each kind is transformers' `lr_lambda` (optimization.py, 4.57) to the bit, with linear
//! warmup from 0 (`step / warmup`), 0-based steps as torch's `LambdaLR` passes them:
//! - `constant`: `get_constant_schedule_with_warmup`;
//! - `linear`: `get_linear_schedule_with_warmup`, which decays to 0; with `min_lr_ratio > 0`
//!   it decays to `min_lr_ratio` instead (`f·(1-r) + r`, our extension, as the cosine one);
//! - `cosine`: `get_cosine_schedule_with_warmup`, or `get_cosine_with_min_lr_schedule_with_
//!   warmup(min_lr_rate)` when `min_lr_ratio > 0`;
//! - `wsd`: `get_wsd_schedule` with linear warmup: warmup, stable at 1, then a decay of
//!   `round(total · decay_ratio)` steps to `min_lr_ratio` (shape `decay_type`). transformers
//!   starts its wsd warmup at `min_lr_ratio`, not 0, and so do we.
//!
//! Warmup length is `warmup_steps`, or when that is 0, `ceil(total · warmup_ratio)` as
//! transformers' `TrainingArguments.get_warmup_steps` (with its float rounding: 0.07 · 100
//! gives 8). Past `total_steps` the cosine holds its final value instead of rising again.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
    Wsd,
}

/// Shape of the wsd decay phase (transformers' `decay_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecayType {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    /// `1 - sqrt(progress)`, the cooldown of the WSD papers.
    #[serde(rename = "1-sqrt")]
    OneSqrt,
}

/// The `[schedule]` section of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// Fraction of the total steps spent warming up; used when `warmup_steps == 0`.
    pub warmup_ratio: f64,
    /// Final learning rate as a fraction of the peak (linear, cosine, wsd).
    pub min_lr_ratio: f64,
    /// wsd: fraction of the total steps in the final decay.
    pub decay_ratio: f64,
    /// wsd: shape of the final decay.
    pub decay_type: DecayType,
    /// cosine (and a cosine wsd decay): number of waves; 0.5 is a half cosine from 1 to min.
    pub num_cycles: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_steps: 0,
            warmup_ratio: 0.03,
            min_lr_ratio: 0.0,
            decay_ratio: 0.1,
            decay_type: DecayType::Cosine,
            num_cycles: 0.5,
        }
    }
}

/// A `[schedule]` value out of range.
#[derive(Debug, thiserror::Error)]
#[error("schedule.{field} = {value}: expected {expected}; fix it in the [schedule] section")]
pub struct ScheduleError {
    pub field: &'static str,
    pub value: f64,
    pub expected: &'static str,
}

impl ScheduleConfig {
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let unit = |field, value: f64| (field, value, (0.0..=1.0).contains(&value), "[0, 1]");
        let cycles = self.num_cycles;
        let checks = [
            unit("warmup_ratio", self.warmup_ratio),
            unit("min_lr_ratio", self.min_lr_ratio),
            unit("decay_ratio", self.decay_ratio),
            (
                "num_cycles",
                cycles,
                cycles.is_finite() && cycles >= 0.0,
                "a finite value >= 0",
            ),
        ];
        match checks.into_iter().find(|c| !c.2) {
            Some((field, value, _, expected)) => Err(ScheduleError {
                field,
                value,
                expected,
            }),
            None => Ok(()),
        }
    }

    /// Warmup length of a run of `total_steps` optimizer steps.
    pub fn warmup(&self, total_steps: u64) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (total_steps as f64 * self.warmup_ratio).ceil() as u64
        }
    }

    /// The multiplier at optimizer step `step` (0-based) of `total_steps`: in [0, 1] for a
    /// config that passes [`ScheduleConfig::validate`].
    pub fn factor(&self, step: u64, total_steps: u64) -> f64 {
        let warmup = self.warmup(total_steps);
        let min = self.min_lr_ratio;
        let to_min = |f: f64| f * (1.0 - min) + min;
        match self.kind {
            ScheduleKind::Constant => warmup_factor(step, warmup).unwrap_or(1.0),
            ScheduleKind::Linear => warmup_factor(step, warmup).unwrap_or_else(|| {
                let left = total_steps as f64 - step as f64;
                let f = (left / total_steps.saturating_sub(warmup).max(1) as f64).max(0.0);
                if min > 0.0 {
                    to_min(f)
                } else {
                    f
                }
            }),
            ScheduleKind::Cosine => warmup_factor(step, warmup).unwrap_or_else(|| {
                let step = step.min(total_steps.max(warmup));
                let progress =
                    (step - warmup) as f64 / total_steps.saturating_sub(warmup).max(1) as f64;
                let f = 0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress).cos());
                to_min(f).max(0.0)
            }),
            ScheduleKind::Wsd => {
                let decay = (total_steps as f64 * self.decay_ratio).round() as u64;
                let stable = total_steps.saturating_sub(warmup).saturating_sub(decay);
                if let Some(f) = warmup_factor(step, warmup) {
                    return to_min(f).max(0.0);
                }
                if step < warmup.saturating_add(stable) {
                    return 1.0;
                }
                if step >= warmup.saturating_add(stable).saturating_add(decay) {
                    return min;
                }
                let progress = (step - warmup - stable) as f64 / decay.max(1) as f64;
                let f = match self.decay_type {
                    DecayType::Linear => 1.0 - progress,
                    DecayType::Cosine => {
                        0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress).cos())
                    }
                    DecayType::OneSqrt => 1.0 - progress.sqrt(),
                };
                to_min(f).max(0.0)
            }
        }
    }
}

/// `Some(step / warmup)` during warmup, `None` after it.
fn warmup_factor(step: u64, warmup: u64) -> Option<f64> {
    (step < warmup).then(|| step as f64 / warmup.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' lr_lambdas at every step of a 100-step run
    /// (tests/fixtures/optim/README.md).
    #[test]
    fn schedule_matches_transformers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/optim/schedules.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let cases: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).unwrap();
        assert_eq!(cases.len(), 10);
        let mut max_diff = 0f64;
        for (name, case) in cases {
            let cfg: ScheduleConfig = serde_json::from_value(case["config"].clone()).unwrap();
            cfg.validate().unwrap();
            let total = case["total_steps"].as_u64().unwrap();
            let want = case["factors"].as_array().unwrap();
            assert_eq!(want.len() as u64, total + 1);
            for (step, w) in want.iter().enumerate() {
                let (got, w) = (cfg.factor(step as u64, total), w.as_f64().unwrap());
                assert!((got - w).abs() <= 1e-12, "{name} step {step}: {got} vs {w}");
                max_diff = max_diff.max((got - w).abs());
                assert!((0.0..=1.0).contains(&got), "{name} step {step}: {got}");
            }
        }
        eprintln!("max |ours - transformers| = {max_diff:e}");
    }

    #[test]
    fn schedule_edges() {
        let cosine = ScheduleConfig {
            warmup_steps: 10,
            ..Default::default()
        };
        // Past the end the cosine stays at its final value instead of rising again.
        assert_eq!(cosine.factor(150, 100), cosine.factor(100, 100));
        // No panics on degenerate runs.
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
            ScheduleKind::Wsd,
        ] {
            let cfg = ScheduleConfig {
                kind,
                ..cosine.clone()
            };
            for (step, total) in [
                (0, 0),
                (5, 0),
                (0, 1),
                (20, 5),
                (u64::MAX, 3),
                (7, u64::MAX),
            ] {
                let f = cfg.factor(step, total);
                assert!((0.0..=1.0).contains(&f), "{kind:?} {step}/{total}: {f}");
            }
        }
        let huge = ScheduleConfig {
            kind: ScheduleKind::Wsd,
            warmup_steps: u64::MAX,
            ..Default::default()
        };
        assert_eq!(huge.factor(u64::MAX, 10), huge.min_lr_ratio);
        // warmup_ratio is used only without warmup_steps.
        let ratio = ScheduleConfig {
            warmup_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(ratio.warmup(50), 5);
        assert_eq!(cosine.warmup(50), 10);
    }

    #[test]
    fn schedule_config_serde_and_validation() {
        let cfg: ScheduleConfig =
            toml::from_str("kind = \"wsd\"\ndecay_type = \"1-sqrt\"\nwarmup_steps = 5").unwrap();
        assert_eq!(cfg.kind, ScheduleKind::Wsd);
        assert_eq!(cfg.decay_type, DecayType::OneSqrt);
        assert_eq!(cfg.decay_ratio, 0.1);
        assert!(toml::from_str::<ScheduleConfig>("warmup = 5").is_err());
        assert!(toml::from_str::<ScheduleConfig>("kind = \"Cosine\"").is_err());
        let bad = ScheduleConfig {
            min_lr_ratio: 1.5,
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("schedule.min_lr_ratio = 1.5"), "{err}");
        let nan = ScheduleConfig {
            num_cycles: f64::NAN,
            ..Default::default()
        };
        assert_eq!(nan.validate().unwrap_err().field, "num_cycles");
    }
}
