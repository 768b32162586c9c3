//! The benchmark runs end to end on the CPU (the smoke test of `omr bench kernels`): every
//! kernel gets a row with a positive finite time, a floor, and an achieved rate.

use candle_core::{Device, Result};
use omr_kernels::bench::{format, run_all};

#[test]
fn runs_on_cpu() -> Result<()> {
    let (c, rows) = run_all(&Device::Cpu)?;
    let table = format(&Device::Cpu, &c, &rows);
    eprintln!("{table}");
    assert!(c.bandwidth > 0.0 && c.flops > 0.0);
    assert_eq!(
        rows.len(),
        20,
        "one row per timed kernel (SwiGLU: forward, backward, backward with the activation; the CE tile kernels; linear CE: trained and frozen head; linear logp; attention: kernel and gemm; a decoding step, split and not)"
    );
    assert!(rows
        .iter()
        .any(|r| r.name == "attn decode step (cache view)"));
    assert!(rows.iter().any(|r| r.name == "grad accumulate"));
    assert!(rows.iter().any(|r| r.name == "swiglu bwd+act"));
    assert!(rows.iter().any(|r| r.name == "ce tile stats"));
    assert!(rows.iter().any(|r| r.name == "ce tile grad"));
    assert!(rows
        .iter()
        .any(|r| r.name == "linear CE fwd+dH (frozen head)"));
    assert!(rows.iter().any(|r| r.name == "linear logp fwd+bwd (GRPO)"));
    for r in &rows {
        assert!(
            r.secs.is_finite() && r.secs > 0.0,
            "{}: time {}",
            r.name,
            r.secs
        );
        assert!(
            r.floor_secs > 0.0 && r.bytes > 0.0,
            "{}: floor {}",
            r.name,
            r.floor_secs
        );
    }
    assert!(
        table.contains("attn kernel fwd+bwd")
            && table.contains("attn gemm fwd+bwd")
            && table.contains("FLOP/s")
            && table.contains("B/s")
    );
    Ok(())
}
