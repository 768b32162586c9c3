//! GRPO's frozen reference model, the other end of the k3 KL term: the run's initial weights,
//! built again from the same `[model]` section, never trained.
//!
//! Notable choices:
//! - It is identified by a hash of its weights, kept in the resume state: a resumed run whose
//!   reference differs (another model.path, beta switched on or off) would silently optimise
//!   another objective, so it is refused.

use crate::error::{Result, TrainError};
use crate::grpo_config::GrpoConfig;
use crate::runtime::Runtime;
use crate::setup::{self, Built};
use candle_core::{Device, Tensor};
use omr_model::model::Qwen2VL;
use sha2::{Digest, Sha256};
use std::path::Path;

/// The frozen reference and its weights' identity; None when `objective.beta` is 0 (no KL).
pub(super) fn build(
    cfg: &GrpoConfig,
    rt: &Runtime,
    device: &Device,
) -> Result<Option<(Qwen2VL, String)>> {
    if cfg.objective.beta > 0.0 {
        let mut r = setup::build(&cfg.model, cfg.train.seed, device)?;
        r.params.set_trainable(|_| true, false);
        let id = weights_identity(&r)?;
        rt.prepare(&mut r.params)?;
        Ok(Some((r.model(rt)?, id)))
    } else {
        Ok(None)
    }
}

/// Refuses to resume checkpoint `dir`, trained against reference `saved`, with reference `now`.
pub(super) fn check_unchanged(saved: Option<&str>, now: Option<&str>, dir: &Path) -> Result<()> {
    if saved != now {
        return Err(TrainError::Usage(format!(
            "the reference model differs from the one {} was trained against \
             (checkpoint {:?}, now {:?}): model.path or objective.beta changed; \
             start a new run.dir instead",
            dir.display(),
            saved.unwrap_or("none"),
            now.unwrap_or("none"),
        )));
    }
    Ok(())
}

/// sha256 over the names, shapes and bytes of every weight, in name order.
fn weights_identity(built: &Built) -> Result<String> {
    let mut named: Vec<(&str, Tensor)> = built
        .params
        .iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, t) in named {
        h.update(name.as_bytes());
        h.update(format!("{:?}", t.dims()).as_bytes());
        let v: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}
