//! Golden parity with transformers (fixtures: tests/fixtures/model/README.md): positions,
//! vision features, logits and loss of a padded batch with images of several sizes and a
//! text-only row, and the gradient of every parameter after one backward.

mod common;

use candle_core::{DType, Tensor};
use common::{expected, model_params, Inputs};
use omr_model::{loss, Ctx, Input, ModelConfig, Params, Qwen2VL};
use std::collections::HashMap;

struct Case {
    cfg: ModelConfig,
    params: Params,
    input: Input,
    labels: Vec<Vec<i64>>,
    mask: Vec<Vec<u32>>,
    expected: HashMap<String, Tensor>,
}

fn load(name: &str) -> Case {
    let (cfg, params) = model_params(name);
    let inputs = Inputs::load(name);
    Case {
        cfg,
        params,
        input: inputs.padded(),
        labels: inputs.labels,
        mask: inputs.mask,
        expected: expected(name),
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check(name: &str) {
    let c = load(name);
    let model = Qwen2VL::new(&c.cfg, &c.params).unwrap();
    let ctx = Ctx::default();

    let p = c.input.positions(&c.cfg).unwrap();
    let want = c.expected["position_ids"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec3::<i64>()
        .unwrap();
    for a in 0..3 {
        assert_eq!(p.pos[a], want[a], "{name}: position_ids axis {a}");
    }

    let feats = model
        .image_features(c.input.pixel_values.as_ref().unwrap(), &c.input.grids, &ctx)
        .unwrap();
    let d_img = max_abs(&feats, &c.expected["image_embeds"]);
    println!("{name}: image_embeds max abs diff {d_img:.3e}");
    assert!(d_img <= 1e-4, "{name}: image features differ by {d_img}");

    let logits = model.forward(&c.input, &ctx).unwrap();
    let want = &c.expected["logits"];
    let mut worst = 0f32;
    for (b, row) in c.mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                let d = max_abs(
                    &logits.get(b).unwrap().get(t).unwrap(),
                    &want.get(b).unwrap().get(t).unwrap(),
                );
                worst = worst.max(d);
            }
        }
    }
    println!("{name}: logits max abs diff {worst:.3e} (valid positions)");
    assert!(worst <= 1e-4, "{name}: logits differ by {worst}");

    let (sum, n) = loss::causal_lm_loss(&logits, &c.labels).unwrap();
    let mean = (sum / n as f64).unwrap();
    let l = mean.to_scalar::<f32>().unwrap();
    let want_l = c.expected["loss"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("{name}: loss {l} vs transformers {want_l}");
    assert!((l - want_l).abs() <= 1e-5, "{name}: loss {l} vs {want_l}");

    let grads = mean.backward().unwrap();
    let mut checked = 0;
    let mut worst_rel = 0f64;
    for (pname, var) in c.params.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
        let sq = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            sq.is_finite() && sq > 0.0,
            "{name}: gradient of {pname} is zero or not finite"
        );
        if let Some(r) = c.expected.get(&format!("grad.{pname}")) {
            let diff = (g - r)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let norm = r
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rel = (diff as f64).sqrt() / (norm as f64).sqrt().max(1e-30);
            worst_rel = worst_rel.max(rel);
            assert!(
                rel <= 1e-4,
                "{name}: gradient of {pname}: relative error {rel:.3e}"
            );
            checked += 1;
        }
    }
    println!("{name}: {checked} parameter gradients vs torch autograd, worst relative error {worst_rel:.3e}");
    assert!(checked > 0, "{name}: fixture has no gradients");
}

#[test]
fn qwen2_5_vl_matches_transformers() {
    check("qwen25vl");
}

#[test]
fn qwen2_vl_matches_transformers() {
    check("qwen2vl");
}
