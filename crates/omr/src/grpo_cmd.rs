//! `omr grpo`: parse, load the GRPO config, call the recipe, map the outcome to an exit code
//! (75 when preempted with a checkpoint committed), like `omr sft`.

use crate::exit::{Exit, Tag};
use crate::sft_cmd::{resume_arg, train_error, SftArgs};
use omr_train::grpo;
use omr_train::grpo_config::GrpoConfig;
use omr_train::sft::{Outcome, RunOptions};
use omr_train::signals::StopFlag;
use std::io::IsTerminal;

/// Same flags as `omr sft`: --config, --set, --resume, --allow-processor-change.
pub type GrpoArgs = SftArgs;

pub fn run(a: GrpoArgs) -> crate::Result<()> {
    let cfg = GrpoConfig::load(&a.config, &a.sets).usage()?;
    let opts = RunOptions {
        resume: resume_arg(&a.resume),
        allow_processor_change: a.allow_processor_change,
        progress: std::io::stderr().is_terminal(),
        stop: StopFlag::from_signals()?,
    };
    match grpo::run(&cfg, &opts).map_err(train_error)? {
        Outcome::Done { step, eval } => {
            eprintln!(
                "done: {step} GRPO steps; run directory {}",
                cfg.run.dir.display()
            );
            for r in eval {
                eprintln!("  eval/{} = {:.4}", r.metric, r.value);
            }
            Ok(())
        }
        Outcome::Preempted { step } => {
            eprintln!(
                "preempted: checkpoint at step {step} committed in {}; exiting 75 (requeue)",
                cfg.run.dir.join("checkpoints").display()
            );
            Err(Exit {
                code: 75,
                err: anyhow::anyhow!("preempted at step {step}"),
            })
        }
    }
}
