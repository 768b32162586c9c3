//! The per-sample pipeline: `Sample` → decoded, resized, normalised images + tokens + labels.
//!
//! One `Processor` is built from a model (or processor) folder: `preprocessor_config.json`
//! drives the image side, `tokenizer.json` + the chat template the text side. The only thing
//! the two sides exchange is how many `<|image_pad|>` tokens each image becomes
//! (`grid_t·grid_h·grid_w / merge²`), which is why the image is processed first.

use crate::chat::{EncodeConfig, Encoder, Truncation};
use crate::image::{DecodeLimits, ImageProcessor};
use crate::quarantine::Reason;
use crate::sample::{Encoded, Sample};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Longest tokenized sample, image tokens included.
    pub max_length: usize,
    pub truncation: Truncation,
    /// Decompression-bomb guard: largest decoded image, in pixels.
    pub max_image_pixels: u64,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            max_length: 2048,
            truncation: Truncation::Right,
            max_image_pixels: 64_000_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Chat(String),
}

/// A generation prompt: token ids (images expanded) and the images' patches.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    /// (T,)
    pub input_ids: Vec<u32>,
    /// (N, C·T·P·P) row-major.
    pub pixel_values: Vec<f32>,
    pub patch_dim: usize,
    pub image_grid_thw: Vec<[u32; 3]>,
}

pub struct Processor {
    image: ImageProcessor,
    encoder: Encoder,
    limits: DecodeLimits,
    image_token_id: u32,
    pad_id: u32,
}

impl Processor {
    pub fn from_model_dir(dir: &Path, cfg: &ProcessConfig) -> Result<Processor, PipelineError> {
        let image =
            ImageProcessor::from_dir(dir).map_err(|e| PipelineError::Image(e.to_string()))?;
        let enc_cfg = EncodeConfig {
            max_length: cfg.max_length,
            truncation: cfg.truncation,
            ..Default::default()
        };
        let encoder = Encoder::from_model_dir(dir, enc_cfg)
            .map_err(|e| PipelineError::Chat(e.to_string()))?;
        let limits = DecodeLimits {
            max_pixels: cfg.max_image_pixels,
            ..Default::default()
        };
        let tok = encoder.tokenizer();
        let image_token_id = tok
            .token_to_id(&encoder.config().image_token)
            .ok_or_else(|| {
                PipelineError::Chat(format!("{}: no id for the image token", dir.display()))
            })?;
        let pad_id = encoder
            .template()
            .special_token("pad_token")
            .and_then(|t| tok.token_to_id(t))
            .unwrap_or(0);
        Ok(Processor {
            image,
            encoder,
            limits,
            image_token_id,
            pad_id,
        })
    }

    pub fn image(&self) -> &ImageProcessor {
        &self.image
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    /// The tokenizer config's `pad_token` (`<|endoftext|>` for Qwen2), else id 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Full pipeline for one sample; every failure is a quarantine reason.
    pub fn encode(&self, s: &Sample) -> Result<Encoded, Reason> {
        let mut pixel_values = Vec::new();
        let mut grids = Vec::with_capacity(s.images.len());
        let mut sizes = Vec::with_capacity(s.images.len());
        let mut counts = Vec::with_capacity(s.images.len());
        let mut patch_dim = 0;
        for img in &s.images {
            let (p, size) = self.image.process_bytes(&img.bytes, &self.limits)?;
            counts.push(self.image.num_image_tokens(p.grid_thw));
            patch_dim = p.patch_dim;
            if pixel_values.is_empty() {
                pixel_values = p.pixel_values;
            } else {
                pixel_values.extend_from_slice(&p.pixel_values);
            }
            grids.push(p.grid_thw);
            sizes.push(size);
        }
        let (input_ids, labels) = self.encoder.encode(&s.messages, &counts)?;
        Ok(Encoded {
            origin: s.origin.clone(),
            input_ids,
            labels,
            pixel_values,
            patch_dim,
            image_grid_thw: grids,
            image_sizes: sizes,
        })
    }

    /// Generation prompt of a sample (eval, GRPO rollouts): the conversation up to the first
    /// assistant turn with the generation prompt appended, and its images processed.
    pub fn encode_prompt(&self, s: &Sample) -> Result<Prompt, Reason> {
        let mut pixel_values = Vec::new();
        let mut grids = Vec::with_capacity(s.images.len());
        let mut counts = Vec::with_capacity(s.images.len());
        let mut patch_dim = 0;
        for img in &s.images {
            let (p, _) = self.image.process_bytes(&img.bytes, &self.limits)?;
            counts.push(self.image.num_image_tokens(p.grid_thw));
            patch_dim = p.patch_dim;
            pixel_values.extend_from_slice(&p.pixel_values);
            grids.push(p.grid_thw);
        }
        let first_reply = s
            .messages
            .iter()
            .position(|m| m.role == crate::sample::Role::Assistant)
            .unwrap_or(s.messages.len());
        let input_ids = self
            .encoder
            .encode_prompt(&s.messages[..first_reply], &counts)?;
        Ok(Prompt {
            input_ids,
            pixel_values,
            patch_dim,
            image_grid_thw: grids,
        })
    }

    pub fn render_debug(&self, e: &Encoded) -> String {
        self.encoder.render_debug(&e.input_ids, &e.labels)
    }
}
