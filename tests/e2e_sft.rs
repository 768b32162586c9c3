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

use common::{omr, s};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[path = "e2e_sft/support.rs"]
mod support;

#[path = "e2e_sft/numerics.rs"]
mod numerics;

#[path = "e2e_sft/data_parallel.rs"]
mod data_parallel;

use support::*;

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

/// A config whose planned peak exceeds the device's memory (here `[runtime] memory_limit`, as
/// for a GPU shared with other work) stops at start-up with exit 2, the plan's peak and what
/// each change would give, before anything is written; `memory_check = "warn"` logs the same
/// and trains.
#[test]
fn config_that_does_not_fit_is_refused_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // 1.25 GiB less the 1 GiB kept free: 256 MiB usable, under the tiny run's plan.
    let limit = "runtime.memory_limit=\"1.25GiB\"";
    let out = sft(&run, &[limit, "runtime.memory_check=\"refuse\""]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "needs",
        "GiB at its peak",
        "0.25 GiB usable",
        "memory_check",
    ] {
        assert!(err.contains(want), "no {want:?} in: {}", show(&out));
    }
    assert!(
        !run.exists(),
        "nothing written for a config that does not fit"
    );
    // The CPU's default is a warning; the run trains.
    let out = sft_ok(&run, &[limit, "train.max_steps=1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("training anyway"), "{}", show(&out));
    assert_eq!(ckpt_steps(&run).last(), Some(&1), "{}", show(&out));
}

/// LoRA on the language model with the vision tower frozen and its own learning rate for the
/// merger: checkpoints hold only what trains, the run exports a PEFT adapter, and
/// `omr export --merge-lora` writes a full model
/// with the adapters folded in.
#[test]
fn lora_with_frozen_vision_exports_adapter_and_merged_model() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("lora");
    sft_ok(
        &run,
        &[
            "model.freeze_vision=true",
            "model.lora={ r = 4, alpha = 8.0, dropout = 0.1, targets = [\"q_proj\", \"v_proj\"] }",
            "optim.lr_merger=1e-4",
            "train.max_steps=4",
            "checkpoint.every_steps=4",
        ],
    );
    // Only adapter tensors are trainable (LoRA freezes the base), so only they are saved.
    let weights = fs::read(ckpt(&run, 4).join("weights.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    assert!(!names.is_empty());
    assert!(
        names
            .iter()
            .all(|n| n.contains(".lora_A.") || n.contains(".lora_B.")),
        "{names:?}"
    );
    assert!(names.iter().all(|n| !n.starts_with("visual.")), "{names:?}");
    // The run's export is a PEFT adapter with the processor files and a card.
    let export = run.join("export");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "README.md",
    ] {
        assert!(
            export.join(f).is_file(),
            "{f} missing in {}",
            export.display()
        );
    }
    // Merged: a full HF folder; the lora_B were trained (non-zero), so merged q_proj differs
    // from the seeded base while untouched modules (k_proj) are equal.
    let merged = tmp.path().join("merged");
    let out = omr(&[
        "export",
        "--checkpoint",
        s(&ckpt(&run, 4)),
        "--out",
        s(&merged),
        "--merge-lora",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let m = fs::read(merged.join("model.safetensors")).unwrap();
    let m = safetensors::SafeTensors::deserialize(&m).unwrap();
    assert!(m.tensor("model.layers.0.self_attn.q_proj.weight").is_ok());
    assert!(
        m.names().iter().all(|n| !n.contains("lora_")),
        "adapters left in the merged model"
    );
    assert!(merged.join("config.json").is_file() && merged.join("README.md").is_file());
    // The adapters trained: lora_B starts at zero, so merged q_proj ≠ base q_proj.
    let b = st
        .tensor("model.layers.0.self_attn.q_proj.lora_B.weight")
        .unwrap();
    assert!(b.data().iter().any(|&x| x != 0), "lora_B stayed zero");
}

/// Freezing by part: with the vision tower frozen and the merger trained, checkpoints hold the
/// merger and the language model and no vision-block tensor.
#[test]
fn frozen_vision_tower_is_not_trained_or_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("frozen");
    sft_ok(
        &run,
        &[
            "model.freeze_vision=true",
            "optim.lr_merger=1e-3",
            "train.max_steps=2",
            "eval.generate_samples=0",
        ],
    );
    let weights = fs::read(ckpt(&run, 2).join("weights.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let names: Vec<&str> = st.names().into_iter().collect();
    assert!(
        names.iter().any(|n| n.starts_with("visual.merger.")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("model.layers.")),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("visual.") && !n.starts_with("visual.merger.")),
        "{names:?}"
    );
}

/// Bad samples go to the run's `quarantine.jsonl`, and past the budget the run stops with 64.
/// A LLaVA JSONL source whose images are missing: every record is bad, the budget is none.
#[test]
fn bad_data_over_budget_exits_64_with_quarantine() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("llava");
    fs::create_dir_all(&data).unwrap();
    let line = r#"{"image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>\nWhich side?\nA. left\nB. right"}, {"from": "gpt", "value": "<think>Left.</think><answer>A</answer>"}]}"#;
    fs::write(
        data.join("train.jsonl"),
        format!("{line}\n{line}\n{line}\n"),
    )
    .unwrap();
    let run = tmp.path().join("bad");
    let source = format!(
        "data.sources=[{{ name = \"bad\", path = {}, split = \"train\" }}]",
        toml::Value::String(data.display().to_string())
    );
    let out = sft(
        &run,
        &[
            &source,
            "data.quarantine={ max_bad = 0, min_seen = 0 }",
            "eval.loss_samples=0",
            "eval.generate_samples=0",
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{}", show(&out));
    let q = fs::read_to_string(run.join("quarantine.jsonl")).unwrap();
    assert!(q.contains("train.jsonl") && q.contains("\"row\":0"), "{q}");
}

/// A run stopped and resumed lists each bad record once in `quarantine.jsonl`, as the run that
/// was never stopped does: the resume cuts the file back to its length at the checkpoint.
#[test]
fn resumed_quarantine_lists_each_bad_record_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mixed");
    fs::create_dir_all(&data).unwrap();
    image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    })
    .save(data.join("ok.png"))
    .unwrap();
    let row = |img: &str| {
        format!(
            r#"{{"image": "{img}", "conversations": [{{"from": "human", "value": "<image>\nWhich side?\nA. left\nB. right"}}, {{"from": "gpt", "value": "<think>Left.</think><answer>A</answer>"}}]}}"#
        )
    };
    let lines: Vec<String> = (0..12)
        .map(|i| row(if i % 3 == 1 { "missing.png" } else { "ok.png" }))
        .collect();
    fs::write(data.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    let source = format!(
        "data.sources=[{{ name = \"mixed\", path = {}, split = \"train\" }}]",
        toml::Value::String(data.display().to_string())
    );
    let extra = [
        source.as_str(),
        "data.loader.shuffle=false",
        "data.quarantine={ max_bad_fraction = 0.9, min_seen = 0 }",
        "eval.loss_samples=0",
        "eval.generate_samples=0",
        "train.max_steps=3",
        "train.grad_accum=2",
    ];
    let whole = tmp.path().join("whole");
    sft_ok(&whole, &extra);
    let stopped = tmp.path().join("stopped");
    let mut first = extra.to_vec();
    // Inside step 2: the checkpoint is step 1's; micro-batch 3's records are read again.
    first.push("train.stop_after_micro_batches=3");
    assert_eq!(sft(&stopped, &first).status.code(), Some(75));
    sft_ok(&stopped, &extra);
    let q = |run: &Path| fs::read_to_string(run.join("quarantine.jsonl")).unwrap();
    assert!(q(&whole).lines().count() >= 4, "{}", q(&whole));
    assert_eq!(q(&stopped), q(&whole));
}
