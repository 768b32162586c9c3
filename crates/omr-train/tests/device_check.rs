//! `device_check::model_checks` on the CPU: the comparisons `omr bench kernels` runs on a GPU
//! (device vs CPU reference) here compare the fused ops' CPU references and the fused
//! optimizer with candle ops. Every check must pass, the fused cases must really have run
//! fused ops, and the candle cases none.

use candle_core::Device;
use omr_train::device_check::{format, model_checks, TOL};

#[test]
fn model_checks_pass_on_the_cpu() {
    let checks = model_checks(&Device::Cpu).unwrap();
    println!("{}", format(&checks));
    // 2 shapes × 2 batches × 6 paths, two GRPO-head paths, two decoding paths, two LoRA paths
    // and one optimizer check per shape.
    assert_eq!(checks.len(), 38);
    assert_eq!(
        checks
            .iter()
            .filter(|c| c.name.contains("decoding over the cache"))
            .count(),
        4
    );
    assert_eq!(
        checks
            .iter()
            .filter(|c| c.name.contains("GRPO token log-probs"))
            .count(),
        4
    );
    assert_eq!(
        checks
            .iter()
            .filter(|c| c.name.contains("attention recomputed"))
            .count(),
        4
    );
    assert_eq!(
        checks.iter().filter(|c| c.name.contains("one op")).count(),
        10
    );
    assert_eq!(checks.iter().filter(|c| c.name.contains("LoRA")).count(), 4);
    for c in &checks {
        assert!(c.ok(), "{c:?} (tolerance {TOL})");
        if c.name.contains("candle ops") {
            assert_eq!(c.fused_ops, 0, "{c:?}");
            // Same device, same ops: the candle path must reproduce the reference exactly.
            assert_eq!((c.loss_err, c.grad_err), (0.0, 0.0), "{c:?}");
        } else {
            assert!(c.fused_ops > 0, "{c:?}");
        }
        if c.name.contains("fused") && !c.name.contains("AdamW") {
            // Different summation order: close, but not the same bits.
            assert!(c.grad_err > 0.0, "{c:?}");
        }
    }
}
