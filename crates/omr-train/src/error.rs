//! Training errors, each with the exit code of RELIABILITY.md it maps to.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A user-supplied input (model folder, processor, data source) cannot be used.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    BadData(omr_data::quarantine::QuarantineError),
    #[error("{count} consecutive steps had a non-finite loss or gradient (last at step {step}); lower the learning rate or check the data (train.max_nonfinite_steps = {count})")]
    NonFinite { step: u64, count: u64 },
    #[error("checkpoint writes keep failing: {0}")]
    Checkpoint(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] omr_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The device could not allocate during training (CUDA's or cuBLAS's allocation failed):
    /// the config does not fit, whatever the plan said; the text says what to change.
    #[error("{0}")]
    OutOfMemory(String),
    #[error("{0}")]
    Internal(String),
    /// A collective of a data-parallel run failed: a peer is gone (exit 1; its own log says
    /// why) or silent past the timeout (exit 67, the watchdog's code).
    #[error("data parallel: {message}")]
    Collective { message: String, timed_out: bool },
}

impl TrainError {
    /// Process exit code (RELIABILITY.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            TrainError::Config(_) | TrainError::Usage(_) | TrainError::OutOfMemory(_) => 2,
            TrainError::BadData(_) => 64,
            TrainError::NonFinite { .. } => 65,
            TrainError::Checkpoint(_) => 66,
            TrainError::Collective {
                timed_out: true, ..
            } => 67,
            _ => 1,
        }
    }

    /// Whether this is a failed device allocation: CUDA's `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS's
    /// `CUBLAS_STATUS_ALLOC_FAILED`, or another layer's "out of memory", reported through candle
    /// (files and configs never give these).
    pub fn is_out_of_memory(&self) -> bool {
        let text = match self {
            TrainError::Model(e) => e.to_string(),
            TrainError::Candle(e) => e.to_string(),
            TrainError::Internal(e) => e.clone(),
            _ => return false,
        };
        text.contains("CUDA_ERROR_OUT_OF_MEMORY")
            || text.contains("CUBLAS_STATUS_ALLOC_FAILED")
            || text.to_ascii_lowercase().contains("out of memory")
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.into();
        move |source| TrainError::Io { path, source }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
