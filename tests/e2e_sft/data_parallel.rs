//! Data parallelism through the binary, as torchrun launches it: two `omr sft` processes with
//! `RANK` / `WORLD_SIZE` / `MASTER_ADDR` / `MASTER_PORT` on one machine.
//!
//! - Two processes with one micro-batch each train the same bits as one process with
//!   `grad_accum = 2`: the same losses, gradient norms and evaluations (each process scoring
//!   half the eval batches) in `metrics.jsonl`, the same weights and optimizer moments in every
//!   checkpoint.
//! - Stopped (both processes exit 75) and resumed, the two-process run ends as the one never
//!   stopped, state included; its checkpoint refuses a resume by one process.
//! - A process that dies takes the job down: its peer exits instead of waiting forever.

use super::*;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Instant;

/// Batch of one sample, so that rank r's micro-batch is the single process's micro-batch r;
/// evaluation batches of one sample too, so that each rank evaluates its share (the loss of 4
/// samples, answers to 2).
const DP: &[&str] = &[
    "data.batch.batch_size=1",
    "train.max_steps=6",
    "eval.every_steps=4",
    "eval.batch_size=1",
];

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Both ranks of a two-process `omr sft` into `run`, started together; stderr of rank r in
/// `run`'s parent as `rank<r>.log`.
fn spawn_ranks(run: &Path, extra: &[&str]) -> Vec<(Child, PathBuf)> {
    spawn_ranks_logged(run, extra, Some("warn"))
}

/// [`spawn_ranks`] with `OMR_LOG=level`, or without `OMR_LOG` (the default levels) for None.
fn spawn_ranks_logged(run: &Path, extra: &[&str], level: Option<&str>) -> Vec<(Child, PathBuf)> {
    let port = free_port().to_string();
    fs::create_dir_all(run.parent().unwrap()).unwrap();
    (0..2)
        .map(|r| {
            let log = run.with_file_name(format!(
                "{}-rank{r}.log",
                run.file_name().unwrap().to_string_lossy()
            ));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_omr"));
            match level {
                Some(l) => cmd.env("OMR_LOG", l),
                None => cmd.env_remove("OMR_LOG"),
            };
            let child = cmd
                .args(sft_args(run, &[DP, extra].concat()))
                .envs([
                    ("RANK", r.to_string()),
                    ("LOCAL_RANK", r.to_string()),
                    ("WORLD_SIZE", "2".to_string()),
                    ("MASTER_ADDR", "127.0.0.1".to_string()),
                    ("MASTER_PORT", port.clone()),
                ])
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).unwrap())
                .spawn()
                .expect("omr starts");
            (child, log)
        })
        .collect()
}

/// Exit codes of both ranks (each within 3 minutes), with their logs for messages.
fn wait_ranks(ranks: Vec<(Child, PathBuf)>) -> Vec<(Option<i32>, String)> {
    ranks
        .into_iter()
        .map(|(mut child, log)| {
            let status = wait_timeout(&mut child, Duration::from_secs(180));
            if status.is_none() {
                let _ = child.kill();
            }
            (status.and_then(|s| s.code()), read_log(&log))
        })
        .collect()
}

fn run_ranks(run: &Path, extra: &[&str], want: i32) {
    for (rank, (code, log)) in wait_ranks(spawn_ranks(run, extra)).into_iter().enumerate() {
        assert_eq!(code, Some(want), "rank {rank}:\n{log}");
    }
}

#[test]
fn two_processes_train_as_one_with_twice_the_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let accum = [DP, &["train.grad_accum=2"]].concat();
    sft_ok(&one, &accum);
    run_ranks(&two, &[], 0);

    let (want, got) = (metrics(&one), metrics(&two));
    assert_eq!(got, want, "metrics.jsonl of the two-process run");
    assert!(want.iter().any(|r| field(r, "eval/loss").is_some()));
    assert_eq!(ckpt_steps(&two), ckpt_steps(&one));
    for step in ckpt_steps(&one) {
        for f in ["weights.safetensors", "optimizer.safetensors"] {
            assert_same_bytes(&ckpt(&one, step).join(f), &ckpt(&two, step).join(f));
        }
    }
    // Rank 1's data cursor travels in the checkpoint; only rank 0 writes the run's files.
    let state = fs::read_to_string(ckpt(&two, 6).join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(v["train"]["loader"]["rank"], 0);
    assert_eq!(v["train"]["ranks"][0]["loader"]["rank"], 1);
    assert_eq!(v["train"]["ranks"][0]["loader"]["sources"][0]["pos"], 6);
    assert!(two.join("export").is_dir() == one.join("export").is_dir());
}

#[test]
fn two_processes_stopped_and_resumed_match_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, run) = (tmp.path().join("whole"), tmp.path().join("run"));
    run_ranks(&whole, &[], 0);
    // Asked to stop after 3 micro-batches: rank 0 commits step 3 and both exit 75.
    let ranks = spawn_ranks(&run, &["train.stop_after_micro_batches=3"]);
    for (rank, (code, log)) in wait_ranks(ranks).into_iter().enumerate() {
        assert_eq!(code, Some(75), "rank {rank}:\n{log}");
    }
    assert_eq!(ckpt_steps(&run).last(), Some(&3));

    // One process cannot take over a two-process checkpoint: the stripes would not line up.
    let out = sft(&run, DP);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("written by a run of 2 process(es)"),
        "{}",
        show(&out)
    );

    run_ranks(&run, &[], 0);
    assert_same_run(&whole, &run, 6);
}

#[test]
fn a_dead_process_stops_its_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut ranks = spawn_ranks(&run, &["train.max_steps=1000"]);
    // Killed once the run is under way (rank 0 has logged a step).
    let t = Instant::now();
    while metrics_lines(&run) < 1 {
        assert!(t.elapsed() < Duration::from_secs(120), "no step logged");
        std::thread::sleep(Duration::from_millis(10));
    }
    ranks[1].0.kill().unwrap();
    ranks[1].0.wait().unwrap();
    let (mut child, log) = ranks.remove(0);
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let _ = child.kill();
    let log = read_log(&log);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(log.contains("rank 1 is gone"), "{log}");
}

fn metrics_lines(run: &Path) -> usize {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .matches('\n')
        .count()
}

/// Without `OMR_LOG`, rank 0 reports the run (with how large sums travel) and the other ranks
/// only what goes wrong.
#[test]
fn only_rank_0_reports_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let ranks = spawn_ranks_logged(&run, &["train.max_steps=1"], None);
    let logs = wait_ranks(ranks);
    for (rank, (code, log)) in logs.iter().enumerate() {
        assert_eq!(*code, Some(0), "rank {rank}:\n{log}");
    }
    assert!(
        logs[0].1.contains("data parallel: rank 0 of 2"),
        "{}",
        logs[0].1
    );
    assert!(!logs[1].1.contains("INFO"), "{}", logs[1].1);
    // Both processes on this machine: large sums through /dev/shm where there is one.
    if Path::new("/dev/shm").is_dir() {
        assert!(
            logs[0].1.contains("large sums through shared memory"),
            "{}",
            logs[0].1
        );
    }
}
