//! The optimizer's device check: two AdamW steps from the reference gradients, candle ops on
//! the CPU against the fused accumulation and update on the device.

use super::{dev_name, flat, internal, rel, ModelCheck, Run};
use crate::optim::{param_specs, AdamW, OptimConfig};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use omr_model::Params;

/// Two AdamW steps from the same gradients (the reference's; the second step accumulates them
/// over three micro-batches): candle ops on the CPU against the fused accumulation and update
/// on `dev` (fused on every device, so the CPU run checks the fused
/// references). Compared by parameter deltas.
pub(super) fn optimizer_check(
    shape: &str,
    reference: &Run,
    cpu_params: &Params,
    dev_params: &Params,
    dev: &Device,
) -> crate::Result<ModelCheck> {
    let optim = OptimConfig {
        lr: 1e-3,
        weight_decay: 0.1,
        max_grad_norm: 0.5,
        ..OptimConfig::default()
    };
    // Fresh copies: the model checks above must not see stepped parameters.
    let copy = |p: &Params| -> crate::Result<Vec<(String, candle_core::Var)>> {
        p.trainable()
            .map(|(n, v)| {
                Ok((
                    n.to_string(),
                    candle_core::Var::from_tensor(&v.as_tensor().copy()?)?,
                ))
            })
            .collect()
    };
    let (cpu_vars, dev_vars) = (copy(cpu_params)?, copy(dev_params)?);
    let before: Vec<Vec<f32>> = cpu_vars
        .iter()
        .map(|(_, v)| flat(v.as_tensor()))
        .collect::<candle_core::Result<_>>()?;
    let mut cpu_opt =
        AdamW::new(param_specs(cpu_vars.clone(), &optim), &optim).map_err(internal)?;
    cpu_opt.set_fused(false);
    let mut dev_opt =
        AdamW::new(param_specs(dev_vars.clone(), &optim), &optim).map_err(internal)?;
    dev_opt.set_fused(true);
    // The reference's GradStore, keyed by the copies.
    let mut cpu_store = GradStore::default();
    let mut dev_store = GradStore::default();
    for ((_, g), ((_, cv), (_, dv))) in reference.grads.iter().zip(cpu_vars.iter().zip(&dev_vars)) {
        if g.is_empty() {
            continue;
        }
        let t = Tensor::from_slice(g, cv.shape(), &Device::Cpu)?;
        cpu_store.insert(cv.as_tensor(), t.clone());
        dev_store.insert(dv.as_tensor(), t.to_device(dev)?);
    }
    cpu_opt.step(&cpu_store, 1.0, 1.0).map_err(internal)?;
    dev_opt.step(&dev_store, 1.0, 1.0).map_err(internal)?;
    // The second step on three accumulated micro-batches: a new f32 sum, then one added in
    // place (on CUDA) by the fused accumulator.
    let mut cpu_acc = cpu_opt.grad_accum();
    let mut dev_acc = dev_opt.grad_accum();
    for _ in 0..3 {
        cpu_acc.add(&cpu_store).map_err(internal)?;
        dev_acc.add(&dev_store).map_err(internal)?;
    }
    cpu_opt
        .step_accumulated(&mut cpu_acc, 1.0, 1.0 / 3.0)
        .map_err(internal)?;
    let fused_adds = dev_acc.fused_adds();
    dev_opt
        .step_accumulated(&mut dev_acc, 1.0, 1.0 / 3.0)
        .map_err(internal)?;
    let mut worst = (0.0f64, String::from("-"));
    for (((name, cv), (_, dv)), b) in cpu_vars.iter().zip(&dev_vars).zip(&before) {
        let dc: Vec<f32> = flat(cv.as_tensor())?
            .iter()
            .zip(b)
            .map(|(x, y)| x - y)
            .collect();
        let dd: Vec<f32> = flat(dv.as_tensor())?
            .iter()
            .zip(b)
            .map(|(x, y)| x - y)
            .collect();
        let e = rel(&dd, &dc);
        if e.is_nan() || e > worst.0 {
            worst = (e, name.clone());
        }
    }
    Ok(ModelCheck {
        name: format!(
            "{shape}: 2 AdamW steps (1 + 3 micro-batches), {} fused vs the cpu reference update",
            dev_name(dev)
        ),
        loss_err: 0.0,
        grad_err: worst.0,
        worst: worst.1,
        fused_ops: (dev_opt.fused_calls() + fused_adds) as usize,
    })
}
