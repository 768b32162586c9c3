//! `Kernels::Fused` (omr-kernels' fused ops, here their CPU references) against
//! `Kernels::Candle` (candle ops, the reference) on the tiny random Qwen2.5-VL and Qwen2-VL of
//! the fixtures (tests/fixtures/model/README.md): logits, loss and the gradient of every
//! trainable parameter (full fine-tune, and LoRA on a frozen base), on a left-padded batch and
//! a packed one; greedy generation with the key/value cache; activation checkpointing; bf16.
//!
//! Tolerance, f32: max |fused − candle| ≤ 1e-4 · max |candle| per tensor (measured ≤ 2.3e-6:
//! the two paths sum in different orders, nothing else differs). Padding positions are left
//! out of the logits comparison: candle's attention averages uniformly there, flash attention
//! returns 0 (neither is ever used). Each test also checks, by the per-thread call counters of
//! `omr_model::fused`, that the fused ops really ran (and did not under `Kernels::Candle`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{flat, grads_by_name, model_params, packed, rel, Grads, Inputs};
use omr_model::fused::{self, FusedCalls};
use omr_model::generate::{generate_with, SamplingConfig};
use omr_model::lora::{self, LoraConfig};
use omr_model::text::KvCache;
use omr_model::{Ctx, Input, Kernels, ModelConfig, Params, Qwen2VL, Recompute};

const TOL: f32 = 1e-4;

fn ctx(kernels: Kernels) -> Ctx {
    Ctx {
        kernels,
        ..Ctx::default()
    }
}

/// The fixture's left-padded batch (3 rows, 3 images) and its labels.
fn padded(inputs: &Inputs) -> (Input, Vec<Vec<i64>>) {
    (inputs.padded(), inputs.labels.clone())
}

/// ‖a − b‖₂ / ‖b‖₂.
fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt() as f32
}

fn delta(before: FusedCalls) -> FusedCalls {
    let now = fused::calls();
    FusedCalls {
        rmsnorm: now.rmsnorm - before.rmsnorm,
        swiglu: now.swiglu - before.swiglu,
        rotary: now.rotary - before.rotary,
        attention: now.attention - before.attention,
        linear_ce: now.linear_ce - before.linear_ce,
        linear_logp: now.linear_logp - before.linear_logp,
        unit: now.unit - before.unit,
    }
}

/// Logits at real tokens (segment ≠ 0), flattened.
fn real_logits(model: &Qwen2VL, input: &Input, kernels: Kernels) -> Vec<f32> {
    let l = model.forward(input, &ctx(kernels)).unwrap();
    let v = l.dim(2).unwrap();
    let all = flat(&l);
    let mut out = Vec::new();
    for (b, seg) in input.segments.iter().enumerate() {
        for (t, &s) in seg.iter().enumerate() {
            if s != 0 {
                let row = (b * seg.len() + t) * v;
                out.extend_from_slice(&all[row..row + v]);
            }
        }
    }
    out
}

/// Loss and the gradients of every parameter that gets one, by name.
fn loss_grads(
    model: &Qwen2VL,
    params: &Params,
    input: &Input,
    labels: &[Vec<i64>],
    kernels: Kernels,
) -> (f32, usize, Grads) {
    let (sum, n) = model.loss(input, labels, &ctx(kernels)).unwrap();
    let g = grads_by_name(params, &sum.backward().unwrap());
    (sum.to_scalar::<f32>().unwrap(), n, g)
}

/// Fused vs candle on one batch: logits, loss, gradients; returns the worst relative error
/// of (logits, loss, gradients).
fn compare(
    name: &str,
    cfg: &ModelConfig,
    params: &Params,
    input: &Input,
    labels: &[Vec<i64>],
) -> [f32; 3] {
    let model = Qwen2VL::new(cfg, params).unwrap();
    let before = fused::calls();
    let lc = real_logits(&model, input, Kernels::Candle);
    let (sc, nc, gc) = loss_grads(&model, params, input, labels, Kernels::Candle);
    assert_eq!(
        delta(before),
        FusedCalls::default(),
        "{name}: candle ran a fused op"
    );

    let before = fused::calls();
    let lf = real_logits(&model, input, Kernels::Fused);
    let forward = delta(before);
    let (sf, nf, gf) = loss_grads(&model, params, input, labels, Kernels::Fused);
    let both = delta(before);
    let text = cfg.text.num_hidden_layers;
    assert!(forward.rmsnorm > 2 * text, "{name}: {forward:?}");
    assert!(forward.swiglu >= text, "{name}: {forward:?}");
    assert!(
        forward.rotary >= 2 * text && forward.attention >= text,
        "{name}: {forward:?}"
    );
    assert_eq!(
        (forward.linear_ce, both.linear_ce),
        (0, 1),
        "{name}: {both:?}"
    );
    assert_ne!(lf, lc, "{name}: fused logits are bit-identical to candle's");

    let e_logits = rel(&lf, &lc);
    assert_eq!(nf, nc);
    let e_loss = (sf - sc).abs() / sc.abs();
    let mut e_grad = 0f32;
    let mut trainable = 0;
    for ((n, a), (_, b)) in gf.iter().zip(&gc) {
        assert_eq!(
            a.is_some(),
            params.is_trainable(n),
            "{name}: gradient presence of {n} (fused)"
        );
        assert_eq!(
            b.is_some(),
            params.is_trainable(n),
            "{name}: gradient presence of {n} (candle)"
        );
        if let (Some(a), Some(b)) = (a, b) {
            let e = rel(a, b);
            assert!(
                e <= TOL,
                "{name}: gradient of {n} differs by {e:.2e} (relative)"
            );
            assert!(b.iter().any(|&x| x != 0.0), "{name}: zero gradient for {n}");
            e_grad = e_grad.max(e);
            trainable += 1;
        }
    }
    assert!(trainable > 0);
    println!(
        "{name}: logits {e_logits:.2e}, loss {e_loss:.2e} ({sf} vs {sc}, n {nf}), \
         gradients of {trainable} parameters {e_grad:.2e} (max |Δ| / max |ref|)"
    );
    assert!(e_logits <= TOL, "{name}: logits differ by {e_logits:.2e}");
    assert!(e_loss <= TOL, "{name}: loss differs by {e_loss:.2e}");
    [e_logits, e_loss, e_grad]
}

/// LoRA on every language-model linear, the vision attention and the merger, with B moved off
/// zero so every A gets a gradient.
fn with_lora(cfg: &ModelConfig, params: Params) -> Params {
    with_lora_dropout(cfg, params, 0.0)
}

fn with_lora_dropout(cfg: &ModelConfig, mut params: Params, dropout: f64) -> Params {
    let lcfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        targets: vec!["all-linear".into(), "qkv".into(), "visual.merger.*".into()],
    };
    lora::apply(&mut params, cfg, &lcfg, 5).unwrap();
    for (name, var) in params.iter() {
        if name.contains("lora_B") {
            let (o, r) = var.as_tensor().dims2().unwrap();
            let v: Vec<f32> = (0..o * r)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 40.0)
                .collect();
            var.set(&Tensor::from_vec(v, (o, r), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    params
}

fn check_model(fixture: &str) {
    let (cfg, params) = model_params(fixture);
    let inputs = Inputs::load(fixture);
    let mut worst = [0f32; 3];
    for (batch, (input, labels)) in [("padded", padded(&inputs)), ("packed", packed(&inputs))] {
        let e = compare(
            &format!("{fixture} {batch} full"),
            &cfg,
            &params,
            &input,
            &labels,
        );
        let lp = with_lora(&cfg, model_params(fixture).1);
        let f = compare(
            &format!("{fixture} {batch} lora"),
            &cfg,
            &lp,
            &input,
            &labels,
        );
        for i in 0..3 {
            worst[i] = worst[i].max(e[i]).max(f[i]);
        }
    }
    println!(
        "{fixture}: worst relative error logits {:.2e}, loss {:.2e}, gradients {:.2e}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn qwen25vl_fused_matches_candle() {
    check_model("qwen25vl");
}

#[test]
fn qwen2vl_fused_matches_candle() {
    check_model("qwen2vl");
}

/// Greedy decoding with the cache gives the same tokens and close logits on both paths, and
/// the fused cache reports its length in its own layout.
#[test]
fn fused_greedy_generation_matches_candle() {
    for fixture in ["qwen25vl", "qwen2vl"] {
        let (cfg, params) = model_params(fixture);
        let model = Qwen2VL::new(&cfg, &params).unwrap();
        let prompts = Inputs::load(fixture).padded();
        let sampling = SamplingConfig {
            max_new_tokens: 8,
            keep_logits: true,
            ..Default::default()
        };
        let c = generate_with(&model, &prompts, &sampling, &ctx(Kernels::Candle)).unwrap();
        let before = fused::calls();
        let f = generate_with(&model, &prompts, &sampling, &ctx(Kernels::Fused)).unwrap();
        assert!(
            delta(before).attention >= 8 * cfg.text.num_hidden_layers,
            "fused decoding ran"
        );
        let mut worst = 0f32;
        for (b, (x, y)) in f.iter().zip(&c).enumerate() {
            assert_eq!(x.tokens, y.tokens, "{fixture} row {b}");
            for (p, q) in x.logits.iter().zip(&y.logits) {
                worst = worst.max(rel(p, q));
            }
        }
        println!("{fixture}: greedy tokens equal, step logits {worst:.2e} (relative)");
        assert!(worst <= TOL, "{fixture}: step logits differ by {worst:.2e}");

        let fx = ctx(Kernels::Fused);
        let x = model.embed(&prompts, &fx).unwrap();
        let pos = prompts.positions(&cfg).unwrap();
        let mut cache = KvCache::default();
        model
            .decode_hidden(&x, &pos.pos, &prompts.segments, &mut cache, &fx)
            .unwrap();
        assert_eq!(cache.len(), prompts.len());
        cache
            .select_rows(&Tensor::new(&[2u32, 0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(cache.len(), prompts.len());
        assert_eq!(cache.rows(), 2);
        let err = model
            .decode_hidden(
                &x,
                &pos.pos,
                &prompts.segments,
                &mut cache,
                &ctx(Kernels::Candle),
            )
            .expect_err("a fused cache cannot take a candle pass");
        assert!(err.to_string().contains("cache"), "{err}");
    }
}

/// bf16 compute: both paths run, agree to bf16 precision, and give finite gradients (candle's
/// attention softmax runs in f32, so the fully masked padding rows do not turn into NaN).
#[test]
fn bf16_paths_agree_and_stay_finite() {
    let (cfg, params) = model_params("qwen25vl");
    let tensors: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
        .collect();
    let params = Params::from_tensors(tensors, &Device::Cpu, DType::BF16).unwrap();
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let inputs = Inputs::load("qwen25vl");
    let (mut input, labels) = padded(&inputs);
    input.pixel_values = Some(inputs.pixels.to_dtype(DType::BF16).unwrap());
    let mut losses = Vec::new();
    for k in [Kernels::Candle, Kernels::Fused] {
        let (l, n, grads) = loss_grads(&model, &params, &input, &labels, k);
        assert!(n > 0 && l.is_finite(), "{k:?}: loss {l}");
        for (name, g) in grads {
            let g = g.unwrap_or_else(|| panic!("{k:?}: no gradient for {name}"));
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{k:?}: non-finite gradient of {name}"
            );
        }
        losses.push(l / n as f32);
    }
    let e = (losses[0] - losses[1]).abs() / losses[0].abs();
    println!(
        "bf16 mean loss candle {} fused {} (relative {e:.2e})",
        losses[0], losses[1]
    );
    assert!(e < 2e-2, "bf16 losses differ by {e:.2e}");
}

/// Mixed precision (`Params::set_compute_dtype(BF16)` on f32 masters): the modules compute in
/// bf16 (f32 pixels are cast by the vision tower), the gradients reach the f32 masters in f32
/// and agree with the all-f32 gradients to bf16 precision (≤ 5e-2, relative L2), frozen parameters are stored in bf16, and the model must be rebuilt to see an
/// update of a master (`casts_on_get`). Gradient error: ‖bf16 − f32‖₂ / ‖f32‖₂ per tensor.
#[test]
fn mixed_precision_gradients_reach_compute_copies() {
    let (cfg, mut params) = model_params("qwen25vl");
    params.set_part_trainable(omr_model::Part::Vision, false);
    let inputs = Inputs::load("qwen25vl");
    let (input, labels) = padded(&inputs);
    let full = Qwen2VL::new(&cfg, &params).unwrap();
    let (l32, n, g32) = loss_grads(&full, &params, &input, &labels, Kernels::Candle);
    assert!(!params.casts_on_get());
    params.set_compute_dtype(DType::BF16).unwrap();
    // Modules compute with bf16 copies the optimizer keeps up to date: no rebuild needed.
    assert!(!params.casts_on_get());
    for (name, var) in params.iter() {
        let want = if params.is_trainable(name) {
            DType::F32
        } else {
            DType::BF16
        };
        assert_eq!(var.dtype(), want, "{name}");
        let copy = params.copy_of(name);
        assert_eq!(copy.is_some(), params.is_trainable(name), "{name}");
        if let Some(c) = copy {
            assert_eq!(c.dtype(), DType::BF16, "{name}");
            let want = var.as_tensor().to_dtype(DType::BF16).unwrap();
            assert_eq!(
                flat(c),
                flat(&want),
                "{name}: the copy is the rounded master"
            );
        }
    }
    let half = Qwen2VL::new(&cfg, &params).unwrap();
    for k in [Kernels::Candle, Kernels::Fused] {
        let (l16, n16, g16) = loss_grads(&half, &params, &input, &labels, k);
        assert_eq!(n16, n);
        let e = (l16 - l32).abs() / l32.abs();
        assert!(e < 2e-2, "{k:?}: bf16 loss {l16} vs f32 {l32}");
        assert!(
            e > 0.0,
            "{k:?}: the bf16 loss is the f32 one: nothing ran in bf16"
        );
        let (mut worst, mut at) = (0f32, String::new());
        for ((name, a), (_, b)) in g16.iter().zip(&g32) {
            assert_eq!(a.is_some(), params.is_trainable(name), "{k:?}: {name}");
            // The key bias shifts every score of a query row by the same amount, which the
            // softmax cancels: its true gradient is 0 and both computed ones are rounding noise.
            if name.ends_with("k_proj.bias") {
                continue;
            }
            if let (Some(a), Some(b)) = (a, b) {
                let e = rel_l2(a, b);
                if e > worst {
                    (worst, at) = (e, name.clone());
                }
            }
        }
        println!("{k:?}: bf16 loss {l16} vs f32 {l32} ({e:.2e}), gradients {worst:.2e} ({at})");
        assert!(
            worst < 5e-2,
            "{k:?}: bf16 gradient of {at} differs by {worst:.2e}"
        );
    }
    // The gradients are the copies' (bf16, what the fused AdamW reads as is); none reaches
    // the masters, which only the optimizer writes.
    let (sum, _) = half.loss(&input, &labels, &ctx(Kernels::Candle)).unwrap();
    let grads = sum.backward().unwrap();
    for (name, var) in params.trainable() {
        let copy = params.copy_of(name).unwrap();
        assert_eq!(grads.get(copy).unwrap().dtype(), DType::BF16, "{name}");
        assert!(grads.get(var).is_none(), "{name}");
    }
}

/// Forward + backward time of the loss on the packed batch, both paths (printed; run with
/// `--release --nocapture` for meaningful numbers).
#[test]
fn fused_and_candle_step_time() {
    let (cfg, params) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let (input, labels) = packed(&Inputs::load("qwen25vl"));
    for k in [Kernels::Candle, Kernels::Fused] {
        let reps = 5;
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = std::time::Instant::now();
            let (sum, _) = model.loss(&input, &labels, &ctx(k)).unwrap();
            sum.backward().unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{k:?}: forward + backward {:.1} ms (best of {reps})",
            best * 1e3
        );
    }
}

/// Activation checkpointing under the fused ops: recomputing every vision block and decoder
/// layer gives the plain fused backward's loss and gradients (each recomputed op saves its
/// own statistics, e.g. flash attention's log-sum-exp).
#[test]
fn fused_recompute_equals_plain_backward() {
    let (cfg, params) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let (input, labels) = packed(&Inputs::load("qwen25vl"));
    let fx = ctx(Kernels::Fused);
    let wrt: Vec<Tensor> = params
        .trainable()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let run = |r: Recompute| {
        model
            .forward_backward::<omr_model::ModelError>(&input, &fx, r, &wrt, |h| {
                Ok(model.head_loss(h, &labels, &fx)?.0)
            })
            .unwrap()
    };
    // Attentions computed by each: every block's once, plus once more per recomputed block
    // when the attentions are recomputed too (not when kept, the default).
    let counted = |r: Recompute| {
        let before = omr_model::fused::calls().attention;
        let out = run(r);
        (out, omr_model::fused::calls().attention - before)
    };
    let (plain, n_plain) = counted(Recompute::NONE);
    let blocks = cfg.text.num_hidden_layers + cfg.vision.depth;
    let gp = plain.grads.unwrap();
    let mut kept_grads = None;
    for (r, n_want) in [
        (Recompute::ALL, n_plain),
        (Recompute::ALL.with_attention(true), n_plain + blocks),
        // The last decoder layer not recomputed at all.
        (
            Recompute::ALL
                .with_attention(true)
                .keeping_decoder_layers(1),
            n_plain + blocks - 1,
        ),
    ] {
        let (re, n) = counted(r);
        assert_eq!(n, n_want, "{r:?}: attentions computed");
        assert_eq!(plain.loss, re.loss, "{r:?}");
        let gr = re.grads.unwrap();
        let mut worst = 0f32;
        for t in &wrt {
            worst = worst.max(rel(&flat(gr.get(t).unwrap()), &flat(gp.get(t).unwrap())));
        }
        println!("fused {r:?} vs plain: gradients {worst:.2e} (relative)");
        assert!(
            worst <= 1e-6,
            "{r:?}: recomputed gradients differ by {worst:.2e}"
        );
        // Keeping the attentions changes nothing but the work: the same bits.
        match &kept_grads {
            None => kept_grads = Some(gr),
            Some(kept) => {
                for t in &wrt {
                    assert_eq!(flat(kept.get(t).unwrap()), flat(gr.get(t).unwrap()));
                }
            }
        }
    }
}

/// The attentions a checkpointed forward keeps are replayed into a recompute that draws the
/// same LoRA dropout masks (keyed by seed and layer): with adapters in every linear and in the
/// vision attention, kept and recomputed attentions give the same bits, and the plain
/// backward's gradients.
#[test]
fn kept_attention_with_lora_dropout_equals_recomputed() {
    let (cfg, params) = model_params("qwen25vl");
    let params = with_lora_dropout(&cfg, params, 0.1);
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let (input, labels) = packed(&Inputs::load("qwen25vl"));
    let fx = Ctx {
        dropout_seed: Some(11),
        ..ctx(Kernels::Fused)
    };
    let wrt: Vec<Tensor> = params
        .trainable()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let run = |r: Recompute| {
        let b = model
            .forward_backward::<omr_model::ModelError>(&input, &fx, r, &wrt, |h| {
                Ok(model.head_loss(h, &labels, &fx)?.0)
            })
            .unwrap();
        (b.loss, b.grads.unwrap())
    };
    let (l0, g0) = run(Recompute::NONE);
    let (l1, g1) = run(Recompute::ALL);
    let (l2, g2) = run(Recompute::ALL.with_attention(true));
    assert_eq!((l1, l2), (l0, l0));
    let mut worst = 0f32;
    for t in &wrt {
        let (a, b, c) = (g0.get(t).unwrap(), g1.get(t).unwrap(), g2.get(t).unwrap());
        assert_eq!(flat(b), flat(c));
        worst = worst.max(rel(&flat(b), &flat(a)));
    }
    assert!(worst <= 1e-6, "kept vs plain: {worst:.2e}");
}

/// GRPO's token scores (`Qwen2VL::head_logps`: log softmax(logits / temperature) at the
/// targets, the vision ids suppressed, and the entropy) through the fused linear log-prob
/// against the materialised logits: values and the gradient of every parameter for a
/// per-token weight (GRPO's advantage-weighted objective). The hidden states come from the
/// candle path in both, so only the head differs.
#[test]
fn head_logps_fused_matches_candle() {
    let (cfg, params) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let (input, labels) = padded(&Inputs::load("qwen25vl"));
    let (_, targets) = omr_model::loss::shifted_targets(&labels, cfg.text.vocab_size).unwrap();
    let k = targets.len();
    // The vision ids, as GRPO suppresses them, where they are nobody's target (a completion
    // never holds one; the fixture's labels do).
    let suppress: Vec<u32> = cfg
        .vision_ids()
        .into_iter()
        .filter(|t| !targets.contains(t))
        .collect();
    assert!(!suppress.is_empty());
    let weights: Vec<f32> = (0..k).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
    let weights = Tensor::from_vec(weights, k, &Device::Cpu).unwrap();
    let run = |kernels: Kernels| {
        let h = model.hidden(&input, &ctx(Kernels::Candle)).unwrap();
        let (picked, _) = model.labelled_rows(&h, &labels).unwrap();
        let before = fused::calls();
        let (logp, entropy) = model
            .head_logps(&picked, &targets, 0.7, &suppress, &ctx(kernels))
            .unwrap();
        let calls = delta(before).linear_logp;
        let g = (&logp * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (flat(&logp), entropy, grads_by_name(&params, &g), calls)
    };
    let (lc, ec, gc, nc) = run(Kernels::Candle);
    let (lf, ef, gf, nf) = run(Kernels::Fused);
    assert_eq!(
        (nc, nf),
        (0, 1),
        "the fused linear log-prob ran under Fused only"
    );
    assert!(lc.iter().all(|x| x.is_finite() && *x < 0.0 && *x > -100.0));
    let e_logp = rel(&lf, &lc);
    let e_ent = ((ef - ec).abs() / ec.abs()) as f32;
    let mut e_grad = 0f32;
    let mut n = 0;
    for ((name, a), (_, b)) in gf.iter().zip(&gc) {
        assert_eq!(a.is_some(), b.is_some(), "gradient presence of {name}");
        if let (Some(a), Some(b)) = (a, b) {
            e_grad = e_grad.max(rel(a, b));
            n += 1;
        }
    }
    println!("head_logps fused vs candle: logp {e_logp:.2e}, entropy {e_ent:.2e}, gradients of {n} parameters {e_grad:.2e}");
    assert!(n > 1, "the head and the layers below get gradients");
    assert!(e_logp <= TOL && e_ent <= TOL && e_grad <= TOL);
}
