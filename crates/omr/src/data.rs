//! `omr data …`: synthesise shards, validate data before a run, render one encoded sample,
//! preprocess one image for comparison with transformers.

use crate::exit::{Exit, Tag};
use anyhow::Context;
use clap::{Args, Subcommand};
use omr_data::pipeline::{ProcessConfig, Processor};
use omr_data::quarantine::{Quarantine, QuarantineBudget};
use omr_data::source::{self, Format, SourceSpec};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Write synthetic OpenMedReason-style shards (HF parquet layout) and a tiny processor
    /// (tokenizer, chat template, preprocessor config) under OUT.
    Synth(SynthArgs),
    /// Pre-flight: run every record through the training pipeline, report and quarantine.
    Validate(ValidateArgs),
    /// Print one sample's tokens with their loss mask.
    Render(RenderArgs),
    /// Write `pixel_values` and `image_grid_thw` for one image as safetensors.
    Preprocess(PreprocessArgs),
    /// Stream batches of a `[data]` config (mixture, shuffle, packing) and print their stats.
    Batches(BatchesArgs),
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Vocabulary size of the tiny tokenizer trained on the synthetic corpus.
    #[arg(long, default_value_t = 2048)]
    pub vocab_size: usize,
    /// Image-area cap of the processor (pixels; 50176 = 224×224 → 64 image tokens).
    #[arg(long, default_value_t = omr_data::tiny::TINY_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Keep options in class order instead of shuffling them (see the demo).
    #[arg(long)]
    pub fixed_option_order: bool,
}

/// Where the data is: a local folder/file or a Hub dataset id.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Local dataset folder or file.
    #[arg(long, conflicts_with = "hub")]
    pub data: Option<PathBuf>,
    /// Hugging Face Hub dataset id (HF_TOKEN, HF_HOME, HF_HUB_OFFLINE are honoured).
    #[arg(long)]
    pub hub: Option<String>,
    #[arg(long, default_value = "train")]
    pub split: String,
    /// auto | parquet | llava | messages | wds
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Image folder for JSONL formats (default: the JSONL file's folder).
    #[arg(long)]
    pub image_root: Option<PathBuf>,
}

impl DataArgs {
    pub fn spec(&self) -> Result<SourceSpec, Exit> {
        let format: Format = serde_json::from_value(serde_json::Value::String(self.format.clone()))
            .map_err(|_| {
                Exit::usage(anyhow::anyhow!(
                    "unknown --format {:?}; use auto, parquet, llava, messages or wds",
                    self.format
                ))
            })?;
        if self.data.is_none() && self.hub.is_none() {
            return Err(Exit::usage(anyhow::anyhow!(
                "give --data DIR or --hub ORG/NAME"
            )));
        }
        Ok(SourceSpec {
            path: self.data.clone(),
            hub: self.hub.clone(),
            split: self.split.clone(),
            format,
            image_root: self.image_root.clone(),
            ..SourceSpec::local("", &self.split)
        })
    }
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model or processor folder: tokenizer.json, chat template, preprocessor_config.json.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Decompression-bomb guard: largest decoded image, in pixels.
    #[arg(long, default_value_t = 64_000_000)]
    pub max_image_pixels: u64,
}

impl ModelArgs {
    pub fn processor(&self) -> Result<Processor, Exit> {
        let cfg = ProcessConfig {
            max_length: self.max_length,
            max_image_pixels: self.max_image_pixels,
            ..Default::default()
        };
        Processor::from_model_dir(&self.model, &cfg).usage()
    }
}

#[derive(Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// A data config (TOML with `[[sources]]`): validate every source of the mixture.
    #[arg(long, conflicts_with_all = ["data", "hub"])]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where rejected records go (appended).
    #[arg(long, default_value = "quarantine.jsonl")]
    pub quarantine: PathBuf,
    /// Also write the report as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Budget: most bad records tolerated.
    #[arg(long)]
    pub max_bad: Option<u64>,
    /// Budget: largest tolerated fraction of bad records.
    #[arg(long, default_value_t = 0.01)]
    pub max_bad_fraction: f64,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Record index in file order.
    #[arg(long, default_value_t = 0)]
    pub index: u64,
}

#[derive(Args)]
pub struct BatchesArgs {
    /// Data config (TOML): `[[sources]]` with weights, `[loader]`, `[process]`, `[batch]`,
    /// `[quarantine]`.
    #[arg(long)]
    pub config: PathBuf,
    /// Model or processor folder.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value = "quarantine.jsonl")]
    pub quarantine: PathBuf,
}

#[derive(Args)]
pub struct PreprocessArgs {
    /// Folder holding preprocessor_config.json.
    #[arg(long)]
    pub processor: PathBuf,
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 64_000_000)]
    pub max_image_pixels: u64,
}

pub fn run(cmd: DataCmd) -> crate::Result<()> {
    match cmd {
        DataCmd::Synth(a) => synth(&a).map(|_| ()),
        DataCmd::Validate(a) => validate(&a),
        DataCmd::Render(a) => render(&a),
        DataCmd::Preprocess(a) => preprocess(&a),
        DataCmd::Batches(a) => crate::batches::run(&a),
    }
}

/// Returns the processor folder it wrote.
pub fn synth(a: &SynthArgs) -> crate::Result<PathBuf> {
    let cfg = omr_data::synth::SynthConfig {
        out: a.out.clone(),
        train: a.train,
        test: a.test,
        seed: a.seed,
        shuffle_options: !a.fixed_option_order,
        ..Default::default()
    };
    let report = omr_data::synth::generate(&cfg)
        .with_context(|| format!("synthesising into {}", a.out.display()))?;
    let processor = a.out.join("processor");
    omr_data::tiny::write_tiny_processor_with(
        &processor,
        a.train,
        a.seed,
        a.vocab_size,
        a.max_pixels,
    )
    .with_context(|| format!("writing the tiny processor into {}", processor.display()))?;
    eprintln!("synthesised in {:.1}s", report.seconds);
    eprintln!(
        "processor (tokenizer, chat template, preprocessor config): {}",
        processor.display()
    );
    Ok(processor)
}

pub fn validate(a: &ValidateArgs) -> crate::Result<()> {
    let specs = match &a.config {
        Some(path) => {
            omr_data::config::DataConfig::from_file(path)
                .usage()?
                .sources
        }
        None => vec![a.data.spec()?],
    };
    let mut sources = Vec::new();
    for spec in &specs {
        sources.push(source::open(spec).usage()?);
    }
    let processor = a.model.processor()?;
    let budget = QuarantineBudget {
        max_bad: a.max_bad,
        max_bad_fraction: Some(a.max_bad_fraction),
        min_seen: 0,
    };
    let mut q = Quarantine::new(Some(&a.quarantine), budget)?;
    let image_token = processor.image_token_id();
    let p = std::sync::Arc::new(processor);
    let report = omr_data::validate::validate(
        sources,
        move |s| p.encode(s),
        image_token,
        a.threads,
        &mut q,
    )?;
    println!("{}", report.render());
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.bad > 0 {
        println!("rejected records: {}", a.quarantine.display());
    }
    if report.over_budget {
        return Err(Exit::bad_data(
            q.check_final()
                .err()
                .map(anyhow::Error::from)
                .unwrap_or_else(|| anyhow::anyhow!("bad-data budget exceeded")),
        ));
    }
    Ok(())
}

pub fn render(a: &RenderArgs) -> crate::Result<()> {
    let src = source::open(&a.data.spec()?).usage()?;
    let processor = a.model.processor()?;
    let sample = omr_data::source::read_row(src.as_ref(), a.index)
        .usage()?
        .ok_or_else(|| {
            Exit::usage(anyhow::anyhow!(
                "--index {} is past the end ({} records)",
                a.index,
                src.len()
            ))
        })?;
    let sample =
        sample.map_err(|(origin, reason)| Exit::bad_data(anyhow::anyhow!("{origin}: {reason}")))?;
    let enc = processor
        .encode(&sample)
        .map_err(|r| Exit::bad_data(anyhow::anyhow!("{}: {r}", sample.origin)))?;
    println!(
        "{}  tokens {}  supervised {}  images {}",
        sample.origin,
        enc.len(),
        enc.supervised_tokens(),
        enc.image_grid_thw.len()
    );
    println!("{}", processor.render_debug(&enc));
    Ok(())
}

pub fn preprocess(a: &PreprocessArgs) -> crate::Result<()> {
    let image = omr_data::image::ImageProcessor::from_dir(&a.processor).usage()?;
    let bytes = std::fs::read(&a.image)
        .with_context(|| format!("reading {}", a.image.display()))
        .usage()?;
    let limits = omr_data::image::DecodeLimits {
        max_pixels: a.max_image_pixels,
        ..Default::default()
    };
    let (p, _) = image
        .process_bytes(&bytes, &limits)
        .map_err(|r| Exit::bad_data(anyhow::anyhow!("{}: {r}", a.image.display())))?;
    crate::tensors::write_processed(&a.out, &p)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "{}: pixel_values ({}, {}) image_grid_thw {:?} -> {}",
        a.image.display(),
        p.pixel_values.len() / p.patch_dim,
        p.patch_dim,
        p.grid_thw,
        a.out.display()
    );
    Ok(())
}
