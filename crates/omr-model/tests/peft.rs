//! PEFT export of LoRA adapters on the Qwen2.5-VL fixture: the folder has PEFT's layout, and
//! with `OMR_PEFT_OUT=DIR` the adapter plus our adapted logits are kept there, so
//! `scripts/fixtures/model/check_peft.py DIR` can load the base with `PeftModel` and compare.

mod common;

use candle_core::{DType, Device, Tensor};
use omr_model::lora::{self, LoraConfig};
use omr_model::pretrained;
use omr_model::{Ctx, Qwen2VL};
use std::path::Path;

#[test]
fn adapter_folder_has_peft_layout() {
    let base = common::fixture("qwen25vl");
    let mut m = pretrained::load_dir(&base, DType::F32, &Device::Cpu).unwrap();
    let lcfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.05,
        targets: vec![
            "q_proj".into(),
            "v_proj".into(),
            "model.layers.*.mlp.down_proj".into(),
        ],
    };
    lora::apply(&mut m.params, &m.config, &lcfg, 1).unwrap();
    for (name, var) in m.params.iter() {
        if name.contains("lora_B") {
            let (o, r) = var.as_tensor().dims2().unwrap();
            let v: Vec<f32> = (0..o * r)
                .map(|i| ((i * 13 % 7) as f32 - 3.0) / 10.0)
                .collect();
            var.set(&Tensor::from_vec(v, (o, r), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let kept = std::env::var_os("OMR_PEFT_OUT");
    let tmp = tempfile::tempdir().unwrap();
    let out = kept
        .as_ref()
        .map(|p| Path::new(p).to_path_buf())
        .unwrap_or(tmp.path().to_path_buf());
    lora::save_adapter(&m.params, &out, base.to_str().unwrap()).unwrap();
    let st = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(st.len(), 2 * (2 + 2 + 2));
    assert!(st.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["lora_alpha"], 8.0);

    let input = common::Inputs::load("qwen25vl").padded();
    let logits = Qwen2VL::new(&m.config, &m.params)
        .unwrap()
        .forward(&input, &Ctx::default())
        .unwrap();
    if kept.is_some() {
        let t: std::collections::HashMap<String, Tensor> = [("logits".to_string(), logits)].into();
        candle_core::safetensors::save(&t, out.join("omr_logits.safetensors")).unwrap();
    }
}
