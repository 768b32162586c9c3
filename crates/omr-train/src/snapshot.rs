//! A run's checkpoint contents and how they are written and restored: trainable weights
//! (`weights.safetensors`), optimizer moments (`optimizer.safetensors`), `state.json`
//! ([`SavedState`]: the resume state, the optimizer's step count, the last evaluation) and the
//! resolved `config.toml`, committed through the protocol of `checkpoint`.

use crate::card::EvalResult;
use crate::checkpoint::{self, FailureCounter};
use crate::dist::Group;
use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::setup::{self, Built};
use crate::sft::Resume;
use crate::state::{self, TrainState};
use candle_core::{Device, Tensor};
use omr_data::source::SourceSpec;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// [`commit`] for every rank of `group`: rank 0 commits with every rank's data cursor in the
/// state, and each rank returns once it is committed (so that none reports a stop before the
/// checkpoint exists).
#[allow(clippy::too_many_arguments)]
pub fn commit_on_main(
    group: &mut Group,
    root: &Path,
    keep_last: usize,
    resolved: &str,
    st: &mut TrainState,
    built: &Built,
    opt: &AdamW,
    eval: &[EvalResult],
    failures: &mut FailureCounter,
    must: bool,
) -> Result<()> {
    if group.world() > 1 {
        let all = group.gather_value(&st.stripe)?;
        if group.is_main() {
            st.ranks = all.into_iter().skip(1).collect();
        }
    }
    if group.is_main() {
        commit(
            root, keep_last, resolved, st, built, opt, eval, failures, must,
        )?;
    }
    group.barrier()
}

/// The quarantine file of rank `rank` in `run_dir`: `quarantine.jsonl` for rank 0 (and a
/// single process), `quarantine.rank<R>.jsonl` for the others.
pub fn quarantine_path(run_dir: &Path, rank: usize) -> PathBuf {
    run_dir.join(match rank {
        0 => "quarantine.jsonl".to_string(),
        r => format!("quarantine.rank{r}.jsonl"),
    })
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

/// The checkpoint a run starts from under `resume`: the newest valid one (`Auto`), the one
/// named (`From`, verified), or none (`Never`, which refuses a run directory that has some).
pub fn resume_dir(resume: &Resume, ckpt_root: &Path, run_dir: &Path) -> Result<Option<PathBuf>> {
    match resume {
        Resume::Never => {
            if !checkpoint::list(ckpt_root).is_empty() {
                return Err(TrainError::Usage(format!(
                    "{} already has checkpoints: pass --resume auto to continue it, or choose another run.dir",
                    run_dir.display()
                )));
            }
            Ok(None)
        }
        Resume::Auto => Ok(checkpoint::load_latest(ckpt_root)
            .map_err(|e| TrainError::Usage(e.to_string()))?
            .map(|l| l.dir)),
        Resume::From(dir) => {
            checkpoint::verify(dir).map_err(|e| TrainError::Usage(e.to_string()))?;
            Ok(Some(dir.clone()))
        }
    }
}

/// Refuses to resume from `ckpt` when the processor files changed since it was written,
/// unless `allow` (`--allow-processor-change`).
pub fn check_processor(
    saved: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
    allow: bool,
    processor_dir: &Path,
    ckpt: &Path,
) -> Result<()> {
    let changed = state::changed_files(saved, now);
    if !changed.is_empty() && !allow {
        return Err(TrainError::Usage(format!(
            "{}: {} changed since the checkpoint in {}; resuming would change the data. \
             Pass --allow-processor-change to resume anyway",
            processor_dir.display(),
            changed.join(", "),
            ckpt.display()
        )));
    }
    Ok(())
}

/// Cuts an append-only run log (quarantine, completions) back to its length at the
/// checkpoint (0 for a fresh run): records after it are written again, not twice.
pub fn cut_back(path: &Path, len: u64) -> Result<()> {
    if path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(len))
            .map_err(TrainError::io(path))?;
    }
    Ok(())
}
