//! `smart_resize` from transformers 4.57.1 `image_processing_qwen2_vl.py`, line for line.
//!
//! The target (H', W') is a multiple of `factor` (= patch_size * merge_size) on both sides, with
//! H'*W' inside [min_pixels, max_pixels] and the aspect ratio kept as well as possible. Python's
//! `round` is round-half-to-even (`round(2.5) == 2`), hence `round_ties_even`; every float
//! expression keeps Python's evaluation order so results match bit for bit (the golden table in
//! `tests/image_parity.rs` holds 168 cases computed by transformers itself).

use crate::quarantine::Reason;

/// Largest accepted aspect ratio, as in transformers ("absolute aspect ratio must be smaller
/// than 200").
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Returns the resized `(height, width)`, or `ImageBadDimensions` where transformers raises
/// (aspect ratio > 200, a zero side) or would produce an empty image.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize), Reason> {
    let bad = |why: String| Reason::ImageBadDimensions {
        width: width as u64,
        height: height as u64,
        why,
    };
    if height == 0 || width == 0 {
        return Err(bad("a side is 0".into()));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let aspect = h.max(w) / h.min(w);
    if aspect > MAX_ASPECT_RATIO {
        return Err(bad(format!(
            "aspect ratio {aspect:.1} exceeds {MAX_ASPECT_RATIO}"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() as u64 * factor as u64;
    let mut w_bar = (w / f).round_ties_even() as u64 * factor as u64;
    let area = (height as u64) * (width as u64);
    if h_bar * w_bar > max_pixels {
        let beta = (area as f64 / max_pixels as f64).sqrt();
        h_bar = (factor as u64).max((h / beta / f).floor() as u64 * factor as u64);
        w_bar = (factor as u64).max((w / beta / f).floor() as u64 * factor as u64);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / area as f64).sqrt();
        h_bar = (h * beta / f).ceil() as u64 * factor as u64;
        w_bar = (w * beta / f).ceil() as u64 * factor as u64;
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(bad(format!(
            "resizes to {h_bar}x{w_bar} (min_pixels is 0 and the image is tiny)"
        )));
    }
    Ok((h_bar as usize, w_bar as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_cases() {
        // 20x30: round gives 28x28 = 784 < 3136, beta = sqrt(3136/600) → ceil(1.63)=2, ceil(2.45)=3.
        assert_eq!(smart_resize(20, 30, 28, 3136, 50176), Ok((56, 84)));
        // 42/28 = 1.5 rounds to 2 (even), 70/28 = 2.5 rounds to 2 (even), not 3.
        assert_eq!(smart_resize(42, 70, 28, 0, u64::MAX), Ok((56, 56)));
        // Already aligned and within bounds: unchanged.
        assert_eq!(smart_resize(84, 112, 28, 3136, 50176), Ok((84, 112)));
    }

    #[test]
    fn rejects_what_transformers_rejects() {
        assert!(smart_resize(1, 201, 28, 3136, 50176).is_err());
        assert!(smart_resize(1, 200, 28, 3136, 50176).is_ok());
        assert!(smart_resize(0, 10, 28, 3136, 50176).is_err());
        assert!(smart_resize(5, 5, 28, 0, 50176).is_err());
    }
}
