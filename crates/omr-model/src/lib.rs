//! Trainable Qwen2-VL / Qwen2.5-VL on candle.
//!
//! Parameters keep their Hugging Face tensor names (the checkpoint names the Hub ships, e.g.
//! `model.layers.0.self_attn.q_proj.weight`, `visual.blocks.0.attn.qkv.weight`), so loading and
//! export need no mapping beyond the one table in [`names`]. Every op on the forward path has a
//! backward (see ../shared/docs/CANDLE.md §1); frozen weights never enter candle's graph as
//! tracked arguments (§5), see [`params`] and [`ops`].

pub mod error;
pub mod export;
pub mod hub;
pub mod names;
mod pyjson;
pub mod weights;

pub use error::{ModelError, Result};
