//! One GRPO step's rollout: prompts → G completions each (in-process engine, the trainer's
//! weights) → rewards, then the rows the policy update trains on with their group advantages.
//!
//! Notable choices:
//! - Dynamic sampling (DAPO): groups whose rewards are all equal carry no advantage; they are
//!   dropped and more prompts are drawn, up to `max_sampling_rounds` rounds per step.
//! - A completion no reward could score drops its whole group (counted): advantages are
//!   relative within a group, so a hole in a group cannot be filled with a made-up value.
//! - Every draw is keyed by (seed, step, round); the rewards and lengths the log reports are
//!   those of every sampled completion, dropped groups included.

use super::prompts::next_prompts;
use super::step_log::RolloutSummary;
use crate::error::{Result, TrainError};
use crate::grpo_config::GrpoSection;
use crate::grpo_loss::{advantages_in_batch, ObjectiveConfig};
use crate::rewards::{score_all, Reward, RewardInput};
use crate::rollout::{self, generate_groups, PromptItem};
use omr_data::loader::{LoaderState, Stream};
use omr_data::pipeline::Processor;
use omr_data::quarantine::Quarantine;
use omr_model::generate::{Completion, SamplingConfig};
use omr_model::model::Qwen2VL;
use std::time::Instant;

/// One prompt's group after scoring.
pub(super) struct Group {
    pub prompt: PromptItem,
    pub completions: Vec<Completion>,
    pub texts: Vec<String>,
    /// `[reward][k]` values of each reward (None = that reward failed for completion k).
    pub per_reward: Vec<Vec<Option<f64>>>,
    pub totals: Vec<f64>,
}

/// What one step's rollout produced.
pub(super) struct Rollout {
    /// The kept groups, at most `Sampler::prompts`.
    pub groups: Vec<Group>,
    /// What the log and the state count of it (every sampled completion's rewards and length,
    /// dropped groups included).
    pub summary: RolloutSummary,
}

/// What every step's rollout shares: the `[grpo]` section, the engine's sampling settings,
/// the rewards and their weights, the processor (pad id, decoding) and the run's seed.
pub(super) struct Sampler<'a> {
    pub g: &'a GrpoSection,
    /// Prompts of this process per step: `prompts_per_step` over the processes.
    pub prompts: usize,
    /// (rank, world) of this process, for the draws' keys.
    pub stripe: (usize, usize),
    pub sampling: SamplingConfig,
    pub rewards: &'a [(Box<dyn Reward>, f64)],
    pub processor: &'a Processor,
    pub seed: u64,
}

impl Sampler<'_> {
    /// Step `step`'s rollout with `model`: prompts from `prompts` (bad records to `quarantine`,
    /// `cursor` moved past the last record read), refilling dropped groups.
    pub fn sample(
        &self,
        model: &Qwen2VL,
        step: u64,
        prompts: &mut Stream<PromptItem>,
        quarantine: &mut Quarantine,
        cursor: &mut LoaderState,
    ) -> Result<Rollout> {
        let (g, rewards) = (self.g, self.rewards);
        let tok = self.processor.encoder().tokenizer();
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let (mut t_gen, mut t_score) = (0.0f64, 0.0f64);
        let mut groups: Vec<Group> = Vec::new();
        let mut all_rewards: Vec<Vec<f64>> = vec![Vec::new(); rewards.len()];
        let mut all_totals: Vec<f64> = Vec::new();
        let mut failures = vec![0u64; rewards.len()];
        let (mut lens, mut n_truncated) = (Vec::new(), 0usize);
        let (mut zero_std, mut unscored, mut rounds) = (0u64, 0u64, 0u64);
        while groups.len() < self.prompts && rounds < g.max_sampling_rounds {
            let need = self.prompts - groups.len();
            let batch = next_prompts(prompts, need, quarantine, cursor)?;
            let t0 = Instant::now();
            let completions = generate_groups(
                model,
                &batch,
                g.group_size,
                &self.sampling,
                &[self.seed, step, rounds],
                g.generation_batch_size,
                self.processor.pad_id(),
                self.stripe,
            )?;
            t_gen += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let texts: Vec<String> = completions.iter().map(|c| decode(&c.tokens)).collect();
            let inputs: Vec<RewardInput> = completions
                .iter()
                .zip(&texts)
                .enumerate()
                .map(|(i, (c, t))| RewardInput {
                    completion: t,
                    item: &batch[i / g.group_size].item,
                    tokens: c.tokens.len(),
                    truncated: rollout::truncated(c),
                })
                .collect();
            let scored = score_all(rewards, &inputs)
                .map_err(|e| TrainError::Internal(format!("step {step}: {e}")))?;
            drop(inputs);
            for (r, col) in scored.per_reward.iter().enumerate() {
                failures[r] += scored.failures[r];
                all_rewards[r].extend(col.iter().flatten());
            }
            all_totals.extend(scored.total.iter().flatten());
            lens.extend(completions.iter().map(|c| c.tokens.len()));
            n_truncated += completions.iter().filter(|c| rollout::truncated(c)).count();
            let mut completions = completions.into_iter();
            let mut texts = texts.into_iter();
            for (p, item) in batch.into_iter().enumerate() {
                let range = p * g.group_size..(p + 1) * g.group_size;
                let cs: Vec<Completion> = completions.by_ref().take(g.group_size).collect();
                let ts: Vec<String> = texts.by_ref().take(g.group_size).collect();
                let totals: Option<Vec<f64>> =
                    scored.total[range.clone()].iter().copied().collect();
                let Some(totals) = totals else {
                    unscored += 1;
                    continue;
                };
                if g.dynamic_sampling && totals.iter().all(|&t| t == totals[0]) {
                    zero_std += 1;
                    continue;
                }
                groups.push(Group {
                    prompt: item,
                    completions: cs,
                    texts: ts,
                    per_reward: scored
                        .per_reward
                        .iter()
                        .map(|col| col[range.clone()].to_vec())
                        .collect(),
                    totals,
                });
            }
            t_score += t0.elapsed().as_secs_f64();
            rounds += 1;
            if !g.dynamic_sampling {
                break;
            }
        }
        Ok(Rollout {
            summary: RolloutSummary {
                groups: groups.len(),
                all_rewards,
                all_totals,
                failures,
                lens,
                n_truncated,
                zero_std,
                unscored,
                rounds,
                t_gen,
                t_score,
            },
            groups,
        })
    }
}

/// The rows the policy update trains on: every completion of the kept groups, in group order.
pub(super) struct TrainRows<'a> {
    pub rows: Vec<(&'a PromptItem, &'a Completion)>,
    /// (rows) group-relative advantages.
    pub adv: Vec<f64>,
    pub truncated: Vec<bool>,
    /// Completion tokens the loss counts (truncated ones left out when masked): dapo's
    /// normaliser over the accumulation window.
    pub window_tokens: f64,
    /// Every completion token, at least 1: the entropy's normaliser.
    pub rows_tokens: f64,
}

impl Rollout {
    /// The kept groups' rewards, group after group.
    pub fn kept_totals(&self) -> Vec<f64> {
        self.groups
            .iter()
            .flat_map(|gr| gr.totals.iter().copied())
            .collect()
    }

    /// The kept groups as training rows, with advantages over `group_size` groups; a batch
    /// std (`scale_rewards = "batch"`) over `batch` (every process's [`Rollout::kept_totals`]),
    /// or over this rollout's when None.
    pub fn train_rows(
        &self,
        group_size: usize,
        objective: &ObjectiveConfig,
        step: u64,
        batch: Option<&[f64]>,
    ) -> Result<TrainRows<'_>> {
        let flat = self.kept_totals();
        let adv = advantages_in_batch(
            &flat,
            group_size,
            objective.scale_rewards,
            batch.unwrap_or(&flat),
        )
        .map_err(|e| TrainError::Internal(format!("step {step}: {e}")))?;
        let rows: Vec<(&PromptItem, &Completion)> = self
            .groups
            .iter()
            .flat_map(|gr| gr.completions.iter().map(move |c| (&gr.prompt, c)))
            .collect();
        let truncated: Vec<bool> = rows.iter().map(|(_, c)| rollout::truncated(c)).collect();
        let window_tokens: f64 = rows
            .iter()
            .zip(&truncated)
            .filter(|(_, &tr)| !(objective.mask_truncated_completions && tr))
            .map(|((_, c), _)| c.tokens.len() as f64)
            .sum();
        let rows_tokens = rows
            .iter()
            .map(|(_, c)| c.tokens.len() as f64)
            .sum::<f64>()
            .max(1.0);
        Ok(TrainRows {
            rows,
            adv,
            truncated,
            window_tokens,
            rows_tokens,
        })
    }
}
