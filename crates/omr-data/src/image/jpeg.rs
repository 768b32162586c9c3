//! JPEG → RGB with jpeg-decoder, chosen because it lands closest to PIL (libjpeg-turbo).
//!
//! No Rust decoder reproduces libjpeg-turbo bit for bit (its `islow` IDCT and color tables). On the
//! golden fixtures, measured against PIL 13 (`tests/image_parity.rs` prints the numbers):
//! jpeg-decoder stays within 3 levels everywhere (mean |diff| ≈ 0.13 per sample on 4:2:0),
//! because its chroma upsampling is libjpeg's "fancy" triangle filter with edge replication.
//! zune-jpeg (the `image` crate's decoder, ≈ 1.7x faster) was measured too: closer on 4:4:4 and
//! gray (mean ≈ 0.02) but up to 14 levels off on 4:2:0 along the right/bottom border and hard
//! color edges (it upsamples MCU padding instead of replicating the edge), mean ≈ 0.3.
//!
//! Color handling mirrors PIL: gray is replicated; CMYK/YCCK come out of jpeg-decoder in PIL's
//! convention (Adobe-inverted) and are converted with PIL's integer `cmyk2rgb`; 16-bit lossless
//! gray is stretched like 16-bit PNGs. Truncation: `container.rs` must find the EOI marker. PIL
//! also accepts a file whose *only* missing piece is EOI; we cannot tell that case apart from a
//! cut scan with jpeg-decoder (it reads ahead and fails at end of data either way), so every
//! JPEG without EOI is `ImageTruncated`.

use super::container::{jpeg_ending, Ending};
use super::decode::{check_dims, gray16_to_rgb, orient};
use super::DecodeLimits;
use crate::quarantine::Reason;
use image::metadata::Orientation;
use image::RgbImage;
use jpeg_decoder::{Decoder, PixelFormat};

pub(crate) fn decode_jpeg(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, Reason> {
    let ending = jpeg_ending(bytes);
    let failed = |e: String| match &ending {
        Ending::Complete => Reason::ImageUndecodable(format!("JPEG: {e}")),
        Ending::MissingEnd(why) => Reason::ImageTruncated(format!("{why}: {e}")),
        Ending::Cut(why) => Reason::ImageTruncated(format!("{why}: {e}")),
    };
    let mut dec = Decoder::new(bytes);
    dec.read_info().map_err(|e| failed(e.to_string()))?;
    let info = dec.info().ok_or_else(|| failed("no frame header".into()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    check_dims(w as u64, h as u64, limits)?;
    match &ending {
        Ending::Complete => {}
        Ending::MissingEnd(why) => return Err(Reason::ImageTruncated((*why).into())),
        Ending::Cut(why) => return Err(Reason::ImageTruncated(why.clone())),
    }
    let orientation = dec
        .exif_data()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let raw = dec.decode().map_err(|e| failed(e.to_string()))?;
    let expected = w * h * info.pixel_format.pixel_bytes();
    if raw.len() != expected {
        return Err(failed(format!(
            "decoder returned {} bytes, expected {expected}",
            raw.len()
        )));
    }
    let rgb = match info.pixel_format {
        PixelFormat::RGB24 => raw,
        PixelFormat::L8 => raw.iter().flat_map(|&v| [v; 3]).collect(),
        PixelFormat::L16 => gray16_to_rgb(
            raw.chunks_exact(2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]])),
        ),
        PixelFormat::CMYK32 => raw.chunks_exact(4).flat_map(cmyk_to_rgb).collect(),
    };
    let img = RgbImage::from_raw(w as u32, h as u32, rgb).expect("3 bytes per pixel");
    Ok(orient(img, orientation))
}

/// PIL's `cmyk2rgb` (`Convert.c`): `r = (255 - k) - MULDIV255(c, 255 - k)`, per channel.
fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = 255 - p[3] as i32;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [0, 1, 2].map(|i| (nk - muldiv255(p[i] as i32, nk)).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_matches_pil_values() {
        // PIL: CMYK (10, 20, 30, 40) → RGB (207, 198, 190); (200, 100, 50, 0) → (55, 155, 205).
        assert_eq!(cmyk_to_rgb(&[10, 20, 30, 40]), [207, 198, 190]);
        assert_eq!(cmyk_to_rgb(&[200, 100, 50, 0]), [55, 155, 205]);
    }
}
