//! Paths inside a dataset: confinement of record-supplied paths, and split file discovery.
//!
//! Records (JSONL image fields, HF `Image.path`) name files by path, and a dataset downloaded
//! from anywhere must not be able to read `/etc/passwd` or `~/.ssh` through them
//! (RELIABILITY.md, Security). [`Confined`] checks twice: lexically (`..` may not climb above
//! the root, an absolute path must lie under it) and after `canonicalize` (a symlink inside
//! the root may not point outside it). The file is then read through the canonical path, so
//! the checked path is the one opened.
//!
//! Split discovery mirrors the HF datasets conventions on `/`-separated relative paths, so the
//! local reader and the Hub reader pick the same files: `data/<split>-*.<ext>`,
//! `data/<split>.<ext>`, `data/<split>/*.<ext>`, `<split>-*.<ext>`, `<split>.<ext>`,
//! `<split>/*.<ext>`.

use crate::quarantine::Reason;
use crate::source::SourceError;
use std::path::{Component, Path, PathBuf};

/// How deep split discovery looks below a dataset root (`data/<split>/x.parquet` is depth 3).
const MAX_DEPTH: usize = 3;

/// A dataset root that record paths are confined to.
#[derive(Clone, Debug)]
pub struct Confined {
    /// Root that relative paths are joined to and lexically checked against.
    root: PathBuf,
    /// Folder the canonical target must lie in; `None` if it could not be canonicalized (then
    /// every lookup reports the file as not found rather than guessing).
    bound: Option<PathBuf>,
}

impl Confined {
    pub fn new(root: &Path) -> Self {
        Confined::with_bound(root, root)
    }

    /// Paths are joined to `root` but their canonical form must lie under `bound`. The Hub
    /// cache needs this: a snapshot folder holds symlinks into the repo's `blobs/` folder.
    pub fn with_bound(root: &Path, bound: &Path) -> Self {
        let root = absolute(root);
        Confined {
            bound: bound.canonicalize().ok(),
            root,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves `rel` to an existing file under the root: [`Reason::PathEscapesRoot`] for any
    /// escape, [`Reason::ImageNotFound`] when the file does not exist.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, Reason> {
        let escapes = || Reason::PathEscapesRoot(rel.to_string());
        let candidate = Path::new(rel);
        let joined = if candidate.is_absolute() {
            normalize(candidate).ok_or_else(escapes)?
        } else {
            let mut p = self.root.clone();
            for c in candidate.components() {
                match c {
                    Component::Normal(s) => p.push(s),
                    Component::CurDir => {}
                    Component::ParentDir => {
                        if p == self.root || !p.pop() {
                            return Err(escapes());
                        }
                    }
                    Component::RootDir | Component::Prefix(_) => return Err(escapes()),
                }
            }
            p
        };
        if !joined.starts_with(&self.root) {
            return Err(escapes());
        }
        let canonical = match joined.canonicalize() {
            Ok(c) => c,
            Err(_) => return Err(Reason::ImageNotFound(joined.display().to_string())),
        };
        match &self.bound {
            Some(bound) if canonical.starts_with(bound) => Ok(canonical),
            Some(_) => Err(escapes()),
            None => Err(Reason::ImageNotFound(joined.display().to_string())),
        }
    }

    /// Resolves and reads a file; a file that exists but cannot be read is reported as not
    /// found with the OS error, which is what the user has to fix either way.
    pub fn read(&self, rel: &str) -> Result<Vec<u8>, Reason> {
        if rel.trim().is_empty() {
            return Err(Reason::ImageMissing);
        }
        let path = self.resolve(rel)?;
        if !path.is_file() {
            return Err(Reason::ImageNotFound(format!(
                "{} (not a file)",
                path.display()
            )));
        }
        std::fs::read(&path).map_err(|e| Reason::ImageNotFound(format!("{}: {e}", path.display())))
    }
}

/// One-shot form of [`Confined::resolve`].
pub fn resolve_confined(root: &Path, rel: &str) -> Result<PathBuf, Reason> {
    Confined::new(root).resolve(rel)
}

/// Makes `p` absolute against the current directory without touching the file system, so that
/// lexical checks compare like with like.
fn absolute(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    normalize(&joined).unwrap_or(joined)
}

/// Lexically removes `.` and `..`; `None` if `..` climbs above the file system root.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Some(out)
}

/// Whether the `/`-separated relative path `rel` is a data file of `split` with extension
/// `ext` under the HF datasets naming conventions (module docs).
pub fn split_matches(rel: &str, split: &str, ext: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    let Some(file) = parts.last() else {
        return false;
    };
    let Some(stem) = file.strip_suffix(ext).and_then(|s| s.strip_suffix('.')) else {
        return false;
    };
    let named = stem == split || stem.strip_prefix(split).is_some_and(|r| r.starts_with('-'));
    match parts.as_slice() {
        [_] => named,
        ["data", _] => named,
        [dir, _] => *dir == split,
        ["data", dir, _] => *dir == split,
        _ => false,
    }
}

/// The patterns of [`split_matches`], for error messages.
pub fn split_pattern(split: &str, ext: &str) -> String {
    format!(
        "data/{split}-*.{ext}, data/{split}.{ext}, data/{split}/*.{ext}, {split}-*.{ext}, \
         {split}.{ext}, {split}/*.{ext}"
    )
}

/// Every file under `root` (up to [`MAX_DEPTH`] levels) as sorted `/`-separated relative
/// paths. Hidden entries (`.git`, `.cache`) are skipped.
pub fn list_files(root: &Path) -> Result<Vec<String>, SourceError> {
    let mut out = Vec::new();
    walk(root, "", 1, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<String>) -> Result<(), SourceError> {
    let io = |source| SourceError::Io {
        path: dir.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        // `metadata` follows symlinks: the Hub cache's snapshot files are symlinks to blobs.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                walk(&entry.path(), &rel, depth + 1, out)?;
            }
        } else if meta.is_file() {
            out.push(rel);
        }
    }
    Ok(())
}

/// Files of `split` with extension `ext` under `root`, as `(relative name, path)` in sorted
/// order.
pub fn split_files(
    root: &Path,
    split: &str,
    ext: &str,
) -> Result<Vec<(String, PathBuf)>, SourceError> {
    Ok(list_files(root)?
        .into_iter()
        .filter(|rel| split_matches(rel, split, ext))
        .map(|rel| {
            let path = root.join(&rel);
            (rel, path)
        })
        .collect())
}

/// Split names that, when present in file names, mean a folder is split by name.
const KNOWN_SPLITS: &[&str] = &["train", "test", "validation", "valid", "val", "dev", "eval"];

/// Files of `split` if the folder names files by split; otherwise (no file carries any known
/// split name) every top-level `*.<ext>`. A folder holding only `train-*` files therefore
/// gives nothing for `test` instead of silently serving the training files.
pub fn split_or_all(
    root: &Path,
    split: &str,
    ext: &str,
) -> Result<Vec<(String, PathBuf)>, SourceError> {
    let all: Vec<String> = list_files(root)?
        .into_iter()
        .filter(|r| has_ext(r, ext))
        .collect();
    let pick = |keep: &dyn Fn(&str) -> bool| -> Vec<(String, PathBuf)> {
        all.iter()
            .filter(|r| keep(r))
            .map(|r| (r.clone(), root.join(r)))
            .collect()
    };
    let matched = pick(&|r| split_matches(r, split, ext));
    if !matched.is_empty() {
        return Ok(matched);
    }
    if all
        .iter()
        .any(|r| KNOWN_SPLITS.iter().any(|s| split_matches(r, s, ext)))
    {
        return Ok(Vec::new());
    }
    Ok(pick(&|r| !r.contains('/')))
}

/// Whether `rel` ends in `.<ext>` (ASCII case-insensitive).
pub fn has_ext(rel: &str, ext: &str) -> bool {
    rel.rsplit_once('.')
        .is_some_and(|(_, e)| e.eq_ignore_ascii_case(ext))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_patterns() {
        assert!(split_matches(
            "data/train-00000-of-00002.parquet",
            "train",
            "parquet"
        ));
        assert!(split_matches("data/train.parquet", "train", "parquet"));
        assert!(split_matches("train/0.parquet", "train", "parquet"));
        assert!(split_matches("data/test/a.parquet", "test", "parquet"));
        assert!(split_matches("train-0.tar", "train", "tar"));
        assert!(!split_matches(
            "data/training-0.parquet",
            "train",
            "parquet"
        ));
        assert!(!split_matches("data/test-0.parquet", "train", "parquet"));
        assert!(!split_matches("data/train-0.json", "train", "parquet"));
        assert!(!split_matches("x/y/train-0.parquet", "train", "parquet"));
    }

    #[test]
    fn lexical_escapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Confined::new(dir.path());
        for bad in ["../x.jpg", "a/../../x.jpg", "/etc/passwd"] {
            assert_eq!(
                c.resolve(bad),
                Err(Reason::PathEscapesRoot(bad.into())),
                "{bad}"
            );
        }
        assert!(matches!(
            c.resolve("a/../missing.jpg"),
            Err(Reason::ImageNotFound(_))
        ));
    }
}
