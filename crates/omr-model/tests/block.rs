//! Decoder layers and vision blocks as one op each (`omr_model::block`, `OMR_BLOCK_OP=1`)
//! against the per-op fused path they replace, on the tiny random Qwen2.5-VL of the fixtures, on CPU (the fused ops'
//! plain-Rust references; attention through the blockwise GEMM path): loss and the gradient
//! of every trainable parameter on a left-padded and a packed batch, with a frozen part,
//! with activation checkpointing, and in bf16.
//!
//! Tolerance, f32: max |Δ| ≤ 1e-4 · max |per-op| per tensor (the two paths sum the same terms
//! in different orders: dL/dhs of three projections, the attention's blocks).

mod common;

use candle_core::{DType, Tensor};
use common::{flat, grads_by_name, model_params, packed, rel, Grads, Inputs};
use omr_model::block::with_block_op;
use omr_model::fused;
use omr_model::{Ctx, Input, Kernels, Params, Qwen2VL, Recompute};

fn fused_ctx() -> Ctx {
    Ctx {
        kernels: Kernels::Fused,
        ..Ctx::default()
    }
}

/// Loss, each parameter's gradient by name, and the fused RMSNorm calls the forward made
/// through `omr_model::fused` (the block op calls the kernels directly).
fn run(params: &Params, input: &Input, labels: &[Vec<i64>], block: bool) -> (f32, Grads, usize) {
    let (cfg, _) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, params).unwrap();
    with_block_op(block, || {
        let before = fused::calls().rmsnorm;
        let (sum, _) = model.loss(input, labels, &fused_ctx()).unwrap();
        let norms = fused::calls().rmsnorm - before;
        let g = grads_by_name(params, &sum.backward().unwrap());
        (sum.to_scalar::<f32>().unwrap(), g, norms)
    })
}

fn compare(name: &str, params: &Params, input: &Input, labels: &[Vec<i64>], tol: f32) {
    let (cfg, _) = model_params("qwen25vl");
    let (l0, g0, n0) = run(params, input, labels, false);
    let (l1, g1, n1) = run(params, input, labels, true);
    // Two RMSNorms per decoder layer and vision block left the per-op path.
    assert_eq!(
        n0 - n1,
        2 * (cfg.text.num_hidden_layers + cfg.vision.depth),
        "{name}: block op did not run"
    );
    let e_loss = (l1 - l0).abs() / l0.abs();
    assert!(e_loss <= tol, "{name}: loss {l1} vs {l0}");
    let mut worst = 0f32;
    let mut n = 0;
    for ((k, a), (_, b)) in g1.iter().zip(&g0) {
        assert_eq!(a.is_some(), b.is_some(), "{name}: gradient presence of {k}");
        assert_eq!(a.is_some(), params.is_trainable(k), "{name}: {k}");
        if let (Some(a), Some(b)) = (a, b) {
            let e = rel(a, b);
            assert!(e <= tol, "{name}: gradient of {k} differs by {e:.2e}");
            worst = worst.max(e);
            n += 1;
        }
    }
    assert!(n > 0);
    println!("{name}: loss {e_loss:.2e}, gradients of {n} parameters {worst:.2e}");
}

#[test]
fn block_op_matches_the_per_op_path() {
    let inputs = Inputs::load("qwen25vl");
    let (_, params) = model_params("qwen25vl");
    compare("padded", &params, &inputs.padded(), &inputs.labels, 1e-4);
    let (input, labels) = packed(&inputs);
    compare("packed", &params, &input, &labels, 1e-4);
    // A frozen vision tower and frozen layer-0 norms and q bias: no gradient for them, the
    // others unchanged.
    let (_, mut params) = model_params("qwen25vl");
    params.set_trainable(
        |n| {
            n.starts_with("visual.")
                || n.starts_with("model.layers.0.input_layernorm")
                || n == "model.layers.0.self_attn.q_proj.bias"
                || n == "model.layers.1.mlp.down_proj.weight"
        },
        false,
    );
    compare("packed, partly frozen", &params, &input, &labels, 1e-4);
}

#[test]
fn block_op_under_checkpointing_equals_plain_backward() {
    let (cfg, params) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let (input, labels) = packed(&Inputs::load("qwen25vl"));
    let fx = fused_ctx();
    let wrt: Vec<Tensor> = params
        .trainable()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let run = |r: Recompute, block: bool| {
        with_block_op(block, || {
            model
                .forward_backward::<omr_model::ModelError>(&input, &fx, r, &wrt, |h| {
                    Ok(model.head_loss(h, &labels, &fx)?.0)
                })
                .unwrap()
        })
    };
    let per_op = run(Recompute::NONE, false);
    let (gp, mut worst) = (per_op.grads.unwrap(), 0f32);
    let mut kept = None;
    for r in [
        Recompute::NONE,
        Recompute::ALL,
        Recompute::ALL.with_attention(true),
    ] {
        let b = run(r, true);
        assert!((b.loss - per_op.loss).abs() <= 1e-5 * per_op.loss.abs());
        let gb = b.grads.unwrap();
        for t in &wrt {
            worst = worst.max(rel(&flat(gb.get(t).unwrap()), &flat(gp.get(t).unwrap())));
        }
        // The recompute replays the attentions the forward kept (omr_model::kept_attn), or
        // computes them again: the same bits.
        if r == Recompute::ALL {
            kept = Some(gb);
        } else if let Some(k) = &kept {
            for t in &wrt {
                assert_eq!(flat(k.get(t).unwrap()), flat(gb.get(t).unwrap()));
            }
        }
    }
    println!("block op (plain, recomputed) vs per-op: gradients {worst:.2e}");
    assert!(worst <= 1e-4, "gradients differ by {worst:.2e}");
}

/// Mixed precision (bf16 compute copies of f32 masters): the block op's gradients reach the
/// copies and agree with the per-op path's to bf16 precision.
#[test]
fn block_op_in_bf16() {
    let inputs = Inputs::load("qwen25vl");
    let mut input = inputs.padded();
    input.pixel_values = Some(inputs.pixels.to_dtype(DType::BF16).unwrap());
    for (what, mut params) in [
        ("full", model_params("qwen25vl").1),
        ("LoRA", with_lora(0.0)),
    ] {
        params.set_compute_dtype(DType::BF16).unwrap();
        let (l0, g0, _) = run(&params, &input, &inputs.labels, false);
        let (l1, g1, _) = run(&params, &input, &inputs.labels, true);
        assert!(
            (l1 - l0).abs() <= 2e-2 * l0.abs(),
            "{what}: bf16 loss {l1} vs {l0}"
        );
        let mut n_grads = 0;
        for ((k, a), (_, b)) in g1.iter().zip(&g0) {
            assert_eq!(a.is_some(), b.is_some(), "{what}: gradient presence of {k}");
            if let (Some(a), Some(b)) = (a, b) {
                assert!(a.iter().all(|x| x.is_finite()), "{what}: {k}");
                let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
                let e = (d / n.max(1e-30)).sqrt();
                assert!(
                    e <= 5e-2,
                    "{what}: bf16 gradient of {k} differs by {e:.2e} (relative L2)"
                );
                n_grads += 1;
            }
        }
        assert!(n_grads > 0, "{what}: no gradient compared");
    }
}

/// LoRA of rank 4 on every decoder linear, on a frozen base.
fn with_lora(dropout: f64) -> Params {
    common::with_lora(&["all-linear"], dropout)
}

#[test]
fn block_op_with_lora_matches_the_per_op_path() {
    let inputs = Inputs::load("qwen25vl");
    let (input, labels) = packed(&inputs);
    let params = with_lora(0.0);
    compare("LoRA, frozen base", &params, &input, &labels, 1e-4);
    compare(
        "LoRA, padded",
        &params,
        &inputs.padded(),
        &inputs.labels,
        1e-4,
    );
    // A trainable base weight and bias under an adapter: both paths give them gradients too.
    let mut params = with_lora(0.0);
    params.set_trainable(
        |n| {
            n == "model.layers.1.mlp.down_proj.weight"
                || n == "model.layers.0.self_attn.q_proj.bias"
                || n == "model.layers.0.self_attn.k_proj.weight"
        },
        true,
    );
    compare("LoRA, partly trained base", &params, &input, &labels, 1e-4);
}

/// A forward that draws LoRA dropout masks keeps the decoder layers on the per-op path (the
/// masks are drawn there), and the loss is the per-op one.
#[test]
fn lora_dropout_keeps_decoder_layers_per_op() {
    let (cfg, _) = model_params("qwen25vl");
    let params = with_lora(0.1);
    let inputs = Inputs::load("qwen25vl");
    let model = Qwen2VL::new(&cfg, &params).unwrap();
    let ctx = Ctx {
        dropout_seed: Some(3),
        ..fused_ctx()
    };
    let run = |block: bool| {
        with_block_op(block, || {
            let before = fused::calls().rmsnorm;
            let (sum, _) = model.loss(&inputs.padded(), &inputs.labels, &ctx).unwrap();
            (
                sum.to_scalar::<f32>().unwrap(),
                fused::calls().rmsnorm - before,
            )
        })
    };
    let ((l0, n0), (l1, n1)) = (run(false), run(true));
    // Only the vision blocks (no adapters there) left the per-op path.
    assert_eq!(n0 - n1, 2 * cfg.vision.depth);
    assert!((l1 - l0).abs() <= 1e-5 * l0.abs(), "loss {l1} vs {l0}");
}
