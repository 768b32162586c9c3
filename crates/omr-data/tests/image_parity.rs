//! Golden parity of `omr_data::image` against transformers 4.57.1 + Pillow 13.
//!
//! Fixtures come from `scripts/fixtures/make_image_fixtures.py` (see the README next to them):
//! every case holds the source file, what PIL decodes (hash; full pixels for JPEGs), PIL's
//! bicubic output (full uint8) and the HF processor's `pixel_values` (hash; full float32 for two
//! small cases). Exactness is required everywhere except JPEG decoding, where zune-jpeg and
//! libjpeg-turbo round differently and the difference is measured against a bound.

use omr_data::image::{
    decode, resize_bicubic, smart_resize, DecodeLimits, ImageProcessor, PreprocessorConfig,
    RgbImage,
};
use omr_data::Reason;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Largest per-sample difference tolerated between zune-jpeg and PIL on the fixtures (the
/// measured maximum is printed by `jpeg_decode_is_close_to_pil`).
const JPEG_MAX_ABS_DIFF: u8 = 3;
/// Largest tolerated mean absolute difference per sample for JPEG decoding (measured: 0.10).
const JPEG_MEAN_ABS_DIFF: f64 = 0.15;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn manifest() -> Value {
    serde_json::from_slice(&read("manifest.json")).expect("manifest.json parses")
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn processor() -> ImageProcessor {
    ImageProcessor::from_dir(&dir()).expect("fixture preprocessor_config.json loads")
}

fn str_of<'a>(case: &'a Value, key: &str) -> &'a str {
    case[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {case}"))
}

fn dims(case: &Value, key: &str) -> (u32, u32) {
    let v = case[key].as_array().unwrap();
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

fn is_jpeg(case: &Value) -> bool {
    str_of(case, "file").ends_with(".jpg")
}

/// The image the HF processor was given: PIL's pixels for JPEGs, our (bit-exact, checked by
/// `lossless_decode_is_bit_exact`) decode for everything else.
fn reference_input(case: &Value) -> RgbImage {
    let (h, w) = dims(case, "orig_hw");
    if is_jpeg(case) {
        RgbImage::from_raw(w, h, read(str_of(case, "decoded_file"))).unwrap()
    } else {
        decode(&read(str_of(case, "file")), &DecodeLimits::default()).unwrap()
    }
}

fn all_cases() -> Vec<Value> {
    let m = manifest();
    let mut v = m["cases"].as_array().unwrap().clone();
    v.extend(m["dicom"].as_array().unwrap().iter().cloned());
    v
}

#[test]
fn smart_resize_matches_transformers_table() {
    let m = manifest();
    let table = m["smart_resize"].as_array().unwrap();
    assert!(table.len() > 100);
    for t in table {
        let g = |k: &str| t[k].as_u64().unwrap();
        let got = smart_resize(
            g("h") as usize,
            g("w") as usize,
            g("factor") as usize,
            g("min_pixels"),
            g("max_pixels"),
        );
        match t["out"].as_array() {
            Some(out) => {
                let want = (
                    out[0].as_u64().unwrap() as usize,
                    out[1].as_u64().unwrap() as usize,
                );
                assert_eq!(got, Ok(want), "{t}");
            }
            None => assert_eq!(got.unwrap_err().code(), "image_bad_dimensions", "{t}"),
        }
    }
}

#[test]
fn lossless_decode_is_bit_exact() {
    let limits = DecodeLimits::default();
    let mut n = 0;
    for case in all_cases().iter().filter(|c| !is_jpeg(c)) {
        let name = str_of(case, "name");
        let img =
            decode(&read(str_of(case, "file")), &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (h, w) = dims(case, "orig_hw");
        assert_eq!((img.height(), img.width()), (h, w), "{name}");
        assert_eq!(
            sha(img.as_raw()),
            str_of(case, "decoded_sha256"),
            "{name}: decoded pixels differ from the reference"
        );
        n += 1;
    }
    assert!(n >= 20, "only {n} lossless cases");
}

#[test]
fn jpeg_decode_is_close_to_pil() {
    let limits = DecodeLimits::default();
    let (mut worst, mut total, mut count, mut differing) = (0u8, 0u64, 0u64, 0u64);
    for case in manifest()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| is_jpeg(c))
    {
        let name = str_of(case, "name");
        let ours =
            decode(&read(str_of(case, "file")), &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pil = reference_input(case);
        assert_eq!(ours.dimensions(), pil.dimensions(), "{name}");
        let diffs: Vec<u8> = ours
            .as_raw()
            .iter()
            .zip(pil.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let max = *diffs.iter().max().unwrap();
        let sum: u64 = diffs.iter().map(|&d| d as u64).sum();
        let nz = diffs.iter().filter(|&&d| d != 0).count() as u64;
        println!(
            "{name}: max |diff| {max}, mean {:.4}, {:.2}% of samples differ",
            sum as f64 / diffs.len() as f64,
            100.0 * nz as f64 / diffs.len() as f64
        );
        worst = worst.max(max);
        total += sum;
        count += diffs.len() as u64;
        differing += nz;
    }
    let mean = total as f64 / count as f64;
    println!(
        "all JPEGs: max |diff| {worst}, mean {mean:.4}, {:.2}% differ",
        100.0 * differing as f64 / count as f64
    );
    assert!(
        worst <= JPEG_MAX_ABS_DIFF,
        "max |diff| {worst} > {JPEG_MAX_ABS_DIFF}"
    );
    assert!(
        mean <= JPEG_MEAN_ABS_DIFF,
        "mean |diff| {mean} > {JPEG_MEAN_ABS_DIFF}"
    );
}

#[test]
fn resize_is_identical_to_pil() {
    let proc = processor();
    for case in all_cases() {
        let name = str_of(&case, "name");
        let resized = proc.resize(&reference_input(&case)).unwrap();
        let (h, w) = dims(&case, "resized_hw");
        assert_eq!((resized.height(), resized.width()), (h, w), "{name}");
        let want = read(str_of(&case, "resized_file"));
        let max = resized
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert_eq!(
            max, 0,
            "{name}: resized pixels differ from PIL by up to {max}"
        );
    }
}

/// PIL bicubic over 80 random size pairs (up, down, mixed, both pass orders) on a pattern with
/// hard edges, regenerated here exactly as the fixture script builds it.
#[test]
fn resize_sweep_is_identical_to_pil() {
    let m = manifest();
    let sweep = m["resize_sweep"].as_array().unwrap();
    assert!(sweep.len() >= 50);
    for t in sweep {
        let g = |k: &str| t[k].as_u64().unwrap() as u32;
        let img = RgbImage::from_fn(g("w"), g("h"), |x, y| {
            image::Rgb(
                [0u32, 1, 2].map(|c| (((x * x * 3 + y * 5 + c * 71) ^ ((x * y) >> 2)) & 255) as u8),
            )
        });
        let out = resize_bicubic(&img, g("out_w"), g("out_h"));
        assert_eq!(sha(out.as_raw()), str_of(t, "sha256"), "{t}");
    }
}

#[test]
fn pixel_values_match_transformers() {
    let proc = processor();
    let mut worst = 0f32;
    for case in all_cases() {
        let name = str_of(&case, "name");
        let out = proc.process(&reference_input(&case)).unwrap();
        let grid: Vec<u32> = case["grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(out.grid_thw.to_vec(), grid, "{name}");
        let shape = case["pixel_values_shape"].as_array().unwrap();
        assert_eq!(
            out.num_patches(),
            shape[0].as_u64().unwrap() as usize,
            "{name}"
        );
        assert_eq!(out.patch_dim, shape[1].as_u64().unwrap() as usize, "{name}");
        if let Some(file) = case["pixel_values_file"].as_str() {
            let want: Vec<f32> = read(file)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(want.len(), out.pixel_values.len(), "{name}");
            let max = out
                .pixel_values
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("{name}: pixel_values max |diff| vs transformers = {max:e}");
            worst = worst.max(max);
        }
        assert_eq!(
            sha(&f32_bytes(&out.pixel_values)),
            str_of(&case, "pixel_values_sha256"),
            "{name}: pixel_values are not bit-identical to transformers"
        );
    }
    assert_eq!(worst, 0.0);
}

#[test]
fn end_to_end_from_bytes() {
    let proc = processor();
    let limits = DecodeLimits::default();
    for case in manifest()["cases"].as_array().unwrap() {
        let name = str_of(case, "name");
        let (out, orig) = proc
            .process_bytes(&read(str_of(case, "file")), &limits)
            .unwrap();
        assert_eq!(orig, dims(case, "orig_hw"), "{name}");
        let tokens = proc.num_image_tokens(out.grid_thw);
        assert_eq!(tokens * 4, out.num_patches(), "{name}");
        if !is_jpeg(case) {
            assert_eq!(
                sha(&f32_bytes(&out.pixel_values)),
                str_of(case, "pixel_values_sha256"),
                "{name}"
            );
        } else {
            // Processing PIL's pixels reproduces transformers bit for bit (checked above), so
            // this is our end-to-end distance from transformers, in normalized units.
            let hf = proc.process(&reference_input(case)).unwrap();
            let max = out
                .pixel_values
                .iter()
                .zip(&hf.pixel_values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("{name}: end-to-end pixel_values max |diff| vs transformers = {max:.4}");
            assert!(max < 0.1, "{name}: {max}");
        }
    }
}

#[test]
fn dicom_is_windowed_and_plausible() {
    let limits = DecodeLimits::default();
    for case in manifest()["dicom"].as_array().unwrap() {
        let name = str_of(case, "name");
        let img =
            decode(&read(str_of(case, "file")), &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        let px = img.as_raw();
        let mean = px.iter().map(|&v| v as f64).sum::<f64>() / px.len() as f64;
        let var = px.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / px.len() as f64;
        let extreme = px.iter().filter(|&&v| v == 0 || v == 255).count() as f64 / px.len() as f64;
        println!(
            "{name}: mean {mean:.1}, std {:.1}, {:.1}% at 0/255",
            var.sqrt(),
            100.0 * extreme
        );
        assert!(
            var.sqrt() > 10.0 && extreme < 0.9,
            "{name}: implausible display image"
        );
    }
}

fn code(bytes: &[u8]) -> &'static str {
    match decode(bytes, &DecodeLimits::default()) {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

#[test]
fn malformed_inputs_get_typed_reasons() {
    assert_eq!(
        decode(&[], &DecodeLimits::default()),
        Err(Reason::ImageEmpty)
    );
    let garbage: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_eq!(code(&garbage), "image_undecodable");
    assert_eq!(code(b"GIF89a not really"), "image_undecodable");

    for file in ["jpeg420.jpg", "jpeg_progressive.jpg", "jpeg_cmyk.jpg"] {
        let b = read(file);
        for cut in [b.len() / 3, b.len() / 2, b.len() - 40, b.len() - 3, 200, 20] {
            assert_eq!(
                code(&b[..cut]),
                "image_truncated",
                "{file} cut at {cut}/{}",
                b.len()
            );
        }
        // Only EOI missing: PIL accepts it, we cannot tell it from a cut scan (see jpeg.rs).
        assert_eq!(
            code(&b[..b.len() - 2]),
            "image_truncated",
            "{file} without EOI"
        );
        // Bytes after EOI are ignored.
        let mut trailing = b.clone();
        trailing.extend_from_slice(b"trailing junk");
        assert_eq!(code(&trailing), "ok", "{file} with trailing bytes");
    }
    for file in ["down_rgb.png", "palette.png", "rgb16.png"] {
        let b = read(file);
        for cut in [b.len() / 3, b.len() / 2, b.len() - 13, 40, 20] {
            assert_eq!(
                code(&b[..cut]),
                "image_truncated",
                "{file} cut at {cut}/{}",
                b.len()
            );
        }
        assert_eq!(code(&b[..b.len() - 12]), "ok", "{file} without IEND");
    }
    // Cut exactly between chunks, before the last IDAT: the walk sees a clean ending without
    // IEND, and the decoder must still notice the missing image data.
    let b = read("down_rgb.png");
    let (mut pos, mut idat_ends) = (8usize, vec![]);
    while pos + 8 <= b.len() {
        let len = u32::from_be_bytes([b[pos], b[pos + 1], b[pos + 2], b[pos + 3]]) as usize;
        if &b[pos + 4..pos + 8] == b"IDAT" {
            idat_ends.push(pos + 12 + len);
        }
        pos += 12 + len;
    }
    assert!(
        idat_ends.len() >= 2,
        "fixture should have several IDAT chunks"
    );
    for &end in &idat_ends[..idat_ends.len() - 1] {
        assert_eq!(
            code(&b[..end]),
            "image_truncated",
            "down_rgb.png cut after an IDAT at {end}"
        );
    }
    let d = read("MR_small.dcm");
    assert_eq!(code(&d[..d.len() / 2]), "dicom_unreadable");
    let mut bad = vec![0u8; 128];
    bad.extend_from_slice(b"DICM");
    bad.extend_from_slice(&garbage[..200]);
    assert_eq!(code(&bad), "dicom_unreadable");

    let limits = DecodeLimits::default();
    for bomb in ["bomb.png", "bomb.jpg"] {
        match decode(&read(bomb), &limits) {
            Err(Reason::ImageTooLarge {
                width,
                height,
                limit,
            }) => {
                assert!(width * height > limit, "{bomb}");
                assert!(
                    width >= 60000 && height >= 60000,
                    "{bomb}: {width}x{height}"
                );
            }
            other => panic!("{bomb}: expected ImageTooLarge, got {other:?}"),
        }
    }
    assert_eq!(code(&read("aspect300.png")), "image_bad_dimensions");
    // A stricter limit applies to genuine images too.
    let small = DecodeLimits { max_pixels: 1000 };
    assert_eq!(
        decode(&read("down_rgb.png"), &small).unwrap_err().code(),
        "image_too_large"
    );
}

#[test]
fn config_from_dir_and_bad_resample() {
    let proc = processor();
    assert_eq!(
        (proc.config().min_pixels, proc.config().max_pixels),
        (3136, 50176)
    );
    let bad = PreprocessorConfig {
        resample: 2,
        ..Default::default()
    };
    assert!(ImageProcessor::new(bad)
        .unwrap_err()
        .to_string()
        .contains("resample"));
}

/// Process CPU seconds (all threads) from /proc, so the number is not skewed by other load on a
/// shared machine; None off Linux.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Throughput of decode + resize + normalize + patchify on a ~1 MP JPEG with the
/// `Qwen2VLImageProcessor` defaults (max_pixels = 28·28·1280 ≈ 1 MP: 860x1200 → 840x1176), rayon
/// limited to one thread (jpeg-decoder may still use helper threads; CPU time counts them).
/// `cargo test -p omr-data --test image_parity -- --ignored --nocapture throughput`
#[test]
#[ignore]
fn throughput_1mp_jpeg() {
    let (w, h) = (1200u32, 860u32);
    let img = RgbImage::from_fn(w, h, |x, y| {
        let check = if (x / 40 + y / 40) % 2 == 0 { 40 } else { 210 };
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, check])
    });
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
        .encode_image(&img)
        .unwrap();
    let proc = ImageProcessor::new(PreprocessorConfig::default()).unwrap();
    let limits = DecodeLimits::default();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        let n = 40;
        let (cpu0, t0) = (cpu_seconds(), std::time::Instant::now());
        for _ in 0..n {
            let (out, _) = proc.process_bytes(&jpg, &limits).unwrap();
            assert_eq!(out.grid_thw, [1, 60, 84]);
        }
        let wall = t0.elapsed().as_secs_f64() / n as f64;
        let mp = (w * h) as f64 / 1e6;
        println!(
            "{mp:.2} MP JPEG: wall {:.1} ms/image ({:.1} MP/s)",
            wall * 1e3,
            mp / wall
        );
        if let (Some(a), Some(b)) = (cpu0, cpu_seconds()) {
            let cpu = (b - a) / n as f64;
            println!(
                "{mp:.2} MP JPEG: cpu {:.1} ms/image ({:.1} MP per cpu-second)",
                cpu * 1e3,
                mp / cpu
            );
        }
        // Per stage, in CPU (and wall) ms per source MP; the resized image is ~0.96 of it.
        let decoded = decode(&jpg, &limits).unwrap();
        let resized = proc.resize(&decoded).unwrap();
        // The fastest single run is the least disturbed by other load on a shared machine.
        let stage = |label: &str, f: &dyn Fn()| {
            let (m, cpu0, t0) = (100, cpu_seconds(), std::time::Instant::now());
            let mut best = f64::INFINITY;
            for _ in 0..m {
                let t = std::time::Instant::now();
                f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            let wall = t0.elapsed().as_secs_f64() / m as f64;
            let cpu = match (cpu0, cpu_seconds()) {
                (Some(a), Some(b)) => (b - a) / m as f64,
                _ => f64::NAN,
            };
            println!(
                "  {label}: cpu {:.2} ms/MP, wall {:.2} ms/MP, fastest {:.2} ms/MP",
                cpu * 1e3 / mp,
                wall * 1e3 / mp,
                best * 1e3 / mp
            );
        };
        stage("decode", &|| {
            drop(std::hint::black_box(decode(&jpg, &limits).unwrap()))
        });
        stage("resize", &|| {
            drop(std::hint::black_box(proc.resize(&decoded).unwrap()))
        });
        stage("normalize+patchify", &|| {
            drop(std::hint::black_box(proc.process(&resized).unwrap()))
        });
    });
}
