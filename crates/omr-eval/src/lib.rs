//! omr-eval: OpenMedReason-Bench evaluation of a model folder (`omr eval`).
//!
//! `run::evaluate` is the whole evaluation read top to bottom: load the model and the bench
//! items, generate greedily in left-padded batches, grade the answers, ask a [`judge::Judge`]
//! the rubric's presence and correctness questions, compute the PKR trace score (`pkr`),
//! optionally compare with a second model (`pairwise`), and build the [`report::Report`]
//! (JSON + a markdown table). Judges: an OpenAI-compatible chat endpoint with retries and an
//! on-disk cache (`judge::http`), and an offline rule-based judge for tests and the demo
//! (`judge::rules`, weaker than an LLM judge).

pub mod error;
pub mod judge;
pub mod pairwise;
pub mod pkr;
pub mod report;
pub mod run;

pub use error::EvalError;
pub use report::Report;
pub use run::{evaluate, EvalOptions};
