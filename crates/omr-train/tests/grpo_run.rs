//! The GRPO recipe end to end through the library, on a fresh synthetic set and a seeded tiny
//! model (a few thousand parameters, completions of 8 tokens), so that every test runs in
//! seconds on CPU.
//!
//! A seeded random model never writes `<answer>`, so the built-in rewards would give every
//! completion the same 0 and nothing to learn. The tests that need a learning signal pass their
//! own reward through `grpo::run_with` (the library's extension point): the share of the letter
//! `e` in the decoded completion, which differs between random completions and which a policy
//! can raise. That makes "GRPO raises the reward" a test a broken advantage, sign, ratio or
//! optimizer step fails.

use omr_train::dist::Launch;
use omr_train::grpo::{self, run_in, run_with};
use omr_train::grpo_config::GrpoConfig;
use omr_train::rewards::{Reward, RewardInput};
use omr_train::sft::{Outcome, Resume, RunOptions};
use omr_train::signals::StopFlag;
use omr_train::TrainError;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Share of `e` among the letters of the completion.
struct LetterE;
impl Reward for LetterE {
    fn name(&self) -> &str {
        "letter_e"
    }
    fn score(&self, items: &[RewardInput]) -> Result<Vec<f64>, String> {
        Ok(items
            .iter()
            .map(|x| {
                let letters = x.completion.chars().filter(|c| c.is_alphabetic()).count();
                let e = x.completion.chars().filter(|&c| c == 'e').count();
                e as f64 / letters.max(1) as f64
            })
            .collect())
    }
}

/// Fails for every completion of every batch.
struct Broken;
impl Reward for Broken {
    fn name(&self) -> &str {
        "broken"
    }
    fn score(&self, _: &[RewardInput]) -> Result<Vec<f64>, String> {
        Err("the judge is unreachable".into())
    }
}

/// NaN for the first completion of each call (one call per sampling round).
struct NanFirst;
impl Reward for NanFirst {
    fn name(&self) -> &str {
        "nan_first"
    }
    fn score(&self, items: &[RewardInput]) -> Result<Vec<f64>, String> {
        Ok((0..items.len())
            .map(|i| if i == 0 { f64::NAN } else { 0.0 })
            .collect())
    }
}

fn data() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("grpo_run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let out = root.join("synth");
        omr_data::synth::generate(&omr_data::synth::SynthConfig {
            out: out.clone(),
            train: 24,
            test: 4,
            seed: 0,
            ..Default::default()
        })
        .unwrap();
        // 56×56 images: 4 image tokens, the smallest the processor makes.
        omr_data::tiny::write_tiny_processor_with(&out.join("processor"), 24, 0, 512, 56 * 56)
            .unwrap();
        out
    })
}

fn q(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

fn config(run: &Path, extra: &[&str]) -> GrpoConfig {
    let d = data();
    let text = format!(
        r#"
[run]
dir = {run}
[model]
init = "tiny"
processor = {proc}
seed = 0
[model.tiny]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
intermediate_size = 64
vision_hidden_size = 16
vision_depth = 1
vision_heads = 1
vision_intermediate_size = 32
window_size = 56
tie_word_embeddings = true
[[data.sources]]
name = "omr-synth"
path = {data}
split = "train"
[data.loader]
seed = 0
chunk_size = 4
prefetch_chunks = 1
threads = 1
[grpo]
prompts_per_step = 2
group_size = 4
max_completion_length = 8
micro_batch_size = 3
generation_batch_size = 5
completions_every = 1
completions_groups = 1
[train]
max_steps = 4
[optim]
lr = 1e-2
[schedule]
kind = "constant"
[eval]
generate_samples = 0
loss_samples = 0
[checkpoint]
every_steps = 2
keep_last = 5
[export]
at_end = false
"#,
        run = q(run),
        proc = q(&d.join("processor")),
        data = q(d),
    );
    let sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    GrpoConfig::from_toml_str(&text, "test.toml", &sets).unwrap_or_else(|e| panic!("{e}"))
}

fn opts(resume: Resume) -> RunOptions {
    RunOptions {
        resume,
        allow_processor_change: false,
        progress: false,
        stop: StopFlag::new(),
    }
}

fn letter_e() -> Vec<(Box<dyn Reward>, f64)> {
    vec![(Box::new(LetterE), 1.0)]
}

fn tmp(name: &str) -> PathBuf {
    let d = data().parent().unwrap().join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `metrics.jsonl` records without the fields that vary between runs (times, memory).
fn records(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut m: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(l).unwrap();
            m.retain(|k, _| {
                k != "wall_time"
                    && !["time/", "throughput/", "memory/"]
                        .iter()
                        .any(|p| k.starts_with(p))
            });
            m
        })
        .collect()
}

fn value(r: &serde_json::Map<String, serde_json::Value>, k: &str) -> f64 {
    r.get(k)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("no {k} in {r:?}"))
}

fn same_file(a: &Path, b: &Path) {
    assert!(
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

#[test]
fn grpo_raises_the_reward() {
    let run = tmp("learns");
    let cfg = config(
        &run,
        &[
            "train.max_steps=24",
            "grpo.prompts_per_step=4",
            "grpo.group_size=6",
            "grpo.micro_batch_size=12",
            "grpo.generation_batch_size=24",
            "checkpoint.every_steps=100",
        ],
    );
    let out = run_with(&cfg, &opts(Resume::Never), letter_e()).unwrap();
    assert_eq!(
        out,
        Outcome::Done {
            step: 24,
            eval: vec![]
        }
    );
    let r = records(&run);
    let mean = |s: &[serde_json::Map<String, serde_json::Value>]| {
        s.iter().map(|x| value(x, "grpo/reward_mean")).sum::<f64>() / s.len() as f64
    };
    let (first, last) = (mean(&r[..6]), mean(&r[r.len() - 6..]));
    assert!(
        last > first + 0.05,
        "the reward did not rise: first 6 steps {first:.4}, last 6 {last:.4}"
    );
    // The engine's log-probs are the training forward's, up to float noise.
    for x in &r {
        assert!(value(x, "grpo/logp_mismatch_max") < 1e-4, "{x:?}");
    }
}

/// Data parallel: two ranks (threads here, each with its own sockets, as two processes) with one
/// prompt each train as one process with both, bit for bit: the same records (rollouts merged
/// in rank order), weights and moments. One prompt per generation batch and per micro-batch,
/// so that each rank's draws and gradients are the single process's for its prompt; the
/// reference model's KL, a batch-wide reward std (gathered from both ranks) and dapo's
/// token normaliser (summed over both) all take part.
#[test]
fn two_ranks_train_as_one_process() {
    let extra = [
        "grpo.generation_batch_size=4",
        "grpo.micro_batch_size=4",
        "objective.beta=0.05",
        "objective.scale_rewards=\"batch\"",
        "objective.loss_type=\"dapo\"",
    ];
    let one = tmp("dp-one");
    run_with(&config(&one, &extra), &opts(Resume::Never), letter_e()).unwrap();

    let two = tmp("dp-two");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let cfg = config(&two, &extra);
            std::thread::spawn(move || {
                let launch = Launch::loopback(rank, 2, port);
                run_in(&cfg, &opts(Resume::Never), letter_e(), &launch)
            })
        })
        .collect();
    for r in ranks {
        let out = r.join().unwrap().unwrap();
        assert_eq!(
            out,
            Outcome::Done {
                step: 4,
                eval: vec![]
            }
        );
    }
    let want = records(&one);
    assert_eq!(records(&two), want);
    assert!(want.iter().any(|r| value(r, "grpo/kl") > 0.0), "{want:?}");
    assert!(
        want.iter().all(|r| value(r, "train/grad_norm") > 0.0),
        "{want:?}"
    );
    for f in ["weights.safetensors", "optimizer.safetensors"] {
        let at = |run: &Path| run.join("checkpoints/step-000004").join(f);
        same_file(&at(&one), &at(&two));
    }
}

#[test]
fn resumed_equals_uninterrupted() {
    // KL to the reference, two updates per rollout (the clip acts), dynamic sampling, bnpo.
    let extra = [
        "objective.beta=0.05",
        "objective.loss_type=\"bnpo\"",
        "grpo.num_iterations=2",
        "grpo.dynamic_sampling=true",
        "train.max_steps=5",
    ];
    let whole = tmp("whole");
    run_with(&config(&whole, &extra), &opts(Resume::Never), letter_e()).unwrap();

    let parts = tmp("parts");
    let mut stopped: Vec<&str> = extra.to_vec();
    stopped.push("train.stop_after_steps=3");
    let out = run_with(&config(&parts, &stopped), &opts(Resume::Auto), letter_e()).unwrap();
    assert_eq!(out, Outcome::Preempted { step: 3 });
    let out = run_with(&config(&parts, &extra), &opts(Resume::Auto), letter_e()).unwrap();
    assert_eq!(
        out,
        Outcome::Done {
            step: 5,
            eval: vec![]
        }
    );

    assert_eq!(records(&parts), records(&whole));
    let r = records(&whole);
    assert!(
        r.iter().any(|x| value(x, "grpo/kl") > 0.0),
        "the KL term never acted"
    );
    assert!(
        r.iter().any(|x| value(x, "grpo/clip_region") > 0.0),
        "the clip never acted with two updates per rollout at lr 1e-2"
    );
    for f in ["weights.safetensors", "optimizer.safetensors", "state.json"] {
        same_file(
            &whole.join("checkpoints/step-000005").join(f),
            &parts.join("checkpoints/step-000005").join(f),
        );
    }
    same_file(
        &whole.join("completions.jsonl"),
        &parts.join("completions.jsonl"),
    );
}

/// Recomputing every block in the policy update's backward changes nothing: same records,
/// weights, moments and completions, bit for bit (untied embeddings; see omr-model's
/// tests/recompute.rs for the tied case).
#[test]
fn activation_checkpointing_is_bit_identical() {
    let extra = [
        "model.tiny.tie_word_embeddings=false",
        "objective.beta=0.05",
        "grpo.num_iterations=2",
        "train.max_steps=3",
        "checkpoint.every_steps=3",
    ];
    let plain = tmp("ckpt-none");
    run_with(&config(&plain, &extra), &opts(Resume::Never), letter_e()).unwrap();
    let ckpt = tmp("ckpt-all");
    let mut with: Vec<&str> = extra.to_vec();
    with.push("train.activation_checkpointing=\"all\"");
    run_with(&config(&ckpt, &with), &opts(Resume::Never), letter_e()).unwrap();
    assert_eq!(records(&plain), records(&ckpt));
    for f in ["weights.safetensors", "optimizer.safetensors"] {
        same_file(
            &plain.join("checkpoints/step-000003").join(f),
            &ckpt.join("checkpoints/step-000003").join(f),
        );
    }
    same_file(
        &plain.join("completions.jsonl"),
        &ckpt.join("completions.jsonl"),
    );
}

/// What a GPU run does by default, on the CPU: `[runtime] precision = "bf16"`, `kernels =
/// "fused"` (the fused ops' CPU references, the fused optimizer, the token scores by the fused
/// linear log-prob): rollouts through the KV-cache
/// generation in bf16, a bf16 KL reference, policy updates on fp32 masters. The run trains
/// (finite, non-zero gradient norms), differs from the fp32 run, keeps fp32 masters in its
/// checkpoints, and a stopped and resumed run equals the uninterrupted one bit for bit.
#[test]
fn bf16_with_fused_kernels_trains_and_resumes_bit_identically() {
    let extra = [
        "objective.beta=0.05",
        "grpo.num_iterations=2",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "runtime.precision=\"bf16\"",
        "runtime.kernels=\"fused\"",
    ];
    let whole = tmp("bf16-whole");
    let before = omr_model::fused::calls().linear_logp;
    run_with(&config(&whole, &extra), &opts(Resume::Never), letter_e()).unwrap();
    // The policy's, the old policy's and the reference's token scores went through the fused
    // linear log-prob (no (K, V) logits), every micro-batch of every update.
    assert!(
        omr_model::fused::calls().linear_logp - before >= 4 * 2 * 2,
        "the fused linear log-prob ran {} times",
        omr_model::fused::calls().linear_logp - before
    );
    let r = records(&whole);
    let norms: Vec<f64> = r
        .iter()
        .filter(|x| x.contains_key("train/grad_norm"))
        .map(|x| value(x, "train/grad_norm"))
        .collect();
    assert!(
        !norms.is_empty() && norms.iter().all(|n| n.is_finite()),
        "{norms:?}"
    );
    assert!(norms.iter().any(|&n| n > 0.0), "{norms:?}");
    let fp32 = tmp("bf16-vs-fp32");
    run_with(
        &config(&fp32, &extra[..4]),
        &opts(Resume::Never),
        letter_e(),
    )
    .unwrap();
    assert_ne!(
        records(&fp32),
        r,
        "bf16 + fused gave the fp32 run's records"
    );
    let w = std::fs::read(whole.join("checkpoints/step-000004/weights.safetensors")).unwrap();
    for (name, t) in safetensors::SafeTensors::deserialize(&w).unwrap().tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    }

    let parts = tmp("bf16-parts");
    let mut stopped: Vec<&str> = extra.to_vec();
    stopped.push("train.stop_after_steps=2");
    let out = run_with(&config(&parts, &stopped), &opts(Resume::Auto), letter_e()).unwrap();
    assert_eq!(out, Outcome::Preempted { step: 2 });
    run_with(&config(&parts, &extra), &opts(Resume::Auto), letter_e()).unwrap();
    assert_eq!(records(&parts), r);
    for f in ["weights.safetensors", "optimizer.safetensors"] {
        same_file(
            &whole.join("checkpoints/step-000004").join(f),
            &parts.join("checkpoints/step-000004").join(f),
        );
    }
    same_file(
        &whole.join("completions.jsonl"),
        &parts.join("completions.jsonl"),
    );
}

#[test]
fn resume_refuses_another_reference() {
    let run = tmp("reference");
    let mut extra = vec!["objective.beta=0.1", "train.stop_after_steps=2"];
    let out = run_with(&config(&run, &extra), &opts(Resume::Auto), letter_e()).unwrap();
    assert_eq!(out, Outcome::Preempted { step: 2 });
    // The tiny model's seed decides the initial weights, hence the reference.
    extra.push("model.seed=7");
    let err = match run_with(&config(&run, &extra), &opts(Resume::Auto), letter_e()) {
        Err(e) => e.to_string(),
        Ok(o) => panic!("resumed with another reference: {o:?}"),
    };
    assert!(err.contains("reference model differs"), "{err}");
}

#[test]
fn failing_rewards_are_excluded_and_counted() {
    let run = tmp("failing");
    let cfg = config(&run, &["train.max_steps=2"]);
    let rewards: Vec<(Box<dyn Reward>, f64)> = vec![
        (Box::new(LetterE), 1.0),
        (Box::new(Broken), 1.0),
        (Box::new(NanFirst), 1.0),
    ];
    run_with(&cfg, &opts(Resume::Never), rewards).unwrap();
    let r = records(&run);
    for x in &r {
        // 8 completions per step, scored in one call: broken fails all, nan_first the first.
        assert_eq!(value(x, "reward/broken/failures"), 8.0);
        assert_eq!(value(x, "reward/nan_first/failures"), 1.0);
        assert_eq!(
            value(x, "grpo/groups"),
            2.0,
            "letter_e still scores every completion"
        );
    }
    // Completions no reward can score drop their group, never score 0.
    let run = tmp("unscored");
    let cfg = config(&run, &["train.max_steps=1"]);
    let rewards: Vec<(Box<dyn Reward>, f64)> =
        vec![(Box::new(Broken), 1.0), (Box::new(NanFirst), 1.0)];
    run_with(&cfg, &opts(Resume::Never), rewards).unwrap();
    let x = &records(&run)[0];
    assert_eq!(value(x, "grpo/groups_unscored"), 1.0);
    assert_eq!(value(x, "grpo/groups"), 1.0);
}

#[test]
fn every_loss_type_trains() {
    for lt in ["grpo", "bnpo", "dr_grpo", "dapo"] {
        for scale in ["group", "batch", "none"] {
            let run = tmp(&format!("loss-{lt}-{scale}"));
            let cfg = config(
                &run,
                &[
                    &format!("objective.loss_type=\"{lt}\""),
                    &format!("objective.scale_rewards=\"{scale}\""),
                    "train.max_steps=1",
                ],
            );
            run_with(&cfg, &opts(Resume::Never), letter_e()).unwrap();
            let x = &records(&run)[0];
            assert!(value(x, "train/grad_norm") > 0.0, "{lt}/{scale}: {x:?}");
            assert!(value(x, "grpo/loss").is_finite(), "{lt}/{scale}");
        }
    }
}

#[test]
fn builtin_rewards_and_nonfinite_steps() {
    // The built-in rewards on a model that never answers: all 0, no update, and no error.
    let run = tmp("builtin");
    let cfg = config(&run, &["train.max_steps=1"]);
    grpo::run(&cfg, &opts(Resume::Never)).unwrap();
    let x = &records(&run)[0];
    assert_eq!(value(x, "reward/accuracy/mean"), 0.0);
    assert_eq!(value(x, "reward/format/mean"), 0.0);
    // A NaN loss skips the update (weights unchanged) and, in a row, stops with exit 65.
    let run = tmp("nonfinite");
    let cfg = config(
        &run,
        &[
            "train.inject_nonfinite_steps=[1, 2]",
            "train.max_nonfinite_steps=2",
        ],
    );
    match run_with(&cfg, &opts(Resume::Never), letter_e()) {
        Err(e @ TrainError::NonFinite { .. }) => assert_eq!(e.exit_code(), 65),
        other => panic!("expected a non-finite stop, got {other:?}"),
    }
}
