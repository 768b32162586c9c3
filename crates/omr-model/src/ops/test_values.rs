//! Seeded test values and exact comparisons for the ops' tests.

use candle_core::{DType, Device, Result, Tensor};

/// splitmix64's finaliser: every input bit reaches every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seeded values in [−1, 1] (steps of 1/1000); different seeds give unrelated values.
pub fn rand(seed: u64, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|k| {
            let h = mix(mix(seed.wrapping_add(0x9E37_79B9_7F4A_7C15)) ^ k);
            (h % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// The elements' f32 bits, −0 as +0.
pub fn bits(t: &Tensor) -> Result<Vec<u32>> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().map(|x| (x + 0.0).to_bits()).collect())
}

/// Each argument's gradient in `got` against `want`: for a tensor that tracks an op, present
/// in both with its shape, its dtype and the same bits; for one that does not, absent from
/// `got`.
pub fn assert_same_grads<S: AsRef<str>>(
    what: &str,
    got: &candle_core::backprop::GradStore,
    want: &candle_core::backprop::GradStore,
    args: &[(S, &Tensor)],
) -> Result<()> {
    for (name, t) in args {
        let name = name.as_ref();
        match (got.get(t), want.get(t), t.track_op()) {
            (Some(a), Some(b), true) => {
                assert_eq!(a.dims(), t.dims(), "{what}: d{name} shape");
                assert_eq!(a.dtype(), t.dtype(), "{what}: d{name} dtype");
                assert_eq!(bits(a)?, bits(b)?, "{what}: d{name}")
            }
            (None, _, false) => {}
            _ => panic!("{what}: d{name} missing or extra"),
        }
    }
    Ok(())
}

#[test]
fn seeds_give_different_values() -> Result<()> {
    let (a, b) = (rand(2, &[64])?, rand(3, &[64])?);
    let same = bits(&a)?
        .iter()
        .zip(bits(&b)?)
        .filter(|(x, y)| **x == *y)
        .count();
    assert!(same < 8, "{same} of 64 equal");
    Ok(())
}
