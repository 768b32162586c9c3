//! `scripts/slurm/sft.sbatch` run by bash against a fake SLURM: the preemption path (signal to the
//! batch shell → forwarded to omr → exit 75 → `scontrol requeue` → exit 0) and the pass-through
//! of every other exit code, checked without a cluster.
//!
//! The fake omr is a shell script that records its arguments and then either exits with a given
//! code or waits for USR1/TERM, records which signal it got and exits 75, as the real one does
//! after committing its checkpoint. The fake `scontrol` appends its arguments to a file. The test
//! signals the batch shell itself, as `--signal=B:USR1@120` and a preemption do, and only once
//! the fake omr has started, so the script's traps are in place. Skipped (and passing) where
//! bash is not installed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const FAKE_OMR: &str = r#"#!/usr/bin/env bash
printf '%s\n' "$*" > "$FAKE_DIR/omr.args"
printf '%s\n' "${MASTER_ADDR:-}" > "$FAKE_DIR/omr.master"
if [ -n "${FAKE_EXIT:-}" ]; then exit "$FAKE_EXIT"; fi
trap 'echo USR1 > "$FAKE_DIR/omr.signal"; exit 75' USR1
trap 'echo TERM > "$FAKE_DIR/omr.signal"; exit 75' TERM
touch "$FAKE_DIR/omr.started"
# Short sleeps: bash runs a trap only once the foreground command has finished. Gives up after
# about 30 s so that a broken script cannot hang the test.
for _ in $(seq 300); do sleep 0.1; done
exit 1
"#;

const FAKE_SCONTROL: &str = r#"#!/usr/bin/env bash
if [ "$1" = show ]; then printf 'node-a\nnode-b\n'; exit 0; fi
printf '%s\n' "$*" >> "$FAKE_DIR/scontrol.log"
"#;

/// srun that runs its command in its own place, so that a signal to srun reaches the command as
/// the real srun forwards it to every task.
const FAKE_SRUN: &str = r#"#!/usr/bin/env bash
printf '%s\n' "$*" > "$FAKE_DIR/srun.args"
shift
exec "$@"
"#;

const JOB_ID: &str = "4242";

fn has_bash() -> bool {
    Command::new("bash")
        .arg("-c")
        .arg("exit 0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm/sft.sbatch")
}

fn write_exe(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn wait_for(what: &str, deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Run {
    status: ExitStatus,
    stderr: String,
    omr_args: String,
    /// The signal the fake omr received, if any.
    omr_signal: Option<String>,
    /// One line per `scontrol` call.
    scontrol: Vec<String>,
    /// srun's arguments, if the script ran omr through srun.
    srun_args: Option<String>,
    /// `MASTER_ADDR` as omr saw it.
    omr_master: String,
}

/// Runs the script with `env` set. `signal`: sent to the batch shell once the fake omr runs.
/// `omr_on_path`: the fake omr is found as `omr` on PATH rather than through `OMR_BIN`.
fn run_script(env: &[(&str, &str)], args: &[&str], signal: Option<&str>, omr_on_path: bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    write_exe(&bin.join("scontrol"), FAKE_SCONTROL);
    write_exe(&bin.join("srun"), FAKE_SRUN);
    let omr = if omr_on_path {
        bin.join("omr")
    } else {
        dir.path().join("fake-omr")
    };
    write_exe(&omr, FAKE_OMR);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .args(args)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("FAKE_DIR", dir.path())
        .env("SLURM_JOB_ID", JOB_ID)
        .env_remove("OMR_BIN")
        .env_remove("CONFIG")
        .env_remove("FAKE_EXIT")
        .env_remove("SLURM_NTASKS")
        .env_remove("MASTER_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !omr_on_path {
        cmd.env("OMR_BIN", &omr);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    if let Some(sig) = signal {
        let started = dir.path().join("omr.started");
        wait_for("the fake omr to start", deadline, || started.exists());
        let sent = Command::new("bash")
            .arg("-c")
            .arg(format!("kill -{sig} {}", child.id()))
            .status()
            .unwrap();
        assert!(sent.success(), "could not send {sig} to the batch shell");
    }
    let mut status = None;
    wait_for("the script to exit", deadline, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    let read = |name: &str| fs::read_to_string(dir.path().join(name)).ok();
    Run {
        status: status.unwrap(),
        stderr,
        omr_args: read("omr.args").unwrap_or_default().trim_end().to_string(),
        omr_signal: read("omr.signal").map(|s| s.trim_end().to_string()),
        scontrol: read("scontrol.log")
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default(),
        srun_args: read("srun.args").map(|s| s.trim_end().to_string()),
        omr_master: read("omr.master")
            .unwrap_or_default()
            .trim_end()
            .to_string(),
    }
}

macro_rules! require_bash {
    () => {
        if !has_bash() {
            eprintln!("bash is not installed: skipping the sft.sbatch test");
            return;
        }
    };
}

#[test]
fn usr1_is_forwarded_and_exit_75_requeues() {
    require_bash!();
    let r = run_script(&[], &["--set", "train.max_steps=3"], Some("USR1"), false);
    assert_eq!(r.omr_signal.as_deref(), Some("USR1"), "{}", r.stderr);
    assert_eq!(
        r.omr_args,
        "sft --config configs/sft/qwen2.5-vl-7b.toml --resume auto --set train.max_steps=3"
    );
    assert_eq!(r.scontrol, [format!("requeue {JOB_ID}")], "{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

/// Several tasks: omr runs under srun (one process per task), with rank 0's host, the first
/// node of the job, in `MASTER_ADDR`; a signal still reaches it and exit 75 still requeues.
#[test]
fn several_tasks_run_under_srun_with_rank_0_found() {
    require_bash!();
    let r = run_script(
        &[("SLURM_NTASKS", "16"), ("SLURM_JOB_NODELIST", "node-[a-b]")],
        &[],
        Some("USR1"),
        true,
    );
    assert_eq!(
        r.srun_args.as_deref(),
        Some("--export=ALL omr sft --config configs/sft/qwen2.5-vl-7b.toml --resume auto"),
        "{}",
        r.stderr
    );
    assert_eq!(r.omr_master, "node-a");
    assert_eq!(r.omr_signal.as_deref(), Some("USR1"), "{}", r.stderr);
    assert_eq!(r.scontrol, [format!("requeue {JOB_ID}")], "{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
    // One task: no srun, no MASTER_ADDR.
    let r = run_script(&[("FAKE_EXIT", "0")], &[], None, true);
    assert_eq!(r.srun_args, None);
    assert_eq!(r.omr_master, "");
}

#[test]
fn term_is_forwarded_too() {
    require_bash!();
    let r = run_script(&[], &[], Some("TERM"), true);
    assert_eq!(r.omr_signal.as_deref(), Some("TERM"), "{}", r.stderr);
    assert_eq!(r.scontrol, [format!("requeue {JOB_ID}")], "{}", r.stderr);
    assert_eq!(r.status.code(), Some(0), "{}", r.stderr);
}

#[test]
fn other_exit_codes_pass_through_without_requeue() {
    require_bash!();
    for code in ["0", "65"] {
        let r = run_script(
            &[("FAKE_EXIT", code), ("CONFIG", "my.toml")],
            &[],
            None,
            true,
        );
        assert_eq!(r.omr_args, "sft --config my.toml --resume auto");
        assert_eq!(r.omr_signal, None);
        assert!(
            r.scontrol.is_empty(),
            "requeued on exit {code}: {:?}",
            r.scontrol
        );
        assert_eq!(r.status.code(), Some(code.parse().unwrap()), "{}", r.stderr);
    }
}

#[test]
fn a_missing_omr_is_a_usage_error() {
    require_bash!();
    let r = run_script(&[("OMR_BIN", "/nonexistent/omr")], &[], None, false);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("OMR_BIN"), "{}", r.stderr);
    assert!(r.scontrol.is_empty());
}
