//! DICOM (Part 10 files, detected by `DICM` at offset 128) → 8-bit RGB for display-like input.
//!
//! There is no transformers reference here (PIL cannot read DICOM), so the rule is ours and is
//! the usual radiology display pipeline, reproduced in Python by
//! `scripts/fixtures/make_image_fixtures.py` for the golden tests:
//! 1. first frame only (multi-frame series: the model sees one image per placeholder);
//! 2. modality LUT: `x * RescaleSlope + RescaleIntercept` (dicom-pixeldata, which also handles
//!    bits stored, signedness and big-endian files);
//! 3. VOI: the first Window Center/Width in the file with the DICOM linear function (PS3.3
//!    C.11.2.1.2.1), else min..max of the frame; output `floor(y + 0.5)` clamped to 0..255;
//!    a VOI LUT *sequence* or a SIGMOID function is not applied (linear is used);
//! 4. MONOCHROME1 (0 = white) is inverted; gray is replicated to RGB;
//! 5. RGB (8- or 16-bit, interleaved or planar) is passed through, 16-bit keeping the high byte of
//!    the stored bits; native YBR_FULL is converted to RGB; other color models are refused.
//!
//! Every failure is `DicomUnreadable` except the shared size checks (`ImageTooLarge`,
//! `ImageBadDimensions`), which run on Rows/Columns before the pixel data is decoded.

use super::decode::check_dims;
use super::DecodeLimits;
use crate::quarantine::Reason;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::{
    ConvertOptions, DecodedPixelData, PhotometricInterpretation, PixelDecoder, PlanarConfiguration,
    VoiLutOption,
};
use image::RgbImage;

fn unreadable(e: impl std::fmt::Display) -> Reason {
    Reason::DicomUnreadable(e.to_string())
}

pub fn decode_dicom(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, Reason> {
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .map_err(unreadable)?;
    let dim = |tag, name: &str| -> Result<u64, Reason> {
        let e = obj
            .element(tag)
            .map_err(|_| unreadable(format!("no {name} attribute")))?;
        e.to_int::<u64>()
            .map_err(|e| unreadable(format!("bad {name}: {e}")))
    };
    let (rows, cols) = (dim(tags::ROWS, "Rows")?, dim(tags::COLUMNS, "Columns")?);
    check_dims(cols, rows, limits)?;
    let px = obj.decode_pixel_data_frame(0).map_err(unreadable)?;
    let (h, w) = (px.rows(), px.columns());
    if (h as u64, w as u64) != (rows, cols) {
        return Err(unreadable(format!(
            "pixel data is {w}x{h} but the header says {cols}x{rows}"
        )));
    }
    let rgb = match px.samples_per_pixel() {
        1 => monochrome(&px)?,
        3 => color(&px)?,
        n => {
            return Err(unreadable(format!(
                "{n} samples per pixel are not supported"
            )))
        }
    };
    RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| unreadable("pixel data is shorter than Rows x Columns"))
}

/// Steps 2-4 of the module doc. Returns (H·W·3) bytes.
fn monochrome(px: &DecodedPixelData<'_>) -> Result<Vec<u8>, Reason> {
    let options = ConvertOptions::new().with_voi_lut(VoiLutOption::Identity);
    let values: Vec<f64> = px
        .to_vec_frame_with_options(0, &options)
        .map_err(unreadable)?;
    let window = px
        .window()
        .map_err(unreadable)?
        .and_then(|w| w.first().copied());
    let to_byte = |y: f64| (y + 0.5).floor().clamp(0.0, 255.0) as u8;
    let mut gray: Vec<u8> = match window {
        Some(win) => {
            let (c, w) = (win.center, win.width.max(1.0));
            let (lo, hi) = (c - 0.5 - (w - 1.0) / 2.0, c - 0.5 + (w - 1.0) / 2.0);
            values
                .iter()
                .map(|&x| {
                    if x <= lo {
                        0
                    } else if x > hi {
                        255
                    } else {
                        to_byte(((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0)
                    }
                })
                .collect()
        }
        None => {
            let (lo, hi) = values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            if hi > lo {
                values
                    .iter()
                    .map(|&x| to_byte((x - lo) / (hi - lo) * 255.0))
                    .collect()
            } else {
                vec![0; values.len()]
            }
        }
    };
    if *px.photometric_interpretation() == PhotometricInterpretation::Monochrome1 {
        gray.iter_mut().for_each(|g| *g = 255 - *g);
    }
    Ok(gray.into_iter().flat_map(|g| [g; 3]).collect())
}

/// Step 5 of the module doc. Returns (H·W·3) bytes.
fn color(px: &DecodedPixelData<'_>) -> Result<Vec<u8>, Reason> {
    let n = px.rows() as usize * px.columns() as usize * 3;
    let samples: Vec<u8> = match px.bits_allocated() {
        8 => px.frame_data(0).map_err(unreadable)?.to_vec(),
        16 => {
            let shift = px.bits_stored().clamp(8, 16) - 8;
            px.frame_data_ow(0)
                .map_err(unreadable)?
                .iter()
                .map(|&v| (v >> shift).min(255) as u8)
                .collect()
        }
        b => {
            return Err(unreadable(format!(
                "{b}-bit color samples are not supported"
            )))
        }
    };
    if samples.len() < n {
        return Err(unreadable(
            "color pixel data is shorter than Rows x Columns x 3",
        ));
    }
    let mut rgb: Vec<u8> = match px.planar_configuration() {
        PlanarConfiguration::Standard => samples[..n].to_vec(),
        PlanarConfiguration::PixelFirst => {
            let plane = n / 3;
            (0..plane)
                .flat_map(|i| [samples[i], samples[plane + i], samples[2 * plane + i]])
                .collect()
        }
    };
    match px.photometric_interpretation() {
        PhotometricInterpretation::Rgb => {}
        PhotometricInterpretation::YbrFull => rgb.chunks_exact_mut(3).for_each(ybr_full_to_rgb),
        pi => {
            return Err(unreadable(format!(
                "photometric interpretation {pi} is not supported"
            )))
        }
    }
    Ok(rgb)
}

/// Full-range BT.601 YCbCr → RGB (PS3.3 C.7.6.3.1.2), the same coefficients as pydicom.
fn ybr_full_to_rgb(p: &mut [u8]) {
    let (y, cb, cr) = (p[0] as f64, p[1] as f64 - 128.0, p[2] as f64 - 128.0);
    let r = y + 1.402 * cr;
    let g = y - (0.114 * 1.772 / 0.587) * cb - (0.299 * 1.402 / 0.587) * cr;
    let b = y + 1.772 * cb;
    for (d, v) in p.iter_mut().zip([r, g, b]) {
        *d = (v + 0.5).floor().clamp(0.0, 255.0) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ybr_gray_axis_is_identity() {
        let mut p = [77u8, 128, 128];
        ybr_full_to_rgb(&mut p);
        assert_eq!(p, [77, 77, 77]);
    }

    #[test]
    fn bad_dicom_is_unreadable() {
        let mut b = vec![0u8; 128];
        b.extend_from_slice(b"DICM");
        b.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, 0xFF, 0xFF, 1, 2, 3]);
        let err = decode_dicom(&b, &DecodeLimits::default()).unwrap_err();
        assert_eq!(err.code(), "dicom_unreadable", "{err}");
    }
}
