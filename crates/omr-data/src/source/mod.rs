//! Readers: every on-disk format becomes an indexed list of blocks of [`Sample`]s.
//!
//! A source is opened once (cheap: parquet footers, a line scan of JSONL, a header scan of tar)
//! and then read block by block, so no reader ever holds more than one block of images in
//! memory. A block is the natural read unit of its format (a parquet row group, a run of JSONL
//! lines, a run of tar samples); its row count is known at open time, which is what lets the
//! loader compute a full epoch order and resume at any sample without reading data.

use crate::quarantine::Reason;
use crate::sample::{Origin, Sample};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

mod columns;
pub mod hub;
pub mod hub_repo;
pub mod jsonl;
pub mod parquet;
pub mod paths;
mod records;
pub mod wds;

/// Format of a source; `Auto` looks at the files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Auto,
    /// HF datasets parquet as OpenMedReason ships it.
    Parquet,
    /// LLaVA / ShareGPT JSONL (`conversations` with `from`/`value`) + image folder.
    Llava,
    /// `messages` JSONL (`role` / `content` parts) + image folder.
    Messages,
    /// WebDataset tar shards (`key.jpg|png` + `key.json`).
    Wds,
}

/// One data source of a run, as written in a TOML `[[data.sources]]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Name used in metrics and quarantine records; defaults to the path or hub id.
    #[serde(default)]
    pub name: Option<String>,
    /// Local folder (dataset root) or a single file.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Hugging Face Hub dataset id (e.g. `I4Health/OpenMedReason`); uses HF_TOKEN, HF_HOME,
    /// HF_HUB_OFFLINE.
    #[serde(default)]
    pub hub: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    /// Split to read (`train`, `test`, …): selects `data/<split>-*.parquet` and friends.
    #[serde(default = "default_split")]
    pub split: String,
    #[serde(default)]
    pub format: Format,
    /// Image folder for JSONL formats; defaults to the JSONL file's folder.
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// Relative sampling weight in a mixture.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_split() -> String {
    "train".into()
}
fn default_weight() -> f64 {
    1.0
}

impl SourceSpec {
    pub fn local(path: impl Into<PathBuf>, split: &str) -> Self {
        SourceSpec {
            name: None,
            path: Some(path.into()),
            hub: None,
            revision: None,
            split: split.into(),
            format: Format::Auto,
            image_root: None,
            weight: 1.0,
        }
    }

    pub fn display_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        if let Some(h) = &self.hub {
            return format!("{h}:{}", self.split);
        }
        match &self.path {
            Some(p) => format!("{}:{}", p.display(), self.split),
            None => "unnamed".into(),
        }
    }
}

/// A whole-source failure (unlike [`Reason`], which is per record): missing folder, unreadable
/// parquet footer, Hub access denied. These stop the run at start-up with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a readable parquet file ({detail})")]
    Parquet { path: String, detail: String },
    #[error("{path}: {detail}")]
    Schema { path: String, detail: String },
    #[error("no data files for split `{split}` under {root} (looked for {pattern}); check `path` and `split`")]
    NoFiles {
        root: String,
        split: String,
        pattern: String,
    },
    #[error("cannot tell the format of {0}; set `format` to parquet, llava, messages or wds")]
    UnknownFormat(String),
    #[error("source needs exactly one of `path` or `hub` ({0})")]
    BadSpec(String),
    #[error("Hugging Face Hub: {0}")]
    Hub(String),
}

/// One read unit. `rows` is exact: `read_block` returns exactly that many entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// Index into `Source::shards()`.
    pub shard: usize,
    /// Row of the shard at which this block starts.
    pub first_row: u64,
    pub rows: usize,
}

/// An opened source. Implementations must be deterministic: the same files give the same
/// blocks in the same order with the same rows.
pub trait Source: Send + Sync {
    fn name(&self) -> &str;
    /// Shard paths relative to the source root, in a stable (sorted) order.
    fn shards(&self) -> &[String];
    fn blocks(&self) -> &[BlockInfo];
    /// Reads one block: exactly `blocks()[i].rows` entries, in row order. A record that cannot
    /// become a `Sample` is an `Err((origin, reason))` entry, never a failure of the block.
    fn read_block(&self, i: usize) -> Result<Vec<Result<Sample, (Origin, Reason)>>, SourceError>;

    /// `blocks()[i]`, or an error naming the source when `i` is out of range.
    fn block(&self, i: usize) -> Result<&BlockInfo, SourceError> {
        self.blocks()
            .get(i)
            .ok_or_else(|| SourceError::BadSpec(format!("{}: no block {i}", self.name())))
    }

    fn len(&self) -> u64 {
        self.blocks().iter().map(|b| b.rows as u64).sum()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens a source from its spec, resolving the Hub and auto-detecting the format.
///
/// Detection: a `.parquet` file or a folder with parquet files for the split → parquet;
/// `.jsonl`/`.json` (file, or split files in the folder) → LLaVA or `messages` by the first
/// record's keys; `.tar` → WebDataset. Folders are tried in that order.
pub fn open(spec: &SourceSpec) -> Result<Box<dyn Source>, SourceError> {
    let name = spec.display_name();
    let path = match (&spec.path, &spec.hub) {
        (Some(_), Some(_)) => {
            return Err(SourceError::BadSpec(format!(
                "{name}: both `path` and `hub` are set"
            )))
        }
        (None, None) => {
            return Err(SourceError::BadSpec(format!(
                "{name}: neither `path` nor `hub` is set"
            )))
        }
        (None, Some(_)) => return Ok(Box::new(hub::open(spec, &hub::HubEnv::from_process())?)),
        (Some(p), None) => p,
    };
    let meta = std::fs::metadata(path).map_err(|source| SourceError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let image_root = spec.image_root.as_deref();
    if meta.is_file() {
        let shard = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let files = vec![(shard.clone(), path.clone())];
        let format = match spec.format {
            Format::Auto if paths::has_ext(&shard, "parquet") => Format::Parquet,
            Format::Auto if paths::has_ext(&shard, "jsonl") || paths::has_ext(&shard, "json") => {
                Format::Auto
            }
            Format::Auto if paths::has_ext(&shard, "tar") => Format::Wds,
            Format::Auto => return Err(SourceError::UnknownFormat(path.display().to_string())),
            f => f,
        };
        return open_files(&name, spec, format, files, image_root);
    }
    let by_split = |ext: &str| paths::split_files(path, &spec.split, ext);
    let (format, files) = match spec.format {
        Format::Parquet => (Format::Parquet, by_split("parquet")?),
        Format::Llava | Format::Messages => (spec.format, jsonl::dir_files(path, &spec.split)?),
        Format::Wds => (Format::Wds, wds::dir_files(path, &spec.split)?),
        Format::Auto => detect_dir(path, &spec.split)?,
    };
    if files.is_empty() {
        let ext = match format {
            Format::Parquet => "parquet",
            Format::Auto | Format::Llava | Format::Messages => "jsonl",
            Format::Wds => "tar",
        };
        return Err(SourceError::NoFiles {
            root: path.display().to_string(),
            split: spec.split.clone(),
            pattern: paths::split_pattern(&spec.split, ext),
        });
    }
    open_files(&name, spec, format, files, image_root)
}

/// Picks the format of a folder by the first kind of file it has for the split. A folder
/// with data files but none for this split reports `NoFiles` (a wrong `split`), one with
/// nothing readable at all `UnknownFormat`.
fn detect_dir(
    dir: &std::path::Path,
    split: &str,
) -> Result<(Format, Vec<(String, PathBuf)>), SourceError> {
    let parquet = paths::split_files(dir, split, "parquet")?;
    if !parquet.is_empty() {
        return Ok((Format::Parquet, parquet));
    }
    let json = jsonl::dir_files(dir, split)?;
    if !json.is_empty() {
        return Ok((Format::Auto, json));
    }
    let tars = wds::dir_files(dir, split)?;
    if !tars.is_empty() {
        return Ok((Format::Wds, tars));
    }
    let all = paths::list_files(dir)?;
    for ext in ["parquet", "jsonl", "json", "tar"] {
        if all.iter().any(|f| paths::has_ext(f, ext)) {
            return Err(SourceError::NoFiles {
                root: dir.display().to_string(),
                split: split.to_string(),
                pattern: paths::split_pattern(split, ext),
            });
        }
    }
    Err(SourceError::UnknownFormat(dir.display().to_string()))
}

/// `Format::Auto` here means a JSON format still to be sniffed from the first record.
fn open_files(
    name: &str,
    spec: &SourceSpec,
    format: Format,
    files: Vec<(String, PathBuf)>,
    image_root: Option<&std::path::Path>,
) -> Result<Box<dyn Source>, SourceError> {
    Ok(match format {
        Format::Parquet => {
            let root = spec.path.as_deref().unwrap_or(std::path::Path::new("."));
            let root = if root.is_file() {
                root.parent().unwrap_or(root)
            } else {
                root
            };
            let images = paths::Confined::new(image_root.unwrap_or(root));
            Box::new(parquet::ParquetSource::open_files(name, images, files)?)
        }
        Format::Wds => Box::new(wds::WdsSource::open(name, files)?),
        Format::Auto | Format::Llava | Format::Messages => {
            Box::new(jsonl::JsonlSource::open(name, files, format, image_root)?)
        }
    })
}

/// Reads the record at `index` in file order (block order, then row), or None past the end.
/// Reads only the block that holds it.
pub fn read_row(
    source: &dyn Source,
    index: u64,
) -> Result<Option<Result<Sample, (Origin, Reason)>>, SourceError> {
    let mut first = 0u64;
    for (i, b) in source.blocks().iter().enumerate() {
        if index < first + b.rows as u64 {
            let mut rows = source.read_block(i)?;
            let at = (index - first) as usize;
            if at >= rows.len() {
                return Ok(None);
            }
            return Ok(Some(rows.swap_remove(at)));
        }
        first += b.rows as u64;
    }
    Ok(None)
}
