//! Gradient accumulation: `grad_sum` equals candle's `a.to_dtype(F32) + b.to_dtype(F32)` bit
//! for bit for every dtype pair (with signed zeros, infinities and subnormal-sized values among
//! the inputs), and on a CUDA device the kernel and the add in place equal the CPU reference
//! bit for bit; shape, dtype and device mistakes are errors that name the op.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{accel, bits, rand};
use omr_kernels::grad_accum::{grad_add_in_place, grad_sum, sum_ref};

/// Candle's sum of the two, as omr-train's candle-op accumulator computes it.
fn candle_sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.to_dtype(DType::F32)?.add(&b.to_dtype(DType::F32)?)
}

/// Random values with a few edge cases written in: ±0, ∞, tiny and huge magnitudes.
fn inputs(seed: u64, shape: &[usize]) -> Result<Tensor> {
    let mut v: Vec<f32> = rand(seed, shape, 1.0, DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let edges = [0.0, -0.0, f32::INFINITY, 1e-39, -3e38, 3e38, 1e-30];
    for (i, e) in edges.iter().enumerate() {
        v[i * 3 + seed as usize % 3] = *e;
    }
    Tensor::from_vec(v, shape, &Device::Cpu)
}

#[test]
fn sum_is_candles_bit_for_bit_for_every_dtype_pair() -> anyhow::Result<()> {
    let shape = [37, 29];
    let (a32, b32) = (inputs(1, &shape)?, inputs(2, &shape)?);
    let pairs = [DType::F32, DType::BF16]
        .into_iter()
        .flat_map(|x| [DType::F32, DType::BF16].map(|y| (x, y)));
    for (da, db) in pairs {
        let (a, b) = (a32.to_dtype(da)?, b32.to_dtype(db)?);
        let want = bits(&candle_sum(&a, &b)?)?;
        let got = grad_sum(&a, &b)?;
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(got.dims(), &shape);
        assert_eq!(bits(&got)?, want, "{da:?} + {db:?}");
        // The reference itself, on f32 values.
        let fa: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let fb: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let r: Vec<u32> = sum_ref(&fa, &fb).into_iter().map(f32::to_bits).collect();
        assert_eq!(r, want, "reference {da:?} + {db:?}");
        for dev in accel() {
            let (ad, bd) = (a.to_device(&dev)?, b.to_device(&dev)?);
            assert_eq!(bits(&grad_sum(&ad, &bd)?)?, want, "cuda {da:?} + {db:?}");
            // Three micro-batches as the accumulator does them on a GPU: sum, then in place.
            let s = grad_sum(&ad, &bd)?;
            grad_add_in_place(&s, &bd)?;
            let want3 = bits(&candle_sum(&candle_sum(&a, &b)?, &b)?)?;
            assert_eq!(bits(&s)?, want3, "cuda in place {da:?} + {db:?}");
        }
    }
    Ok(())
}

#[test]
fn empty_and_strided_inputs() -> anyhow::Result<()> {
    let e = Tensor::zeros((0, 5), DType::BF16, &Device::Cpu)?;
    assert_eq!(grad_sum(&e, &e)?.dims(), &[0, 5]);
    // A transposed (non-contiguous) gradient reads by its layout.
    let a = rand(3, &[6, 4], 1.0, DType::F32)?;
    let b = rand(4, &[4, 6], 1.0, DType::BF16)?.t()?;
    assert_eq!(bits(&grad_sum(&a, &b)?)?, bits(&candle_sum(&a, &b)?)?);
    for dev in accel() {
        let (ad, bd) = (a.to_device(&dev)?, b.to_device(&dev)?);
        assert_eq!(bits(&grad_sum(&ad, &bd)?)?, bits(&candle_sum(&a, &b)?)?);
        let ed = e.to_device(&dev)?.to_dtype(DType::F32)?;
        grad_add_in_place(&ed, &ed)?;
    }
    Ok(())
}

#[test]
fn mistakes_are_errors_naming_the_op() -> anyhow::Result<()> {
    let a = rand(5, &[3, 4], 1.0, DType::F32)?;
    let b = rand(6, &[4, 3], 1.0, DType::F32)?;
    let err = grad_sum(&a, &b).unwrap_err().to_string();
    assert!(err.contains("grad_sum") && err.contains("differ"), "{err}");
    let err = grad_sum(&a, &a.to_dtype(DType::F64)?)
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad_sum") && err.contains("F64"), "{err}");
    let err = grad_add_in_place(&a.to_dtype(DType::BF16)?, &a)
        .unwrap_err()
        .to_string();
    assert!(err.contains("contiguous f32"), "{err}");
    // CPU tensors cannot be written in place: the error says to use grad_sum.
    let err = grad_add_in_place(&a, &a).unwrap_err().to_string();
    assert!(err.contains("CUDA tensors only"), "{err}");
    Ok(())
}
