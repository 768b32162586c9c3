//! Global gradient norm: the CPU reference equals omr-train's optimizer (the grad norm its step
//! reports) bit for bit, and a candle composition within 1e-12; CUDA against the CPU within
//! 1e-12 relative (the f64 additions are reordered; f32 inputs squared exactly in f64).

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{accel, rand};
use omr_kernels::grad_norm::global_grad_norm;
use omr_train::optim::{AdamW, OptimConfig, ParamSpec};

fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![7, 13],
        vec![1],
        vec![300],
        vec![3, 5, 11],
        vec![70_000],
        vec![0],
    ]
}

#[test]
fn equals_the_optimizers_norm() -> anyhow::Result<()> {
    let grads: Vec<Tensor> = shapes()
        .iter()
        .enumerate()
        .map(|(i, s)| rand(20 + i as u64, s, 3.0, DType::F32))
        .collect::<Result<_>>()?;
    let ours: f64 = global_grad_norm(&grads)?.to_scalar()?;
    // The optimizer's norm: one parameter per gradient, loss Σ p·g so that dL/dp = g.
    let mut specs = Vec::new();
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for (i, g) in grads.iter().enumerate() {
        let var = Var::from_tensor(&g.zeros_like()?)?;
        loss = (loss + (var.as_tensor() * g)?.sum_all()?)?;
        specs.push(ParamSpec {
            name: format!("p{i}"),
            var,
            copy: None,
            lr: 0.0,
            weight_decay: 0.0,
        });
    }
    let cfg = OptimConfig {
        max_grad_norm: 0.0,
        ..OptimConfig::default()
    };
    let mut opt = AdamW::new(specs, &cfg)?;
    let outcome = opt.step(&loss.backward()?, 1.0, 1.0)?;
    let omr_train::optim::StepOutcome::Applied { grad_norm, .. } = outcome else {
        panic!("step not applied: {outcome:?}")
    };
    eprintln!("grad norm: ours {ours:.17e}, optimizer {grad_norm:.17e}");
    assert_eq!(ours.to_bits(), grad_norm.to_bits(), "not bit-identical");
    // An independent composition: f64 sqr → sum per tensor, stacked.
    let mut total = 0f64;
    for g in &grads {
        total += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    assert!((ours - total.sqrt()).abs() <= 1e-12 * total.sqrt());
    Ok(())
}

#[test]
fn bf16_and_empty() -> Result<()> {
    let g = rand(30, &[1000], 2.0, DType::BF16)?;
    let ours: f64 = global_grad_norm(std::slice::from_ref(&g))?.to_scalar()?;
    let want = g
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?
        .sqrt();
    assert!((ours - want).abs() <= 1e-12 * want, "{ours} vs {want}");
    assert_eq!(global_grad_norm(&[])?.to_scalar::<f64>()?, 0.0);
    Ok(())
}

#[test]
fn cuda_matches_cpu() -> Result<()> {
    for dev in accel() {
        for dtype in [DType::F32, DType::BF16] {
            let mut grads: Vec<Tensor> = shapes()
                .iter()
                .enumerate()
                .map(|(i, s)| rand(40 + i as u64, s, 3.0, dtype))
                .collect::<Result<_>>()?;
            grads.push(rand(50, &[3, 1 << 20], 1.0, dtype)?);
            let cpu: f64 = global_grad_norm(&grads)?.to_scalar()?;
            let on: Vec<Tensor> = grads
                .iter()
                .map(|g| g.to_device(&dev))
                .collect::<Result<_>>()?;
            let gpu: f64 = global_grad_norm(&on)?
                .to_device(&Device::Cpu)?
                .to_scalar()?;
            let rel = (gpu - cpu).abs() / cpu;
            eprintln!("grad norm {dtype:?} cuda vs cpu: rel err {rel:.3e} (tol 1e-12)");
            assert!(rel < 1e-12);
        }
    }
    Ok(())
}
