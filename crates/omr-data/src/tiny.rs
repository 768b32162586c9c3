//! The tiny demo processor: a tokenizer trained on the synthetic corpus plus a Qwen2-VL
//! `preprocessor_config.json` sized for the synthetic images.
//!
//! The folder has the layout of a Hugging Face Qwen2-VL model's processor files
//! (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`, `special_tokens_map.json`,
//! `preprocessor_config.json`), so everything downstream treats it like a real model folder.
//! Images are capped at 224×224 pixels: 16×16 patches, 64 vision tokens after the 2×2 merge,
//! which keeps a tiny model trainable on CPU.

use crate::synth;
use crate::tokenizer_train::{train_tokenizer, TrainError};
use std::path::Path;

/// Largest image area of the tiny processor (224×224).
pub const TINY_MAX_PIXELS: u64 = 224 * 224;
/// Smallest image area (2×2 merged patches of 14 px, the Qwen2-VL minimum).
pub const TINY_MIN_PIXELS: u64 = 56 * 56;

/// Trains the tokenizer on the train split's texts of the synthetic set `(train, seed)` and
/// writes the processor folder to `out`.
pub fn write_tiny_processor(
    out: &Path,
    train: usize,
    seed: u64,
    vocab_size: usize,
) -> Result<(), TrainError> {
    write_tiny_processor_with(out, train, seed, vocab_size, TINY_MAX_PIXELS)
}

/// [`write_tiny_processor`] with another image-area cap (`max_pixels`, ≥ [`TINY_MIN_PIXELS`]).
pub fn write_tiny_processor_with(
    out: &Path,
    train: usize,
    seed: u64,
    vocab_size: usize,
    max_pixels: u64,
) -> Result<(), TrainError> {
    let max_pixels = max_pixels.max(TINY_MIN_PIXELS);
    train_tokenizer(synth::corpus_texts(train, 0, seed), vocab_size, out)?;
    let config = serde_json::json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": crate::image::config::OPENAI_CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": crate::image::config::OPENAI_CLIP_STD,
        "max_pixels": max_pixels,
        "merge_size": 2,
        "min_pixels": TINY_MIN_PIXELS,
        "patch_size": 14,
        "processor_class": "Qwen2VLProcessor",
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"longest_edge": max_pixels, "shortest_edge": TINY_MIN_PIXELS},
        "temporal_patch_size": 2
    });
    let path = out.join("preprocessor_config.json");
    let text = serde_json::to_string_pretty(&config).expect("static JSON serializes");
    std::fs::write(&path, text + "\n").map_err(|source| TrainError::Io { path, source })
}
