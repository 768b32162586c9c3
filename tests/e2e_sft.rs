//! End to end through `omr sft` and `omr export` on CPU: the promises of RELIABILITY.md checked
//! on the files a run leaves, the way a user (or SLURM) would meet them.
//!
//! - Two identical runs are bitwise identical, and a run stopped anywhere (mid-epoch, at an
//!   epoch boundary, inside gradient accumulation, by SIGTERM, by SIGKILL) and resumed ends
//!   with the same `metrics.jsonl` records and the same weights, optimizer moments and resume
//!   state, byte for byte, as the run that was never stopped.
//! - A corrupted checkpoint is refused by `omr export` and skipped by `omr sft --resume auto`;
//!   non-finite steps are skipped without touching the weights, and too many in a row exit 65;
//!   preemption exits 75; a config typo exits 2 naming the key.
//!
//! Why through the binary: exit codes, signal handling and the resume path only exist there.
//! Everything runs a shrunken `configs/sft/tiny.toml` (via `--set`, so the preset itself is
//! exercised) on one synthetic set of 16 training samples: batch 2 makes an epoch 8 steps, so
//! the 12-step runs cross an epoch boundary. Each run takes a few seconds; the runs that several
//! tests compare against are made once per process.
//!
//! Metrics are compared as written, minus wall time, timings, throughput and memory: each f64
//! is written in its shortest round-trip form, so equal text means equal bits.

mod common;

use common::{omr, s, synth};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// Steps of the standard run; 16 samples at batch 2 make an epoch 8 steps.
const STEPS: u64 = 12;
/// The shrunken tiny preset: a model of 88k parameters, an eval of a few samples.
const SMALL: &[&str] = &[
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.num_attention_heads=2",
    "model.tiny.num_key_value_heads=1",
    "model.tiny.vision_hidden_size=16",
    "model.tiny.vision_intermediate_size=32",
    "data.batch.batch_size=2",
    "eval.loss_samples=4",
    "eval.generate_samples=2",
    "eval.max_new_tokens=8",
    "eval.every_steps=8",
    "train.max_steps=12",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=2",
    "schedule.warmup_steps=2",
];
/// With 3 micro-batches per step: step 3 crosses the epoch boundary.
const ACCUM: &[&str] = &["train.grad_accum=3", "train.max_steps=6"];
/// Packed rows: a sample that does not fit is carried over to the next batch.
const PACK: &[&str] = &[
    "data.batch.mode=\"pack\"",
    "data.batch.max_length=512",
    "train.max_steps=8",
];

// ---- shared fixtures ----------------------------------------------------------------------

/// A per-process folder under cargo's target tmp dir, `e2e_sft-<pid>`, holding the synthetic
/// set and the reference runs. Statics are never dropped, so it outlives the process; the
/// folders of processes that are gone are removed here.
fn shared() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_stale(base);
        let root = base.join(format!("e2e_sft-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root); // an earlier process had this pid
        fs::create_dir_all(&root).unwrap();
        synth(&root.join("data"), 16, 8, 0, 2048);
        root
    })
}

/// Removes `e2e_sft-<pid>` folders whose process is gone (no `/proc/<pid>`), or, where there
/// is no `/proc`, that are more than an hour old.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("e2e_sft-") else {
            continue;
        };
        let proc = Path::new("/proc");
        let gone = if proc.is_dir() {
            !proc.join(pid).exists()
        } else {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > Duration::from_secs(3600))
        };
        if gone {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// The uninterrupted standard run.
fn reference() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = shared().join("reference");
        sft_ok(&dir, &[]);
        dir
    })
}

/// The uninterrupted run with gradient accumulation.
fn reference_accum() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = shared().join("reference-accum");
        sft_ok(&dir, ACCUM);
        dir
    })
}

/// The uninterrupted run with packing.
fn reference_pack() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = shared().join("reference-pack");
        sft_ok(&dir, PACK);
        dir
    })
}

// ---- running omr sft ----------------------------------------------------------------------

fn toml_str(p: &Path) -> String {
    toml::Value::String(s(p).to_string()).to_string()
}

/// `omr sft` arguments: the tiny preset, shrunk, on the shared set, into `run`; `extra`
/// overrides come last and win.
fn sft_args(run: &Path, extra: &[&str]) -> Vec<String> {
    let preset = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/sft/tiny.toml");
    let data = shared().join("data");
    let fixed = [
        format!("run.dir={}", toml_str(run)),
        format!("model.processor={}", toml_str(&data.join("processor"))),
        format!(
            "data.sources=[{{ name = \"omr-synth\", path = {}, split = \"train\" }}]",
            toml_str(&data)
        ),
    ];
    let mut args: Vec<String> = vec!["sft".into(), "--config".into(), s(&preset).into()];
    let sets = fixed
        .iter()
        .map(String::as_str)
        .chain(SMALL.iter().copied());
    for set in sets.chain(extra.iter().copied()) {
        args.push("--set".into());
        args.push(set.into());
    }
    args
}

fn sft(run: &Path, extra: &[&str]) -> Output {
    let args = sft_args(run, extra);
    omr(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn sft_ok(run: &Path, extra: &[&str]) -> Output {
    let out = sft(run, extra);
    assert!(
        out.status.success(),
        "omr sft in {}: {}",
        run.display(),
        show(&out)
    );
    out
}

/// `omr sft` in the background, stderr into `log`.
fn spawn_sft(run: &Path, extra: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_omr"))
        .args(sft_args(run, extra))
        .env("OMR_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("omr starts")
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Waits until `metrics.jsonl` of `run` holds `n` complete records (the child must still run).
fn wait_for_records(child: &mut Child, run: &Path, n: usize, log: &Path) {
    let t = Instant::now();
    loop {
        let text = fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        if text.matches('\n').count() >= n {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "omr sft ended ({status}) before {n} records: {}",
                read_log(log)
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no {n} records in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read_log(log: &Path) -> String {
    fs::read_to_string(log).unwrap_or_default()
}

// ---- comparing runs -----------------------------------------------------------------------

fn ckpt(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step-{step:06}"))
}

/// Committed checkpoint steps of `run`, oldest first.
fn ckpt_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")?.parse().ok()
        })
        .collect();
    steps.sort();
    steps
}

/// A metrics record as (key, value as written), without the fields that vary from run to run.
type Record = Vec<(String, String)>;

/// `metrics.jsonl`: records are flat `{"key":number-or-null,…}` (`omr_train::metrics::record`).
fn metrics(run: &Path) -> Vec<Record> {
    let text = fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let body = line.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
            let body = body.unwrap_or_else(|| panic!("not a record: {line}"));
            body.split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once(':').expect("key:value");
                    assert!(v == "null" || v.parse::<f64>().is_ok(), "{line}");
                    (k.trim_matches('"').to_string(), v.to_string())
                })
                .filter(|(k, _)| {
                    k != "wall_time"
                        && !["time/", "throughput/", "memory/"]
                            .iter()
                            .any(|p| k.starts_with(p))
                })
                .collect()
        })
        .collect()
}

fn field<'a>(r: &'a Record, key: &str) -> Option<&'a str> {
    r.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The training record of `step`.
fn train_record(records: &[Record], step: u64) -> Record {
    let s = step.to_string();
    records
        .iter()
        .find(|r| field(r, "step") == Some(s.as_str()) && field(r, "train/loss").is_some())
        .unwrap_or_else(|| panic!("no training record of step {step}"))
        .clone()
}

fn assert_same_bytes(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    if x != y {
        let at = x.iter().zip(&y).position(|(p, q)| p != q);
        panic!(
            "{} ({} bytes) and {} ({} bytes) differ (first at byte {at:?})",
            a.display(),
            x.len(),
            b.display(),
            y.len()
        );
    }
}

/// Same metrics records; the final checkpoint, and any other both runs kept, with the same
/// weights, moments and resume state.
fn assert_same_run(reference: &Path, run: &Path, final_step: u64) {
    let (want, got) = (metrics(reference), metrics(run));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "metrics.jsonl record {} of {}", i + 1, run.display());
    }
    assert_eq!(
        got.len(),
        want.len(),
        "metrics.jsonl records of {}",
        run.display()
    );
    let kept = ckpt_steps(run);
    assert_eq!(
        kept.last(),
        Some(&final_step),
        "checkpoints of {}",
        run.display()
    );
    for step in ckpt_steps(reference)
        .into_iter()
        .filter(|s| kept.contains(s))
    {
        for f in ["weights.safetensors", "optimizer.safetensors", "state.json"] {
            assert_same_bytes(&ckpt(reference, step).join(f), &ckpt(run, step).join(f));
        }
    }
}

fn loader_cursor(ckpt_dir: &Path) -> (u64, u64, u64) {
    let text = fs::read_to_string(ckpt_dir.join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c = &v["train"]["loader"]["sources"][0];
    let n = |k: &str| c[k].as_u64().unwrap();
    (n("epoch"), n("pos"), n("len"))
}

// ---- tests --------------------------------------------------------------------------------

#[test]
fn two_identical_runs_are_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("again");
    sft_ok(&run, &[]);
    assert_same_run(reference(), &run, STEPS);
    let losses: Vec<_> = metrics(&run)
        .iter()
        .filter_map(|r| field(r, "train/loss").map(str::to_string))
        .collect();
    assert_eq!(losses.len(), STEPS as usize);
    assert!(losses.iter().all(|l| l != "null"), "{losses:?}");
}

/// Runs with `train.stop_after_micro_batches = stop_after`: exit 75 with the newest checkpoint
/// at `stopped_at`, its data cursor (if given) at `(epoch, pos, len)` of the one source. Then
/// resumes in the same run dir (`--resume auto`) and compares with the never-stopped
/// `reference`.
fn stop_and_resume(
    reference: &Path,
    extra: &[&str],
    stop_after: u64,
    stopped_at: u64,
    cursor: Option<(u64, u64, u64)>,
    final_step: u64,
) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let stop = format!("train.stop_after_micro_batches={stop_after}");
    let out = sft(&run, &[extra, &[stop.as_str()]].concat());
    assert_eq!(out.status.code(), Some(75), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("preempted"),
        "{}",
        show(&out)
    );
    assert_eq!(
        ckpt_steps(&run).last(),
        Some(&stopped_at),
        "newest checkpoint"
    );
    if let Some(cursor) = cursor {
        let at = loader_cursor(&ckpt(&run, stopped_at));
        assert_eq!(at, cursor, "data cursor (epoch, pos, len)");
    }
    sft_ok(&run, extra);
    assert_same_run(reference, &run, final_step);
}

#[test]
fn resume_mid_epoch_is_bit_identical() {
    stop_and_resume(reference(), &[], 5, 5, Some((0, 10, 16)), STEPS);
}

#[test]
fn resume_at_epoch_boundary_is_bit_identical() {
    // Every sample of epoch 0 read, none of epoch 1; the eval of step 8 ran before the stop,
    // and the checkpoint of step 10 after the resume must still carry it.
    stop_and_resume(reference(), &[], 8, 8, Some((0, 16, 16)), STEPS);
}

#[test]
fn resume_inside_gradient_accumulation_is_bit_identical() {
    // Micro-batch 8 is the second of step 3: step 2 is what gets committed (a re-save of the
    // regular step-2 checkpoint), and the resumed step 3 reads micro-batches 7-9 again, across
    // the epoch boundary.
    stop_and_resume(reference_accum(), ACCUM, 8, 2, Some((0, 12, 16)), 6);
}

#[test]
fn resume_with_packing_is_bit_identical() {
    // Whatever the batch of step 5 left over is read again after the resume: it must count
    // once in the data counters of the resume state.
    stop_and_resume(reference_pack(), PACK, 5, 5, None, 8);
}

#[test]
fn sigterm_commits_and_exits_75() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, log) = (tmp.path().join("run"), tmp.path().join("log"));
    let mut child = spawn_sft(&run, &[], &log);
    wait_for_records(&mut child, &run, 2, &log);
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    let Some(status) = status else {
        let _ = child.kill();
        panic!("no exit 10 s after SIGTERM: {}", read_log(&log));
    };
    assert_eq!(status.code(), Some(75), "{}", read_log(&log));
    let stopped = *ckpt_steps(&run).last().expect("a checkpoint committed");
    assert!((2..STEPS).contains(&stopped), "stopped at step {stopped}");
    sft_ok(&run, &[]);
    assert_same_run(reference(), &run, STEPS);
}

#[test]
fn sigkill_during_run_then_resume_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, log) = (tmp.path().join("run"), tmp.path().join("log"));
    let every_step = ["checkpoint.every_steps=1"];
    // Killed a few milliseconds after a number of records: inside a step, or while a checkpoint
    // is written or an old one pruned (both leave `*.tmp-*` entries behind).
    for (records, delay_ms) in [(2, 0), (5, 15), (9, 40)] {
        let mut child = spawn_sft(&run, &every_step, &log);
        wait_for_records(&mut child, &run, records, &log);
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    sft_ok(&run, &every_step);
    assert_same_run(reference(), &run, STEPS);
    for dir in [run.clone(), run.join("checkpoints")] {
        for e in fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "{name} left in {}", dir.display());
        }
    }
}

#[test]
fn corrupted_checkpoint_falls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    sft_ok(&run, &[]);
    assert_eq!(ckpt_steps(&run), [10, 12], "keep_last = 2, every 2 steps");
    let weights = ckpt(&run, STEPS).join("weights.safetensors");
    let mut bytes = fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&weights, bytes).unwrap();

    let out = omr(&[
        "export",
        "--checkpoint",
        s(&ckpt(&run, STEPS)),
        "--out",
        s(&tmp.path().join("export")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("weights.safetensors"),
        "{}",
        show(&out)
    );

    let out = sft_ok(&run, &["train.max_steps=14"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("falling back") && err.contains(&format!("{} (step 10)", s(&ckpt(&run, 10)))),
        "{err}"
    );
    // Resumed at 10: the records of the first run after step 10, its final eval at step 12
    // among them, are gone; each step is logged once, evals are at 8 and at the new end.
    let records = metrics(&run);
    let steps: Vec<&str> = records.iter().map(|r| field(r, "step").unwrap()).collect();
    let mut want: Vec<String> = (1..=14u64).map(|s| s.to_string()).collect();
    want.insert(8, "8".into());
    want.push("14".into());
    assert_eq!(steps, want);
}

#[test]
fn nonfinite_steps_are_skipped_then_exit_65() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("skip");
    let short = [
        "train.max_steps=4",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=10",
    ];
    sft_ok(
        &run,
        &[&short[..], &["train.inject_nonfinite_steps=[3]"]].concat(),
    );
    let records = metrics(&run);
    let step3 = train_record(&records, 3);
    assert_eq!(field(&step3, "train/loss"), Some("null"), "{step3:?}");
    assert_eq!(field(&step3, "train/skipped_steps"), Some("1"), "{step3:?}");
    assert_eq!(
        field(&train_record(&records, 2), "train/skipped_steps"),
        Some("0")
    );
    assert_ne!(
        field(&train_record(&records, 4), "train/loss"),
        Some("null")
    );
    // The skipped step left weights and moments exactly as they were; step 4 trained again.
    for f in ["weights.safetensors", "optimizer.safetensors"] {
        assert_same_bytes(&ckpt(&run, 2).join(f), &ckpt(&run, 3).join(f));
    }
    let w = |step| fs::read(ckpt(&run, step).join("weights.safetensors")).unwrap();
    assert!(w(3) != w(4), "step 4 changed the weights");

    let out = sft(
        &tmp.path().join("abort"),
        &[
            "train.max_steps=6",
            "train.inject_nonfinite_steps=[2,3,4]",
            "train.max_nonfinite_steps=3",
        ],
    );
    assert_eq!(out.status.code(), Some(65), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("3 consecutive") && err.contains("step 4"),
        "{err}"
    );
}

#[test]
fn export_writes_hf_folder_with_card() {
    let run = reference();
    let export = run.join("export");
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "README.md",
    ] {
        assert!(
            export.join(f).is_file(),
            "{f} missing in {}",
            export.display()
        );
    }
    let card = fs::read_to_string(export.join("README.md")).unwrap();
    let front = card
        .strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---\n"))
        .map(|(front, _)| front)
        .unwrap_or_else(|| panic!("no front matter:\n{card}"));
    for key in ["license:", "tags:", "pipeline_tag:", "model-index:"] {
        assert!(
            front.lines().any(|l| l.starts_with(key)),
            "{key} missing:\n{front}"
        );
    }
    assert!(
        front.contains("- \"medical\"") && front.contains("image-text-to-text"),
        "{front}"
    );
    // A tiny model from scratch on local shards has no Hub id: the YAML `base_model` and
    // `datasets` must be Hub ids, so they are left out and the body names both instead.
    assert!(
        !front.contains("base_model:") && !front.contains("datasets:"),
        "{front}"
    );
    assert!(card.contains("omr tiny Qwen2.5-VL (seed 0)"), "{card}");
    assert!(card.contains("synthetic images and questions"), "{card}");
    assert!(
        card.to_lowercase().contains("not for clinical use"),
        "{card}"
    );

    // The final checkpoint exports to the same model and card.
    let tmp = tempfile::tempdir().unwrap();
    let again = tmp.path().join("export");
    let last = ckpt(run, STEPS);
    let out = omr(&["export", "--checkpoint", s(&last), "--out", s(&again)]);
    assert!(out.status.success(), "{}", show(&out));
    for f in ["model.safetensors", "config.json", "README.md"] {
        assert_same_bytes(&export.join(f), &again.join(f));
    }
}

#[test]
fn bad_config_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = sft(&tmp.path().join("run"), &["optim.lrr=1"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lrr"),
        "{}",
        show(&out)
    );
    assert!(
        !tmp.path().join("run").exists(),
        "nothing written for a bad config"
    );
}
