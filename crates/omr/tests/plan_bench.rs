//! `omr plan` and `omr bench train` as a user runs them: exit codes, the verdict and the
//! suggestions of the planner, and the fields of the training benchmark's JSON report on the
//! tiny dims for 2 steps (no Python needed: the torch side is `--python`, run by hand).

mod common;

use common::{omr, read_json, root, text};
use serde_json::Value;
use std::process::Command;

/// `omr bench train` on the tiny model: 2 steps of one row of 64 tokens with a 56 px image, no
/// warm-up, `extra` flags, the JSON report to `json`.
fn tiny_bench_args(json: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "bench",
        "train",
        "--model-config",
        "tiny",
        "--seq",
        "64",
        "--image-px",
        "56",
        "--steps",
        "2",
        "--warmup",
        "0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--json".to_string(), json.to_str().unwrap().to_string()]);
    args
}

#[test]
fn plan_refuses_the_7b_preset_and_accepts_it_with_the_suggested_changes() {
    let o = omr(&["plan", "--config", "configs/sft/qwen2.5-vl-7b.toml"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(
        t.contains("does NOT fit") && t.contains("fused attention"),
        "{t}"
    );
    assert!(t.contains("| AdamW moments (f32)"), "{t}");
    let o = omr(&[
        "plan",
        "--config",
        "configs/sft/qwen2.5-vl-7b.toml",
        "--attention",
        "fused",
        "--set",
        "train.activation_checkpointing=all",
        "--set",
        "model.lora.r=16",
        "--set",
        "model.lora.alpha=32",
        "--set",
        "model.lora.targets=[\"all-linear\"]",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains(": fits"), "{t}");
    // An H200's memory with the same config in f32: too small, exit 2.
    let o = omr(&[
        "plan",
        "--config",
        "configs/sft/qwen2.5-vl-7b.toml",
        "--compute-dtype",
        "f32",
        "--gpu-mem",
        "141GB",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn plan_of_the_tiny_preset_reads_the_model_config_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("plan.json");
    let o = omr(&[
        "plan",
        "--config",
        "configs/sft/tiny.toml",
        "--model-config",
        "configs/models/tiny.json",
        "--compute-dtype",
        "f32",
        "--json",
        json.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let v = read_json(&json);
    assert_eq!(v["fits"], true);
    let peak = v["plan"]["peak"].as_u64().unwrap();
    let rows = v["plan"]["train_rows"].as_array().unwrap();
    let sum: u64 = rows.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert!(peak >= sum && sum > 0, "{v}");
    // 100 MiB is too small for batch 8 × 1024 tokens of eager attention.
    let o = omr(&[
        "plan",
        "--config",
        "configs/sft/tiny.toml",
        "--model-config",
        "configs/models/tiny.json",
        "--device-memory",
        "100MiB",
        "--headroom",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("batch_size = 4"), "{}", text(&o));
}

/// `--world N` plans a data-parallel job's rank: the gradient exchange phase, f32 gradients
/// in the step; 0 processes is a usage error.
#[test]
fn plan_for_a_data_parallel_job_has_the_gradient_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("plan.json");
    let args = |world: &str| {
        [
            "plan",
            "--config",
            "configs/sft/tiny.toml",
            "--model-config",
            "configs/models/tiny.json",
            "--world",
            world,
            "--json",
            json.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let o = omr(&args("2").each_ref().map(String::as_str));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("2 data-parallel ranks") && t.contains("| gradient exchange"),
        "{t}"
    );
    let v = read_json(&json);
    let rows = v["plan"]["exchange_rows"].as_array().unwrap();
    let sum: u64 = rows.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert_eq!(v["plan"]["exchange_peak"].as_u64(), Some(sum));
    let grads = |rows: &Value| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["category"] == "gradients")
            .unwrap()["bytes"]
            .as_u64()
            .unwrap()
    };
    let dp = grads(&v["plan"]["optim_rows"]);
    let o = omr(&args("1").each_ref().map(String::as_str));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v = read_json(&json);
    assert!(v["plan"]["exchange_rows"].as_array().unwrap().is_empty());
    // bf16 gradients of one micro-batch, against their f32 sums over the ranks.
    assert_eq!(dp, 2 * grads(&v["plan"]["optim_rows"]));
    let o = omr(&args("0").each_ref().map(String::as_str));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// With checkpointing, `omr plan` says how many decoder layers can keep their activations
/// (not be recomputed) on this device: all 4 of the tiny model on 80 GiB, fewer on a device
/// just large enough for that many, and the JSON carries it.
#[test]
fn plan_with_checkpointing_prints_the_most_kept_decoder_layers() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("plan.json");
    let plan = |memory: &str, kept: &str| -> (String, Value) {
        let kept = format!("train.kept_decoder_layers={kept}");
        let o = omr(&[
            "plan",
            "--config",
            "configs/sft/tiny.toml",
            "--model-config",
            "configs/models/tiny.json",
            "--attention",
            "fused",
            "--set",
            "train.activation_checkpointing=all",
            "--set",
            &kept,
            "--device-memory",
            memory,
            "--headroom",
            "0",
            "--json",
            json.to_str().unwrap(),
        ]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        (t, read_json(&json))
    };
    let (t, v) = plan("80GiB", "0");
    assert!(
        t.contains("room for train.kept_decoder_layers = 4 (4 of 4"),
        "{t}"
    );
    assert_eq!(v["max_kept_decoder_layers"], 4);
    // The peak with 2 layers kept, as the device size: room for 2, printed from 0 kept.
    let peak2 = plan("80GiB", "2").1["plan"]["peak"].as_u64().unwrap();
    let (t, v) = plan(&peak2.to_string(), "0");
    assert!(
        t.contains("room for train.kept_decoder_layers = 2 (2 of 4"),
        "{t}"
    );
    assert_eq!(v["max_kept_decoder_layers"], 2);
    assert!(t.contains("checkpointing all, grad_accum"), "{t}");
    // Already keeping them: nothing more to say.
    let (t, _) = plan(&peak2.to_string(), "2");
    assert!(!t.contains("room for"), "{t}");
    assert!(
        t.contains("checkpointing all (last 2 decoder layers kept)"),
        "{t}"
    );
    // "auto" plans as 0 kept and says what it will keep on a device of this size.
    let (t, _) = plan(&peak2.to_string(), "auto");
    assert!(
        t.contains("train.kept_decoder_layers = \"auto\" keeps 2 on this device (2 of 4"),
        "{t}"
    );
}

#[test]
fn bench_train_tiny_two_steps_reports_sane_fields() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let o = omr(&[
        "bench",
        "train",
        "--model-config",
        "tiny",
        "--batch",
        "1",
        "--seq",
        "96",
        "--image-px",
        "112",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("where the time goes") && t.contains("MFU n/a on CPU"),
        "{t}"
    );
    let v = read_json(&json);
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
    assert_eq!(v["tokens_per_step"], 96);
    assert_eq!(v["patches"], 64); // (112 / 14)²
    assert_eq!(v["step_s"].as_array().unwrap().len(), 2);
    let step = f("median_step_s");
    assert!(step > 0.0);
    assert!((f("tokens_per_s") - 96.0 / step).abs() < 1e-6 * f("tokens_per_s"));
    let ph = &v["phases_s"];
    for k in ["vision_forward", "forward", "backward", "optimizer"] {
        assert!(ph[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
    // Decoder linears by hand: 6 · L · (2·C·HD + 2·C·KVD + 3·C·I) · tokens for the tiny dims.
    let per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384;
    assert_eq!(
        v["flops"]["text_linear"].as_f64().unwrap(),
        (6 * 4 * per_layer * 96) as f64
    );
    let parts: f64 = [
        "text_linear",
        "lm_head",
        "text_attention",
        "vision_linear",
        "vision_attention",
        "merger",
        "lora",
    ]
    .iter()
    .map(|k| v["flops"][k].as_f64().unwrap())
    .sum();
    assert!((parts - f("flops_total")).abs() < 1.0);
    assert!(v["mfu"].is_null());
    // Random init: the loss starts near ln V and stays finite.
    let losses: Vec<f64> = v["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 3);
    assert!((losses[0] - (2048f64).ln()).abs() < 0.5, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(f("peak_rss_mib") > 0.0 && f("plan_step_growth_mib") > 0.0);
}

#[test]
fn bench_train_with_lora_trains_only_the_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let args = |rank: &str| tiny_bench_args(&json, &["--lora-rank", rank, "--kernels", "fused"]);
    // The fused ops' CPU references with the decoder layers as one op (adapters inside).
    let run = |rank: &'static str| -> Value {
        let o = Command::new(env!("CARGO_BIN_EXE_omr"))
            .args(args(rank))
            .current_dir(root())
            .env("RAYON_NUM_THREADS", "1")
            .env("OMR_BLOCK_OP", "1")
            .output()
            .unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        assert!(t.contains("OMR_BLOCK_OP=1"), "{t}");
        // The adapters' FLOPs row only where there are adapters.
        assert_eq!(
            t.contains("LoRA adapters 6·r·(in+out)·T"),
            rank != "0",
            "{t}"
        );
        if rank != "0" {
            assert!(t.contains("LoRA rank 4"), "{t}");
        }
        read_json(&json)
    };
    let (full, lora) = (run("0"), run("4"));
    assert_eq!(lora["lora_rank"], 4);
    assert_eq!(lora["opt_ins"]["OMR_BLOCK_OP"], "1");
    // Tiny dims: 4 layers of q, k, v, o (128 → 128, 64, 64, 128 ← 128) and gate, up, down
    // (128 ↔ 384); an adapter of rank 4 holds 4 · (in + out) parameters.
    let per_layer = 4 * ((128 + 128) * 2 + (128 + 64) * 2 + (128 + 384) * 3);
    assert_eq!(lora["trainable"], 4 * per_layer);
    assert_eq!(
        lora["params"].as_u64().unwrap(),
        full["params"].as_u64().unwrap() + 4 * per_layer as u64
    );
    // B starts at zero: the first loss is the base model's, the same random init.
    assert_eq!(lora["losses"][0], full["losses"][0]);
    // The frozen base has no weight gradients: 4·N·T for the decoder linears, 2·N·T for the
    // vision tower no gradient reaches; the adapters add 6·r·(in + out) per token.
    let flops = |v: &Value, k: &str| v["flops"][k].as_f64().unwrap();
    assert_eq!(
        flops(&lora, "text_linear"),
        flops(&full, "text_linear") * 4.0 / 6.0
    );
    assert_eq!(
        flops(&lora, "vision_linear"),
        flops(&full, "vision_linear") * 2.0 / 6.0
    );
    assert_eq!(flops(&lora, "lora"), 6.0 * 64.0 * (4 * per_layer) as f64);
    // +0, not the −0 of an empty f64 sum.
    assert_eq!(flops(&full, "lora").to_bits(), 0f64.to_bits());
    assert!(lora["flops_total"].as_f64().unwrap() < full["flops_total"].as_f64().unwrap());
}

#[test]
fn bench_train_with_grad_accum_counts_every_micro_batch() {
    let dir = tempfile::tempdir().unwrap();
    let run = |k: &str| -> Value {
        let json = dir.path().join(format!("bench-{k}.json"));
        // The optimizer's fused accumulator (its CPU reference sums).
        let args = tiny_bench_args(&json, &["--grad-accum", k, "--kernels", "fused"]);
        let o = omr(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        read_json(&json)
    };
    let (one, three) = (run("1"), run("3"));
    assert_eq!(three["grad_accum"], 3);
    assert_eq!(three["tokens_per_step"], 3 * 64);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    assert!((f(&three, "flops_total") - 3.0 * f(&one, "flops_total")).abs() < 1.0);
    assert!(
        (f(&three, "tokens_per_s") - 192.0 / f(&three, "median_step_s")).abs()
            < 1e-6 * f(&three, "tokens_per_s")
    );
    // Three identical micro-batches normalised by all their tokens are one step on one: the
    // same first loss, and after the step the same loss up to the f32 sums' rounding.
    let loss = |v: &Value, i: usize| v["losses"][i].as_f64().unwrap();
    assert!((loss(&three, 0) - loss(&one, 0)).abs() < 1e-9 * loss(&one, 0));
    assert!(
        (loss(&three, 1) - loss(&one, 1)).abs() < 1e-4 * loss(&one, 1),
        "{} vs {}",
        loss(&three, 1),
        loss(&one, 1)
    );
    assert!(loss(&one, 1) < loss(&one, 0));
    let o = omr(&["bench", "train", "--grad-accum", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--grad-accum must be at least 1"));
}

/// Checkpointing on the fused path keeps each block's attention for the recompute (the
/// default) or recomputes it (`--recompute-attention`): the same losses bit for bit, step after
/// step (the gradients are the same bits), and the plan counts what is kept.
#[test]
fn bench_train_keeps_or_recomputes_the_checkpointed_attention() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| -> Value {
        let json = dir.path().join(format!("bench-{}.json", extra.len()));
        let mut flags = vec!["--kernels", "fused", "--activation-checkpointing", "all"];
        flags.extend_from_slice(extra);
        let args = tiny_bench_args(&json, &flags);
        let o = omr(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        if extra == ["--recompute-attention"] {
            assert!(t.contains("(attention recomputed)"), "{t}");
        }
        if extra == ["--kept-decoder-layers", "2"] {
            assert!(t.contains("(last 2 decoder layers kept)"), "{t}");
        }
        if extra == ["--kept-decoder-layers", "auto"] {
            assert!(t.contains("(last 4 decoder layers kept, auto)"), "{t}");
        }
        read_json(&json)
    };
    let (kept, recomputed) = (run(&[]), run(&["--recompute-attention"]));
    assert_eq!(kept["recompute_attention"], false);
    assert_eq!(recomputed["recompute_attention"], true);
    assert_eq!(kept["losses"], recomputed["losses"]);
    assert_eq!(kept["flops_total"], recomputed["flops_total"]);
    let growth = |v: &Value| v["plan_step_growth_mib"].as_f64().unwrap();
    assert!(growth(&kept) > growth(&recomputed), "{kept} {recomputed}");
    // The last 2 of the 4 decoder layers not recomputed at all: the same losses again, more
    // memory planned.
    let two = run(&["--kept-decoder-layers", "2"]);
    assert_eq!(two["kept_decoder_layers"], 2);
    assert_eq!(two["losses"], kept["losses"]);
    assert!(growth(&two) > growth(&kept), "{two} {kept}");
    // auto: all 4 fit in this machine's available RAM.
    let auto = run(&["--kept-decoder-layers", "auto"]);
    assert_eq!(auto["kept_decoder_layers"], 4);
    assert_eq!(auto["losses"], kept["losses"]);
    let bad = omr(&["bench", "train", "--kept-decoder-layers", "most"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("a number of decoder layers or auto"));
}

/// `omr plan` on a GRPO config: the policy update, the frozen reference and the rollout phase
/// (tiny preset: fits, JSON carries the rollout rows); the 7B GRPO preset is refused on 80 GiB
/// with GRPO's own knobs among the suggestions.
#[test]
fn plan_of_a_grpo_config_has_the_reference_and_the_rollout_phase() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("plan.json");
    let o = omr(&[
        "plan",
        "--config",
        "configs/grpo/tiny.toml",
        "--model-config",
        "configs/models/tiny.json",
        "--set",
        "objective.beta=0.04",
        "--json",
        json.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    for want in [
        "GRPO: policy rows of 1024 prompt + 96 completion tokens",
        "| rollout (generation)",
        "| reference model",
        "| generation KV cache",
        ": fits",
    ] {
        assert!(t.contains(want), "{want}: {t}");
    }
    let v = read_json(&json);
    let rollout = v["plan"]["rollout_rows"].as_array().unwrap();
    let sum: u64 = rollout.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert_eq!(v["plan"]["rollout_peak"].as_u64(), Some(sum));
    assert!(v["plan"]["peak"].as_u64().unwrap() >= sum && sum > 0, "{v}");

    let o = omr(&[
        "plan",
        "--config",
        "configs/grpo/qwen2.5-vl-7b.toml",
        "--model-config",
        "configs/models/qwen2.5-vl-7b.json",
        "--attention",
        "fused",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("grpo.micro_batch_size = 4"), "{t}");
}

/// `omr bench train --objective logps`: a GRPO policy update's micro-batch (the token
/// log-probabilities as the head) on the tiny model, said in the header and the JSON; no torch
/// reference for it (exit 2 with --python).
#[test]
fn bench_train_with_grpo_objective() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("logps.json");
    let o = omr(&tiny_bench_args(&json, &["--objective", "logps"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("GRPO's token log-probabilities as the objective"),
        "{t}"
    );
    let v = read_json(&json);
    assert_eq!(v["objective"], "logps");
    let o = omr(&[
        "bench",
        "train",
        "--objective",
        "logps",
        "--python",
        "python3",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// `OMR_MLP_UNIT=0` and `OMR_ATTN_UNIT=0` (the halves of decoder layers and vision blocks as
/// separate ops, the path before the units) train to the same bits as the default units
/// (`ops::decoder_mlp`, `ops::decoder_attention`), full fine-tune (vision blocks included)
/// and LoRA: the same loss at every step, so the same gradients and updates before it; the
/// switches are in the report's opt-ins.
#[test]
fn unit_switches_train_to_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let run = |rank: &str, unit: Option<&str>| -> Value {
        let mut c = Command::new(env!("CARGO_BIN_EXE_omr"));
        c.args(tiny_bench_args(
            &json,
            &["--lora-rank", rank, "--kernels", "fused"],
        ))
        .current_dir(root())
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("OMR_MLP_UNIT")
        .env_remove("OMR_ATTN_UNIT");
        if let Some(v) = unit {
            c.env("OMR_MLP_UNIT", v).env("OMR_ATTN_UNIT", v);
        }
        let o = c.output().unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        read_json(&json)
    };
    for rank in ["0", "4"] {
        let (unit, ops) = (run(rank, None), run(rank, Some("0")));
        assert_eq!(ops["opt_ins"]["OMR_MLP_UNIT"], "0");
        assert_eq!(ops["opt_ins"]["OMR_ATTN_UNIT"], "0");
        assert_eq!(unit["losses"].as_array().unwrap().len(), 2);
        assert_eq!(unit["losses"], ops["losses"], "LoRA rank {rank}");
    }
}
