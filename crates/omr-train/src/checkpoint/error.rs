//! Every way a checkpoint save or load can fail, each naming the path and what to do.
//!
//! Save-side errors leave earlier checkpoints untouched (the caller counts them with
//! [`FailureCounter`](super::FailureCounter)); load-side errors describe why one directory was
//! rejected, and become the `reason` strings of [`Loaded::skipped`](super::Loaded).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("config: `{key}` {why}")]
    Config { key: &'static str, why: String },

    #[error("cannot {op} {path}: {source} (check free disk space and permissions)")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("writing the checkpoint files into {dir} failed: {source}; the temporary directory was removed and earlier checkpoints are untouched")]
    Write {
        dir: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("{path} is not a regular file or directory (a symlink or special file); checkpoints may only hold regular files")]
    NotRegularFile { path: PathBuf },

    #[error("{path}: the name cannot be stored in a manifest ({why}); use plain UTF-8 names without `\\` or `:`")]
    BadName { path: PathBuf, why: &'static str },

    #[error("{path}: the name MANIFEST.json is reserved for the checkpoint manifest; write the file under another name")]
    ReservedName { path: PathBuf },

    #[error("{path} is missing: the directory was never committed or was damaged, so it cannot be trusted")]
    ManifestMissing { path: PathBuf },

    #[error("{path} is not a valid manifest ({reason}); the checkpoint is damaged")]
    ManifestInvalid { path: PathBuf, reason: String },

    #[error("{path} has format_version {found}, this build reads version {supported}; load it with the omr version that wrote it")]
    UnsupportedVersion {
        path: PathBuf,
        found: u64,
        supported: u32,
    },

    #[error("{manifest} lists the unsafe path {entry:?} ({why}); manifest paths must be relative and stay inside the checkpoint, refusing to load it")]
    UnsafePath {
        manifest: PathBuf,
        entry: String,
        why: &'static str,
    },

    #[error("{path} is listed in the manifest but missing")]
    FileMissing { path: PathBuf },

    #[error("{path} has {found} bytes but the manifest says {expected}: the file was truncated or modified")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error("{path} has sha256 {found} but the manifest says {expected}: the file is corrupt")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },

    #[error("{dir}: its manifest is for step {found} but its name says step {expected}; it was renamed or tampered with")]
    StepMismatch {
        dir: PathBuf,
        expected: u64,
        found: u64,
    },

    #[error("none of the {} checkpoint(s) under {root} is valid ({}); restore one from a backup, or move {root} away to start from scratch", .rejected.len(), describe(.rejected))]
    NoValidCheckpoint {
        root: PathBuf,
        rejected: Vec<(PathBuf, String)>,
    },

    #[error("{consecutive} consecutive checkpoint saves failed (checkpoint.max_failures = {max}); stopping with exit code 66. Last error: {last}")]
    TooManyFailures {
        consecutive: usize,
        max: usize,
        #[source]
        last: Box<CheckpointError>,
    },
}

fn describe(rejected: &[(PathBuf, String)]) -> String {
    rejected
        .iter()
        .map(|(dir, why)| format!("{}: {why}", dir.display()))
        .collect::<Vec<_>>()
        .join("; ")
}

impl CheckpointError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CheckpointError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
