//! Bytes of the tensors a forward pass keeps alive for backward, counted op by op from what
//! our candle model does (`omr_model::{text, vision, attention, ops, loss}`), not from a
//! generic transformer formula.
//!
//! candle keeps every intermediate tensor that an op on the path to the loss references: each
//! tensor holds its op, and the op holds its inputs, until the loss is dropped. So "kept for
//! backward" is every op output of the forward except views (reshape of a contiguous tensor,
//! transpose, narrow, broadcast) and values computed outside the graph (detached maxima of the
//! softmax, frozen parts no gradient flows into). Counting rules, per op:
//! - linear: the matmul output, plus the bias-add output when the weight is trainable and has a
//!   bias; a frozen (or LoRA-adapted frozen) linear keeps only its output (`ops::frozen_linear`
//!   and the fused LoRA op compute outside the graph and attach one value).
//! - the decoder's post-attention norm and MLP on the fused path, LoRA without dropout
//!   included (`ops::decoder_mlp`): the gate and up outputs and the residual sum; the norm's
//!   output and the activation are recomputed in the backward. Its input norm and attention
//!   (`ops::decoder_attention`): v, the rotated q and k, the attention's output and
//!   log-sum-exp, the residual sum. A Qwen2.5-VL vision block's two halves are the same units
//!   (the packed qkv's parts copied out, the biases inside).
//! - RMSNorm (`ops::rmsnorm`): x² and x·r in f32, the cast back (when the compute dtype is not
//!   f32) and the weight product. LayerNorm: x−μ, its square, the normed value (f32), the cast,
//!   weight product and bias sum.
//! - rotary (`ops::apply_rotary`): x·cos, −x₂, cat, ·sin, sum: 4.5 tensors of x's size.
//! - eager attention: scores, scaled, (+bias), minus max, exp, divided: 5 or 6 (B, H, T, S)
//!   tensors; then the PV product and the copy that `reshape` makes of the transposed output.
//!   A fused (flash-style) kernel keeps its output and a (B, H, T) f32 log-sum-exp instead.
//! - loss (`Qwen2VL::loss`): lm head only at labelled rows (N, V), then f32 cast, shift and exp.
//!
//! Activation checkpointing of a stack keeps only each block's input (L·input here), and its
//! attention's output and log-sum-exp on the fused path unless `recompute_attention`; it
//! recomputes one block at a time in backward: `plan()` adds that block where the backward
//! reaches it. The last `kept_decoder_layers` decoder layers keep all their activations.

use super::units::{attn_unit, mlp_unit, vision_attn_unit, vision_mlp_unit};
use super::{AttentionImpl, PlanInput, F32};
use omr_model::config::Arch;

/// Bytes a checkpointed block keeps of its attention besides its input: on the fused path,
/// unless `recompute_attention`, the output (`out` elements) and the row log-sum-exp (`rows`
/// f32) for the recompute to reuse (`omr_model::kept_attn`).
fn kept_attention(p: &PlanInput, out: u64, rows: u64) -> u64 {
    if p.attention == AttentionImpl::Fused && !p.recompute_attention {
        out * p.compute_bytes + rows * F32
    } else {
        0
    }
}

/// Kept bytes of the forward, by part.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Activations {
    /// Pixel values, patch embedding, window permutation, vision rotary tables.
    pub vision_stem: u64,
    /// One vision block as our model runs it (mean over window and full-attention blocks).
    pub vision_block: u64,
    /// All vision blocks (checkpointing applied).
    pub vision_blocks: u64,
    /// The largest vision block (a full-attention one with eager scores) with what the fused
    /// units drop as they go: what a no-grad forward holds at once (GRPO's rollouts,
    /// `plan/grpo.rs`).
    pub vision_block_max: u64,
    /// Merger (norm, two linears, GELU) and the image-order permutation.
    pub merger: u64,
    /// Token embeddings, image-feature scatter, M-RoPE tables, the attention mask.
    pub text_stem: u64,
    /// One decoder layer.
    pub decoder_layer: u64,
    /// What one decoder layer's forward holds at once without a backward to come (GRPO's
    /// rollouts, `plan/grpo.rs`): [`Activations::decoder_layer`] plus what the fused units
    /// drop as they go (the norms' outputs, the pre-rotary q and k, o's output, the MLP's
    /// activation and down projection's output).
    pub decoder_layer_forward: u64,
    /// All decoder layers (checkpointing applied).
    pub decoder_layers: u64,
    /// Final norm, the gathered labelled rows, lm-head logits and the loss' f32 buffers.
    pub logits_loss: u64,
    /// The largest single tensor kept: what the backward's in-flight gradients scale with.
    pub largest_tensor: u64,
    /// The parts in backward order (loss first), for the backward's peak.
    pub stages: Vec<Stage>,
}

/// What one part adds to the backward pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stage {
    pub name: &'static str,
    /// Gradients candle computes for untracked inputs (the attention mask, the softmax's
    /// detached max, rotary tables, frozen norm weights, pixel values) and keeps in the
    /// `GradStore` until it is dropped: `or_insert` gives every argument of an op a gradient,
    /// and only tracked nodes are ever removed from the store.
    pub leak: u64,
    /// Largest tensor of the part: its gradient and the op's temporaries are in flight.
    pub largest: u64,
    /// What the part keeps for backward (its activations).
    pub bytes: u64,
    /// Bytes of the part's input: a recomputed block's leaf copy, incoming gradient and
    /// `out · g` product are of this size.
    pub input: u64,
}

impl Activations {
    pub fn total(&self) -> u64 {
        self.vision_stem
            + self.vision_blocks
            + self.merger
            + self.text_stem
            + self.decoder_layers
            + self.logits_loss
    }
}

/// Counts elements × bytes and remembers the largest tensor.
struct Tally {
    bytes: u64,
    largest: u64,
    leak: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            bytes: 0,
            largest: 0,
            leak: 0,
        }
    }
    /// `k` gradients of `elems` elements left in the gradient store.
    fn leak(&mut self, k: f64, elems: u64, size: u64) {
        self.leak += (k * (elems * size) as f64).round() as u64;
    }
    /// `k` tensors of `elems` elements of `size` bytes (k may be fractional: the rotary's half).
    fn add(&mut self, k: f64, elems: u64, size: u64) {
        let one = elems * size;
        self.bytes += (k * one as f64).round() as u64;
        if k > 0.0 {
            self.largest = self.largest.max(one);
        }
    }
    /// [`Tally::add`] of tensors whose size no gradient ever has: kept, but never the part's
    /// largest in flight.
    fn hold(&mut self, k: f64, elems: u64, size: u64) {
        self.bytes += (k * (elems * size) as f64).round() as u64;
    }
}

pub fn count(p: &PlanInput) -> Activations {
    let s = p.compute_bytes;
    let cfg = &p.model;
    let t = &cfg.text;
    let v = &cfg.vision;
    let (b, seq) = (p.batch as u64, p.seq as u64);
    let n = b * seq;
    let c = t.hidden_size as u64;
    let (h, kv, d) = (
        t.num_attention_heads as u64,
        t.num_key_value_heads as u64,
        t.head_dim as u64,
    );
    let inter = t.intermediate_size as u64;
    let cast = |tally: &mut Tally, elems: u64| {
        if s != F32 {
            tally.add(1.0, elems, s);
        }
    };
    // The fused kernels' path (a GPU): a trainable linear is one op that keeps its output only
    // (the bias is added inside it), norms, rotary and SwiGLU are one op each that keep their
    // output, and the backward has no Div/Mul chains.
    let fused = p.attention == AttentionImpl::Fused;
    let lin = |tally: &mut Tally, rows: u64, out: u64, bias: bool, trainable: bool| {
        let k = if bias && trainable && !fused {
            2.0
        } else {
            1.0
        };
        tally.add(k, rows * out, s);
    };
    // A frozen norm weight is a detached tensor: its product with x leaves a gradient for it.
    let rms = |tally: &mut Tally, elems: u64, trainable: bool| {
        if fused {
            tally.add(1.0, elems, s);
        } else {
            tally.add(2.0, elems, F32);
            cast(tally, elems);
            tally.add(1.0, elems, s);
        }
        if !trainable {
            tally.leak(1.0, elems, s);
        }
    };
    let layernorm = |tally: &mut Tally, elems: u64, trainable: bool| {
        tally.add(3.0, elems, F32);
        cast(tally, elems);
        tally.add(2.0, elems, s);
        if !trainable {
            tally.leak(2.0, elems, s);
        }
    };
    let norm = |tally: &mut Tally, elems: u64, trainable: bool| match cfg.arch {
        Arch::Qwen25Vl => rms(tally, elems, trainable),
        Arch::Qwen2Vl => layernorm(tally, elems, trainable),
    };
    let mut stages = Vec::new(); // forward order; reversed at the end

    // ---- vision ----------------------------------------------------------------------------
    let (mut vision_stem, mut vision_block, mut vision_blocks, mut merger) = (0, 0, 0, 0);
    let mut vision_block_max = 0;
    let patches = p.patches() as u64;
    if patches > 0 {
        let cv = v.hidden_size as u64;
        let hv = v.num_heads as u64;
        let iv = v.intermediate_size as u64;
        let tv = p.trainable.vision;
        let pd = v.patch_dim() as u64;
        let mut stem = Tally::new();
        if fused {
            // The patch embedding's op computes no gradient for the pixels (they track
            // nothing): the f32 pixels and their cast are kept, nothing of their size flows
            // back, and nothing is left in the gradient store.
            stem.hold(1.0, patches * pd, F32);
            if s != F32 {
                stem.hold(1.0, patches * pd, s);
            }
        } else {
            stem.add(1.0, patches * pd, F32);
            cast(&mut stem, patches * pd);
        }
        lin(&mut stem, patches, cv, false, tv);
        if tv && !fused {
            stem.leak(1.0, patches * pd, s); // the pixels are a matmul input
        }
        if v.window_size.is_some() {
            stem.add(1.0, patches * cv, s);
        }
        // cos and sin, (N, D) in f32 and in the compute dtype
        stem.add(2.0, patches * v.head_dim() as u64, F32);
        cast(&mut stem, 2 * patches * v.head_dim() as u64);

        let mut blocks_total = 0u64;
        let windows = p.vision_windows();
        let full_lens = p.full_attention_lens();
        let mut block_stages = Vec::new();
        // The fused path's units (as the decoder's, below): the attention half keeps v, the
        // rotated q and k, the attention's output and log-sum-exp and the residual sum (not
        // the norm's output, qkv's, the pre-rotary q and k, proj's); the MLP half gate's and
        // up's outputs and the residual sum (not the norm's output, the activation, down's).
        let attn_unit = fused && vision_attn_unit(p);
        let mlp_unit = fused && vision_mlp_unit(p);
        let dropped = match attn_unit {
            true => 7 * patches * cv * s,
            false => 0,
        } + match mlp_unit {
            true => (2 * patches * cv + patches * iv) * s,
            false => 0,
        };
        for i in 0..v.depth {
            let full = v.window_size.is_none() || v.fullatt_block_indexes.contains(&i);
            let lens = if full { &full_lens } else { &windows };
            let mut blk = Tally::new();
            if !attn_unit {
                norm(&mut blk, patches * cv, tv);
                lin(&mut blk, patches, 3 * cv, true, tv);
            }
            if attn_unit {
                blk.add(3.0, patches * cv, s); // q and k rotated, v made contiguous
            } else if fused {
                // q and k made contiguous, rotated; v made contiguous for the attention
                blk.add(5.0, patches * cv, s);
            } else {
                blk.add(9.0, patches * cv, s); // rotary of q and k
                blk.leak(4.0, patches * cv, s); // cos and sin of q and k
                                                // q, k made contiguous per head, v reshaped then made contiguous
                blk.add(4.0, patches * cv, s);
            }
            if !fused && !lens.windows(2).all(|w| w[0] == w[1]) {
                // groups of equal-length ranges: picked q/k/v, the cat and the inverse gather
                blk.add(5.0, patches * cv, s);
            }
            match p.attention {
                AttentionImpl::Eager => {
                    for &l in lens {
                        blk.add(5.0, hv * l * l, s);
                        blk.leak(1.0, hv * l * l, s); // the softmax's detached max
                    }
                    blk.add(2.0, patches * cv, s);
                }
                AttentionImpl::Fused => {
                    blk.add(1.0, patches * hv, F32);
                    blk.add(1.0, patches * cv, s);
                }
            }
            if !attn_unit {
                lin(&mut blk, patches, cv, true, tv);
            }
            blk.add(1.0, patches * cv, s); // residual
            if !mlp_unit {
                norm(&mut blk, patches * cv, tv);
            }
            match cfg.arch {
                Arch::Qwen25Vl => {
                    lin(&mut blk, patches, iv, true, tv);
                    lin(&mut blk, patches, iv, true, tv);
                    if !mlp_unit {
                        // silu and the product (one SwiGLU op on the fused path)
                        blk.add(if fused { 1.0 } else { 2.0 }, patches * iv, s);
                    }
                }
                Arch::Qwen2Vl => {
                    lin(&mut blk, patches, iv, true, tv);
                    blk.add(5.0, patches * iv, s); // quick_gelu: ·k, exp, +1, 1/x, ·x
                }
            }
            if !mlp_unit {
                lin(&mut blk, patches, cv, true, tv);
            }
            blk.add(1.0, patches * cv, s); // residual
            blocks_total += blk.bytes;
            vision_block_max = vision_block_max.max(blk.bytes + dropped);
            block_stages.push(Stage {
                name: "vision block",
                leak: blk.leak,
                largest: blk.largest,
                bytes: blk.bytes,
                input: patches * cv * s,
            });
        }
        vision_blocks = if p.checkpointing.vision() {
            v.depth as u64 * (patches * cv * s + kept_attention(p, patches * cv, patches * hv))
        } else {
            blocks_total
        };
        vision_block = blocks_total / v.depth as u64;

        let units = patches / v.merge_unit() as u64;
        let merged = cv * v.merge_unit() as u64;
        let tm = p.trainable.merger;
        let mut m = Tally::new();
        norm(&mut m, patches * cv, tm);
        lin(&mut m, units, merged, true, tm);
        m.add(1.0, units * merged, s); // gelu
        lin(&mut m, units, c, true, tm);
        if v.window_size.is_some() {
            m.add(1.0, units * c, s);
        }
        vision_stem = stem.bytes;
        merger = m.bytes;
        if p.tracks_vision_blocks() {
            stages.push(Stage {
                name: "vision stem",
                leak: stem.leak,
                largest: stem.largest,
                bytes: stem.bytes,
                input: 0,
            });
            stages.extend(block_stages);
        } else {
            // Frozen blocks run without a graph and free as they go.
            vision_stem = 0;
            vision_blocks = 0;
            if p.tracks_merger() {
                merger += patches * cv * s; // the last block's output, the merger's input
            }
        }
        if p.tracks_merger() {
            stages.push(Stage {
                name: "merger",
                leak: m.leak,
                largest: m.largest,
                bytes: m.bytes,
                input: 0,
            });
        } else {
            merger = units * c * s; // only its output stays
        }
    }

    // ---- language model --------------------------------------------------------------------
    let tl = p.trainable.language;
    let mut stem = Tally::new();
    stem.add(1.0, n * c, s); // embedding gather
    if patches > 0 {
        let feats = patches / v.merge_unit() as u64;
        stem.add(1.0, (n + feats) * c, s); // [embeddings; features]
        stem.add(1.0, n * c, s); // scattered
    }
    stem.add(1.0, b * seq * seq, F32); // attention bias (B, 1, T, T)
    cast(&mut stem, b * seq * seq);
    stem.add(2.0, n * d, F32); // M-RoPE cos, sin
    cast(&mut stem, 2 * n * d);
    stages.push(Stage {
        name: "embeddings",
        leak: 0,
        largest: stem.largest,
        bytes: stem.bytes,
        input: 0,
    });

    let mut layer = Tally::new();
    // The fused path's input norm + attention is one unit (ops::decoder_attention) unless
    // LoRA dropout applies to its projections: the norm's output, the pre-rotary q and k and
    // o's output are not kept (recomputed, not needed, or the residual sum itself).
    let attn_unit = fused && attn_unit(p);
    let attn_dropped = match attn_unit {
        true => (n * c + n * (h + kv) * d + n * c) * s,
        false => 0,
    };
    if !attn_unit {
        rms(&mut layer, n * c, tl);
        lin(&mut layer, n, h * d, true, tl);
        lin(&mut layer, n, kv * d, true, tl);
    }
    lin(&mut layer, n, kv * d, true, tl);
    if fused {
        // q and k rotated (one op each); v used where the projection left it
        layer.add(1.0, n * (h + kv) * d, s);
    } else {
        layer.add(4.5, n * h * d, s);
        layer.add(4.5, n * kv * d, s);
        layer.leak(2.0, n * (h + kv) * d, s); // cos and sin of q and k
        layer.add(1.0, n * kv * d, s); // v made contiguous
    }
    match p.attention {
        AttentionImpl::Eager => {
            layer.add(6.0, b * h * seq * seq, s);
            layer.leak(2.0, b * h * seq * seq, s); // the mask and the softmax's detached max
            layer.add(2.0, n * h * d, s);
        }
        AttentionImpl::Fused => {
            layer.add(1.0, b * h * seq, F32);
            layer.add(1.0, n * h * d, s);
        }
    }
    if !attn_unit {
        lin(&mut layer, n, c, false, tl); // o's output
    }
    layer.add(1.0, n * c, s); // residual

    // The fused path's norm + MLP is one unit (ops::decoder_mlp) unless LoRA dropout applies
    // to the MLP: gate and up kept (and each adapter's x·Aᵀ, rows × r: left out), the norm's
    // output and the activation recomputed in the backward, the down projection added to the
    // residual in the unit (no output of its own).
    let unit = fused && mlp_unit(p);
    let unit_dropped = match unit {
        true => (n * c + n * inter + n * c) * s,
        false => 0,
    };
    if !unit {
        rms(&mut layer, n * c, tl);
    }
    lin(&mut layer, n, inter, false, tl);
    lin(&mut layer, n, inter, false, tl);
    if !unit {
        // silu and the product (one SwiGLU op on the fused path), then down's output
        layer.add(if fused { 1.0 } else { 2.0 }, n * inter, s);
        lin(&mut layer, n, c, false, tl);
    }
    layer.add(1.0, n * c, s); // residual
    let l = t.num_hidden_layers as u64;
    let decoder_layers = if p.checkpointing.decoder() {
        let kept = (p.kept_decoder_layers as u64).min(l);
        (l - kept) * (n * c * s + kept_attention(p, n * h * d, b * h * seq)) + kept * layer.bytes
    } else {
        l * layer.bytes
    };
    for _ in 0..l {
        stages.push(Stage {
            name: "decoder layer",
            leak: layer.leak,
            largest: layer.largest,
            bytes: layer.bytes,
            input: n * c * s,
        });
    }

    let labelled = p.labelled_rows() as u64;
    let vocab = t.vocab_size as u64;
    let mut head = Tally::new();
    rms(&mut head, n * c, tl);
    head.add(1.0, labelled * c, s); // labelled rows gathered
    match p.attention {
        AttentionImpl::Eager if p.grpo.is_some() => {
            // GRPO's token scores (`Qwen2VL::head_logps`): logits, the f32 cast, / temperature,
            // + the suppression bias, token_nll's shift and exp; then the entropy's log-softmax
            // of the detached logits (outside the graph, freed as the forward ends): counted
            // as two more.
            head.add(1.0, labelled * vocab, s); // logits
            cast(&mut head, labelled * vocab);
            head.add(6.0, labelled * vocab, F32);
            head.leak(1.0, labelled * vocab, F32); // the detached max
        }
        AttentionImpl::Eager => {
            head.add(1.0, labelled * vocab, s); // logits
            cast(&mut head, labelled * vocab);
            head.add(2.0, labelled * vocab, F32); // shifted, exp
            head.leak(1.0, labelled * vocab, F32); // the detached max
        }
        AttentionImpl::Fused => {
            // The fused kernels' linear cross-entropy (omr_kernels::linear_ce): no N × V
            // logits; dH and (for a head that trains) dW are computed in the forward (f32
            // sums; dW straight in w's dtype when one 2048-row chunk covers the labelled
            // tokens, counted at f32 all the same: the safe side) and kept for the backward,
            // next to one logits tile (LceChunks::default, 2048 × 32768, f32), and the row
            // chunk's other tiles when it keeps them for the gradient pass (the training loss
            // keeps up to 1 GiB: Qwen's 151 936 entries in bf16). GRPO's linear log-prob
            // (omr_kernels::linear_logp) makes the same dH, dW sums and tiles in its backward
            // instead (recomputed, never kept), and keeps (N) f32 sums.
            let ch = omr_kernels::linear_ce::LceChunks::default();
            let rows = labelled.min(ch.rows as u64);
            let block = vocab.min(ch.vocab as u64);
            head.add(1.0, labelled * c, F32);
            if p.trainable.language {
                head.add(1.0, vocab * c, F32);
            }
            // The tile is the forward's (the backward only scales dH and dW): counted, but
            // no gradient of its size is ever in flight.
            head.hold(1.0, rows * block, F32);
            if p.grpo.is_none() && ch.keeps_tiles(rows as usize, vocab as usize, s as usize) {
                head.add(1.0, rows * (vocab - block), s);
            }
        }
    }
    stages.push(Stage {
        name: "lm head + loss",
        leak: head.leak,
        largest: head.largest,
        bytes: head.bytes,
        input: n * c * s,
    });
    stages.reverse();
    let largest = stages.iter().map(|st| st.largest).max().unwrap_or(0);

    Activations {
        vision_stem,
        vision_block,
        vision_blocks,
        vision_block_max,
        merger,
        text_stem: stem.bytes,
        decoder_layer: layer.bytes,
        decoder_layer_forward: layer.bytes + attn_dropped + unit_dropped,
        decoder_layers,
        logits_loss: head.bytes,
        largest_tensor: largest,
        stages,
    }
}
