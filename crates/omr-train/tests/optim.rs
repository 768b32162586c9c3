//! AdamW against torch (tests/fixtures/optim/README.md), and the guarantees the trainer relies
//! on: a non-finite step changes nothing, a resumed optimizer continues bit for bit, and
//! accumulated micro-batches equal one step on their mean.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use omr_model::Part;
use omr_train::optim::{param_specs, AdamW, OptimConfig, OptimError, ParamSpec, StepOutcome};
use omr_train::schedule::ScheduleConfig;
use std::collections::HashMap;
use std::path::Path;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/optim")
        .join(name)
}

struct Golden {
    cfg: OptimConfig,
    meta: serde_json::Value,
    names: Vec<String>,
    t: HashMap<String, Tensor>,
}

fn golden() -> Golden {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("adamw.json")).unwrap()).unwrap();
    let cfg: OptimConfig = serde_json::from_value(meta["optim"].clone()).unwrap();
    let names = meta["params"].as_array().unwrap();
    let names = names
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let t = candle_core::safetensors::load(fixture("adamw.safetensors"), &Device::Cpu).unwrap();
    Golden {
        cfg,
        meta,
        names,
        t,
    }
}

fn vars(g: &Golden, prefix: &str) -> Vec<(String, Var)> {
    let v = |n: &String| Var::from_tensor(&g.t[&format!("{prefix}.{n}")]).unwrap();
    g.names.iter().map(|n| (n.clone(), v(n))).collect()
}

/// A gradient store as `loss.backward()` gives it, for the named gradients that are present.
fn store(params: &[(String, Var)], grads: &HashMap<String, Tensor>) -> GradStore {
    let mut s = GradStore::default();
    for (name, var) in params {
        if let Some(g) = grads.get(name) {
            s.insert(var.as_tensor(), g.clone());
        }
    }
    s
}

fn grads_of(g: &Golden, step: usize) -> HashMap<String, Tensor> {
    let key = |n: &String| format!("grad.{step}.{n}");
    g.names
        .iter()
        .map(|n| (n.clone(), g.t[&key(n)].clone()))
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(params: &[(String, Var)], opt: &AdamW) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = params
        .iter()
        .map(|(_, v)| values(v.as_tensor()).iter().map(|x| x.to_bits()).collect())
        .collect();
    for (_, t) in opt.state_tensors() {
        out.push(values(&t).iter().map(|x| x.to_bits()).collect());
    }
    out
}

/// Largest |ours - torch| / max(|torch|, 1e-3) over a tensor.
fn rel_diff(ours: &Tensor, want: &Tensor) -> f64 {
    let (a, b) = (values(ours), values(want));
    assert_eq!(a.len(), b.len());
    let rel = |(x, y): (&f32, &f32)| ((x - y).abs() / y.abs().max(1e-3)) as f64;
    a.iter().zip(&b).map(rel).fold(0.0, f64::max)
}

#[test]
fn adamw_matches_torch() {
    let g = golden();
    let params = vars(&g, "init");
    let specs = param_specs(params.clone(), &g.cfg);
    let lrs: Vec<(f64, f64)> = specs.iter().map(|s| (s.lr, s.weight_decay)).collect();
    assert_eq!(
        lrs,
        [
            (5e-3, 0.1),
            (5e-3, 0.0),
            (1e-2, 0.1),
            (3e-2, 0.0),
            (3e-2, 0.1)
        ]
    );
    let mut opt = AdamW::new(specs, &g.cfg).unwrap();
    let sched = &g.meta["schedule"];
    let sched_cfg = ScheduleConfig {
        warmup_steps: sched["warmup_steps"].as_u64().unwrap(),
        ..Default::default()
    };
    let total = sched["total_steps"].as_u64().unwrap();
    let want_norms: Vec<f64> = g.t["grad_norm"].to_vec1().unwrap();
    let want_factors: Vec<f64> = g.t["lr_factor"].to_vec1().unwrap();
    let (zero_step, zero_param) = (
        g.meta["zero_grad_step"].as_u64().unwrap() as usize,
        g.meta["zero_grad_param"].as_str().unwrap(),
    );
    let (mut max_param, mut max_norm) = (0f64, 0f64);
    for step in 0..g.meta["steps"].as_u64().unwrap() as usize {
        let factor = sched_cfg.factor(step as u64, total);
        assert!((factor - want_factors[step]).abs() < 1e-12);
        let mut grads = grads_of(&g, step);
        if step == zero_step {
            // torch got zeros; we get no gradient at all, which must mean the same.
            grads.remove(zero_param);
        }
        let out = opt
            .step(&store(&params, &grads), want_factors[step], 1.0)
            .unwrap();
        let StepOutcome::Applied { grad_norm, clipped } = out else {
            panic!("step {step}: {out:?}")
        };
        assert_eq!(clipped, want_norms[step] > 1.0, "step {step}");
        max_norm = max_norm.max((grad_norm - want_norms[step]).abs() / want_norms[step]);
        for (name, var) in &params {
            let d = rel_diff(var.as_tensor(), &g.t[&format!("param.{step}.{name}")]);
            assert!(d < 1e-6, "step {step} {name}: rel diff {d:e}");
            max_param = max_param.max(d);
        }
    }
    assert_eq!(opt.steps(), 5);
    for (key, t) in opt.state_tensors() {
        let d = rel_diff(&t, &g.t[&key]);
        assert!(d < 1e-5, "{key}: rel diff {d:e}");
    }
    assert!(max_norm < 1e-6, "grad norm rel diff {max_norm:e}");
    eprintln!("max rel diff vs torch: params {max_param:e}, grad norm {max_norm:e}");
    assert_eq!(opt.group_lrs()[&Part::Merger], 3e-2);
    assert_eq!(opt.lr_of("model.norm.weight"), Some(5e-3));
    assert_eq!(opt.lr_of("nope"), None);
}

/// Three small params of the golden fixture, default config but a real learning rate.
fn small() -> (Golden, Vec<(String, Var)>, AdamW) {
    let g = golden();
    let params = vars(&g, "init");
    let cfg = OptimConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let opt = AdamW::new(param_specs(params.clone(), &cfg), &cfg).unwrap();
    (g, params, opt)
}

#[test]
fn non_finite_gradient_changes_nothing() {
    let (g, params, mut opt) = small();
    opt.step(&store(&params, &grads_of(&g, 0)), 1.0, 1.0)
        .unwrap();
    let before = bits(&params, &opt);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut grads = grads_of(&g, 1);
        let name = &g.names[3];
        let mut v = values(&grads[name]);
        v[1] = bad;
        grads.insert(
            name.clone(),
            Tensor::from_vec(v, grads[name].shape(), &Device::Cpu).unwrap(),
        );
        let out = opt.step(&store(&params, &grads), 1.0, 1.0).unwrap();
        assert!(matches!(out, StepOutcome::NonFinite { grad_norm } if !grad_norm.is_finite()));
        assert_eq!(bits(&params, &opt), before, "{bad}");
        assert_eq!(opt.steps(), 1);
    }
    // A huge but finite f32 gradient does not overflow the f64 norm: it is clipped.
    let mut grads = grads_of(&g, 1);
    let name = &g.names[0];
    grads.insert(name.clone(), (grads[name].clone() * 1e30).unwrap());
    let out = opt.step(&store(&params, &grads), 1.0, 1.0).unwrap();
    assert!(matches!(out, StepOutcome::Applied { clipped: true, grad_norm } if grad_norm > 1e28));
}

#[test]
fn resumed_optimizer_continues_bit_for_bit() {
    let (g, params, mut opt) = small();
    for step in 0..2 {
        opt.step(&store(&params, &grads_of(&g, step)), 0.5, 1.0)
            .unwrap();
    }
    // Through a safetensors file, as a checkpoint would.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let mut saved: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    for (name, var) in &params {
        saved.insert(format!("param.{name}"), var.as_tensor().clone());
    }
    candle_core::safetensors::save(&saved, &path).unwrap();
    let steps = opt.steps();

    for step in 2..5 {
        opt.step(&store(&params, &grads_of(&g, step)), 1.0, 1.0)
            .unwrap();
    }
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let params2: Vec<(String, Var)> = g
        .names
        .iter()
        .map(|n| {
            (
                n.clone(),
                Var::from_tensor(&loaded[&format!("param.{n}")]).unwrap(),
            )
        })
        .collect();
    let cfg = OptimConfig {
        lr: 1e-2,
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt2 = AdamW::new(param_specs(params2.clone(), &cfg), &cfg).unwrap();
    opt2.load_state(&loaded, steps).unwrap();
    for step in 2..5 {
        opt2.step(&store(&params2, &grads_of(&g, step)), 1.0, 1.0)
            .unwrap();
    }
    assert_eq!(bits(&params2, &opt2), bits(&params, &opt));
    assert_eq!(opt2.steps(), 5);
}

#[test]
fn load_state_names_what_is_wrong() {
    let (_, params, mut opt) = small();
    let full: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    let name = &params[1].0;

    let mut missing = full.clone();
    missing.remove(&format!("exp_avg_sq.{name}"));
    let err = opt.load_state(&missing, 3).unwrap_err();
    assert!(matches!(&err, OptimError::MissingState(k) if k == &format!("exp_avg_sq.{name}")));

    let mut shaped = full.clone();
    shaped.insert(
        format!("exp_avg.{name}"),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = opt.load_state(&shaped, 3).unwrap_err().to_string();
    assert!(
        err.contains(&format!("exp_avg.{name}")) && err.contains("[7]"),
        "{err}"
    );

    let mut extra = full.clone();
    extra.insert(
        "exp_avg.lm_head.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    extra.insert(
        "something.else".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = opt.load_state(&extra, 3).unwrap_err();
    assert!(matches!(&err, OptimError::UnexpectedState(k) if k == "exp_avg.lm_head.weight"));
    assert_eq!(opt.steps(), 0, "a failed load changes nothing");

    opt.load_state(&full, 3).unwrap();
    assert_eq!(opt.steps(), 3);
}

#[test]
fn accumulated_micro_batches_equal_mean_gradient() {
    let (g, params, mut opt) = small();
    let (a, b) = (grads_of(&g, 0), grads_of(&g, 1));
    let mut acc = opt.grad_accum();
    acc.add(&store(&params, &a)).unwrap();
    acc.add(&store(&params, &b)).unwrap();
    assert_eq!(acc.micro_batches(), 2);
    opt.step_accumulated(&mut acc, 1.0, 0.5).unwrap();
    assert_eq!(acc.micro_batches(), 0, "a step consumes the accumulator");

    let (g2, params2, mut opt2) = small();
    let mean: HashMap<String, Tensor> = g2
        .names
        .iter()
        .map(|n| (n.clone(), ((&a[n] + &b[n]).unwrap() * 0.5).unwrap()))
        .collect();
    opt2.step(&store(&params2, &mean), 1.0, 1.0).unwrap();
    // (a + b)·0.5 is the same f32 arithmetic either way: bit-identical.
    assert_eq!(bits(&params, &opt), bits(&params2, &opt2));
}

/// The real path: gradients from `backward()`, accumulated over two micro-batches, where one
/// parameter is absent from the second graph.
#[test]
fn accumulates_backward_gradients() {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.5f32, -0.5], &dev).unwrap()).unwrap();
    let specs = vec![
        ParamSpec {
            name: "w".into(),
            var: w.clone(),
            copy: None,
            lr: 0.1,
            weight_decay: 0.0,
        },
        ParamSpec {
            name: "b".into(),
            var: b.clone(),
            copy: None,
            lr: 0.1,
            weight_decay: 0.0,
        },
    ];
    let cfg = OptimConfig {
        max_grad_norm: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(specs, &cfg).unwrap();
    let mut acc = opt.grad_accum();
    let x = Tensor::new(&[[1f32], [2.]], &dev).unwrap();
    // loss1 = sum(w·x + b) → dw = [[1, 2], [1, 2]], db = [1, 1]
    let loss1 = w
        .matmul(&x)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .add(&b)
        .unwrap()
        .sum_all()
        .unwrap();
    acc.add(&loss1.backward().unwrap()).unwrap();
    // loss2 = sum(3·w) → dw = 3, no db
    let loss2 = (w.as_tensor() * 3.0).unwrap().sum_all().unwrap();
    acc.add(&loss2.backward().unwrap()).unwrap();
    let out = opt.step_accumulated(&mut acc, 1.0, 1.0).unwrap();
    // norm of [[4, 5], [4, 5]] and [1, 1]
    let want = (16f64 + 25. + 16. + 25. + 1. + 1.).sqrt();
    assert!(
        matches!(out, StepOutcome::Applied { grad_norm, clipped: false } if (grad_norm - want).abs() < 1e-9)
    );
    // First Adam step: p -= lr · g/(|g| + eps') ≈ lr · sign(g).
    let w_now: Vec<Vec<f32>> = w.as_tensor().to_vec2().unwrap();
    assert!((w_now[0][0] - 0.9).abs() < 1e-6 && (w_now[1][1] - 3.9).abs() < 1e-6);
    let b_now: Vec<f32> = b.as_tensor().to_vec1().unwrap();
    assert!((b_now[0] - 0.4).abs() < 1e-6);

    // Wrong accumulator, empty accumulator, bad arguments: errors, nothing changes.
    let (_, _, other) = small();
    let mut foreign = other.grad_accum();
    foreign.add(&GradStore::default()).unwrap();
    assert!(opt.step_accumulated(&mut foreign, 1.0, 1.0).is_err());
    assert!(opt.step_accumulated(&mut acc, 1.0, 1.0).is_err());
    let loss = w.as_tensor().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(opt.step(&grads, 1.5, 1.0).is_err());
    assert!(opt.step(&grads, 1.0, f64::NAN).is_err());
    assert_eq!(opt.steps(), 1);
}

#[test]
fn rejects_bad_config_and_shapes() {
    let cfg = OptimConfig {
        beta2: 1.0,
        ..Default::default()
    };
    let err = AdamW::new(vec![], &cfg).err().unwrap().to_string();
    assert!(err.contains("optim.beta2 = 1"), "{err}");
    let cfg = OptimConfig {
        lr_merger: Some(-1.0),
        ..Default::default()
    };
    assert!(matches!(
        cfg.validate(),
        Err(OptimError::Config {
            field: "lr_merger",
            ..
        })
    ));
    assert!(toml::from_str::<OptimConfig>("lr = 1e-4\nbetas = [0.9, 0.99]").is_err());
    let parsed: OptimConfig = toml::from_str("lr = 1e-4\nlr_vision = 2e-6").unwrap();
    assert_eq!(
        (parsed.lr, parsed.lr_vision, parsed.beta2),
        (1e-4, Some(2e-6), 0.999)
    );

    let bf16 = Var::zeros((2, 2), DType::BF16, &Device::Cpu).unwrap();
    let specs = param_specs(vec![("w".into(), bf16)], &OptimConfig::default());
    assert!(matches!(
        AdamW::new(specs, &OptimConfig::default()),
        Err(OptimError::Dtype { .. })
    ));

    let (_, params, opt) = small();
    let mut acc = opt.grad_accum();
    let mut s = GradStore::default();
    s.insert(
        params[0].1.as_tensor(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = acc.add(&s).err().unwrap();
    assert!(matches!(err, OptimError::GradShape { ref name, .. } if name == &params[0].0));
    assert_eq!(acc.micro_batches(), 0);
}
