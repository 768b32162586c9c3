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

pub mod hub;
pub mod jsonl;
pub mod parquet;
pub mod paths;
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

    fn len(&self) -> u64 {
        self.blocks().iter().map(|b| b.rows as u64).sum()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens a source from its spec, resolving the Hub and auto-detecting the format.
pub fn open(spec: &SourceSpec) -> Result<Box<dyn Source>, SourceError> {
    let _ = spec;
    todo!("implemented by the readers")
}
