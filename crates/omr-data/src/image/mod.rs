//! Images: bytes → RGB → Qwen2-VL `pixel_values` + `image_grid_thw`, matching transformers.
//!
//! The reference is transformers 4.57.1's slow `Qwen2VLImageProcessor` (Qwen2.5-VL uses the same
//! class) fed with images decoded the way HF `datasets` decodes them: PIL open, EXIF orientation
//! applied, `convert("RGB")`. Stages, each in its own file:
//!
//! - [`decode`]: sniff the format, read the header, refuse bombs / truncated files / absurd shapes
//!   *before* decoding, then decode to 8-bit RGB (JPEG via jpeg-decoder, PNG/TIFF/BMP/WebP via
//!   the `image` crate, [`dicom`] via dicom-rs). PNG decoding is bit-identical to PIL; JPEG
//!   differs from libjpeg-turbo by IDCT/color rounding, at most 3 levels on the fixtures.
//! - [`smart_resize`]: the target size, a line-for-line port including Python's
//!   round-half-to-even.
//! - [`resize`]: Pillow's fixed-point separable bicubic, bit-identical to
//!   `Image.resize(size, BICUBIC)` on RGB (fast_image_resize is close but not exact, see there).
//! - [`processor`]: rescale/normalize with HF's exact float types, then the patch transpose.
//!
//! The image type is the `image` crate's [`RgbImage`] (`ImageBuffer<Rgb<u8>, Vec<u8>>`, row-major
//! (H, W, 3)), so callers can use `image::imageops` on it without conversions.
//!
//! Deliberate deviations from PIL, all documented where they happen: 16-bit grayscale is stretched
//! min..max to 0..255 instead of clipped at 255 (PIL's "I;16"→"RGB" turns most medical images
//! white); DICOM is decoded at all (PIL cannot); the `size` key of `preprocessor_config.json` is
//! honored when `min_pixels`/`max_pixels` are absent (the 4.57.1 slow class silently ignores it,
//! its fast sibling and transformers 5 honor it).

pub mod config;
mod container;
pub mod decode;
pub mod dicom;
mod jpeg;
pub mod processor;
pub mod resize;
pub mod smart_resize;
mod store;

pub use config::{ConfigError, PreprocessorConfig};
pub use decode::decode;
pub use image::RgbImage;
pub use processor::{ImageProcessor, Processed};
pub use resize::resize_bicubic;
pub use smart_resize::smart_resize;

/// Limits checked against the header before any pixel is decoded (decompression-bomb guard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted `width * height` of the stored image (default 64 MP: a 8000x8000 scan
    /// passes, a PNG whose header claims 100000x100000 does not).
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 64 * 1024 * 1024,
        }
    }
}
