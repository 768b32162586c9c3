//! The few filesystem operations the commit protocol needs to be durable and atomic.
//!
//! A rename is atomic but only durable once its directory is fsynced; a file's bytes are only
//! durable once the file is fsynced. Directories are removed by renaming them to a `*.tmp-*`
//! name first ("retiring"), so a removal cut short never leaves a half-deleted `step-*` dir.

use super::error::CheckpointError;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A name suffix no other save of this or another process uses: pid, time, counter.
pub(crate) fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos:x}-{n}", std::process::id())
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Makes the entries of `dir` (creations, renames, removals) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), CheckpointError> {
    // Only Unix can open and fsync a directory; elsewhere renames are as durable as it gets.
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| CheckpointError::io("fsync directory", dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

pub(crate) fn rename(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    fs::rename(from, to).map_err(|e| CheckpointError::io("rename", from, e))
}

/// Writes `bytes` to `path` all at once: write a temp file, fsync it, rename it over `path`,
/// fsync the parent.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!("{name}.tmp-{}", unique_id()));
    let written = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| CheckpointError::io("write", &tmp, e))
        .and_then(|()| rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(parent)
}

/// Removes a file or directory tree, whichever `path` is (never following a symlink).
pub(crate) fn remove_any(path: &Path) -> Result<(), CheckpointError> {
    let meta = fs::symlink_metadata(path).map_err(|e| CheckpointError::io("stat", path, e))?;
    let removed = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    removed.map_err(|e| CheckpointError::io("remove", path, e))
}

/// Renames `path` (inside `root`) to a `*.tmp-*` name, then removes it.
pub(crate) fn retire(root: &Path, path: &Path) -> Result<(), CheckpointError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed: PathBuf = root.join(format!("{name}.tmp-{}", unique_id()));
    rename(path, &doomed)?;
    remove_any(&doomed)
}
