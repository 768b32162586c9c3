//! The vision tower and patch merger of Qwen2-VL and Qwen2.5-VL.
//!
//! pixel_values (N, C·T·P·P) → patch embedding (the Conv3d with kernel = stride is a matmul on
//! the flattened patch) → blocks with 2-D rotary and block-diagonal attention → merger, which
//! concatenates each 2×2 block of patches and projects it to the language model's width.
//! Qwen2.5-VL attends inside windows of `window_size` pixels except in
//! `fullatt_block_indexes`; to make windows contiguous it permutes merge units into window order
//! before the blocks and restores image order after the merger, as transformers does.
//!
//! Under `Kernels::Fused` the RMSNorms (Qwen2.5-VL), the SwiGLU gate, the 2-D rotary and the
//! block-diagonal attention (flash attention with one segment id per image or window, B = 1)
//! are omr-kernels' fused ops; Qwen2-VL's LayerNorm and QuickGELU stay candle ops. A
//! Qwen2.5-VL block is then two units, as a decoder layer is (`ops::decoder_attention` with
//! the packed qkv, `ops::decoder_mlp` with the biases), unless a LoRA adapter on it draws
//! dropout.

use crate::attention::attend_blocks;
use crate::block::{self, VisionWeights};
use crate::config::{Arch, ModelConfig, VisionConfig};
use crate::fused;
use crate::linear::{Ctx, Kernels, Linear};
use crate::ops;
use crate::params::Params;
use crate::rope::{vision_cos_sin, vision_patch_coords};
use candle_core::{Result, Tensor};
use omr_kernels::AttnMask;

enum Norm {
    Rms(Tensor),
    Layer(Tensor, Tensor),
}

impl Norm {
    fn load(params: &Params, name: &str, arch: Arch) -> crate::Result<Norm> {
        let w = params.get(&format!("{name}.weight"))?;
        Ok(match arch {
            Arch::Qwen25Vl => Norm::Rms(w),
            Arch::Qwen2Vl => Norm::Layer(w, params.get(&format!("{name}.bias"))?),
        })
    }
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        match self {
            Norm::Rms(w) => fused::rmsnorm(x, w, 1e-6, ctx),
            Norm::Layer(w, b) => ops::layernorm(x, w, b, 1e-6),
        }
    }
}

enum Mlp {
    /// Qwen2.5-VL: down(silu(gate(x)) · up(x)), with biases.
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// Qwen2-VL: fc2(quick_gelu(fc1(x))).
    QuickGelu { fc1: Linear, fc2: Linear },
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
    heads: usize,
}

impl Block {
    /// x: (N, C) → (N, C). `windowed`: attend inside windows rather than whole images.
    fn forward(
        &self,
        x: &Tensor,
        tables: &VisionTables,
        cu: &[usize],
        windowed: bool,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        if let (Some((cos, sin, mask)), Some(w)) =
            (tables.fused(windowed), self.one_op_weights(x, ctx))
        {
            return block::vision_layer(x, &w, self.heads, cos, sin, mask);
        }
        let x = self.attention(x, tables, cu, windowed, ctx)?;
        self.mlp(&x, ctx)
    }

    /// The attention half, `x + proj(attention(norm1(x)))`. On the fused path with
    /// Qwen2.5-VL's RMSNorm and adapters without dropout, one unit
    /// (`ops::decoder_attention` with the packed qkv: the norm's output and the pre-rotary
    /// q, k are not kept for the backward).
    fn attention(
        &self,
        x: &Tensor,
        tables: &VisionTables,
        cu: &[usize],
        windowed: bool,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let d = c / self.heads;
        if let (Some((cos, sin, mask)), Norm::Rms(norm), Some(qkv), Some(proj), true) = (
            tables.fused(windowed),
            &self.norm1,
            self.qkv.unit_parts(ctx),
            self.proj.unit_parts(ctx),
            ctx.kernels == Kernels::Fused && n > 0 && fused::attn_unit_enabled(),
        ) {
            let w = ops::AttnWeights {
                norm: (norm, 1e-6),
                qkv: ops::Qkv::Packed((qkv.0, qkv.1)),
                o: (proj.0, proj.1),
                lora: [qkv.2.as_ref(), None, None, proj.2.as_ref()],
                heads: self.heads,
                kv_heads: self.heads,
                head_dim: d,
            };
            return fused::decoder_attention(x, &w, cos, sin, mask);
        }
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x, ctx)?, ctx)?
            .reshape((n, 3, self.heads, d))?;
        let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1); // (N, H, D)
        let a = match tables {
            VisionTables::Candle { cos, sin } => {
                let q = ops::apply_rotary(&part(0)?, cos, sin)?;
                let k = ops::apply_rotary(&part(1)?, cos, sin)?;
                attend_blocks(&q, &k, &part(2)?, cu)?
            }
            VisionTables::Fused {
                cos,
                sin,
                full,
                windows,
            } => {
                let mask = block_mask(full, windows, windowed);
                // One batch row of N patches: (1, N, H, D).
                let q = fused::rotary(&part(0)?.unsqueeze(0)?, cos, sin)?;
                let k = fused::rotary(&part(1)?.unsqueeze(0)?, cos, sin)?;
                let v = part(2)?.unsqueeze(0)?;
                fused::attention(&q, &k, &v, mask)?.reshape((n, c))?
            }
        };
        x + self.proj.forward(&a, ctx)?
    }

    /// The MLP half, `x + mlp(norm2(x))`. On the fused path with Qwen2.5-VL's RMSNorm and
    /// SwiGLU and adapters without dropout, one unit (`ops::decoder_mlp` with the biases:
    /// neither the norm's output nor the activation is kept for the backward).
    fn mlp(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if let (Norm::Rms(norm), Mlp::SwiGlu { gate, up, down }, Kernels::Fused, true) = (
            &self.norm2,
            &self.mlp,
            ctx.kernels,
            x.elem_count() > 0 && fused::mlp_unit_enabled(),
        ) {
            if let (Some(g), Some(u), Some(d)) = (
                gate.unit_parts(ctx),
                up.unit_parts(ctx),
                down.unit_parts(ctx),
            ) {
                let w = ops::MlpWeights {
                    gate: g.0,
                    up: u.0,
                    down: d.0,
                    bias: [g.1, u.1, d.1],
                    lora: [g.2.as_ref(), u.2.as_ref(), d.2.as_ref()],
                    norm: Some((norm, 1e-6)),
                };
                return fused::decoder_mlp(x, &w);
            }
        }
        let h = self.norm2.forward(x, ctx)?;
        let m = match &self.mlp {
            Mlp::SwiGlu { gate, up, down } => {
                let g = fused::swiglu(&gate.forward(&h, ctx)?, &up.forward(&h, ctx)?, ctx)?;
                down.forward(&g, ctx)?
            }
            Mlp::QuickGelu { fc1, fc2 } => {
                fc2.forward(&ops::quick_gelu(&fc1.forward(&h, ctx)?)?, ctx)?
            }
        };
        x + m
    }
}

impl Block {
    /// The weights when this block runs as one op ([`block`]): opted in, fused kernels,
    /// Qwen2.5-VL's RMSNorm and SwiGLU, every linear with its bias and no LoRA.
    fn one_op_weights(&self, x: &Tensor, ctx: &Ctx) -> Option<VisionWeights> {
        if ctx.kernels != Kernels::Fused || !block::block_op_enabled() || !block::supports(x) {
            return None;
        }
        let (Norm::Rms(n1), Norm::Rms(n2), Mlp::SwiGlu { gate, up, down }) =
            (&self.norm1, &self.norm2, &self.mlp)
        else {
            return None;
        };
        let wb = |l: &Linear| match (&l.lora, &l.bias) {
            (None, Some(b)) => Some((l.weight.clone(), b.clone())),
            _ => None,
        };
        Some(VisionWeights {
            norm1: n1.clone(),
            qkv: wb(&self.qkv)?,
            proj: wb(&self.proj)?,
            norm2: n2.clone(),
            gate: wb(gate)?,
            up: wb(up)?,
            down: wb(down)?,
        })
    }
}

pub struct VisionTower {
    cfg: VisionConfig,
    patch_embed: Linear,
    blocks: Vec<Block>,
    merger_norm: Norm,
    merger_fc1: Linear,
    merger_fc2: Linear,
}

impl VisionTower {
    pub fn load(cfg: &ModelConfig, params: &Params) -> crate::Result<VisionTower> {
        let v = &cfg.vision;
        let arch = cfg.arch;
        let w = params.get("visual.patch_embed.proj.weight")?;
        let patch_embed = Linear {
            name: "visual.patch_embed.proj".into(),
            weight: w.reshape((v.hidden_size, v.patch_dim()))?,
            bias: None,
            lora: None,
        };
        let mut blocks = Vec::with_capacity(v.depth);
        for i in 0..v.depth {
            let b = format!("visual.blocks.{i}");
            let mlp = match arch {
                Arch::Qwen25Vl => Mlp::SwiGlu {
                    gate: Linear::load(params, &format!("{b}.mlp.gate_proj"), true)?,
                    up: Linear::load(params, &format!("{b}.mlp.up_proj"), true)?,
                    down: Linear::load(params, &format!("{b}.mlp.down_proj"), true)?,
                },
                Arch::Qwen2Vl => Mlp::QuickGelu {
                    fc1: Linear::load(params, &format!("{b}.mlp.fc1"), true)?,
                    fc2: Linear::load(params, &format!("{b}.mlp.fc2"), true)?,
                },
            };
            blocks.push(Block {
                norm1: Norm::load(params, &format!("{b}.norm1"), arch)?,
                norm2: Norm::load(params, &format!("{b}.norm2"), arch)?,
                qkv: Linear::load(params, &format!("{b}.attn.qkv"), true)?,
                proj: Linear::load(params, &format!("{b}.attn.proj"), true)?,
                mlp,
                heads: v.num_heads,
            });
        }
        Ok(VisionTower {
            cfg: v.clone(),
            patch_embed,
            blocks,
            merger_norm: Norm::load(params, "visual.merger.ln_q", arch)?,
            merger_fc1: Linear::load(params, "visual.merger.mlp.0", true)?,
            merger_fc2: Linear::load(params, "visual.merger.mlp.2", true)?,
        })
    }

    /// pixel_values: (N, C·T·P·P), one row per patch in processor order, images in `grids`
    /// order → (N / merge², out_hidden): one row per image token, in image order.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (mut x, run) = self.embed(pixel_values, grids, ctx)?;
        for i in 0..self.blocks.len() {
            x = self.block(i, &x, &run, ctx)?;
            if ctx.no_grad {
                x = x.detach();
            }
        }
        let out = self.merge(&x, &run, ctx)?;
        Ok(if ctx.no_grad { out.detach() } else { out })
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Patch embedding, in window order for Qwen2.5-VL: (N, C·T·P·P) → (N, C), plus what the
    /// blocks and the merger need.
    pub fn embed(
        &self,
        pixel_values: &Tensor,
        grids: &[[usize; 3]],
        ctx: &Ctx,
    ) -> Result<(Tensor, VisionRun)> {
        let v = &self.cfg;
        let unit = v.merge_unit();
        let n: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if pixel_values.dims() != [n, v.patch_dim()] {
            candle_core::bail!(
                "pixel_values has shape {:?} but image_grid_thw describes {n} patches of {} values",
                pixel_values.dims(),
                v.patch_dim()
            );
        }
        let layout = WindowLayout::new(grids, v);
        // Pixels arrive in f32 from the processor; the tower computes in its weights' dtype.
        let pixel_values = pixel_values.to_dtype(self.patch_embed.weight.dtype())?;
        let x = self.patch_embed.forward(&pixel_values, ctx)?;
        let mut coords = vision_patch_coords(grids, v.spatial_merge_size);
        let x = match &layout.window_index {
            Some(order) => {
                let idx = Tensor::from_vec(order.clone(), (order.len(),), x.device())?;
                let c = x.dim(1)?;
                coords = order
                    .iter()
                    .flat_map(|&u| coords[u as usize * unit..(u as usize + 1) * unit].to_vec())
                    .collect();
                x.reshape((n / unit, unit, c))?
                    .index_select(&idx, 0)?
                    .reshape((n, c))?
            }
            None => x,
        };
        let tables = match ctx.kernels {
            Kernels::Candle => {
                let (cos, sin) = vision_cos_sin(&coords, v, x.device())?;
                VisionTables::Candle {
                    cos: cos.to_dtype(x.dtype())?,
                    sin: sin.to_dtype(x.dtype())?,
                }
            }
            Kernels::Fused => {
                let (cos, sin) = omr_kernels::vision_tables(&coords, v.head_dim(), x.device())?;
                let windows = match layout.window_index {
                    Some(_) => Some(fused::ranges_mask(&layout.cu_windows, x.device())?),
                    None => None,
                };
                VisionTables::Fused {
                    cos,
                    sin,
                    full: fused::ranges_mask(&layout.cu_full, x.device())?,
                    windows,
                }
            }
        };
        Ok((x, VisionRun { tables, layout, n }))
    }

    /// Vision block `i`: (N, C) → (N, C), the unit activation checkpointing recomputes.
    pub fn block(&self, i: usize, x: &Tensor, run: &VisionRun, ctx: &Ctx) -> Result<Tensor> {
        let layout = &run.layout;
        let windowed =
            layout.window_index.is_some() && !self.cfg.fullatt_block_indexes.contains(&i);
        let cu = if windowed {
            &layout.cu_windows
        } else {
            &layout.cu_full
        };
        self.blocks[i].forward(x, &run.tables, cu, windowed, ctx)
    }

    /// Patch merger, back in image order: (N, C) → (N / merge², out_hidden).
    pub fn merge(&self, x: &Tensor, run: &VisionRun, ctx: &Ctx) -> Result<Tensor> {
        let (n, unit) = (run.n, self.cfg.merge_unit());
        let c = x.dim(1)?;
        let h = self
            .merger_norm
            .forward(x, ctx)?
            .reshape((n / unit, unit * c))?;
        let h = self.merger_fc1.forward(&h, ctx)?.gelu_erf()?;
        let out = self.merger_fc2.forward(&h, ctx)?;
        match &run.layout.window_index {
            Some(order) => {
                let mut inverse = vec![0u32; order.len()];
                for (pos, &u) in order.iter().enumerate() {
                    inverse[u as usize] = pos as u32;
                }
                let idx = Tensor::from_vec(inverse, (order.len(),), out.device())?;
                out.index_select(&idx, 0)
            }
            None => Ok(out),
        }
    }
}

/// What one forward of the tower shares between its blocks: the rotary tables and the
/// attention ranges of the images it runs on.
pub struct VisionRun {
    tables: VisionTables,
    layout: WindowLayout,
    n: usize,
}

/// Rotary tables and masks of the blocks, in the form the pass's kernels take.
enum VisionTables {
    /// cos/sin (N, 1, D) in the compute dtype; the ranges are passed per block.
    Candle { cos: Tensor, sin: Tensor },
    /// Half tables (1, N, D/2) f32; segment-id masks of whole images and (Qwen2.5-VL) windows.
    Fused {
        cos: Tensor,
        sin: Tensor,
        full: AttnMask,
        windows: Option<AttnMask>,
    },
}

impl VisionTables {
    /// On the fused path, a block's rotary tables and mask (its windows, or whole images).
    fn fused(&self, windowed: bool) -> Option<(&Tensor, &Tensor, &AttnMask)> {
        match self {
            VisionTables::Fused {
                cos,
                sin,
                full,
                windows,
            } => Some((cos, sin, block_mask(full, windows, windowed))),
            VisionTables::Candle { .. } => None,
        }
    }
}

/// A windowed block's mask when the tower has windows, else the whole images'.
fn block_mask<'a>(
    full: &'a AttnMask,
    windows: &'a Option<AttnMask>,
    windowed: bool,
) -> &'a AttnMask {
    match windows {
        Some(w) if windowed => w,
        _ => full,
    }
}

/// Which rows attend to which: per-frame ranges for full attention and, for Qwen2.5-VL, the
/// window order of merge units with per-window ranges (transformers' `get_window_index`).
struct WindowLayout {
    cu_full: Vec<usize>,
    window_index: Option<Vec<u32>>,
    cu_windows: Vec<usize>,
}

impl WindowLayout {
    fn new(grids: &[[usize; 3]], v: &VisionConfig) -> WindowLayout {
        let mut cu_full = vec![0];
        for &[t, h, w] in grids {
            for _ in 0..t {
                cu_full.push(cu_full.last().expect("non-empty") + h * w);
            }
        }
        let Some(window) = v.window_size else {
            return WindowLayout {
                cu_full,
                window_index: None,
                cu_windows: Vec::new(),
            };
        };
        let merge = v.spatial_merge_size;
        let unit = v.merge_unit();
        let ws = window / merge / v.patch_size;
        let mut index = Vec::new();
        let mut cu_windows = vec![0usize];
        let mut offset = 0usize;
        for &[t, h, w] in grids {
            let (gh, gw) = (h / merge, w / merge);
            // transformers pads by `ws - g % ws`, a whole empty window when g % ws == 0;
            // empty windows add no rows and their repeated boundary is dropped below.
            let (nh, nw) = ((gh + ws - gh % ws) / ws, (gw + ws - gw % ws) / ws);
            for ti in 0..t {
                for wh in 0..nh {
                    for ww in 0..nw {
                        let mut count = 0;
                        for i in 0..ws {
                            for j in 0..ws {
                                let (r, c) = (wh * ws + i, ww * ws + j);
                                if r < gh && c < gw {
                                    index.push((offset + ti * gh * gw + r * gw + c) as u32);
                                    count += 1;
                                }
                            }
                        }
                        let last = *cu_windows.last().expect("non-empty");
                        if count > 0 {
                            cu_windows.push(last + count * unit);
                        }
                    }
                }
            }
            offset += t * gh * gw;
        }
        WindowLayout {
            cu_full,
            window_index: Some(index),
            cu_windows,
        }
    }
}
