//! Parameter gradients routed past candle's `GradStore` (`omr_kernels::grad_sink`): the
//! gradients `grad_sink::backward` gives equal those of a plain `loss.backward()` bit for bit,
//! on the tiny random Qwen2.5-VL of the fixtures, on the fused path (projections through
//! `ops::linear_op`, the loss through the fused linear cross-entropy), per op and with the
//! layers as one op, f32 and bf16 mixed precision (gradients on the compute copies), a
//! partly frozen model, and LoRA; and most of them were routed (not accumulated by candle).

mod common;

use candle_core::DType;
use common::{grads_by_name, model_params, packed, Inputs};
use omr_kernels::grad_sink;
use omr_model::block::with_block_op;
use omr_model::{Ctx, Input, Kernels, Params, Qwen2VL};

fn fused_ctx() -> Ctx {
    Ctx {
        kernels: Kernels::Fused,
        ..Ctx::default()
    }
}

/// The loss's gradients through a plain backward and through the sink, and how many
/// gradients the sink routed.
fn both(params: &Params, input: &Input, labels: &[Vec<i64>], block: bool) -> (Vec<Grads>, u64) {
    let (cfg, _) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, params).unwrap();
    with_block_op(block, || {
        let loss = || model.loss(input, labels, &fused_ctx()).unwrap().0;
        let plain = grads_by_name(params, &loss().backward().unwrap());
        let before = grad_sink::routed();
        let sunk = grads_by_name(params, &grad_sink::backward(&loss()).unwrap());
        (vec![plain, sunk], grad_sink::routed() - before)
    })
}

type Grads = common::Grads;

fn assert_same(what: &str, params: &Params, grads: &[Grads], routed: u64) {
    let (plain, sunk) = (&grads[0], &grads[1]);
    let mut n = 0;
    for ((k, a), (_, b)) in sunk.iter().zip(plain) {
        assert_eq!(a.is_some(), b.is_some(), "{what}: gradient presence of {k}");
        assert_eq!(a.is_some(), params.is_trainable(k), "{what}: {k}");
        if let (Some(a), Some(b)) = (a, b) {
            // Bits, with +0 and −0 equal (candle's zeros + g turns −0 into +0).
            assert!(
                a.iter().zip(b).all(|(x, y)| x == y),
                "{what}: gradient of {k} differs"
            );
            n += 1;
        }
    }
    // Every trainable projection weight at least (the bf16 compute copies included).
    let linears = sunk
        .iter()
        .filter(|(k, g)| g.is_some() && k.ends_with("proj.weight"))
        .count() as u64;
    assert!(n > 0 && routed > 0, "{what}: nothing compared or routed");
    assert!(
        routed >= linears,
        "{what}: {routed} gradients routed, fewer than the {linears} projection weights"
    );
    println!("{what}: {n} gradients equal, {routed} routed past the GradStore");
}

#[test]
fn routed_gradients_equal_candles() {
    let inputs = Inputs::load("qwen25vl");
    let (input, labels) = packed(&inputs);
    let (_, params) = model_params("qwen25vl");
    for block in [false, true] {
        let (g, routed) = both(&params, &input, &labels, block);
        assert_same(&format!("f32, block op {block}"), &params, &g, routed);
    }
    // A frozen vision tower: its projections' inputs still need gradients, its weights none.
    let (_, mut frozen) = model_params("qwen25vl");
    frozen.set_trainable(|n| n.starts_with("visual."), false);
    let (g, routed) = both(&frozen, &input, &labels, false);
    assert_same("f32, frozen vision", &frozen, &g, routed);
}

#[test]
fn routed_gradients_equal_candles_in_bf16_and_with_lora() {
    let inputs = Inputs::load("qwen25vl");
    let mut input = inputs.padded();
    input.pixel_values = Some(inputs.pixels.to_dtype(DType::BF16).unwrap());
    let (_, mut params) = model_params("qwen25vl");
    params.set_compute_dtype(DType::BF16).unwrap();
    for block in [false, true] {
        let (g, routed) = both(&params, &input, &inputs.labels, block);
        assert_same(&format!("bf16, block op {block}"), &params, &g, routed);
    }
    let lora = common::with_lora(&["q_proj", "v_proj"], 0.0);
    let (g, routed) = both(&lora, &inputs.padded(), &inputs.labels, false);
    let adapters = g[1]
        .iter()
        .filter(|(k, g)| g.is_some() && k.contains("lora_"))
        .count();
    assert!(adapters > 0);
    assert_same("LoRA on q, v", &lora, &g, routed);
}
