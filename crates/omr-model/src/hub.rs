//! A model given as a local folder or a Hugging Face Hub id, resolved to a local folder.
//!
//! Hub access (HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT, the shared cache
//! layout, gated-access messages) is the dataset reader's, [`omr_data::source::hub_repo`], so
//! both obey the environment the same way. Only the files a training run needs are fetched:
//! `config.json`, the weights (`model.safetensors`, or the index and every shard it names, or a
//! single `*.safetensors`), and the generation/tokenizer/processor/template files of
//! [`crate::export::PROCESSOR_FILES`] that the repo has; never other frameworks' weights.

use crate::export::PROCESSOR_FILES;
use crate::weights::{read_index, INDEX_FILE, SINGLE_FILE};
use crate::{ModelError, Result};
use omr_data::source::hub_repo::{HubEnv, HubRepo, RepoType};
use omr_data::source::SourceError;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The local folder of `id_or_path`: an existing folder as is, else the HF cache snapshot of
/// Hub model `org/name` at `revision` (default `main`), downloaded when online.
pub fn resolve_model(id_or_path: &str, revision: Option<&str>, env: &HubEnv) -> Result<PathBuf> {
    let local = Path::new(id_or_path);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    if looks_like_path(id_or_path) {
        return Err(ModelError::io(
            local,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "model folder not found (give an existing folder or a Hub id `org/name`)",
            ),
        ));
    }
    let repo = HubRepo::open(id_or_path, RepoType::Model, revision, env).map_err(hub_error)?;
    let has = |f: &str| repo.files.binary_search_by(|x| x.as_str().cmp(f)).is_ok();
    if !has("config.json") {
        // `fetch` words this for online and cached repos alike.
        return Err(hub_error(repo.fetch("config.json").err().unwrap_or_else(
            || SourceError::Hub(format!("{}: no config.json", repo.url())),
        )));
    }
    let mut wanted = vec!["config.json".to_string()];
    wanted.extend(
        PROCESSOR_FILES
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string()),
    );
    wanted.extend(weight_files(&repo, &has)?);
    repo.files(&wanted).map_err(hub_error)?;
    tracing::info!("model {} → {}", repo.url(), repo.snapshot.display());
    Ok(repo.snapshot)
}

/// The repo's weight files, in the order `weights::weight_files` prefers them.
fn weight_files(repo: &HubRepo, has: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
    if has(SINGLE_FILE) {
        return Ok(vec![SINGLE_FILE.into()]);
    }
    if has(INDEX_FILE) {
        let index = repo.fetch(INDEX_FILE).map_err(hub_error)?;
        let shards: BTreeSet<String> = read_index(&index)?.into_values().collect();
        let mut files = vec![INDEX_FILE.to_string()];
        files.extend(shards);
        return Ok(files);
    }
    let top: Vec<&String> = repo
        .files
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
        .collect();
    match top.as_slice() {
        [one] => Ok(vec![(*one).clone()]),
        _ => Err(ModelError::Hub(format!(
            "{}: no safetensors weights to load ({}); the model needs model.safetensors, \
             {INDEX_FILE} with its shards, or a single *.safetensors file",
            repo.url(),
            if top.is_empty() {
                "none in the repo".to_string()
            } else {
                format!("several without an index: {top:?}")
            }
        ))),
    }
}

/// Local-looking arguments never go to the Hub: a typo in a path should say so, not 404.
fn looks_like_path(s: &str) -> bool {
    s.starts_with(['/', '.', '~']) || s.matches('/').count() > 1 || s.contains('\\')
}

fn hub_error(e: SourceError) -> ModelError {
    match e {
        SourceError::Hub(msg) => ModelError::Hub(msg),
        SourceError::Io { path, source } => ModelError::io(path, source),
        SourceError::BadSpec(msg) => ModelError::Input(msg),
        other => ModelError::Hub(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folders_and_paths_never_reach_the_hub() {
        let dir = tempfile::tempdir().unwrap();
        let env = HubEnv {
            offline: true,
            ..HubEnv::default()
        };
        let p = dir.path().to_str().unwrap();
        assert_eq!(resolve_model(p, None, &env).unwrap(), dir.path());
        let missing = format!("{p}/nope");
        let e = resolve_model(&missing, None, &env).unwrap_err().to_string();
        assert!(
            e.contains("model folder not found") && e.contains(&missing),
            "{e}"
        );
        let e = resolve_model("org/bad name", None, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a Hub model id"), "{e}");
    }

    #[test]
    fn offline_without_cache_says_model() {
        let home = tempfile::tempdir().unwrap();
        let env = HubEnv {
            hf_home: Some(home.path().to_path_buf()),
            offline: true,
            ..HubEnv::default()
        };
        let e = resolve_model("Qwen/Qwen2-VL-2B-Instruct", None, &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HF_HUB_OFFLINE") && e.contains("model Qwen/Qwen2-VL-2B-Instruct"),
            "{e}"
        );
    }
}
