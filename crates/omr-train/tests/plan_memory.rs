//! `plan` against measurement: one SFT step of the fp32 tiny model on the CPU, its peak memory
//! growth measured two ways, compared with what `plan::plan` predicts for the same shapes.
//!
//! - Heap bytes: this test binary counts every allocation (a counting global allocator), so the
//!   peak of live bytes during the step minus the live bytes before it is exact. Asserted within
//!   ±12% of the plan's `step_growth` for several shapes (with and without images, a frozen
//!   vision tower, text only with a longer sequence, LoRA on a frozen base, activation
//!   checkpointing of both stacks or of the decoder).
//! - Peak RSS growth (VmHWM after `clear_refs` minus VmRSS before): what the issue asks to
//!   compare. glibc keeps freed chunks and maps pages lazily, so it is printed and held to a
//!   looser ±15%; each case runs in its own process so that its step is the first.
//!
//! - The fused kernels' path (the decoder's and vision blocks' units, flash attention, the
//!   linear cross-entropy; their plain-Rust references here): held to the tolerances below
//!   on the under side (an underestimate is what runs out of memory) and to `FUSED_OVER` on
//!   the over side, since on this tiny model its peak falls where the plan does not put it.
//! - GRPO's rollout phase (`plan/grpo.rs`): one generation call (prefill, then decoding to the
//!   completion limit) against the plan's rows beyond the resident state, on prompts with and
//!   without images, candle ops and the fused ops, the prefill, the vision tower or the last
//!   decoding step as the peak. Measured −5.8% to +3.1% heap.
//!
//! Each case runs in a child process (this binary again, the case in an environment variable):
//! the counters are process-wide.

use candle_core::{DType, Device};
use omr_model::config::ModelConfig;
use omr_model::lora::LoraConfig;
use omr_model::model::Qwen2VL;
use omr_model::params::{Params, Part};
use omr_train::bench_step::{train_step, StepHead, SyntheticBatch};
use omr_train::optim::{param_specs, AdamW, OptimConfig};
use omr_train::plan::{self, AttentionImpl, Checkpointing, PlanInput, Trainable};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// |plan / measured − 1| allowed for live heap bytes: the plan leaves out a few MiB of
/// allocator-independent runtime state (gemm's packing buffers, the backward's node list);
/// measured −2.2% to −6.2% without LoRA, −7.6% and −10.2% with activation checkpointing.
const HEAP_TOLERANCE: f64 = 0.12;
/// The same for peak RSS growth, which adds page granularity and malloc's own bookkeeping.
const RSS_TOLERANCE: f64 = 0.15;
/// How far over the fused path's measured step the plan may be on this model. Measured
/// +20.2% (full fine-tune), −10.4% (LoRA, within the under-side tolerances), +37.6% (checkpointing
/// all). The plan puts the step's peak in the backward (the kept activations, every gradient,
/// 3 × the largest tensor in flight), which is where it is at the 3B shape on a GPU (run 5:
/// plan +1.6%); on this tiny model it is the head's forward (the linear cross-entropy's f32
/// work over the whole 2048-entry vocabulary on top of the kept activations: 25.45 MiB of the
/// full fine-tune). The kept activations alone agree: vision tower 3.35 MiB measured (the
/// plan's 5.68 MiB also counts the step's f32 pixels, which this measurement allocates before
/// the step); the decoder's layers with the embeddings 12.2 MiB measured, against 12.47 MiB
/// for the plan's layers alone.
const FUSED_OVER: f64 = 0.5;
/// With LoRA the plan counts ~2.5 MiB too little per live decoder layer on this model (its
/// fused op's backward temporaries): −9.5% heap without checkpointing, −14% with it, where
/// the step itself is a third of the size. Known, and held to this looser bound.
const LORA_EXTRA: f64 = 0.06;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Relaxed) + new - l.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn status_mib(key: &str) -> f64 {
    omr_train::metrics::proc_kib("/proc/self/status", key).map_or(0.0, |k| k / 1024.0)
}

struct Case {
    batch: usize,
    seq: usize,
    image_px: usize,
    freeze_vision: bool,
    /// LoRA r = 8 on every linear of the language model (the base frozen).
    lora: bool,
    ckpt: Checkpointing,
    /// Micro-batches of the step (`train.grad_accum`).
    accum: usize,
    /// SFT's cross-entropy, or GRPO's token log-probabilities as the objective.
    head: StepHead,
    /// candle's ops (eager attention) or the fused kernels' path (their plain-Rust references
    /// here: the decoder's and the vision blocks' units, flash attention, the linear
    /// cross-entropy).
    kernels: omr_model::Kernels,
}

/// (measured heap growth, measured RSS growth, predicted) in MiB.
fn measure(cfg: &ModelConfig, c: &Case) -> (f64, f64, f64) {
    let dev = Device::Cpu;
    let batch = SyntheticBatch::new(cfg, c.batch, c.seq, c.image_px, 7).unwrap();
    let mut params = Params::init(cfg, 0, 0.02, &dev).unwrap();
    params.set_part_trainable(Part::Vision, !c.freeze_vision);
    params.set_part_trainable(Part::Merger, !c.freeze_vision);
    let lora = c.lora.then(|| LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec!["all-linear".into()],
    });
    if let Some(l) = &lora {
        omr_model::lora::apply(&mut params, cfg, l, 0).unwrap();
    }
    let model = Qwen2VL::new(cfg, &params).unwrap();
    let wrt: Vec<_> = params
        .trainable()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let trainable: Vec<_> = params
        .trainable()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    let oc = OptimConfig::default();
    let mut opt = AdamW::new(param_specs(trainable, &oc), &oc).unwrap();
    let input = batch.input(&dev, DType::F32).unwrap();

    let side = c.image_px / cfg.vision.patch_size;
    let p = PlanInput {
        model: cfg.clone(),
        batch: c.batch,
        seq: c.seq,
        images_per_row: usize::from(c.image_px > 0),
        image_hw: (side, side),
        labelled: batch.labelled(),
        trainable: Trainable {
            vision: !c.freeze_vision && !c.lora,
            merger: !c.freeze_vision && !c.lora,
            language: !c.lora,
        },
        lora,
        compute_bytes: 4,
        attention: match c.kernels {
            omr_model::Kernels::Fused => AttentionImpl::Fused,
            omr_model::Kernels::Candle => AttentionImpl::Eager,
        },
        checkpointing: c.ckpt,
        recompute_attention: false,
        kept_decoder_layers: 0,
        grad_accum: c.accum as u64,
        world: 1,
        // A policy update's micro-batch: GRPO's head, no reference, a rollout too small to
        // be the peak.
        grpo: (c.head == StepHead::TokenLogps).then_some(plan::GrpoShape {
            reference: false,
            rollout_rows: 1,
            prefill_rows: 1,
            prompt_tokens: 8,
            completion_tokens: 8,
        }),
    };
    let predicted = plan::plan(&p).step_growth as f64 / 1048576.0;
    if std::env::var("OMR_PLAN_ROWS").is_ok() {
        for r in plan::plan(&p).train_rows {
            println!(
                "ROW {:>8.2} MiB {} {}",
                r.bytes as f64 / 1048576.0,
                r.category,
                r.note
            );
        }
    }

    // A small step first pays the one-time state of candle's CPU backend (gemm's packing
    // buffers, the thread pool): ~10 MiB that belongs to no training step. Its freed chunks
    // are small next to the measured step's tensors, so RSS still grows as the step allocates.
    let warm = SyntheticBatch::new(cfg, 1, 32, 0, 1).unwrap();
    let warm_input = warm.input(&dev, DType::F32).unwrap();
    train_step(
        &model,
        &mut opt,
        &warm_input,
        &warm.labels,
        false,
        c.ckpt.recompute(),
        &wrt,
        c.kernels,
        1,
        StepHead::CrossEntropy,
    )
    .unwrap();
    drop(warm_input);

    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss0 = status_mib("VmRSS:");
    let live0 = LIVE.load(Relaxed);
    PEAK.store(live0, Relaxed);
    train_step(
        &model,
        &mut opt,
        &input,
        &batch.labels,
        false,
        c.ckpt.recompute(),
        &wrt,
        c.kernels,
        c.accum,
        c.head,
    )
    .unwrap();
    let heap = (PEAK.load(Relaxed) - live0) as f64 / 1048576.0;
    let rss = status_mib("VmHWM:") - rss0;
    (heap, rss, predicted)
}

/// Runs case `i` of test `name` in a child process (this binary again, the case in `var`) and
/// returns what it printed: (measured heap growth, measured RSS growth, predicted) in MiB.
/// glibc's mmap threshold is fixed in the child (64 KiB): left dynamic, it rises with each
/// large block freed, after which blocks of that size come from arenas that keep their pages,
/// and peak RSS measures that retention (+12% over the heap peak on the 32 × 16 + 512
/// rollout, +0.2% with the threshold fixed) instead of what was live.
fn in_child(name: &str, var: &str, i: usize) -> (f64, f64, f64) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(var, i.to_string())
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<f64> = text
        .lines()
        .find_map(|l| l.split("RESULT ").nth(1))
        .unwrap_or_else(|| panic!("{name} case {i} printed no result: {text}"))
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    (nums[0], nums[1], nums[2])
}

/// (B, T, image side in px, freeze the vision tower, LoRA)
const fn case(batch: usize, seq: usize, image_px: usize, freeze_vision: bool, lora: bool) -> Case {
    Case {
        batch,
        seq,
        image_px,
        freeze_vision,
        lora,
        ckpt: Checkpointing::None,
        accum: 1,
        head: StepHead::CrossEntropy,
        kernels: omr_model::Kernels::Candle,
    }
}

/// The same case on the fused kernels' path.
const fn fused(c: Case) -> Case {
    Case {
        kernels: omr_model::Kernels::Fused,
        ..c
    }
}

/// The same case with activation checkpointing.
const fn ckpt(c: Case, ckpt: Checkpointing) -> Case {
    Case { ckpt, ..c }
}

/// The same case on `accum` accumulated micro-batches.
const fn accum(c: Case, accum: usize) -> Case {
    Case { accum, ..c }
}

/// The same case through GRPO's objective (a policy update's micro-batch).
const fn grpo(c: Case) -> Case {
    Case {
        head: StepHead::TokenLogps,
        ..c
    }
}

const CASES: [Case; 15] = [
    case(2, 256, 224, false, false),
    case(4, 128, 112, false, false),
    case(2, 256, 224, true, false),
    case(1, 512, 0, false, false),
    case(2, 256, 224, false, true),
    ckpt(case(2, 256, 224, false, false), Checkpointing::All),
    ckpt(case(1, 512, 0, false, false), Checkpointing::Decoder),
    ckpt(case(2, 256, 224, false, true), Checkpointing::All),
    accum(case(2, 256, 224, false, false), 3),
    accum(
        ckpt(case(1, 512, 0, false, false), Checkpointing::Decoder),
        2,
    ),
    grpo(case(2, 256, 224, false, false)),
    grpo(ckpt(case(1, 512, 0, false, false), Checkpointing::All)),
    fused(case(2, 256, 224, false, false)),
    fused(case(2, 256, 224, false, true)),
    fused(ckpt(case(2, 256, 224, false, false), Checkpointing::All)),
];

/// Each case runs in a fresh process (this test binary again, with `OMR_PLAN_CASE`), so its
/// step is the first one of the process and the RSS high-water mark means something.
#[test]
fn plan_matches_measured_step_memory() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/tiny.json");
    let cfg = ModelConfig::from_file(&path).unwrap();
    if let Ok(i) = std::env::var("OMR_PLAN_CASE") {
        let (heap, rss, pred) = measure(&cfg, &CASES[i.parse::<usize>().unwrap()]);
        println!("RESULT {heap} {rss} {pred}");
        return;
    }
    let mut failures = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let (heap, rss, pred) = in_child("plan_matches_measured_step_memory", "OMR_PLAN_CASE", i);
        let (eh, er) = (pred / heap - 1.0, pred / rss - 1.0);
        println!(
            "B {} T {} image {} px freeze_vision {} lora {} ckpt {} accum {} {:?} {:?}: plan {pred:.2} MiB | heap {heap:.2} MiB ({:+.1}%) | peak RSS growth {rss:.2} MiB ({:+.1}%)",
            c.batch, c.seq, c.image_px, c.freeze_vision, c.lora, c.ckpt.name(), c.accum, c.head, c.kernels, 100.0 * eh, 100.0 * er
        );
        if c.kernels == omr_model::Kernels::Fused {
            // The under side as for candle's path (an underestimate is what runs out of
            // memory); the over side up to FUSED_OVER.
            let extra = if c.lora { LORA_EXTRA } else { 0.0 };
            if eh < -(HEAP_TOLERANCE + extra) || er < -(RSS_TOLERANCE + extra) {
                failures.push(format!(
                    "fused: plan {pred:.2} under heap {heap:.2} / RSS {rss:.2} MiB (case {i})"
                ));
            }
            if eh > FUSED_OVER {
                failures.push(format!("fused: plan {pred:.2} vs {heap:.2} MiB (case {i})"));
            }
            continue;
        }
        let extra = if c.lora { LORA_EXTRA } else { 0.0 };
        if eh.abs() > HEAP_TOLERANCE + extra {
            failures.push(format!("heap: plan {pred:.2} vs {heap:.2} MiB (case {i})"));
        }
        if er.abs() > RSS_TOLERANCE + extra {
            failures.push(format!("RSS: plan {pred:.2} vs {rss:.2} MiB (case {i})"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// One GRPO rollout call: rows of `prompt` tokens (one image of `image_px` when > 0), each
/// generating `completion` tokens (no end-of-sequence id: every row runs to the limit); with
/// `group` > 1, rows / group distinct prompts, each prefilled once for its group's rows
/// (`generate_repeated`).
struct Rollout {
    rows: usize,
    group: usize,
    prompt: usize,
    image_px: usize,
    completion: usize,
    kernels: omr_model::Kernels,
}

const ROLLOUTS: [Rollout; 7] = [
    Rollout {
        group: 1,
        rows: 8,
        prompt: 256,
        image_px: 224,
        completion: 64,
        kernels: omr_model::Kernels::Candle,
    },
    Rollout {
        group: 1,
        rows: 16,
        prompt: 64,
        image_px: 0,
        completion: 192,
        kernels: omr_model::Kernels::Candle,
    },
    Rollout {
        group: 1,
        rows: 8,
        prompt: 256,
        image_px: 224,
        completion: 64,
        kernels: omr_model::Kernels::Fused,
    },
    Rollout {
        group: 1,
        rows: 4,
        prompt: 512,
        image_px: 0,
        completion: 32,
        kernels: omr_model::Kernels::Fused,
    },
    Rollout {
        group: 1,
        rows: 16,
        prompt: 320,
        image_px: 336,
        completion: 8,
        kernels: omr_model::Kernels::Candle,
    },
    // Groups of 4: the prefill and the vision tower over 4 prompts, decoding over 16 rows.
    Rollout {
        group: 4,
        rows: 16,
        prompt: 320,
        image_px: 336,
        completion: 8,
        kernels: omr_model::Kernels::Candle,
    },
    // Decoding is the peak: short prompts, long completions.
    Rollout {
        group: 1,
        rows: 32,
        prompt: 16,
        image_px: 0,
        completion: 512,
        kernels: omr_model::Kernels::Candle,
    },
];

/// (measured heap growth, measured RSS growth, predicted) in MiB of one generation call, the
/// prompts' tensors included, against the plan's rollout phase beyond the resident state.
fn measure_rollout(cfg: &ModelConfig, c: &Rollout) -> (f64, f64, f64) {
    use omr_model::generate::{generate_repeated, generate_with, SamplingConfig};
    let dev = Device::Cpu;
    let params = Params::init(cfg, 0, 0.02, &dev).unwrap();
    let model = Qwen2VL::new(cfg, &params).unwrap();
    let ctx = omr_model::Ctx {
        kernels: c.kernels,
        ..omr_model::Ctx::default()
    };
    let sampling = |n| SamplingConfig {
        max_new_tokens: n,
        temperature: 1.0,
        seed: 3,
        ..SamplingConfig::default()
    };
    let attention = match c.kernels {
        omr_model::Kernels::Fused => AttentionImpl::Fused,
        omr_model::Kernels::Candle => AttentionImpl::Eager,
    };
    let mut p = plan::rollout_input(
        cfg,
        4,
        attention,
        c.rows,
        c.prompt,
        c.image_px,
        c.completion,
    );
    if let Some(g) = p.grpo.as_mut() {
        g.prefill_rows = plan::prefill_rows(c.rows, c.group);
    }
    let planned = plan::plan(&p);
    if std::env::var("OMR_PLAN_ROWS").is_ok() {
        for r in &planned.rollout_rows {
            println!(
                "ROW {:>8.2} MiB {} {}",
                r.bytes as f64 / 1048576.0,
                r.category,
                r.note
            );
        }
    }
    let predicted = plan::rollout_growth(&planned) as f64 / 1048576.0;

    // Warm-up: candle's one-time CPU state (as for the step).
    let warm = SyntheticBatch::new(cfg, 1, 32, 0, 1).unwrap();
    generate_with(
        &model,
        &warm.input(&dev, DType::F32).unwrap(),
        &sampling(2),
        &ctx,
    )
    .unwrap();

    // The prompts' host buffers are the data pipeline's, before the call; their tensors count.
    let batch = SyntheticBatch::new(cfg, c.rows / c.group, c.prompt, c.image_px, 7).unwrap();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss0 = status_mib("VmRSS:");
    let live0 = LIVE.load(Relaxed);
    PEAK.store(live0, Relaxed);
    let input = batch.input(&dev, DType::F32).unwrap();
    let repeats = vec![c.group; c.rows / c.group];
    let out = generate_repeated(&model, &input, &repeats, &sampling(c.completion), &ctx).unwrap();
    assert_eq!(out.len(), c.rows);
    assert!(out.iter().all(|o| o.tokens.len() == c.completion));
    let heap = (PEAK.load(Relaxed) - live0) as f64 / 1048576.0;
    let rss = status_mib("VmHWM:") - rss0;
    (heap, rss, predicted)
}

/// The rollout phase of `omr plan` on a GRPO config against one generation call measured as
/// the step is (a fresh process per case): heap within ±`HEAP_TOLERANCE`.
#[test]
fn plan_matches_measured_rollout_memory() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/models/tiny.json");
    let cfg = ModelConfig::from_file(&path).unwrap();
    if let Ok(i) = std::env::var("OMR_ROLLOUT_CASE") {
        let (heap, rss, pred) = measure_rollout(&cfg, &ROLLOUTS[i.parse::<usize>().unwrap()]);
        println!("RESULT {heap} {rss} {pred}");
        return;
    }
    let mut failures = Vec::new();
    for (i, c) in ROLLOUTS.iter().enumerate() {
        let (heap, rss, pred) = in_child(
            "plan_matches_measured_rollout_memory",
            "OMR_ROLLOUT_CASE",
            i,
        );
        let (eh, er) = (pred / heap - 1.0, pred / rss - 1.0);
        println!(
            "rollout {} rows (groups of {}) × {} prompt + {} tokens, image {} px, {:?}: plan {pred:.2} MiB | heap {heap:.2} MiB ({:+.1}%) | peak RSS growth {rss:.2} MiB ({:+.1}%)",
            c.rows, c.group, c.prompt, c.completion, c.image_px, c.kernels, 100.0 * eh, 100.0 * er
        );
        if eh.abs() > HEAP_TOLERANCE {
            failures.push(format!(
                "heap: plan {pred:.2} vs {heap:.2} MiB (rollout case {i})"
            ));
        }
        if er.abs() > RSS_TOLERANCE {
            failures.push(format!(
                "RSS: plan {pred:.2} vs {rss:.2} MiB (rollout case {i})"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
