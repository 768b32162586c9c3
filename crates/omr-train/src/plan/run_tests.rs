//! Unit tests of a run's planning on its device at start-up: `kept_decoder_layers = "auto"`,
//! the `[runtime] memory_check` refusal and the out-of-memory error.

use super::*;
use crate::config::SftConfig;
use std::path::Path;

/// `kept_decoder_layers = "auto"` at start-up: all layers with room, fewer or none without,
/// none without decoder checkpointing; the log line says which and why.
#[test]
fn auto_kept_decoder_layers_follows_the_device_memory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/sft/qwen2.5-vl-7b.toml");
    let load = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        SftConfig::load(&root, &sets).unwrap()
    };
    let opts = PlanOptions {
        model_config: None,
        compute_bytes: 2,
        attention: AttentionImpl::Fused,
        max_pixels: None,
        images_per_row: None,
        world: 1,
    };
    let auto = |cfg: &SftConfig, bytes: u64| {
        auto_kept_decoder_layers(&input_from_sft(cfg, &opts).unwrap().0, bytes)
    };
    let plain = load(&["train.kept_decoder_layers=auto"]);
    let (n, why) = auto(&plain, u64::MAX);
    assert_eq!(n, 0);
    assert!(why.contains("no decoder checkpointing"), "{why}");
    let ckpt = load(&[
        "train.kept_decoder_layers=auto",
        "train.activation_checkpointing=all",
    ]);
    let layers = input_from_sft(
        &ckpt,
        &PlanOptions {
            model_config: None,
            compute_bytes: 2,
            attention: AttentionImpl::Fused,
            max_pixels: None,
            images_per_row: None,
            world: 1,
        },
    )
    .unwrap()
    .0
    .model
    .text
    .num_hidden_layers;
    let (n, why) = auto(&ckpt, 1 << 40);
    assert_eq!(n, layers, "{why}");
    assert!(
        why.contains(&format!("{layers} of {layers} decoder layers")),
        "{why}"
    );
    let (n, why) = auto(&ckpt, 1 << 20);
    assert_eq!(n, 0);
    assert!(why.contains("usable"), "{why}");
}

/// A run's start-up check (`[runtime] memory_check`): refuses with the plan's numbers and what
/// to change when the config does not fit the device (here `memory_limit`), lets it through
/// when it fits, and only logs under "warn" or "off".
#[test]
fn run_memory_check_refuses_what_does_not_fit() {
    use crate::runtime::{MemoryCheck, Runtime};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/sft/qwen2.5-vl-7b.toml");
    let cfg = SftConfig::load(&root, &[]).unwrap();
    let rt = |check, limit| Runtime {
        memory_check: check,
        memory_limit: Some(limit),
        ..Runtime::cpu()
    };
    let plan = |o: &PlanOptions| input_from_sft(&cfg, o);
    let peak = worst_case(
        &plan(&PlanOptions {
            model_config: None,
            compute_bytes: 4,
            attention: AttentionImpl::Eager,
            max_pixels: None,
            images_per_row: None,
            world: 1,
        })
        .unwrap()
        .0,
    )
    .1
    .peak;
    let gib = GIB as u64;
    // Only when the machine has the RAM for the limits below (device_memory is capped by it).
    let room = rt(MemoryCheck::Refuse, u64::MAX)
        .device_memory()
        .unwrap_or(0);
    if room < 4 * gib {
        return;
    }
    let err = check_run_memory("this config", &rt(MemoryCheck::Refuse, 3 * gib), plan).unwrap_err();
    assert!(peak > 2 * gib);
    for want in [
        "this config needs",
        "2.00 GiB usable",
        "what each change gives",
        "memory_check = \"warn\"",
    ] {
        assert!(err.contains(want), "no {want:?} in {err}");
    }
    for check in [MemoryCheck::Warn, MemoryCheck::Off] {
        check_run_memory("this config", &rt(check, 3 * gib), plan).unwrap();
    }
    // A device with the room (the RAM permitting) is let through.
    if room > peak + gib {
        check_run_memory("this config", &rt(MemoryCheck::Refuse, peak + gib), plan).unwrap();
    }
    // A plan that cannot be made is not a refusal.
    check_run_memory("this config", &rt(MemoryCheck::Refuse, 3 * gib), |_| {
        Err("no config.json".to_string())
    })
    .unwrap();
}

/// The device running out of memory during a run becomes an exit-2 error with the device's
/// message, the plan's peak and what to change; any other error passes through as it was.
#[test]
fn out_of_memory_becomes_a_config_error_with_the_plan() {
    use crate::runtime::Runtime;
    use crate::TrainError;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/sft/qwen2.5-vl-7b.toml");
    let cfg = SftConfig::load(&root, &[]).unwrap();
    let rt = Runtime {
        memory_limit: Some(2 * GIB as u64),
        ..Runtime::cpu()
    };
    let plan = |o: &PlanOptions| input_from_sft(&cfg, o);
    let oom =
        candle_core::Error::Msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into());
    for e in [
        TrainError::Candle(oom),
        TrainError::Internal("CUBLAS_STATUS_ALLOC_FAILED".into()),
    ] {
        assert!(e.is_out_of_memory(), "{e}");
        let got = out_of_memory_error(e, &rt, plan);
        assert!(matches!(got, TrainError::OutOfMemory(_)), "{got}");
        assert_eq!(got.exit_code(), 2);
        let msg = got.to_string();
        for want in [
            "ran out of memory during training",
            "The plan for this config: peak",
            "what each change gives",
            "Checkpoints already committed are intact",
        ] {
            assert!(msg.contains(want), "no {want:?} in {msg}");
        }
    }
    let other = TrainError::Usage("data.sources: nothing".into());
    assert!(!other.is_out_of_memory());
    let got = out_of_memory_error(other, &rt, plan);
    assert!(matches!(got, TrainError::Usage(_)), "{got}");
    let io = TrainError::Io {
        path: "x".into(),
        source: std::io::Error::other("out of memory"),
    };
    assert!(!io.is_out_of_memory(), "file errors are not the device's");
}
