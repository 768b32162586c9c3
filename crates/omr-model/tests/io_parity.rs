//! Golden parity with transformers 4.57.1 `save_pretrained` (fixtures made by
//! `scripts/fixtures/make_model_io_fixtures.py`, see `tests/fixtures/io/README.md`): loading
//! its checkpoint and exporting it again in its state-dict order gives byte-identical shards,
//! index and config.

use candle_core::{DType, Device};
use omr_model::export::{copy_processor_files, parse_size, write_config, write_safetensors};
use omr_model::names::canonical;
use omr_model::weights::Checkpoint;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/io")
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn export_reproduces_save_pretrained_byte_for_byte() {
    let hf = fixtures().join("hf");
    let mut ck = Checkpoint::load(&hf, DType::BF16, &Device::Cpu).expect("load the HF save");
    let order = std::fs::read_to_string(fixtures().join("state_dict_order.txt")).unwrap();
    let mut tensors = Vec::new();
    for name in order.lines() {
        // In-memory 4.57 names are aliases; `take` accepts them and the export writes canonical ones.
        let shape = ck.get(name).expect(name).dims().to_vec();
        tensors.push((canonical(name).into_owned(), ck.take(name, &shape).unwrap()));
    }
    assert_eq!(tensors.len(), 34);
    assert!(ck.remaining().is_empty());

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("export");
    let max = parse_size("20KB").unwrap();
    let files = write_safetensors(&out, &tensors, max, DType::BF16).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&bytes(&hf.join("config.json"))).unwrap();
    write_config(&out, &config, DType::BF16).unwrap();
    copy_processor_files(&hf, &out).unwrap();

    let mut names: Vec<String> = std::fs::read_dir(&hf)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(files.len(), 4);
    for name in names {
        let want = match name.as_str() {
            "config.json" => bytes(&fixtures().join("config_expected.json")),
            _ => bytes(&hf.join(&name)),
        };
        assert!(
            bytes(&out.join(&name)) == want,
            "{name} differs from transformers' file"
        );
    }
}
