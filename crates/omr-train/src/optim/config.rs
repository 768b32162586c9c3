//! The `[optim]` config section, the optimizer's error type, and the grouping of trainable
//! parameters into learning-rate / weight-decay groups.
//!
//! Groups are not configured by hand: the learning rate follows the model part a parameter
//! belongs to (`omr_model::Part::of`, from its HF name) and weight decay follows
//! `omr_model::params::decays` (matrices decay; norms, biases and embeddings do not), so the
//! grouping is the same in every recipe and for every architecture.

use candle_core::{DType, Var};
use omr_model::params::{decays, Part};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A config value out of range: `[optim] field = value`.
    #[error("optim.{field} = {value}: {expected}; fix it in the [optim] section of the config")]
    Config {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("optimizer step: {0}")]
    Arg(String),
    #[error("parameter `{name}` is {dtype:?}; the optimizer needs f32 master weights")]
    Dtype { name: String, dtype: DType },
    #[error("gradient of `{name}` has shape {found:?}, the parameter {expected:?}")]
    GradShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("optimizer state has no `{0}`; the checkpoint is incomplete or from another model")]
    MissingState(String),
    #[error(
        "optimizer state `{name}` is {found_dtype:?} {found:?}, expected f32 {expected:?}; the \
         checkpoint is from another model or trainable set"
    )]
    StateShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        found_dtype: DType,
    },
    #[error(
        "optimizer state has `{0}`, which is not a trainable parameter now; resume with the \
         trainable parts (and LoRA settings) the checkpoint was made with"
    )]
    UnexpectedState(String),
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// The `[optim]` section of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate (before the schedule's factor) of every part without its own.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay of matrices; norms, biases and embeddings never decay.
    pub weight_decay: f64,
    /// Global L2 norm the gradients are clipped to; `<= 0` disables clipping.
    pub max_grad_norm: f64,
    /// Absolute peak learning rates per part (`None` = `lr`).
    pub lr_vision: Option<f64>,
    pub lr_merger: Option<f64>,
    pub lr_language: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            lr_vision: None,
            lr_merger: None,
            lr_language: None,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<()> {
        const LR: &str = "a finite learning rate >= 0";
        let lr_ok = |v: f64| v.is_finite() && v >= 0.0;
        let part = |v: Option<f64>| (v.unwrap_or(0.0), v.is_none_or(lr_ok), LR);
        let beta = |b: f64| (b, (0.0..1.0).contains(&b), "a value in [0, 1)");
        let (wd, eps, mg) = (self.weight_decay, self.eps, self.max_grad_norm);
        let checks = [
            ("lr", (self.lr, lr_ok(self.lr), LR)),
            ("lr_vision", part(self.lr_vision)),
            ("lr_merger", part(self.lr_merger)),
            ("lr_language", part(self.lr_language)),
            ("beta1", beta(self.beta1)),
            ("beta2", beta(self.beta2)),
            (
                "eps",
                (eps, eps.is_finite() && eps > 0.0, "a finite value > 0"),
            ),
            ("weight_decay", (wd, lr_ok(wd), "a finite value >= 0")),
            (
                "max_grad_norm",
                (mg, !mg.is_nan(), "a number (<= 0 disables clipping)"),
            ),
        ];
        match checks.into_iter().find(|(_, (_, ok, _))| !ok) {
            Some((field, (v, _, expected))) => Err(OptimError::Config {
                field,
                value: v.to_string(),
                expected,
            }),
            None => Ok(()),
        }
    }

    /// The peak learning rate of a part.
    pub fn lr_of_part(&self, part: Part) -> f64 {
        match part {
            Part::Vision => self.lr_vision,
            Part::Merger => self.lr_merger,
            Part::Language => self.lr_language,
        }
        .unwrap_or(self.lr)
    }
}

/// One trainable parameter and the hyper-parameters of its group.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    /// The f32 master.
    pub var: Var,
    /// Its copy in the compute dtype (mixed precision, `Params::copy_of`): where the
    /// gradient lands, rewritten by each update. `None`: modules use the master itself.
    pub copy: Option<Var>,
    /// Peak learning rate of its group (the schedule multiplies it).
    pub lr: f64,
    pub weight_decay: f64,
}

/// Groups trainable parameters by part (`omr_model::Part::of`, from the HF name) for the
/// learning rate, and by `omr_model::params::decays` for weight decay. Keeps the given order.
pub fn param_specs(trainable: Vec<(String, Var)>, cfg: &OptimConfig) -> Vec<ParamSpec> {
    trainable
        .into_iter()
        .map(|(name, var)| {
            let lr = cfg.lr_of_part(Part::of(&name));
            let weight_decay = if decays(&name, var.dims()) {
                cfg.weight_decay
            } else {
                0.0
            };
            ParamSpec {
                name,
                var,
                copy: None,
                lr,
                weight_decay,
            }
        })
        .collect()
}
