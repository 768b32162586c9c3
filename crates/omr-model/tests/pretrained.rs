//! from_pretrained → save_pretrained → from_pretrained keeps every tensor and the logits, in
//! one file and sharded; a missing tensor is an error that names it.

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use omr_model::pretrained::{self, SaveOptions};
use omr_model::{Ctx, Input, Qwen2VL};
use std::path::Path;

fn text_input() -> Input {
    let ids = vec![vec![1u32, 5, 9, 33, 2, 7], vec![0, 0, 4, 8, 15, 16]];
    let mask = vec![vec![1u32; 6], vec![0, 0, 1, 1, 1, 1]];
    Input::padded(ids, &mask, None, vec![]).unwrap()
}

fn logits(p: &pretrained::Pretrained) -> Vec<f32> {
    let m = Qwen2VL::new(&p.config, &p.params).unwrap();
    m.forward(&text_input(), &Ctx::default())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn save_and_reload_keeps_the_model() {
    for name in ["qwen25vl", "qwen2vl"] {
        let a = pretrained::load_dir(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        assert!(a.unexpected.is_empty(), "{name}: {:?}", a.unexpected);
        for shard in [u64::MAX, 200_000] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("export");
            let opts = SaveOptions {
                base_dir: Some(&fixture(name)),
                dtype: DType::F32,
                max_shard_bytes: shard,
            };
            pretrained::save(&out, &a.config, &pretrained::base_tensors(&a.params), &opts).unwrap();
            assert_eq!(
                out.join("model.safetensors.index.json").exists(),
                shard != u64::MAX
            );
            assert!(out.join("generation_config.json").exists());
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["torch_dtype"], "float32");
            assert_eq!(cfg["dtype"], "float32");
            let b = pretrained::load_dir(&out, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(
                logits(&a),
                logits(&b),
                "{name}: logits change after export (shard {shard})"
            );
            if a.config.tie_word_embeddings {
                let st = safetensors_names(&out);
                assert!(
                    !st.iter().any(|n| n == "lm_head.weight"),
                    "tied head is not written"
                );
            }
        }
    }
}

fn safetensors_names(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            names.extend(
                candle_core::safetensors::load(&p, &Device::Cpu)
                    .unwrap()
                    .into_keys(),
            );
        }
    }
    names
}

#[test]
fn bf16_export_loads_back_in_f32() {
    let a = pretrained::load_dir(&fixture("qwen25vl"), DType::F32, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let opts = SaveOptions {
        base_dir: None,
        dtype: DType::BF16,
        max_shard_bytes: u64::MAX,
    };
    pretrained::save(
        tmp.path(),
        &a.config,
        &pretrained::base_tensors(&a.params),
        &opts,
    )
    .unwrap();
    let b = pretrained::load_dir(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let (x, y) = (logits(&a), logits(&b));
    let d = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(
        d > 0.0 && d < 0.1,
        "bf16 rounding moves logits a little: {d}"
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let a = pretrained::load_dir(&fixture("qwen25vl"), DType::F32, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("qwen25vl").join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let kept: std::collections::HashMap<String, Tensor> = pretrained::base_tensors(&a.params)
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    candle_core::safetensors::save(&kept, tmp.path().join("model.safetensors")).unwrap();
    let err = pretrained::load_dir(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
}
