//! From-scratch tiny Qwen2.5-VL models for the CPU demo and the tests.
//!
//! [`TinySpec`] writes a real Qwen2.5-VL `config.json` (transformers 4.x form), so a tiny model
//! goes through exactly the code a 7B one does, loads in transformers, and exports the same
//! way. Weights come from [`Params::init`]: seeded, identical on every machine.
//! The default dims (≈1.6 M parameters with a 2k vocabulary) train at a few hundred tokens per
//! second on one CPU core.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::params::Params;
use candle_core::Device;
use serde_json::{json, Value};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinySpec {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vision_hidden_size: usize,
    pub vision_depth: usize,
    pub vision_heads: usize,
    pub vision_intermediate_size: usize,
    /// Window side in pixels of Qwen2.5-VL's windowed vision blocks.
    pub window_size: usize,
    pub tie_word_embeddings: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 384,
            vision_hidden_size: 64,
            vision_depth: 2,
            vision_heads: 2,
            vision_intermediate_size: 128,
            window_size: 56,
            tie_word_embeddings: true,
        }
    }
}

/// Token ids the config must carry, read from the tokenizer.
#[derive(Clone, Debug)]
pub struct TokenIds {
    pub vocab_size: usize,
    pub image: u32,
    pub video: u32,
    pub vision_start: u32,
    pub vision_end: u32,
    pub bos: u32,
    pub eos: Vec<u32>,
}

impl TokenIds {
    /// Reads the Qwen2-VL special tokens from `dir/tokenizer.json`.
    pub fn from_tokenizer_dir(dir: &Path) -> Result<TokenIds> {
        let path = dir.join("tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::config(&path, format!("cannot load tokenizer: {e}")))?;
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                ModelError::config(&path, format!("the tokenizer has no `{t}` token"))
            })
        };
        Ok(TokenIds {
            vocab_size: tok.get_vocab_size(true),
            image: id("<|image_pad|>")?,
            video: id("<|video_pad|>")?,
            vision_start: id("<|vision_start|>")?,
            vision_end: id("<|vision_end|>")?,
            bos: id("<|endoftext|>")?,
            eos: vec![id("<|im_end|>")?, id("<|endoftext|>")?],
        })
    }
}

impl TinySpec {
    /// A Qwen2.5-VL `config.json` value with these dims and the tokenizer's ids.
    pub fn config_json(&self, ids: &TokenIds) -> Value {
        let head_dim = self.hidden_size / self.num_attention_heads;
        // Split head_dim/2 frequencies like Qwen2.5-VL's [16, 24, 24] of 64: a quarter to time.
        let half = head_dim / 2;
        let t = half / 4;
        let h = (half - t) / 2;
        let section = [t, h, half - t - h];
        let vision = json!({
            "depth": self.vision_depth,
            "fullatt_block_indexes": [self.vision_depth - 1],
            "hidden_act": "silu",
            "hidden_size": self.vision_hidden_size,
            "in_channels": 3,
            "in_chans": 3,
            "intermediate_size": self.vision_intermediate_size,
            "model_type": "qwen2_5_vl",
            "num_heads": self.vision_heads,
            "out_hidden_size": self.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": self.window_size
        });
        json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0,
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos[0],
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "image_token_id": ids.image,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 4096,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": 1e-6,
            "rope_scaling": {"type": "mrope", "mrope_section": section},
            "rope_theta": 1000000.0,
            "sliding_window": 4096,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "use_cache": true,
            "use_sliding_window": false,
            "video_token_id": ids.video,
            "vision_end_token_id": ids.vision_end,
            "vision_start_token_id": ids.vision_start,
            "vision_token_id": ids.image,
            "vocab_size": ids.vocab_size,
            "vision_config": vision
        })
    }

    /// The config and seeded parameters of a fresh tiny model.
    pub fn build(
        &self,
        ids: &TokenIds,
        seed: u64,
        device: &Device,
    ) -> Result<(ModelConfig, Params)> {
        let cfg = ModelConfig::from_value(self.config_json(ids), Path::new("<tiny spec>"))?;
        let params = Params::init(&cfg, seed, 0.02, device)?;
        Ok((cfg, params))
    }
}
