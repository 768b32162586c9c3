//! The one error type of the model crate. Every variant a user can cause names the file or
//! tensor involved and what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A config that parses but cannot be built (unsupported model type, inconsistent dims).
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: cannot read safetensors: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{dir}: missing tensor `{name}`{hint}")]
    MissingTensor {
        dir: PathBuf,
        name: String,
        hint: String,
    },
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?} in {path}")]
    BadShape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{dir}: no model weights (looked for model.safetensors, model.safetensors.index.json, or a \
         single *.safetensors file; found {found}); point at a folder written by save_pretrained \
         or by `omr export`"
    )]
    NoWeights { dir: PathBuf, found: String },
    #[error(
        "{index}: shard `{shard}` is missing from {dir}; the download or copy is incomplete: fetch \
         the model again"
    )]
    MissingShard {
        index: PathBuf,
        dir: PathBuf,
        shard: String,
    },
    #[error(
        "tensor `{name}` is in both {first} and {second} (names compared after mapping \
         transformers 5.x names to canonical ones); remove the stray file or fix the index"
    )]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{0}")]
    Hub(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        ModelError::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
