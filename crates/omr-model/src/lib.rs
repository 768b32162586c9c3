//! Trainable Qwen2-VL / Qwen2.5-VL on candle.
//!
//! Parameters keep their Hugging Face tensor names (the checkpoint names the Hub ships, e.g.
//! `model.layers.0.self_attn.q_proj.weight`, `visual.blocks.0.attn.qkv.weight`), so loading and
//! export need no mapping beyond one alias table. Every op on the forward path has a
//! backward (../shared/docs/CANDLE.md §1); frozen weights never enter candle's graph as
//! tracked arguments (§5), see [`params`] and [`ops::frozen_linear`].

pub mod attention;
pub mod block;
pub mod config;
pub mod error;
pub mod export;
pub mod fused;
pub mod generate;
pub mod hub;
pub mod kept_attn;
pub mod linear;
pub mod lora;
pub mod loss;
pub mod model;
pub mod names;
pub mod ops;
pub mod params;
pub mod pretrained;
pub mod recompute;
pub mod rope;
pub mod text;
pub mod tiny;
pub mod vision;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::{ModelError, Result};
pub use linear::{Ctx, Kernels};
pub use model::{Input, Qwen2VL};
pub use params::{Params, Part};
pub use recompute::{profile_segments, take_profile, Backward, Recompute};
