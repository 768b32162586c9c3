//! GRPO: `run` is the whole recipe, one function read top to bottom (STYLE.md): setup →
//! resume → for each step {prompts → G completions each (in-process engine, same weights) →
//! rewards → group advantages → `num_iterations` × (micro-batches: log-probs, clipped loss
//! (+ k3 KL to the frozen reference), backward → clip + AdamW)} → log → eval → checkpoint →
//! preemption check → export.
//!
//! Its parts, one concept each: `prompts` (records → prompts, bad ones quarantined),
//! `sampling` (a step's rollout with dynamic sampling, and its training rows with advantages),
//! `reference` (the frozen KL reference and its identity), `completions_log`
//! (`completions.jsonl`) and `step_log` (the step's log line and metrics).
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
//! - Data parallel (`dist`): each of W processes samples `prompts_per_step / W` prompts of its
//!   stripe, generation chunk c of rank r keyed as chunk c·W + r. The loss is normalised by the
//!   whole step's tokens (dapo) or micro-batches, a batch reward std spans every process's
//!   groups, and gradients are summed before each update, so that with one prompt per
//!   generation batch and micro-batch the run is the single process's, bit for bit. Every
//!   rank scores its share of the evaluation; rank 0 logs every process's rollout merged,
//!   writes `completions.jsonl` (its own groups), checkpoints and exports.

mod completions_log;
mod prompts;
mod reference;
mod sampling;
mod step_log;

use crate::card::EvalResult;
use crate::checkpoint::FailureCounter;
use crate::dist::{Group, Launch};
use crate::error::{Result, TrainError};
use crate::eval;
use crate::grpo_config::GrpoConfig;
use crate::grpo_loss::{policy_loss, LossType, ScaleRewards};
use crate::metrics::Metrics;
use crate::optim::StepOutcome;
use crate::rewards::Reward;
use crate::rollout::{completion_logps, logps_from_hidden, seq_batch};
use crate::setup;
use crate::sft::{Outcome, RunOptions};
use crate::snapshot::{
    check_processor, commit_on_main, cut_back, eval_rows, load_checkpoint, quarantine_path,
    resume_dir,
};
use crate::state::{self, GrpoState, TrainState};
use completions_log::CompletionsLog;
use omr_data::mixture::derive_seed;
use omr_data::pipeline::Processor;
use omr_data::quarantine::Quarantine;
use omr_model::generate::SamplingConfig;
use omr_model::linear::Ctx;
use sampling::{Sampler, TrainRows};
use std::sync::Arc;
use std::time::Instant;
use step_log::{RolloutSummary, UpdateStats};

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
    run_in(cfg, opts, rewards, &Launch::from_env()?)
}

/// [`run_with`] as the process `launch` of a data-parallel job (from the environment in
/// `run_with`; given here by a caller that starts its ranks itself, e.g. a test's threads).
pub fn run_in(
    cfg: &GrpoConfig,
    opts: &RunOptions,
    rewards: Vec<(Box<dyn Reward>, f64)>,
    launch: &Launch,
) -> Result<Outcome> {
    if rewards.is_empty() {
        return Err(TrainError::Usage("GRPO needs at least one reward".into()));
    }
    if !cfg.grpo.prompts_per_step.is_multiple_of(launch.world) {
        return Err(TrainError::Usage(format!(
            "grpo.prompts_per_step = {} does not split over the {} processes of this job ({}): \
             make it a multiple of {}",
            cfg.grpo.prompts_per_step, launch.world, launch.vars.1, launch.world
        )));
    }
    let rt = cfg.runtime.resolve_on(launch.gpu)?;
    // Before anything heavy: a rank with another config is refused here, on every rank.
    let mut group = Group::connect(launch, setup::fingerprint(&cfg.to_toml()))?;
    let world = group.world();
    let plan =
        |o: &crate::plan::PlanOptions| crate::plan::input_from_grpo(cfg, &o.with_world(world));
    crate::plan::check_run_memory("this config", &rt, plan).map_err(TrainError::Usage)?;
    train(cfg, opts, rewards, &rt, &mut group)
        .map_err(|e| crate::plan::out_of_memory_error(e, &rt, plan))
}

fn train(
    cfg: &GrpoConfig,
    opts: &RunOptions,
    rewards: Vec<(Box<dyn Reward>, f64)>,
    rt: &crate::runtime::Runtime,
    group: &mut Group,
) -> Result<Outcome> {
    // ---- setup ------------------------------------------------------------------------
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
    let mut model = built.model(rt)?;
    let recompute = cfg
        .train
        .activation_checkpointing
        .recompute()
        .with_attention(cfg.train.recompute_attention)
        .keeping_decoder_layers(
            crate::plan::run_kept_decoder_layers(cfg.train.kept_decoder_layers, rt, |o| {
                crate::plan::input_from_grpo(cfg, &o.with_world(group.world()))
            })
            .map_err(TrainError::Usage)?,
        );
    let (mut opt, wrt) = setup::optimizer(&built.params, &cfg.optim, rt)?;
    // The frozen reference: the run's initial weights, built again from the same [model].
    let reference = reference::build(cfg, rt, &device)?;
    let processor_hashes = state::processor_hashes(&built.processor_dir)
        .map_err(TrainError::io(&built.processor_dir))?;
    let mut loader = setup::open_loader(
        &cfg.data,
        group.data_rank(),
        group.loader_threads(cfg.data.loader.threads),
    )?;

    // ---- resume -------------------------------------------------------------------------
    let mut st = TrainState::fresh(loader.state().clone(), processor_hashes.clone());
    st.grpo = Some(GrpoState {
        reference: reference.as_ref().map(|(_, id)| id.clone()),
        ..GrpoState::default()
    });
    let mut last_eval: Vec<EvalResult> = Vec::new();
    // Rank 0 picks the checkpoint, so that every rank resumes from the same one.
    let found = match group.is_main() {
        true => resume_dir(&opts.resume, &ckpt_root, &run_dir)?,
        false => None,
    };
    let found = group.broadcast_value(&found)?;
    if let Some(dir) = &found {
        let saved = load_checkpoint(dir, &built, &mut opt, &device)?;
        st = setup::rank_state(saved.train, group.rank(), group.world(), dir)?;
        last_eval = eval_rows(&cfg.data.sources, &cfg.eval.split, &saved.eval);
        let Some(gs) = &st.grpo else {
            return Err(TrainError::Usage(format!(
                "{} is not a GRPO checkpoint (an SFT one?): start GRPO from its export with model.path",
                dir.display()
            )));
        };
        let now = reference.as_ref().map(|(_, id)| id.as_str());
        reference::check_unchanged(gs.reference.as_deref(), now, dir)?;
        check_processor(
            &st.processor,
            &processor_hashes,
            opts.allow_processor_change,
            &built.processor_dir,
            dir,
        )?;
        st.processor = processor_hashes.clone();
        loader
            .restore(st.stripe.loader.clone())
            .map_err(|e| TrainError::Usage(format!("{}: {e}", dir.display())))?;
        tracing::info!("resuming from {} (step {})", dir.display(), st.step);
        if built.params.casts_on_get() {
            model = built.model(rt)?;
        }
    }
    let resolved = cfg.to_toml();
    let cfg_path = run_dir.join("config.toml");
    if group.is_main() {
        std::fs::write(&cfg_path, &resolved).map_err(TrainError::io(&cfg_path))?;
    }

    // ---- prompts, logs, eval set ------------------------------------------------------------
    let qpath = quarantine_path(&run_dir, group.rank());
    let cpath = run_dir.join("completions.jsonl");
    cut_back(&qpath, st.stripe.quarantine_bytes)?;
    let completions_bytes = st.grpo.as_ref().map_or(0, |g| g.completions_bytes);
    // Rank 0's groups only.
    let mut completions_log = match group.is_main() {
        true => Some(CompletionsLog::open(cpath, completions_bytes)?),
        false => None,
    };
    let mut quarantine = Quarantine::new(Some(&qpath), cfg.data.quarantine.clone())
        .map_err(|e| TrainError::Usage(e.to_string()))?;
    st.stripe.restore_counters(&mut quarantine);
    let p = processor.clone();
    let mut prompts = loader.stream(move |s| prompts::prompt_item(&p, s));
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
    let mut metrics = match group.is_main() {
        true => Some(
            Metrics::open(&run_dir, resumed_at, opts.progress, cfg.train.max_steps)
                .map_err(|e| TrainError::Internal(e.to_string()))?,
        ),
        false => None,
    };
    let mut save_failures = FailureCounter::new(cfg.checkpoint.max_failures);
    // Vision placeholders in a completion would be taken for image tokens by the forward.
    let suppress = built.cfg.vision_ids().to_vec();
    let sampler = Sampler {
        g,
        prompts: g.prompts_per_step / group.world(),
        stripe: (group.rank(), group.world()),
        sampling: SamplingConfig {
            max_new_tokens: g.max_completion_length,
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            seed: 0,
            eos_token_ids: built.eos_token_ids.clone(),
            keep_logits: false,
            suppress_tokens: suppress.clone(),
        },
        rewards: &rewards,
        processor: &processor,
        seed: cfg.train.seed,
    };
    let total_updates = cfg.total_updates();
    let mut steps_this_process = 0u64;
    // A signal, or the configured number of steps of this process; on any rank.
    let stop_requested = |n: u64, group: &mut Group| {
        group.any(opts.stop.requested() || cfg.train.stop_after_steps.is_some_and(|m| n >= m))
    };

    // ---- the loop: one rollout batch per iteration -------------------------------------------
    while st.step < cfg.train.max_steps {
        let step = st.step + 1;
        let t_step = Instant::now();
        let mut gs = st.grpo.clone().unwrap_or_default();

        // rollout: prompts → G completions → rewards, refilling dropped groups
        let mut next_loader = st.stripe.loader.clone();
        let rollout = sampler.sample(
            &model,
            step,
            &mut prompts,
            &mut quarantine,
            &mut next_loader,
        )?;
        let groups = &rollout.groups;
        if group.any(opts.stop.requested())? {
            // The rollout is dropped: the weights are still those of the last committed step.
            commit_on_main(
                group,
                &ckpt_root,
                cfg.checkpoint.keep_last,
                &resolved,
                &mut st,
                &built,
                &opt,
                &last_eval,
                &mut save_failures,
                true,
            )?;
            metrics.iter_mut().for_each(Metrics::finish);
            return Ok(Outcome::Preempted { step: st.step });
        }

        // advantages over the kept groups (a batch std over every process's)
        let batch = match (cfg.objective.scale_rewards, group.world()) {
            (ScaleRewards::Batch, 2..) => Some(group.all_gather_value(&rollout.kept_totals())?),
            _ => None,
        }
        .map(|all| all.concat());
        let TrainRows {
            rows,
            adv,
            truncated,
            window_tokens,
            rows_tokens,
        } = rollout.train_rows(g.group_size, &cfg.objective, step, batch.as_deref())?;

        // optimisation: num_iterations updates on this rollout batch
        let t_train = Instant::now();
        let mut u = UpdateStats::default();
        let mut nonfinite = false;
        let micro: Vec<std::ops::Range<usize>> = (0..rows.len())
            .step_by(g.micro_batch_size)
            .map(|s| s..(s + g.micro_batch_size).min(rows.len()))
            .collect();
        // Over all processes: the loss is normalised by the whole step's tokens or micro-batches.
        let mut totals = [rows.len() as f64, window_tokens, micro.len() as f64];
        group.sum_f64(&mut totals)?;
        let [all_rows, window_tokens, all_micro] = totals;
        // The reference model's scores of each micro-batch: the same in every iteration (frozen
        // weights, the same rows), computed in the first.
        let mut ref_scores: Vec<Option<candle_core::Tensor>> = vec![None; micro.len()];
        for it in 0..g.num_iterations {
            if all_rows == 0.0 || window_tokens == 0.0 {
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
                    dropout_seed: Some(derive_seed(&[
                        cfg.train.seed,
                        step,
                        it,
                        m as u64 * group.world() as u64 + group.rank() as u64,
                    ])),
                    ..model.ctx()
                };
                let ref_logp = match (&reference, &ref_scores[m]) {
                    (Some(_), Some(known)) => Some(known.clone()),
                    (Some((r, _)), None) => {
                        let scores = completion_logps(
                            r,
                            &b,
                            g.temperature,
                            &suppress,
                            // Scores only: one layer's intermediates at a time.
                            &Ctx {
                                no_grad: true,
                                ..r.ctx()
                            },
                        )?
                        .0
                        .detach();
                        ref_scores[m] = Some(scores.clone());
                        Some(scores)
                    }
                    (None, _) => None,
                };
                let inject = cfg.train.inject_nonfinite_steps.contains(&step);
                let mut stats = None;
                let out =
                    model.forward_backward::<TrainError>(&b.input, &ctx, recompute, &wrt, |h| {
                        let (logp, entropy) =
                            logps_from_hidden(&model, h, &b, g.temperature, &suppress, &ctx)?;
                        if it == 0 {
                            u.entropy_sum += entropy;
                            let d = ((logp.detach() - &b.old_logp)?.abs()? * &b.mask)?
                                .max_all()?
                                .to_scalar::<f32>()? as f64;
                            u.mismatch = u.mismatch.max(d);
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
                            _ => 1.0 / all_micro,
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
                    u.loss_sum += l;
                }
                u.clip_low += stats.clip_low * stats.num_tokens;
                u.clip_high += stats.clip_high * stats.num_tokens;
                u.kl_sum += stats.kl.unwrap_or(0.0) * stats.num_tokens;
                u.tok_sum += stats.num_tokens;
            }
            let update = gs.updates;
            let lr_factor = cfg.schedule.factor(update, total_updates);
            u.lr = cfg.optim.lr * lr_factor;
            let finite = !group.any(!finite)?;
            if finite {
                group.sum_grads(&mut acc)?;
            }
            let outcome = if finite {
                opt.step_accumulated(&mut acc, lr_factor, 1.0)
                    .map_err(|e| TrainError::Internal(e.to_string()))?
            } else {
                StepOutcome::NonFinite {
                    grad_norm: f64::NAN,
                }
            };
            if matches!(outcome, StepOutcome::Applied { .. }) && built.params.casts_on_get() {
                model = built.model(rt)?;
            }
            gs.updates += 1;
            u.updates_done += 1;
            match outcome {
                StepOutcome::Applied { grad_norm: n, .. } => u.grad_norm = n,
                StepOutcome::NonFinite { grad_norm: n } => {
                    u.grad_norm = n;
                    nonfinite = true;
                }
            }
        }
        u.t_train = t_train.elapsed().as_secs_f64();
        if nonfinite {
            st.skipped_steps += 1;
            st.nonfinite_streak += 1;
            tracing::warn!("step {step}: non-finite loss or gradient, update skipped");
        } else {
            st.nonfinite_streak = 0;
        }

        // completions log
        if let Some(log) = &mut completions_log {
            if g.completions_every > 0 && step.is_multiple_of(g.completions_every) {
                log.write(step, groups, g.completions_groups, &rewards, &adv)?;
            }
            gs.completions_bytes = log.bytes();
        }

        // every process's rollout and update, for the state and the log (rank 0; one part, as
        // it was, in a single process)
        let parts =
            group.gather_value(&(rollout.summary.clone(), u, quarantine.bad, rows_tokens))?;
        let rows_tokens = parts.iter().map(|p| p.3).sum::<f64>().max(1.0);
        let bad_samples: u64 = parts.iter().map(|p| p.2).sum();
        let (r, u): (Vec<_>, Vec<_>) = parts.into_iter().map(|p| (p.0, p.1)).unzip();
        let (summary, u) = (RolloutSummary::merge(r), UpdateStats::merge(u));

        // state after the step
        gs.groups_unscored += summary.unscored;
        gs.groups_zero_std += summary.zero_std;
        for ((r, _), f) in rewards.iter().zip(&summary.failures) {
            *gs.reward_failures.entry(r.name().to_string()).or_default() += f;
        }
        st.step = step;
        st.samples += all_rows as u64;
        st.tokens += summary.lens.iter().sum::<usize>() as u64;
        st.stripe.record(next_loader, &mut quarantine, &qpath);
        st.grpo = Some(gs);

        // log
        let dt = t_step.elapsed().as_secs_f64();
        let (line, values) = step_log::fields(
            cfg,
            &rewards,
            step,
            &summary,
            &u,
            rows_tokens,
            dt,
            bad_samples,
        );
        if let Some(m) = &mut metrics {
            m.log_step_fields(step, &line, &values)
                .map_err(|e| TrainError::Internal(e.to_string()))?;
        }
        if st.nonfinite_streak >= cfg.train.max_nonfinite_steps {
            metrics.iter_mut().for_each(Metrics::finish);
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
                    group,
                )?;
                let values: Vec<(String, f64)> = last_eval
                    .iter()
                    .map(|r| (format!("eval/{}", r.metric), r.value))
                    .collect();
                if let Some(m) = &mut metrics {
                    m.log_scalars(step, "eval", &values)
                        .map_err(|e| TrainError::Internal(e.to_string()))?;
                }
            }
        }

        // checkpoint, preemption
        steps_this_process += 1;
        let stop = stop_requested(steps_this_process, group)?;
        if last || stop || cfg.checkpoint.is_due(step) {
            commit_on_main(
                group,
                &ckpt_root,
                cfg.checkpoint.keep_last,
                &resolved,
                &mut st,
                &built,
                &opt,
                &last_eval,
                &mut save_failures,
                last || stop,
            )?;
        }
        if stop && !last {
            metrics.iter_mut().for_each(Metrics::finish);
            return Ok(Outcome::Preempted { step });
        }
    }
    metrics.iter_mut().for_each(Metrics::finish);

    // ---- export -------------------------------------------------------------------------
    if cfg.export.at_end && group.is_main() {
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
