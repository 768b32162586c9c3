//! The checkpoint commit protocol (RELIABILITY.md) against a real filesystem: pruning, every
//! kind of damage falling back to the previous checkpoint, failed saves, SIGKILL mid-save,
//! the `latest` hint, re-saves of one step, and unsafe manifest paths.
//!
//! Checkpoint content is a deterministic function of (step, salt), so any loaded checkpoint
//! can be compared byte for byte with what was written for its step. The SIGKILL test lives in
//! `checkpoint/sigkill.rs`.

#[path = "checkpoint/sigkill.rs"]
mod sigkill;

use omr_train::checkpoint::{self, CheckpointError, Loaded, LATEST_FILE, MANIFEST_FILE};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// (name, size) of the files a test checkpoint holds; `weights.bin` is a few MB.
fn layout(weights_bytes: usize) -> [(&'static str, usize); 3] {
    [
        ("weights.bin", weights_bytes),
        ("state.json", 100),
        ("tokenizer/config.toml", 3000),
    ]
}

/// Deterministic bytes for one file of one step (splitmix64 stream).
fn content(step: u64, salt: u64, name: &str, len: usize) -> Vec<u8> {
    let mut x = step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt ^ (name.len() as u64) << 56;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn writer(step: u64, salt: u64, weights_bytes: usize) -> impl FnOnce(&Path) -> io::Result<()> {
    move |dir: &Path| {
        fs::create_dir(dir.join("tokenizer"))?;
        for (name, len) in layout(weights_bytes) {
            fs::write(dir.join(name), content(step, salt, name, len))?;
        }
        Ok(())
    }
}

fn save(root: &Path, step: u64, keep_last: usize) -> PathBuf {
    checkpoint::save(root, step, keep_last, writer(step, 0, 4096)).unwrap()
}

/// The loaded checkpoint holds exactly what was written for its step: no more, no less.
fn assert_exact(loaded: &Loaded, salt: u64, weights_bytes: usize) {
    let mut listed: Vec<&str> = loaded
        .manifest
        .files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    listed.sort();
    let mut expected: Vec<&str> = layout(weights_bytes).iter().map(|(n, _)| *n).collect();
    expected.sort();
    assert_eq!(listed, expected, "{}", loaded.dir.display());
    for (name, len) in layout(weights_bytes) {
        let got = fs::read(loaded.dir.join(name)).unwrap();
        assert!(
            got == content(loaded.step, salt, name, len),
            "{name} of step {}",
            loaded.step
        );
    }
}

/// Names of the entries of `root`, sorted.
fn entries(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn leftovers(root: &Path) -> Vec<String> {
    let mut names = entries(root);
    names.retain(|n| n.contains(".tmp-") || n.contains(".old-"));
    names
}

#[test]
fn keeps_last_two_of_five_and_points_latest_at_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run/checkpoints");
    for step in [100, 200, 300, 400, 500] {
        let dir = save(&root, step, 2);
        assert_eq!(dir, root.join(format!("step-{step:06}")));
    }
    assert_eq!(entries(&root), ["latest", "step-000400", "step-000500"]);
    assert_eq!(
        fs::read_to_string(root.join(LATEST_FILE)).unwrap().trim(),
        "step-000500"
    );
    let steps: Vec<u64> = checkpoint::list(&root).iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [400, 500]);
    let loaded = checkpoint::load_latest(&root).unwrap().unwrap();
    assert_eq!((loaded.step, loaded.skipped.len()), (500, 0));
    assert_exact(&loaded, 0, 4096);
    assert!(
        checkpoint::save(&root, 600, 0, writer(600, 0, 1)).is_err(),
        "keep_last 0"
    );
}

#[test]
fn fresh_root_loads_none_and_lists_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(checkpoint::load_latest(&tmp.path().join("nope"))
        .unwrap()
        .is_none());
    assert!(checkpoint::load_latest(tmp.path()).unwrap().is_none());
    assert!(checkpoint::list(&tmp.path().join("nope")).is_empty());
}

/// Three checkpoints, the newest damaged by `damage`: loading falls back to step 2 and names
/// step 3 with a reason containing `why`.
fn falls_back(damage: impl FnOnce(&Path), why: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for step in 1..=3 {
        save(root, step, 3);
    }
    damage(&root.join("step-000003"));
    let loaded = checkpoint::load_latest(root).unwrap().unwrap();
    assert_eq!(loaded.step, 2);
    assert_exact(&loaded, 0, 4096);
    assert_eq!(loaded.skipped.len(), 1);
    let (dir, reason) = &loaded.skipped[0];
    assert_eq!(dir, &root.join("step-000003"));
    assert!(
        reason.contains(why),
        "reason {reason:?} should mention {why:?}"
    );
    assert!(checkpoint::verify(&root.join("step-000003")).is_err());
    assert!(checkpoint::verify(&root.join("step-000002")).is_ok());
}

#[test]
fn flipped_byte_falls_back() {
    falls_back(
        |dir| {
            let path = dir.join("weights.bin");
            let mut bytes = fs::read(&path).unwrap();
            bytes[1234] ^= 0x01;
            fs::write(&path, bytes).unwrap();
        },
        "sha256",
    );
}

#[test]
fn truncated_file_falls_back() {
    falls_back(
        |dir| {
            let f = fs::OpenOptions::new()
                .write(true)
                .open(dir.join("tokenizer/config.toml"));
            f.unwrap().set_len(10).unwrap();
        },
        "has 10 bytes but the manifest says 3000",
    );
}

#[test]
fn missing_file_falls_back() {
    falls_back(
        |dir| fs::remove_file(dir.join("state.json")).unwrap(),
        "missing",
    );
}

#[test]
fn deleted_manifest_falls_back() {
    falls_back(
        |dir| fs::remove_file(dir.join(MANIFEST_FILE)).unwrap(),
        "MANIFEST.json is missing",
    );
}

#[test]
fn garbage_manifest_falls_back() {
    falls_back(
        |dir| fs::write(dir.join(MANIFEST_FILE), b"{\"format_version\": 1, \"st").unwrap(),
        "not a valid manifest",
    );
}

#[test]
fn future_manifest_version_falls_back() {
    falls_back(
        |dir| fs::write(dir.join(MANIFEST_FILE), br#"{"format_version": 9}"#).unwrap(),
        "format_version 9",
    );
}

/// Rewrites the newest manifest so that one entry is `path`, with the true size and hash of
/// the file it reaches: only the path check can reject it.
fn escaping_manifest(path: &str) {
    falls_back(
        |dir| {
            let target = dir.join(path);
            let bytes = fs::read(&target).unwrap();
            let mut m: serde_json::Value =
                serde_json::from_slice(&fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
            m["files"][0] = serde_json::json!({
                "path": path,
                "bytes": bytes.len(),
                "sha256": sha256_hex(&bytes),
            });
            fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        },
        "unsafe path",
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn manifest_with_dotdot_path_is_rejected() {
    escaping_manifest("../step-000002/weights.bin");
}

#[test]
fn manifest_with_absolute_path_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside.bin");
    fs::write(&outside, b"secret").unwrap();
    escaping_manifest(outside.to_str().unwrap());
}

#[test]
fn all_damaged_is_an_error_not_a_fresh_start() {
    let tmp = tempfile::tempdir().unwrap();
    for step in 1..=2 {
        let dir = save(tmp.path(), step, 3);
        fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
    }
    match checkpoint::load_latest(tmp.path()) {
        Err(CheckpointError::NoValidCheckpoint { rejected, .. }) => assert_eq!(rejected.len(), 2),
        other => panic!("expected NoValidCheckpoint, got {other:?}"),
    }
}

#[test]
fn failing_write_removes_its_temp_dir_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    save(root, 1, 3);
    let result = checkpoint::save(root, 2, 3, |dir: &Path| -> io::Result<()> {
        fs::write(dir.join("weights.bin"), content(2, 0, "weights.bin", 4096))?;
        Err(io::Error::new(
            io::ErrorKind::StorageFull,
            "No space left on device",
        ))
    });
    let err = result.unwrap_err();
    assert!(matches!(err, CheckpointError::Write { .. }), "{err:?}");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert_eq!(entries(root), ["latest", "step-000001"]);
    let loaded = checkpoint::load_latest(root).unwrap().unwrap();
    assert_eq!(loaded.step, 1);
    assert_exact(&loaded, 0, 4096);

    // A caller writing the reserved manifest name fails the same clean way.
    let err = checkpoint::save(root, 2, 3, |dir: &Path| {
        fs::write(dir.join(MANIFEST_FILE), b"{}")
    });
    assert!(
        matches!(err, Err(CheckpointError::ReservedName { .. })),
        "{err:?}"
    );
    assert_eq!(entries(root), ["latest", "step-000001"]);
}

#[cfg(unix)]
#[test]
fn symlinks_are_refused_on_save_and_on_load() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpt");
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("config.toml"), b"x").unwrap();
    let err = checkpoint::save(&root, 1, 3, |dir: &Path| {
        std::os::unix::fs::symlink(&outside, dir.join("linked"))
    });
    assert!(
        matches!(err, Err(CheckpointError::NotRegularFile { .. })),
        "{err:?}"
    );
    assert!(leftovers(&root).is_empty());

    // A committed dir whose `tokenizer/` was swapped for a symlink to identical content.
    save(&root, 1, 3);
    let dir = save(&root, 2, 3);
    fs::write(
        outside.join("config.toml"),
        content(2, 0, "tokenizer/config.toml", 3000),
    )
    .unwrap();
    fs::remove_dir_all(dir.join("tokenizer")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("tokenizer")).unwrap();
    let loaded = checkpoint::load_latest(&root).unwrap().unwrap();
    assert_eq!(loaded.step, 1);
    assert!(
        loaded.skipped[0].1.contains("not a regular file"),
        "{:?}",
        loaded.skipped
    );
}

#[test]
fn latest_is_only_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for step in 1..=3 {
        save(root, step, 3);
    }
    for hint in ["step-000009\n", "../../etc\n", "", "step-000001"] {
        fs::write(root.join(LATEST_FILE), hint).unwrap();
        assert_eq!(
            checkpoint::load_latest(root).unwrap().unwrap().step,
            3,
            "{hint:?}"
        );
    }
    fs::remove_file(root.join(LATEST_FILE)).unwrap();
    assert_eq!(checkpoint::load_latest(root).unwrap().unwrap().step, 3);
    fs::write(root.join(LATEST_FILE), "step-000003").unwrap();
    fs::write(root.join("step-000003/state.json"), b"corrupt").unwrap();
    assert_eq!(checkpoint::load_latest(root).unwrap().unwrap().step, 2);
}

#[test]
fn resaving_a_step_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    save(root, 1, 3);
    save(root, 2, 3);
    checkpoint::save(root, 2, 3, writer(2, 7, 8192)).unwrap();
    assert_eq!(entries(root), ["latest", "step-000001", "step-000002"]);
    let loaded = checkpoint::load_latest(root).unwrap().unwrap();
    assert_eq!(loaded.step, 2);
    assert_exact(&loaded, 7, 8192);
}

#[test]
fn crash_between_the_two_renames_of_a_resave_keeps_the_old_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    save(root, 1, 3);
    save(root, 2, 3);
    // What a kill leaves after moving step 2 aside and before renaming its replacement in.
    fs::rename(
        root.join("step-000002"),
        root.join("step-000002.old-123-4-5"),
    )
    .unwrap();
    fs::create_dir(root.join("step-000002.tmp-123-4-6")).unwrap();
    let loaded = checkpoint::load_latest(root).unwrap().unwrap();
    assert_eq!(
        (loaded.step, loaded.dir.clone()),
        (2, root.join("step-000002.old-123-4-5"))
    );
    assert_exact(&loaded, 0, 4096);
    save(root, 3, 3);
    assert_eq!(
        entries(root),
        ["latest", "step-000001", "step-000002", "step-000003"]
    );
}

#[test]
fn saving_an_older_step_sets_newer_ones_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for step in 1..=3 {
        save(root, step, 3);
    }
    // The run resumed from step 1 (by choice, or because 2 and 3 were damaged) and saves 2.
    checkpoint::save(root, 2, 3, writer(2, 7, 4096)).unwrap();
    let names = entries(root);
    assert_eq!(names[..3], ["latest", "step-000001", "step-000002"]);
    assert!(names[3].starts_with("step-000003.abandoned-"), "{names:?}");
    let loaded = checkpoint::load_latest(root).unwrap().unwrap();
    assert_eq!(loaded.step, 2);
    assert_exact(&loaded, 7, 4096);
}
