//! Which halves of a layer run as one of the fused path's units
//! (`omr_model::ops::decoder_attention`, `decoder_mlp`) and which per op: what
//! `activations.rs` counts as kept for each. A half runs per op when a LoRA adapter on it
//! draws dropout, and a vision block's also when it is Qwen2-VL's (LayerNorm, QuickGELU).

use super::PlanInput;
use omr_model::config::Arch;

/// Whether the decoder MLP runs as one unit on the fused path (`ops::decoder_mlp`):
/// unless a LoRA adapter with dropout sits on some layer's gate, up or down projection.
pub(super) fn mlp_unit(p: &PlanInput) -> bool {
    !dropout_on(
        p,
        Stack::Decoder,
        "mlp",
        &["gate_proj", "up_proj", "down_proj"],
    )
}

/// Whether the decoder's attention half runs as one unit on the fused path
/// (`ops::decoder_attention`): unless a LoRA adapter with dropout sits on some layer's q, k,
/// v or o projection.
pub(super) fn attn_unit(p: &PlanInput) -> bool {
    !dropout_on(
        p,
        Stack::Decoder,
        "self_attn",
        &["q_proj", "k_proj", "v_proj", "o_proj"],
    )
}

/// Whether a vision block's attention half runs as one unit on the fused path
/// (`ops::decoder_attention` with the packed qkv): Qwen2.5-VL's RMSNorm, and no LoRA adapter
/// with dropout on some block's qkv or proj.
pub(super) fn vision_attn_unit(p: &PlanInput) -> bool {
    p.model.arch == Arch::Qwen25Vl && !dropout_on(p, Stack::Vision, "attn", &["qkv", "proj"])
}

/// Whether a vision block's MLP half runs as one unit on the fused path (`ops::decoder_mlp`
/// with the biases): Qwen2.5-VL's RMSNorm and SwiGLU, and no LoRA adapter with dropout on some
/// block's gate, up or down projection.
pub(super) fn vision_mlp_unit(p: &PlanInput) -> bool {
    p.model.arch == Arch::Qwen25Vl
        && !dropout_on(
            p,
            Stack::Vision,
            "mlp",
            &["gate_proj", "up_proj", "down_proj"],
        )
}

/// The decoder's layers and the vision tower's blocks, for [`dropout_on`].
#[derive(Clone, Copy)]
enum Stack {
    Decoder,
    Vision,
}

/// Whether LoRA with dropout targets one of `modules` of `part` in some layer of `stack`.
fn dropout_on(p: &PlanInput, stack: Stack, part: &str, modules: &[&str]) -> bool {
    let Some(l) = p.lora.as_ref().filter(|l| l.dropout > 0.0) else {
        return false;
    };
    let (prefix, layers) = match stack {
        Stack::Decoder => ("model.layers", p.model.text.num_hidden_layers),
        Stack::Vision => ("visual.blocks", p.model.vision.depth),
    };
    (0..layers).any(|i| {
        modules
            .iter()
            .any(|m| omr_model::lora::selects(&l.targets, &format!("{prefix}.{i}.{part}.{m}")))
    })
}
