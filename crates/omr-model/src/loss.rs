//! Next-token cross-entropy over labelled positions, as transformers' `ForCausalLMLoss` defines
//! it: the label of position t is scored by the logits of position t−1, `-100` is ignored.
//!
//! Only the rows that carry a label are gathered before the log-softmax, so prompt and padding
//! positions cost nothing. Returns the *sum* and the count: a training step normalises by the
//! labelled tokens of the whole accumulated batch, not per micro-batch.

use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor, D};

pub const IGNORE: i64 = -100;

/// Rows of the flattened (B·T) logits that predict a label, and the labels they predict.
pub fn shifted_targets(labels: &[Vec<i64>], vocab: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let t = labels.first().map_or(0, Vec::len);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, row) in labels.iter().enumerate() {
        for j in 1..row.len() {
            let l = row[j];
            if l == IGNORE {
                continue;
            }
            if l < 0 || l as usize >= vocab {
                return Err(ModelError::Input(format!(
                    "label {l} at row {b}, position {j} is outside the vocabulary ({vocab})"
                )));
            }
            rows.push((b * t + j - 1) as u32);
            targets.push(l as u32);
        }
    }
    Ok((rows, targets))
}

/// Sum of −log p(label) over labelled positions, and their count.
/// logits: (B, T, V) → scalar
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
    let (b, t, v) = logits.dims3()?;
    if labels.len() != b || labels.iter().any(|r| r.len() != t) {
        return Err(ModelError::Input(format!(
            "labels must be ({b}, {t}) like the logits"
        )));
    }
    let (rows, targets) = shifted_targets(labels, v)?;
    let n = rows.len();
    if n == 0 {
        return Ok((Tensor::zeros((), DType::F32, logits.device())?, 0));
    }
    let dev = logits.device();
    let picked = logits
        .reshape((b * t, v))?
        .index_select(&Tensor::from_vec(rows, (n,), dev)?, 0)?
        .to_dtype(DType::F32)?;
    Ok((token_nll(&picked, &targets)?.sum_all()?, n))
}

/// −log softmax(logits)[target] per row. logits: (N, V) → (N,)
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let n = targets.len();
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let idx = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    let chosen = shifted.gather(&idx, 1)?;
    Ok((lse - chosen)?.squeeze(1)?)
}

/// log softmax over the last dimension (no gradient needed: entropy logging).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let s = x.broadcast_sub(&max)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(s.broadcast_sub(&lse)?)
}
