//! A run's checkpoint contents and how they are written and restored: trainable weights
//! (`weights.safetensors`), optimizer moments (`optimizer.safetensors`), `state.json`
//! ([`SavedState`]: the resume state, the optimizer's step count, the last evaluation) and the
//! resolved `config.toml`, committed through the protocol of `checkpoint`.

use crate::card::EvalResult;
use crate::checkpoint::{self, FailureCounter};
use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::setup::{self, Built};
use crate::state::TrainState;
use candle_core::{Device, Tensor};
use omr_data::source::SourceSpec;
use std::collections::HashMap;
use std::path::Path;

/// Commits a checkpoint of the state after `st.step`. `must` (final or preemption save): a
/// failure is fatal (exit 66) instead of counted.
#[allow(clippy::too_many_arguments)]
pub fn commit(
    root: &Path,
    keep_last: usize,
    resolved: &str,
    st: &TrainState,
    built: &Built,
    opt: &AdamW,
    eval: &[EvalResult],
    failures: &mut FailureCounter,
    must: bool,
) -> Result<()> {
    let state_json = serde_json::to_string_pretty(&SavedState {
        train: st.clone(),
        optimizer_steps: opt.steps(),
        eval: eval.iter().map(|r| (r.metric.clone(), r.value)).collect(),
    })
    .map_err(|e| TrainError::Internal(e.to_string()))?;
    let result = checkpoint::save(
        root,
        st.step,
        keep_last,
        |dir: &Path| -> std::result::Result<(), candle_core::Error> {
            let weights: HashMap<String, Tensor> = setup::trainable_tensors(&built.params)
                .into_iter()
                .collect();
            candle_core::safetensors::save(&weights, dir.join("weights.safetensors"))?;
            let moments: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
            candle_core::safetensors::save(&moments, dir.join("optimizer.safetensors"))?;
            std::fs::write(dir.join("state.json"), &state_json)?;
            std::fs::write(dir.join("config.toml"), resolved)?;
            Ok(())
        },
    );
    if must {
        let dir = result.map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        tracing::info!("checkpoint {}", dir.display());
        return Ok(());
    }
    match failures.record(result) {
        Ok(Some(dir)) => tracing::debug!("checkpoint {}", dir.display()),
        Ok(None) => {}
        Err(e) => return Err(TrainError::Checkpoint(e.to_string())),
    }
    Ok(())
}

/// `state.json` of a checkpoint.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub train: TrainState,
    pub optimizer_steps: u64,
    /// The last evaluation (metric, value), for the model card of `omr export`.
    pub eval: Vec<(String, f64)>,
}

/// Restores weights and optimizer moments from a verified checkpoint dir; returns its state.
pub fn load_checkpoint(
    dir: &Path,
    built: &Built,
    opt: &mut AdamW,
    device: &Device,
) -> Result<SavedState> {
    let saved = read_saved_state(dir)?;
    setup::restore_trainable(&built.params, &dir.join("weights.safetensors"), device)?;
    let moments: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    opt.load_state(&moments, saved.optimizer_steps)
        .map_err(|e| TrainError::Usage(format!("{}: {e}", dir.display())))?;
    Ok(saved)
}

/// The (metric, value) pairs of `state.json` as model-card eval rows.
pub fn eval_rows(sources: &[SourceSpec], split: &str, saved: &[(String, f64)]) -> Vec<EvalResult> {
    let dataset = sources
        .first()
        .map(|s| s.display_name())
        .unwrap_or_default();
    saved
        .iter()
        .map(|(metric, value)| EvalResult {
            task: "visual-question-answering".into(),
            dataset: dataset.clone(),
            split: split.to_string(),
            metric: metric.clone(),
            value: *value,
        })
        .collect()
}

pub fn read_saved_state(dir: &Path) -> Result<SavedState> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(TrainError::io(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Usage(format!("{}: {e}", path.display())))
}
