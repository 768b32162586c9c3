//! `preprocessor_config.json` as HF writes it, read field for field.
//!
//! Defaults are those of transformers' `Qwen2VLImageProcessor.__init__`. Unknown keys are ignored
//! because HF files carry many (`image_processor_type`, `processor_class`, video fields, ...).
//! Pixel budget precedence follows the processor: top-level `min_pixels` / `max_pixels` win, then
//! `size: {shortest_edge, longest_edge}`, then the defaults. (The 4.57.1 slow class discards a
//! `size` without `min_pixels`/`max_pixels` and silently uses the defaults; its fast sibling and
//! transformers 5 honor it, and so do we: a hand-written `size` means what it says.)

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// CLIP mean/std, transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// PIL's resampling code for bicubic, the only filter implemented.
pub const RESAMPLE_BICUBIC: u32 = 3;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct PreprocessorConfig {
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    /// PIL resampling filter code; only 3 (bicubic) is supported.
    pub resample: u32,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Accepted for completeness; decoding always yields RGB (HF would fail on a non-RGB array
    /// with a 3-channel mean anyway).
    pub do_convert_rgb: bool,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        PreprocessorConfig {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            resample: RESAMPLE_BICUBIC,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid preprocessor config: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid image preprocessor config: {0}")]
    Invalid(String),
}

impl PreprocessorConfig {
    /// Reads `dir/preprocessor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("preprocessor_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Json { path, source })
    }

    /// Checks what the processor relies on; called by `ImageProcessor::new`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.resample != RESAMPLE_BICUBIC {
            return bad(format!(
                "resample = {} is not supported; only 3 (PIL bicubic, the Qwen2-VL default) is implemented",
                self.resample
            ));
        }
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return bad("patch_size, merge_size and temporal_patch_size must be positive".into());
        }
        if self.min_pixels > self.max_pixels {
            return bad(format!(
                "min_pixels {} > max_pixels {}",
                self.min_pixels, self.max_pixels
            ));
        }
        if self.image_std.contains(&0.0) {
            return bad("image_std contains 0".into());
        }
        Ok(())
    }
}

/// A mean/std given as one float for all channels or as a per-channel list (HF accepts both).
#[derive(Deserialize)]
#[serde(untagged)]
enum PerChannel {
    One(f64),
    Many(Vec<f64>),
}

impl PerChannel {
    fn into_rgb(self, key: &str) -> Result<[f64; 3], String> {
        match self {
            PerChannel::One(v) => Ok([v; 3]),
            PerChannel::Many(v) => <[f64; 3]>::try_from(v.as_slice())
                .map_err(|_| format!("{key} must have 3 values, got {}", v.len())),
        }
    }
}

#[derive(Deserialize)]
struct SizeDict {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

/// The file as written; `null` means "use the default", as in HF.
#[derive(Deserialize)]
struct RawConfig {
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    size: Option<SizeDict>,
    patch_size: Option<usize>,
    merge_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    resample: Option<u32>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<PerChannel>,
    image_std: Option<PerChannel>,
    do_convert_rgb: Option<bool>,
}

impl TryFrom<RawConfig> for PreprocessorConfig {
    type Error = String;

    fn try_from(r: RawConfig) -> Result<Self, String> {
        let d = PreprocessorConfig::default();
        let (mut min_pixels, mut max_pixels) = (d.min_pixels, d.max_pixels);
        if let Some(size) = r.size {
            match (size.shortest_edge, size.longest_edge) {
                (Some(s), Some(l)) => (min_pixels, max_pixels) = (s, l),
                _ => return Err("size must contain 'shortest_edge' and 'longest_edge' keys".into()),
            }
        }
        Ok(PreprocessorConfig {
            min_pixels: r.min_pixels.unwrap_or(min_pixels),
            max_pixels: r.max_pixels.unwrap_or(max_pixels),
            patch_size: r.patch_size.unwrap_or(d.patch_size),
            merge_size: r.merge_size.unwrap_or(d.merge_size),
            temporal_patch_size: r.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            resample: r.resample.unwrap_or(d.resample),
            do_resize: r.do_resize.unwrap_or(d.do_resize),
            do_rescale: r.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: r.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: r.do_normalize.unwrap_or(d.do_normalize),
            image_mean: r
                .image_mean
                .map(|m| m.into_rgb("image_mean"))
                .transpose()?
                .unwrap_or(d.image_mean),
            image_std: r
                .image_std
                .map(|m| m.into_rgb("image_std"))
                .transpose()?
                .unwrap_or(d.image_std),
            do_convert_rgb: r.do_convert_rgb.unwrap_or(d.do_convert_rgb),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PreprocessorConfig, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn qwen25_vl_file_with_unknown_keys() {
        let c = parse(
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}"#,
        )
        .unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 12845056));
        assert_eq!(c.rescale_factor, 1.0 / 255.0);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn size_form_and_precedence() {
        let c = parse(r#"{"size": {"shortest_edge": 1000, "longest_edge": 50000}}"#).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (1000, 50000));
        let c = parse(
            r#"{"size": {"shortest_edge": 1000, "longest_edge": 50000}, "max_pixels": 70000}"#,
        )
        .unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (1000, 70000));
        assert!(parse(r#"{"size": {"shortest_edge": 1000}}"#).is_err());
        assert_eq!(parse("{}").unwrap(), PreprocessorConfig::default());
    }

    #[test]
    fn scalar_mean_nulls_and_bad_values() {
        let c = parse(r#"{"image_mean": 0.5, "image_std": null, "rescale_factor": 1}"#).unwrap();
        assert_eq!(c.image_mean, [0.5; 3]);
        assert_eq!(c.image_std, OPENAI_CLIP_STD);
        assert_eq!(c.rescale_factor, 1.0);
        assert!(parse(r#"{"image_mean": [0.5, 0.5]}"#).is_err());
        let c = parse(r#"{"resample": 2}"#).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("resample = 2"), "{err}");
    }
}
