//! Positions and rotary tables: the 3-D M-RoPE position ids of the language model (what
//! transformers' `get_rope_index` computes for images) and the 2-D rotary of the vision tower.
//!
//! Positions are computed on the host from token ids and image grids: they are small integer
//! tables, and the generation engine needs them per row anyway. cos/sin are built in f32 exactly
//! as transformers builds them (`inv_freq` in f32, angle = position · inv_freq in f32).

use crate::config::{ModelConfig, TextConfig, VisionConfig};
use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};

/// M-RoPE positions of one contiguous sequence (no padding), consuming its images' grids
/// `(t, h, w)` in order from `grids`. Returns three rows (temporal, height, width).
///
/// Text advances all three axes together; an image's `<|image_pad|>` run gets `(t, h, w)` grid
/// coordinates (after the spatial merge) offset by the position where it starts, and the text
/// after it resumes at `max + 1`. `grids` must hold at least as many entries as the sequence
/// has images (an image is a `vision_start` token followed by `image_token_id`).
pub fn rope_index(
    ids: &[u32],
    grids: &mut impl Iterator<Item = [usize; 3]>,
    cfg: &ModelConfig,
) -> Result<[Vec<i64>; 3]> {
    let merge = cfg.vision.spatial_merge_size;
    let mut pos: [Vec<i64>; 3] = [
        Vec::with_capacity(ids.len()),
        Vec::with_capacity(ids.len()),
        Vec::with_capacity(ids.len()),
    ];
    let mut next: i64 = 0;
    let mut i = 0;
    while i < ids.len() {
        let starts_image =
            ids[i] == cfg.image_token_id && i > 0 && ids[i - 1] == cfg.vision_start_token_id;
        if !starts_image {
            for axis in pos.iter_mut() {
                axis.push(next);
            }
            next += 1;
            i += 1;
            continue;
        }
        let [t, h, w] = grids.next().ok_or_else(|| {
            ModelError::Input("more images in input_ids than rows in image_grid_thw".into())
        })?;
        let (gh, gw) = (h / merge, w / merge);
        let n = t * gh * gw;
        if i + n > ids.len() || ids[i..i + n].iter().any(|&x| x != cfg.image_token_id) {
            return Err(ModelError::Input(format!(
                "an image of grid {t}x{h}x{w} needs {n} consecutive image tokens in input_ids"
            )));
        }
        let base = next;
        // Images have no time stride (second_per_grid_t = 0 for images).
        for _ in 0..t {
            for hi in 0..gh {
                for wi in 0..gw {
                    pos[0].push(base);
                    pos[1].push(base + hi as i64);
                    pos[2].push(base + wi as i64);
                }
            }
        }
        next = base + (gh.max(gw).max(1)) as i64;
        i += n;
    }
    Ok(pos)
}

/// Inverse frequencies `1 / theta^(2j/dim)` for j < dim/2, in f32 as torch computes them.
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|j| 1.0f32 / (theta as f32).powf((2 * j) as f32 / dim as f32))
        .collect()
}

/// cos and sin of the language model, (B, 1, T, D), for positions `pos[axis][b][t]`.
/// Frequency j of the half-dimension uses axis `s` where `mrope_section` puts j; the second half
/// repeats the first (transformers' `cat(freqs, freqs)` then the section split).
pub fn mrope_cos_sin(
    pos: &[Vec<Vec<i64>>; 3],
    text: &TextConfig,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = text.head_dim;
    let inv = inv_freq(d, text.rope_theta);
    let mut axis_of = Vec::with_capacity(d / 2);
    for (a, &n) in text.mrope_section.iter().enumerate() {
        axis_of.extend(std::iter::repeat_n(a, n));
    }
    let b = pos[0].len();
    let t = pos[0].first().map_or(0, Vec::len);
    let mut cos = Vec::with_capacity(b * t * d);
    let mut sin = Vec::with_capacity(b * t * d);
    for bi in 0..b {
        for ti in 0..t {
            for k in 0..d {
                let j = k % (d / 2);
                let angle = pos[axis_of[j]][bi][ti] as f32 * inv[j];
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (b, 1, t, d), device)?,
        Tensor::from_vec(sin, (b, 1, t, d), device)?,
    ))
}

/// (h, w) patch coordinates of every vision patch in the order the image processor emits them
/// (merge blocks of `merge × merge` patches, row-major inside each block).
pub fn vision_patch_coords(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for ih in 0..merge {
                        for iw in 0..merge {
                            out.push((bh * merge + ih, bw * merge + iw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// cos and sin of the vision tower, (N, 1, Dv), in the patch order given by `coords`.
/// The first quarter of the head rotates with h, the second with w, then both repeat.
pub fn vision_cos_sin(
    coords: &[(usize, usize)],
    v: &VisionConfig,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = v.head_dim();
    let inv = inv_freq(d / 2, 10000.0);
    let q = inv.len();
    let mut cos = Vec::with_capacity(coords.len() * d);
    let mut sin = Vec::with_capacity(coords.len() * d);
    for &(h, w) in coords {
        for _ in 0..2 {
            for p in [h, w] {
                for &f in &inv[..q] {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
    }
    let n = coords.len();
    Ok((
        Tensor::from_vec(cos, (n, 1, d), device)?,
        Tensor::from_vec(sin, (n, 1, d), device)?,
    ))
}
