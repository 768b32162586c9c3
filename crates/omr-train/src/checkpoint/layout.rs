//! Names in the checkpoints root: which entries are committed, in progress or displaced.
//!
//! `step-000123` (exactly six or more digits, as [`step_dir_name`] writes it) is committed;
//! anything with `.tmp-` in its name is a save in progress or a leftover; `step-000123.old-<id>`
//! is a committed dir moved aside while a re-save of the same step commits. Anything else
//! (`step-000123.abandoned-<id>` included) is not ours and is left alone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The hint file naming the newest committed step dir.
pub const LATEST_FILE: &str = "latest";

/// `step-000123`: zero-padded so that names sort like steps up to a million.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Committed(u64),
    Displaced(u64),
    Temp,
}

pub(crate) fn classify(name: &str) -> Option<Kind> {
    if name.contains(".tmp-") {
        return Some(Kind::Temp);
    }
    if let Some((base, id)) = name.split_once(".old-") {
        return match parse_committed(base) {
            Some(step) if !id.is_empty() => Some(Kind::Displaced(step)),
            _ => None,
        };
    }
    parse_committed(name).map(Kind::Committed)
}

/// The step of a canonical `step-NNNNNN` name; `step-12` or `step-+12` are not ours.
pub(crate) fn parse_committed(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step: u64 = digits.parse().ok()?;
    (step_dir_name(step) == name).then_some(step)
}

/// Entries of `root` that are ours, with their kind. Symlinks are never ours: a `step-*`
/// symlink could point anywhere.
pub(crate) fn scan(root: &Path) -> io::Result<Vec<(Kind, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let Some(kind) = entry.file_name().to_str().and_then(classify) else {
            continue;
        };
        let ft = entry.file_type()?;
        let ours = match kind {
            Kind::Temp => !ft.is_symlink(),
            Kind::Committed(_) | Kind::Displaced(_) => ft.is_dir(),
        };
        if ours {
            out.push((kind, entry.path()));
        }
    }
    Ok(out)
}

/// Committed step dirs under `root`, oldest first; empty when `root` does not exist or cannot
/// be read (logged). Committed means renamed into place, not verified: see
/// [`load_latest`](super::load_latest) and [`verify`](super::verify).
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let entries = match scan(root) {
        Ok(entries) => entries,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot list checkpoints in {}: {e}", root.display());
            }
            return Vec::new();
        }
    };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .into_iter()
        .filter_map(|(kind, path)| match kind {
            Kind::Committed(step) => Some((step, path)),
            _ => None,
        })
        .collect();
    steps.sort();
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classify() {
        assert_eq!(step_dir_name(7), "step-000007");
        assert_eq!(step_dir_name(12_345_678), "step-12345678");
        assert_eq!(classify("step-000007"), Some(Kind::Committed(7)));
        assert_eq!(classify("step-12345678"), Some(Kind::Committed(12_345_678)));
        assert_eq!(classify("step-7"), None);
        assert_eq!(classify("step-0000007"), None);
        assert_eq!(classify("step-+00007"), None);
        assert_eq!(classify("step-"), None);
        assert_eq!(classify("step-000007.tmp-1-2-3"), Some(Kind::Temp));
        assert_eq!(classify("latest.tmp-1-2-3"), Some(Kind::Temp));
        assert_eq!(classify("step-000007.old-1-2-3"), Some(Kind::Displaced(7)));
        assert_eq!(classify("step-000007.old-x.tmp-y"), Some(Kind::Temp));
        assert_eq!(classify("step-000007.old-"), None);
        assert_eq!(classify("step-000007.abandoned-1-2-3"), None);
        assert_eq!(classify("latest"), None);
        assert_eq!(classify("notes.txt"), None);
    }
}
