//! One revision of one Hugging Face Hub repo (dataset or model), read through the HF cache.
//!
//! hf-hub 0.4.3 reads only `HF_HOME` (cache root, `$HF_HOME/hub`; token file `$HF_HOME/token`)
//! and `HF_ENDPOINT`; it ignores `HF_TOKEN`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE`, and it has no
//! offline mode. So this module reads those variables itself into a [`HubEnv`] (only
//! [`HubEnv::from_process`] touches `std::env`, which keeps tests free of process-wide state)
//! and resolves cached files itself using the cache layout huggingface_hub and hf-hub share:
//! `<cache>/{datasets,models}--org--name/{refs/<revision>, snapshots/<commit>/<path>, blobs/}`.
//! Online, a file already in the snapshot is not downloaded again; if the Hub cannot be reached
//! the cache is used when it holds the revision, as huggingface_hub does.
//!
//! [`HubRepo`] pins a revision to a commit and lists its files once; callers then fetch the
//! files they pick (a model first reads its shard index, then fetches the shards it names).
//! [`resolve_files`] is the one-call form with a file filter.

use super::{paths, SourceError};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
pub use hf_hub::RepoType;
use hf_hub::{Cache, Repo};
use std::path::{Component, Path, PathBuf};
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

    /// The hub cache folder (the one holding `datasets--org--name`, `models--org--name`).
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

/// The local files of a Hub repo revision.
#[derive(Clone, Debug)]
pub struct HubFiles {
    pub commit: String,
    /// `<cache>/datasets--org--name`: snapshot files are symlinks into its `blobs/`.
    pub repo_dir: PathBuf,
    pub snapshot: PathBuf,
    /// `(repo path, local path)`, sorted by repo path.
    pub files: Vec<(String, PathBuf)>,
}

/// A repo revision pinned to a commit, online or from the cache.
pub struct HubRepo {
    pub id: String,
    pub kind: RepoType,
    pub revision: String,
    pub commit: String,
    /// `<cache>/models--org--name`
    pub repo_dir: PathBuf,
    pub snapshot: PathBuf,
    /// The repo's file paths, sorted: the Hub's listing online, the cached snapshot's offline.
    pub files: Vec<String>,
    mode: Mode,
}

enum Mode {
    Online {
        api: Box<ApiRepo>,
        has_token: bool,
    },
    /// Why the network is not used, for messages.
    Cached(String),
}

/// `model`, `dataset`, `space`: how messages name the repo.
pub fn noun(kind: RepoType) -> &'static str {
    match kind {
        RepoType::Model => "model",
        RepoType::Dataset => "dataset",
        RepoType::Space => "space",
    }
}

/// Finds (downloading when online) the files of `id` that `keep` accepts; an empty list is
/// not an error here.
pub fn resolve_files(
    id: &str,
    kind: RepoType,
    revision: Option<&str>,
    env: &HubEnv,
    keep: &dyn Fn(&str) -> bool,
) -> Result<HubFiles, SourceError> {
    let repo = HubRepo::open(id, kind, revision, env)?;
    let wanted: Vec<String> = repo.files.iter().filter(|f| keep(f)).cloned().collect();
    repo.files(&wanted)
}

impl HubRepo {
    /// Pins `revision` (default `main`) of `id`: asks the Hub, or reads the cache when
    /// `HF_HUB_OFFLINE` is set or the Hub is unreachable.
    pub fn open(
        id: &str,
        kind: RepoType,
        revision: Option<&str>,
        env: &HubEnv,
    ) -> Result<HubRepo, SourceError> {
        check_id(id, kind)?;
        let revision = revision.unwrap_or("main");
        let cache = env.cache_dir()?;
        if env.offline {
            return HubRepo::cached(id, kind, revision, &cache, "HF_HUB_OFFLINE is set");
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
        let repo = Repo::with_revision(id.to_string(), kind, revision.to_string());
        let api = api.repo(repo.clone());
        let info = match api.info() {
            Ok(info) => info,
            Err(e) => {
                let Some(status) = http_status(&e) else {
                    tracing::warn!("Hub unreachable ({e}); trying the local cache for {id}");
                    let why = format!("the Hub is unreachable ({e})");
                    return HubRepo::cached(id, kind, revision, &cache, &why);
                };
                return Err(SourceError::Hub(denied_message(
                    kind, id, revision, status, has_token, &e,
                )));
            }
        };
        let repo_dir = cache.join(repo.folder_name());
        let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        files.sort();
        Ok(HubRepo {
            id: id.into(),
            kind,
            revision: revision.into(),
            snapshot: repo_dir.join("snapshots").join(&info.sha),
            commit: info.sha,
            repo_dir,
            files,
            mode: Mode::Online {
                api: Box::new(api),
                has_token,
            },
        })
    }

    /// Pins `revision` from the cache alone; `why` says why the network is not used.
    pub fn cached(
        id: &str,
        kind: RepoType,
        revision: &str,
        cache: &Path,
        why: &str,
    ) -> Result<HubRepo, SourceError> {
        let noun = noun(kind);
        let repo = Repo::with_revision(id.to_string(), kind, revision.to_string());
        let repo_dir = cache.join(repo.folder_name());
        if !repo_dir.is_dir() {
            return Err(SourceError::Hub(format!(
                "{why} and {noun} {id} is not in the local cache (looked in {}); run once with \
                 network access to download it, or point HF_HOME / HF_HUB_CACHE at a cache that has it",
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
                    "{why} and revision `{revision}` of {id} is not in the local cache ({} is \
                     missing); download that revision once with network access",
                    ref_path.display()
                )))
            }
        };
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(SourceError::Hub(format!(
                "{why} and the cached snapshot {} of {id} is missing; download it again with \
                 network access",
                snapshot.display()
            )));
        }
        Ok(HubRepo {
            id: id.into(),
            kind,
            revision: revision.into(),
            commit,
            files: paths::list_files(&snapshot)?,
            repo_dir,
            snapshot,
            mode: Mode::Cached(why.into()),
        })
    }

    pub fn is_online(&self) -> bool {
        matches!(self.mode, Mode::Online { .. })
    }

    /// The local path of repo file `file`, downloaded first when online and not yet cached.
    pub fn fetch(&self, file: &str) -> Result<PathBuf, SourceError> {
        let (id, noun) = (&self.id, noun(self.kind));
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !plain
            || self
                .files
                .binary_search_by(|f| f.as_str().cmp(file))
                .is_err()
        {
            return Err(SourceError::Hub(match &self.mode {
                Mode::Online { .. } => format!(
                    "{noun} {id} (revision {}) has no file `{file}`",
                    self.revision
                ),
                Mode::Cached(why) => format!(
                    "{why} and `{file}` of {noun} {id} is not in the cached snapshot {}; \
                     download it once with network access",
                    self.snapshot.display()
                ),
            }));
        }
        let local = self.snapshot.join(file);
        let Mode::Online { api, has_token } = &self.mode else {
            return Ok(local);
        };
        let started = Instant::now();
        loop {
            if local.is_file() {
                return Ok(local);
            }
            tracing::info!("downloading {}/{file}", self.url());
            match api.download(file) {
                Ok(p) => return Ok(p),
                // Another process (another rank) is downloading this file: wait for it to
                // finish and use its copy rather than download the file twice.
                Err(ApiError::LockAcquisition(lock)) if started.elapsed() < LOCK_WAIT => {
                    tracing::info!(
                        "waiting for {} (another process is downloading {file})",
                        lock.display()
                    );
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => {
                    return Err(SourceError::Hub(match http_status(&e) {
                        Some(status) => {
                            denied_message(self.kind, id, &self.revision, status, *has_token, &e)
                        }
                        None => format!("downloading {file} of {noun} {id}: {e}"),
                    }))
                }
            }
        }
    }

    /// Fetches `wanted` (sorted) and pins the revision in the cache.
    pub fn files(&self, wanted: &[String]) -> Result<HubFiles, SourceError> {
        let mut wanted = wanted.to_vec();
        wanted.sort();
        let mut files = Vec::with_capacity(wanted.len());
        for f in wanted {
            let path = self.fetch(&f)?;
            files.push((f, path));
        }
        self.pin()?;
        Ok(HubFiles {
            commit: self.commit.clone(),
            repo_dir: self.repo_dir.clone(),
            snapshot: self.snapshot.clone(),
            files,
        })
    }

    /// Points `refs/<revision>` at the commit read, so a later offline run reads it too.
    pub fn pin(&self) -> Result<(), SourceError> {
        if !self.is_online() || self.revision == self.commit {
            return Ok(());
        }
        let repo = Repo::with_revision(self.id.clone(), self.kind, self.revision.clone());
        let root = self.repo_dir.parent().unwrap_or(&self.repo_dir);
        Cache::new(root.to_path_buf())
            .repo(repo)
            .create_ref(&self.commit)
            .map_err(|source| SourceError::Io {
                path: self.repo_dir.join("refs").display().to_string(),
                source,
            })
    }

    /// `hf://datasets/org/name@rev`, `hf://org/name@rev`: the repo in messages.
    pub fn url(&self) -> String {
        let repo = Repo::with_revision(self.id.clone(), self.kind, self.revision.clone());
        format!("hf://{}@{}", repo.url(), self.revision)
    }
}

/// `org/name` with the characters the Hub allows; anything else (`..`, extra `/`) is refused
/// before it becomes a cache folder name or a URL.
fn check_id(id: &str, kind: RepoType) -> Result<(), SourceError> {
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
            "`{id}` is not a Hub {} id (expected `org/name`)",
            noun(kind)
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

fn denied_message(
    kind: RepoType,
    id: &str,
    revision: &str,
    status: u16,
    has_token: bool,
    e: &ApiError,
) -> String {
    let noun = noun(kind);
    let page = format!(
        "https://huggingface.co/{}",
        Repo::new(id.into(), kind).url()
    );
    let token = if has_token {
        "HF_TOKEN is set but was refused: check it belongs to an account that accepted the terms"
    } else {
        "HF_TOKEN is not set: create a read token at https://huggingface.co/settings/tokens and export HF_TOKEN"
    };
    match status {
        401 | 403 => format!(
            "access to {noun} {id} denied (HTTP {status}); it is gated: accept the {noun} terms at \
             {page} while logged in, then set HF_TOKEN ({token})"
        ),
        404 => format!(
            "{noun} {id} (revision {revision}) not found (HTTP 404); check the id and revision. \
             Private and gated {noun}s also answer 404 without access: accept the terms at {page} \
             and set HF_TOKEN ({token})"
        ),
        _ => format!("request for {noun} {id} failed (HTTP {status}): {e}"),
    }
}
