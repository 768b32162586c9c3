//! `save`: write into a temp dir, fsync, manifest, rename into place, update `latest`, prune.
//!
//! The order is RELIABILITY.md's commit protocol; every step before the rename into place can
//! fail and is undone by removing the temp dir, so earlier checkpoints are never touched. Once
//! the rename is done the checkpoint counts: failing to update the `latest` hint or to prune
//! afterwards is logged, not returned, since loading needs neither.

use super::durable::{fsync_dir, remove_any, rename, retire, unique_id, write_atomic};
use super::error::CheckpointError;
use super::layout::{list, scan, step_dir_name, Kind, LATEST_FILE};
use super::manifest;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Saves checkpoint `step` under `root` (`<run_dir>/checkpoints`) and returns its committed
/// directory `root/step-{step:06}`.
///
/// `write` receives an empty temp directory and writes the checkpoint's files into it (any
/// names, subdirectories allowed, except `MANIFEST.json`; regular files only). If it fails,
/// or anything before the commit fails, the temp dir is removed and the error returned.
/// A re-save of an existing step replaces it: the old dir is moved aside, the new one renamed
/// in, and the old one removed only then (a crash in between leaves the old one loadable).
/// Afterwards committed dirs of later steps (left by a run that was resumed from an older
/// checkpoint) are renamed to `step-N.abandoned-<id>`, only the newest `keep_last` committed
/// checkpoints are kept (the one just written always is), and leftovers of interrupted saves
/// are removed. One writer per `root`.
pub fn save<E>(
    root: &Path,
    step: u64,
    keep_last: usize,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<PathBuf, CheckpointError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if keep_last == 0 {
        return Err(CheckpointError::Config {
            key: "checkpoint.keep_last",
            why: "must be at least 1 (the checkpoint just written is always kept)".into(),
        });
    }
    let started = Instant::now();
    create_root(root)?;
    // Leftovers first: a crashed save's temp dir may be what filled the disk.
    recover_displaced(root);
    sweep_temps(root);

    let id = unique_id();
    let name = step_dir_name(step);
    let tmp = root.join(format!("{name}.tmp-{id}"));
    fs::create_dir(&tmp).map_err(|e| CheckpointError::io("create directory", &tmp, e))?;
    let staged = write(&tmp)
        .map_err(|e| CheckpointError::Write {
            dir: tmp.clone(),
            source: e.into(),
        })
        .and_then(|()| manifest::build(&tmp, step))
        .and_then(|m| {
            manifest::write(&tmp, &m)?;
            fsync_dir(&tmp)?;
            Ok(m)
        });
    let built = match staged {
        Ok(m) => m,
        Err(e) => {
            discard(&tmp);
            return Err(e);
        }
    };

    let dir = root.join(&name);
    commit(root, &tmp, &dir, &id)?;

    if let Err(e) = write_atomic(&root.join(LATEST_FILE), format!("{name}\n").as_bytes()) {
        tracing::warn!(
            "checkpoint {} committed, but the `latest` hint was not updated: {e}",
            dir.display()
        );
    }
    set_aside_newer(root, step, &id);
    prune(root, keep_last, step);
    sweep_temps(root);
    tracing::info!(
        "checkpoint {} committed ({} files, {:.1} MB, {:.1} s)",
        dir.display(),
        built.files.len(),
        built.total_bytes() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(dir)
}

fn create_root(root: &Path) -> Result<(), CheckpointError> {
    if root.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(|e| CheckpointError::io("create directory", root, e))?;
    // The new root's own entry must survive a crash too.
    match root.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => fsync_dir(parent),
        _ => Ok(()),
    }
}

/// Renames `tmp` to `dir`, moving an existing `dir` aside first and removing it after.
fn commit(root: &Path, tmp: &Path, dir: &Path, id: &str) -> Result<(), CheckpointError> {
    let displaced = match fs::symlink_metadata(dir) {
        Ok(_) => {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            let old = root.join(format!("{name}.old-{id}"));
            if let Err(e) = rename(dir, &old) {
                discard(tmp);
                return Err(e);
            }
            Some(old)
        }
        Err(_) => None,
    };
    if let Err(e) = rename(tmp, dir) {
        if let Some(old) = &displaced {
            if let Err(undo) = rename(old, dir) {
                tracing::warn!(
                    "could not move {} back after a failed commit: {undo}",
                    old.display()
                );
            }
        }
        discard(tmp);
        return Err(e);
    }
    fsync_dir(root)?;
    if let Some(old) = displaced {
        if let Err(e) = retire(root, &old) {
            tracing::warn!("replaced checkpoint left behind: {e}");
        }
    }
    Ok(())
}

/// Removes a temp dir after a failure; the error being returned matters more than this one.
fn discard(tmp: &Path) {
    if let Err(e) = remove_any(tmp) {
        tracing::warn!("could not remove the temporary checkpoint directory: {e}");
    }
}

/// Committed dirs newer than the step just saved belong to a timeline this run left (it
/// resumed from an older checkpoint, by choice or past damaged newer ones); loading one after
/// a crash would jump back onto it. They are renamed to a name that is not ours, kept for the
/// user to inspect or delete.
fn set_aside_newer(root: &Path, just_saved: u64, id: &str) {
    let newer: Vec<(u64, PathBuf)> = list(root)
        .into_iter()
        .filter(|(step, _)| *step > just_saved)
        .collect();
    for (_, dir) in &newer {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let aside = root.join(format!("{name}.abandoned-{id}"));
        match rename(dir, &aside) {
            Ok(()) => tracing::warn!(
                "{} is newer than the step just saved, from before this run resumed an older checkpoint; moved it to {} (delete it when it is no longer needed)",
                dir.display(),
                aside.display()
            ),
            Err(e) => tracing::warn!("could not set aside a checkpoint of an abandoned run: {e}"),
        }
    }
    if !newer.is_empty() {
        if let Err(e) = fsync_dir(root) {
            tracing::warn!("{e}");
        }
    }
}

/// Keeps the `keep_last - 1` newest committed dirs besides the one just written.
fn prune(root: &Path, keep_last: usize, just_saved: u64) {
    let others: Vec<(u64, PathBuf)> = list(root)
        .into_iter()
        .filter(|(step, _)| *step != just_saved)
        .collect();
    let excess = others.len().saturating_sub(keep_last - 1);
    for (_, dir) in others.into_iter().take(excess) {
        match retire(root, &dir) {
            Ok(()) => tracing::debug!("pruned checkpoint {}", dir.display()),
            Err(e) => tracing::warn!("could not prune an old checkpoint: {e}"),
        }
    }
}

/// Removes every `*.tmp-*` entry: saves and removals cut short. Best effort.
fn sweep_temps(root: &Path) {
    let Ok(entries) = scan(root) else { return };
    for (kind, path) in entries {
        if kind == Kind::Temp {
            match remove_any(&path) {
                Ok(()) => tracing::debug!("removed leftover {}", path.display()),
                Err(e) => tracing::warn!("could not remove a leftover temp entry: {e}"),
            }
        }
    }
}

/// A `step-N.old-*` dir is what a crash during a re-save of step N left: redundant once
/// `step-N` exists, the only copy of step N otherwise, so it is moved back.
fn recover_displaced(root: &Path) {
    let Ok(entries) = scan(root) else { return };
    for (kind, old) in entries {
        let Kind::Displaced(step) = kind else {
            continue;
        };
        let dir = root.join(step_dir_name(step));
        let outcome = if dir.exists() {
            retire(root, &old)
        } else {
            rename(&old, &dir).and_then(|()| fsync_dir(root))
        };
        if let Err(e) = outcome {
            tracing::warn!(
                "could not tidy up the displaced checkpoint {}: {e}",
                old.display()
            );
        }
    }
}
