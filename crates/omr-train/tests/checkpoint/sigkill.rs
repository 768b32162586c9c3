//! SIGKILL during a save, for real: this test binary re-runs itself as a child that saves in
//! a loop (`sigkill_child`, inert unless `CHILD_ROOT_ENV` is set), kills it at delays spread
//! over 0..300 ms, and checks that what loads is exactly what the child wrote for that step.

use super::{assert_exact, entries, leftovers, writer};
use omr_train::checkpoint;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ROOT_ENV: &str = "OMR_CKPT_SIGKILL_CHILD_ROOT";

const CHILD_WEIGHTS: usize = 3 << 20;

/// The child of `sigkill_mid_save_never_leaves_a_torn_checkpoint`: resumes like a trainer and
/// saves forever (each step twice, to exercise replacement) until killed.
#[test]
fn sigkill_child() {
    let Some(root) = std::env::var_os(CHILD_ROOT_ENV) else {
        return;
    };
    let root = PathBuf::from(root);
    let start = checkpoint::load_latest(&root)
        .unwrap()
        .map_or(1, |l| l.step + 1);
    for i in 0..100_000 {
        let step = start + i / 2;
        checkpoint::save(&root, step, 2, writer(step, 0, CHILD_WEIGHTS)).unwrap();
    }
    panic!("the parent should have killed this child long ago");
}

#[test]
fn sigkill_mid_save_never_leaves_a_torn_checkpoint() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("checkpoints");
    let exe = std::env::current_exe().unwrap();
    let (mut loaded_some, mut interrupted) = (0, 0);
    for run in 0..20u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill::sigkill_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ROOT_ENV, &root)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(run * 15));
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "child exited on its own ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();

        if root.exists() && !leftovers(&root).is_empty() {
            interrupted += 1;
        }
        let next = match checkpoint::load_latest(&root).unwrap() {
            None => 1,
            Some(loaded) => {
                loaded_some += 1;
                assert!(loaded.skipped.is_empty(), "run {run}: {:?}", loaded.skipped);
                assert_exact(&loaded, 0, CHILD_WEIGHTS);
                loaded.step + 1
            }
        };
        // The next save (what the resumed trainer does) tidies up whatever the kill left.
        checkpoint::save(&root, next, 2, writer(next, 0, CHILD_WEIGHTS)).unwrap();
        assert!(
            leftovers(&root).is_empty(),
            "run {run}: {:?}",
            entries(&root)
        );
        assert!(
            checkpoint::list(&root).len() <= 2,
            "run {run}: {:?}",
            entries(&root)
        );
        assert_eq!(checkpoint::load_latest(&root).unwrap().unwrap().step, next);
    }
    eprintln!(
        "sigkill: 20 kills, {loaded_some} after a commit, {interrupted} left leftovers, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        loaded_some > 0,
        "no kill landed after a commit: the child never got going"
    );
}
