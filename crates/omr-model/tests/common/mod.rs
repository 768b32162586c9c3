//! Loading of the transformers fixtures (tests/fixtures/model/README.md), shared by the test
//! binaries that compare against them.
#![allow(dead_code)] // each test binary uses a different part

use candle_core::{DType, Device, Tensor};
use omr_model::{Input, ModelConfig, Params};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

/// The fixture's config and weights, every parameter trainable, f32 on the CPU.
pub fn model_params(name: &str) -> (ModelConfig, Params) {
    let dir = fixture(name);
    let dev = Device::Cpu;
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    (
        cfg,
        Params::from_tensors(tensors, &dev, DType::F32).unwrap(),
    )
}

/// transformers' outputs for the fixture's inputs (`expected.safetensors`).
pub fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

pub fn rows_i64(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

/// The fixture's batch (`inputs.safetensors`): left-padded rows, images, labels.
pub struct Inputs {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
    pub pixels: Tensor,
    pub grids: Vec<[usize; 3]>,
    pub labels: Vec<Vec<i64>>,
}

impl Inputs {
    pub fn load(name: &str) -> Inputs {
        let t =
            candle_core::safetensors::load(fixture(name).join("inputs.safetensors"), &Device::Cpu)
                .unwrap();
        let u32_rows = |k: &str| -> Vec<Vec<u32>> {
            rows_i64(&t[k])
                .into_iter()
                .map(|r| r.into_iter().map(|x| x as u32).collect())
                .collect()
        };
        Inputs {
            ids: u32_rows("input_ids"),
            mask: u32_rows("attention_mask"),
            pixels: t["pixel_values"].clone(),
            grids: rows_i64(&t["image_grid_thw"])
                .into_iter()
                .map(|r| [r[0] as usize, r[1] as usize, r[2] as usize])
                .collect(),
            labels: rows_i64(&t["labels"]),
        }
    }

    pub fn padded(&self) -> Input {
        Input::padded(
            self.ids.clone(),
            &self.mask,
            Some(self.pixels.clone()),
            self.grids.clone(),
        )
        .unwrap()
    }
}

/// Two rows of 39: row 0 packs the fixture's row 0 (20 tokens, one image) and row 2 (12 text
/// tokens), then 7 padding; row 1 is the fixture's row 1 (two images). Images stay in order.
pub fn packed(inputs: &Inputs) -> (Input, Vec<Vec<i64>>) {
    let valid = |r: usize| -> (Vec<u32>, Vec<i64>) {
        let start = inputs.mask[r].iter().position(|&m| m != 0).unwrap();
        (
            inputs.ids[r][start..].to_vec(),
            inputs.labels[r][start..].to_vec(),
        )
    };
    let ((i0, l0), (i1, l1), (i2, l2)) = (valid(0), valid(1), valid(2));
    let t = i1.len();
    let pad = t - i0.len() - i2.len();
    let row0: Vec<u32> = [i0.clone(), i2.clone(), vec![306; pad]].concat();
    let lab0: Vec<i64> = [l0, l2, vec![-100; pad]].concat();
    let input = Input::packed(
        vec![row0, i1.clone()],
        &[vec![i0.len(), i2.len()], vec![t]],
        Some(inputs.pixels.clone()),
        inputs.grids.clone(),
    )
    .unwrap();
    (input, vec![lab0, l1])
}

/// A tensor's elements as f32, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a − b| / max |b|.
pub fn rel(a: &[f32], b: &[f32]) -> f32 {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let m = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
    d / m.max(1e-12)
}

/// Each parameter's name and gradient (None: it got none).
pub type Grads = Vec<(String, Option<Vec<f32>>)>;

/// Every parameter's gradient in `grads`, by name; with mixed precision the gradient lands
/// on the master's compute copy.
pub fn grads_by_name(params: &Params, grads: &candle_core::backprop::GradStore) -> Grads {
    params
        .iter()
        .map(|(name, var)| {
            let at = params.copy_of(name).unwrap_or(var);
            (name.to_string(), grads.get(at).map(flat))
        })
        .collect()
}

/// The qwen25vl fixture with LoRA of rank 4 on the linears `targets` select (the base frozen),
/// B drawn away from zero so that every adapter gradient is non-trivial.
pub fn with_lora(targets: &[&str], dropout: f64) -> Params {
    let (cfg, mut params) = model_params("qwen25vl");
    let lora = omr_model::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        targets: targets.iter().map(|t| t.to_string()).collect(),
    };
    omr_model::lora::apply(&mut params, &cfg, &lora, 7).unwrap();
    let bs: Vec<(String, Tensor)> = params
        .trainable()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
        .collect();
    assert!(!bs.is_empty());
    for (n, b) in bs {
        let r = Tensor::randn(0f32, 0.05, b.shape(), b.device()).unwrap();
        params.insert(n, &r, true).unwrap();
    }
    params
}
