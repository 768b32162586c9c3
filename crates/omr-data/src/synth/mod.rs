//! `omr data synth`: a deterministic synthetic dataset in the exact Hugging Face layout and
//! schema of OpenMedReason, for tests, demos and tiny end-to-end runs without the gated data.
//!
//! `generate` writes `DIR/data/{split}-{i:05}-of-{k:05}.parquet` plus a `DIR/README.md` card.
//! Rows are pure functions of `(split, index, seed)` (see `row.rs`), generated in parallel
//! with rayon and written in index order, so the files are byte-identical for a given config
//! whatever the thread count. Each file is written under a hidden temporary name and renamed
//! into place, so an interrupted run never leaves a truncated shard that `data/train-*` would
//! match. Content: 18 tasks over five families and five modalities (`tasks/`), a short
//! templated trace that cites the visual finding, states a rule and concludes (`rubric.rs`),
//! and rubric units on the test split that quote the trace verbatim.

mod card;
mod draw;
mod row;
mod rubric;
mod tasks;
mod write;

pub use row::{synth_row, synth_row_with, synth_text, RowSpec, Split, SynthImage, SynthRow};
pub use tasks::catalogue;
pub use write::{
    hf_metadata, hf_schema, record_batch, write_rows, Compression, RawImage, RawRow, WriteOptions,
    WrittenFile, TAG_COLUMNS, UNIT_FIELDS,
};

use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthConfig {
    pub out: PathBuf,
    pub train: usize,
    pub test: usize,
    pub seed: u64,
    /// Image (width, height) in pixels.
    pub image_size: (u32, u32),
    /// Each side is drawn uniformly in `size ± size_jitter` (0: every image is `image_size`).
    pub size_jitter: u32,
    /// Parquet row-group size (the readers' block size).
    pub rows_per_group: usize,
    /// Rows per parquet file; a split of N rows gets ceil(N / rows_per_shard) files.
    pub rows_per_shard: usize,
    pub compression: Compression,
    /// Shuffle the options of each question (default); false keeps the class order.
    pub shuffle_options: bool,
}

impl SynthConfig {
    pub fn row_spec(&self) -> RowSpec {
        RowSpec {
            size: self.image_size,
            jitter: self.size_jitter,
            shuffle_options: self.shuffle_options,
        }
    }
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            out: PathBuf::from("synth"),
            train: 2000,
            test: 200,
            seed: 0,
            image_size: RowSpec::default().size,
            size_jitter: 0,
            rows_per_group: 64,
            rows_per_shard: 2000,
            compression: Compression::Snappy,
            shuffle_options: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synth config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: parquet write failed ({detail})")]
    Parquet { path: String, detail: String },
    #[error("building arrow arrays failed: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("JPEG encoding failed at {0}")]
    Image(String),
    #[error("{dir} already holds parquet files this run would not overwrite ({files}); they would be read as part of the dataset, so remove them or choose another --out")]
    StaleFiles { dir: String, files: String },
}

/// One written parquet file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardReport {
    pub split: Split,
    /// Path relative to `SynthConfig::out`, e.g. `data/train-00000-of-00001.parquet`.
    pub path: String,
    pub rows: u64,
    pub file_bytes: u64,
    pub arrow_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SynthReport {
    pub files: Vec<ShardReport>,
    /// Rows per `(split, answer letter)`, e.g. `("train", "C") → 503`.
    pub letters: BTreeMap<(String, String), usize>,
    /// Rows per task over both splits.
    pub tasks: BTreeMap<String, usize>,
    pub seconds: f64,
}

/// HF shard file name: `train-00003-of-00010.parquet`.
pub fn shard_name(split: Split, index: usize, count: usize) -> String {
    format!("{}-{index:05}-of-{count:05}.parquet", split.as_str())
}

/// `(split, rows)` → the `(file name, first row, row count)` of each shard.
fn plan_shards(split: Split, rows: usize, per_shard: usize) -> Vec<(String, usize, usize)> {
    let count = rows.div_ceil(per_shard);
    (0..count)
        .map(|i| {
            (
                shard_name(split, i, count),
                i * per_shard,
                per_shard.min(rows - i * per_shard),
            )
        })
        .collect()
}

fn validate(cfg: &SynthConfig) -> Result<(), SynthError> {
    let bad = |m: String| Err(SynthError::Config(m));
    if cfg.rows_per_group == 0 || cfg.rows_per_shard == 0 {
        return bad("rows_per_group and rows_per_shard must be at least 1".into());
    }
    let (w, h) = cfg.image_size;
    if !(16..=4096).contains(&w) || !(16..=4096).contains(&h) {
        return bad(format!(
            "image size {w}x{h} must be between 16 and 4096 pixels per side"
        ));
    }
    if cfg.size_jitter.saturating_mul(2) >= w.min(h) {
        return bad(format!(
            "size jitter {} must be under half the smaller side ({})",
            cfg.size_jitter,
            w.min(h)
        ));
    }
    if cfg.train + cfg.test == 0 {
        return bad("nothing to generate: --train and --test are both 0".into());
    }
    Ok(())
}

/// Refuses to mix this run's shards with other parquet files already in `data/`.
fn check_stale(data: &Path, planned: &[String]) -> Result<(), SynthError> {
    let io = |source| SynthError::Io {
        path: data.display().to_string(),
        source,
    };
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(data).map_err(io)? {
        let name = entry
            .map_err(io)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".parquet") && !name.starts_with('.') && !planned.contains(&name) {
            stale.push(name);
        }
    }
    stale.sort();
    if stale.is_empty() {
        Ok(())
    } else {
        Err(SynthError::StaleFiles {
            dir: data.display().to_string(),
            files: stale.join(", "),
        })
    }
}

/// Writes `data` (via `write`) to a hidden temporary next to `path`, then renames it over
/// `path`; the temporary is removed if anything fails.
fn write_atomic<T>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<T, SynthError>,
) -> Result<T, SynthError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    let result = write(&tmp).and_then(|t| {
        std::fs::rename(&tmp, path).map_err(|source| SynthError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(t)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Generates the dataset described by `cfg` under `cfg.out`.
pub fn generate(cfg: &SynthConfig) -> Result<SynthReport, SynthError> {
    validate(cfg)?;
    let started = std::time::Instant::now();
    let data = cfg.out.join("data");
    std::fs::create_dir_all(&data).map_err(|source| SynthError::Io {
        path: data.display().to_string(),
        source,
    })?;
    let shards: Vec<(Split, (String, usize, usize))> =
        [(Split::Train, cfg.train), (Split::Test, cfg.test)]
            .into_iter()
            .flat_map(|(s, n)| {
                plan_shards(s, n, cfg.rows_per_shard)
                    .into_iter()
                    .map(move |p| (s, p))
            })
            .collect();
    check_stale(
        &data,
        &shards.iter().map(|(_, p)| p.0.clone()).collect::<Vec<_>>(),
    )?;

    let spec = cfg.row_spec();
    let opts = WriteOptions {
        rows_per_group: cfg.rows_per_group,
        compression: cfg.compression,
        ..WriteOptions::default()
    };
    let mut report = SynthReport {
        files: Vec::new(),
        letters: BTreeMap::new(),
        tasks: BTreeMap::new(),
        seconds: 0.0,
    };
    for (split, (name, first, rows)) in shards {
        let generated = (first..first + rows)
            .into_par_iter()
            .map(|i| synth_row_with(split, i as u64, cfg.seed, &spec))
            .collect::<Result<Vec<_>, _>>()?;
        let mut raws = Vec::with_capacity(generated.len());
        for row in generated {
            *report
                .letters
                .entry((split.as_str().to_string(), row.answer.clone()))
                .or_default() += 1;
            *report.tasks.entry(row.task.clone()).or_default() += 1;
            raws.push(row.into_raw());
        }
        let written = write_atomic(&data.join(&name), |tmp| write_rows(tmp, &raws, &opts))?;
        tracing::info!(target: "omr::synth", "wrote data/{name}: {rows} rows, {} bytes", written.file_bytes);
        report.files.push(ShardReport {
            split,
            path: format!("data/{name}"),
            rows: rows as u64,
            file_bytes: written.file_bytes,
            arrow_bytes: written.arrow_bytes,
        });
    }
    let readme = cfg.out.join("README.md");
    let text = card::render(cfg, &report.files);
    write_atomic(&readme, |tmp| {
        std::fs::write(tmp, &text).map_err(|source| SynthError::Io {
            path: tmp.display().to_string(),
            source,
        })
    })?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Every text a model reads or writes in the set `(train, test, seed)` would generate:
/// each row's question, then its reasoning, in split and row order (train first). Images
/// are not drawn, so this is cheap enough to feed a tokenizer trainer directly.
pub fn corpus_texts(train: usize, test: usize, seed: u64) -> impl Iterator<Item = String> {
    let rows = (0..train as u64)
        .map(|i| (Split::Train, i))
        .chain((0..test as u64).map(|i| (Split::Test, i)));
    rows.flat_map(move |(split, i)| {
        let r = synth_text(split, i, seed);
        [r.question, r.reasoning]
    })
}
