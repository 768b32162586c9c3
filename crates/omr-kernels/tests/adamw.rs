//! Fused AdamW: the CPU reference (and on a CUDA device the kernel) equals omr-train's AdamW
//! bit for bit over several steps (weights, both moments), with decay, bias correction, a
//! gradient scale, clipping and a parameter without a gradient; the bf16 copy is the rounded
//! master.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{accel, bits, rand};
use omr_kernels::adamw::{adamw_step, AdamWHyper};
use omr_train::optim::{AdamW, OptimConfig, ParamSpec, StepOutcome};

/// Runs `steps` steps of omr-train's AdamW and of the fused op on `dev` side by side.
fn compare(dev: &Device, steps: usize) -> anyhow::Result<()> {
    let cfg = OptimConfig {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        max_grad_norm: 0.5,
        ..OptimConfig::default()
    };
    let shapes = [vec![17, 9], vec![64], vec![5]];
    let decay = [0.1, 0.0, 0.1];
    let mut specs = Vec::new();
    let mut ours = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let p0 = rand(60 + i as u64, s, 1.0, DType::F32)?;
        specs.push(ParamSpec {
            name: format!("p{i}"),
            var: Var::from_tensor(&p0)?,
            copy: None,
            lr: cfg.lr,
            weight_decay: decay[i],
        });
        let p = p0.to_device(dev)?;
        ours.push((p.clone(), p.zeros_like()?, p.zeros_like()?));
    }
    let vars: Vec<Var> = specs.iter().map(|s| s.var.clone()).collect();
    let mut opt = AdamW::new(specs, &cfg)?;
    let (lr_factor, grad_scale) = (0.7, 0.25);
    for step in 1..=steps {
        // Parameter 2 gets no gradient on even steps (the optimizer uses zeros).
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu)?;
        let mut grads = Vec::new();
        for (i, v) in vars.iter().enumerate() {
            let g = rand(100 * step as u64 + i as u64, v.dims(), 2.0, DType::F32)?;
            if i == 2 && step % 2 == 0 {
                grads.push(None);
                continue;
            }
            loss = (loss + (v.as_tensor() * &g)?.sum_all()?)?;
            grads.push(Some(g));
        }
        let StepOutcome::Applied { grad_norm, clipped } =
            opt.step(&loss.backward()?, lr_factor, grad_scale)?
        else {
            panic!("non-finite")
        };
        assert!(clipped, "the test means to exercise clipping");
        // The coefficient exactly as the optimizer forms it.
        let mut coef = grad_scale;
        let clip = cfg.max_grad_norm / (grad_norm + 1e-6);
        if clip < 1.0 {
            coef *= clip;
        }
        for (i, (p, m, v)) in ours.iter_mut().enumerate() {
            let h = AdamWHyper {
                lr: cfg.lr * lr_factor,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: decay[i],
                step: step as u64,
                grad_coef: coef,
            };
            let g = grads[i].as_ref().map(|g| g.to_device(dev)).transpose()?;
            let out = adamw_step(p, m, v, g.as_ref(), &h)?;
            assert_eq!(
                bits(&out.p_bf16.to_dtype(DType::F32)?)?,
                bits(&out.p.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)?
            );
            (*p, *m, *v) = (out.p, out.m, out.v);
        }
        let state: std::collections::HashMap<String, Tensor> =
            opt.state_tensors().into_iter().collect();
        for (i, (p, m, v)) in ours.iter().enumerate() {
            assert_eq!(
                bits(p)?,
                bits(vars[i].as_tensor())?,
                "step {step} param {i}: weights differ"
            );
            assert_eq!(
                bits(m)?,
                bits(&state[&format!("exp_avg.p{i}")])?,
                "step {step} param {i}: exp_avg"
            );
            assert_eq!(
                bits(v)?,
                bits(&state[&format!("exp_avg_sq.p{i}")])?,
                "step {step} param {i}: exp_avg_sq"
            );
        }
    }
    eprintln!("adamw on {dev:?}: {steps} steps bit-identical to omr-train's AdamW");
    Ok(())
}

#[test]
fn bit_identical_to_omr_train_adamw() -> anyhow::Result<()> {
    compare(&Device::Cpu, 4)
}

#[test]
fn bf16_gradient_is_read_exactly() -> Result<()> {
    let p = rand(70, &[50], 1.0, DType::F32)?;
    let g = rand(71, &[50], 1.0, DType::BF16)?;
    let h = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_coef: 1.0,
    };
    let (m, v) = (p.zeros_like()?, p.zeros_like()?);
    let a = adamw_step(&p, &m, &v, Some(&g), &h)?;
    let b = adamw_step(&p, &m, &v, Some(&g.to_dtype(DType::F32)?), &h)?;
    assert_eq!(bits(&a.p)?, bits(&b.p)?);
    Ok(())
}

#[test]
fn cuda_bit_identical() -> anyhow::Result<()> {
    for dev in accel() {
        compare(&dev, 4)?;
    }
    Ok(())
}
