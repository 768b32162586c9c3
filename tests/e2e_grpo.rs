//! `omr grpo` end to end through the binary on CPU: the tiny GRPO preset (shrunk, from a seeded
//! tiny model instead of the SFT export) on a fresh synthetic set: a run that completes and
//! exports, a preempted run (exit 75) that resumes to the same end, `omr export` of a GRPO
//! checkpoint, and a config typo (exit 2). The recipe's numerics (learning, bit-exact resume,
//! reward failures, every loss type) are tested through the library in
//! `crates/omr-train/tests/grpo_run.rs`.

mod common;

use common::{omr, s, synth};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e_grpo-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        synth(&root.join("data"), 16, 4, 0, 512);
        root
    })
}

fn q(p: &Path) -> String {
    toml::Value::String(s(p).to_string()).to_string()
}

fn grpo(run: &Path, extra: &[&str]) -> std::process::Output {
    grpo_logged(run, extra, "warn")
}

/// `omr grpo` with `OMR_LOG=level`.
fn grpo_logged(run: &Path, extra: &[&str], level: &str) -> std::process::Output {
    grpo_command(run, extra, level).output().expect("omr runs")
}

fn grpo_command(run: &Path, extra: &[&str], level: &str) -> std::process::Command {
    let preset = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/grpo/tiny.toml");
    let data = root().join("data");
    let mut sets = vec![
        format!("run.dir={}", q(run)),
        "model.init=\"tiny\"".into(),
        format!("model.processor={}", q(&data.join("processor"))),
        format!("data.sources.0.path={}", q(&data)),
        "model.tiny.hidden_size=32".into(),
        "model.tiny.intermediate_size=64".into(),
        "model.tiny.num_hidden_layers=2".into(),
        "model.tiny.num_attention_heads=2".into(),
        "model.tiny.num_key_value_heads=1".into(),
        "model.tiny.vision_hidden_size=16".into(),
        "model.tiny.vision_intermediate_size=32".into(),
        "grpo.prompts_per_step=2".into(),
        "grpo.group_size=3".into(),
        "grpo.max_completion_length=6".into(),
        "grpo.dynamic_sampling=false".into(),
        "grpo.completions_every=1".into(),
        "grpo.completions_groups=1".into(),
        "eval.generate_samples=2".into(),
        "eval.max_new_tokens=4".into(),
        "train.max_steps=2".into(),
        "checkpoint.every_steps=1".into(),
    ];
    sets.extend(extra.iter().map(|x| x.to_string()));
    let mut args: Vec<String> = vec!["grpo".into(), "--config".into(), s(&preset).into()];
    for set in sets {
        args.push("--set".into());
        args.push(set);
    }
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_omr"));
    cmd.args(&args).env("OMR_LOG", level);
    cmd
}

fn show(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn grpo_runs_resumes_and_exports() {
    let run = root().join("run");
    let out = grpo(&run, &[]);
    assert!(out.status.success(), "{}", show(&out));
    let metrics = fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for key in [
        "grpo/reward_mean",
        "reward/accuracy/mean",
        "reward/format/failures",
        "grpo/entropy",
        "time/generation_s",
        "completions/mean_length",
        "eval/accuracy",
    ] {
        assert!(
            metrics.contains(key),
            "{key} missing from metrics.jsonl:\n{metrics}"
        );
    }
    let completions = fs::read_to_string(run.join("completions.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = completions
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 2 steps × the first group of 3 completions.
    assert_eq!(lines.len(), 6, "{completions}");
    assert!(lines[0]["rewards"]["accuracy"].is_number() && lines[0]["advantage"].is_number());
    let card = fs::read_to_string(run.join("export/README.md")).unwrap();
    assert!(card.contains("GRPO") && card.contains("grpo"), "{card}");
    assert!(run.join("export/config.json").is_file());

    // Preempted after one step (exit 75), then resumed to the same final weights.
    let parts = root().join("parts");
    let out = grpo(&parts, &["train.stop_after_steps=1"]);
    assert_eq!(out.status.code(), Some(75), "{}", show(&out));
    let out = grpo(&parts, &[]);
    assert!(out.status.success(), "{}", show(&out));
    for f in ["weights.safetensors", "optimizer.safetensors"] {
        let a = fs::read(run.join("checkpoints/step-000002").join(f)).unwrap();
        let b = fs::read(parts.join("checkpoints/step-000002").join(f)).unwrap();
        assert!(a == b, "{f} differs after resume");
    }

    // omr export of a GRPO checkpoint.
    let exp = root().join("exported");
    let ck = run.join("checkpoints/step-000001");
    let out = omr(&["export", "--checkpoint", s(&ck), "--out", s(&exp)]);
    assert!(out.status.success(), "{}", show(&out));
    let card = fs::read_to_string(exp.join("README.md")).unwrap();
    assert!(card.contains("GRPO"), "{card}");
}

/// Both ranks of a two-process `omr grpo` into `run` (torchrun's variables on one machine),
/// started together; their outputs in rank order.
fn grpo_ranks(run: &Path, extra: &[&str]) -> Vec<std::process::Output> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let children: Vec<_> = (0..2)
        .map(|r| {
            grpo_command(run, extra, "warn")
                .envs([
                    ("RANK", r.to_string()),
                    ("LOCAL_RANK", r.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("MASTER_ADDR", "127.0.0.1".into()),
                    ("MASTER_PORT", port.clone()),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("omr starts")
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// `metrics.jsonl` records without wall time, timings, throughput and memory.
fn records(run: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let obj = v.as_object_mut().unwrap();
            obj.retain(|k, _| {
                k != "wall_time"
                    && !["time/", "throughput/", "memory/"]
                        .iter()
                        .any(|p| k.starts_with(p))
            });
            v
        })
        .collect()
}

/// Data parallel through the binary, as torchrun launches it: two processes with one prompt each
/// (`prompts_per_step` 2 over the two) log what one process with both prompts logs (rollouts
/// merged), and end with its weights. Stopped after one step (both exit 75) and resumed, the
/// pair ends where the uninterrupted pair did, state included. (The random tiny model's
/// completions all earn the built-in rewards' 0, so nothing is learnt here: the numerics of a
/// learning data-parallel run are `crates/omr-train/tests/grpo_run.rs`'s, with its own reward.)
#[test]
fn two_processes_train_as_one() {
    let one_prompt_batches = ["grpo.generation_batch_size=3", "grpo.micro_batch_size=3"];
    let (one, two) = (root().join("dp-one"), root().join("dp-two"));
    let out = grpo(&one, &one_prompt_batches);
    assert!(out.status.success(), "{}", show(&out));
    for (r, out) in grpo_ranks(&two, &one_prompt_batches).iter().enumerate() {
        assert!(out.status.success(), "rank {r}: {}", show(out));
    }
    let want = records(&one);
    assert_eq!(records(&two), want);
    assert!(want.iter().any(|r| r["grpo/groups"] == 2.0), "{want:?}");
    let last = |run: &Path, f: &str| fs::read(run.join("checkpoints/step-000002").join(f)).unwrap();
    for f in ["weights.safetensors", "optimizer.safetensors"] {
        assert!(last(&one, f) == last(&two, f), "{f} differs");
    }

    let parts = root().join("dp-parts");
    let stop = [&one_prompt_batches[..], &["train.stop_after_steps=1"]].concat();
    for (r, out) in grpo_ranks(&parts, &stop).iter().enumerate() {
        assert_eq!(out.status.code(), Some(75), "rank {r}: {}", show(out));
    }
    for (r, out) in grpo_ranks(&parts, &one_prompt_batches).iter().enumerate() {
        assert!(out.status.success(), "rank {r}: {}", show(out));
    }
    for f in ["weights.safetensors", "optimizer.safetensors", "state.json"] {
        let whole = fs::read(two.join("checkpoints/step-000002").join(f)).unwrap();
        assert!(last(&parts, f) == whole, "{f} differs after resume");
    }
}

/// `prompts_per_step` must split over the processes: refused at start-up, naming the key.
#[test]
fn prompts_that_do_not_split_over_the_processes_are_refused() {
    let run = root().join("dp-odd");
    for out in grpo_ranks(&run, &["grpo.prompts_per_step=3"]) {
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("grpo.prompts_per_step = 3"), "{err}");
    }
    assert!(!run.exists());
}

#[test]
fn config_typo_exits_2() {
    let out = grpo(&root().join("typo"), &["objective.epsilom=0.3"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("epsilom"),
        "{}",
        show(&out)
    );
}

/// `kept_decoder_layers = "auto"`: `omr grpo` plans its policy update, reference and rollouts
/// (`plan::input_from_grpo`) against the machine's available RAM and keeps as many decoder
/// layers as fit (both of the tiny model's), said in the log; the run completes.
#[test]
fn auto_kept_decoder_layers_plans_the_grpo_run() {
    let out = grpo_logged(
        &root().join("auto-kept"),
        &[
            "train.activation_checkpointing=\"all\"",
            "train.kept_decoder_layers=\"auto\"",
        ],
        "info",
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        log.contains("kept_decoder_layers = \"auto\": 2 of 2 decoder layers not recomputed"),
        "{log}"
    );
}
