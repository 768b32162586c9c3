//! Attention as plain differentiable candle ops: the causal/padded/packed attention of the
//! language model and the block-diagonal (per image or per window) attention of the vision
//! tower. The fused flash attention of omr-kernels replaces these under `Kernels::Fused`
//! (crate::fused); these stay the reference it is tested against.
//!
//! Scores go through the softmax in f32 whatever the compute dtype, as transformers' eager
//! attention does (`softmax(dtype=float32)`, then back to the compute dtype).

use crate::ops::softmax_last;
use candle_core::{DType, Device, Result, Tensor};

/// Additive attention bias (B, 1, T, S): 0 where query t may attend key s, `f32::MIN`
/// elsewhere. `segments[b][s]` is the segment of key s (0 = padding; packed samples get 1, 2, …),
/// and the T queries are the last T keys. A query attends keys at or before it in its own
/// segment. A padding query attends nothing, so its row is uniform (its output is never used),
/// as in transformers' eager attention.
pub fn bias(segments: &[Vec<u32>], t: usize, device: &Device) -> Result<Tensor> {
    let b = segments.len();
    let s = segments.first().map_or(0, Vec::len);
    let offset = s - t;
    let mut out = vec![f32::MIN; b * t * s];
    for (bi, seg) in segments.iter().enumerate() {
        for ti in 0..t {
            let q = offset + ti;
            let sq = seg[q];
            if sq == 0 {
                continue;
            }
            let row = &mut out[(bi * t + ti) * s..(bi * t + ti + 1) * s];
            for (si, r) in row.iter_mut().enumerate().take(q + 1) {
                if seg[si] == sq {
                    *r = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(out, (b, 1, t, s), device)
}

/// Scaled dot-product attention with grouped key/value heads.
/// q: (B, H, T, D), k/v: (B, KV, S, D), bias: (B, 1, T, S) f32 → (B, T, H·D)
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, kv, s, _) = k.dims4()?;
    let rep = h / kv;
    let scale = 1.0 / (d as f64).sqrt();
    // Heads h = kv·rep + r share key head kv: fold the rep heads into the query rows instead of
    // copying keys and values rep times.
    let q = q.contiguous()?.reshape((b, kv, rep * t, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?.reshape((b, kv, rep, t, s))?;
    let scores = scores
        .to_dtype(DType::F32)?
        .broadcast_add(&bias.to_dtype(DType::F32)?.unsqueeze(1)?)?;
    let p = softmax_last(&scores)?
        .to_dtype(q.dtype())?
        .reshape((b, kv, rep * t, s))?;
    let o = p.matmul(&rows_major(v)?)?.reshape((b, h, t, d))?;
    o.transpose(1, 2)?.reshape((b, t, h * d))
}

/// `x` (B, KV, S, D) as a matmul operand: itself when its rows are contiguous and its batch
/// axes fold into one stride (a view of the key/value cache's buffers), else a contiguous copy.
fn rows_major(x: &Tensor) -> Result<Tensor> {
    let (st, dims) = (x.stride(), x.dims());
    if st.len() == 4 && st[3] == 1 && st[2] == dims[3] && st[0] == st[1] * dims[1] {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// Block-diagonal self-attention over contiguous row ranges `cu` (cumulative lengths starting
/// at 0): rows attend only inside their own range. Ranges of equal length are batched into one
/// matmul. q/k/v: (N, H, D) → (N, H·D)
pub fn attend_blocks(q: &Tensor, k: &Tensor, v: &Tensor, cu: &[usize]) -> Result<Tensor> {
    let (n, h, d) = q.dims3()?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for w in cu.windows(2) {
        if w[1] > w[0] {
            by_len.entry(w[1] - w[0]).or_default().push(w[0]);
        }
    }
    let dense = |q: &Tensor, k: &Tensor, v: &Tensor, m: usize, l: usize| -> Result<Tensor> {
        // (m·l, H, D) → (m, H, l, D)
        let shape = |x: &Tensor| x.reshape((m, l, h, d))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (shape(q)?, shape(k)?, shape(v)?);
        let p = softmax_last(&(q.matmul(&k.t()?)? * scale)?)?;
        p.matmul(&v)?.transpose(1, 2)?.reshape((m * l, h * d))
    };
    if by_len.len() == 1 {
        let (&l, starts) = by_len.iter().next().expect("one group");
        if starts.len() * l == n {
            return dense(q, k, v, starts.len(), l);
        }
    }
    let mut order: Vec<u32> = Vec::with_capacity(n);
    let mut outs = Vec::with_capacity(by_len.len());
    for (&l, starts) in &by_len {
        let idx: Vec<u32> = starts
            .iter()
            .flat_map(|&s| (s as u32)..(s + l) as u32)
            .collect();
        order.extend_from_slice(&idx);
        let idx = Tensor::from_vec(idx, n_of(starts.len() * l), q.device())?;
        let pick = |x: &Tensor| x.contiguous()?.index_select(&idx, 0);
        outs.push(dense(&pick(q)?, &pick(k)?, &pick(v)?, starts.len(), l)?);
    }
    let grouped = Tensor::cat(&outs, 0)?;
    let mut inverse = vec![0u32; order.len()];
    for (pos, &row) in order.iter().enumerate() {
        inverse[row as usize] = pos as u32;
    }
    let inverse = Tensor::from_vec(inverse, n_of(n), q.device())?;
    grouped.index_select(&inverse, 0)
}

fn n_of(n: usize) -> (usize,) {
    (n,)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_equal_masked_dense_attention() -> Result<()> {
        let dev = Device::Cpu;
        let (n, h, d) = (10, 2, 4);
        let vals: Vec<f32> = (0..n * h * d)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let q = Tensor::from_vec(vals.clone(), (n, h, d), &dev)?;
        let k = (q.clone() * 0.5)?;
        let v = (q.clone() + 1.0)?;
        let cu = [0, 3, 6, 10];
        let got = attend_blocks(&q, &k, &v, &cu)?.to_vec2::<f32>()?;
        // Reference: one dense attention per block.
        for w in cu.windows(2) {
            let l = w[1] - w[0];
            let r = attend_blocks(
                &q.narrow(0, w[0], l)?,
                &k.narrow(0, w[0], l)?,
                &v.narrow(0, w[0], l)?,
                &[0, l],
            )?
            .to_vec2::<f32>()?;
            for i in 0..l {
                for (a, b) in got[w[0] + i].iter().zip(&r[i]) {
                    assert!((a - b).abs() < 1e-6);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn packed_bias_isolates_segments() -> Result<()> {
        let b = bias(&[vec![1, 1, 2, 2, 0]], 5, &Device::Cpu)?;
        let rows = b.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        let allowed: Vec<Vec<bool>> = rows
            .iter()
            .map(|r| r.iter().map(|&x| x == 0.0).collect())
            .collect();
        assert_eq!(allowed[1], [true, true, false, false, false]);
        assert_eq!(allowed[3], [false, false, true, true, false]);
        assert_eq!(allowed[4], [false; 5]);
        Ok(())
    }
}
