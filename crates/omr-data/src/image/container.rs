//! Structural walks over JPEG markers and PNG chunks: is the file complete?
//!
//! Decoders can be lenient with cut-off files: zune-jpeg (like browsers) fills the missing part of
//! a truncated scan with grey, and a training run would silently learn from half-grey images.
//! These walks read only the container framing (segment lengths, chunk lengths), never pixels,
//! and say whether the end marker is there; the decoders decide with that knowledge. PIL accepts
//! a PNG whose only missing piece is IEND, and so do we (the PNG decoder fails on any missing
//! image data); a JPEG without EOI is rejected (see `jpeg.rs`).

/// How a container ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The end marker (JPEG EOI, PNG IEND) is present.
    Complete,
    /// The data stops at a clean boundary but the end marker is missing (JPEG: after entropy
    /// data; PNG: after a whole chunk). Only a decoder can tell whether pixels are missing.
    MissingEnd(&'static str),
    /// The data stops inside a header segment or chunk: certainly truncated.
    Cut(String),
}

/// Walks JPEG markers from SOI to EOI. Segments with a length are skipped by length (so an EXIF
/// thumbnail's own EOI inside APP1 is never mistaken for ours); after SOS the entropy-coded data
/// is scanned for the next real marker (`FF` followed by neither `00` stuffing nor `RSTn`).
pub(crate) fn jpeg_ending(b: &[u8]) -> Ending {
    let mut pos = 2; // after SOI, checked by the caller's sniffing
    loop {
        // Skip anything up to the next 0xFF (libjpeg tolerates stray bytes the same way), then
        // fill bytes.
        while pos < b.len() && b[pos] != 0xFF {
            pos += 1;
        }
        while pos < b.len() && b[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = b.get(pos) else {
            return Ending::Cut(format!(
                "JPEG ends at byte {} before the EOI marker",
                b.len()
            ));
        };
        pos += 1;
        match marker {
            0xD9 => return Ending::Complete,
            0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let Some(len) = b
            .get(pos..pos + 2)
            .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
        else {
            return Ending::Cut(format!(
                "JPEG ends inside the header of marker FF{marker:02X}"
            ));
        };
        if len < 2 {
            return Ending::Cut(format!(
                "JPEG marker FF{marker:02X} has an invalid length {len}"
            ));
        }
        pos += len;
        if pos > b.len() {
            return Ending::Cut(format!(
                "JPEG ends inside segment FF{marker:02X} ({len} bytes announced)"
            ));
        }
        if marker == 0xDA {
            // Entropy-coded data until a marker that is not stuffing or a restart.
            loop {
                match (b.get(pos), b.get(pos + 1)) {
                    (None, _) | (Some(0xFF), None) => {
                        return Ending::MissingEnd("JPEG scan data ends without an EOI marker")
                    }
                    (Some(0xFF), Some(0x00 | 0xD0..=0xD7)) => pos += 2,
                    // A real marker (possibly after fill bytes): the outer loop reads it.
                    (Some(0xFF), Some(_)) => break,
                    (Some(_), _) => pos += 1,
                }
            }
        }
    }
}

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";
/// A complete IEND chunk: zero length, type, CRC.
pub(crate) const PNG_IEND: &[u8; 12] = b"\0\0\0\0IEND\xAE\x42\x60\x82";

/// Walks PNG chunks (length, type, data, CRC) from the signature to IEND.
pub(crate) fn png_ending(b: &[u8]) -> Ending {
    let mut pos = PNG_SIGNATURE.len();
    let mut seen_idat = false;
    loop {
        if pos == b.len() {
            return if seen_idat {
                Ending::MissingEnd("PNG ends after a whole chunk without IEND")
            } else {
                Ending::Cut("PNG ends before any image data (IDAT)".into())
            };
        }
        let Some(head) = b.get(pos..pos + 8) else {
            return Ending::Cut(format!("PNG ends inside a chunk header at byte {pos}"));
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = &head[4..8];
        let end = pos.saturating_add(12).saturating_add(len);
        if end > b.len() {
            let name = String::from_utf8_lossy(kind);
            return Ending::Cut(format!(
                "PNG chunk {name} announces {len} bytes but the file ends first"
            ));
        }
        match kind {
            b"IEND" => return Ending::Complete,
            b"IDAT" => seen_idat = true,
            _ => {}
        }
        pos = end;
    }
}

pub(crate) fn is_png(b: &[u8]) -> bool {
    b.starts_with(PNG_SIGNATURE)
}

pub(crate) fn is_jpeg(b: &[u8]) -> bool {
    b.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// DICOM Part 10: 128-byte preamble then `DICM`.
pub(crate) fn is_dicom(b: &[u8]) -> bool {
    b.get(128..132) == Some(b"DICM")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(marker: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0xFF, marker];
        v.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn jpeg_walk() {
        let mut j = vec![0xFF, 0xD8];
        // APP1 holding a fake thumbnail with its own EOI must be skipped by length.
        j.extend(seg(0xE1, &[0xFF, 0xD8, 0xFF, 0xD9]));
        j.extend(seg(0xDA, &[1, 2, 3]));
        j.extend([0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3, 0x56]);
        let scan_end = j.len();
        j.extend([0xFF, 0xD9, 0xAA]); // trailing bytes after EOI are fine
        assert_eq!(jpeg_ending(&j), Ending::Complete);
        assert!(matches!(jpeg_ending(&j[..scan_end]), Ending::MissingEnd(_)));
        assert!(matches!(jpeg_ending(&j[..6]), Ending::Cut(_)));
        assert!(matches!(jpeg_ending(&j[..3]), Ending::Cut(_)));
    }

    #[test]
    fn png_walk() {
        let chunk = |kind: &[u8; 4], data: &[u8]| {
            let mut v = (data.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(kind);
            v.extend_from_slice(data);
            v.extend_from_slice(&[0; 4]);
            v
        };
        let mut p = PNG_SIGNATURE.to_vec();
        p.extend(chunk(b"IHDR", &[0; 13]));
        p.extend(chunk(b"IDAT", &[1, 2, 3]));
        let before_iend = p.len();
        p.extend(chunk(b"IEND", &[]));
        assert_eq!(png_ending(&p), Ending::Complete);
        assert!(matches!(
            png_ending(&p[..before_iend]),
            Ending::MissingEnd(_)
        ));
        assert!(matches!(png_ending(&p[..before_iend - 2]), Ending::Cut(_)));
        assert!(matches!(png_ending(&p[..8 + 25]), Ending::Cut(_)));
    }
}
