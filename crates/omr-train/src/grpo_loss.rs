//! The GRPO objective: group-relative advantages and the clipped per-token policy loss, with
//! TRL's four reductions (`grpo`, `bnpo`, `dr_grpo`, `dapo`).
//!
//! Formulas follow TRL 1.16.0 `GRPOTrainer` (`_generate_and_score_completions` for the
//! advantages, `_compute_loss` for the loss, token-level importance sampling) and are checked
//! against plain-torch fixtures made by `scripts/fixtures/make_grpo_fixtures.py`.
//!
//! Notable choices:
//! - Only differentiable candle ops on the `logp` path (CANDLE.md §1): `exp`, `clamp`
//!   (maximum/minimum, both with a backward), `where_cond` for the elementwise min, sums.
//!   `min(l1, l2)` is `where(l1 <= l2, l1, l2)`: on a tie (ratio inside the clip range) the whole
//!   gradient flows through the unclipped term, which equals torch's half-and-half split
//!   summed back through `clamp`.
//! - The loss is reduced over *this* micro-batch. TRL divides grpo/bnpo/dr_grpo by the number of
//!   accumulation steps afterwards, and for dapo divides by the token count of the whole
//!   accumulation window (`num_items_in_batch`). Our caller knows the window, so `dapo` here
//!   divides by the micro-batch's own mask-token count (the same value as `bnpo`) and
//!   [`LossStats::num_tokens`] is returned: multiplying the loss by
//!   `num_tokens / window_tokens` gives TRL's dapo over the window (sum over all tokens of all
//!   micro-batches / all their tokens), which is what makes dapo differ from bnpo.
//! - Stats (clip fractions, KL) are TRL's `global_masked_mean` over this micro-batch's mask.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// How the masked per-token losses are reduced to a scalar (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then mean over sequences.
    Grpo,
    /// Sum over all tokens / number of mask tokens in the micro-batch.
    Bnpo,
    /// Sum over all tokens / (N · max_completion_length).
    DrGrpo,
    /// Sum over all tokens / number of mask tokens (of the accumulation window, see the module doc).
    Dapo,
}

/// What the group-centred rewards are divided by (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    Group,
    Batch,
    None,
}

/// The `[grpo.objective]`-style section: everything the loss needs and nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    /// Lower clip: ratios below 1 − epsilon are clipped (for A < 0).
    pub epsilon: f64,
    /// Upper clip: ratios above 1 + epsilon_high are clipped (for A > 0); DAPO's clip-higher.
    pub epsilon_high: f64,
    /// Weight of the k3 KL to the reference policy; 0 skips the reference entirely.
    pub beta: f64,
    /// Zero the loss mask of completions cut at the length limit.
    pub mask_truncated_completions: bool,
    /// The dr_grpo normaliser (the generation limit, not the padded T of a batch).
    pub max_completion_length: usize,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            epsilon: 0.2,
            epsilon_high: 0.28,
            beta: 0.0,
            mask_truncated_completions: false,
            max_completion_length: 512,
        }
    }
}

/// Why advantages could not be computed from a reward vector.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdvantageError {
    #[error("group_size must be at least 1")]
    ZeroGroupSize,
    #[error(
        "{len} rewards do not split into groups of {group_size}: the batch must hold whole groups"
    )]
    PartialGroup { len: usize, group_size: usize },
    #[error("reward {index} is {value}: every completion needs a finite reward")]
    NonFinite { index: usize, value: f64 },
}

/// Scalar statistics of one `policy_loss` call, TRL's logged names in the field docs.
#[derive(Clone, Debug, PartialEq)]
pub struct LossStats {
    /// `clip_ratio/low_mean`: fraction of mask tokens with ratio < 1 − ε and A < 0.
    pub clip_low: f64,
    /// `clip_ratio/high_mean`: fraction of mask tokens with ratio > 1 + ε_high and A > 0.
    pub clip_high: f64,
    /// `clip_ratio/region_mean`: either of the two.
    pub clip_region: f64,
    /// `kl`: mean k3 KL over mask tokens; `None` when beta = 0.
    pub kl: Option<f64>,
    /// Mask tokens counted by the loss (after truncated rows are dropped).
    pub num_tokens: f64,
}

/// Unbiased (n − 1) std, 0 for a single value (TRL's fallback when it has one sample).
fn std_unbiased(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

/// rewards: (B·G,) grouped consecutively by prompt → advantages (B·G,), as TRL: the group mean
/// subtracted, then divided by std + 1e-4 of the group (`Group`) or of the whole batch
/// (`Batch`), or not divided (`None`). The std is the unbiased one (TRL's `nanstd`).
pub fn advantages(
    rewards: &[f64],
    group_size: usize,
    scale: ScaleRewards,
) -> Result<Vec<f64>, AdvantageError> {
    advantages_in_batch(rewards, group_size, scale, rewards)
}

/// [`advantages`] with `Batch`'s std taken over `batch`: every process's kept rewards in a
/// data-parallel run, of which `rewards` are this process's.
pub fn advantages_in_batch(
    rewards: &[f64],
    group_size: usize,
    scale: ScaleRewards,
    batch: &[f64],
) -> Result<Vec<f64>, AdvantageError> {
    if group_size == 0 {
        return Err(AdvantageError::ZeroGroupSize);
    }
    if !rewards.len().is_multiple_of(group_size) {
        return Err(AdvantageError::PartialGroup {
            len: rewards.len(),
            group_size,
        });
    }
    if let Some((index, &value)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(AdvantageError::NonFinite { index, value });
    }
    let batch_std = std_unbiased(batch);
    let mut out = Vec::with_capacity(rewards.len());
    for group in rewards.chunks(group_size) {
        let mean = group.iter().sum::<f64>() / group_size as f64;
        let denom = match scale {
            ScaleRewards::Group => std_unbiased(group) + 1e-4,
            ScaleRewards::Batch => batch_std + 1e-4,
            ScaleRewards::None => 1.0,
        };
        out.extend(group.iter().map(|r| (r - mean) / denom));
    }
    Ok(out)
}

/// Per-token clipped policy loss and its reduction.
///
/// logp: (N, T) current log-probs (differentiable); old_logp, ref_logp: (N, T), no gradient
/// wanted; adv: (N,); mask: (N, T), 1 on completion tokens; truncated: (N,), used when
/// `cfg.mask_truncated_completions`. `ref_logp` is required when `cfg.beta > 0`.
/// Returns the scalar loss (differentiable w.r.t. `logp`) and its [`LossStats`].
pub fn policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    adv: &[f64],
    mask: &Tensor,
    truncated: &[bool],
    cfg: &ObjectiveConfig,
) -> candle_core::Result<(Tensor, LossStats)> {
    let (n, t) = logp.dims2()?;
    let (dtype, dev) = (logp.dtype(), logp.device());
    for (name, x) in [
        ("old_logp", Some(old_logp)),
        ("ref_logp", ref_logp),
        ("mask", Some(mask)),
    ] {
        if let Some(x) = x {
            if x.dims() != [n, t] {
                candle_core::bail!(
                    "policy_loss: {name} has shape {:?}, logp has ({n}, {t})",
                    x.dims()
                );
            }
        }
    }
    if adv.len() != n || truncated.len() != n {
        candle_core::bail!(
            "policy_loss: {} advantages and {} truncated flags for {n} sequences",
            adv.len(),
            truncated.len()
        );
    }
    if cfg.loss_type == LossType::DrGrpo && cfg.max_completion_length == 0 {
        candle_core::bail!("policy_loss: dr_grpo needs max_completion_length > 0");
    }

    let mut mask = mask.to_dtype(dtype)?.detach(); // (N, T)
    if cfg.mask_truncated_completions {
        let keep: Vec<f64> = truncated
            .iter()
            .map(|&tr| if tr { 0.0 } else { 1.0 })
            .collect();
        let keep = Tensor::from_vec(keep, (n, 1), dev)?.to_dtype(dtype)?;
        mask = mask.broadcast_mul(&keep)?;
    }
    let a = Tensor::from_slice(adv, (n, 1), dev)?.to_dtype(dtype)?; // (N, 1)

    let ratio = (logp - old_logp.detach())?.exp()?; // (N, T)
    let clipped = ratio.clamp(1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high)?;
    let l1 = ratio.broadcast_mul(&a)?;
    let l2 = clipped.broadcast_mul(&a)?;
    let mut per_token = l1.le(&l2)?.where_cond(&l1, &l2)?.neg()?; // (N, T)

    let kl = if cfg.beta != 0.0 {
        let Some(r) = ref_logp else {
            candle_core::bail!("policy_loss: beta = {} needs ref_logp", cfg.beta)
        };
        let d = (r.detach() - logp)?; // ref − logp
        let kl = ((d.exp()? - &d)? - 1.0)?; // k3, (N, T)
        per_token = (per_token + (&kl * cfg.beta)?)?;
        Some(kl)
    } else {
        None
    };

    let masked = (&per_token * &mask)?;
    let num_tokens = mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let loss = match cfg.loss_type {
        LossType::Grpo => {
            let per_seq_tokens = mask.sum(1)?.clamp(1.0, f64::INFINITY)?; // (N,)
            (masked.sum(1)? / per_seq_tokens)?.mean_all()?
        }
        LossType::Bnpo | LossType::Dapo => (masked.sum_all()? / num_tokens.max(1.0))?,
        LossType::DrGrpo => (masked.sum_all()? / (n * cfg.max_completion_length) as f64)?,
    };

    let stats = stats(&ratio, &a, kl.as_ref(), &mask, num_tokens, cfg)?;
    Ok((loss, stats))
}

/// TRL's `global_masked_mean` of the clip indicators and the KL, computed on the host.
fn stats(
    ratio: &Tensor,
    a: &Tensor,
    kl: Option<&Tensor>,
    mask: &Tensor,
    num_tokens: f64,
    cfg: &ObjectiveConfig,
) -> candle_core::Result<LossStats> {
    let host = |x: &Tensor| x.detach().to_dtype(DType::F64)?.to_vec2::<f64>();
    let (ratio, mask) = (host(ratio)?, host(mask)?);
    let a: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let denom = num_tokens.max(1.0);
    let (mut low, mut high, mut region) = (0.0, 0.0, 0.0);
    for (i, (row, mrow)) in ratio.iter().zip(&mask).enumerate() {
        for (&r, &m) in row.iter().zip(mrow) {
            let lo = r < 1.0 - cfg.epsilon && a[i] < 0.0;
            let hi = r > 1.0 + cfg.epsilon_high && a[i] > 0.0;
            low += m * f64::from(u8::from(lo));
            high += m * f64::from(u8::from(hi));
            region += m * f64::from(u8::from(lo || hi));
        }
    }
    let kl = match kl {
        Some(kl) => {
            let kl = host(kl)?;
            let s: f64 = kl
                .iter()
                .zip(&mask)
                .flat_map(|(k, m)| k.iter().zip(m).map(|(k, m)| k * m))
                .sum();
            Some(s / denom)
        }
        None => None,
    };
    Ok(LossStats {
        clip_low: low / denom,
        clip_high: high / denom,
        clip_region: region / denom,
        kl,
        num_tokens,
    })
}
