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
    /// Loader position where step `step + 1` starts.
    pub loader: LoaderState,
    /// Steps skipped because the loss or a gradient was not finite, and the current streak.
    pub skipped_steps: u64,
    pub nonfinite_streak: u64,
    /// Data quarantine counters (good records seen, bad records, bad by reason).
    pub data_seen: u64,
    pub data_bad: u64,
    pub data_bad_by_reason: BTreeMap<String, u64>,
    /// Length of the run's `quarantine.jsonl` at this point: a resumed run cuts the file back
    /// to it, so records read again after the resume are not listed twice.
    #[serde(default)]
    pub quarantine_bytes: u64,
    /// Training tokens and samples consumed so far.
    pub tokens: u64,
    pub samples: u64,
    /// Hashes of the files that turn data into tokens and pixels; resuming with other files
    /// would silently change the data, so it is refused unless asked for.
    pub processor: BTreeMap<String, String>,
    /// Data-parallel runs: the data cursor and counters of ranks 1, 2, … (rank 0's are the
    /// fields above), gathered by rank 0 for each checkpoint. Empty for one process.
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
            loader,
            skipped_steps: 0,
            nonfinite_streak: 0,
            data_seen: 0,
            data_bad: 0,
            data_bad_by_reason: BTreeMap::new(),
            quarantine_bytes: 0,
            tokens: 0,
            samples: 0,
            processor,
            ranks: Vec::new(),
            grpo: None,
        }
    }

    /// This process's own part of the state (its data stripe's cursor and counters).
    pub fn rank_data(&self) -> RankData {
        RankData {
            loader: self.loader.clone(),
            data_seen: self.data_seen,
            data_bad: self.data_bad,
            data_bad_by_reason: self.data_bad_by_reason.clone(),
            quarantine_bytes: self.quarantine_bytes,
        }
    }

    /// Takes `d` as this process's own part (a rank other than 0 resuming).
    pub fn set_rank_data(&mut self, d: RankData) {
        self.loader = d.loader;
        self.data_seen = d.data_seen;
        self.data_bad = d.data_bad;
        self.data_bad_by_reason = d.data_bad_by_reason;
        self.quarantine_bytes = d.quarantine_bytes;
    }
}

/// What each process of a data-parallel run keeps apart: where its stripe of the data is, and
/// what its quarantine saw (its own `quarantine.rank<R>.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankData {
    pub loader: LoaderState,
    pub data_seen: u64,
    pub data_bad: u64,
    pub data_bad_by_reason: BTreeMap<String, u64>,
    pub quarantine_bytes: u64,
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
