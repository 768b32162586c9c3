//! omr-train: the training recipes and the state they own.
//!
//! `sft::run` is the supervised fine-tuning loop and `grpo::run` the GRPO one, each one function
//! read top to bottom (STYLE.md); `rewards` and `rollout` are GRPO's parts, `grpo_loss` its
//! objective.
//! Everything it shares with the GRPO recipe lives in its own module: the optimizer (`optim`,
//! AdamW with fp32 masters and moments), learning-rate `schedule`s, the checkpoint commit
//! protocol of RELIABILITY.md (`checkpoint`), the one struct holding the full resume state
//! (`state`), and what the user sees (`metrics`, `tensorboard`).

pub mod batch;
pub mod bench_step;
pub mod card;
pub mod checkpoint;
pub mod config;
pub mod device_check;
pub mod dist;
pub mod error;
pub mod eval;
pub mod export;
pub mod flops;
pub mod grpo;
pub mod grpo_config;
pub mod grpo_loss;
pub mod metrics;
pub mod optim;
pub mod plan;
pub mod rewards;
pub mod rollout;
pub mod runtime;
pub mod schedule;
pub mod setup;
pub mod sft;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod tensorboard;

pub use error::{Result, TrainError};
