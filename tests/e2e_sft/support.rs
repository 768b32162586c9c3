//! What the `omr sft` end-to-end tests share: the shrunken tiny preset, the synthetic set and
//! the reference runs made once per process, running and signalling `omr sft`, and reading
//! back what a run leaves (metrics records, checkpoint files).
#![allow(dead_code)]

use super::common::{omr, s, synth};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// Steps of the standard run; 16 samples at batch 2 make an epoch 8 steps.
pub const STEPS: u64 = 12;
/// The shrunken tiny preset: a model of 88k parameters, an eval of a few samples.
pub const SMALL: &[&str] = &[
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
pub const ACCUM: &[&str] = &["train.grad_accum=3", "train.max_steps=6"];
/// Packed rows: a sample that does not fit is carried over to the next batch.
pub const PACK: &[&str] = &[
    "data.batch.mode=\"pack\"",
    "data.batch.max_length=512",
    "train.max_steps=8",
];

// ---- shared fixtures ----------------------------------------------------------------------

/// A per-process folder under cargo's target tmp dir, `e2e_sft-<pid>`, holding the synthetic
/// set and the reference runs. Statics are never dropped, so it outlives the process; the
/// folders of processes that are gone are removed here.
pub fn shared() -> &'static Path {
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
pub fn remove_stale(base: &Path) {
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
pub fn reference() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = shared().join("reference");
        sft_ok(&dir, &[]);
        dir
    })
}

/// The uninterrupted run with gradient accumulation.
pub fn reference_accum() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = shared().join("reference-accum");
        sft_ok(&dir, ACCUM);
        dir
    })
}

/// The uninterrupted run with packing.
pub fn reference_pack() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = shared().join("reference-pack");
        sft_ok(&dir, PACK);
        dir
    })
}

// ---- running omr sft ----------------------------------------------------------------------

pub fn toml_str(p: &Path) -> String {
    toml::Value::String(s(p).to_string()).to_string()
}

/// `omr sft` arguments: the tiny preset, shrunk, on the shared set, into `run`; `extra`
/// overrides come last and win.
pub fn sft_args(run: &Path, extra: &[&str]) -> Vec<String> {
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

pub fn sft(run: &Path, extra: &[&str]) -> Output {
    let args = sft_args(run, extra);
    omr(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

pub fn sft_ok(run: &Path, extra: &[&str]) -> Output {
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
pub fn spawn_sft(run: &Path, extra: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_omr"))
        .args(sft_args(run, extra))
        .env("OMR_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("omr starts")
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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
pub fn wait_for_records(child: &mut Child, run: &Path, n: usize, log: &Path) {
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

pub fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn read_log(log: &Path) -> String {
    fs::read_to_string(log).unwrap_or_default()
}

// ---- comparing runs -----------------------------------------------------------------------

pub fn ckpt(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step-{step:06}"))
}

/// Committed checkpoint steps of `run`, oldest first.
pub fn ckpt_steps(run: &Path) -> Vec<u64> {
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
pub type Record = Vec<(String, String)>;

/// `metrics.jsonl`: records are flat `{"key":number-or-null,…}` (`omr_train::metrics::record`).
pub fn metrics(run: &Path) -> Vec<Record> {
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

pub fn field<'a>(r: &'a Record, key: &str) -> Option<&'a str> {
    r.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The training record of `step`.
pub fn train_record(records: &[Record], step: u64) -> Record {
    let s = step.to_string();
    records
        .iter()
        .find(|r| field(r, "step") == Some(s.as_str()) && field(r, "train/loss").is_some())
        .unwrap_or_else(|| panic!("no training record of step {step}"))
        .clone()
}

pub fn assert_same_bytes(a: &Path, b: &Path) {
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
pub fn assert_same_run(reference: &Path, run: &Path, final_step: u64) {
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

pub fn loader_cursor(ckpt_dir: &Path) -> (u64, u64, u64) {
    let text = fs::read_to_string(ckpt_dir.join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c = &v["train"]["loader"]["sources"][0];
    let n = |k: &str| c[k].as_u64().unwrap();
    (n("epoch"), n("pos"), n("len"))
}
