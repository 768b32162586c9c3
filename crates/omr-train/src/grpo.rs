//! GRPO: `run` is the whole recipe, one function read top to bottom (STYLE.md): setup →
//! resume → for each step {prompts → G completions each (in-process engine, same weights) →
//! rewards → group advantages → `num_iterations` × (micro-batches: log-probs, clipped loss
//! (+ k3 KL to the frozen reference), backward → clip + AdamW)} → log → eval → checkpoint →
//! preemption check → export.
//!
//! Notable choices:
//! - The old log-probs are the engine's own (rollout.rs): generation and training run on the
//!   same weights in one process, so there is no sync and no mismatch to correct; the log
//!   reports the largest |Δ log p| between the training forward and the engine as a check.
//! - Dynamic sampling (DAPO): groups whose rewards are all equal carry no advantage; they are
//!   dropped and more prompts are drawn, up to `max_sampling_rounds` rounds per step.
//! - A completion no reward could score drops its whole group (counted): advantages are
//!   relative within a group, so a hole in a group cannot be filled with a made-up value.
//! - Micro-batch losses are combined as TRL does over an accumulation window: grpo / bnpo /
//!   dr_grpo are averaged over micro-batches, dapo is weighted by each micro-batch's share of
//!   the window's completion tokens.
//! - A stop request is honoured after the rollout (weights still those of the last committed
//!   step, the rollout is dropped and redone after resume) or at the end of the step. Every
//!   random draw is keyed by (seed, step, round), and the prompt cursor is the loader state,
//!   so a resumed run reproduces the uninterrupted one bit for bit on CPU.

use crate::card::EvalResult;
use crate::checkpoint::FailureCounter;
use crate::error::{Result, TrainError};
use crate::eval;
use crate::grpo_config::GrpoConfig;
use crate::grpo_loss::{advantages, policy_loss, LossType};
use crate::metrics::{rss_mib, Metrics};
use crate::optim::StepOutcome;
use crate::rewards::{mean_std, score_all, Reward, RewardInput};
use crate::rollout::{
    self, completion_logps, generate_groups, logps_from_hidden, seq_batch, PromptItem,
};
use crate::setup::{self, Built};
use crate::sft::{Outcome, RunOptions};
use crate::snapshot::{check_processor, commit, cut_back, eval_rows, load_checkpoint, resume_dir};
use crate::state::{self, GrpoState, TrainState};
use candle_core::Tensor;
use omr_data::loader::{Item, LoaderState, Stream};
use omr_data::mixture::derive_seed;
use omr_data::pipeline::Processor;
use omr_data::quarantine::{Quarantine, QuarantineError, Reason};
use omr_model::generate::{Completion, SamplingConfig};
use omr_model::linear::Ctx;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

/// One prompt's group after scoring.
struct Group {
    prompt: PromptItem,
    completions: Vec<Completion>,
    texts: Vec<String>,
    /// `[reward][k]` values of each reward (None = that reward failed for completion k).
    per_reward: Vec<Vec<Option<f64>>>,
    totals: Vec<f64>,
}

/// The recipe with the built-in rewards of `[rewards]`.
pub fn run(cfg: &GrpoConfig, opts: &RunOptions) -> Result<Outcome> {
    run_with(cfg, opts, cfg.rewards.build(cfg.grpo.max_completion_length))
}

/// The recipe with the caller's reward functions and weights (a library user's own rewards;
/// the built-in ones are `RewardsConfig::build`).
pub fn run_with(
    cfg: &GrpoConfig,
    opts: &RunOptions,
    rewards: Vec<(Box<dyn Reward>, f64)>,
) -> Result<Outcome> {
    if rewards.is_empty() {
        return Err(TrainError::Usage("GRPO needs at least one reward".into()));
    }
    // ---- setup ------------------------------------------------------------------------
    let rt = cfg.runtime.resolve()?;
    let device = rt.device.clone();
    let g = &cfg.grpo;
    let run_dir = cfg.run.dir.clone();
    let ckpt_root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&run_dir).map_err(TrainError::io(&run_dir))?;
    let mut built = setup::build(&cfg.model, cfg.train.seed, &device)?;
    rt.prepare(&mut built.params)?;
    tracing::info!("runtime: {}", rt.describe());
    let processor = Arc::new(
        Processor::from_model_dir(&built.processor_dir, &cfg.data.process)
            .map_err(|e| TrainError::Usage(format!("{}: {e}", built.processor_dir.display())))?,
    );
    let mut model = built.model(&rt)?;
    let recompute = cfg.train.activation_checkpointing.recompute();
    let (mut opt, wrt) = setup::optimizer(&built.params, &cfg.optim, &rt)?;
    // The frozen reference: the run's initial weights, built again from the same [model].
    let reference = if cfg.objective.beta > 0.0 {
        let mut r = setup::build(&cfg.model, cfg.train.seed, &device)?;
        r.params.set_trainable(|_| true, false);
        let id = weights_identity(&r)?;
        rt.prepare(&mut r.params)?;
        Some((r.model(&rt)?, id))
    } else {
        None
    };
    let processor_hashes = state::processor_hashes(&built.processor_dir)
        .map_err(TrainError::io(&built.processor_dir))?;
    let mut loader = setup::open_loader(&cfg.data)?;

    // ---- resume -------------------------------------------------------------------------
    let mut st = TrainState::fresh(loader.state().clone(), processor_hashes.clone());
    st.grpo = Some(GrpoState {
        reference: reference.as_ref().map(|(_, id)| id.clone()),
        ..GrpoState::default()
    });
    let mut last_eval: Vec<EvalResult> = Vec::new();
    let found = resume_dir(&opts.resume, &ckpt_root, &run_dir)?;
    if let Some(dir) = &found {
        let saved = load_checkpoint(dir, &built, &mut opt, &device)?;
        st = saved.train;
        last_eval = eval_rows(&cfg.data.sources, &cfg.eval.split, &saved.eval);
        let Some(gs) = &st.grpo else {
            return Err(TrainError::Usage(format!(
                "{} is not a GRPO checkpoint (an SFT one?): start GRPO from its export with model.path",
                dir.display()
            )));
        };
        let now = reference.as_ref().map(|(_, id)| id.clone());
        if gs.reference != now {
            return Err(TrainError::Usage(format!(
                "the reference model differs from the one {} was trained against \
                 (checkpoint {:?}, now {:?}): model.path or objective.beta changed; \
                 start a new run.dir instead",
                dir.display(),
                gs.reference.as_deref().unwrap_or("none"),
                now.as_deref().unwrap_or("none"),
            )));
        }
        check_processor(
            &st.processor,
            &processor_hashes,
            opts.allow_processor_change,
            &built.processor_dir,
            dir,
        )?;
        st.processor = processor_hashes.clone();
        loader
            .restore(st.loader.clone())
            .map_err(|e| TrainError::Usage(format!("{}: {e}", dir.display())))?;
        tracing::info!("resuming from {} (step {})", dir.display(), st.step);
        if built.params.casts_on_get() {
            model = built.model(&rt)?;
        }
    }
    let resolved = cfg.to_toml();
    let cfg_path = run_dir.join("config.toml");
    std::fs::write(&cfg_path, &resolved).map_err(TrainError::io(&cfg_path))?;

    // ---- prompts, logs, eval set ------------------------------------------------------------
    let qpath = run_dir.join("quarantine.jsonl");
    let cpath = run_dir.join("completions.jsonl");
    cut_back(&qpath, st.quarantine_bytes)?;
    cut_back(&cpath, st.grpo.as_ref().map_or(0, |g| g.completions_bytes))?;
    let mut completions_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cpath)
        .map_err(TrainError::io(&cpath))?;
    let mut quarantine = Quarantine::new(Some(&qpath), cfg.data.quarantine.clone())
        .map_err(|e| TrainError::Usage(e.to_string()))?;
    quarantine.seen = st.data_seen;
    quarantine.bad = st.data_bad;
    quarantine.by_reason = st.data_bad_by_reason.clone();
    let p = processor.clone();
    let mut prompts = loader.stream(move |s| prompt_item(&p, s));
    let eval_set = if cfg.eval.generate_samples > 0 {
        let set = eval::load_eval_set(
            &cfg.data.sources,
            &cfg.eval.split,
            &processor,
            0,
            cfg.eval.generate_samples,
        )
        .map_err(|e| TrainError::Usage(format!("eval split {:?}: {e}", cfg.eval.split)))?;
        Some(set)
    } else {
        None
    };
    let resumed_at = found.as_ref().map(|_| st.step);
    let mut metrics = Metrics::open(&run_dir, resumed_at, opts.progress, cfg.train.max_steps)
        .map_err(|e| TrainError::Internal(e.to_string()))?;
    let mut save_failures = FailureCounter::new(cfg.checkpoint.max_failures);
    // Vision placeholders in a completion would be taken for image tokens by the forward.
    let c = &built.cfg;
    let suppress = vec![
        c.image_token_id,
        c.video_token_id,
        c.vision_start_token_id,
        c.vision_end_token_id,
    ];
    let tok = processor.encoder().tokenizer();
    let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
    let sampling = SamplingConfig {
        max_new_tokens: g.max_completion_length,
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        seed: 0,
        eos_token_ids: built.eos_token_ids.clone(),
        keep_logits: false,
        suppress_tokens: suppress.clone(),
    };
    let total_updates = cfg.total_updates();
    let mut steps_this_process = 0u64;
    let stop_requested =
        |n: u64| opts.stop.requested() || cfg.train.stop_after_steps.is_some_and(|m| n >= m);

    // ---- the loop: one rollout batch per iteration -------------------------------------------
    while st.step < cfg.train.max_steps {
        let step = st.step + 1;
        let t_step = Instant::now();
        let mut gs = st.grpo.clone().unwrap_or_default();

        // rollout: prompts → G completions → rewards, refilling dropped groups
        let (mut t_gen, mut t_score) = (0.0f64, 0.0f64);
        let mut groups: Vec<Group> = Vec::new();
        let mut next_loader = st.loader.clone();
        let mut all_rewards: Vec<Vec<f64>> = vec![Vec::new(); rewards.len()];
        let mut all_totals: Vec<f64> = Vec::new();
        let mut failures = vec![0u64; rewards.len()];
        let (mut lens, mut n_truncated) = (Vec::new(), 0usize);
        let (mut zero_std, mut unscored, mut rounds) = (0u64, 0u64, 0u64);
        while groups.len() < g.prompts_per_step && rounds < g.max_sampling_rounds {
            let need = g.prompts_per_step - groups.len();
            let batch = next_prompts(&mut prompts, need, &mut quarantine, &mut next_loader)?;
            let t0 = Instant::now();
            let completions = generate_groups(
                &model,
                &batch,
                g.group_size,
                &sampling,
                &[cfg.train.seed, step, rounds],
                g.generation_batch_size,
                processor.pad_id(),
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
            let scored = score_all(&rewards, &inputs)
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
        if opts.stop.requested() {
            // The rollout is dropped: the weights are still those of the last committed step.
            commit(
                &ckpt_root,
                cfg.checkpoint.keep_last,
                &resolved,
                &st,
                &built,
                &opt,
                &last_eval,
                &mut save_failures,
                true,
            )?;
            metrics.finish();
            return Ok(Outcome::Preempted { step: st.step });
        }

        // advantages over the kept groups
        let flat: Vec<f64> = groups
            .iter()
            .flat_map(|gr| gr.totals.iter().copied())
            .collect();
        let adv = advantages(&flat, g.group_size, cfg.objective.scale_rewards)
            .map_err(|e| TrainError::Internal(format!("step {step}: {e}")))?;
        let rows: Vec<(&PromptItem, &Completion)> = groups
            .iter()
            .flat_map(|gr| gr.completions.iter().map(move |c| (&gr.prompt, c)))
            .collect();
        let truncated: Vec<bool> = rows.iter().map(|(_, c)| rollout::truncated(c)).collect();
        let window_tokens: f64 = rows
            .iter()
            .zip(&truncated)
            .filter(|(_, &tr)| !(cfg.objective.mask_truncated_completions && tr))
            .map(|((_, c), _)| c.tokens.len() as f64)
            .sum();

        let rows_tokens = rows
            .iter()
            .map(|(_, c)| c.tokens.len() as f64)
            .sum::<f64>()
            .max(1.0);

        // optimisation: num_iterations updates on this rollout batch
        let t_train = Instant::now();
        let mut loss_sum = 0.0f64;
        let (mut grad_norm, mut lr) = (0.0f64, 0.0f64);
        let (mut clip_low, mut clip_high, mut kl_sum, mut tok_sum) = (0.0, 0.0, 0.0, 0.0);
        let (mut entropy_sum, mut mismatch) = (0.0f64, 0.0f64);
        let mut updates_done = 0u64;
        let mut nonfinite = false;
        let micro: Vec<std::ops::Range<usize>> = (0..rows.len())
            .step_by(g.micro_batch_size)
            .map(|s| s..(s + g.micro_batch_size).min(rows.len()))
            .collect();
        for it in 0..g.num_iterations {
            if rows.is_empty() || window_tokens == 0.0 {
                tracing::warn!(
                    "step {step}: no completion to learn from ({} groups kept), no update",
                    groups.len()
                );
                break;
            }
            let mut acc = opt.grad_accum();
            let mut finite = true;
            for (m, range) in micro.iter().enumerate() {
                let pairs: Vec<_> = rows[range.clone()]
                    .iter()
                    .map(|(p, c)| (&p.prompt, *c))
                    .collect();
                let b = seq_batch(&pairs, processor.pad_id(), &device)?;
                let ctx = Ctx {
                    dropout_seed: Some(derive_seed(&[cfg.train.seed, step, it, m as u64])),
                    ..model.ctx()
                };
                let ref_logp = match &reference {
                    Some((r, _)) => Some(
                        completion_logps(r, &b, g.temperature, &suppress, &r.ctx())?
                            .0
                            .detach(),
                    ),
                    None => None,
                };
                let inject = cfg.train.inject_nonfinite_steps.contains(&step);
                let mut stats = None;
                let out =
                    model.forward_backward::<TrainError>(&b.input, &ctx, recompute, &wrt, |h| {
                        let (logp, entropy) =
                            logps_from_hidden(&model, h, &b, g.temperature, &suppress, &ctx)?;
                        if it == 0 {
                            entropy_sum += entropy;
                            let d = ((logp.detach() - &b.old_logp)?.abs()? * &b.mask)?
                                .max_all()?
                                .to_scalar::<f32>()? as f64;
                            mismatch = mismatch.max(d);
                        }
                        let (loss, st) = policy_loss(
                            &logp,
                            &b.old_logp,
                            ref_logp.as_ref(),
                            &adv[range.clone()],
                            &b.mask,
                            &truncated[range.clone()],
                            &cfg.objective,
                        )?;
                        let share = match cfg.objective.loss_type {
                            LossType::Dapo => st.num_tokens / window_tokens,
                            _ => 1.0 / micro.len() as f64,
                        };
                        stats = Some(st);
                        let loss = (loss * share)?;
                        Ok(if inject { (loss * f64::NAN)? } else { loss })
                    })?;
                let stats = stats
                    .ok_or_else(|| TrainError::Internal("the GRPO loss was not computed".into()))?;
                let l = out.loss;
                match out.grads {
                    Some(grads) if finite => acc
                        .add(&grads)
                        .map_err(|e| TrainError::Internal(e.to_string()))?,
                    Some(_) => {}
                    None => finite = false,
                }
                if it == 0 {
                    loss_sum += l;
                }
                clip_low += stats.clip_low * stats.num_tokens;
                clip_high += stats.clip_high * stats.num_tokens;
                kl_sum += stats.kl.unwrap_or(0.0) * stats.num_tokens;
                tok_sum += stats.num_tokens;
            }
            let update = gs.updates;
            let lr_factor = cfg.schedule.factor(update, total_updates);
            lr = cfg.optim.lr * lr_factor;
            let outcome = if finite {
                opt.step_accumulated(&mut acc, lr_factor, 1.0)
                    .map_err(|e| TrainError::Internal(e.to_string()))?
            } else {
                StepOutcome::NonFinite {
                    grad_norm: f64::NAN,
                }
            };
            if matches!(outcome, StepOutcome::Applied { .. }) && built.params.casts_on_get() {
                model = built.model(&rt)?;
            }
            gs.updates += 1;
            updates_done += 1;
            match outcome {
                StepOutcome::Applied { grad_norm: n, .. } => grad_norm = n,
                StepOutcome::NonFinite { grad_norm: n } => {
                    grad_norm = n;
                    nonfinite = true;
                }
            }
        }
        let t_train = t_train.elapsed().as_secs_f64();
        if nonfinite {
            st.skipped_steps += 1;
            st.nonfinite_streak += 1;
            tracing::warn!("step {step}: non-finite loss or gradient, update skipped");
        } else {
            st.nonfinite_streak = 0;
        }

        // completions log
        if g.completions_every > 0 && step.is_multiple_of(g.completions_every) {
            let names: Vec<String> = rewards.iter().map(|(r, _)| r.name().to_string()).collect();
            let mut k = 0usize;
            for gr in groups.iter().take(g.completions_groups) {
                for (j, text) in gr.texts.iter().enumerate() {
                    let per: BTreeMap<&str, Option<f64>> = names
                        .iter()
                        .zip(&gr.per_reward)
                        .map(|(n, col)| (n.as_str(), col[j]))
                        .collect();
                    let rec = serde_json::json!({
                        "step": step,
                        "prompt": gr.prompt.id,
                        "answer": gr.prompt.item.answer,
                        "completion": text,
                        "tokens": gr.completions[j].tokens.len(),
                        "truncated": rollout::truncated(&gr.completions[j]),
                        "rewards": per,
                        "reward": gr.totals[j],
                        "advantage": adv[k + j],
                    });
                    writeln!(completions_log, "{rec}").map_err(TrainError::io(&cpath))?;
                }
                k += gr.texts.len();
            }
            completions_log.flush().map_err(TrainError::io(&cpath))?;
        }

        // state after the step
        gs.groups_unscored += unscored;
        gs.groups_zero_std += zero_std;
        for ((r, _), f) in rewards.iter().zip(&failures) {
            *gs.reward_failures.entry(r.name().to_string()).or_default() += f;
        }
        gs.completions_bytes = std::fs::metadata(&cpath).map_or(0, |m| m.len());
        st.step = step;
        st.loader = next_loader;
        st.samples += rows.len() as u64;
        st.tokens += lens.iter().sum::<usize>() as u64;
        st.data_seen = quarantine.seen;
        st.data_bad = quarantine.bad;
        st.data_bad_by_reason = quarantine.by_reason.clone();
        quarantine.flush();
        st.quarantine_bytes = std::fs::metadata(&qpath).map_or(0, |m| m.len());
        st.grpo = Some(gs);

        // log
        let dt = t_step.elapsed().as_secs_f64();
        let (r_mean, r_std) = mean_std(all_totals.iter().copied());
        let tok = tok_sum.max(1.0);
        let n_gen = lens.len().max(1) as f64;
        let len_mean = lens.iter().sum::<usize>() as f64 / n_gen;
        let mut values: Vec<(String, f64)> = vec![
            ("grpo/loss".into(), loss_sum),
            ("grpo/reward_mean".into(), r_mean),
            ("grpo/reward_std".into(), r_std),
        ];
        for ((r, _), col) in rewards.iter().zip(&all_rewards) {
            let (m, s) = mean_std(col.iter().copied());
            values.push((format!("reward/{}/mean", r.name()), m));
            values.push((format!("reward/{}/std", r.name()), s));
        }
        for ((r, _), f) in rewards.iter().zip(&failures) {
            values.push((format!("reward/{}/failures", r.name()), *f as f64));
        }
        values.extend([
            ("grpo/kl".to_string(), kl_sum / tok),
            ("grpo/clip_low".into(), clip_low / tok),
            ("grpo/clip_high".into(), clip_high / tok),
            ("grpo/clip_region".into(), (clip_low + clip_high) / tok),
            ("grpo/entropy".into(), entropy_sum / rows_tokens),
            ("grpo/logp_mismatch_max".into(), mismatch),
            ("grpo/groups".into(), groups.len() as f64),
            ("grpo/groups_zero_std".into(), zero_std as f64),
            ("grpo/groups_unscored".into(), unscored as f64),
            ("grpo/sampling_rounds".into(), rounds as f64),
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
                n_truncated as f64 / n_gen,
            ),
            ("train/lr".into(), lr),
            ("train/grad_norm".into(), grad_norm),
            ("train/updates".into(), updates_done as f64),
            ("time/step_s".into(), dt),
            ("time/generation_s".into(), t_gen),
            ("time/scoring_s".into(), t_score),
            ("time/training_s".into(), t_train),
            (
                "throughput/completion_tok_per_s".into(),
                lens.iter().sum::<usize>() as f64 / dt,
            ),
            ("memory/rss_mib".into(), rss_mib()),
            ("data/bad_samples".into(), quarantine.bad as f64),
        ]);
        let line = format!(
            "step {step}/{} | reward {r_mean:.3} ± {r_std:.3} | loss {loss_sum:+.4} | kl {:.4} | clip {:.3} | len {len_mean:.1} | ent {:.3} | lr {lr:.2e} | gnorm {grad_norm:.3} | gen {t_gen:.1}s score {t_score:.2}s train {t_train:.1}s | groups {}/{}",
            cfg.train.max_steps,
            kl_sum / tok,
            (clip_low + clip_high) / tok,
            entropy_sum / rows_tokens,
            groups.len(),
            g.prompts_per_step,
        );
        metrics
            .log_step_fields(step, &line, &values)
            .map_err(|e| TrainError::Internal(e.to_string()))?;
        if st.nonfinite_streak >= cfg.train.max_nonfinite_steps {
            metrics.finish();
            return Err(TrainError::NonFinite {
                step,
                count: st.nonfinite_streak,
            });
        }

        // eval
        let last = step == cfg.train.max_steps;
        let eval_due = cfg.eval.every_steps > 0 && step.is_multiple_of(cfg.eval.every_steps);
        if let Some(set) = &eval_set {
            if eval_due || last {
                last_eval = eval::evaluate_run(
                    &model,
                    set,
                    &cfg.eval,
                    &cfg.data.sources,
                    &processor,
                    &built,
                )?;
                let values: Vec<(String, f64)> = last_eval
                    .iter()
                    .map(|r| (format!("eval/{}", r.metric), r.value))
                    .collect();
                metrics
                    .log_scalars(step, "eval", &values)
                    .map_err(|e| TrainError::Internal(e.to_string()))?;
            }
        }

        // checkpoint, preemption
        steps_this_process += 1;
        let stop = stop_requested(steps_this_process);
        if last || stop || cfg.checkpoint.is_due(step) {
            commit(
                &ckpt_root,
                cfg.checkpoint.keep_last,
                &resolved,
                &st,
                &built,
                &opt,
                &last_eval,
                &mut save_failures,
                last || stop,
            )?;
        }
        if stop && !last {
            metrics.finish();
            return Ok(Outcome::Preempted { step });
        }
    }
    metrics.finish();

    // ---- export -------------------------------------------------------------------------
    if cfg.export.at_end {
        let out = run_dir.join("export");
        crate::export::export_grpo(
            &built,
            cfg,
            &out,
            cfg.export.merge_lora,
            st.step,
            &last_eval,
        )?;
        tracing::info!("exported to {}", out.display());
    }
    Ok(Outcome::Done {
        step: st.step,
        eval: last_eval,
    })
}

/// A training record → its generation prompt and the answer its completions are scored on.
fn prompt_item(p: &Processor, s: &omr_data::Sample) -> std::result::Result<PromptItem, Reason> {
    let item = s.mcq.clone().ok_or_else(|| {
        Reason::MissingField("answer (GRPO rewards need a reference answer)".into())
    })?;
    Ok(PromptItem {
        prompt: p.encode_prompt(s)?,
        item,
        id: format!("{}#{}", s.origin.shard, s.origin.row),
        meta: s.meta.clone(),
    })
}

/// The next `n` good prompts; bad records go to the quarantine. `cursor` becomes the loader
/// state after the last record read.
fn next_prompts(
    stream: &mut Stream<PromptItem>,
    n: usize,
    q: &mut Quarantine,
    cursor: &mut LoaderState,
) -> Result<Vec<PromptItem>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let Some(item) = stream.next() else {
            break;
        };
        let Item {
            result,
            state_after,
        } = item.map_err(|e| TrainError::Usage(e.to_string()))?;
        *cursor = state_after;
        match result {
            Ok(p) => {
                q.record_good();
                out.push(p);
            }
            Err(bad) => q.record_bad(&bad).map_err(|e| match e {
                e @ QuarantineError::OverBudget { .. } => TrainError::BadData(e),
                other => TrainError::Usage(other.to_string()),
            })?,
        }
    }
    if out.is_empty() {
        return Err(TrainError::Usage(
            "the training data has no usable prompt (see quarantine.jsonl)".into(),
        ));
    }
    Ok(out)
}

/// sha256 over the names, shapes and bytes of every weight, in name order.
fn weights_identity(built: &Built) -> Result<String> {
    let mut named: Vec<(&str, Tensor)> = built
        .params
        .iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, t) in named {
        h.update(name.as_bytes());
        h.update(format!("{:?}", t.dims()).as_bytes());
        let v: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}
