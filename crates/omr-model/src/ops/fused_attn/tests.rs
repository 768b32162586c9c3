//! The attention unit's tests: against the per-op path it replaces, bit for bit, for the
//! decoder's separate q, k, v and the vision tower's packed qkv.

use super::super::test_values::{assert_same_grads, bits, rand};
use super::*;
use crate::linear::{Ctx, Kernels};
use crate::lora::LoraAdapter;
use crate::ops::{frozen_linear, linear_op, linear_op_to, linear_residual};
use candle_core::{DType, Var};

/// `decoder_attention` against the decoder's per-op path (the fused RMSNorm op, q / k / v
/// through `linear_op_to` or the LoRA op, rotary, the flash attention op, o_proj + residual),
/// packed rows with two segments, GQA (4 heads, 2 kv heads): the output and every gradient,
/// f32 and bf16, a full fine-tune (norm, weights and biases trainable), LoRA on a frozen base
/// (adapters on q, v, o), and a frozen layer that only passes x's gradient on. Equal bit for
/// bit.
#[test]
fn decoder_attention_equals_the_per_op_path() -> Result<()> {
    attention_unit_equals_the_per_op_path(false)
}

/// The same with the vision tower's packed qkv (`Qkv::Packed`, biases on qkv and proj, as
/// many kv heads as heads) on x (N, C), against the vision block's per-op path (`vision.rs`:
/// one qkv projection, its parts narrowed per q / k / v, rotary, attention over one batch row
/// of N, proj with its bias, then the residual add), adapters on qkv and proj.
#[test]
fn packed_qkv_attention_equals_the_vision_per_op_path() -> Result<()> {
    attention_unit_equals_the_per_op_path(true)
}

fn attention_unit_equals_the_per_op_path(packed: bool) -> Result<()> {
    let (t, c, h, d) = (6, 16, 4, 4);
    let (b, kv) = match packed {
        true => (1, h),
        false => (2, 2),
    };
    let ctx = Ctx {
        kernels: Kernels::Fused,
        ..Ctx::default()
    };
    let segs = match packed {
        true => vec![vec![1, 1, 1, 2, 2, 2]],
        false => vec![vec![1, 1, 1, 2, 2, 2], vec![1, 1, 1, 1, 1, 0]],
    };
    let mask = crate::fused::text_mask(&segs, t, &candle_core::Device::Cpu)?;
    let theta = ((rand(9, &[b, t, d / 2])? + 1.0)? * 3.0)?;
    let (cos, sin) = (theta.cos()?, theta.sin()?);
    let x_dims = match packed {
        true => vec![t, c],
        false => vec![b, t, c],
    };
    // The projections: q, k, v, o (decoder: q, k, v with biases) or qkv, proj (vision, both
    // with biases). Adapters on q, v, o or on qkv and proj.
    let (outs, ins, biased, adapted) = match packed {
        true => (
            vec![3 * h * d, c],
            vec![c, h * d],
            vec![true, true],
            vec![true, true],
        ),
        false => (
            vec![h * d, kv * d, kv * d, c],
            vec![c, c, c, h * d],
            vec![true, true, true, false],
            vec![true, false, true, true],
        ),
    };
    for dtype in [DType::F32, DType::BF16] {
        for (frozen, lora) in [(false, false), (true, true), (true, false)] {
            let var = |t: Tensor| -> Result<Tensor> {
                Ok(Var::from_tensor(&t.to_dtype(dtype)?)?.as_tensor().clone())
            };
            let base = |t: Tensor| -> Result<Tensor> {
                match frozen {
                    true => t.to_dtype(dtype),
                    false => var(t),
                }
            };
            let x = var(rand(1, &x_dims)?)?;
            let norm = match frozen {
                true => ((rand(2, &[c])? * 0.5)? + 1.0)?,
                false => Var::from_tensor(&((rand(2, &[c])? * 0.5)? + 1.0)?)?
                    .as_tensor()
                    .clone(),
            };
            let mut ws = Vec::new();
            let mut bs = Vec::new();
            let mut adapters = Vec::new();
            for p in 0..outs.len() {
                ws.push(base((rand(10 + p as u64, &[outs[p], ins[p]])? * 0.4)?)?);
                bs.push(match biased[p] {
                    true => Some(base((rand(20 + p as u64, &[outs[p]])? * 0.2)?)?),
                    false => None,
                });
                adapters.push(match lora && adapted[p] {
                    true => Some(Adapter {
                        a: var((rand(30 + p as u64, &[3, ins[p]])? * 0.5)?)?,
                        b: var((rand(40 + p as u64, &[outs[p], 3])? * 0.5)?)?,
                        scale: 2.0,
                    }),
                    false => None,
                });
            }
            let proj = |p: usize| (&ws[p], bs[p].as_ref());
            let ad = |p: usize| adapters[p].as_ref();
            let w = match packed {
                true => AttnWeights {
                    norm: (&norm, 1e-6),
                    qkv: Qkv::Packed(proj(0)),
                    o: proj(1),
                    lora: [ad(0), None, None, ad(1)],
                    heads: h,
                    kv_heads: kv,
                    head_dim: d,
                },
                false => AttnWeights {
                    norm: (&norm, 1e-6),
                    qkv: Qkv::Split([proj(0), proj(1), proj(2)]),
                    o: proj(3),
                    lora: [ad(0), ad(1), ad(2), ad(3)],
                    heads: h,
                    kv_heads: kv,
                    head_dim: d,
                },
            };
            let one = decoder_attention(&x, &w, &cos, &sin, &mask)?;
            // The per-op paths (text.rs and vision.rs before the unit).
            let lora_op = |p: usize, x: &Tensor| -> Result<Option<Tensor>> {
                adapters[p]
                    .as_ref()
                    .map(|ad| {
                        LoraAdapter::from_parts(ad.a.clone(), ad.b.clone(), 2.0, 0.0).forward(
                            x,
                            &ws[p],
                            bs[p].as_ref(),
                            "m",
                            &ctx,
                        )
                    })
                    .transpose()
            };
            let hs = omr_kernels::rmsnorm(&x, &norm.to_dtype(dtype)?, 1e-6)?;
            let scale = 1.0 / (d as f64).sqrt();
            let ops = match packed {
                false => {
                    let proj = |p: usize, x: &Tensor, out: &[usize]| -> Result<Tensor> {
                        match lora_op(p, x)? {
                            Some(y) => y.reshape(out),
                            None if frozen => {
                                frozen_linear(x, &ws[p], bs[p].as_ref())?.reshape(out)
                            }
                            None => linear_op_to(x, &ws[p], bs[p].as_ref(), out),
                        }
                    };
                    let q = omr_kernels::rotary(&proj(0, &hs, &[b, t, h, d])?, &cos, &sin)?;
                    let k = omr_kernels::rotary(&proj(1, &hs, &[b, t, kv, d])?, &cos, &sin)?;
                    let v = proj(2, &hs, &[b, t, kv, d])?;
                    let a = omr_kernels::flash_attn(&q, &k, &v, &mask, scale)?;
                    match &adapters[3] {
                        Some(_) => (&x + proj(3, &a.reshape((b, t, h * d))?, &[b, t, c])?)?,
                        None => linear_residual(&a, &ws[3], &x)?,
                    }
                }
                true => {
                    // vision.rs's Linear::forward: the LoRA op, linear_op when trainable,
                    // frozen_linear otherwise.
                    let proj = |p: usize, x: &Tensor| -> Result<Tensor> {
                        match lora_op(p, x)? {
                            Some(y) => Ok(y),
                            None if frozen => frozen_linear(x, &ws[p], bs[p].as_ref()),
                            None => linear_op(x, &ws[p], bs[p].as_ref()),
                        }
                    };
                    let qkv = proj(0, &hs)?.reshape((t, 3, h, d))?;
                    let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1)?.unsqueeze(0);
                    let q = omr_kernels::rotary(&part(0)?, &cos, &sin)?;
                    let k = omr_kernels::rotary(&part(1)?, &cos, &sin)?;
                    let a = omr_kernels::flash_attn(&q, &k, &part(2)?, &mask, scale)?;
                    (&x + proj(1, &a.reshape((t, c))?)?)?
                }
            };
            let what = format!("{dtype:?}, packed {packed}, frozen base {frozen}, LoRA {lora}");
            assert_eq!(one.dims(), x_dims.as_slice());
            assert_eq!(bits(&one)?, bits(&ops)?, "{what}: output");
            let k = rand(7, &x_dims)?.to_dtype(dtype)?;
            let g1 = (&one * &k)?.sum_all()?.backward()?;
            let g2 = (&ops * &k)?.sum_all()?.backward()?;
            let mut args: Vec<(String, &Tensor)> = vec![("x".into(), &x), ("norm".into(), &norm)];
            for p in 0..outs.len() {
                args.push((format!("w{p}"), &ws[p]));
                if let Some(b) = &bs[p] {
                    args.push((format!("b{p}"), b));
                }
                if let Some(ad) = &adapters[p] {
                    args.push((format!("A{p}"), &ad.a));
                    args.push((format!("B{p}"), &ad.b));
                }
            }
            assert_same_grads(&what, &g1, &g2, &args)?;
        }
    }
    Ok(())
}

/// A packed qkv with fewer kv heads than heads, or a packed projection of the wrong width,
/// is an error, not a wrong result.
#[test]
fn packed_qkv_shapes_are_checked() -> Result<()> {
    let (t, c, h, d) = (4, 8, 2, 4);
    let x = rand(1, &[t, c])?;
    let norm = rand(2, &[c])?;
    let mask = crate::fused::text_mask(&[vec![1; t]], t, &candle_core::Device::Cpu)?;
    let theta = rand(9, &[1, t, d / 2])?;
    let (cos, sin) = (theta.cos()?, theta.sin()?);
    let wo = rand(4, &[c, h * d])?;
    for (rows, kv) in [(3 * h * d, 1), (2 * h * d, h)] {
        let wqkv = rand(3, &[rows, c])?;
        let w = AttnWeights {
            norm: (&norm, 1e-6),
            qkv: Qkv::Packed((&wqkv, None)),
            o: (&wo, None),
            lora: [None; 4],
            heads: h,
            kv_heads: kv,
            head_dim: d,
        };
        assert!(decoder_attention(&x, &w, &cos, &sin, &mask).is_err());
    }
    Ok(())
}
