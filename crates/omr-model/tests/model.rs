//! Config forms, LoRA (identity at init, merge, gradients only where trainable), freezing by
//! part, seeded tiny init, and packed sequences.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use omr_model::lora::{self, LoraConfig};
use omr_model::tiny::{TinySpec, TokenIds};
use omr_model::{loss, Arch, Ctx, Input, ModelConfig, Params, Part, Qwen2VL};
use std::path::Path;

fn tiny_ids() -> TokenIds {
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

/// A small batch with an image (grid 1×4×4 → 4 tokens) and a text-only row, right padded.
fn batch(ids: &TokenIds) -> (Input, Vec<Vec<i64>>) {
    let mut r0: Vec<u32> = vec![1, 2, ids.vision_start];
    r0.extend([ids.image; 4]);
    r0.extend([ids.vision_end, 5, 6, 7]);
    let r1: Vec<u32> = vec![9, 10, 11, 12, 13, 14, 0, 0, 0, 0, 0];
    let mask = vec![vec![1; 11], [vec![1; 6], vec![0; 5]].concat()];
    let labels = vec![
        r0.iter()
            .enumerate()
            .map(|(i, &x)| if i >= 8 { x as i64 } else { -100 })
            .collect(),
        r1.iter()
            .enumerate()
            .map(|(i, &x)| if (2..6).contains(&i) { x as i64 } else { -100 })
            .collect(),
    ];
    let pixels: Vec<f32> = (0..16 * 1176)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let pixels = Tensor::from_vec(pixels, (16, 1176), &Device::Cpu).unwrap();
    (
        Input::padded(vec![r0, r1], &mask, Some(pixels), vec![[1, 4, 4]]).unwrap(),
        labels,
    )
}

fn small_spec() -> TinySpec {
    TinySpec {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        intermediate_size: 48,
        vision_hidden_size: 16,
        vision_depth: 2,
        vision_heads: 2,
        vision_intermediate_size: 24,
        window_size: 56,
        tie_word_embeddings: false,
    }
}

fn logits(cfg: &ModelConfig, params: &Params, input: &Input) -> Vec<f32> {
    let m = Qwen2VL::new(cfg, params).unwrap();
    m.forward(input, &Ctx::default())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn transformers_4_and_5_configs_agree() {
    let dir = fixture("qwen25vl");
    let v4 = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let v5 = ModelConfig::from_file(&dir.join("config_v5.json")).unwrap();
    assert_eq!(v4.arch, Arch::Qwen25Vl);
    assert_eq!(v4.text, v5.text);
    assert_eq!(v4.vision, v5.vision);
    assert_eq!(v4.tie_word_embeddings, v5.tie_word_embeddings);
    assert_eq!(v4.image_token_id, v5.image_token_id);
    assert_eq!(v4.text.mrope_section, [2, 3, 3]);
    assert_eq!(v4.vision.fullatt_block_indexes, [1, 3]);
    let v2 = ModelConfig::from_file(&fixture("qwen2vl").join("config.json")).unwrap();
    assert_eq!(v2.arch, Arch::Qwen2Vl);
    assert!(v2.tie_word_embeddings, "Qwen2-VL ties through text_config");
}

#[test]
fn unsupported_model_type_is_a_clear_error() {
    let mut raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen25vl").join("config.json")).unwrap(),
    )
    .unwrap();
    raw["model_type"] = "llava".into();
    let err = ModelConfig::from_value(raw, Path::new("x/config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x/config.json") && err.contains("llava") && err.contains("qwen2_5_vl"),
        "{err}"
    );
}

#[test]
fn tiny_init_is_seeded_and_fully_trainable() {
    let ids = tiny_ids();
    let (cfg, a) = small_spec().build(&ids, 11, &Device::Cpu).unwrap();
    let (_, b) = small_spec().build(&ids, 11, &Device::Cpu).unwrap();
    let (_, c) = small_spec().build(&ids, 12, &Device::Cpu).unwrap();
    let (input, labels) = batch(&ids);
    let la = logits(&cfg, &a, &input);
    assert_eq!(la, logits(&cfg, &b, &input), "same seed, same bits");
    assert_ne!(la, logits(&cfg, &c, &input));

    let model = Qwen2VL::new(&cfg, &a).unwrap();
    let l = model.forward(&input, &Ctx::default()).unwrap();
    let (sum, n) = loss::causal_lm_loss(&l, &labels).unwrap();
    let grads = (sum / n as f64).unwrap().backward().unwrap();
    for (name, var) in a.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            s.is_finite() && s > 0.0,
            "gradient of {name} is zero or not finite"
        );
    }
}

#[test]
fn packed_rows_equal_separate_rows() {
    let ids = tiny_ids();
    let (cfg, params) = small_spec().build(&ids, 5, &Device::Cpu).unwrap();
    let (input, _) = batch(&ids);
    let sep = Qwen2VL::new(&cfg, &params)
        .unwrap()
        .forward(&input, &Ctx::default())
        .unwrap();
    // Row 0 (11 tokens with the image) then row 1's 6 real tokens, in one row of 20.
    let mut row: Vec<u32> = input.ids[0].clone();
    row.extend(&input.ids[1][..6]);
    row.extend([0, 0, 0]);
    let packed = Input::packed(
        vec![row],
        &[vec![11, 6]],
        input.pixel_values.clone(),
        input.grids.clone(),
    )
    .unwrap();
    let out = Qwen2VL::new(&cfg, &params)
        .unwrap()
        .forward(&packed, &Ctx::default())
        .unwrap();
    let a = sep.get(0).unwrap().narrow(0, 0, 11).unwrap();
    let b = out.get(0).unwrap().narrow(0, 0, 11).unwrap();
    let c = sep.get(1).unwrap().narrow(0, 0, 6).unwrap();
    let d = out.get(0).unwrap().narrow(0, 11, 6).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (d1, d2) = (max_diff(&flat(a), &flat(b)), max_diff(&flat(c), &flat(d)));
    assert!(
        d1 < 1e-5 && d2 < 1e-5,
        "packed differs from separate: {d1} {d2}"
    );
}

#[test]
fn lora_starts_at_the_base_model_and_merges_exactly() {
    let ids = tiny_ids();
    let (cfg, mut params) = small_spec().build(&ids, 3, &Device::Cpu).unwrap();
    let (input, labels) = batch(&ids);
    let base = logits(&cfg, &params, &input);
    let lcfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "visual.merger.*".into()],
    };
    let chosen = lora::apply(&mut params, &cfg, &lcfg, 9).unwrap();
    assert_eq!(chosen.len(), 2 * 2 + 2, "{chosen:?}");
    assert_eq!(
        logits(&cfg, &params, &input),
        base,
        "B = 0: the adapter is the identity"
    );

    // Only adapters train, and every adapter gets a gradient.
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let l = model.forward(&input, &Ctx::default()).unwrap();
    let (sum, n) = loss::causal_lm_loss(&l, &labels).unwrap();
    let grads = (sum / n as f64).unwrap().backward().unwrap();
    let trainable: Vec<&str> = params.trainable().map(|(n, _)| n).collect();
    assert_eq!(trainable.len(), 2 * chosen.len());
    assert!(trainable.iter().all(|n| n.contains(".lora_")));
    for (name, var) in params.trainable() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .is_finite());
        if name.contains("lora_B") {
            assert!(
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0,
                "{name}"
            );
        }
    }

    // Move B off zero, then merging gives the adapted model's logits.
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
    let adapted = logits(&cfg, &params, &input);
    assert!(
        max_diff(&adapted, &base) > 1e-3,
        "B moved, so the output moved"
    );
    let merged = lora::merged(&params).unwrap();
    assert!(merged.keys().all(|k| !k.contains("lora_")));
    let merged = Params::from_tensors(merged, &Device::Cpu, DType::F32).unwrap();
    let d = max_diff(&logits(&cfg, &merged, &input), &adapted);
    assert!(d < 1e-5, "merged differs from adapted by {d}");

    let peft = lora::adapter_tensors(&params);
    assert!(peft
        .iter()
        .any(|(n, _)| n == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let ac = lora::adapter_config(&params, "base").unwrap();
    assert_eq!(ac["r"], 4);
    assert_eq!(ac["peft_type"], "LORA");
}

#[test]
fn frozen_parts_get_no_gradient_and_others_do() {
    let ids = tiny_ids();
    let (cfg, mut params) = small_spec().build(&ids, 4, &Device::Cpu).unwrap();
    params.set_part_trainable(Part::Vision, false);
    params.set_part_trainable(Part::Language, false);
    let (input, labels) = batch(&ids);
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let l = model.forward(&input, &Ctx::default()).unwrap();
    let (sum, n) = loss::causal_lm_loss(&l, &labels).unwrap();
    let grads = (sum / n as f64).unwrap().backward().unwrap();
    for (name, var) in params.iter() {
        let has = grads.get(var.as_tensor()).is_some();
        assert_eq!(has, Part::of(name) == Part::Merger, "{name}");
    }
}

/// `Qwen2VL::loss` (lm head only at labelled rows) equals the loss of the full logits, and so
/// do its gradients.
#[test]
fn loss_at_labelled_rows_equals_full_logits_loss() -> anyhow::Result<()> {
    let ids = tiny_ids();
    let (cfg, params) = small_spec().build(&ids, 3, &Device::Cpu)?;
    let model = Qwen2VL::new(&cfg, &params)?;
    let (input, labels) = batch(&ids);
    let ctx = Ctx::default();
    let (full, n_full) = loss::causal_lm_loss(&model.forward(&input, &ctx)?, &labels)?;
    let (fast, n_fast) = model.loss(&input, &labels, &ctx)?;
    assert_eq!(n_full, n_fast);
    let (a, b) = (full.to_scalar::<f32>()?, fast.to_scalar::<f32>()?);
    assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    let (g_full, g_fast) = (full.backward()?, fast.backward()?);
    for (name, var) in params.trainable() {
        let x = g_full.get(var).expect("grad");
        let y = g_fast.get(var).expect("grad");
        let d = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let m = x.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= 1e-5 * m.max(1e-3), "{name}: {d} vs {m}");
    }
    Ok(())
}
