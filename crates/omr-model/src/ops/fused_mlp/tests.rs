//! The MLP units' tests: each against the ops it replaces, bit for bit.

use super::super::test_values::{assert_same_grads, bits, rand};
use super::*;
use crate::lora::LoraAdapter;
use crate::ops::linear_op;
use candle_core::{DType, Var};

/// `swiglu_mlp` gives the bits of the three ops it replaces (`linear_op` for gate and up,
/// then SwiGLU): the output and every gradient, f32 and bf16, with every argument tracked
/// and with frozen weights (then only x gets one, and with a frozen x only the weights).
#[test]
fn swiglu_mlp_equals_its_three_ops() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for (tx, tw) in [(true, true), (true, false), (false, true)] {
            let mk = |t: Tensor, on: bool| -> Result<Tensor> {
                let t = t.to_dtype(dtype)?;
                Ok(if on {
                    Var::from_tensor(&t)?.as_tensor().clone()
                } else {
                    t
                })
            };
            let x = mk(rand(1, &[2, 5, 12])?, tx)?;
            let wg = mk((rand(2, &[20, 12])? * 0.3)?, tw)?;
            let wu = mk((rand(3, &[20, 12])? * 0.3)?, tw)?;
            let k = rand(4, &[2, 5, 20])?.to_dtype(dtype)?;
            let one = swiglu_mlp(&x, &wg, &wu)?;
            let three =
                omr_kernels::swiglu(&linear_op(&x, &wg, None)?, &linear_op(&x, &wu, None)?)?;
            let what = format!("{dtype:?}, x tracked {tx}, weights tracked {tw}");
            assert_eq!(bits(&one)?, bits(&three)?, "{what}: output");
            let g1 = (&one * &k)?.sum_all()?.backward()?;
            let g3 = (&three * &k)?.sum_all()?.backward()?;
            for (name, t, on) in [("x", &x, tx), ("wg", &wg, tw), ("wu", &wu, tw)] {
                match (g1.get(t), g3.get(t)) {
                    (Some(a), Some(b)) => assert_eq!(bits(a)?, bits(b)?, "{what}: d{name}"),
                    (None, None) => assert!(!on, "{what}: no d{name}"),
                    _ => panic!("{what}: d{name} present in one only"),
                }
            }
        }
    }
    assert!(swiglu_mlp(
        &rand(1, &[3, 12])?,
        &rand(2, &[20, 12])?,
        &rand(3, &[20, 11])?
    )
    .is_err());
    Ok(())
}

/// `swiglu_mlp_residual` gives the bits of `swiglu_mlp` + `linear_residual`: the output
/// and every gradient, f32 and bf16, for each combination of tracked x, gate/up weights,
/// down weight and residual (an untracked argument gets no gradient), including the
/// case where only the down projection trains (the activation then comes from the
/// forward kernel alone).
#[test]
fn swiglu_mlp_residual_equals_its_two_ops() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for mask in 1u32..16 {
            let on = |k: u32| mask & (1 << k) != 0;
            let mk = |t: Tensor, on: bool| -> Result<Tensor> {
                let t = t.to_dtype(dtype)?;
                Ok(if on {
                    Var::from_tensor(&t)?.as_tensor().clone()
                } else {
                    t
                })
            };
            let x = mk(rand(1, &[2, 5, 12])?, on(0))?;
            let wg = mk((rand(2, &[20, 12])? * 0.3)?, on(1))?;
            let wu = mk((rand(3, &[20, 12])? * 0.3)?, on(1))?;
            let wd = mk((rand(4, &[12, 20])? * 0.3)?, on(2))?;
            let r = mk(rand(5, &[2, 5, 12])?, on(3))?;
            let k = rand(6, &[2, 5, 12])?.to_dtype(dtype)?;
            let w = MlpWeights {
                gate: &wg,
                up: &wu,
                down: &wd,
                bias: [None; 3],
                lora: [None, None, None],
                norm: None,
            };
            let one = swiglu_mlp_residual(&x, &w, &r)?;
            let two = linear_residual(&swiglu_mlp(&x, &wg, &wu)?, &wd, &r)?;
            let what = format!(
                "{dtype:?}, tracked x {} w_gate/up {} w_down {} r {}",
                on(0),
                on(1),
                on(2),
                on(3)
            );
            assert_eq!(one.dims(), [2, 5, 12], "{what}");
            assert_eq!(bits(&one)?, bits(&two)?, "{what}: output");
            let g1 = (&one * &k)?.sum_all()?.backward()?;
            let g2 = (&two * &k)?.sum_all()?.backward()?;
            let args = [("x", &x), ("wg", &wg), ("wu", &wu), ("wd", &wd), ("r", &r)];
            assert_same_grads(&what, &g1, &g2, &args)?;
        }
    }
    // Shapes that do not fit are an error, not a panic.
    let (x, w, r) = (rand(1, &[3, 12])?, rand(2, &[20, 12])?, rand(5, &[3, 12])?);
    let (d, d19) = (rand(4, &[12, 20])?, rand(4, &[12, 19])?);
    fn mlp<'a>(g: &'a Tensor, u: &'a Tensor, d: &'a Tensor) -> MlpWeights<'a> {
        MlpWeights {
            gate: g,
            up: u,
            down: d,
            bias: [None; 3],
            lora: [None, None, None],
            norm: None,
        }
    }
    let u11 = rand(3, &[20, 11])?;
    assert!(swiglu_mlp_residual(&x, &mlp(&w, &w, &d19), &r).is_err());
    assert!(swiglu_mlp_residual(&x, &mlp(&w, &w, &d), &rand(5, &[3, 11])?).is_err());
    assert!(swiglu_mlp_residual(&x, &mlp(&w, &u11, &d), &r).is_err());
    let bad = Adapter {
        a: rand(6, &[4, 11])?,
        b: rand(7, &[20, 4])?,
        scale: 1.0,
    };
    let mut m = mlp(&w, &w, &d);
    m.lora[0] = Some(&bad);
    assert!(swiglu_mlp_residual(&x, &m, &r).is_err());
    // No rows: the two ops' answer (an empty output).
    let e = swiglu_mlp_residual(&rand(1, &[0, 12])?, &mlp(&w, &w, &d), &rand(5, &[0, 12])?)?;
    assert_eq!(e.dims(), [0, 12]);
    Ok(())
}

/// With LoRA adapters (frozen base weights, as `lora::apply` leaves them; adapters on
/// every projection, on some, trainable x or not, B non-zero), the unit gives the bits of
/// the per-op path: each projection through `LoraAdapter::forward` (the fused LoRA op),
/// SwiGLU, and the residual add; the same gradients for x, r and every A and B.
#[test]
fn swiglu_mlp_residual_with_lora_equals_the_lora_ops() -> Result<()> {
    use crate::linear::{Ctx, Kernels};
    let ctx = Ctx {
        kernels: Kernels::Fused,
        ..Ctx::default()
    };
    for dtype in [DType::F32, DType::BF16] {
        for (on, x_tracked) in [
            ([true; 3], true),
            ([true, false, true], true),
            ([false, false, true], false),
            ([true, true, false], true),
        ] {
            let var = |t: Tensor| -> Result<Tensor> {
                Ok(Var::from_tensor(&t.to_dtype(dtype)?)?.as_tensor().clone())
            };
            let x = match x_tracked {
                true => var(rand(1, &[2, 5, 12])?)?,
                false => rand(1, &[2, 5, 12])?.to_dtype(dtype)?,
            };
            let wg = (rand(2, &[20, 12])? * 0.3)?.to_dtype(dtype)?;
            let wu = (rand(3, &[20, 12])? * 0.3)?.to_dtype(dtype)?;
            let wd = (rand(4, &[12, 20])? * 0.3)?.to_dtype(dtype)?;
            let r = var(rand(5, &[2, 5, 12])?)?;
            let shapes = [(12, 20), (12, 20), (20, 12)]; // (in, out)
            let mut ab = Vec::new();
            for (p, &(i, o)) in shapes.iter().enumerate() {
                let a = var((rand(10 + p as u64, &[4, i])? * 0.5)?)?;
                let b = var((rand(20 + p as u64, &[o, 4])? * 0.5)?)?;
                ab.push((a, b));
            }
            let adapters: Vec<Adapter> = ab
                .iter()
                .map(|(a, b)| Adapter {
                    a: a.clone(),
                    b: b.clone(),
                    scale: 2.0,
                })
                .collect();
            let pick = |p: usize| on[p].then_some(&adapters[p]);
            let w = MlpWeights {
                gate: &wg,
                up: &wu,
                down: &wd,
                bias: [None; 3],
                lora: [pick(0), pick(1), pick(2)],
                norm: None,
            };
            let one = swiglu_mlp_residual(&x, &w, &r)?;
            // The per-op path.
            let proj = |p: usize, x: &Tensor, w: &Tensor| -> Result<Tensor> {
                match on[p] {
                    true => LoraAdapter::from_parts(ab[p].0.clone(), ab[p].1.clone(), 2.0, 0.0)
                        .forward(x, w, None, "m", &ctx),
                    false => crate::ops::frozen_linear(x, w, None),
                }
            };
            let act = omr_kernels::swiglu(&proj(0, &x, &wg)?, &proj(1, &x, &wu)?)?;
            let ops = (&r + proj(2, &act, &wd)?)?;
            let what = format!("{dtype:?}, adapters {on:?}, x tracked {x_tracked}");
            assert_eq!(bits(&one)?, bits(&ops)?, "{what}: output");
            let k = rand(6, &[2, 5, 12])?.to_dtype(dtype)?;
            let g1 = (&one * &k)?.sum_all()?.backward()?;
            let g2 = (&ops * &k)?.sum_all()?.backward()?;
            let mut args = vec![("x".to_string(), &x), ("r".to_string(), &r)];
            for (p, (a, b)) in ab.iter().enumerate() {
                if on[p] {
                    args.push((format!("A{p}"), a));
                    args.push((format!("B{p}"), b));
                }
            }
            assert_same_grads(&what, &g1, &g2, &args)?;
            // The frozen weights get none.
            for t in [&wg, &wu, &wd] {
                assert!(g1.get(t).is_none(), "{what}: a frozen weight's gradient");
            }
        }
    }
    Ok(())
}

/// `decoder_mlp` gives the bits of the per-op path's second half: the fused RMSNorm op
/// (its weight stored in f32 and cast to the compute dtype, as `fused::rmsnorm` does),
/// then `swiglu_mlp_residual` with x as the residual; the same gradients for x, the norm's
/// weight (cast back to f32), the projections and the adapters: everything trainable,
/// LoRA on a frozen base and norm, and a frozen x with a trainable norm.
#[test]
fn decoder_mlp_equals_the_norm_and_the_unit() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        for case in ["full", "lora", "frozen x"] {
            let var =
                |t: Tensor| -> Result<Tensor> { Ok(Var::from_tensor(&t)?.as_tensor().clone()) };
            let full = case != "lora";
            let maybe = |t: Tensor, on: bool| if on { var(t) } else { Ok(t) };
            let x = maybe(rand(1, &[2, 5, 12])?.to_dtype(dtype)?, case != "frozen x")?;
            let wn = maybe(((rand(2, &[12])? * 0.5)? + 1.0)?, full)?; // stored f32
            let wg = maybe((rand(3, &[20, 12])? * 0.3)?.to_dtype(dtype)?, full)?;
            let wu = maybe((rand(4, &[20, 12])? * 0.3)?.to_dtype(dtype)?, full)?;
            let wd = maybe((rand(5, &[12, 20])? * 0.3)?.to_dtype(dtype)?, full)?;
            let adapters: Vec<Adapter> = [(12, 20), (12, 20), (20, 12)]
                .iter()
                .enumerate()
                .map(|(p, &(i, o))| {
                    Ok(Adapter {
                        a: var((rand(10 + p as u64, &[4, i])? * 0.5)?.to_dtype(dtype)?)?,
                        b: var((rand(20 + p as u64, &[o, 4])? * 0.5)?.to_dtype(dtype)?)?,
                        scale: 2.0,
                    })
                })
                .collect::<Result<_>>()?;
            let lora = match case {
                "lora" => [Some(&adapters[0]), Some(&adapters[1]), Some(&adapters[2])],
                _ => [None, None, None],
            };
            let mut w = MlpWeights {
                gate: &wg,
                up: &wu,
                down: &wd,
                bias: [None; 3],
                lora,
                norm: Some((&wn, 1e-6)),
            };
            let one = decoder_mlp(&x, &w)?;
            w.norm = None;
            let h = omr_kernels::rmsnorm(&x, &wn.to_dtype(dtype)?, 1e-6)?;
            let two = swiglu_mlp_residual(&h, &w, &x)?;
            let what = format!("{dtype:?}, {case}");
            assert_eq!(bits(&one)?, bits(&two)?, "{what}: output");
            let k = rand(6, &[2, 5, 12])?.to_dtype(dtype)?;
            let g1 = (&one * &k)?.sum_all()?.backward()?;
            let g2 = (&two * &k)?.sum_all()?.backward()?;
            let mut args = vec![("x", &x), ("norm", &wn), ("gate", &wg), ("up", &wu)];
            args.push(("down", &wd));
            if case == "lora" {
                for (p, ad) in adapters.iter().enumerate() {
                    args.push((["A0", "A1", "A2"][p], &ad.a));
                    args.push((["B0", "B1", "B2"][p], &ad.b));
                }
            }
            assert_same_grads(&what, &g1, &g2, &args)?;
        }
    }
    // A norm that does not fit is an error; decoder_mlp needs one, the other takes none.
    let (x, w, d) = (rand(1, &[3, 12])?, rand(2, &[20, 12])?, rand(4, &[12, 20])?);
    let n11 = rand(3, &[11])?;
    let mut m = MlpWeights {
        gate: &w,
        up: &w,
        down: &d,
        bias: [None; 3],
        lora: [None, None, None],
        norm: Some((&n11, 1e-6)),
    };
    assert!(decoder_mlp(&x, &m).is_err());
    assert!(swiglu_mlp_residual(&x, &m, &x).is_err());
    m.norm = None;
    assert!(decoder_mlp(&x, &m).is_err());
    Ok(())
}

/// `decoder_mlp` with biases on gate, up and down (a Qwen2.5-VL vision block's MLP) gives the
/// bits of the vision block's per-op path (`vision.rs`): the fused RMSNorm op, gate and up
/// through `Linear::forward`'s ops (`linear_op` with the bias when trainable, the LoRA op
/// with its adapter, `frozen_linear` when frozen), SwiGLU, down the same way, then the
/// residual add. Output and every gradient (biases included), f32 and bf16: everything
/// trainable, LoRA on a frozen base (adapters on gate and down), a frozen MLP passing x's
/// gradient on, and only the biases trainable (x frozen). A bias of the wrong length is an
/// error.
#[test]
fn biased_mlp_unit_equals_the_vision_per_op_path() -> Result<()> {
    let ctx = crate::linear::Ctx {
        kernels: crate::linear::Kernels::Fused,
        ..Default::default()
    };
    let (n, c, i) = (7, 12, 20);
    let shapes = [(i, c), (i, c), (c, i)]; // (out, in)
    for dtype in [DType::F32, DType::BF16] {
        for case in ["full", "lora", "frozen", "biases"] {
            let var = |t: Tensor| -> Result<Tensor> {
                Ok(Var::from_tensor(&t.to_dtype(dtype)?)?.as_tensor().clone())
            };
            let base = |t: Tensor| match case {
                "full" => var(t),
                _ => t.to_dtype(dtype),
            };
            let x = match case {
                "biases" => rand(1, &[n, c])?.to_dtype(dtype)?,
                _ => var(rand(1, &[n, c])?)?,
            };
            let wn = match case {
                "full" => Var::from_tensor(&((rand(2, &[c])? * 0.5)? + 1.0)?)?
                    .as_tensor()
                    .clone(),
                _ => ((rand(2, &[c])? * 0.5)? + 1.0)?,
            };
            let mut ws = Vec::new();
            let mut bs = Vec::new();
            let mut ads = Vec::new();
            for (p, &(o, inp)) in shapes.iter().enumerate() {
                ws.push(base((rand(3 + p as u64, &[o, inp])? * 0.3)?)?);
                let b = (rand(10 + p as u64, &[o])? * 0.2)?;
                bs.push(match case {
                    "biases" => var(b)?,
                    _ => base(b)?,
                });
                ads.push(match case == "lora" && p != 1 {
                    true => Some(Adapter {
                        a: var((rand(20 + p as u64, &[4, inp])? * 0.5)?)?,
                        b: var((rand(30 + p as u64, &[o, 4])? * 0.5)?)?,
                        scale: 2.0,
                    }),
                    false => None,
                });
            }
            let w = MlpWeights {
                gate: &ws[0],
                up: &ws[1],
                down: &ws[2],
                bias: [Some(&bs[0]), Some(&bs[1]), Some(&bs[2])],
                lora: [ads[0].as_ref(), ads[1].as_ref(), ads[2].as_ref()],
                norm: Some((&wn, 1e-6)),
            };
            let one = decoder_mlp(&x, &w)?;
            let proj = |p: usize, x: &Tensor| -> Result<Tensor> {
                match (&ads[p], case) {
                    (Some(ad), _) => LoraAdapter::from_parts(ad.a.clone(), ad.b.clone(), 2.0, 0.0)
                        .forward(x, &ws[p], Some(&bs[p]), "m", &ctx),
                    (None, "full" | "biases") => linear_op(x, &ws[p], Some(&bs[p])),
                    (None, _) => crate::ops::frozen_linear(x, &ws[p], Some(&bs[p])),
                }
            };
            let h = omr_kernels::rmsnorm(&x, &wn.to_dtype(dtype)?, 1e-6)?;
            let act = omr_kernels::swiglu(&proj(0, &h)?, &proj(1, &h)?)?;
            let ops = (&x + proj(2, &act)?)?;
            let what = format!("{dtype:?}, {case}");
            assert_eq!(bits(&one)?, bits(&ops)?, "{what}: output");
            let k = rand(6, &[n, c])?.to_dtype(dtype)?;
            let g1 = (&one * &k)?.sum_all()?.backward()?;
            let g2 = (&ops * &k)?.sum_all()?.backward()?;
            let mut args = vec![("x".to_string(), &x), ("norm".to_string(), &wn)];
            for p in 0..3 {
                args.push((format!("w{p}"), &ws[p]));
                args.push((format!("b{p}"), &bs[p]));
                if let Some(ad) = &ads[p] {
                    args.push((format!("A{p}"), &ad.a));
                    args.push((format!("B{p}"), &ad.b));
                }
            }
            assert_same_grads(&what, &g1, &g2, &args)?;
        }
    }
    let (x, w, d) = (rand(1, &[3, 12])?, rand(2, &[20, 12])?, rand(4, &[12, 20])?);
    let (norm, b19) = (rand(3, &[12])?, rand(5, &[19])?);
    let m = MlpWeights {
        gate: &w,
        up: &w,
        down: &d,
        bias: [None, Some(&b19), None],
        lora: [None, None, None],
        norm: Some((&norm, 1e-6)),
    };
    assert!(decoder_mlp(&x, &m).is_err());
    Ok(())
}
