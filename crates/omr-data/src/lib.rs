//! omr-data: everything between OpenMedReason-style shards on disk and a training `Batch`.
//!
//! The crate knows nothing of models beyond what `preprocessor_config.json`, the tokenizer and
//! the chat template say (DESIGN.md). Data flows:
//! `source` (parquet | JSONL + images | WebDataset tar | Hub) → [`Sample`] →
//! `image` (decode, Qwen2-VL resize/normalize/patchify) + `chat` (template, tokens, loss mask)
//! → [`Encoded`] → `loader` (seeded shuffle, rank striping, resumable cursor, prefetch)
//! → `collate` → `Batch`. Every per-record failure is a [`BadRecord`] that lands in
//! `quarantine.jsonl` instead of stopping the run.

pub mod batcher;
pub mod chat;
pub mod collate;
pub mod config;
pub mod grade;
pub mod image;
pub mod loader;
pub mod mcq;
pub mod mixture;
pub mod pipeline;
pub mod quarantine;
pub mod sample;
pub mod source;
pub mod synth;
pub mod tiny;
pub mod tokenizer_train;
pub mod validate;

pub use quarantine::{BadRecord, Quarantine, QuarantineBudget, Reason};
pub use sample::{Content, Encoded, ImageBytes, Mcq, Message, Origin, Role, RubricUnit, Sample};
