//! The checkpoint commit protocol of RELIABILITY.md, around a directory of files.
//!
//! This module knows nothing about what a checkpoint holds: the trainer writes its files
//! (weights, optimizer state, resume state, resolved config…) into a directory handed to it by
//! [`save`], and this module makes that directory appear all at once or not at all:
//!
//! ```text
//! <run_dir>/checkpoints/
//!   step-000100/            committed: MANIFEST.json lists {path, bytes, sha256} of each file
//!   step-000200/
//!   step-000300.tmp-<id>/   a save in progress, or left by a crash: swept by the next save
//!   step-000200.old-<id>/   a committed dir being replaced by a re-save of the same step
//!   step-000900.abandoned-<id>/  newer than a step saved after resuming an older one: kept
//!                           aside for the user, never loaded
//!   latest                  "step-000200": a hint only, loading scans the step dirs
//! ```
//!
//! Notable choices:
//! - The manifest is written last and the directory renamed into place only after every file
//!   and the manifest are fsynced, so a kill or a full disk never leaves a torn `step-*` dir.
//! - [`load_latest`] verifies sizes and hashes of every listed file and falls back to the
//!   previous checkpoint when one is damaged, saying so; it fails (rather than silently starting
//!   from scratch) when checkpoints exist but none is valid.
//! - Directories are removed by renaming them to a `*.tmp-*` name first, so a removal cut short
//!   leaves a leftover the next save sweeps, never a half-deleted `step-*` dir.
//! - One writer per root: rank 0 commits, and a save sweeps every `*.tmp-*` it finds.

mod durable;
mod error;
mod layout;
mod load;
mod manifest;
mod policy;
mod save;

pub use error::CheckpointError;
pub use layout::{list, step_dir_name, LATEST_FILE};
pub use load::{load_latest, Loaded};
pub use manifest::{verify, FileEntry, Manifest, FORMAT_VERSION, MANIFEST_FILE};
pub use policy::{FailureCounter, EXIT_CODE_CHECKPOINT_FAILING};
pub use save::save;

use serde::{Deserialize, Serialize};

/// The `[checkpoint]` section of a run config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many optimizer steps; 0 saves only at the end and on preemption.
    pub every_steps: u64,
    /// Committed checkpoints kept on disk (the newest ones); at least 1.
    pub keep_last: usize,
    /// Consecutive failed saves tolerated; the next one stops the run with exit code 66.
    pub max_failures: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_steps: 1000,
            keep_last: 3,
            max_failures: 3,
        }
    }
}

impl CheckpointConfig {
    /// Start-up check, so a bad value fails before any compute is spent.
    pub fn validate(&self) -> Result<(), CheckpointError> {
        if self.keep_last == 0 {
            return Err(CheckpointError::Config {
                key: "checkpoint.keep_last",
                why: "must be at least 1 (the checkpoint just written is always kept)".into(),
            });
        }
        if self.max_failures == 0 {
            return Err(CheckpointError::Config {
                key: "checkpoint.max_failures",
                why: "must be at least 1 (the number of consecutive failed saves tolerated)".into(),
            });
        }
        Ok(())
    }

    /// Whether a periodic save is due after optimizer step `step` (1-based).
    pub fn is_due(&self, step: u64) -> bool {
        self.every_steps > 0 && step > 0 && step.is_multiple_of(self.every_steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_validate_and_due() {
        let c = CheckpointConfig::default();
        c.validate().unwrap();
        assert!(c.is_due(1000) && !c.is_due(999) && !c.is_due(0));
        let never = CheckpointConfig {
            every_steps: 0,
            ..c.clone()
        };
        assert!(!never.is_due(1000));
        let bad = CheckpointConfig {
            keep_last: 0,
            ..c.clone()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("checkpoint.keep_last"), "{msg}");
        let parsed: Result<CheckpointConfig, _> = serde_json::from_str(r#"{"keep_lst": 2}"#);
        assert!(parsed.is_err(), "unknown keys are rejected");
        let partial: CheckpointConfig = serde_json::from_str(r#"{"keep_last": 2}"#).unwrap();
        assert_eq!(partial.max_failures, 3);
    }
}
