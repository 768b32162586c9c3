//! JPEG → RGB with zune-jpeg, as close to PIL (libjpeg-turbo) as a different decoder gets.
//!
//! zune-jpeg is the fastest Rust decoder (≈ 170 MP/s per core, PERFORMANCE.md). Its IDCT and
//! chroma upsampling round differently from libjpeg-turbo's `islow` IDCT + fancy upsampling, so
//! pixels differ by a few levels at most; `tests/image_parity.rs` measures the difference on the
//! fixtures (baseline 4:2:0 / 4:4:4, gray, progressive, CMYK, EXIF-rotated).
//!
//! Color handling mirrors PIL: gray is replicated; CMYK is read raw and converted with PIL's own
//! integer formula (`Convert.c: cmyk2rgb` applied to the inverted "CMYK;I" data libjpeg hands PIL
//! for Adobe files), which is exact given exact samples. YCCK goes through zune's conversion
//! (rounding may differ by one level). Truncation: see `container.rs`; a file missing only its
//! EOI is decoded in strict mode, which fails if any scan data is actually missing.

use super::container::{jpeg_ending, Ending};
use super::decode::{check_dims, orient};
use super::DecodeLimits;
use crate::quarantine::Reason;
use image::metadata::Orientation;
use image::RgbImage;
use zune_jpeg::zune_core::bytestream::ZCursor;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

pub(crate) fn decode_jpeg(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, Reason> {
    let ending = jpeg_ending(bytes);
    let strict = !matches!(ending, Ending::Complete);
    let options = DecoderOptions::default()
        .set_max_width(u16::MAX as usize)
        .set_max_height(u16::MAX as usize)
        .set_strict_mode(strict);
    let mut dec = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let failed = |e: String| match &ending {
        Ending::Complete => Reason::ImageUndecodable(format!("JPEG: {e}")),
        Ending::MissingEnd(why) => Reason::ImageTruncated(format!("{why}: {e}")),
        Ending::Cut(why) => Reason::ImageTruncated(format!("{why}: {e}")),
    };
    dec.decode_headers().map_err(|e| failed(e.to_string()))?;
    let info = dec.info().ok_or_else(|| failed("no frame header".into()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    check_dims(w as u64, h as u64, limits)?;
    if let Ending::Cut(why) = &ending {
        return Err(Reason::ImageTruncated(why.clone()));
    }
    let input = dec
        .input_colorspace()
        .ok_or_else(|| failed("no colorspace".into()))?;
    let out = match input {
        ColorSpace::Luma => ColorSpace::Luma,
        ColorSpace::CMYK => ColorSpace::CMYK,
        _ => ColorSpace::RGB,
    };
    dec.set_options(options.jpeg_set_out_colorspace(out));
    let orientation = dec
        .exif()
        .and_then(|exif| Orientation::from_exif_chunk(exif))
        .unwrap_or(Orientation::NoTransforms);
    let raw = dec.decode().map_err(|e| failed(e.to_string()))?;
    let expected = w * h * out.num_components();
    if raw.len() != expected {
        return Err(failed(format!(
            "decoder returned {} bytes, expected {expected}",
            raw.len()
        )));
    }
    let rgb = match out {
        ColorSpace::Luma => raw.iter().flat_map(|&v| [v; 3]).collect(),
        ColorSpace::CMYK => raw.chunks_exact(4).flat_map(cmyk_to_rgb).collect(),
        _ => raw,
    };
    let img = RgbImage::from_raw(w as u32, h as u32, rgb).expect("3 bytes per pixel");
    Ok(orient(img, orientation))
}

/// PIL's `cmyk2rgb` on the inverted samples PIL stores for Adobe CMYK JPEGs ("CMYK;I"):
/// with PIL's k' = 255 - k and c' = 255 - c, `r = (255 - k') - MULDIV255(c', 255 - k')`.
fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = p[3] as i32; // 255 - k' where k' = 255 - stored k
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [0, 1, 2].map(|i| (nk - muldiv255(255 - p[i] as i32, nk)).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_matches_pil_values() {
        // PIL: CMYK (10, 20, 30, 40) → RGB (207, 198, 190); (200, 100, 50, 0) → (55, 155, 205).
        // JPEG stores the inverted samples.
        assert_eq!(cmyk_to_rgb(&[245, 235, 225, 215]), [207, 198, 190]);
        assert_eq!(cmyk_to_rgb(&[55, 155, 205, 255]), [55, 155, 205]);
    }
}
