//! Encoded bytes → 8-bit RGB, refusing bad input with a typed [`Reason`] before it costs memory.
//!
//! Order of checks, for every format: empty → `ImageEmpty`; sniff (DICOM by `DICM` at offset 128,
//! JPEG by `FF D8 FF`, anything else the `image` crate recognizes: PNG, TIFF, BMP, WebP) →
//! `ImageUndecodable` when nothing matches; read only the header and check the stored size
//! ([`check_dims`]: `ImageTooLarge` over `DecodeLimits::max_pixels`, `ImageBadDimensions` for a
//! zero side or an aspect ratio over 200, which `smart_resize` would reject anyway); check the
//! container is complete (`container.rs`, `ImageTruncated`); only then decode.
//!
//! Conversion to RGB follows PIL's `convert("RGB")`, so the HF pipeline sees the same pixels:
//! gray is replicated, alpha is dropped (no compositing), palettes are looked up, 16-bit RGB
//! keeps the high byte (PIL reads 16-bit RGB PNGs that way). One deliberate deviation: 16-bit
//! grayscale is stretched from the image's min..max to 0..255 (rounded half up), where PIL clips
//! "I;16" at 255 and turns a typical medical image white. EXIF orientation is applied as HF
//! `datasets` does (`ImageOps.exif_transpose`).
//!
//! The third-party decoders are memory-safe but not all panic-free on hostile input, so a panic
//! inside one becomes `ImageUndecodable` instead of killing a loader thread.

use super::container::{self, Ending};
use super::smart_resize::MAX_ASPECT_RATIO;
use super::{dicom, jpeg, DecodeLimits};
use crate::quarantine::Reason;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, RgbImage};
use std::io::Cursor;

/// Decodes any supported encoded image to RGB (H, W, 3), EXIF orientation applied.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, Reason> {
    if bytes.is_empty() {
        return Err(Reason::ImageEmpty);
    }
    std::panic::catch_unwind(|| decode_any(bytes, limits)).unwrap_or_else(|_| {
        Err(Reason::ImageUndecodable(
            "the decoder panicked on this data".into(),
        ))
    })
}

fn decode_any(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, Reason> {
    if container::is_dicom(bytes) {
        return dicom::decode_dicom(bytes, limits);
    }
    if container::is_jpeg(bytes) {
        return jpeg::decode_jpeg(bytes, limits);
    }
    decode_raster(bytes, limits)
}

/// The header checks shared by every format; runs before any pixel is decoded.
pub(crate) fn check_dims(width: u64, height: u64, limits: &DecodeLimits) -> Result<(), Reason> {
    if width == 0 || height == 0 {
        return Err(Reason::ImageBadDimensions {
            width,
            height,
            why: "a side is 0".into(),
        });
    }
    if width.saturating_mul(height) > limits.max_pixels {
        return Err(Reason::ImageTooLarge {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    let aspect = width.max(height) as f64 / width.min(height) as f64;
    if aspect > MAX_ASPECT_RATIO {
        return Err(Reason::ImageBadDimensions {
            width,
            height,
            why: format!("aspect ratio {aspect:.1} exceeds {MAX_ASPECT_RATIO}"),
        });
    }
    Ok(())
}

/// Applies an EXIF orientation the way PIL's `exif_transpose` does.
pub(crate) fn orient(img: RgbImage, orientation: Orientation) -> RgbImage {
    if orientation == Orientation::NoTransforms {
        return img;
    }
    let mut d = DynamicImage::ImageRgb8(img);
    d.apply_orientation(orientation);
    d.into_rgb8()
}

/// PNG, TIFF, BMP, WebP through the `image` crate.
fn decode_raster(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, Reason> {
    let ending = if container::is_png(bytes) {
        container::png_ending(bytes)
    } else {
        Ending::Complete
    };
    // PIL reads a PNG that stops cleanly after its last chunk without IEND; the png crate wants
    // IEND, so give it one. Missing image data still fails: IEND cannot stand in for IDAT bytes.
    let owned;
    let bytes = if matches!(ending, Ending::MissingEnd(_)) {
        owned = [bytes, container::PNG_IEND.as_slice()].concat();
        owned.as_slice()
    } else {
        bytes
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Reason::ImageUndecodable(e.to_string()))?;
    if reader.format().is_none() {
        return Err(Reason::ImageUndecodable(
            "unrecognized format (supported: JPEG, PNG, TIFF, BMP, WebP, DICOM)".into(),
        ));
    }
    // The header is read without limits so that a bomb is reported by our own size check with
    // its dimensions; the decoder gets a memory limit once the size is known to be sane.
    reader.no_limits();
    let mut decoder = reader.into_decoder().map_err(|e| classify(e, &ending))?;
    let (w, h) = decoder.dimensions();
    check_dims(w as u64, h as u64, limits)?;
    if let Ending::Cut(why) = ending {
        return Err(Reason::ImageTruncated(why));
    }
    let mut mem = image::Limits::default();
    // Room for RGBA16 at the largest accepted size plus the RGB8 copy.
    mem.max_alloc = Some(limits.max_pixels.saturating_mul(8 + 3).max(512 << 20));
    decoder
        .set_limits(mem)
        .map_err(|e| Reason::ImageUndecodable(e.to_string()))?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(|e| classify(e, &ending))?;
    Ok(orient(to_rgb8(img), orientation))
}

/// Truncation when the container says so or the decoder ran out of bytes; otherwise undecodable.
fn classify(e: ImageError, ending: &Ending) -> Reason {
    let eof =
        matches!(&e, ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
    match ending {
        Ending::Cut(why) => Reason::ImageTruncated(format!("{why}: {e}")),
        Ending::MissingEnd(why) => Reason::ImageTruncated(format!("{why}: {e}")),
        Ending::Complete if eof => Reason::ImageTruncated(e.to_string()),
        Ending::Complete => Reason::ImageUndecodable(e.to_string()),
    }
}

/// PIL-style `convert("RGB")` for every layout the `image` crate produces.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let from = |data: Vec<u8>| RgbImage::from_raw(w, h, data).expect("3 bytes per pixel");
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => from(i.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect()),
        DynamicImage::ImageLuma8(i) => from(i.as_raw().iter().flat_map(|&v| [v; 3]).collect()),
        DynamicImage::ImageLumaA8(i) => from(i.pixels().flat_map(|p| [p[0]; 3]).collect()),
        DynamicImage::ImageLuma16(i) => from(gray16_to_rgb(i.as_raw().iter().copied())),
        DynamicImage::ImageLumaA16(i) => from(gray16_to_rgb(i.pixels().map(|p| p[0]))),
        DynamicImage::ImageRgb16(i) => from(i.as_raw().iter().map(|&v| (v >> 8) as u8).collect()),
        DynamicImage::ImageRgba16(i) => from(
            i.pixels()
                .flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8))
                .collect(),
        ),
        // Float images (TIFF/EXR): the image crate's clamp-and-round, there is no PIL reference.
        other => other.to_rgb8(),
    }
}

/// 16-bit gray → RGB by stretching min..max to 0..255 (see the module doc). A flat image keeps
/// its high byte.
pub(crate) fn gray16_to_rgb(values: impl Iterator<Item = u16> + Clone) -> Vec<u8> {
    let (lo, hi) = values
        .clone()
        .fold((u16::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let range = (hi as u32).saturating_sub(lo as u32);
    values
        .flat_map(|v| {
            let stretched = ((v - lo) as u32 * 255 + range / 2).checked_div(range);
            let g = stretched.map_or((v >> 8) as u8, |s| s as u8);
            [g; 3]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray16_stretch() {
        let out = gray16_to_rgb([1000u16, 1001, 3000, 5000].into_iter());
        assert_eq!(out, vec![0, 0, 0, 0, 0, 0, 128, 128, 128, 255, 255, 255]);
        assert_eq!(gray16_to_rgb([0x1234u16; 2].into_iter()), vec![0x12; 6]);
    }

    #[test]
    fn dims_checks() {
        let l = DecodeLimits { max_pixels: 100 };
        assert!(check_dims(10, 10, &l).is_ok());
        assert_eq!(
            check_dims(11, 10, &l).unwrap_err().code(),
            "image_too_large"
        );
        assert_eq!(
            check_dims(0, 10, &l).unwrap_err().code(),
            "image_bad_dimensions"
        );
        let l = DecodeLimits::default();
        assert_eq!(
            check_dims(201, 1, &l).unwrap_err().code(),
            "image_bad_dimensions"
        );
        assert!(check_dims(200, 1, &l).is_ok());
    }

    #[test]
    fn empty_and_garbage() {
        let l = DecodeLimits::default();
        assert_eq!(decode(&[], &l), Err(Reason::ImageEmpty));
        assert_eq!(
            decode(b"hello, not an image at all", &l)
                .unwrap_err()
                .code(),
            "image_undecodable"
        );
    }
}
