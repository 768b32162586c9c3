//! The CUDA-vs-CPU check pass of `omr bench kernels`, run CPU against CPU: every comparison
//! runs (all ops, both dtypes, values and gradients) and reports error 0, since the same
//! reference computes both sides.

use candle_core::{Device, Result};
use omr_kernels::check::{check_all, compare_on, format};

#[test]
fn cpu_against_itself_is_exact() -> Result<()> {
    assert!(
        check_all(&Device::Cpu)?.is_empty(),
        "no CUDA-vs-CPU checks on the CPU"
    );
    let checks = compare_on(&Device::Cpu)?;
    eprintln!("{}", format(&checks));
    assert!(checks.len() > 40, "{} checks", checks.len());
    for c in &checks {
        assert_eq!(c.err, 0.0, "{}: {}", c.name, c.err);
    }
    Ok(())
}
