//! `load_latest`: the newest checkpoint that verifies, falling back past damaged ones.
//!
//! `latest` is only a hint (a crash can land between the commit and its update, and it can
//! name a dir that was later damaged), so loading scans the `step-*` dirs newest first and
//! verifies each; the hint is only used to say when it was wrong.

use super::error::CheckpointError;
use super::layout::{parse_committed, scan, Kind, LATEST_FILE};
use super::manifest::{verify, Manifest};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Loaded {
    /// The verified checkpoint directory; read only the files its manifest lists.
    pub dir: PathBuf,
    pub step: u64,
    pub manifest: Manifest,
    /// Newer directories that were rejected, with the reason, newest first.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The newest committed checkpoint under `root` whose manifest parses and whose listed files
/// all match their size and sha256. `Ok(None)` when there is no checkpoint at all (a fresh
/// run); an error when there are some but none is valid, since silently starting over would
/// throw a long run away.
pub fn load_latest(root: &Path) -> Result<Option<Loaded>, CheckpointError> {
    let entries = match scan(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::io("list", root, e)),
    };
    // Newest step first; for one step, the committed dir before one displaced by a re-save
    // that a crash interrupted.
    let mut candidates: Vec<(u64, bool, PathBuf)> = entries
        .into_iter()
        .filter_map(|(kind, path)| match kind {
            Kind::Committed(step) => Some((step, true, path)),
            Kind::Displaced(step) => Some((step, false, path)),
            Kind::Temp => None,
        })
        .collect();
    candidates.sort_by(|a, b| b.cmp(a));

    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    for (step, _, dir) in candidates {
        let checked = verify(&dir).and_then(|m| {
            if m.step == step {
                Ok(m)
            } else {
                Err(CheckpointError::StepMismatch {
                    dir: dir.clone(),
                    expected: step,
                    found: m.step,
                })
            }
        });
        match checked {
            Ok(manifest) => {
                if !skipped.is_empty() {
                    tracing::warn!(
                        "falling back to checkpoint {} (step {step}) after rejecting {} newer one(s)",
                        dir.display(),
                        skipped.len()
                    );
                }
                check_hint(root, step);
                return Ok(Some(Loaded {
                    dir,
                    step,
                    manifest,
                    skipped,
                }));
            }
            Err(e) => {
                tracing::warn!("rejecting checkpoint {}: {e}", dir.display());
                skipped.push((dir, e.to_string()));
            }
        }
    }
    if skipped.is_empty() {
        Ok(None)
    } else {
        Err(CheckpointError::NoValidCheckpoint {
            root: root.to_path_buf(),
            rejected: skipped,
        })
    }
}

/// Says when `latest` named something newer than what loaded (missing, damaged, or bogus).
/// An older hint is normal: the crash fell between a commit and the hint's update.
fn check_hint(root: &Path, loaded: u64) {
    let path = root.join(LATEST_FILE);
    let Ok(text) = fs::read_to_string(&path) else {
        return;
    };
    match parse_committed(text.trim()) {
        Some(hinted) if hinted > loaded => tracing::warn!(
            "{} names step {hinted}, which is missing or damaged; loaded step {loaded}",
            path.display()
        ),
        Some(_) => {}
        None => tracing::warn!(
            "{} does not name a step directory ({:?}); ignored",
            path.display(),
            text.trim()
        ),
    }
}
