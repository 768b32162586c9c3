//! Parameter counts of the plan: the model's tensors by part, what trains, LoRA's adapters.

use super::PlanInput;
use omr_model::config::ModelConfig;
use omr_model::lora::{self, LoraConfig};
use omr_model::params::{param_shapes, Part};

/// (module, (out, in)) of every linear layer that `lora` adapts.
pub(super) fn lora_modules<'a>(
    cfg: &ModelConfig,
    l: &'a LoraConfig,
) -> impl Iterator<Item = (String, (usize, usize))> + 'a {
    lora::linear_modules(cfg)
        .into_iter()
        .filter(move |(n, _)| lora::selects(&l.targets, n))
}

/// Parameter counts by role.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamCounts {
    pub total: u64,
    /// Base parameters that train (full fine-tuning of their part).
    pub trainable: u64,
    /// LoRA A and B (all trainable).
    pub lora: u64,
    /// Largest trainable tensor (the AdamW step's temporaries scale with it).
    pub largest_trainable: u64,
    pub vision: u64,
    pub merger: u64,
    pub language: u64,
}

/// Every tensor of `p.model` counted by part, and what trains under `p`.
pub fn count_params(p: &PlanInput) -> ParamCounts {
    let mut c = ParamCounts::default();
    for (name, shape) in param_shapes(&p.model) {
        let n: u64 = shape.iter().map(|&x| x as u64).product();
        c.total += n;
        let part = Part::of(&name);
        match part {
            Part::Vision => c.vision += n,
            Part::Merger => c.merger += n,
            Part::Language => c.language += n,
        }
        let trains = p.lora.is_none()
            && match part {
                Part::Vision => p.trainable.vision,
                Part::Merger => p.trainable.merger,
                Part::Language => p.trainable.language,
            };
        if trains {
            c.trainable += n;
            c.largest_trainable = c.largest_trainable.max(n);
        }
    }
    if let Some(l) = &p.lora {
        for (_, (out, inp)) in lora_modules(&p.model, l) {
            let (a, b) = ((l.r * inp) as u64, (out * l.r) as u64);
            c.lora += a + b;
            c.largest_trainable = c.largest_trainable.max(a.max(b));
        }
    }
    c
}
