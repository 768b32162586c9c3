//! Generation: cached decoding equals a full forward, greedy ids equal transformers'
//! `generate`, sampling is seeded, eos stops a row.

use candle_core::{DType, Device, Tensor};
use omr_model::generate::{generate, Finish, SamplingConfig};
use omr_model::{Ctx, Input, ModelConfig, Params, Qwen2VL};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

struct Fixture {
    model: Qwen2VL,
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
    pixels: Tensor,
    grids: Vec<[usize; 3]>,
    greedy: Vec<Vec<i64>>,
}

fn load() -> Fixture {
    let dir = fixture("qwen25vl");
    let dev = Device::Cpu;
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    let params = Params::from_tensors(tensors, &dev, DType::F32).unwrap();
    let inputs = candle_core::safetensors::load(dir.join("inputs.safetensors"), &dev).unwrap();
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let to_u32 = |t: &Tensor| -> Vec<Vec<u32>> {
        rows(t)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect()
    };
    Fixture {
        model: Qwen2VL::new(&cfg, &params).unwrap(),
        ids: to_u32(&inputs["input_ids"]),
        mask: to_u32(&inputs["attention_mask"]),
        pixels: inputs["pixel_values"].clone(),
        grids: rows(&inputs["image_grid_thw"])
            .into_iter()
            .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize])
            .collect(),
        greedy: rows(&expected["greedy_ids"]),
    }
}

fn prompts(f: &Fixture) -> Input {
    Input::padded(
        f.ids.clone(),
        &f.mask,
        Some(f.pixels.clone()),
        f.grids.clone(),
    )
    .unwrap()
}

#[test]
fn greedy_matches_transformers_generate() {
    let f = load();
    let cfg = SamplingConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    let out = generate(&f.model, &prompts(&f), &cfg).unwrap();
    let t = f.ids[0].len();
    for (b, c) in out.iter().enumerate() {
        let want: Vec<u32> = f.greedy[b][t..].iter().map(|&x| x as u32).collect();
        assert_eq!(c.tokens, want, "row {b}");
        assert_eq!(c.finish, Finish::Length);
    }
}

#[test]
fn cached_decoding_equals_full_forward() {
    let f = load();
    let cfg = SamplingConfig {
        max_new_tokens: 6,
        temperature: 1.0,
        seed: 7,
        keep_logits: true,
        ..Default::default()
    };
    let out = generate(&f.model, &prompts(&f), &cfg).unwrap();
    // Full forward over prompt + completion; the logits at position t-1 are those that chose
    // token t.
    let ids: Vec<Vec<u32>> = f
        .ids
        .iter()
        .zip(&out)
        .map(|(p, c)| p.iter().chain(&c.tokens).copied().collect())
        .collect();
    let mask: Vec<Vec<u32>> = f
        .mask
        .iter()
        .zip(&out)
        .map(|(m, c)| {
            m.iter()
                .copied()
                .chain(c.tokens.iter().map(|_| 1))
                .collect()
        })
        .collect();
    let full = Input::padded(ids, &mask, Some(f.pixels.clone()), f.grids.clone()).unwrap();
    let logits = f.model.forward(&full, &Ctx::default()).unwrap();
    let t = f.ids[0].len();
    let mut worst = 0f32;
    for (b, c) in out.iter().enumerate() {
        for (s, step) in c.logits.iter().enumerate() {
            let want = logits
                .get(b)
                .unwrap()
                .get(t - 1 + s)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (x, y) in step.iter().zip(&want) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    println!("cached vs full forward: max abs logit diff {worst:.3e}");
    assert!(
        worst < 1e-4,
        "cached decoding differs from the full forward by {worst}"
    );
}

#[test]
fn sampling_is_seeded() {
    let f = load();
    let cfg = SamplingConfig {
        max_new_tokens: 6,
        temperature: 0.9,
        top_p: 0.9,
        top_k: 50,
        seed: 3,
        ..Default::default()
    };
    let a = generate(&f.model, &prompts(&f), &cfg).unwrap();
    let b = generate(&f.model, &prompts(&f), &cfg).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.logprobs, y.logprobs);
        assert!(x.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
    let other = generate(
        &f.model,
        &prompts(&f),
        &SamplingConfig {
            seed: 4,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert!(
        a.iter().zip(&other).any(|(x, y)| x.tokens != y.tokens),
        "the seed changes samples"
    );
}

#[test]
fn eos_stops_a_row_and_keeps_others_going() {
    let f = load();
    let t = f.ids[0].len();
    // Row 0's third greedy token becomes an eos: row 0 stops there, the others run to length.
    let eos = f.greedy[0][t + 2] as u32;
    let cfg = SamplingConfig {
        max_new_tokens: 8,
        eos_token_ids: vec![eos],
        ..Default::default()
    };
    let out = generate(&f.model, &prompts(&f), &cfg).unwrap();
    let first = f.greedy[0][t..]
        .iter()
        .position(|&x| x as u32 == eos)
        .unwrap();
    assert_eq!(out[0].tokens.len(), first + 1);
    assert_eq!(out[0].finish, Finish::Eos);
    for b in 1..3 {
        let want: Vec<u32> = f.greedy[b][t..].iter().map(|&x| x as u32).collect();
        match want.iter().position(|&x| x == eos) {
            Some(p) => assert_eq!(out[b].tokens, want[..=p]),
            None => assert_eq!(out[b].tokens, want),
        }
    }
}
