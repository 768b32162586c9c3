//! Checkpoint I/O end to end on tiny tensors: export (single file and shards, index contents,
//! `format: pt` metadata, re-export into an existing folder) read back by `Checkpoint::load`,
//! transformers 5.x names, and every load error a user can meet (missing shard, duplicate,
//! missing tensor with its hints, bad shape, ambiguous folders).

use candle_core::{DType, Device, Tensor};
use omr_model::export::{parse_size, write_safetensors};
use omr_model::weights::Checkpoint;
use omr_model::ModelError;
use serde_json::Value;
use std::path::Path;

fn tiny() -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    let t = |n: usize, shape: &[usize], dtype: DType| {
        let v: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 3.0).collect();
        Tensor::from_vec(v, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    vec![
        (
            "model.embed_tokens.weight".into(),
            t(32, &[8, 4], DType::F32),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight".into(),
            t(16, &[4, 4], DType::BF16),
        ),
        (
            "model.layers.0.self_attn.q_proj.bias".into(),
            t(4, &[4], DType::F32),
        ),
        ("model.norm.weight".into(), t(4, &[4], DType::F16)),
        (
            "visual.patch_embed.proj.weight".into(),
            t(24, &[4, 6], DType::F32),
        ),
        ("lm_head.weight".into(), t(32, &[8, 4], DType::BF16)),
    ]
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn format_metadata(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().as_ref()?.get("format").cloned()
}

#[test]
fn single_file_round_trip_in_f32_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, st_dtype) in [
        (DType::F32, safetensors::Dtype::F32),
        (DType::BF16, safetensors::Dtype::BF16),
    ] {
        let out = tmp.path().join(format!("{dtype:?}"));
        let files = write_safetensors(&out, &tiny(), parse_size("5GB").unwrap(), dtype).unwrap();
        assert_eq!(files, [out.join("model.safetensors")]);
        assert_eq!(format_metadata(&files[0]).as_deref(), Some("pt"));
        let bytes = std::fs::read(&files[0]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensors().iter().all(|(_, v)| v.dtype() == st_dtype));
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp folder left behind: {leftovers:?}"
        );

        let mut ck = Checkpoint::load(&out, DType::F32, &Device::Cpu).unwrap();
        for (name, t) in tiny() {
            let got = ck.take(&name, t.dims()).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            // Every value of `tiny` is a multiple of 0.25 within ±5: exact in bf16 and f16.
            assert_eq!(values(&got), values(&t), "{name}");
        }
        assert!(ck.remaining().is_empty());
    }
}

#[test]
fn sharded_export_matches_save_pretrained_and_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("export");
    // f32 sizes in bytes: 128, 64, 16, 16, 96, 128 → limit 200 gives [128+64], [16+16+96], [128].
    let files = write_safetensors(&out, &tiny(), 200, DType::F32).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into())
        .collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json"
        ]
    );
    for f in &files[..3] {
        assert_eq!(format_metadata(f).as_deref(), Some("pt"), "{}", f.display());
    }
    let index = read_json(&out.join("model.safetensors.index.json"));
    assert_eq!(index["metadata"]["total_size"], 448);
    assert_eq!(index["metadata"]["total_parameters"], 112);
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 6);
    assert_eq!(
        map["model.embed_tokens.weight"],
        "model-00001-of-00003.safetensors"
    );
    assert_eq!(
        map["model.layers.0.self_attn.q_proj.weight"],
        "model-00001-of-00003.safetensors"
    );
    assert_eq!(map["model.norm.weight"], "model-00002-of-00003.safetensors");
    assert_eq!(map["lm_head.weight"], "model-00003-of-00003.safetensors");
    let text = std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap();
    assert!(
        text.starts_with("{\n  \"metadata\": {\n    \"total_parameters\": 112,\n    \"total_size\": 448\n  },\n  \"weight_map\": {\n    \"lm_head.weight\": \"model-00003-of-00003.safetensors\",\n"),
        "{text}"
    );
    assert!(text.ends_with("}\n}\n"));

    let ck = Checkpoint::load(&out, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(ck.names().count(), 6);
    let q = ck.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype(), DType::BF16);
    assert_eq!(values(q), values(&tiny()[1].1));
    assert!(ck
        .file_of("lm_head.weight")
        .unwrap()
        .ends_with("model-00003-of-00003.safetensors"));

    // Re-exporting into the same folder as one file removes the old shards and index.
    std::fs::write(out.join("config.json"), "{}").unwrap();
    let files = write_safetensors(&out, &tiny(), u64::MAX, DType::F32).unwrap();
    assert_eq!(files, [out.join("model.safetensors")]);
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["config.json", "model.safetensors"]);
}

#[test]
fn missing_shard_names_the_index_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_safetensors(tmp.path().join("m").as_path(), &tiny(), 200, DType::F32).unwrap();
    let dir = tmp.path().join("m");
    std::fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let e = Checkpoint::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::MissingShard { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("model.safetensors.index.json")
            && msg.contains("`model-00002-of-00003.safetensors`"),
        "{msg}"
    );
}

fn save(path: &Path, names: &[&str]) {
    let t = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    let map: std::collections::HashMap<String, Tensor> =
        names.iter().map(|n| (n.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn transformers_5_names_load_under_canonical_names() {
    let tmp = tempfile::tempdir().unwrap();
    save(
        &tmp.path().join("model.safetensors"),
        &[
            "model.language_model.layers.0.mlp.up_proj.weight",
            "model.visual.blocks.0.attn.qkv.weight",
            "lm_head.weight",
        ],
    );
    let mut ck = Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        ck.names().collect::<Vec<_>>(),
        [
            "lm_head.weight",
            "model.layers.0.mlp.up_proj.weight",
            "visual.blocks.0.attn.qkv.weight"
        ]
    );
    assert!(
        ck.contains("model.visual.blocks.0.attn.qkv.weight"),
        "aliases are accepted when asking"
    );
    ck.take("visual.blocks.0.attn.qkv.weight", &[2, 3]).unwrap();
    assert_eq!(
        ck.remaining(),
        ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    );

    // One tensor under both names is an error naming both files.
    let dup = tempfile::tempdir().unwrap();
    save(
        &dup.path().join("model.safetensors"),
        &["model.norm.weight", "model.language_model.norm.weight"],
    );
    let e = Checkpoint::load(dup.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::DuplicateTensor { .. }), "{e}");
    assert!(e.to_string().contains("`model.norm.weight`"), "{e}");
}

#[test]
fn duplicate_across_shards_names_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    save(&tmp.path().join("a.safetensors"), &["model.norm.weight"]);
    save(
        &tmp.path().join("b.safetensors"),
        &["model.language_model.norm.weight"],
    );
    let index = serde_json::json!({"metadata": {}, "weight_map": {
        "model.norm.weight": "a.safetensors", "model.language_model.norm.weight": "b.safetensors"}});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let e = Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a.safetensors") && e.contains("b.safetensors"),
        "{e}"
    );
}

#[test]
fn missing_tensors_explain_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    save(
        &tmp.path().join("adapter.safetensors"),
        &[
            "base_model.model.model.layers.0.mlp.up_proj.weight",
            "model.embed_tokens.weight",
            "model.layers.0.input_layernorm.weight",
        ],
    );
    let mut ck = Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let err = |ck: &mut Checkpoint, name: &str| ck.take(name, &[2, 3]).unwrap_err();

    let e = err(&mut ck, "model.layers.0.mlp.up_proj.weight");
    assert!(matches!(e, ModelError::MissingTensor { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("`base_model.model.model.layers.0.mlp.up_proj.weight`")
            && msg.contains("another prefix"),
        "{msg}"
    );
    assert!(
        msg.contains(&tmp.path().display().to_string()),
        "names the folder: {msg}"
    );

    let msg = err(&mut ck, "lm_head.weight").to_string();
    assert!(msg.contains("tie_word_embeddings"), "{msg}");
    let msg = err(&mut ck, "model.layers.5.input_layernorm.weight").to_string();
    assert!(msg.contains("has 1 `model.layers.*` layers"), "{msg}");

    let e = ck.take("model.embed_tokens.weight", &[3, 2]).unwrap_err();
    assert!(matches!(e, ModelError::BadShape { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("[3, 2]") && msg.contains("[2, 3]") && msg.contains("adapter.safetensors"),
        "{msg}"
    );
    ck.take("model.embed_tokens.weight", &[2, 3]).unwrap();
    let msg = err(&mut ck, "model.embed_tokens.weight").to_string();
    assert!(msg.contains("already taken"), "{msg}");
}

#[test]
fn folders_without_a_clear_weight_file_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::NoWeights { .. }), "{e}");
    save(&tmp.path().join("one.safetensors"), &["x"]);
    assert!(Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu)
        .unwrap()
        .contains("x"));
    save(&tmp.path().join("two.safetensors"), &["y"]);
    let msg = Checkpoint::load(tmp.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("one.safetensors, two.safetensors"), "{msg}");
    let e = Checkpoint::load(&tmp.path().join("nope"), DType::F32, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}
