//! FLOPs of one training step, counted as PERFORMANCE.md asks and printed part by part:
//! 6·N·T for the matmuls of each part at its own token count (decoder at B·T tokens, vision
//! blocks at the patches, merger at the merged tokens, the lm head only at labelled rows, as
//! `Qwen2VL::loss` runs it), plus attention at 12·T²·(H·D) per layer and sequence (per window
//! for windowed vision blocks), with no causal discount (what eager attention computes).
//!
//! The factor 6 is 2 (forward) + 4 (gradients of input and weight). A frozen part that a
//! gradient must cross costs 4 (input gradient only, `ops::frozen_linear`); a frozen part that
//! no gradient reaches (the vision tower when nothing in it trains) costs 2. A LoRA adapter
//! adds 6·r·(in + out) per token of its module (A and B forward, their weight and input
//! gradients). Embedding lookups, norms, rotary and elementwise ops are not counted (they are
//! memory-bound, not FLOPs).

use crate::plan::PlanInput;
use omr_model::config::Arch;
use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StepFlops {
    /// Decoder linears (q, k, v, o, gate, up, down) at every token.
    pub text_linear: f64,
    /// lm head at the labelled rows.
    pub lm_head: f64,
    /// Decoder attention: QKᵀ and PV.
    pub text_attention: f64,
    /// Patch embedding and vision block linears at every patch.
    pub vision_linear: f64,
    /// Vision attention, per window or per image.
    pub vision_attention: f64,
    /// Merger linears at the merged tokens.
    pub merger: f64,
    /// LoRA adapters (A and B of every selected module) at their module's tokens.
    pub lora: f64,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.text_linear
            + self.lm_head
            + self.text_attention
            + self.vision_linear
            + self.vision_attention
            + self.merger
            + self.lora
    }
    /// The parts as (name, flops) for printing; the report leaves out those that are zero (the
    /// adapters of a full fine-tune, the vision tower of a text-only batch).
    pub fn parts(&self) -> [(&'static str, f64); 7] {
        [
            ("decoder linears 6·N·T (4· frozen)", self.text_linear),
            ("lm head (labelled rows)", self.lm_head),
            ("decoder attention 12·L·T²·C", self.text_attention),
            ("vision linears 6·N·T_patches", self.vision_linear),
            ("vision attention", self.vision_attention),
            ("merger", self.merger),
            ("LoRA adapters 6·r·(in+out)·T", self.lora),
        ]
    }
}

pub fn step_flops(p: &PlanInput) -> StepFlops {
    let cfg = &p.model;
    let t = &cfg.text;
    let v = &cfg.vision;
    let f = |x: usize| x as f64;
    let (c, hd, kvd) = (
        f(t.hidden_size),
        f(t.num_attention_heads * t.head_dim),
        f(t.num_key_value_heads * t.head_dim),
    );
    let per_layer = c * hd * 2.0 + c * kvd * 2.0 + 3.0 * c * f(t.intermediate_size);
    let tokens = f(p.batch * p.seq);
    let lm_mult = if p.trainable.language { 6.0 } else { 4.0 };
    let text_linear = lm_mult * f(t.num_hidden_layers) * per_layer * tokens;
    // The head's weight trains with the language model (or is the tied embedding).
    let lm_head = lm_mult * c * f(t.vocab_size) * f(p.labelled);
    let text_attention = 3.0 * 4.0 * f(t.num_hidden_layers) * f(p.batch) * f(p.seq) * f(p.seq) * hd;

    let patches = f(p.patches());
    let (cv, iv) = (f(v.hidden_size), f(v.intermediate_size));
    let mlp = match cfg.arch {
        Arch::Qwen25Vl => 3.0 * cv * iv,
        Arch::Qwen2Vl => 2.0 * cv * iv,
    };
    // The modules that carry an adapter, (name, (out, in)), and the adapters' rank.
    let adapted: Vec<(String, (usize, usize))> = p.lora.as_ref().map_or(Vec::new(), |l| {
        omr_model::lora::linear_modules(cfg)
            .into_iter()
            .filter(|(n, _)| omr_model::lora::selects(&l.targets, n))
            .collect()
    });
    let rank = p.lora.as_ref().map_or(0, |l| l.r);
    let lora_in_vision = adapted.iter().any(|(n, _)| n.starts_with("visual.blocks."));
    let (block_mult, attn_mult) = if p.trainable.vision {
        (6.0, 3.0)
    } else if lora_in_vision {
        (4.0, 3.0)
    } else {
        (2.0, 1.0)
    };
    let vision_linear =
        block_mult * patches * (cv * f(v.patch_dim()) + f(v.depth) * (4.0 * cv * cv + mlp));
    let mut vision_attention = 0.0;
    let windows = p.vision_windows();
    let full = p.full_attention_lens();
    for i in 0..v.depth {
        let lens = if v.window_size.is_none() || v.fullatt_block_indexes.contains(&i) {
            &full
        } else {
            &windows
        };
        let sq: f64 = lens.iter().map(|&l| (l * l) as f64).sum();
        vision_attention += attn_mult * 4.0 * sq * cv;
    }
    let merger_mult = if p.trainable.merger {
        6.0
    } else if p.trainable.vision || lora_in_vision {
        4.0
    } else {
        2.0
    };
    let merged = cv * f(v.merge_unit());
    let merger = merger_mult
        * (patches / f(v.merge_unit()))
        * (merged * merged + merged * f(v.out_hidden_size));
    // Each adapter at its module's token count: decoder layers at every token, the head at the
    // labelled rows, vision blocks at the patches, the merger at the merged tokens. A fold from
    // +0 (f64's `sum` of nothing is −0, which the report printed as "-0.0000 GFLOP").
    let lora = adapted
        .iter()
        .map(|(n, (out, inp))| {
            let at = if n == "lm_head" {
                f(p.labelled)
            } else if n.starts_with("visual.merger.") {
                patches / f(v.merge_unit())
            } else if n.starts_with("visual.") {
                patches
            } else {
                tokens
            };
            6.0 * f(rank) * f(inp + out) * at
        })
        .fold(0.0, |acc, x| acc + x);
    StepFlops {
        lora,
        text_linear,
        lm_head,
        text_attention,
        vision_linear,
        vision_attention,
        merger,
    }
}
