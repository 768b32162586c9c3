//! What can stop an evaluation, each naming the file, record or setting to fix.

use crate::judge::JudgeError;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Bad data or a data path that cannot be read: a usage error (exit 2).
    #[error(transparent)]
    Source(#[from] omr_data::source::SourceError),
    #[error("{dir}: cannot build the processor (tokenizer, chat template, preprocessor_config.json): {detail}")]
    Processor { dir: String, detail: String },
    #[error("model {model}: {source}")]
    ModelLoad {
        model: String,
        source: omr_model::ModelError,
    },
    #[error(transparent)]
    Model(#[from] omr_model::ModelError),
    #[error(transparent)]
    Judge(#[from] JudgeError),
    #[error("{data} (split {split}): no usable multiple-choice items{skipped}")]
    NoItems {
        data: String,
        split: String,
        skipped: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Internal(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl EvalError {
    /// Errors the user fixes by changing an argument, a file or a setting (exit code 2).
    pub fn is_usage(&self) -> bool {
        match self {
            EvalError::Source(_)
            | EvalError::Processor { .. }
            | EvalError::NoItems { .. }
            | EvalError::ModelLoad { .. }
            | EvalError::Usage(_) => true,
            EvalError::Judge(e) => matches!(e, JudgeError::Config(_)),
            EvalError::Model(_) | EvalError::Io { .. } | EvalError::Internal(_) => false,
        }
    }
}
