//! The judge's on-disk cache: one small JSON file per (model, prompt), so rerunning an
//! evaluation, or resuming one that stopped on an error, asks the endpoint nothing twice.
//!
//! The key is the sha256 of the judge model's name and the full prompt (system and user
//! messages), so a changed prompt template or judge model never reads a stale answer. Files
//! live at `DIR/ab/abcdef….json` (`{"model", "reply"}`, the raw reply, parsed on read so a
//! parser fix applies to cached replies too) and are written to a temporary name and renamed,
//! so concurrent workers and killed runs never leave a torn entry. Only replies that parsed
//! are stored. An unreadable entry is ignored (and overwritten by the next answer).

use super::JudgeError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub struct Cache {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    model: String,
    reply: String,
}

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Cache {
        Cache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// sha256 of `model`, `system` and `user`, each length-prefixed so no two splits of the
    /// same bytes collide.
    pub fn key(model: &str, system: &str, user: &str) -> String {
        let mut h = Sha256::new();
        for part in [model, system, user] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.path(key)).ok()?;
        match serde_json::from_str::<Entry>(&text) {
            Ok(e) => Some(e.reply),
            Err(e) => {
                tracing::warn!(
                    "{}: unreadable cache entry ({e}), asking again",
                    self.path(key).display()
                );
                None
            }
        }
    }

    pub fn put(&self, key: &str, model: &str, reply: &str) -> Result<(), JudgeError> {
        let path = self.path(key);
        let err = |source| JudgeError::Cache {
            path: path.display().to_string(),
            source,
        };
        let parent = path.parent().expect("cache paths have a parent");
        std::fs::create_dir_all(parent).map_err(err)?;
        let tmp = parent.join(format!(
            ".{key}.tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let body = serde_json::to_string(&Entry {
            model: model.to_string(),
            reply: reply.to_string(),
        })
        .expect("strings serialize");
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_model_and_prompt_and_entries_round_trip() {
        let k = Cache::key("m", "sys", "user");
        assert_eq!(k.len(), 64);
        assert_ne!(k, Cache::key("m2", "sys", "user"));
        assert_ne!(k, Cache::key("m", "sys", "user!"));
        assert_ne!(Cache::key("ab", "c", ""), Cache::key("a", "bc", ""));
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::new(dir.path());
        assert_eq!(c.get(&k), None);
        c.put(&k, "m", "2").unwrap();
        assert_eq!(c.get(&k).as_deref(), Some("2"));
        std::fs::write(c.path(&k), "{not json").unwrap();
        assert_eq!(c.get(&k), None);
    }
}
