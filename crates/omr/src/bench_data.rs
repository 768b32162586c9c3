//! `omr bench data`: throughput of decode + preprocess + tokenize, per core, against
//! transformers' Qwen2-VL image processor timed in the same run on the same images.
//!
//! Two image sets: the synthetic shards, and real medical images (DICOMs, e.g. from the PyPI
//! package `pydicom-data`). transformers cannot read DICOM, so for the reference ratio the
//! DICOMs are handed to both sides as the PNGs our decoder produced (same pixels, same sizes);
//! our DICOM decode is timed on its own line. Per-core numbers use one thread on our side and
//! one thread (OMP/BLAS pinned to 1) on the Python side.

use crate::exit::Tag;
use anyhow::Context;
use clap::Args;
use omr_data::image::{DecodeLimits, ImageProcessor};
use omr_data::pipeline::{ProcessConfig, Processor};
use omr_data::sample::Sample;
use omr_data::source::{self, SourceSpec};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const HF_SCRIPT: &str = include_str!("../../../scripts/bench/hf_image_processor.py");

#[derive(Args)]
pub struct BenchDataArgs {
    /// Synthetic (or any parquet/JSONL/tar) dataset; default: synthesise 256 rows in a temp dir.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Processor folder; default: the one synthesised with the data.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Folder of DICOM files (e.g. site-packages/data_store/data from `pip install pydicom-data`).
    #[arg(long)]
    pub dicom: Option<PathBuf>,
    /// Python with transformers for the reference timing; skipped when it cannot import it.
    #[arg(long, default_value = "python3")]
    pub python: String,
    #[arg(long, default_value_t = 256)]
    pub samples: usize,
    /// Passes over the images for each timing.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

struct Timing {
    items: usize,
    megapixels: f64,
    seconds: f64,
}

impl Timing {
    fn line(&self, what: &str, cores: usize) -> String {
        format!(
            "{what:<44} {:>9.1} samples/s {:>8.2} MP/s  ({:.2} MP/s per core)",
            self.items as f64 / self.seconds,
            self.megapixels / self.seconds,
            self.megapixels / self.seconds / cores as f64
        )
    }
    fn mp_per_s(&self) -> f64 {
        self.megapixels / self.seconds
    }
}

pub fn run(a: BenchDataArgs) -> crate::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (data, model) = match (&a.data, &a.model) {
        (Some(d), Some(m)) => (d.clone(), m.clone()),
        _ => {
            let out = tmp.path().join("synth");
            let args = crate::data::SynthArgs {
                out: out.clone(),
                train: a.samples,
                test: 0,
                seed: 0,
                vocab_size: 2048,
                max_pixels: omr_data::tiny::TINY_MAX_PIXELS,
                fixed_option_order: false,
            };
            let processor = crate::data::synth(&args)?;
            (
                a.data.clone().unwrap_or(out),
                a.model.clone().unwrap_or(processor),
            )
        }
    };
    let cfg = ProcessConfig {
        max_length: 16384,
        ..Default::default()
    };
    let processor = Processor::from_model_dir(&model, &cfg).usage()?;
    let src = source::open(&SourceSpec::local(&data, "train")).usage()?;
    let mut samples: Vec<Sample> = Vec::new();
    for b in 0..src.blocks().len() {
        for r in src.read_block(b)? {
            if let Ok(s) = r {
                if !s.images.is_empty() {
                    samples.push(s);
                }
            }
            if samples.len() >= a.samples {
                break;
            }
        }
        if samples.len() >= a.samples {
            break;
        }
    }
    if samples.is_empty() {
        return Err(crate::exit::Exit::usage(anyhow::anyhow!(
            "no usable sample with an image in {}",
            data.display()
        )));
    }
    let cores = rayon::current_num_threads();
    println!(
        "omr bench data: {} samples from {}, {} repeats, {} cores",
        samples.len(),
        data.display(),
        a.repeats,
        cores
    );

    // Ours, one thread: full pipeline, then image part only.
    let full1 = time(a.repeats, || {
        samples
            .iter()
            .filter_map(|s| pixels(&processor.encode(s).ok()?.image_sizes))
            .sum()
    });
    let img_only = |s: &Sample| -> Option<f64> {
        let mut mp = 0.0;
        for im in &s.images {
            let (_, (h, w)) = processor
                .image()
                .process_bytes(&im.bytes, &DecodeLimits::default())
                .ok()?;
            mp += h as f64 * w as f64 / 1e6;
        }
        Some(mp)
    };
    let img1 = time(a.repeats, || samples.iter().filter_map(img_only).sum());
    let fulln = time(a.repeats, || {
        samples
            .par_iter()
            .map(|s| {
                pixels(
                    &processor
                        .encode(s)
                        .map(|e| e.image_sizes)
                        .unwrap_or_default(),
                )
                .unwrap_or(0.0)
            })
            .sum()
    });
    println!(
        "{}",
        Timing {
            items: samples.len() * a.repeats,
            ..full1
        }
        .line("synthetic: decode+preprocess+tokenize, 1 thread", 1)
    );
    println!(
        "{}",
        Timing {
            items: samples.len() * a.repeats,
            ..img1
        }
        .line("synthetic: decode+preprocess, 1 thread", 1)
    );
    println!(
        "{}",
        Timing {
            items: samples.len() * a.repeats,
            ..fulln
        }
        .line(
            &format!("synthetic: decode+preprocess+tokenize, {cores} threads"),
            cores
        )
    );

    // Reference on the same encoded images.
    let synth_dir = tmp.path().join("synth-images");
    std::fs::create_dir_all(&synth_dir)?;
    for (i, s) in samples.iter().enumerate() {
        for (j, im) in s.images.iter().enumerate() {
            std::fs::write(synth_dir.join(format!("{i:05}-{j}.jpg")), &im.bytes)?;
        }
    }
    let ours = [
        ("decode+preprocess", img1.mp_per_s()),
        ("decode+preprocess+tokenize", full1.mp_per_s()),
    ];
    report_reference(&a, &model, &synth_dir, "synthetic", &ours);

    if let Some(dir) = &a.dicom {
        bench_dicom(&a, processor.image(), &model, dir, tmp.path())?;
    } else {
        println!("real medical images: skipped (pass --dicom DIR, e.g. the data_store/data folder of `pip install pydicom-data`)");
    }
    Ok(())
}

fn pixels(sizes: &[(u32, u32)]) -> Option<f64> {
    Some(sizes.iter().map(|&(h, w)| h as f64 * w as f64 / 1e6).sum())
}

/// Runs `pass` once to warm up, then `repeats` times; `pass` returns the megapixels it did.
fn time(repeats: usize, pass: impl Fn() -> f64) -> Timing {
    pass();
    let t = Instant::now();
    let mut mp = 0.0;
    for _ in 0..repeats.max(1) {
        mp += pass();
    }
    Timing {
        items: 0,
        megapixels: mp,
        seconds: t.elapsed().as_secs_f64(),
    }
}

fn bench_dicom(
    a: &BenchDataArgs,
    image: &ImageProcessor,
    model: &Path,
    dir: &Path,
    tmp: &Path,
) -> crate::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))
        .usage()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("dcm")))
        .collect();
    files.sort();
    let limits = DecodeLimits::default();
    let png_dir = tmp.join("dicom-png");
    std::fs::create_dir_all(&png_dir)?;
    let mut blobs = Vec::new();
    let mut pngs = Vec::new();
    let mut skipped = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f)?;
        match omr_data::image::decode(&bytes, &limits) {
            Ok(rgb) => {
                let png = png_dir.join(format!(
                    "{}.png",
                    f.file_stem().unwrap_or_default().to_string_lossy()
                ));
                crate::tensors::write_png(&rgb, &png)?;
                pngs.push(std::fs::read(&png)?);
                blobs.push(bytes);
            }
            Err(r) => skipped.push(format!(
                "{}: {r}",
                f.file_name().unwrap_or_default().to_string_lossy()
            )),
        }
    }
    println!(
        "real medical images: {} DICOMs decoded from {} ({} skipped)",
        blobs.len(),
        dir.display(),
        skipped.len()
    );
    for s in &skipped {
        println!("  skipped {s}");
    }
    if blobs.is_empty() {
        return Ok(());
    }
    let run = |set: &[Vec<u8>]| {
        time(a.repeats, || {
            set.iter()
                .filter_map(|b| image.process_bytes(b, &limits).ok())
                .map(|(_, (h, w))| h as f64 * w as f64 / 1e6)
                .sum()
        })
    };
    let dcm = run(&blobs);
    let png = run(&pngs);
    println!(
        "{}",
        Timing {
            items: blobs.len() * a.repeats,
            ..dcm
        }
        .line("DICOM: decode(window/level)+preprocess, 1 thread", 1)
    );
    println!(
        "{}",
        Timing {
            items: pngs.len() * a.repeats,
            ..png
        }
        .line("DICOM as PNG: decode+preprocess, 1 thread", 1)
    );
    report_reference(
        a,
        model,
        &png_dir,
        "DICOM as PNG",
        &[("decode+preprocess", png.mp_per_s())],
    );
    Ok(())
}

/// Times transformers on `dir` and prints the per-core ratio, or says why it could not.
/// `ours`: (what was timed, MP/s on one thread) pairs to compare.
fn report_reference(a: &BenchDataArgs, model: &Path, dir: &Path, what: &str, ours: &[(&str, f64)]) {
    let script = dir.with_extension("hf_bench.py");
    if let Err(e) = std::fs::write(&script, HF_SCRIPT) {
        println!("{what}: reference skipped ({e})");
        return;
    }
    let out = Command::new(&a.python)
        .arg(&script)
        .arg(model)
        .arg(dir)
        .arg(a.repeats.to_string())
        .env("OMP_NUM_THREADS", "1")
        .output();
    let parsed = out.ok().filter(|o| o.status.success()).and_then(|o| {
        let line = String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()?
            .to_string();
        serde_json::from_str::<serde_json::Value>(&line).ok()
    });
    match parsed {
        Some(v) => {
            let mp = v["megapixels"].as_f64().unwrap_or(0.0);
            let s = v["seconds"].as_f64().unwrap_or(f64::NAN);
            let hf = mp / s;
            println!(
                "{what}: transformers {} Qwen2VLImageProcessor (PIL decode + processor), 1 thread: {:.2} MP/s",
                v["transformers"].as_str().unwrap_or("?"),
                hf
            );
            for (label, mp_s) in ours {
                println!("{what}: ours {label} / transformers, per core = {:.2}x", mp_s / hf);
            }
        }
        None => println!(
            "{what}: reference skipped ({} cannot run transformers' Qwen2VLImageProcessor; pass --python PATH to a Python with transformers and pillow)",
            a.python
        ),
    }
}
