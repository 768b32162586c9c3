//! Supervised fine-tuning: `run` is the whole recipe, one function read top to bottom
//! (STYLE.md): setup → resume → for each optimizer step {micro-batches: batch, forward, loss,
//! backward, accumulate} → clip + AdamW → log → eval → checkpoint → preemption check → export.
//!
//! Notable choices:
//! - The loss of a step is the sum of token losses over every micro-batch divided by the
//!   assistant tokens of *all* of them, so gradient accumulation equals one large batch.
//! - A step whose loss or gradient is not finite is skipped: weights and moments stay bitwise
//!   as they were, the data it consumed stays consumed, and after `train.max_nonfinite_steps`
//!   in a row the run stops with exit 65.
//! - A stop request (SIGTERM/SIGUSR1, or `train.stop_after_micro_batches`) is honoured after
//!   the current micro-batch: the checkpoint of the last completed step is committed (the
//!   partial accumulation is dropped and redone after resume) and the run returns
//!   `Outcome::Preempted` (exit 75).
//! - Everything random is keyed by (seed, step, micro-batch), and the data cursor is in the
//!   resume state, so a resumed run reproduces the never-stopped one bit for bit on CPU.
//! - Data parallel (`dist`): each of W processes reads every W-th record, and before each
//!   optimizer step the gradients, losses and token counts are summed over the processes, so
//!   every process takes the same step: the one a single process takes with `grad_accum`·W
//!   (bit for bit with one micro-batch per process on CPU). Rank r's micro-batch m counts as
//!   micro-batch m·W + r of that step for its random draws. Stops, non-finite steps and
//!   skipped steps are agreed on by all, and every rank scores its share of the evaluation;
//!   rank 0 alone logs, checkpoints (with every rank's data cursor) and exports.

use crate::batch::to_input;
use crate::card::EvalResult;
use crate::checkpoint::FailureCounter;
use crate::config::SftConfig;
use crate::dist::{Group, Launch};
use crate::error::{Result, TrainError};
use crate::eval;
use crate::metrics::{rss_mib, Metrics, StepStats};
use crate::optim::StepOutcome;
use crate::setup;
use crate::signals::StopFlag;
use crate::snapshot::{
    check_processor, commit_on_main, cut_back, eval_rows, load_checkpoint, quarantine_path,
    resume_dir,
};
use crate::state::{self, TrainState};
use omr_data::batcher::{BatchError, Batcher};
use omr_data::mixture::derive_seed;
use omr_data::pipeline::Processor;
use omr_data::quarantine::{Quarantine, QuarantineError};
use omr_model::linear::Ctx;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// How `run` treats an existing run directory.
#[derive(Clone, Debug, PartialEq)]
pub enum Resume {
    /// Continue from the newest valid checkpoint if there is one, else start fresh.
    Auto,
    /// Start fresh; refuse a run directory that already has checkpoints.
    Never,
    /// Continue from this checkpoint directory.
    From(PathBuf),
}

pub struct RunOptions {
    pub resume: Resume,
    /// Resume even when tokenizer, chat template or image processor files changed.
    pub allow_processor_change: bool,
    /// Progress bar with ETA (a terminal) instead of plain lines.
    pub progress: bool,
    pub stop: StopFlag,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All `train.max_steps` done; the final checkpoint (and export) are written.
    Done { step: u64, eval: Vec<EvalResult> },
    /// Stopped on request; a checkpoint at `step` is committed. Exit 75 and requeue.
    Preempted { step: u64 },
}

pub fn run(cfg: &SftConfig, opts: &RunOptions) -> Result<Outcome> {
    let launch = Launch::from_env()?;
    let rt = cfg.runtime.resolve_on(launch.gpu)?;
    // Before anything heavy: a rank with another config is refused here, on every rank.
    let mut group = Group::connect(&launch, setup::fingerprint(&cfg.to_toml()))?;
    let world = group.world();
    let plan =
        |o: &crate::plan::PlanOptions| crate::plan::input_from_sft(cfg, &o.with_world(world));
    crate::plan::check_run_memory("this config", &rt, plan).map_err(TrainError::Usage)?;
    train(cfg, opts, &rt, &mut group).map_err(|e| crate::plan::out_of_memory_error(e, &rt, plan))
}

fn train(
    cfg: &SftConfig,
    opts: &RunOptions,
    rt: &crate::runtime::Runtime,
    group: &mut Group,
) -> Result<Outcome> {
    // ---- setup ------------------------------------------------------------------------
    let device = rt.device.clone();
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
        .keeping_decoder_layers(kept_decoder_layers(cfg, rt, group.world())?);
    let (mut opt, wrt) = setup::optimizer(&built.params, &cfg.optim, rt)?;
    let processor_hashes = state::processor_hashes(&built.processor_dir)
        .map_err(TrainError::io(&built.processor_dir))?;
    let mut loader = setup::open_loader(
        &cfg.data,
        group.data_rank(),
        group.loader_threads(cfg.data.loader.threads),
    )?;

    // ---- resume -------------------------------------------------------------------------
    let mut st = TrainState::fresh(loader.state().clone(), processor_hashes.clone());
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
        // Later checkpoints (and their model cards) carry the last eval, as without the stop.
        last_eval = eval_rows(&cfg.data.sources, &cfg.eval.split, &saved.eval);
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

    // ---- data, eval set, metrics -------------------------------------------------------------
    // Cut back to the checkpoint's length (0 for a fresh run): records after it are read again.
    let qpath = quarantine_path(&run_dir, group.rank());
    cut_back(&qpath, st.stripe.quarantine_bytes)?;
    let mut quarantine = Quarantine::new(Some(&qpath), cfg.data.quarantine.clone())
        .map_err(|e| TrainError::Usage(e.to_string()))?;
    st.stripe.restore_counters(&mut quarantine);
    let p = processor.clone();
    let stream = loader.stream(move |s| p.encode(s));
    let mut batcher = Batcher::new(
        stream,
        loader.state().clone(),
        cfg.data.batch.clone(),
        processor.pad_id(),
    );
    let eval_set = if cfg.eval.loss_samples + cfg.eval.generate_samples > 0 {
        let set = eval::load_eval_set(
            &cfg.data.sources,
            &cfg.eval.split,
            &processor,
            cfg.eval.loss_samples,
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
    let max_steps = cfg.train.max_steps;
    let mut micro_batches_seen = 0u64;
    // A signal, or the configured number of micro-batches of this process; on any rank.
    let stop_requested = |seen: u64, group: &mut Group| {
        group.any(
            opts.stop.requested()
                || cfg
                    .train
                    .stop_after_micro_batches
                    .is_some_and(|m| seen >= m),
        )
    };
    let (rank, world) = (group.rank() as u64, group.world() as u64);

    // ---- the loop: one optimizer step per iteration -----------------------------------------
    while st.step < max_steps {
        let step = st.step + 1;
        let t_step = Instant::now();
        let mut data_time = 0.0;
        let mut acc = opt.grad_accum();
        let (mut loss_sum, mut n_tokens, mut n_samples, mut n_input_tokens) =
            (0.0f64, 0usize, 0u64, 0u64);
        let mut finite = true;
        let mut next_loader = st.stripe.loader.clone();
        let mut stopped = false;
        for micro in 0..cfg.train.grad_accum {
            let t_data = Instant::now();
            let next = batcher.next_batch(&mut quarantine).map_err(batch_error)?;
            data_time += t_data.elapsed().as_secs_f64();
            let Some((batch, after)) = next else {
                return Err(TrainError::Usage(
                    "the training data has no usable sample (see quarantine.jsonl)".into(),
                ));
            };
            next_loader = after;
            n_samples += batch.samples() as u64;
            n_input_tokens += batch.tokens() as u64;
            // (B, T) ids and labels; (N, C·T·P·P) patches
            let (input, labels) = to_input(&batch, &device)?;
            let ctx = Ctx {
                dropout_seed: Some(derive_seed(&[cfg.train.seed, step, micro * world + rank])),
                ..model.ctx()
            };
            let mut n = 0;
            let inject = cfg.train.inject_nonfinite_steps.contains(&step);
            let out = model.forward_backward::<TrainError>(&input, &ctx, recompute, &wrt, |h| {
                let (sum, k) = model.head_loss(h, &labels, &ctx)?;
                n = k;
                Ok(if inject { (sum * f64::NAN)? } else { sum })
            })?;
            let s = out.loss;
            match out.grads {
                Some(g) if finite => acc
                    .add(&g)
                    .map_err(|e| TrainError::Internal(e.to_string()))?,
                Some(_) => {}
                None => finite = false,
            }
            loss_sum += s;
            n_tokens += n;
            micro_batches_seen += 1;
            if stop_requested(micro_batches_seen, group)? {
                stopped = micro + 1 < cfg.train.grad_accum;
                if stopped {
                    break;
                }
            }
        }
        if stopped {
            // Mid-accumulation: nothing of this step is kept; its data is read again on resume.
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

        // The step over all ranks: sums in rank order; a rank's non-finite step is everyone's.
        let mut totals = [
            loss_sum,
            n_tokens as f64,
            n_samples as f64,
            n_input_tokens as f64,
            f64::from(u8::from(!finite)),
            quarantine.bad as f64,
        ];
        group.sum_f64(&mut totals)?;
        let [loss_sum, n_tokens, n_samples, n_input_tokens, nonfinite, bad_samples] = totals;
        let (n_tokens, n_samples, n_input_tokens) =
            (n_tokens as usize, n_samples as u64, n_input_tokens as u64);
        let finite = nonfinite == 0.0;
        if finite {
            group.sum_grads(&mut acc)?;
        }

        // clip + AdamW, or skip a non-finite step
        let lr_factor = cfg.schedule.factor(st.step, max_steps);
        let outcome = if !finite {
            StepOutcome::NonFinite {
                grad_norm: f64::NAN,
            }
        } else if n_tokens == 0 {
            // Nothing supervised in the whole step (every assistant turn cut): nothing to learn,
            // and nothing wrong with the numbers either.
            tracing::warn!("step {step}: no assistant tokens in its batches, no update");
            StepOutcome::Applied {
                grad_norm: 0.0,
                clipped: false,
            }
        } else {
            opt.step_accumulated(&mut acc, lr_factor, 1.0 / n_tokens as f64)
                .map_err(|e| TrainError::Internal(e.to_string()))?
        };
        if matches!(outcome, StepOutcome::Applied { .. }) && built.params.casts_on_get() {
            model = built.model(rt)?;
        }
        let grad_norm = match outcome {
            StepOutcome::Applied { grad_norm, .. } => {
                st.nonfinite_streak = 0;
                grad_norm
            }
            StepOutcome::NonFinite { grad_norm } => {
                st.skipped_steps += 1;
                st.nonfinite_streak += 1;
                tracing::warn!("step {step}: non-finite loss or gradient, step skipped");
                grad_norm
            }
        };
        st.step = step;
        st.tokens += n_input_tokens;
        st.samples += n_samples;
        st.stripe.record(next_loader, &mut quarantine, &qpath);

        // log
        let dt = t_step.elapsed().as_secs_f64();
        let loss = loss_sum / n_tokens.max(1) as f64;
        if let Some(m) = &mut metrics {
            m.log_step(&StepStats {
                step,
                total_steps: max_steps,
                epoch: epoch_of(&st),
                loss,
                lr: cfg.optim.lr * lr_factor,
                grad_norm,
                tokens_per_s: n_input_tokens as f64 / dt,
                samples_per_s: n_samples as f64 / dt,
                step_time_s: dt,
                data_time_s: data_time,
                mem_mib: rss_mib(),
                skipped: st.skipped_steps,
                bad_samples: bad_samples as u64,
                supervised_tokens: n_tokens as u64,
            })
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
        let last = step == max_steps;
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
        let stop = stop_requested(micro_batches_seen, group)?;
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
        crate::export::export(
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

fn batch_error(e: BatchError) -> TrainError {
    match e {
        BatchError::Quarantine(q @ QuarantineError::OverBudget { .. }) => TrainError::BadData(q),
        other => TrainError::Usage(other.to_string()),
    }
}

/// Passes over the data so far, fractional (first source; a rank's cursor counts in its stripe).
fn epoch_of(st: &TrainState) -> f64 {
    st.stripe
        .loader
        .sources
        .first()
        .map(|c| {
            let stripe = omr_data::mixture::per_rank_len(c.len, st.stripe.loader.world);
            c.epoch as f64 + c.pos as f64 / stripe.max(1) as f64
        })
        .unwrap_or(0.0)
}

/// `[train] kept_decoder_layers` for this run: the count given, or for "auto" the most the
/// plan finds room for on the run's device (logged).
fn kept_decoder_layers(
    cfg: &SftConfig,
    rt: &crate::runtime::Runtime,
    world: usize,
) -> Result<usize> {
    crate::plan::run_kept_decoder_layers(cfg.train.kept_decoder_layers, rt, |o| {
        crate::plan::input_from_sft(cfg, &o.with_world(world))
    })
    .map_err(TrainError::Usage)
}
