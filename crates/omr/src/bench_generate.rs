//! `omr bench generate`: GRPO's rollout engine on a randomly initialised Qwen2.5-VL-shaped model:
//! one generation call of `--rows` prompts of `--prompt` tokens (one image each) to `--new`
//! tokens, timed as prefill and decoding (ms per step, tokens/s), with the device's memory next
//! to `omr plan`'s rollout phase for the same shapes. `--sampler host` draws on the host instead
//! of the device (the before / after of `omr_kernels::sample`).
//!
//! The prefill is timed by a call that generates one token; the full call after it, minus it,
//! is the decoding (medians over `--repeats` such pairs; a median difference that is not
//! positive is an error asking for more steps). A first call with 2 new tokens warms the
//! kernels up, untimed.

use crate::bench_train::memory::GpuMemPoller;
use crate::exit::{Exit, Tag};
use candle_core::DType;
use clap::Args;
use omr_model::config::ModelConfig;
use omr_model::generate::{generate_repeated, FixedDecoder, SamplingConfig};
use omr_model::model::Qwen2VL;
use omr_model::params::Params;
use omr_train::bench_step::SyntheticBatch;
use omr_train::plan::{self, AttentionImpl};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchGenerateArgs {
    /// config.json of the model, or tiny, qwen2.5-vl-3b (3b), qwen2.5-vl-7b (7b).
    #[arg(long, default_value = "tiny")]
    pub model_config: String,
    /// Rows generated together (grpo.generation_batch_size).
    #[arg(long, default_value_t = 8)]
    pub rows: usize,
    /// Completions per prompt (grpo.group_size): rows / group distinct prompts, each prefilled
    /// once for its group's rows, as GRPO's rollouts run.
    #[arg(long, default_value_t = 1)]
    pub group: usize,
    /// Tokens of each prompt, image tokens included.
    #[arg(long, default_value_t = 256)]
    pub prompt: usize,
    /// Side in pixels of each prompt's square image (multiple of 28); 0 for text only.
    #[arg(long, default_value_t = 224)]
    pub image_px: usize,
    /// Tokens generated per row (no end-of-sequence id: every row runs to it).
    #[arg(long, default_value_t = 64)]
    pub new: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// device (the Gumbel-max sampler on the logits' device) | host (the rows read back and
    /// sampled on the CPU).
    #[arg(long, default_value = "device")]
    pub sampler: String,
    /// cpu | cuda | auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto | fp32 | bf16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// auto | candle | fused.
    #[arg(long, default_value = "auto")]
    pub kernels: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Timed pairs of calls (a prefill, then a full call); medians are reported, the decoding
    /// time as the median of the pairs' differences.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// A Python with torch and transformers: the same rollout by transformers' `generate` on
    /// the same prompts and config (scripts/bench/generate.py), printed as a ratio.
    #[arg(long)]
    pub python: Option<String>,
}

const TORCH_SCRIPT: &str = include_str!("../../../scripts/bench/generate.py");

pub fn run(a: BenchGenerateArgs) -> crate::Result<()> {
    if a.rows == 0 || a.new < 2 || a.prompt < 2 {
        return Err(Exit::usage(anyhow::anyhow!(
            "--rows ≥ 1, --prompt ≥ 2 and --new ≥ 2"
        )));
    }
    if a.group == 0 || !a.rows.is_multiple_of(a.group) {
        return Err(Exit::usage(anyhow::anyhow!(
            "--group {} must divide --rows {}",
            a.group,
            a.rows
        )));
    }
    let prompts = a.rows / a.group;
    let repeats = vec![a.group; prompts];
    if !(a.temperature > 0.0) {
        return Err(Exit::usage(anyhow::anyhow!("--temperature must be > 0")));
    }
    let host = match a.sampler.as_str() {
        "device" => false,
        "host" => true,
        o => {
            return Err(Exit::usage(anyhow::anyhow!(
                "--sampler {o}: device or host"
            )))
        }
    };
    let rt = crate::bench_common::runtime(&a.device, &a.precision, &a.kernels)?;
    let cfg_path = crate::bench_common::config_path(&a.model_config);
    let cfg = ModelConfig::from_file(&cfg_path).usage()?;
    let mut params = Params::init(&cfg, a.seed, 0.02, &rt.device)?;
    rt.prepare(&mut params)?;
    let model = Qwen2VL::new(&cfg, &params)?.with_kernels(rt.kernels);
    let ctx = model.ctx();
    let batch = SyntheticBatch::new(&cfg, prompts, a.prompt, a.image_px, a.seed)
        .map_err(|e| Exit::usage(anyhow::anyhow!(e)))?;
    let input = batch.input(&rt.device, rt.compute)?;
    let sampling = |n: usize| SamplingConfig {
        max_new_tokens: n,
        temperature: a.temperature,
        // top-k over the whole vocabulary: the same distribution, drawn on the host.
        top_k: if host { cfg.text.vocab_size } else { 0 },
        seed: a.seed,
        ..SamplingConfig::default()
    };
    let timed = |n: usize| -> crate::Result<f64> {
        rt.device.synchronize()?;
        let t0 = Instant::now();
        let out = generate_repeated(&model, &input, &repeats, &sampling(n), &ctx)?;
        rt.device.synchronize()?;
        if out.iter().any(|c| c.tokens.len() != n) {
            return Err(anyhow::anyhow!("a row stopped early").into());
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    timed(2)?;
    let poller = GpuMemPoller::start(&rt.device);
    // Each prefill call is paired with the full call after it: the decoding time is the
    // median of the pairs' differences, so a slow moment of the machine falls on both halves
    // of a pair rather than on one of two independent medians.
    let pairs = (0..a.repeats.max(1))
        .map(|_| Ok((timed(1)?, timed(a.new)?)))
        .collect::<crate::Result<Vec<(f64, f64)>>>()?;
    let median = |xs: &mut Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let prefill = median(&mut pairs.iter().map(|p| p.0).collect());
    let full = median(&mut pairs.iter().map(|p| p.1).collect());
    let decode = median(&mut pairs.iter().map(|p| p.1 - p.0).collect());
    let mem = poller.finish();
    if decode <= 0.0 {
        return Err(anyhow::anyhow!(
            "the {} decoding steps took no measurable time next to the prefill's jitter \
             (median of full − prefill over {} pairs: {:.2} ms): raise --new or --repeats",
            a.new - 1,
            pairs.len(),
            decode * 1e3
        )
        .into());
    }
    let (enqueue_ms, step_ms) =
        host_split(&model, &input, &repeats, &ctx, &rt.device, a.new.min(32))?;
    let decode_ms = decode / (a.new - 1) as f64 * 1e3;
    let tokens_s = (a.rows * a.new) as f64 / full;

    // The plan's rollout phase for these shapes (weights only resident here).
    let attention = match rt.kernels {
        omr_model::Kernels::Fused => AttentionImpl::Fused,
        omr_model::Kernels::Candle => AttentionImpl::Eager,
    };
    let compute_bytes = rt.compute.size_in_bytes() as u64;
    let mut p = plan::rollout_input(
        &cfg,
        compute_bytes,
        attention,
        a.rows,
        a.prompt,
        a.image_px,
        a.new,
    );
    if let Some(g) = p.grpo.as_mut() {
        g.prefill_rows = prompts;
    }
    let growth = plan::rollout_growth(&plan::plan(&p));
    let mib = |b: u64| b as f64 / 1048576.0;

    // The reference, on the same device after ours has let go of it.
    let reference = match &a.python {
        Some(py) => {
            drop((model, params, input));
            omr_kernels::release_device_memory(&rt.device)?;
            let dir = tempfile::tempdir()?;
            let prompts = dir.path().join("prompts.safetensors");
            batch.save(&prompts)?;
            let device = if rt.device.is_cuda() { "cuda" } else { "cpu" };
            let args: Vec<std::ffi::OsString> = vec![
                "--config".into(),
                cfg_path.clone().into(),
                "--batch".into(),
                prompts.into(),
                "--new".into(),
                a.new.to_string().into(),
                "--temperature".into(),
                a.temperature.to_string().into(),
                "--repeats".into(),
                a.repeats.max(1).to_string().into(),
                "--device".into(),
                device.into(),
                "--seed".into(),
                a.seed.to_string().into(),
                "--group".into(),
                a.group.to_string().into(),
            ];
            Some(crate::bench_common::run_python(
                py,
                "generate.py",
                TORCH_SCRIPT,
                &args,
            )?)
        }
        None => None,
    };

    println!(
        "omr bench generate: {} (random init), {} {} {:?}, sampler on the {}",
        cfg_path.display(),
        if rt.device.is_cuda() { "cuda" } else { "cpu" },
        if rt.compute == DType::BF16 {
            "bf16"
        } else {
            "fp32"
        },
        rt.kernels,
        if host { "host" } else { "device" }
    );
    println!(
        "  {} rows × ({} prompt + {} new) tokens, {} px images{}",
        a.rows,
        a.prompt,
        a.new,
        a.image_px,
        match a.group {
            1 => String::new(),
            g => format!(", groups of {g}: {prompts} prompts, each prefilled once"),
        }
    );
    println!(
        "  prefill {:.1} ms | decoding {decode_ms:.2} ms/step | {tokens_s:.0} new tokens/s | call {:.2} s",
        prefill * 1e3,
        full
    );
    if rt.device.is_cuda() {
        println!(
            "  decoding pass alone (no sampling): {step_ms:.2} ms/step, of which the host spends {enqueue_ms:.2} ms issuing it ({:.0}%: near 100% means launch-bound)",
            100.0 * enqueue_ms / step_ms
        );
    } else {
        println!("  decoding pass alone (no sampling): {step_ms:.2} ms/step");
    }
    match mem {
        Some((before, peak)) => println!(
            "  GPU memory: {:.0} MiB over the {:.0} MiB held before the calls; plan: {:.0} MiB",
            peak - before,
            before,
            mib(growth)
        ),
        None => println!("  plan of the call's memory: {:.0} MiB", mib(growth)),
    }
    if let Some(r) = &reference {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  transformers generate (torch {}, transformers {}, {} {}): prefill {:.1} ms | decoding {:.2} ms/step | {:.0} new tokens/s",
            r["torch"].as_str().unwrap_or("?"),
            r["transformers"].as_str().unwrap_or("?"),
            r["dtype"].as_str().unwrap_or("?"),
            r["attention"].as_str().unwrap_or("?"),
            f("prefill_ms"),
            f("decode_ms_per_step"),
            f("new_tokens_per_s")
        );
        println!(
            "  ours / transformers: {:.2}× new tokens/s, decoding step {:.2}× as fast, prefill {:.2}× as fast",
            tokens_s / f("new_tokens_per_s"),
            f("decode_ms_per_step") / decode_ms,
            f("prefill_ms") / (prefill * 1e3)
        );
    }
    if let Some(path) = &a.json {
        let v = json!({
            "model_config": cfg_path.display().to_string(),
            "device": if rt.device.is_cuda() { "cuda" } else { "cpu" },
            "rows": a.rows,
            "group": a.group,
            "prompt": a.prompt,
            "new": a.new,
            "image_px": a.image_px,
            "sampler": a.sampler,
            "prefill_ms": prefill * 1e3,
            "decode_ms_per_step": decode_ms,
            "pass_ms_per_step": step_ms,
            "pass_enqueue_ms_per_step": enqueue_ms,
            "new_tokens_per_s": tokens_s,
            "call_s": full,
            "gpu_mem_growth_mib": mem.map(|(b, p)| p - b),
            "plan_growth_mib": mib(growth),
            "reference": reference,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")?;
    }
    Ok(())
}

/// Decoding passes alone (the decoder and the head, no sampling), `steps` of them after a
/// prefill, each timed twice: until the host has issued it (on CUDA the kernels are queued, not
/// finished) and until the device is done. Medians in ms: (issue, whole). Equal on the CPU;
/// on a GPU an issue time near the whole means the step is bound by launching ops, not by the
/// device. Each step feeds the prompt's last embeddings again (the cost does not depend on the
/// token).
fn host_split(
    model: &Qwen2VL,
    input: &omr_model::Input,
    repeats: &[usize],
    ctx: &omr_model::Ctx,
    device: &candle_core::Device,
    steps: usize,
) -> crate::Result<(f64, f64)> {
    let ctx = omr_model::Ctx {
        no_grad: true,
        dropout_seed: None,
        ..*ctx
    };
    let (mut decoder, _) = FixedDecoder::prefill(model, input, Some(repeats), steps, &ctx)?;
    let (mut issue, mut whole) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        device.synchronize()?;
        let t0 = Instant::now();
        let h = decoder.step(model, &ctx)?;
        let logits = model.logits(&h.squeeze(1)?, &ctx)?;
        issue.push(t0.elapsed().as_secs_f64() * 1e3);
        device.synchronize()?;
        whole.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(logits);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((med(issue), med(whole)))
}
