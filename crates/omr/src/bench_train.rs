//! `omr bench train`: training-step throughput of a randomly initialised Qwen2.5-VL-shaped model
//! on identical synthetic batches, with the FLOP accounting of PERFORMANCE.md, MFU, the phase
//! split, peak memory next to `omr plan`'s prediction, and (with `--python`) the same step in
//! torch + transformers on the same batch and config, printed as a ratio.
//!
//! Notable choices: the batch is written once by our side (`SyntheticBatch::save`) and read by
//! `scripts/bench/train_step.py`, so both sides see the same tokens, pixels and labels. The
//! first `--warmup` steps are not timed; times are medians. The step is `sft::run`'s
//! (`bench_step::train_step`), with the precision and kernels of `[runtime]` (`--precision`,
//! `--kernels`: bf16 on fp32 masters with the fused kernels on CUDA by default). On the CPU
//! MFU is not defined and GFLOP/s are printed.

use crate::exit::{Exit, Tag};
use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;
use omr_model::config::ModelConfig;
use omr_model::lora::LoraConfig;
use omr_model::model::Qwen2VL;
use omr_model::params::{Params, Part};
use omr_model::Kernels;
use omr_train::bench_step::{train_step, PhaseTimes, StepHead, SyntheticBatch};
use omr_train::flops::step_flops;
use omr_train::optim::OptimConfig;
use omr_train::plan::{self, AttentionImpl, Checkpointing, PlanInput, Trainable};
use serde_json::json;
use std::path::PathBuf;

pub(crate) mod memory;
mod reference;

use memory::{rss, GpuMemPoller};

#[derive(Args)]
pub struct BenchTrainArgs {
    /// config.json of the model, or a shipped one by name: tiny, qwen2.5-vl-3b (3b),
    /// qwen2.5-vl-7b (7b) from configs/models/.
    #[arg(long, default_value = "tiny")]
    pub model_config: String,
    /// B: rows per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// T: tokens per row (image tokens included).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Side in pixels of each row's square image (multiple of 28); 0 for text only.
    #[arg(long, default_value_t = 224)]
    pub image_px: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Micro-batches per optimizer step (`train.grad_accum`): each step runs this many
    /// forward + backward passes of the batch, sums their gradients and steps once, on both
    /// sides; tokens and FLOPs per step count every micro-batch.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// cpu | cuda | auto (cuda needs a build with `--features cuda`; auto: cuda when there is one).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Peak dense TFLOP/s for MFU (default 989 on CUDA = H100 SXM bf16; none on CPU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Threads of both sides (candle's pool and torch.set_num_threads); default: candle's.
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub freeze_vision: bool,
    #[arg(long)]
    pub freeze_language: bool,
    /// LoRA of this rank on every linear layer of the language model (`all-linear`, alpha
    /// 2·rank), the whole base frozen, on both sides; 0: no LoRA.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// Python with torch and transformers: run the same step there and print the ratio.
    #[arg(long)]
    pub python: Option<String>,
    /// auto | fp32 | bf16: our compute precision (bf16: bf16 compute on fp32 masters and
    /// optimizer state, as `[runtime] precision`); auto is bf16 on CUDA, fp32 on the CPU.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// Precision of the reference: same (as ours), fp32, or bf16 (autocast with fp32 masters,
    /// the usual GPU recipe).
    #[arg(long, default_value = "same")]
    pub reference_precision: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// none | decoder | vision | all: blocks recomputed in backward, on both sides (the
    /// reference uses transformers' gradient checkpointing, which covers both stacks, for any
    /// value but none).
    #[arg(long, default_value = "none")]
    pub activation_checkpointing: String,
    /// With checkpointing (fused kernels), recompute the blocks' attentions too instead of
    /// keeping their outputs from the first forward (`[train] recompute_attention`; what the
    /// reference's gradient checkpointing does).
    #[arg(long)]
    pub recompute_attention: bool,
    /// With decoder checkpointing, the last N decoder layers keep their activations and are
    /// not recomputed (`[train] kept_decoder_layers`; `omr plan` prints the most that fit);
    /// auto: as many as the plan finds room for on this device.
    #[arg(long, default_value = "0")]
    pub kept_decoder_layers: String,
    /// auto | candle | fused: the ops of our forward and backward (auto: the fused kernels on
    /// CUDA, candle ops on the CPU) and of the optimizer (fused AdamW + grad norm on CUDA).
    #[arg(long, default_value = "auto")]
    pub kernels: String,
    /// ce (SFT's cross-entropy) | logps (GRPO's token log-probabilities: a policy update's
    /// micro-batch, the fused linear log-prob on the fused path). The torch reference runs ce.
    #[arg(long, default_value = "ce")]
    pub objective: String,
    /// Time each segment of the recomputing backward (vision, decoder forward, head, decoder
    /// layers' recompute and backward, …), synchronising the device at each boundary; needs
    /// --activation-checkpointing other than none.
    #[arg(long)]
    pub profile: bool,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Environment switches that pick a kernel or model variant (README, "GPU").
const OPT_INS: [&str; 8] = [
    "OMR_ATTN",
    "OMR_ATTN_SOFTMAX",
    "OMR_MMA",
    "OMR_BLOCK_OP",
    "OMR_CUDA_POOL",
    "OMR_GRAD_SINK",
    "OMR_MLP_UNIT",
    "OMR_ATTN_UNIT",
];

pub fn run(a: BenchTrainArgs) -> crate::Result<()> {
    if a.steps == 0 {
        return Err(Exit::usage(anyhow::anyhow!("--steps must be at least 1")));
    }
    if a.grad_accum == 0 {
        return Err(Exit::usage(anyhow::anyhow!(
            "--grad-accum must be at least 1"
        )));
    }
    if let Some(n) = a.threads {
        // Read by candle's and rayon's pools when they start, which is below.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    let threads = candle_core::utils::get_num_threads();
    let head = match a.objective.as_str() {
        "ce" => StepHead::CrossEntropy,
        "logps" if a.python.is_none() => StepHead::TokenLogps,
        "logps" => {
            return Err(Exit::usage(anyhow::anyhow!(
                "--objective logps has no torch reference (it runs ce): drop --python"
            )))
        }
        other => {
            return Err(Exit::usage(anyhow::anyhow!(
                "--objective {other}: ce or logps"
            )))
        }
    };
    let checkpointing = match a.activation_checkpointing.as_str() {
        "none" => Checkpointing::None,
        "decoder" => Checkpointing::Decoder,
        "vision" => Checkpointing::Vision,
        "all" => Checkpointing::All,
        other => {
            return Err(Exit::usage(anyhow::anyhow!(
                "--activation-checkpointing {other}: none, decoder, vision or all"
            )))
        }
    };
    let rt = crate::bench_common::runtime(&a.device, &a.precision, &a.kernels)?;
    let (device, compute, kernels) = (rt.device.clone(), rt.compute, rt.kernels);
    let precision = if compute == DType::BF16 {
        "bf16"
    } else {
        "fp32"
    };
    let reference_precision = match a.reference_precision.as_str() {
        "same" => precision,
        "fp32" => "fp32",
        "bf16" => "bf16",
        other => {
            return Err(Exit::usage(anyhow::anyhow!(
                "--reference-precision {other}: same, fp32 or bf16"
            )))
        }
    };
    let lora = (a.lora_rank > 0).then(|| LoraConfig {
        r: a.lora_rank,
        alpha: 2.0 * a.lora_rank as f64,
        dropout: 0.0,
        targets: vec!["all-linear".into()],
    });
    let cfg_path = crate::bench_common::config_path(&a.model_config);
    let cfg = ModelConfig::from_file(&cfg_path).usage()?;
    let batch = SyntheticBatch::new(&cfg, a.batch, a.seq, a.image_px, a.seed)
        .map_err(|e| Exit::usage(anyhow::anyhow!(e)))?;

    // ---- what the planner predicts for exactly this step ----------------------------------
    let side = a.image_px / cfg.vision.patch_size;
    let input_plan = PlanInput {
        model: cfg.clone(),
        batch: a.batch,
        seq: a.seq,
        images_per_row: usize::from(a.image_px > 0),
        image_hw: (side, side),
        labelled: batch.labelled(),
        // LoRA freezes the whole base (`lora::apply`).
        trainable: Trainable {
            vision: !a.freeze_vision && lora.is_none(),
            merger: !a.freeze_vision && lora.is_none(),
            language: !a.freeze_language && lora.is_none(),
        },
        lora: lora.clone(),
        compute_bytes: if compute == DType::BF16 { 2 } else { 4 },
        attention: if kernels == Kernels::Fused {
            AttentionImpl::Fused
        } else {
            AttentionImpl::Eager
        },
        checkpointing,
        recompute_attention: a.recompute_attention,
        kept_decoder_layers: 0,
        grad_accum: a.grad_accum as u64,
        world: 1,
        // GRPO's objective: its head, no reference, no rollout worth planning here.
        grpo: (head == StepHead::TokenLogps).then_some(plan::GrpoShape {
            reference: false,
            rollout_rows: 1,
            prefill_rows: 1,
            prompt_tokens: 1,
            completion_tokens: 1,
        }),
    };
    let kept_layers = match a.kept_decoder_layers.as_str() {
        "auto" => {
            let usable = rt
                .device_memory()
                .unwrap_or(0)
                .saturating_sub(plan::GIB as u64);
            plan::most_kept_decoder_layers(&input_plan, usable).map_or(0, |(k, _)| k)
        }
        n => n.parse().map_err(|_| {
            Exit::usage(anyhow::anyhow!(
                "--kept-decoder-layers {n}: a number of decoder layers or auto"
            ))
        })?,
    };
    let input_plan = PlanInput {
        kept_decoder_layers: kept_layers,
        ..input_plan
    };
    let predicted = plan::plan(&input_plan);
    let flops = step_flops(&input_plan);

    // ---- our side ---------------------------------------------------------------------------
    let (rss0, _) = rss();
    let mut params = Params::init(&cfg, a.seed, 0.02, &device)?;
    params.set_part_trainable(Part::Vision, !a.freeze_vision);
    params.set_part_trainable(Part::Merger, !a.freeze_vision);
    params.set_part_trainable(Part::Language, !a.freeze_language);
    if let Some(l) = &lora {
        omr_model::lora::apply(&mut params, &cfg, l, a.seed)?;
    }
    let (n_params, n_trainable) = params.counts();
    if n_trainable == 0 {
        return Err(Exit::usage(anyhow::anyhow!(
            "nothing to train: both parts frozen"
        )));
    }
    params.set_compute_dtype(compute)?;
    let mut model = Qwen2VL::new(&cfg, &params)?;
    let optim = OptimConfig {
        lr: 1e-5,
        ..OptimConfig::default()
    };
    let (mut opt, wrt) = omr_train::setup::optimizer(&params, &optim, &rt)?;
    let input = batch.input(&device, DType::F32)?;
    let (rss_state, _) = rss();
    eprintln!(
        "model {} ({:.1} M params, {:.3} M trainable), B {} × T {}{}, {} patches, {} labelled tokens, {} threads, {:?} kernels",
        cfg_path.display(),
        n_params as f64 / 1e6,
        n_trainable as f64 / 1e6,
        a.batch,
        a.seq,
        match a.grad_accum {
            1 => String::new(),
            k => format!(" × {k} micro-batches"),
        },
        batch.patches(),
        batch.labelled(),
        threads,
        kernels
    );
    let poller = GpuMemPoller::start(&device);
    let mut times: Vec<PhaseTimes> = Vec::new();
    let mut losses = Vec::new();
    if a.profile && a.warmup == 0 {
        omr_model::profile_segments(true);
    }
    for i in 0..a.warmup + a.steps {
        let (loss, mut t) = train_step(
            &model,
            &mut opt,
            &input,
            &batch.labels,
            true,
            checkpointing
                .recompute()
                .with_attention(a.recompute_attention)
                .keeping_decoder_layers(kept_layers),
            &wrt,
            kernels,
            a.grad_accum,
            head,
        )?;
        losses.push(loss);
        if params.casts_on_get() {
            // bf16 modules hold casts of the fp32 masters: the step's last phase, as in sft.
            device.synchronize()?;
            let t0 = std::time::Instant::now();
            model = Qwen2VL::new(&cfg, &params)?;
            device.synchronize()?;
            t.optimizer += t0.elapsed().as_secs_f64();
            t.step += t0.elapsed().as_secs_f64();
        }
        if i >= a.warmup {
            times.push(t);
        }
        if a.profile && i + 1 == a.warmup {
            omr_model::profile_segments(true);
        }
    }
    let (_, hwm) = rss();
    let gpu_mem = poller.finish();
    let profile = omr_model::take_profile();
    omr_model::profile_segments(false);
    let med = |f: fn(&PhaseTimes) -> f64| median(times.iter().map(f).collect());
    let step_s = med(|t| t.step);
    // Every micro-batch is a forward + backward of the batch (the vision probe times one).
    let micro = a.grad_accum as f64;
    let (fwd, bwd, opt_s, vis) = (
        med(|t| t.forward),
        med(|t| t.backward),
        med(|t| t.optimizer),
        med(|t| t.vision_forward) * micro,
    );
    let tokens = batch.tokens() as f64 * micro;
    let total_flops = flops.total() * micro;
    let achieved = total_flops / step_s;
    let peak = a
        .peak_tflops
        .or(matches!(device, Device::Cuda(_)).then_some(989.0));

    // ---- the reference ------------------------------------------------------------------------
    if a.python.is_some() {
        // Torch runs next on the same GPU: hand our weights, optimizer state and the memory
        // pool's cached blocks back first.
        drop((model, opt, wrt, input, params));
        omr_kernels::release_device_memory(&device)?;
    }
    let reference = match &a.python {
        Some(py) => Some(reference::run(
            py,
            &cfg_path,
            &batch,
            &a,
            threads,
            reference_precision,
        )?),
        None => None,
    };

    // ---- report -------------------------------------------------------------------------------
    let mib = |b: u64| b as f64 / 1048576.0;
    let pct = |x: f64| 100.0 * x / step_s;
    // The opt-in switches of the kernels and the model set for this run, so that a log or a
    // JSON report says which variant it measured.
    let opt_ins: Vec<(&str, String)> = OPT_INS
        .iter()
        .filter_map(|&k| std::env::var(k).ok().map(|v| (k, v)))
        .collect();
    println!(
        "omr bench train: {} (random init, seed {}), {} {precision}, {kernels:?} kernels, \
         activation checkpointing {}{}{}{}{}{}{}",
        cfg_path.display(),
        a.seed,
        a.device,
        a.activation_checkpointing,
        match kept_layers {
            k if k > 0 && checkpointing.decoder() => format!(
                " (last {k} decoder layers kept{})",
                if a.kept_decoder_layers == "auto" {
                    ", auto"
                } else {
                    ""
                }
            ),
            _ => String::new(),
        },
        if a.recompute_attention && checkpointing != Checkpointing::None {
            " (attention recomputed)"
        } else {
            ""
        },
        match a.grad_accum {
            1 => String::new(),
            k => format!(", {k} micro-batches per step"),
        },
        match a.lora_rank {
            0 => String::new(),
            r => format!(", LoRA rank {r} on every language-model linear layer (base frozen)"),
        },
        opt_ins
            .iter()
            .map(|(k, v)| format!(", {k}={v}"))
            .collect::<String>(),
        match head {
            StepHead::TokenLogps => ", GRPO's token log-probabilities as the objective",
            StepHead::CrossEntropy => "",
        }
    );
    println!(
        "  step {:.1} ms median of {} | {:.0} tokens/s | {:.3} TFLOP/step | {:.2} GFLOP/s achieved{}",
        step_s * 1e3,
        a.steps,
        tokens / step_s,
        total_flops / 1e12,
        achieved / 1e9,
        match peak {
            Some(p) => format!(" | MFU {:.1}% of {p} TFLOP/s", 100.0 * achieved / (p * 1e12)),
            None => " | MFU n/a on CPU".into(),
        }
    );
    println!("  where the time goes (device synchronised between phases):");
    println!(
        "    vision forward      {:>9.1} ms {:>5.1}%  (probe on the same pixels, inside the forward)",
        vis * 1e3,
        pct(vis)
    );
    println!(
        "    LM forward + loss   {:>9.1} ms {:>5.1}%",
        (fwd - vis).max(0.0) * 1e3,
        pct((fwd - vis).max(0.0))
    );
    println!(
        "    backward            {:>9.1} ms {:>5.1}%  (vision + LM: one candle pass)",
        bwd * 1e3,
        pct(bwd)
    );
    println!(
        "    optimizer           {:>9.1} ms {:>5.1}%  (accumulate, clip, AdamW)",
        opt_s * 1e3,
        pct(opt_s)
    );
    if !profile.is_empty() {
        println!("  inside forward + backward, per step (device synchronised at each boundary):");
        for (what, secs) in &profile {
            let per = secs / a.steps as f64;
            println!("    {what:<36} {:>9.1} ms {:>5.1}%", per * 1e3, pct(per));
        }
    } else if a.profile {
        println!("  (--profile: segments are only timed with --activation-checkpointing)");
    }
    println!(
        "  FLOPs per step (PERFORMANCE.md accounting{}):",
        match a.grad_accum {
            1 => String::new(),
            k => format!(", × {k} micro-batches"),
        }
    );
    for (name, f) in flops.parts().into_iter().filter(|&(_, f)| f != 0.0) {
        println!(
            "    {name:<30} {:>12.4} GFLOP {:>5.1}%",
            f * micro / 1e9,
            100.0 * f * micro / total_flops.max(1.0)
        );
    }
    println!(
        "  memory: peak RSS {:.1} MiB, {:.1} MiB over weights + optimizer state ({:.1} MiB) across \
         all steps (allocator retention and one-time runtime state included); plan: {:.1} MiB \
         for a step, {:.1} MiB peak (the exact comparison: crates/omr-train/tests/plan_memory.rs)",
        hwm,
        hwm - rss_state,
        rss_state - rss0,
        mib(predicted.step_growth),
        mib(predicted.peak)
    );
    if let Some((state, peak)) = gpu_mem {
        println!(
            "  GPU memory: peak {peak:.0} MiB in use during the steps ({state:.0} MiB before the \
             first: weights, optimizer state, CUDA context); plan: {:.0} MiB peak",
            mib(predicted.peak)
        );
    }
    println!(
        "  loss {:.4} → {:.4} (ln V = {:.4})",
        losses[0],
        losses[losses.len() - 1],
        (cfg.text.vocab_size as f64).ln()
    );
    let mut report = json!({
        "model_config": cfg_path.display().to_string(),
        "device": a.device,
        "threads": threads,
        "dtype": precision,
        "kernels": format!("{kernels:?}").to_lowercase(),
        "activation_checkpointing": a.activation_checkpointing,
        "recompute_attention": a.recompute_attention,
        "kept_decoder_layers": kept_layers,
        "objective": a.objective,
        "lora_rank": a.lora_rank,
        "opt_ins": opt_ins.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "params": n_params,
        "trainable": n_trainable,
        "batch": a.batch,
        "seq": a.seq,
        "image_px": a.image_px,
        "patches": batch.patches(),
        "grad_accum": a.grad_accum,
        "tokens_per_step": batch.tokens() * a.grad_accum,
        "labelled_tokens": batch.labelled(),
        "steps": a.steps,
        "step_s": times.iter().map(|t| t.step).collect::<Vec<_>>(),
        "median_step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "phases_s": {"vision_forward": vis, "lm_forward": (fwd - vis).max(0.0), "forward": fwd,
                     "backward": bwd, "optimizer": opt_s},
        // Per micro-batch (one forward + backward of the batch); flops_total is per step.
        "flops": flops,
        "flops_total": total_flops,
        "achieved_gflops": achieved / 1e9,
        "mfu": peak.map(|p| achieved / (p * 1e12)),
        "peak_rss_mib": hwm,
        "gpu_mem_mib": gpu_mem.map(|(state, peak)| json!({"before_steps": state, "peak": peak})),
        "step_rss_growth_mib": hwm - rss_state,
        "plan_step_growth_mib": mib(predicted.step_growth),
        "plan_peak_mib": mib(predicted.peak),
        "losses": losses,
        "segments_s": profile.iter().map(|(w, t)| json!([w, t / a.steps as f64])).collect::<Vec<_>>(),
    });
    if let Some(r) = &reference {
        let theirs = r["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        let ratio = (tokens / step_s) / theirs;
        println!(
            "  torch {} + transformers {} ({}, {}, {} threads): {:.1} ms/step, {:.0} tokens/s, peak {:.1} MiB ({}); loss {:.4}",
            r["torch"].as_str().unwrap_or("?"),
            r["transformers"].as_str().unwrap_or("?"),
            r["precision"].as_str().unwrap_or("?"),
            r["attention"].as_str().unwrap_or("?"),
            r["threads"],
            r["median_step_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
            theirs,
            r["peak_mib"].as_f64().unwrap_or(f64::NAN),
            r["peak_kind"].as_str().unwrap_or("?"),
            r["losses"][0].as_f64().unwrap_or(f64::NAN),
        );
        println!("  ours / theirs tokens/s: {ratio:.2}×");
        report["reference"] = r.clone();
        report["ratio_tokens_per_s"] = json!(ratio);
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
