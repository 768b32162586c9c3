//! Hugging Face Hub datasets (`I4Health/OpenMedReason`): list, download into the HF cache,
//! then read as local parquet whose shard names are the repo paths.
//!
//! The Hub access itself (environment, cache layout, offline mode, gated-access messages) is
//! shared with model downloads and lives in [`super::hub_repo`]; this module only picks a
//! split's parquet files.

use super::parquet::ParquetSource;
use super::paths::{self, Confined};
use super::{Format, SourceError, SourceSpec};
use std::path::Path;

pub use super::hub_repo::{noun, resolve_files, HubEnv, HubFiles, HubRepo, RepoType};

/// Opens a Hub dataset split as parquet.
pub fn open(spec: &SourceSpec, env: &HubEnv) -> Result<ParquetSource, SourceError> {
    let id = spec
        .hub
        .as_deref()
        .ok_or_else(|| SourceError::BadSpec("no `hub` id".into()))?;
    if !matches!(spec.format, Format::Auto | Format::Parquet) {
        return Err(SourceError::BadSpec(format!(
            "hub source {id}: only HF datasets parquet is read from the Hub; download other formats and set `path`"
        )));
    }
    let hub = resolve(id, spec.revision.as_deref(), &spec.split, env)?;
    let images = Confined::with_bound(&hub.snapshot, &hub.repo_dir);
    ParquetSource::open_files(&spec.display_name(), images, hub.files)
}

/// Finds (downloading when online) the parquet files of `split` in dataset `id`.
pub fn resolve(
    id: &str,
    revision: Option<&str>,
    split: &str,
    env: &HubEnv,
) -> Result<HubFiles, SourceError> {
    let repo = HubRepo::open(id, RepoType::Dataset, revision, env)?;
    split_files(&repo, split)
}

/// Resolves a split from the cache alone; `why` says why the network is not used.
pub fn resolve_cached(
    id: &str,
    revision: &str,
    split: &str,
    cache: &Path,
    why: &str,
) -> Result<HubFiles, SourceError> {
    let repo = HubRepo::cached(id, RepoType::Dataset, revision, cache, why)?;
    split_files(&repo, split)
}

fn split_files(repo: &HubRepo, split: &str) -> Result<HubFiles, SourceError> {
    let wanted: Vec<String> = repo
        .files
        .iter()
        .filter(|f| paths::split_matches(f, split, "parquet"))
        .cloned()
        .collect();
    if wanted.is_empty() {
        let root = if repo.is_online() {
            format!("hf://datasets/{}@{}", repo.id, repo.revision)
        } else {
            format!(
                "{} (offline cache of {}@{})",
                repo.snapshot.display(),
                repo.id,
                repo.revision
            )
        };
        return Err(SourceError::NoFiles {
            root,
            split: split.into(),
            pattern: paths::split_pattern(split, "parquet"),
        });
    }
    repo.files(&wanted)
}
