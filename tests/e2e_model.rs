//! End to end through the `omr` binary: a tiny Qwen2.5-VL from scratch next to the synthetic
//! processor (`omr model init`), a reply about a synthetic image (`omr generate`, greedy, so
//! twice the same), logits for saved inputs (`omr model forward`) and a bf16 sharded re-export
//! (`omr model export`) that loads back with the same config.

mod common;

use common::{ok, omr, s, synth};

#[test]
fn init_generate_forward_export() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    synth(&d, 48, 4, 2, 600);
    let model = tmp.path().join("tiny");
    ok(&[
        "model",
        "init",
        "--processor",
        s(&d.join("processor")),
        "--out",
        s(&model),
        "--seed",
        "5",
    ]);
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "preprocessor_config.json",
    ] {
        assert!(model.join(f).is_file(), "{f}");
    }

    // An image from the synthetic set's processor folder is not needed: write a PNG.
    let img = tmp.path().join("x.png");
    let pixels: Vec<u8> = (0..120 * 90 * 3).map(|i| (i * 7 % 251) as u8).collect();
    image::RgbImage::from_raw(120, 90, pixels)
        .unwrap()
        .save(&img)
        .unwrap();
    let gen = [
        "generate",
        "--model",
        s(&model),
        "--image",
        s(&img),
        "--prompt",
        "Which organ?",
        "--max-new-tokens",
        "12",
    ];
    let a = omr(&gen);
    let err = String::from_utf8_lossy(&a.stderr);
    assert!(
        a.status.success() && err.contains("prompt tokens") && err.contains("new tokens"),
        "{err}"
    );
    assert_eq!(
        a.stdout,
        omr(&gen).stdout,
        "greedy generation is deterministic"
    );
    let bad = omr(&[
        "generate",
        "--model",
        s(&tmp.path().join("nope")),
        "--prompt",
        "x",
    ]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a missing model folder is a usage error"
    );

    // Forward on saved inputs: one text row.
    let mut t = std::collections::HashMap::new();
    let ids = candle_core::Tensor::new(&[[3i64, 4, 5, 6]], &candle_core::Device::Cpu).unwrap();
    t.insert("input_ids".to_string(), ids);
    let inputs = tmp.path().join("in.safetensors");
    candle_core::safetensors::save(&t, &inputs).unwrap();
    let out = tmp.path().join("out.safetensors");
    ok(&[
        "model",
        "forward",
        "--model",
        s(&model),
        "--inputs",
        s(&inputs),
        "--out",
        s(&out),
    ]);
    let logits = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(logits["logits"].dims()[..2], [1, 4]);

    let exp = tmp.path().join("exp");
    ok(&[
        "model",
        "export",
        "--model",
        s(&model),
        "--out",
        s(&exp),
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "1MB",
    ]);
    assert!(exp.join("model.safetensors.index.json").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    ok(&[
        "model",
        "forward",
        "--model",
        s(&exp),
        "--inputs",
        s(&inputs),
        "--out",
        s(&out),
    ]);
}
