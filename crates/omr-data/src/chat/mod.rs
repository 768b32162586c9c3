//! Chat: conversation → template text → token ids and a loss mask.
//!
//! - [`template`]: loads a model's chat template and renders it exactly as transformers'
//!   `apply_chat_template(…, tokenize=False)` does (checked byte for byte against
//!   transformers in `tests/chat_parity.rs`).
//! - [`encode`]: renders, tokenizes, labels each assistant turn's content and end-of-turn
//!   token, expands `<|image_pad|>` placeholders to the number of vision tokens of each
//!   image, and truncates without ever cutting an image.
//! - [`debug`]: a compact human view of ids + mask (`omr data render`).
//! - [`qwen`]: the Qwen2-VL special tokens and chat template.
//! - [`python`], [`pyjson`], [`messages`]: the Python/HF conventions the templates expect.
//!
//! Errors that depend on one record (a template that raises, too many image tokens) are a
//! [`crate::Reason`] so the record can be quarantined; errors loading a model folder are a
//! [`ChatError`] naming the file.

pub mod debug;
pub mod encode;
pub mod messages;
pub mod pyjson;
pub mod python;
pub mod qwen;
pub mod template;

pub use encode::{EncodeConfig, Encoder, Truncation};
pub use messages::ContentStyle;
pub use template::{ChatTemplate, RenderOptions};

use std::path::PathBuf;

/// Failures loading a tokenizer or chat template folder.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("no chat template in {dir}: looked for chat_template.jinja, chat_template.json (key `chat_template`) and tokenizer_config.json (key `chat_template`); add one of them to the model folder")]
    NoTemplate { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {what}")]
    BadField { path: PathBuf, what: String },
    #[error("chat template from {origin} does not compile: {message}")]
    Syntax { origin: String, message: String },
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("token {token:?} is not in the vocabulary of {path}; {hint}")]
    MissingToken {
        path: PathBuf,
        token: String,
        hint: String,
    },
}
