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

/// Several processes of one job (torchrun's `WORLD_SIZE`, SLURM's `SLURM_NTASKS`) are refused
/// at start-up with exit 2 naming the variables, before anything is written: GRPO trains in
/// one process per job (data parallelism is `omr sft`'s), and without gradients exchanged
/// each process would train its own model into the same run directory.
#[test]
fn several_processes_of_one_job_are_refused() {
    let run = root().join("several");
    for (vars, want) in [
        (
            [("WORLD_SIZE", "2"), ("RANK", "1")],
            "WORLD_SIZE=2 and RANK=1",
        ),
        (
            [("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0")],
            "SLURM_NTASKS=4 and SLURM_PROCID=0",
        ),
    ] {
        let out = grpo_command(&run, &[], "warn")
            .envs(vars)
            .output()
            .expect("omr runs");
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{}", show(&out));
        assert!(err.contains("one process per job"), "{}", show(&out));
        assert!(!run.exists(), "nothing written for a refused launch");
    }
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
