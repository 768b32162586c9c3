//! The Qwen2-VL image processor: RGB → `pixel_values` (N, C·T·P·P) + `image_grid_thw`.
//!
//! Same steps and float types as transformers' slow `Qwen2VLImageProcessor._preprocess`:
//! 1. `smart_resize` to (H', W'), multiples of P·M (P = patch_size, M = merge_size), then PIL
//!    bicubic ([`resize_bicubic`]).
//! 2. rescale: `uint8 → float64 * rescale_factor → float32` (HF upcasts to f64 first);
//!    normalize: `(x - mean) / std` in float32 with mean/std rounded to float32. Every value is a
//!    function of (channel, byte), so a 3x256 lookup table gives exactly HF's f32 results.
//! 3. patchify: the single image is repeated T = temporal_patch_size times, viewed as
//!    (1, T, C, H'/P/M, M, P, W'/P/M, M, P), transposed (0, 3, 6, 4, 7, 2, 1, 5, 8) and flattened to
//!    (N = H'/P · W'/P, C·T·P·P): rows run over merge blocks, then the M×M patches inside a block;
//!    columns over channel, time, patch row, patch column.

use super::config::{ConfigError, PreprocessorConfig};
use super::decode::decode;
use super::resize::resize_bicubic;
use super::smart_resize::smart_resize;
use super::store;
use super::DecodeLimits;
use crate::quarantine::Reason;
use image::RgbImage;
use std::path::Path;

/// One processed image. `pixel_values` is (N, patch_dim) row-major with N = h·w of `grid_thw`.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    pub pixel_values: Vec<f32>,
    /// `[t, h, w]` in patches: `[1, H'/P, W'/P]` for an image.
    pub grid_thw: [u32; 3],
    /// C·T·P·P (1176 for Qwen2-VL).
    pub patch_dim: usize,
}

impl Processed {
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().map(|&v| v as usize).product()
    }
}

#[derive(Clone, Debug)]
pub struct ImageProcessor {
    config: PreprocessorConfig,
    /// f32 value of every (channel, byte) after rescale + normalize: (3, 256).
    lut: [[f32; 256]; 3],
}

impl ImageProcessor {
    pub fn new(config: PreprocessorConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let mean = config.image_mean[c] as f32;
            let std = config.image_std[c] as f32;
            for (v, out) in table.iter_mut().enumerate() {
                let x = if config.do_rescale {
                    (v as f64 * config.rescale_factor) as f32
                } else {
                    v as f32
                };
                *out = if config.do_normalize {
                    (x - mean) / std
                } else {
                    x
                };
            }
        }
        Ok(ImageProcessor { config, lut })
    }

    /// Reads `dir/preprocessor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::new(PreprocessorConfig::from_dir(dir)?)
    }

    pub fn config(&self) -> &PreprocessorConfig {
        &self.config
    }

    /// C·T·P·P.
    pub fn patch_dim(&self) -> usize {
        3 * self.config.temporal_patch_size * self.config.patch_size * self.config.patch_size
    }

    /// The size `process` resizes an (h, w) image to.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize), Reason> {
        let c = &self.config;
        let factor = c.patch_size * c.merge_size;
        if c.do_resize {
            return smart_resize(height, width, factor, c.min_pixels, c.max_pixels);
        }
        if height == 0
            || width == 0
            || !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
        {
            return Err(Reason::ImageBadDimensions {
                width: width as u64,
                height: height as u64,
                why: format!("do_resize is false and the sides are not multiples of {factor}"),
            });
        }
        Ok((height, width))
    }

    /// Image tokens the LLM sees for this grid: t·h·w / merge².
    pub fn num_image_tokens(&self, grid_thw: [u32; 3]) -> usize {
        let n: usize = grid_thw.iter().map(|&v| v as usize).product();
        n / (self.config.merge_size * self.config.merge_size)
    }

    /// Resizes (when configured) and returns the image the patches are cut from: (H', W', 3).
    pub fn resize(&self, img: &RgbImage) -> Result<RgbImage, Reason> {
        let (h, w) = self.target_size(img.height() as usize, img.width() as usize)?;
        Ok(resize_bicubic(img, w as u32, h as u32))
    }

    pub fn process(&self, img: &RgbImage) -> Result<Processed, Reason> {
        let (h, w) = self.target_size(img.height() as usize, img.width() as usize)?;
        if (h, w) == (img.height() as usize, img.width() as usize) {
            return Ok(self.patchify(img));
        }
        Ok(self.patchify(&resize_bicubic(img, w as u32, h as u32)))
    }

    /// Decodes and processes; also returns the decoded (orig_h, orig_w).
    pub fn process_bytes(
        &self,
        bytes: &[u8],
        limits: &DecodeLimits,
    ) -> Result<(Processed, (u32, u32)), Reason> {
        let img = decode(bytes, limits)?;
        let orig = (img.height(), img.width());
        Ok((self.process(&img)?, orig))
    }

    /// Normalizes and cuts an already-resized image (sides multiples of P·M) into patches.
    fn patchify(&self, img: &RgbImage) -> Processed {
        let (p, m, t) = (
            self.config.patch_size,
            self.config.merge_size,
            self.config.temporal_patch_size,
        );
        let (h, w) = (img.height() as usize, img.width() as usize);
        let (gh, gw) = (h / p, w / p);
        // `target_size` guarantees this; the uninitialized fill below relies on it.
        assert!(
            gh % m == 0 && gw % m == 0,
            "patchify needs sides that are multiples of patch_size * merge_size"
        );
        let patch_dim = self.patch_dim();
        let src = img.as_raw();
        let pp = p * p;
        // The output is large (24 bytes per resized pixel with T = 2) and every value is written
        // exactly once below, so it is filled in place without zeroing it first (a memset, or
        // calloc's, costs as much as the normalization itself).
        let n = gh * gw * patch_dim;
        let mut out: Vec<f32> = Vec::with_capacity(n);
        // Row order: merge block (bh, bw), then patch (mh, mw) inside it.
        let origins = (0..gh / m).flat_map(|bh| {
            (0..gw / m).flat_map(move |bw| {
                (0..m).flat_map(move |mh| {
                    (0..m).map(move |mw| ((bh * m + mh) * p, (bw * m + mw) * p))
                })
            })
        });
        // Time 0 of one patch, per channel: (C, P·P), built in L1 and then stored T times.
        let mut stage = vec![0f32; 3 * pp];
        for (row, (y0, x0)) in out.spare_capacity_mut()[..n]
            .chunks_exact_mut(patch_dim)
            .zip(origins)
        {
            // Column order: channel, time, patch row, patch column. Each source byte is read
            // once; the channel planes are written in three sequential streams.
            let (r_plane, rest) = stage.split_at_mut(pp);
            let (g_plane, b_plane) = rest.split_at_mut(pp);
            for py in 0..p {
                let line = &src[((y0 + py) * w + x0) * 3..][..p * 3];
                let span = py * p..(py + 1) * p;
                for (((px, r), g), b) in line
                    .chunks_exact(3)
                    .zip(&mut r_plane[span.clone()])
                    .zip(&mut g_plane[span.clone()])
                    .zip(&mut b_plane[span])
                {
                    *r = self.lut[0][px[0] as usize];
                    *g = self.lut[1][px[1] as usize];
                    *b = self.lut[2][px[2] as usize];
                }
            }
            // Time repeats the single frame: each channel's plane goes to all T slots.
            for (dst, plane) in row.chunks_exact_mut(pp).zip(
                stage
                    .chunks_exact(pp)
                    .flat_map(|c| std::iter::repeat_n(c, t)),
            ) {
                store::store(dst, plane);
            }
        }
        store::fence();
        // SAFETY: the (gh/m · gw/m · m · m) = gh·gw origins cover every one of the n / patch_dim
        // rows, and each row is C·T chunks of P·P values, every one of them stored from a plane.
        unsafe { out.set_len(n) };
        Processed {
            pixel_values: out,
            grid_thw: [1, gh as u32, gw as u32],
            patch_dim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_hf_transpose() {
        // 56x56 with P=14, M=2: grid 4x4, two merge blocks per side. Encode (y, x, c) in the bytes
        // and check a few positions by the HF index formula.
        let config = PreprocessorConfig {
            do_rescale: false,
            do_normalize: false,
            ..Default::default()
        };
        let proc = ImageProcessor::new(config).unwrap();
        let img = RgbImage::from_fn(56, 56, |x, y| {
            image::Rgb([(y * 4 + x / 14) as u8, (x % 14) as u8, 7])
        });
        let out = proc.process(&img).unwrap();
        assert_eq!(out.grid_thw, [1, 4, 4]);
        assert_eq!(out.patch_dim, 1176);
        assert_eq!(proc.num_image_tokens(out.grid_thw), 4);
        let at = |row: usize, c: usize, t: usize, py: usize, px: usize| {
            out.pixel_values[row * 1176 + ((c * 2 + t) * 14 + py) * 14 + px]
        };
        // Row 5 = block (bh=0, bw=1), patch (mh=0, mw=1) → patch (gy=0, gx=3).
        assert_eq!(at(5, 0, 0, 2, 9), (2 * 4 + 3) as f32);
        assert_eq!(at(5, 1, 1, 2, 9), 9.0);
        // Row 10 = block (1, 0), patch (1, 0) → patch (gy=3, gx=0); time copy t=1 equals t=0.
        assert_eq!(at(10, 0, 1, 13, 0), ((3 * 14 + 13) * 4) as f32);
        assert_eq!(at(10, 2, 0, 0, 0), 7.0);
    }

    #[test]
    fn normalization_uses_hf_float_types() {
        let proc = ImageProcessor::new(PreprocessorConfig::default()).unwrap();
        let x = (200f64 * (1.0 / 255.0)) as f32;
        // HF: np.array(mean, dtype=float32) rounds the f64 config value to f32.
        assert_eq!(
            proc.lut[1][200],
            (x - 0.4578275f64 as f32) / 0.26130258f64 as f32
        );
    }

    #[test]
    fn no_resize_needs_aligned_sides() {
        let proc = ImageProcessor::new(PreprocessorConfig {
            do_resize: false,
            ..Default::default()
        })
        .unwrap();
        assert!(proc.process(&RgbImage::new(30, 28)).is_err());
        assert_eq!(
            proc.process(&RgbImage::new(56, 28)).unwrap().grid_thw,
            [1, 2, 4]
        );
    }
}
