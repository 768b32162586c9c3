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
