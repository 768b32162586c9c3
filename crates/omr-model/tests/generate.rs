//! Generation: cached decoding equals a full forward, greedy ids equal transformers'
//! `generate`, sampling is seeded, eos stops a row.

mod common;

use common::{expected, model_params, rows_i64, Inputs};
use omr_model::generate::{generate, Completion, Finish, SamplingConfig};
use omr_model::{Ctx, Input, Qwen2VL};

struct Fixture {
    model: Qwen2VL,
    inputs: Inputs,
    greedy: Vec<Vec<i64>>,
}

fn load() -> Fixture {
    let (cfg, params) = model_params("qwen25vl");
    let inputs = Inputs::load("qwen25vl");
    Fixture {
        model: Qwen2VL::new(&cfg, &params).unwrap(),
        inputs,
        greedy: rows_i64(&expected("qwen25vl")["greedy_ids"]),
    }
}

fn prompts(f: &Fixture) -> Input {
    f.inputs.padded()
}

/// The prompts followed by their completions, as one left-padded batch (for a full forward:
/// its logits at position t − 1 are those that chose token t).
fn prompt_and_completions(f: &Fixture, out: &[Completion]) -> Input {
    let ids: Vec<Vec<u32>> = f
        .inputs
        .ids
        .iter()
        .zip(out)
        .map(|(p, c)| p.iter().chain(&c.tokens).copied().collect())
        .collect();
    let mask: Vec<Vec<u32>> = f
        .inputs
        .mask
        .iter()
        .zip(out)
        .map(|(m, c)| {
            m.iter()
                .copied()
                .chain(c.tokens.iter().map(|_| 1))
                .collect()
        })
        .collect();
    Input::padded(
        ids,
        &mask,
        Some(f.inputs.pixels.clone()),
        f.inputs.grids.clone(),
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
    let t = f.inputs.ids[0].len();
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
    let full = prompt_and_completions(&f, &out);
    let logits = f.model.forward(&full, &Ctx::default()).unwrap();
    let t = f.inputs.ids[0].len();
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
    let t = f.inputs.ids[0].len();
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

/// Plain sampling (temperature only: GRPO's default) draws on the logits' device by the
/// Gumbel-max trick: seeded, another seed draws otherwise, and each token's log-probability is
/// what a full forward over prompt + completion gives it under softmax(logits / temperature)
/// with the suppressed ids excluded, which GRPO's importance ratio relies on.
#[test]
fn plain_sampling_is_seeded_and_its_log_probs_match_a_full_forward() {
    let f = load();
    let suppress = vec![f.model.cfg.image_token_id];
    let cfg = SamplingConfig {
        max_new_tokens: 6,
        temperature: 0.8,
        seed: 5,
        suppress_tokens: suppress.clone(),
        ..Default::default()
    };
    let out = generate(&f.model, &prompts(&f), &cfg).unwrap();
    let again = generate(&f.model, &prompts(&f), &cfg).unwrap();
    let other = generate(
        &f.model,
        &prompts(&f),
        &SamplingConfig {
            seed: 6,
            ..cfg.clone()
        },
    )
    .unwrap();
    for (x, y) in out.iter().zip(&again) {
        assert_eq!((&x.tokens, &x.logprobs), (&y.tokens, &y.logprobs));
    }
    assert!(out.iter().zip(&other).any(|(x, y)| x.tokens != y.tokens));
    let full = prompt_and_completions(&f, &out);
    let logits = f.model.forward(&full, &Ctx::default()).unwrap();
    let t = f.inputs.ids[0].len();
    let mut worst = 0f64;
    for (b, c) in out.iter().enumerate() {
        for (s, (&tok, &lp)) in c.tokens.iter().zip(&c.logprobs).enumerate() {
            assert!(!suppress.contains(&tok));
            let row: Vec<f32> = logits
                .get(b)
                .unwrap()
                .get(t - 1 + s)
                .unwrap()
                .to_vec1()
                .unwrap();
            let z: Vec<f64> = row.iter().map(|&x| x as f64 / 0.8).collect();
            let kept = |j: usize| !suppress.contains(&(j as u32));
            let m = (0..z.len())
                .filter(|&j| kept(j))
                .map(|j| z[j])
                .fold(f64::MIN, f64::max);
            let lse = m
                + (0..z.len())
                    .filter(|&j| kept(j))
                    .map(|j| (z[j] - m).exp())
                    .sum::<f64>()
                    .ln();
            worst = worst.max((lp as f64 - (z[tok as usize] - lse)).abs());
        }
    }
    println!("generation log-probs vs a full forward: max abs diff {worst:.2e}");
    assert!(worst < 1e-4, "{worst}");
}

/// `generate_repeated`: each distinct prompt prefilled once, its cache and first logits copied
/// to its rows, gives the completions of the batch with every row repeated (the same tokens,
/// log-probs within 1e-5): plain sampling (the Gumbel-max draw) and top-k / top-p (the host).
#[test]
fn repeated_prompts_match_the_expanded_batch() {
    use candle_core::Tensor;
    use omr_model::generate::{generate_repeated, generate_with};
    let f = load();
    let cfg = &f.model.cfg;
    let repeats = [2usize, 1, 3];
    // Each image's patches, and which row it belongs to (rows' images in order).
    let merge = cfg.vision.spatial_merge_size * cfg.vision.spatial_merge_size;
    let per_image: Vec<usize> = f.inputs.grids.iter().map(|g| g[0] * g[1] * g[2]).collect();
    let mut image_rows = Vec::new();
    let mut next = 0;
    for (r, row) in f.inputs.ids.iter().enumerate() {
        let mut tokens = row.iter().filter(|&&t| t == cfg.image_token_id).count();
        while tokens > 0 {
            tokens -= per_image[next] / merge;
            image_rows.push(r);
            next += 1;
        }
    }
    assert_eq!(next, per_image.len());
    // The expanded batch: row i repeated repeats[i] times, its images with it.
    let (mut ids, mut mask, mut patches, mut grids) = (vec![], vec![], vec![], vec![]);
    for (i, &n) in repeats.iter().enumerate() {
        for _ in 0..n {
            ids.push(f.inputs.ids[i].clone());
            mask.push(f.inputs.mask[i].clone());
            let mut start = 0;
            for (img, &r) in image_rows.iter().enumerate() {
                if r == i {
                    patches.push(f.inputs.pixels.narrow(0, start, per_image[img]).unwrap());
                    grids.push(f.inputs.grids[img]);
                }
                start += per_image[img];
            }
        }
    }
    let expanded =
        Input::padded(ids, &mask, Some(Tensor::cat(&patches, 0).unwrap()), grids).unwrap();
    for sampling in [
        SamplingConfig {
            max_new_tokens: 6,
            temperature: 1.0,
            seed: 11,
            ..Default::default()
        },
        SamplingConfig {
            max_new_tokens: 6,
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            seed: 12,
            ..Default::default()
        },
    ] {
        let ctx = f.model.ctx();
        let want = generate_with(&f.model, &expanded, &sampling, &ctx).unwrap();
        let got = generate_repeated(&f.model, &prompts(&f), &repeats, &sampling, &ctx).unwrap();
        assert_eq!(got.len(), 6);
        let mut worst = 0f32;
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "row {r}");
            for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
                worst = worst.max((a - b).abs());
            }
        }
        println!(
            "repeated vs expanded (top_k {}): log-probs within {worst:.1e}",
            sampling.top_k
        );
        assert!(worst <= 1e-5, "{worst}");
        // The rows of a group draw differently (their own streams).
        assert_ne!(got[0].tokens, got[1].tokens);
    }
    let err = generate_repeated(
        &f.model,
        &prompts(&f),
        &[1, 1],
        &SamplingConfig::default(),
        &f.model.ctx(),
    )
    .expect_err("a count per prompt");
    assert!(err.to_string().contains("repeat counts"), "{err}");
}
