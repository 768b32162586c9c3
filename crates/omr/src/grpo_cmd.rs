//! `omr grpo`: parse, load the GRPO config, call the recipe, map the outcome to an exit code
//! (75 when preempted with a checkpoint committed), like `omr sft`.

use crate::exit::Tag;
use crate::sft_cmd::{finish, resume_arg, train_error, SftArgs};
use omr_train::grpo;
use omr_train::grpo_config::GrpoConfig;
use omr_train::sft::RunOptions;
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
    let outcome = grpo::run(&cfg, &opts).map_err(train_error)?;
    finish(outcome, &cfg.run.dir, "GRPO ")
}
