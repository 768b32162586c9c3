//! Hugging Face Hub datasets (`I4Health/OpenMedReason`): list, download into the HF cache,
//! then read as local parquet whose shard names are the repo paths.
//!
//! hf-hub 0.4.3 reads only `HF_HOME` (cache root, `$HF_HOME/hub`; token file `$HF_HOME/token`)
//! and `HF_ENDPOINT`; it ignores `HF_TOKEN`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE`, and it has no
//! offline mode. So this module reads those variables itself into a [`HubEnv`] (only
//! [`HubEnv::from_process`] touches `std::env`, which keeps tests free of process-wide state)
//! and resolves cached files itself using the cache layout huggingface_hub and hf-hub share:
//! `<cache>/datasets--org--name/{refs/<revision>, snapshots/<commit>/<repo path>, blobs/}`.
//! Online, a file already in the snapshot is not downloaded again; if the Hub cannot be reached
//! the cache is used when it holds the revision, as huggingface_hub does.

use super::parquet::ParquetSource;
use super::paths::{self, Confined};
use super::{Format, SourceError, SourceSpec};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment the Hub reader obeys, read once.
#[derive(Clone, Debug, Default)]
pub struct HubEnv {
    /// `HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`); without it the token file that
    /// `huggingface-cli login` writes (`$HF_HOME/token`) is used.
    pub token: Option<String>,
    /// `HF_HOME`; the cache is `$HF_HOME/hub`.
    pub hf_home: Option<PathBuf>,
    /// `HF_HUB_CACHE`, which overrides `$HF_HOME/hub`.
    pub hub_cache: Option<PathBuf>,
    /// `HF_HUB_OFFLINE` set to 1/true/yes/on: never touch the network.
    pub offline: bool,
    /// `HF_ENDPOINT` (mirrors); default `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// `HOME`, for the default cache `~/.cache/huggingface/hub`.
    pub home: Option<PathBuf>,
}

impl HubEnv {
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        HubEnv {
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
            hf_home: var("HF_HOME").map(PathBuf::from),
            hub_cache: var("HF_HUB_CACHE").map(PathBuf::from),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            }),
            endpoint: var("HF_ENDPOINT"),
            home: var("HOME").map(PathBuf::from),
        }
    }

    /// The hub cache folder (the one holding `datasets--org--name`).
    pub fn cache_dir(&self) -> Result<PathBuf, SourceError> {
        if let Some(c) = &self.hub_cache {
            return Ok(c.clone());
        }
        if let Some(h) = &self.hf_home {
            return Ok(h.join("hub"));
        }
        match &self.home {
            Some(h) => Ok(h.join(".cache").join("huggingface").join("hub")),
            None => Err(SourceError::Hub(
                "cannot locate the Hugging Face cache: set HF_HOME".into(),
            )),
        }
    }

    /// The token to send: `token`, else the login token file under `HF_HOME`.
    fn effective_token(&self) -> Option<String> {
        if self.token.is_some() {
            return self.token.clone();
        }
        let home = match (&self.hf_home, &self.home) {
            (Some(h), _) => h.clone(),
            (None, Some(h)) => h.join(".cache").join("huggingface"),
            (None, None) => return None,
        };
        let t = std::fs::read_to_string(home.join("token")).ok()?;
        let t = t.trim();
        (!t.is_empty()).then(|| t.to_string())
    }
}

/// How long to wait for another process (another rank) that holds the download lock of a
/// file before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(3600);

/// The local files of one split of a Hub dataset.
#[derive(Clone, Debug)]
pub struct HubFiles {
    pub commit: String,
    /// `<cache>/datasets--org--name`: snapshot files are symlinks into its `blobs/`.
    pub repo_dir: PathBuf,
    pub snapshot: PathBuf,
    /// `(repo path, local path)`, sorted by repo path.
    pub files: Vec<(String, PathBuf)>,
}

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
    check_id(id)?;
    let revision = revision.unwrap_or("main");
    let cache = env.cache_dir()?;
    if env.offline {
        return resolve_cached(id, revision, split, &cache, "HF_HUB_OFFLINE is set");
    }
    let token = env.effective_token();
    let has_token = token.is_some();
    let mut builder = ApiBuilder::from_cache(Cache::new(cache.clone()))
        .with_progress(false)
        .with_retries(3)
        .with_token(token);
    if let Some(e) = &env.endpoint {
        builder = builder.with_endpoint(e.clone());
    }
    let api = builder
        .build()
        .map_err(|e| SourceError::Hub(format!("cannot start the Hub client: {e}")))?;
    let repo = Repo::with_revision(id.to_string(), RepoType::Dataset, revision.to_string());
    let api_repo = api.repo(repo.clone());
    let info = match api_repo.info() {
        Ok(info) => info,
        Err(e) => {
            let Some(status) = http_status(&e) else {
                tracing::warn!("Hub unreachable ({e}); trying the local cache for {id}");
                return resolve_cached(
                    id,
                    revision,
                    split,
                    &cache,
                    &format!("the Hub is unreachable ({e})"),
                );
            };
            return Err(SourceError::Hub(denied_message(
                id, revision, status, has_token, &e,
            )));
        }
    };
    let cache_repo = Cache::new(cache.clone()).repo(repo.clone());
    let repo_dir = cache.join(repo.folder_name());
    let snapshot = repo_dir.join("snapshots").join(&info.sha);
    let mut wanted: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| paths::split_matches(f, split, "parquet"))
        .collect();
    wanted.sort();
    if wanted.is_empty() {
        return Err(SourceError::NoFiles {
            root: format!("hf://datasets/{id}@{revision}"),
            split: split.into(),
            pattern: paths::split_pattern(split, "parquet"),
        });
    }
    let mut files = Vec::with_capacity(wanted.len());
    for f in wanted {
        let local = snapshot.join(&f);
        let started = Instant::now();
        let path = loop {
            if local.is_file() {
                break local;
            }
            tracing::info!("downloading hf://datasets/{id}/{f}");
            match api_repo.download(&f) {
                Ok(p) => break p,
                // Another process (another rank) is downloading this file: wait for it to
                // finish and use its copy rather than download the file twice.
                Err(ApiError::LockAcquisition(lock)) if started.elapsed() < LOCK_WAIT => {
                    tracing::info!(
                        "waiting for {} (another process is downloading {f})",
                        lock.display()
                    );
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(SourceError::Hub(match http_status(&e) {
                        Some(status) => denied_message(id, revision, status, has_token, &e),
                        None => format!("downloading {f} of {id}: {e}"),
                    }))
                }
            }
        };
        files.push((f, path));
    }
    if revision != info.sha {
        // Keep `refs/<revision>` pointing at what was read, so a later offline run reads it too.
        cache_repo
            .create_ref(&info.sha)
            .map_err(|source| SourceError::Io {
                path: repo_dir.join("refs").display().to_string(),
                source,
            })?;
    }
    Ok(HubFiles {
        commit: info.sha,
        repo_dir,
        snapshot,
        files,
    })
}

/// Resolves a split from the cache alone; `why` says why the network is not used.
pub fn resolve_cached(
    id: &str,
    revision: &str,
    split: &str,
    cache: &Path,
    why: &str,
) -> Result<HubFiles, SourceError> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Dataset, revision.to_string());
    let repo_dir = cache.join(repo.folder_name());
    if !repo_dir.is_dir() {
        return Err(SourceError::Hub(format!(
            "{why} and dataset {id} is not in the local cache (looked in {}); run once with network \
             access to download it, or point HF_HOME / HF_HUB_CACHE at a cache that has it",
            repo_dir.display()
        )));
    }
    let ref_path = repo_dir.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(c) => c.trim().to_string(),
        // A commit hash is its own snapshot name, with no ref.
        Err(_) if repo_dir.join("snapshots").join(revision).is_dir() => revision.to_string(),
        Err(_) => {
            return Err(SourceError::Hub(format!(
            "{why} and revision `{revision}` of {id} is not in the local cache ({} is missing); \
                 download that revision once with network access",
            ref_path.display()
        )))
        }
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(SourceError::Hub(format!(
            "{why} and the cached snapshot {} of {id} is missing; download it again with network access",
            snapshot.display()
        )));
    }
    let files = paths::split_files(&snapshot, split, "parquet")?;
    if files.is_empty() {
        return Err(SourceError::NoFiles {
            root: format!("{} (offline cache of {id}@{revision})", snapshot.display()),
            split: split.into(),
            pattern: paths::split_pattern(split, "parquet"),
        });
    }
    Ok(HubFiles {
        commit,
        repo_dir,
        snapshot,
        files,
    })
}

/// `org/name` with the characters the Hub allows; anything else (`..`, extra `/`) is refused
/// before it becomes a cache folder name or a URL.
fn check_id(id: &str) -> Result<(), SourceError> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() <= 2 && parts.iter().all(|p| ok_part(p)) {
        Ok(())
    } else {
        Err(SourceError::BadSpec(format!(
            "`{id}` is not a Hub dataset id (expected `org/name`)"
        )))
    }
}

/// The HTTP status of a failed request. hf-hub wraps ureq's error, whose message reads
/// `<url>: status code <n>`; reading it from the message spares a direct ureq dependency.
fn http_status(e: &ApiError) -> Option<u16> {
    if !matches!(e, ApiError::RequestError(_) | ApiError::TooManyRetries(_)) {
        return None;
    }
    let msg = e.to_string();
    let at = msg.find("status code ")? + "status code ".len();
    msg[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

fn denied_message(id: &str, revision: &str, status: u16, has_token: bool, e: &ApiError) -> String {
    let page = format!("https://huggingface.co/datasets/{id}");
    let token = if has_token {
        "HF_TOKEN is set but was refused: check it belongs to an account that accepted the terms"
    } else {
        "HF_TOKEN is not set: create a read token at https://huggingface.co/settings/tokens and export HF_TOKEN"
    };
    match status {
        401 | 403 => format!(
            "access to dataset {id} denied (HTTP {status}); it is gated: accept the dataset terms at \
             {page} while logged in, then set HF_TOKEN ({token})"
        ),
        404 => format!(
            "dataset {id} (revision {revision}) not found (HTTP 404); check the id and revision. Private \
             and gated datasets also answer 404 without access: accept the terms at {page} and set \
             HF_TOKEN ({token})"
        ),
        _ => format!("request for dataset {id} failed (HTTP {status}): {e}"),
    }
}
