//! `MANIFEST.json`: the list of a checkpoint's files with their sizes and sha256.
//!
//! A directory is a checkpoint only with a manifest, and a checkpoint is valid only if every
//! listed file has exactly the listed size and hash. Files the manifest does not list are
//! ignored: readers must only trust listed files. Listed paths are relative, `/`-separated,
//! without `.`/`..`/empty components, and may not pass through symlinks (RELIABILITY.md
//! security), so a manifest can never make the loader read outside its directory.

use super::error::CheckpointError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "MANIFEST.json";
pub const FORMAT_VERSION: u32 = 1;

/// A manifest is a few KB; anything larger is not one of ours, and is not read into memory.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    pub files: Vec<FileEntry>,
    pub created_unix: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the checkpoint directory, `/`-separated.
    pub path: String,
    pub bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Reads `dir/MANIFEST.json` and checks every listed file's size and sha256: the check
/// `omr export --checkpoint DIR` runs on one directory, and what loading runs on each candidate.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let manifest = read(dir)?;
    for entry in &manifest.files {
        let path = dir.join(&entry.path);
        check_no_symlinked_parent(dir, &entry.path)?;
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::FileMissing { path })
            }
            Err(e) => return Err(CheckpointError::io("stat", path, e)),
        };
        if !meta.is_file() {
            return Err(CheckpointError::NotRegularFile { path });
        }
        if meta.len() != entry.bytes {
            return Err(CheckpointError::SizeMismatch {
                path,
                expected: entry.bytes,
                found: meta.len(),
            });
        }
        let (bytes, sha256) = hash_file(&path)?;
        if bytes != entry.bytes {
            return Err(CheckpointError::SizeMismatch {
                path,
                expected: entry.bytes,
                found: bytes,
            });
        }
        if sha256 != entry.sha256 {
            return Err(CheckpointError::HashMismatch {
                path,
                expected: entry.sha256.clone(),
                found: sha256,
            });
        }
    }
    Ok(manifest)
}

/// A listed `sub/file` must not reach through a symlinked `sub` to somewhere else.
fn check_no_symlinked_parent(dir: &Path, entry: &str) -> Result<(), CheckpointError> {
    let mut at = dir.to_path_buf();
    let mut parts: Vec<&str> = entry.split('/').collect();
    parts.pop();
    for part in parts {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(CheckpointError::NotRegularFile { path: at }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::FileMissing {
                    path: dir.join(entry),
                })
            }
            Err(e) => return Err(CheckpointError::io("stat", at, e)),
        }
    }
    Ok(())
}

/// Parses and checks the manifest itself (version, paths), not the files it lists.
fn read(dir: &Path) -> Result<Manifest, CheckpointError> {
    let path = dir.join(MANIFEST_FILE);
    let invalid = |reason: String| CheckpointError::ManifestInvalid {
        path: path.clone(),
        reason,
    };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::ManifestMissing { path })
        }
        Err(e) => return Err(CheckpointError::io("open", path, e)),
    };
    let mut text = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| CheckpointError::io("read", &path, e))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(invalid(format!("larger than {MAX_MANIFEST_BYTES} bytes")));
    }
    // Version first, so a manifest from a newer format says so instead of "unknown field".
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
    let version = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| invalid("no numeric `format_version`".into()))?;
    if version != u64::from(FORMAT_VERSION) {
        return Err(CheckpointError::UnsupportedVersion {
            path,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let manifest: Manifest = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    let mut seen = BTreeSet::new();
    for entry in &manifest.files {
        let unsafe_path = |why| CheckpointError::UnsafePath {
            manifest: path.clone(),
            entry: entry.path.clone(),
            why,
        };
        check_entry_path(&entry.path).map_err(unsafe_path)?;
        if !seen.insert(entry.path.as_str()) {
            return Err(invalid(format!("{:?} is listed twice", entry.path)));
        }
        if entry.sha256.len() != 64 || !entry.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("{:?} has a malformed sha256", entry.path)));
        }
    }
    Ok(manifest)
}

/// Hashes (and fsyncs) every file under `dir`, which the caller has just written, and returns
/// their manifest. Subdirectories are fsynced too, so every listed entry is durable.
pub(crate) fn build(dir: &Path, step: u64) -> Result<Manifest, CheckpointError> {
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        step,
        files,
        created_unix: super::durable::unix_now(),
    })
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<FileEntry>) -> Result<(), CheckpointError> {
    let entries = fs::read_dir(dir).map_err(|e| CheckpointError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::io("list", dir, e))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|e| CheckpointError::io("stat", &path, e))?;
        if ft.is_dir() {
            collect(root, &path, out)?;
        } else if ft.is_file() {
            let rel = relative_name(root, &path)?;
            let (bytes, sha256) = hash_file(&path)?;
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| CheckpointError::io("fsync", &path, e))?;
            out.push(FileEntry {
                path: rel,
                bytes,
                sha256,
            });
        } else {
            return Err(CheckpointError::NotRegularFile { path });
        }
    }
    super::durable::fsync_dir(dir)
}

/// `path` relative to `root`, as the `/`-separated UTF-8 string the manifest stores.
fn relative_name(root: &Path, path: &Path) -> Result<String, CheckpointError> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let mut parts = Vec::new();
    for part in rel.components() {
        match part.as_os_str().to_str() {
            Some(s) => parts.push(s),
            None => {
                return Err(CheckpointError::BadName {
                    path: path.to_path_buf(),
                    why: "not valid UTF-8",
                })
            }
        }
    }
    let name = parts.join("/");
    if name == MANIFEST_FILE {
        return Err(CheckpointError::ReservedName {
            path: path.to_path_buf(),
        });
    }
    check_entry_path(&name).map_err(|why| CheckpointError::BadName {
        path: path.to_path_buf(),
        why,
    })?;
    Ok(name)
}

/// Rejects anything but a plain relative path: the manifest must not reach outside its dir.
pub(crate) fn check_entry_path(p: &str) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("empty path");
    }
    if p.starts_with('/') {
        return Err("absolute path");
    }
    if p.contains('\\') || p.contains(':') || p.contains('\0') {
        return Err("`\\`, `:` or NUL in the path (only `/` separates components)");
    }
    for part in p.split('/') {
        match part {
            "" => return Err("empty component"),
            "." | ".." => return Err("`.` or `..` component"),
            _ => {}
        }
    }
    if p == MANIFEST_FILE {
        return Err("the manifest cannot list itself");
    }
    Ok(())
}

/// Streams the file through sha256: checkpoints are GBs, never read whole into memory.
fn hash_file(path: &Path) -> Result<(u64, String), CheckpointError> {
    let mut file = File::open(path).map_err(|e| CheckpointError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| CheckpointError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// Writes `dir/MANIFEST.json` and fsyncs it; the directory itself is fsynced by the caller.
pub(crate) fn write(dir: &Path, manifest: &Manifest) -> Result<(), CheckpointError> {
    let path: PathBuf = dir.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| CheckpointError::Io {
        op: "serialize",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    use std::io::Write;
    File::create(&path)
        .and_then(|mut f| {
            f.write_all(&json)?;
            f.sync_all()
        })
        .map_err(|e| CheckpointError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths() {
        for ok in [
            "weights.safetensors",
            "tok/tokenizer.json",
            "a/b/c.bin",
            "..x",
            "x..",
        ] {
            assert_eq!(check_entry_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            ".",
            "C:\\x",
            "a\\..\\b",
            "MANIFEST.json",
        ] {
            assert!(check_entry_path(bad).is_err(), "{bad:?} must be rejected");
        }
    }
}
