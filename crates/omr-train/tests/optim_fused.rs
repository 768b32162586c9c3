//! The optimizer's fused path (omr-kernels' `adamw_step` + `global_grad_norm`) against its
//! candle-op path, from the same init and gradients: on the CPU the weights, both moments, the
//! step count and the reported gradient norm are the same bits after every step, through
//! accumulated micro-batches, clipped and unclipped steps, per-part learning rates, weight decay
//! on matrices only, a parameter without a gradient, an empty parameter and a non-finite step;
//! a checkpoint written on either path resumes on the other; and the fused path is taken when
//! asked (its call counter), not by default on the CPU. With the `cuda` feature and a GPU, the
//! fused path on CUDA (the default there) equals the CPU candle path bit for bit.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use omr_train::optim::{param_specs, AdamW, OptimConfig, StepOutcome};
use std::collections::HashMap;

/// Embedding, bias and norm do not decay; the matrices do; vision and merger have their own lr.
const PARAMS: &[(&str, &[usize])] = &[
    ("model.embed_tokens.weight", &[11, 6]),
    ("model.layers.0.mlp.up_proj.weight", &[13, 6]),
    ("model.layers.0.self_attn.q_proj.bias", &[13]),
    ("model.layers.0.input_layernorm.weight", &[6]),
    ("model.layers.0.mlp.down_proj.weight", &[0, 13]),
    ("visual.blocks.0.attn.qkv.weight", &[9, 5]),
    ("visual.merger.mlp.0.weight", &[4, 7]),
];
const NON_EMPTY: u64 = 6;
const STEPS: usize = 10;
/// Gradient magnitude per step: the global norm is ~0.2× (unclipped) to ~60× (clipped) the max.
const SCALE: [f32; STEPS] = [0.02, 3.0, 0.01, 7.0, 1.0, 0.05, 2.0, 0.03, 0.5, 4.0];
/// This step has a NaN gradient element: skipped on both paths.
const NAN_STEP: usize = 4;
/// Three: the fused accumulator makes a new f32 sum at the second and (on CUDA) adds in place
/// at the third.
const MICRO: usize = 3;

fn cfg() -> OptimConfig {
    OptimConfig {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        max_grad_norm: 1.0,
        lr_vision: Some(1e-3),
        lr_merger: Some(2e-3),
        ..OptimConfig::default()
    }
}

/// Deterministic values in [-scale, scale) (splitmix64).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn build(dev: &Device) -> anyhow::Result<(AdamW, Vec<(String, Var)>)> {
    let mut params = Vec::new();
    for (i, (name, shape)) in PARAMS.iter().enumerate() {
        let n = shape.iter().product();
        let t = Tensor::from_vec(values(i as u64 + 1, n, 1.0), *shape, dev)?;
        params.push((name.to_string(), Var::from_tensor(&t)?));
    }
    let opt = AdamW::new(param_specs(params.clone(), &cfg()), &cfg())?;
    Ok((opt, params))
}

/// One micro-batch's gradients. The merger has none on every third step, the bias only in the
/// first micro-batch of odd steps; the norm's are tiny, so that `eps` counts in its update.
fn grads(params: &[(String, Var)], step: usize, micro: usize) -> anyhow::Result<GradStore> {
    let mut store = GradStore::default();
    for (i, (name, var)) in params.iter().enumerate() {
        if (name.starts_with("visual.merger.") && step % 3 == 2)
            || (name.ends_with(".bias") && (micro > 0 || step.is_multiple_of(2)))
        {
            continue;
        }
        let seed = 1000 * step as u64 + 100 * micro as u64 + i as u64;
        let scale = SCALE[step]
            * if name.contains("layernorm") {
                1e-6
            } else {
                1.0
            };
        let mut g = values(seed, var.elem_count(), scale);
        if step == NAN_STEP && micro == 1 && name.contains("up_proj") {
            g[5] = f32::NAN;
        }
        store.insert(
            var.as_tensor(),
            Tensor::from_vec(g, var.dims(), var.device())?,
        );
    }
    Ok(store)
}

/// One optimizer step on `MICRO` accumulated micro-batches with a decaying schedule factor.
fn step(opt: &mut AdamW, params: &[(String, Var)], step: usize) -> anyhow::Result<StepOutcome> {
    let mut acc = opt.grad_accum();
    for micro in 0..MICRO {
        acc.add(&grads(params, step, micro)?)?;
    }
    let lr_factor = 1.0 - 0.08 * step as f64;
    Ok(opt.step_accumulated(&mut acc, lr_factor, 1.0 / MICRO as f64)?)
}

fn bits(t: &Tensor) -> anyhow::Result<Vec<u32>> {
    let v: Vec<f32> = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    Ok(v.into_iter().map(f32::to_bits).collect())
}

/// Every weight and moment as bits, by name, and the step count.
fn snapshot(
    opt: &AdamW,
    params: &[(String, Var)],
) -> anyhow::Result<(HashMap<String, Vec<u32>>, u64)> {
    let mut out = HashMap::new();
    for (name, var) in params {
        out.insert(name.clone(), bits(var.as_tensor())?);
    }
    for (name, t) in opt.state_tensors() {
        out.insert(name, bits(&t)?);
    }
    Ok((out, opt.steps()))
}

/// Panics naming the first weight or moment whose bits differ.
fn assert_same(
    (a, ta): &(HashMap<String, Vec<u32>>, u64),
    (b, tb): &(HashMap<String, Vec<u32>>, u64),
    what: &str,
) {
    assert_eq!(ta, tb, "{what}: step counts");
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    for k in keys {
        assert!(a.get(k) == b.get(k), "{what}: `{k}` differs");
    }
}

/// Runs both optimizers side by side, asserting the same bits and outcome after every step.
/// Returns (applied, clipped) counts.
fn lockstep(
    (a, pa): (&mut AdamW, &[(String, Var)]),
    (b, pb): (&mut AdamW, &[(String, Var)]),
) -> anyhow::Result<(usize, usize)> {
    let (mut applied, mut clipped) = (0, 0);
    for s in 0..STEPS {
        let before = snapshot(a, pa)?;
        let (oa, ob) = (step(a, pa, s)?, step(b, pb, s)?);
        match (oa, ob) {
            (
                StepOutcome::Applied {
                    grad_norm: na,
                    clipped: ca,
                },
                StepOutcome::Applied {
                    grad_norm: nb,
                    clipped: cb,
                },
            ) => {
                assert_eq!(
                    na.to_bits(),
                    nb.to_bits(),
                    "step {s}: grad norm {na} vs {nb}"
                );
                assert_eq!(ca, cb, "step {s}: clipped");
                applied += 1;
                clipped += ca as usize;
            }
            (
                StepOutcome::NonFinite { grad_norm: na },
                StepOutcome::NonFinite { grad_norm: nb },
            ) => {
                assert!(na.is_nan() && nb.is_nan(), "step {s}: {na} {nb}");
                assert_same(&snapshot(a, pa)?, &before, &format!("skipped step {s}"));
            }
            other => panic!("step {s}: outcomes differ: {other:?}"),
        }
        assert_same(&snapshot(a, pa)?, &snapshot(b, pb)?, &format!("step {s}"));
    }
    Ok((applied, clipped))
}

#[test]
fn fused_equals_candle_ops_bit_for_bit_on_cpu() -> anyhow::Result<()> {
    let (mut plain, pp) = build(&Device::Cpu)?;
    let (mut fused, pf) = build(&Device::Cpu)?;
    fused.set_fused(true);
    let (applied, clipped) = lockstep((&mut fused, &pf), (&mut plain, &pp))?;
    assert_eq!(applied, STEPS - 1);
    assert!(
        clipped > 0 && clipped < applied,
        "{clipped} of {applied} clipped"
    );
    assert_eq!(fused.steps(), applied as u64);
    // Each step one norm, each applied step one update per non-empty parameter.
    assert_eq!(
        fused.fused_calls(),
        STEPS as u64 + applied as u64 * NON_EMPTY
    );
    assert_eq!(plain.fused_calls(), 0);
    Ok(())
}

#[test]
fn fused_is_opt_in_on_cpu() -> anyhow::Result<()> {
    assert!(!AdamW::fused_default(&Device::Cpu));
    let (mut opt, params) = build(&Device::Cpu)?;
    assert!(!opt.is_fused());
    step(&mut opt, &params, 0)?;
    assert_eq!(opt.fused_calls(), 0);
    opt.set_fused(true);
    assert!(opt.is_fused());
    step(&mut opt, &params, 1)?;
    assert_eq!(opt.fused_calls(), 1 + NON_EMPTY);
    Ok(())
}

/// The accumulator of a fused optimizer sums with omr-kernels' ops (per parameter, every
/// micro-batch after its first gradient), a plain one with candle ops; the lockstep test above
/// shows both give the same bits.
#[test]
fn fused_accumulator_sums_with_the_fused_ops() -> anyhow::Result<()> {
    let (mut opt, params) = build(&Device::Cpu)?;
    let sum = |opt: &AdamW| -> anyhow::Result<u64> {
        let mut acc = opt.grad_accum();
        for micro in 0..MICRO {
            acc.add(&grads(&params, 0, micro)?)?;
        }
        Ok(acc.fused_adds())
    };
    assert_eq!(sum(&opt)?, 0);
    opt.set_fused(true);
    // Step 0: every parameter but the bias has a gradient in each micro-batch.
    assert_eq!(sum(&opt)?, (PARAMS.len() as u64 - 1) * (MICRO as u64 - 1));
    Ok(())
}

/// A checkpoint (weights + `optimizer.safetensors` + step count, as `snapshot::commit` writes
/// them) from one path resumes on the other and continues as if never stopped.
#[test]
fn checkpoints_resume_across_paths() -> anyhow::Result<()> {
    const STOP: usize = 6;
    let dir = tempfile::tempdir()?;
    for first_fused in [true, false] {
        let (mut whole, pw) = build(&Device::Cpu)?;
        whole.set_fused(first_fused);
        for s in 0..STEPS {
            step(&mut whole, &pw, s)?;
        }

        let (mut first, p1) = build(&Device::Cpu)?;
        first.set_fused(first_fused);
        for s in 0..STOP {
            step(&mut first, &p1, s)?;
        }
        let weights: HashMap<String, Tensor> = p1
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let moments: HashMap<String, Tensor> = first.state_tensors().into_iter().collect();
        candle_core::safetensors::save(&weights, dir.path().join("weights.safetensors"))?;
        candle_core::safetensors::save(&moments, dir.path().join("optimizer.safetensors"))?;

        let (mut second, p2) = build(&Device::Cpu)?;
        second.set_fused(!first_fused);
        let weights =
            candle_core::safetensors::load(dir.path().join("weights.safetensors"), &Device::Cpu)?;
        for (name, var) in &p2 {
            var.set(&weights[name])?;
        }
        let moments =
            candle_core::safetensors::load(dir.path().join("optimizer.safetensors"), &Device::Cpu)?;
        second.load_state(&moments, first.steps())?;
        for s in STOP..STEPS {
            step(&mut second, &p2, s)?;
        }
        let what = format!("saved fused={first_fused}, resumed on the other path");
        assert_same(&snapshot(&second, &p2)?, &snapshot(&whole, &pw)?, &what);
        let (fused, plain) = if first_fused {
            (&first, &second)
        } else {
            (&second, &first)
        };
        assert!(fused.fused_calls() > 0 && plain.fused_calls() == 0);
    }
    Ok(())
}

/// On a GPU the fused path is the default and equals the CPU candle path bit for bit (the
/// CUDA norm to f64 rounding: it sums in another order).
#[cfg(feature = "cuda")]
#[test]
fn cuda_fused_equals_cpu_candle_ops() -> anyhow::Result<()> {
    let Ok(dev) = Device::new_cuda(0) else {
        eprintln!("no CUDA device: skipped");
        return Ok(());
    };
    assert!(AdamW::fused_default(&dev));
    let (mut gpu, pg) = build(&dev)?;
    assert!(gpu.is_fused());
    let (mut cpu, pc) = build(&Device::Cpu)?;
    for s in 0..STEPS {
        match (step(&mut gpu, &pg, s)?, step(&mut cpu, &pc, s)?) {
            (
                StepOutcome::Applied {
                    grad_norm: a,
                    clipped: ca,
                },
                StepOutcome::Applied {
                    grad_norm: b,
                    clipped: cb,
                },
            ) => {
                assert!((a - b).abs() <= 1e-12 * b, "step {s}: grad norm {a} vs {b}");
                assert_eq!(ca, cb);
            }
            (StepOutcome::NonFinite { .. }, StepOutcome::NonFinite { .. }) => {}
            other => panic!("step {s}: outcomes differ: {other:?}"),
        }
        // The clip coefficient is the f32 of an f64 ratio of the norm: a norm off in its last
        // f64 bits leaves it the same f32 but for a ~2^-29 chance, so the state stays equal.
        assert_same(
            &snapshot(&gpu, &pg)?,
            &snapshot(&cpu, &pc)?,
            &format!("step {s}"),
        );
    }
    Ok(())
}
