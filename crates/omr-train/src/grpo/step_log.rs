//! GRPO's one log line per step and the metric values behind it (STYLE.md rule 11): the same
//! fields every step, under stable names (`grpo/…`, `reward/<name>/…`, `completions/…`,
//! `train/…`, `time/…`), in the console line, `metrics.jsonl` and TensorBoard alike.
//!
//! Notable choices:
//! - Rewards and lengths are those of every sampled completion (dropped groups included), so
//!   the log shows what the policy does, not only what it learns from; KL and clip fractions
//!   are token-weighted over every micro-batch of every iteration, the loss and the entropy
//!   are the first iteration's (the rollout policy's).
//! - A data-parallel step logs every process's rollout and update ([`RolloutSummary::merge`],
//!   [`UpdateStats::merge`]): completions concatenated in rank order, counts and sums added,
//!   the largest mismatch and the slowest process's times.

use crate::grpo_config::GrpoConfig;
use crate::metrics::rss_mib;
use crate::rewards::{mean_std, Reward};
use serde::{Deserialize, Serialize};

/// What the log reports of one step's rollout (of one process, or merged over all).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct RolloutSummary {
    /// Kept groups.
    pub groups: usize,
    /// `[reward]`: every value that reward scored, dropped groups included.
    pub all_rewards: Vec<Vec<f64>>,
    /// Every scored total, dropped groups included.
    pub all_totals: Vec<f64>,
    /// Per reward: completions it could not score.
    pub failures: Vec<u64>,
    /// Token length of every sampled completion.
    pub lens: Vec<usize>,
    pub n_truncated: usize,
    /// Groups dropped for equal rewards, for an unscored completion.
    pub zero_std: u64,
    pub unscored: u64,
    pub rounds: u64,
    /// Seconds generating and scoring.
    pub t_gen: f64,
    pub t_score: f64,
}

impl RolloutSummary {
    /// The processes' summaries as one, in rank order.
    pub fn merge(parts: Vec<RolloutSummary>) -> RolloutSummary {
        let mut it = parts.into_iter();
        let mut m = it.next().unwrap_or_default();
        for p in it {
            m.groups += p.groups;
            for (col, more) in m.all_rewards.iter_mut().zip(p.all_rewards) {
                col.extend(more);
            }
            m.all_totals.extend(p.all_totals);
            m.failures
                .iter_mut()
                .zip(p.failures)
                .for_each(|(a, b)| *a += b);
            m.lens.extend(p.lens);
            m.n_truncated += p.n_truncated;
            m.zero_std += p.zero_std;
            m.unscored += p.unscored;
            m.rounds = m.rounds.max(p.rounds);
            m.t_gen = m.t_gen.max(p.t_gen);
            m.t_score = m.t_score.max(p.t_score);
        }
        m
    }
}

/// What the policy update of one step reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct UpdateStats {
    /// Sum of the first iteration's micro-batch losses.
    pub loss_sum: f64,
    /// Of the last update.
    pub grad_norm: f64,
    pub lr: f64,
    /// Token-weighted sums over every micro-batch of every iteration; `tok_sum` the weight.
    pub clip_low: f64,
    pub clip_high: f64,
    pub kl_sum: f64,
    pub tok_sum: f64,
    /// First iteration: summed token entropy, largest |Δ log p| between training and engine.
    pub entropy_sum: f64,
    pub mismatch: f64,
    pub updates_done: u64,
    /// Seconds of the whole update.
    pub t_train: f64,
}

impl UpdateStats {
    /// The processes' stats as one: sums added, the largest mismatch and time; the step's
    /// norm, rate and update count are the same on every process (rank 0's).
    pub fn merge(parts: Vec<UpdateStats>) -> UpdateStats {
        let mut it = parts.into_iter();
        let mut m = it.next().unwrap_or_default();
        for p in it {
            m.loss_sum += p.loss_sum;
            m.clip_low += p.clip_low;
            m.clip_high += p.clip_high;
            m.kl_sum += p.kl_sum;
            m.tok_sum += p.tok_sum;
            m.entropy_sum += p.entropy_sum;
            m.mismatch = m.mismatch.max(p.mismatch);
            m.t_train = m.t_train.max(p.t_train);
        }
        m
    }
}

/// Step `step`'s console line and metric values. `rows_tokens`: completion tokens the update
/// trained on (≥ 1); `dt`: seconds of the whole step; `bad_samples`: quarantined so far.
#[allow(clippy::too_many_arguments)]
pub(super) fn fields(
    cfg: &GrpoConfig,
    rewards: &[(Box<dyn Reward>, f64)],
    step: u64,
    r: &RolloutSummary,
    u: &UpdateStats,
    rows_tokens: f64,
    dt: f64,
    bad_samples: u64,
) -> (String, Vec<(String, f64)>) {
    let (lens, t_gen, t_score, t_train) = (&r.lens, r.t_gen, r.t_score, u.t_train);
    let (loss_sum, lr, grad_norm) = (u.loss_sum, u.lr, u.grad_norm);
    let (r_mean, r_std) = mean_std(r.all_totals.iter().copied());
    let tok = u.tok_sum.max(1.0);
    let n_gen = lens.len().max(1) as f64;
    let len_mean = lens.iter().sum::<usize>() as f64 / n_gen;
    let mut values: Vec<(String, f64)> = vec![
        ("grpo/loss".into(), loss_sum),
        ("grpo/reward_mean".into(), r_mean),
        ("grpo/reward_std".into(), r_std),
    ];
    for ((rw, _), col) in rewards.iter().zip(&r.all_rewards) {
        let (m, s) = mean_std(col.iter().copied());
        values.push((format!("reward/{}/mean", rw.name()), m));
        values.push((format!("reward/{}/std", rw.name()), s));
    }
    for ((rw, _), f) in rewards.iter().zip(&r.failures) {
        values.push((format!("reward/{}/failures", rw.name()), *f as f64));
    }
    values.extend([
        ("grpo/kl".to_string(), u.kl_sum / tok),
        ("grpo/clip_low".into(), u.clip_low / tok),
        ("grpo/clip_high".into(), u.clip_high / tok),
        ("grpo/clip_region".into(), (u.clip_low + u.clip_high) / tok),
        ("grpo/entropy".into(), u.entropy_sum / rows_tokens),
        ("grpo/logp_mismatch_max".into(), u.mismatch),
        ("grpo/groups".into(), r.groups as f64),
        ("grpo/groups_zero_std".into(), r.zero_std as f64),
        ("grpo/groups_unscored".into(), r.unscored as f64),
        ("grpo/sampling_rounds".into(), r.rounds as f64),
        ("completions/mean_length".into(), len_mean),
        (
            "completions/min_length".into(),
            lens.iter().copied().min().unwrap_or(0) as f64,
        ),
        (
            "completions/max_length".into(),
            lens.iter().copied().max().unwrap_or(0) as f64,
        ),
        (
            "completions/truncated_frac".into(),
            r.n_truncated as f64 / n_gen,
        ),
        ("train/lr".into(), lr),
        ("train/grad_norm".into(), grad_norm),
        ("train/updates".into(), u.updates_done as f64),
        ("time/step_s".into(), dt),
        ("time/generation_s".into(), t_gen),
        ("time/scoring_s".into(), t_score),
        ("time/training_s".into(), t_train),
        (
            "throughput/completion_tok_per_s".into(),
            lens.iter().sum::<usize>() as f64 / dt,
        ),
        ("memory/rss_mib".into(), rss_mib()),
        ("data/bad_samples".into(), bad_samples as f64),
    ]);
    let line = format!(
        "step {step}/{} | reward {r_mean:.3} ± {r_std:.3} | loss {loss_sum:+.4} | kl {:.4} | clip {:.3} | len {len_mean:.1} | ent {:.3} | lr {lr:.2e} | gnorm {grad_norm:.3} | gen {t_gen:.1}s score {t_score:.2}s train {t_train:.1}s | groups {}/{}",
        cfg.train.max_steps,
        u.kl_sum / tok,
        (u.clip_low + u.clip_high) / tok,
        u.entropy_sum / rows_tokens,
        r.groups,
        cfg.grpo.prompts_per_step,
    );
    (line, values)
}
