//! Activation checkpointing (`Qwen2VL::forward_backward` with `Recompute`): the loss and every
//! trainable gradient equal the plain forward + backward bit for bit (the tied embedding to
//! 1e-6: its two gradients are summed in another order), for full fine-tuning and for LoRA
//! with dropout, with images, packed and padded rows, recomputing every decoder layer or all
//! but the last ones; and recomputing lowers the peak memory.

use candle_core::{DType, Device, Tensor};
use omr_model::lora::{self, LoraConfig};
use omr_model::tiny::{TinySpec, TokenIds};
use omr_model::{Ctx, Input, Params, Part, Qwen2VL, Recompute};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Counts live bytes and their peak, to compare the memory of two backward strategies.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Memory measurements must not overlap with other tests of this binary.
static SERIAL: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn ids() -> TokenIds {
    TokenIds {
        vocab_size: 96,
        image: 90,
        video: 91,
        vision_start: 92,
        vision_end: 93,
        bos: 94,
        eos: vec![95, 94],
    }
}

fn spec(layers: usize, hidden: usize) -> TinySpec {
    TinySpec {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: hidden * 3 / 2,
        vision_hidden_size: 32,
        vision_depth: 3,
        vision_heads: 2,
        vision_intermediate_size: 48,
        window_size: 56,
        tie_word_embeddings: true,
    }
}

/// Row 0 packs an image sample (grid 1×8×8 → 16 image tokens, 4 windows) and a text sample;
/// row 1 is text, right padded. Labels on the answers.
fn batch(ids: &TokenIds, text_len: usize) -> (Input, Vec<Vec<i64>>) {
    let mut a: Vec<u32> = vec![1, 2, ids.vision_start];
    a.extend([ids.image; 16]);
    a.push(ids.vision_end);
    a.extend((0..text_len).map(|i| 3 + (i % 80) as u32));
    let b: Vec<u32> = (0..text_len).map(|i| 5 + (i * 7 % 80) as u32).collect();
    let row0 = [a.clone(), b.clone()].concat();
    let t = row0.len();
    let row1: Vec<u32> = (0..t).map(|i| 7 + (i * 3 % 80) as u32).collect();
    let lens0 = [a.len(), b.len()];
    let mut seg1 = vec![1u32; t - 5];
    seg1.resize(t, 0);
    let label = |row: &[u32], from: usize, keep: &dyn Fn(usize) -> bool| -> Vec<i64> {
        row.iter()
            .enumerate()
            .map(|(i, &x)| if i >= from && keep(i) { x as i64 } else { -100 })
            .collect()
    };
    let labels = vec![
        label(&row0, 22, &|i| i != a.len()),
        label(&row1, 3, &|i| i < t - 5),
    ];
    let pixels: Vec<f32> = (0..64 * 1176)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let pixels = Tensor::from_vec(pixels, (64, 1176), &Device::Cpu).unwrap();
    let mut segs0 = vec![1u32; lens0[0]];
    segs0.extend(vec![2u32; lens0[1]]);
    let input = Input::new(
        vec![row0, row1],
        vec![segs0, seg1],
        Some(pixels),
        vec![[1, 8, 8]],
    )
    .unwrap();
    (input, labels)
}

fn lora_params(ids: &TokenIds) -> (omr_model::ModelConfig, Params) {
    let (cfg, mut params) = spec(2, 32).build(ids, 5, &Device::Cpu).unwrap();
    for part in [Part::Vision, Part::Merger, Part::Language] {
        params.set_part_trainable(part, false);
    }
    let l = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.25,
        targets: vec![
            "all-linear".into(),
            "visual.blocks.*.attn.qkv".into(),
            "visual.blocks.*.mlp.down_proj".into(),
        ],
    };
    lora::apply(&mut params, &cfg, &l, 9).unwrap();
    // B starts at zero; give it values so every LoRA path carries gradient to A too.
    for (name, var) in params.trainable() {
        if name.contains("lora_B") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 13 % 17) as f32 - 8.0) / 40.0)
                .collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    (cfg, params)
}

fn trainable(params: &Params) -> Vec<(String, Tensor)> {
    params
        .trainable()
        .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
        .collect()
}

/// The plain path: `loss()` and one `backward()`.
fn plain(
    model: &Qwen2VL,
    input: &Input,
    labels: &[Vec<i64>],
    ctx: &Ctx,
) -> (f64, candle_core::backprop::GradStore) {
    let (sum, _) = model.loss(input, labels, ctx).unwrap();
    let value = sum
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (value, sum.backward().unwrap())
}

fn compare(cfg: &omr_model::ModelConfig, params: &Params, what: &str) {
    let ids = ids();
    let (input, labels) = batch(&ids, 12);
    let model = Qwen2VL::new(cfg, params).unwrap();
    let ctx = Ctx {
        dropout_seed: Some(42),
        ..Ctx::default()
    };
    let wrt = trainable(params);
    let tensors: Vec<Tensor> = wrt.iter().map(|(_, t)| t.clone()).collect();
    let (want_loss, want) = plain(&model, &input, &labels, &ctx);
    for recompute in [
        Recompute::NONE,
        Recompute {
            decoder: true,
            ..Recompute::NONE
        },
        Recompute {
            vision: true,
            ..Recompute::NONE
        },
        Recompute::ALL,
        // The last decoder layer (of 2), then both, keep their activations.
        Recompute::ALL.keeping_decoder_layers(1),
        Recompute::ALL.keeping_decoder_layers(2),
    ] {
        let got = model
            .forward_backward::<omr_model::ModelError>(&input, &ctx, recompute, &tensors, |h| {
                Ok(model.head_loss(h, &labels, &ctx)?.0)
            })
            .unwrap();
        assert_eq!(got.loss, want_loss, "{what} {recompute:?}: loss");
        let grads = got.grads.expect("finite loss, gradients");
        let mut seen = 0;
        for (name, t) in &wrt {
            let w = want.get(t);
            let g = grads.get(t);
            match (w, g) {
                (None, None) => {}
                (Some(w), Some(g)) => {
                    seen += 1;
                    let d = (w - g).unwrap().abs().unwrap().max_all().unwrap();
                    let d = d.to_scalar::<f32>().unwrap();
                    let m = w
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    // Bit for bit, but for the tied embedding: its lm-head and embedding
                    // gradients are summed in another order.
                    let tol = if name == "model.embed_tokens.weight" {
                        1e-6 * m
                    } else {
                        0.0
                    };
                    assert!(
                        d <= tol,
                        "{what} {recompute:?}: {name} differs by {d} (max |g| {m})"
                    );
                }
                (w, g) => panic!(
                    "{what} {recompute:?}: {name}: plain has grad {}, recomputed {}",
                    w.is_some(),
                    g.is_some()
                ),
            }
        }
        assert!(seen > 10, "{what}: only {seen} gradients compared");
    }
}

#[test]
fn recomputed_gradients_equal_plain_full_finetune() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (cfg, params) = spec(2, 32).build(&ids(), 5, &Device::Cpu).unwrap();
    compare(&cfg, &params, "full");
}

#[test]
fn recomputed_gradients_equal_plain_lora_with_dropout() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (cfg, params) = lora_params(&ids());
    compare(&cfg, &params, "lora");
}

/// Frozen vision: the tower is never back-propagated, with or without recompute.
#[test]
fn frozen_vision_takes_no_backward() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (cfg, mut params) = spec(2, 32).build(&ids(), 5, &Device::Cpu).unwrap();
    params.set_part_trainable(Part::Vision, false);
    compare(&cfg, &params, "frozen-vision");
}

/// A NaN loss returns no gradients and runs no backward.
#[test]
fn nonfinite_loss_runs_no_backward() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (cfg, params) = spec(2, 32).build(&ids(), 5, &Device::Cpu).unwrap();
    let (input, labels) = batch(&ids(), 12);
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let ctx = Ctx::default();
    let tensors: Vec<Tensor> = trainable(&params).into_iter().map(|(_, t)| t).collect();
    for r in [Recompute::NONE, Recompute::ALL] {
        let got = model
            .forward_backward::<omr_model::ModelError>(&input, &ctx, r, &tensors, |h| {
                Ok((model.head_loss(h, &labels, &ctx)?.0 * f64::NAN)?)
            })
            .unwrap();
        assert!(got.loss.is_nan() && got.grads.is_none());
    }
}

/// Peak bytes allocated during one forward + backward (above what was live before).
fn peak_of(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - base
}

/// Deep and long enough for the activations to dominate: recomputing the decoder keeps one
/// layer's activations instead of all of them.
#[test]
fn recompute_lowers_peak_memory() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ids = ids();
    let (cfg, params) = spec(8, 64).build(&ids, 5, &Device::Cpu).unwrap();
    let (input, labels) = batch(&ids, 150);
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let ctx = Ctx::default();
    let tensors: Vec<Tensor> = trainable(&params).into_iter().map(|(_, t)| t).collect();
    let run = |r: Recompute| {
        peak_of(|| {
            let b = model
                .forward_backward::<omr_model::ModelError>(&input, &ctx, r, &tensors, |h| {
                    Ok(model.head_loss(h, &labels, &ctx)?.0)
                })
                .unwrap();
            assert!(b.grads.is_some());
        })
    };
    run(Recompute::NONE); // warm-up: lazily built tables and thread pools
    let (none, all) = (run(Recompute::NONE), run(Recompute::ALL));
    let params_bytes: usize = tensors.iter().map(|t| t.elem_count() * 4).sum();
    eprintln!(
        "peak above baseline: plain {:.2} MB, recompute {:.2} MB (params {:.2} MB)",
        none as f64 / 1e6,
        all as f64 / 1e6,
        params_bytes as f64 / 1e6
    );
    // Both hold the gradients (≈ params); the plain one holds every layer's activations too.
    assert!(
        (all as f64) < 0.7 * none as f64,
        "recompute peak {all} B is not well below plain {none} B"
    );
    // Keeping the last 4 of the 8 layers' activations lands in between.
    let half = run(Recompute::ALL.keeping_decoder_layers(4));
    eprintln!("keeping 4 of 8 layers: {:.2} MB", half as f64 / 1e6);
    assert!(all < half && half < none, "{all} < {half} < {none}");
}
