//! `RUN/completions.jsonl`: what the policy wrote, one JSON line per completion of the first
//! groups of a step (prompt id, answer, text, length, each reward, total reward, advantage).
//!
//! Notable choices:
//! - Its length is part of the resume state (`GrpoState::completions_bytes`): on resume the
//!   file is cut back to it, as the quarantine is, so a redone step's lines appear once.

use super::sampling::Group;
use crate::error::{Result, TrainError};
use crate::rewards::Reward;
use crate::rollout;
use crate::snapshot::cut_back;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

pub(super) struct CompletionsLog {
    file: File,
    path: PathBuf,
}

impl CompletionsLog {
    /// Opens `path` for appending, cut back to `bytes` (its length at the resumed checkpoint).
    pub fn open(path: PathBuf, bytes: u64) -> Result<Self> {
        cut_back(&path, bytes)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(TrainError::io(&path))?;
        Ok(CompletionsLog { file, path })
    }

    /// The completions of the first `n_groups` of `groups` at `step`; `adv` holds the
    /// advantage of every row of `groups`, in order.
    pub fn write(
        &mut self,
        step: u64,
        groups: &[Group],
        n_groups: usize,
        rewards: &[(Box<dyn Reward>, f64)],
        adv: &[f64],
    ) -> Result<()> {
        let names: Vec<String> = rewards.iter().map(|(r, _)| r.name().to_string()).collect();
        let mut k = 0usize;
        for gr in groups.iter().take(n_groups) {
            for (j, text) in gr.texts.iter().enumerate() {
                let per: BTreeMap<&str, Option<f64>> = names
                    .iter()
                    .zip(&gr.per_reward)
                    .map(|(n, col)| (n.as_str(), col[j]))
                    .collect();
                let rec = serde_json::json!({
                    "step": step,
                    "prompt": gr.prompt.id,
                    "answer": gr.prompt.item.answer,
                    "completion": text,
                    "tokens": gr.completions[j].tokens.len(),
                    "truncated": rollout::truncated(&gr.completions[j]),
                    "rewards": per,
                    "reward": gr.totals[j],
                    "advantage": adv[k + j],
                });
                writeln!(self.file, "{rec}").map_err(TrainError::io(&self.path))?;
            }
            k += gr.texts.len();
        }
        self.file.flush().map_err(TrainError::io(&self.path))
    }

    /// The file's length now (0 when it cannot be read): the resume state's
    /// `completions_bytes`.
    pub fn bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}
