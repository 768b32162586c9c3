//! Shared by the op tests: seeded random tensors, the devices to run on (the CPU always; the
//! first CUDA device too when built with `--features cuda` and one is present), and the error
//! measure every tolerance is written in.

#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Uniform values in [-scale, scale) from `seed`, as a tensor of `dtype` on the CPU.
pub fn rand(seed: u64, shape: &[usize], scale: f32, dtype: DType) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// An f32 tensor's elements as bits, in row-major order (copied to the host): for the ops
/// that must match their reference exactly.
pub fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

/// The devices besides the CPU to compare against the CPU reference: the first CUDA device
/// when the crate is built with `cuda` and a device answers; none otherwise (said on stderr).
pub fn accel() -> Vec<Device> {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return vec![d];
    }
    eprintln!("note: no CUDA device in this build/machine; CUDA-vs-CPU comparisons skipped");
    vec![]
}

/// max |a − b| / max |b| over all elements (b the reference), computed in f64. Finite only if
/// both are finite; a NaN anywhere gives NaN, which fails every `<` check.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f64> = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let b: Vec<f64> = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(&b) {
        let d = (x - y).abs();
        if !d.is_finite() {
            return Ok(f64::NAN);
        }
        worst = worst.max(d);
    }
    Ok(worst / scale)
}

/// Asserts `rel_err(a, b) < tol`, printing the measured value either way.
pub fn check(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    let e = rel_err(a, b)?;
    eprintln!("{what}: max rel err {e:.3e} (tol {tol:.0e})");
    assert!(
        e < tol,
        "{what}: max rel err {e:.3e} is not below {tol:.0e}"
    );
    Ok(())
}
