//! The one struct holding everything that changes a run's trajectory besides the tensors
//! (RELIABILITY.md "Resume state"), saved as `state.json` in every checkpoint.
//!
//! Tensors travel next to it: trainable weights (`weights.safetensors`) and optimizer moments
//! (`optimizer.safetensors`). There is no RNG state to save: every random draw of a step is
//! keyed by `(train.seed, step, micro-batch)` (LoRA dropout) or lives in the loader state
//! (shuffle), so restoring the counters restores the randomness. The data cursor is the loader
//! state *at the start of the next optimizer step*: a run stopped inside gradient accumulation
//! discards its partial micro-batches and redoes them after resume, which keeps resumption
//! exact without saving half-accumulated gradients.

use omr_data::loader::LoaderState;
use omr_data::quarantine::Quarantine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

pub const STATE_FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    /// Optimizer steps taken (skipped non-finite steps included).
    pub step: u64,
    /// This process's stripe of the data (its fields stand in `state.json` beside the others).
    #[serde(flatten)]
    pub stripe: RankData,
    /// Steps skipped because the loss or a gradient was not finite, and the current streak.
    pub skipped_steps: u64,
    pub nonfinite_streak: u64,
    /// Training tokens and samples consumed so far.
    pub tokens: u64,
    pub samples: u64,
    /// Hashes of the files that turn data into tokens and pixels; resuming with other files
    /// would silently change the data, so it is refused unless asked for.
    pub processor: BTreeMap<String, String>,
    /// Data-parallel runs: the stripes of ranks 1, 2, … (rank 0's is `stripe`), gathered by
    /// rank 0 for each checkpoint. Empty for one process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranks: Vec<RankData>,
    /// What only GRPO runs carry (absent in SFT checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpo: Option<GrpoState>,
}

/// The GRPO part of the resume state. The prompt cursor is `TrainState::loader`; sampling has no
/// RNG state to save because every draw is keyed by (seed, step, round, chunk, row).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpoState {
    /// Optimizer updates so far (`num_iterations` per step; the schedule's position).
    pub updates: u64,
    /// sha256 of the frozen reference model's weights when `objective.beta > 0`: a resumed run
    /// must compare against the same reference it started with.
    pub reference: Option<String>,
    /// Length of `completions.jsonl` at this point (cut back on resume, like the quarantine).
    pub completions_bytes: u64,
    /// Groups dropped: no reward could score a completion, or (dynamic sampling) no variance.
    pub groups_unscored: u64,
    pub groups_zero_std: u64,
    /// Per reward: completions it could not score, over the run.
    pub reward_failures: BTreeMap<String, u64>,
}

impl TrainState {
    pub fn fresh(loader: LoaderState, processor: BTreeMap<String, String>) -> TrainState {
        TrainState {
            format: STATE_FORMAT,
            step: 0,
            stripe: RankData {
                loader,
                data_seen: 0,
                data_bad: 0,
                data_bad_by_reason: BTreeMap::new(),
                quarantine_bytes: 0,
            },
            skipped_steps: 0,
            nonfinite_streak: 0,
            tokens: 0,
            samples: 0,
            processor,
            ranks: Vec::new(),
            grpo: None,
        }
    }
}

/// What each process keeps apart (one in a single-process run): where its stripe of the data
/// is, and what its quarantine saw (`quarantine.jsonl`, or `quarantine.rank<R>.jsonl` for
/// rank R > 0 of a data-parallel run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankData {
    /// Loader position where step `step + 1` starts.
    pub loader: LoaderState,
    /// Data quarantine counters (good records seen, bad records, bad by reason).
    pub data_seen: u64,
    pub data_bad: u64,
    pub data_bad_by_reason: BTreeMap<String, u64>,
    /// Length of the quarantine file at this point: a resumed run cuts the file back to it, so
    /// records read again after the resume are not listed twice.
    #[serde(default)]
    pub quarantine_bytes: u64,
}

impl RankData {
    /// Gives `q` the counters of this state (a resume).
    pub fn restore_counters(&self, q: &mut Quarantine) {
        q.seen = self.data_seen;
        q.bad = self.data_bad;
        q.by_reason = self.data_bad_by_reason.clone();
    }

    /// After a step: the loader at `loader`, `q`'s counters, and the length of `q`'s file
    /// `qpath` once flushed.
    pub fn record(&mut self, loader: LoaderState, q: &mut Quarantine, qpath: &Path) {
        self.loader = loader;
        self.data_seen = q.seen;
        self.data_bad = q.bad;
        self.data_bad_by_reason = q.by_reason.clone();
        q.flush();
        self.quarantine_bytes = std::fs::metadata(qpath).map_or(0, |m| m.len());
    }
}

/// Files of a processor folder that decide tokens and pixels.
pub const PROCESSOR_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
];

/// sha256 of each processor file that exists in `dir`.
pub fn processor_hashes(dir: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for name in PROCESSOR_FILES {
        let p = dir.join(name);
        if p.is_file() {
            let bytes = std::fs::read(&p)?;
            out.insert(name.to_string(), hex::encode(Sha256::digest(&bytes)));
        }
    }
    Ok(out)
}

/// Names of the processor files whose hash differs between a checkpoint and now.
pub fn changed_files(
    saved: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut names: Vec<&String> = saved.keys().chain(now.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| saved.get(*n) != now.get(*n))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stripe's fields stand in `state.json` beside the others, as before it was a struct
    /// of its own, and a state written before `quarantine_bytes` existed still loads.
    #[test]
    fn the_stripe_is_flat_in_state_json() {
        let loader = LoaderState {
            seed: 3,
            rank: 0,
            world: 1,
            sources: Vec::new(),
        };
        let st = TrainState::fresh(loader, BTreeMap::new());
        let v = serde_json::to_value(&st).unwrap();
        for key in [
            "loader",
            "data_seen",
            "data_bad",
            "data_bad_by_reason",
            "quarantine_bytes",
        ] {
            assert!(v.get(key).is_some(), "{key} missing: {v}");
        }
        assert!(v.get("stripe").is_none() && v.get("ranks").is_none(), "{v}");
        let mut old = v.clone();
        old.as_object_mut().unwrap().remove("quarantine_bytes");
        let back: TrainState = serde_json::from_value(old).unwrap();
        assert_eq!(back, st);
    }
}
