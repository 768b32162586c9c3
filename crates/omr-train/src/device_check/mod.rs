//! Whole-model checks of a device against the CPU reference: what `omr bench kernels` runs
//! after the per-op checks, so one binary copied to a GPU machine also proves that the model
//! trains the same there.
//!
//! For two random-init Qwen2.5-VL shapes (the tiny preset, head dims 32/32; and a "mid" one
//! with the head dims of the real models, 128 text / 80 vision) and two batches (left-padded,
//! and packed: two documents in one row, the block-diagonal path), the loss and the gradient
//! of every parameter are computed on the CPU with candle ops (the reference) and on `dev`
//! with candle ops, with the fused kernels, with the fused kernels plus activation
//! checkpointing of both stacks, and with each decoder layer as one op (`omr_model::block`),
//! with and without checkpointing; GRPO's head (the fused linear log-probabilities, per-token
//! weights) on the padded batch, with and without checkpointing; and, with LoRA adapters on a frozen base, the fused
//! per-op adapters and the one-op layers carrying them; generation's decoding (a prefill and
//! four one-position steps through the key/value cache's in-place buffers), candle ops and
//! fused. Then two AdamW steps on the reference gradients, on the CPU
//! with candle ops and on `dev` with the fused update, are compared by their parameter
//! deltas. On the CPU the same comparisons run (the fused ops' CPU references against candle
//! ops): that is how `tests/device_check.rs` exercises this file.
//!
//! Error measure: max |x − ref| / max |ref| per tensor, the worst tensor reported. f32
//! throughout; tolerance 1e-3 (the paths sum in different orders; measured on the CPU ≤ 1e-5).

mod optimizer;

use crate::bench_step::SyntheticBatch;
use candle_core::{DType, Device, Tensor};
use omr_model::fused;
use omr_model::generate::FixedDecoder;
use omr_model::{Ctx, Input, Kernels, ModelConfig, Params, Qwen2VL, Recompute};
use optimizer::optimizer_check;

/// Relative tolerance of every model check.
pub const TOL: f64 = 1e-3;

/// One comparison: its name, the worst relative error and where it was.
#[derive(Clone, Debug)]
pub struct ModelCheck {
    pub name: String,
    pub loss_err: f64,
    pub grad_err: f64,
    pub worst: String,
    /// Fused ops that ran (attention + linear CE + linear log-prob calls), to prove the fused
    /// path was taken.
    pub fused_ops: usize,
}

impl ModelCheck {
    pub fn ok(&self) -> bool {
        self.loss_err.is_finite()
            && self.grad_err.is_finite()
            && self.loss_err <= TOL
            && self.grad_err <= TOL
    }
}

/// The table `omr bench kernels` prints.
pub fn format(checks: &[ModelCheck]) -> String {
    let mut s = format!(
        "model checks (loss and every gradient vs the CPU candle-op reference, f32, tolerance {TOL:e}):\n"
    );
    for c in checks {
        s += &format!(
            "  {:<62} loss {:>9.2e}  grads {:>9.2e} ({})  fused ops {:>4}  {}\n",
            c.name,
            c.loss_err,
            c.grad_err,
            c.worst,
            c.fused_ops,
            if c.ok() { "ok" } else { "FAIL" }
        );
    }
    s
}

/// The mid shape: the tiny preset with the real models' head dims.
fn mid(tiny: &ModelConfig) -> ModelConfig {
    let mut c = tiny.clone();
    c.text.hidden_size = 512;
    c.text.num_attention_heads = 4;
    c.text.num_key_value_heads = 2;
    c.text.head_dim = 128;
    c.text.intermediate_size = 1024;
    c.text.num_hidden_layers = 2;
    c.text.mrope_section = vec![16, 24, 24];
    c.vision.hidden_size = 320;
    c.vision.num_heads = 4;
    c.vision.intermediate_size = 640;
    c.vision.out_hidden_size = 512;
    c
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// max |a − b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, |m, x| if x.is_nan() { f64::NAN } else { m.max(x) });
    let m = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    d / m.max(1e-30)
}

/// Loss per labelled token, every trainable parameter's gradient (sorted by name), and the
/// fused ops that ran (attention + linear CE calls).
struct Run {
    loss: f64,
    grads: Vec<(String, Vec<f32>)>,
    fused_ops: usize,
}

/// The head a check trains through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    /// SFT's: the cross-entropy summed over labelled tokens (`Qwen2VL::head_loss`).
    CrossEntropy,
    /// GRPO's: Σ w · log p of each labelled token under softmax(logits / 0.7) with the vision
    /// ids suppressed (`Qwen2VL::head_logps`), a fixed weight w per token (the advantage).
    TokenLogps,
}

/// One pass, with the decoder layers as one op each when `block` (omr_model::block).
#[allow(clippy::too_many_arguments)]
fn run(
    cfg: &ModelConfig,
    params: &Params,
    input: &Input,
    labels: &[Vec<i64>],
    kernels: Kernels,
    recompute: Recompute,
    block: bool,
    head: Head,
) -> crate::Result<Run> {
    let before = fused::calls();
    let mut r = omr_model::block::with_block_op(block, || {
        pass(cfg, params, input, labels, kernels, recompute, head)
    })?;
    let after = fused::calls();
    r.fused_ops = (after.attention - before.attention)
        + (after.linear_ce - before.linear_ce)
        + (after.linear_logp - before.linear_logp);
    Ok(r)
}

/// GRPO's objective on the labelled tokens of `h` (see [`Head::TokenLogps`]) and their count.
fn token_logps_objective(
    model: &Qwen2VL,
    h: &Tensor,
    labels: &[Vec<i64>],
    ctx: &Ctx,
) -> omr_model::Result<(Tensor, usize)> {
    let c = &model.cfg;
    let (picked, targets) = model.labelled_rows(h, labels)?;
    let k = targets.len();
    let suppress: Vec<u32> = c
        .vision_ids()
        .into_iter()
        .filter(|id| !targets.contains(id))
        .collect();
    let (logp, _) = model.head_logps(&picked, &targets, 0.7, &suppress, ctx)?;
    let w: Vec<f32> = (0..k).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
    let w = Tensor::from_vec(w, k, h.device())?;
    Ok(((logp * w)?.sum_all()?, k))
}

fn pass(
    cfg: &ModelConfig,
    params: &Params,
    input: &Input,
    labels: &[Vec<i64>],
    kernels: Kernels,
    recompute: Recompute,
    head: Head,
) -> crate::Result<Run> {
    let model = Qwen2VL::new(cfg, params)?;
    let ctx = Ctx {
        kernels,
        ..Ctx::default()
    };
    // Gradients land on the compute copies when there are some (mixed precision).
    let wrt: Vec<Tensor> = params
        .trainable()
        .map(|(n, v)| params.copy_of(n).unwrap_or(v).as_tensor().clone())
        .collect();
    let mut n = 0;
    let out = model.forward_backward::<crate::TrainError>(input, &ctx, recompute, &wrt, |h| {
        let (sum, k) = match head {
            Head::CrossEntropy => model.head_loss(h, labels, &ctx)?,
            Head::TokenLogps => token_logps_objective(&model, h, labels, &ctx)?,
        };
        n = k;
        Ok(sum)
    })?;
    let store = out
        .grads
        .ok_or_else(|| crate::TrainError::Internal("non-finite loss in a model check".into()))?;
    let mut grads = Vec::new();
    for (name, var) in params.trainable() {
        let g = match store.get(params.copy_of(name).unwrap_or(var).as_tensor()) {
            Some(g) => flat(g)?,
            None => Vec::new(),
        };
        grads.push((name.to_string(), g));
    }
    Ok(Run {
        loss: out.loss / n.max(1) as f64,
        grads,
        fused_ops: 0,
    })
}

fn compare(name: String, r: &Run, reference: &Run) -> ModelCheck {
    let mut worst = (0.0f64, String::from("-"));
    for ((n, a), (_, b)) in r.grads.iter().zip(&reference.grads) {
        let e = if a.is_empty() != b.is_empty() {
            f64::INFINITY
        } else {
            rel(a, b)
        };
        if e.is_nan() || e > worst.0 {
            worst = (if e.is_nan() { f64::NAN } else { e }, n.clone());
            if e.is_nan() {
                break;
            }
        }
    }
    ModelCheck {
        name,
        loss_err: (r.loss - reference.loss).abs() / reference.loss.abs().max(1e-30),
        grad_err: worst.0,
        worst: worst.1,
        fused_ops: r.fused_ops,
    }
}

/// Generation's decoder passes without gradients: the prefill over `input`, then
/// [`DECODE_STEPS`] passes of one position each (the prompt's last embeddings fed again, so
/// every device sees the same inputs) through a cache sized for them, whose buffers the steps
/// write in place and attend through views. As a [`Run`]: "loss" is the prefill's last hidden
/// state summed, the "gradients" each step's hidden states.
fn decode_run(
    cfg: &ModelConfig,
    params: &Params,
    input: &Input,
    kernels: Kernels,
) -> crate::Result<Run> {
    let model = Qwen2VL::new(cfg, params)?;
    let ctx = Ctx {
        kernels,
        dropout_seed: None,
        no_grad: true,
    };
    let before = fused::calls();
    let (mut decoder, h) = FixedDecoder::prefill(&model, input, None, DECODE_STEPS, &ctx)?;
    let t = input.len();
    let loss = h.narrow(1, t - 1, 1)?.sum_all()?.to_scalar::<f32>()? as f64;
    let mut grads = Vec::new();
    for i in 0..DECODE_STEPS {
        let h = decoder.step(&model, &ctx)?;
        grads.push((format!("step {i}"), flat(&h)?));
    }
    let now = fused::calls();
    Ok(Run {
        loss,
        grads,
        fused_ops: now.attention - before.attention,
    })
}

/// Decoding steps of [`decode_run`].
const DECODE_STEPS: usize = 4;

/// A batch of the checks: its name, the model input and the labels.
type Batch = (&'static str, Input, Vec<Vec<i64>>);

/// The padded batch (B = 2 rows of T tokens, one image each) and a packed one: row 0 holds
/// two documents (the image document, then a text one), row 1 one.
fn batches(cfg: &ModelConfig, dev: &Device) -> crate::Result<Vec<Batch>> {
    let b = SyntheticBatch::new(cfg, 2, 96, 112, 11).map_err(crate::TrainError::Internal)?;
    let padded = b.input(dev, DType::F32)?;
    let t = b.input_ids[0].len();
    let split = t - 24;
    let pv = padded.pixel_values.clone();
    let packed = Input::packed(
        b.input_ids.clone(),
        &[vec![split, t - split], vec![t]],
        pv,
        b.grids.clone(),
    )?;
    Ok(vec![
        ("padded", padded, b.labels.clone()),
        ("packed", packed, b.labels),
    ])
}

/// Every model check on `dev` (see the module doc).
pub fn model_checks(dev: &Device) -> crate::Result<Vec<ModelCheck>> {
    let tiny = ModelConfig::from_file(&crate::plan::configs_dir().join("models/tiny.json"))?;
    let mut out = Vec::new();
    for (shape, cfg) in [("tiny", tiny.clone()), ("mid", mid(&tiny))] {
        let cpu_params = Params::init(&cfg, 5, 0.02, &Device::Cpu)?;
        let dev_params = Params::init(&cfg, 5, 0.02, dev)?;
        let cpu_batches = batches(&cfg, &Device::Cpu)?;
        let dev_batches = batches(&cfg, dev)?;
        for ((what, cin, labels), (_, din, _)) in cpu_batches.iter().zip(&dev_batches) {
            let reference = run(
                &cfg,
                &cpu_params,
                cin,
                labels,
                Kernels::Candle,
                Recompute::NONE,
                false,
                Head::CrossEntropy,
            )?;
            for (kernels, recompute, block, label) in [
                (Kernels::Candle, Recompute::NONE, false, "candle ops"),
                (Kernels::Fused, Recompute::NONE, false, "fused"),
                (
                    Kernels::Fused,
                    Recompute::ALL,
                    false,
                    "fused + checkpointing",
                ),
                // The attentions recomputed too, instead of kept (omr_model::kept_attn).
                (
                    Kernels::Fused,
                    Recompute::ALL.with_attention(true),
                    false,
                    "fused + checkpointing, attention recomputed",
                ),
                // Decoder layers as one op each (omr_model::block, OMR_BLOCK_OP=1).
                (
                    Kernels::Fused,
                    Recompute::NONE,
                    true,
                    "fused, layers as one op",
                ),
                (
                    Kernels::Fused,
                    Recompute::ALL,
                    true,
                    "fused, one op, checkpointing",
                ),
            ] {
                let r = run(
                    &cfg,
                    &dev_params,
                    din,
                    labels,
                    kernels,
                    recompute,
                    block,
                    Head::CrossEntropy,
                )?;
                out.push(compare(
                    format!("{shape} {what}: {} {label}", dev_name(dev)),
                    &r,
                    &reference,
                ));
            }
            if *what == "padded" {
                // GRPO's head: the fused linear log-probabilities against the materialised
                // logits of the CPU reference, with and without checkpointing.
                let reference = run(
                    &cfg,
                    &cpu_params,
                    cin,
                    labels,
                    Kernels::Candle,
                    Recompute::NONE,
                    false,
                    Head::TokenLogps,
                )?;
                for (recompute, label) in [
                    (Recompute::NONE, "fused, GRPO token log-probs"),
                    (
                        Recompute::ALL,
                        "fused + checkpointing, GRPO token log-probs",
                    ),
                ] {
                    let r = run(
                        &cfg,
                        &dev_params,
                        din,
                        labels,
                        Kernels::Fused,
                        recompute,
                        false,
                        Head::TokenLogps,
                    )?;
                    out.push(compare(
                        format!("{shape} {what}: {} {label}", dev_name(dev)),
                        &r,
                        &reference,
                    ));
                }
            }
            if *what == "padded" {
                out.push(optimizer_check(
                    shape,
                    &reference,
                    &cpu_params,
                    &dev_params,
                    dev,
                )?);
            }
        }
        // Decoding with the key/value cache (generation's path) on the padded batch.
        let (_, cin, _) = &cpu_batches[0];
        let (_, din, _) = &dev_batches[0];
        let reference = decode_run(&cfg, &cpu_params, cin, Kernels::Candle)?;
        for (kernels, label) in [
            (Kernels::Candle, "candle ops, decoding over the cache"),
            (Kernels::Fused, "fused, decoding over the cache"),
        ] {
            let r = decode_run(&cfg, &dev_params, din, kernels)?;
            out.push(compare(
                format!("{shape} padded: {} {label}", dev_name(dev)),
                &r,
                &reference,
            ));
        }
        // LoRA on the padded batch: the per-op adapters and the adapters inside one-op layers.
        let (cpu_lora, dev_lora) = lora_params(&cfg, dev)?;
        let (_, cin, labels) = &cpu_batches[0];
        let (_, din, _) = &dev_batches[0];
        let reference = run(
            &cfg,
            &cpu_lora,
            cin,
            labels,
            Kernels::Candle,
            Recompute::NONE,
            false,
            Head::CrossEntropy,
        )?;
        for (block, label) in [(false, "fused, LoRA"), (true, "fused, one op, LoRA")] {
            let r = run(
                &cfg,
                &dev_lora,
                din,
                labels,
                Kernels::Fused,
                Recompute::NONE,
                block,
                Head::CrossEntropy,
            )?;
            out.push(compare(
                format!("{shape} padded: {} {label}", dev_name(dev)),
                &r,
                &reference,
            ));
        }
    }
    Ok(out)
}

/// The model of the checks with LoRA rank 4 on every decoder linear and every vision block's
/// linears (base frozen; the fused path runs both stacks' adapters inside their units), on the
/// CPU and on `dev`: A as `lora::apply` draws it, B drawn away from zero (the same values on
/// both) so that every adapter gradient is non-trivial.
fn lora_params(cfg: &ModelConfig, dev: &Device) -> crate::Result<(Params, Params)> {
    let lora = omr_model::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["all-linear".into(), "visual.blocks.*".into()],
    };
    let mut cpu = Params::init(cfg, 5, 0.02, &Device::Cpu)?;
    let mut on_dev = Params::init(cfg, 5, 0.02, dev)?;
    omr_model::lora::apply(&mut cpu, cfg, &lora, 9)?;
    omr_model::lora::apply(&mut on_dev, cfg, &lora, 9)?;
    let bs: Vec<(String, Vec<usize>)> = cpu
        .trainable()
        .filter(|(n, _)| n.ends_with(".lora_B.weight"))
        .map(|(n, v)| (n.to_string(), v.dims().to_vec()))
        .collect();
    for (k, (name, dims)) in bs.into_iter().enumerate() {
        let n: usize = dims.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|i| 0.05 * (((i * 7 + k * 13) % 17) as f32 / 8.0 - 1.0))
            .collect();
        let b = Tensor::from_vec(vals, dims, &Device::Cpu)?;
        cpu.insert(name.clone(), &b, true)?;
        on_dev.insert(name, &b, true)?;
    }
    Ok((cpu, on_dev))
}

fn internal(e: impl std::fmt::Display) -> crate::TrainError {
    crate::TrainError::Internal(e.to_string())
}

fn dev_name(dev: &Device) -> &'static str {
    if dev.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}
