//! The recipe test of STYLE.md: a few steps of the tiny SFT preset (`configs/sft/tiny.toml`,
//! unchanged model and optimizer settings) on a seeded synthetic set, with the per-step losses
//! and gradient norms checked against committed golden values (`tests/fixtures/sft/`).
//!
//! Bitwise equality is checked elsewhere (`e2e_sft.rs`: reruns and resumes on one machine).
//! Here the reference is a file made on another machine, and CPU matmuls may sum in a
//! different order on another instruction set, so the comparison allows 1e-4 relative: far
//! below what any change to the model, loss normalisation, optimizer or data order moves
//! (the first steps change by more than 1e-2 when any of them changes).
//! Regenerate after an intended change: `OMR_REGEN_GOLDEN=1 cargo test -p omr --test golden_sft`.

mod common;

use common::{ok, s, synth};
use std::path::Path;

const GOLDEN: &str = "tests/fixtures/sft/tiny_losses.json";
const STEPS: usize = 6;

fn toml_str(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

#[test]
fn tiny_preset_losses_match_golden() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    synth(&data, 64, 8, 0, 2048);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let preset = root.join("configs/sft/tiny.toml");
    let run = tmp.path().join("run");
    let sets = [
        format!("run.dir={}", toml_str(&run)),
        format!("model.processor={}", toml_str(&data.join("processor"))),
        format!("data.sources.0.path={}", toml_str(&data)),
        format!("train.max_steps={STEPS}"),
        "data.batch.batch_size=4".to_string(),
        "schedule.warmup_steps=2".to_string(),
        "eval.loss_samples=0".to_string(),
        "eval.generate_samples=0".to_string(),
        "export.at_end=false".to_string(),
    ];
    let mut args = vec!["sft", "--config", s(&preset)];
    for x in &sets {
        args.extend(["--set", x.as_str()]);
    }
    ok(&args);
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut loss = Vec::new();
    let mut gnorm = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(l) = v.get("train/loss").and_then(|x| x.as_f64()) {
            loss.push(l);
            gnorm.push(v["train/grad_norm"].as_f64().unwrap());
        }
    }
    assert_eq!(loss.len(), STEPS);
    let got = serde_json::json!({ "train/loss": loss, "train/grad_norm": gnorm });
    let golden_path = root.join(GOLDEN);
    if std::env::var_os("OMR_REGEN_GOLDEN").is_some() {
        let text = serde_json::to_string_pretty(&got).unwrap() + "\n";
        std::fs::write(&golden_path, text).unwrap();
        eprintln!("wrote {}", golden_path.display());
        return;
    }
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&golden_path).unwrap()).unwrap();
    for key in ["train/loss", "train/grad_norm"] {
        let (w, g) = (want[key].as_array().unwrap(), got[key].as_array().unwrap());
        assert_eq!(w.len(), g.len(), "{key}");
        for (i, (w, g)) in w.iter().zip(g).enumerate() {
            let (w, g) = (w.as_f64().unwrap(), g.as_f64().unwrap());
            assert!(
                (w - g).abs() <= 1e-4 * w.abs().max(1e-6),
                "{key} at step {}: golden {w}, got {g}",
                i + 1
            );
        }
    }
    // The preset learns: the loss falls over the first steps.
    assert!(loss[STEPS - 1] < loss[0], "{loss:?}");
}
