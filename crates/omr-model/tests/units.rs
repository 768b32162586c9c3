//! The fused path's units (`ops::decoder_attention`, `ops::decoder_mlp`: two per decoder layer
//! and two per Qwen2.5-VL vision block) against the per-op path they replace, in the whole
//! model: the tiny random Qwen2.5-VL of the fixtures on a packed batch with images (CPU, f32).
//! The same loss and every parameter's gradient, bit for bit (−0 read as +0), for a full
//! fine-tune and for LoRA on every decoder linear and every vision-block linear (base frozen),
//! each with and without activation checkpointing. `fused::with_units` switches the units per
//! thread; `fused::calls().unit` shows which path ran.

mod common;

use candle_core::Tensor;
use common::{flat, model_params, packed, Inputs};
use omr_model::fused;
use omr_model::{Ctx, Kernels, Params, Qwen2VL, Recompute};

/// Loss bits, each trainable parameter's gradient bits (in `trainable()` order) and the
/// units the pass ran.
fn run(params: &Params, units: bool, r: Recompute) -> (u64, Vec<Vec<u32>>, usize) {
    let (cfg, _) = model_params("qwen25vl");
    let model = Qwen2VL::new(&cfg, params).unwrap();
    let (input, labels) = packed(&Inputs::load("qwen25vl"));
    let ctx = Ctx {
        kernels: Kernels::Fused,
        ..Ctx::default()
    };
    let wrt: Vec<Tensor> = params
        .trainable()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    fused::with_units(units, || {
        let before = fused::calls().unit;
        let out = model
            .forward_backward::<omr_model::ModelError>(&input, &ctx, r, &wrt, |h| {
                Ok(model.head_loss(h, &labels, &ctx)?.0)
            })
            .unwrap();
        let ran = fused::calls().unit - before;
        let g = out.grads.unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            flat(g.get(t).expect("a gradient for every trainable parameter"))
                .iter()
                .map(|x| (x + 0.0).to_bits())
                .collect()
        };
        (out.loss.to_bits(), wrt.iter().map(bits).collect(), ran)
    })
}

#[test]
fn units_train_the_whole_model_to_the_per_op_bits() {
    let (cfg, full) = model_params("qwen25vl");
    let halves = 2 * (cfg.text.num_hidden_layers + cfg.vision.depth);
    // LoRA on every decoder linear and every vision block's qkv, proj, gate, up and down.
    let lora = common::with_lora(&["all-linear", "visual.blocks.*"], 0.0);
    assert!(lora.trainable().any(|(n, _)| n.contains("visual.blocks.")));
    for (what, params) in [("full fine-tune", full), ("LoRA", lora)] {
        for r in [Recompute::NONE, Recompute::ALL] {
            let (l0, g0, n0) = run(&params, false, r);
            let (l1, g1, n1) = run(&params, true, r);
            assert_eq!(n0, 0, "{what}, {r:?}: a unit ran with the units off");
            // Checkpointing runs each block's forward again in the backward.
            assert!(
                n1 >= halves,
                "{what}, {r:?}: {n1} units for {halves} halves"
            );
            assert_eq!(l1, l0, "{what}, {r:?}: loss");
            assert_eq!(g1.len(), g0.len());
            let names: Vec<String> = params.trainable().map(|(n, _)| n.to_string()).collect();
            for ((a, b), n) in g1.iter().zip(&g0).zip(&names) {
                assert!(a == b, "{what}, {r:?}: the gradient of {n}");
            }
            println!(
                "{what}, {r:?}: loss and {} gradients equal ({n1} units)",
                g0.len()
            );
        }
    }
}
