//! Other ways to compute the same training step: activation checkpointing (with kept
//! attentions and kept layers) trains the same bits as the plain backward, and bf16 mixed
//! precision tracks fp32 and resumes bit-identically.

use super::*;

/// `train.activation_checkpointing = "all"` recomputes every block in backward and must train
/// exactly the same model: same records, weights and moments, bit for bit (untied
/// embeddings: a tied one sums its two gradients in another order, equal to ~1e-7).
#[test]
fn activation_checkpointing_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, ckpt) = (tmp.path().join("plain"), tmp.path().join("ckpt"));
    let untied = "model.tiny.tie_word_embeddings=false";
    sft_ok(&plain, &[untied, "train.max_steps=4"]);
    sft_ok(
        &ckpt,
        &[
            untied,
            "train.max_steps=4",
            "train.activation_checkpointing=\"all\"",
        ],
    );
    assert_same_run(&plain, &ckpt, 4);
    // The fused kernels' CPU references, the attentions kept for the recompute and the last
    // decoder layer not recomputed: the same run as the fused run without checkpointing.
    let (fused, kept) = (tmp.path().join("fused"), tmp.path().join("kept"));
    let fused_kernels = "runtime.kernels=\"fused\"";
    sft_ok(&fused, &[untied, "train.max_steps=4", fused_kernels]);
    sft_ok(
        &kept,
        &[
            untied,
            "train.max_steps=4",
            fused_kernels,
            "train.activation_checkpointing=\"all\"",
            "train.kept_decoder_layers=1",
        ],
    );
    assert_same_run(&fused, &kept, 4);
    // "auto": as many layers as the plan finds room for in the machine's available RAM (all
    // of the tiny model's), said in the log; the same run again.
    let auto = tmp.path().join("auto");
    let out = Command::new(env!("CARGO_BIN_EXE_omr"))
        .args(sft_args(
            &auto,
            &[
                untied,
                "train.max_steps=4",
                fused_kernels,
                "train.activation_checkpointing=\"all\"",
                "train.kept_decoder_layers=\"auto\"",
            ],
        ))
        .env("OMR_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let said = log
        .split("kept_decoder_layers = \"auto\": ")
        .nth(1)
        .and_then(|r| r.split(" decoder layers not recomputed").next())
        .unwrap_or_else(|| panic!("no auto line: {log}"));
    let (n, of) = said.split_once(" of ").unwrap();
    assert!(n == of && n != "0", "{said}");
    assert_same_run(&fused, &auto, 4);
}

/// `runtime.precision = "bf16"` on the CPU: bf16 compute on fp32 masters. Its losses track
/// the fp32 run's (same weights and data; bf16 rounds activations to 8 bits of mantissa, so
/// within 2% per step), the model learns, checkpoints keep fp32 masters, and a stopped and
/// resumed bf16 run is bit-identical to the uninterrupted one.
#[test]
fn bf16_mixed_precision_tracks_fp32_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let bf16_run = tmp.path().join("bf16");
    let bf16 = &["runtime.precision=\"bf16\"", "train.max_steps=6"];
    sft_ok(&bf16_run, bf16);
    let losses = |run: &Path| -> Vec<f64> {
        metrics(run)
            .iter()
            .filter_map(|r| field(r, "train/loss").map(|v| v.parse::<f64>().unwrap()))
            .collect()
    };
    let (half, full) = (losses(&bf16_run), losses(reference()));
    assert_eq!(half.len(), 6);
    for (step, (h, f)) in half.iter().zip(&full).enumerate() {
        let rel = (h - f).abs() / f;
        assert!(
            rel < 0.02,
            "step {}: bf16 loss {h} vs fp32 {f} ({rel:.3})",
            step + 1
        );
    }
    assert_ne!(
        half[..],
        full[..6],
        "bf16 losses equal the fp32 ones: bf16 did not run"
    );
    assert!(half[5] < half[0], "bf16 run does not learn: {half:?}");
    let config = fs::read_to_string(bf16_run.join("config.toml")).unwrap();
    assert!(config.contains("precision = \"bf16\""), "{config}");
    // The checkpoint holds fp32 masters.
    let model = ckpt(&bf16_run, 6).join("weights.safetensors");
    let bytes = fs::read(&model).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        assert_eq!(
            view.dtype(),
            safetensors::Dtype::F32,
            "{name} in {}",
            model.display()
        );
    }
    stop_and_resume(&bf16_run, bf16, 3, 3, None, 6);
}
