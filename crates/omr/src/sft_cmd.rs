//! `omr sft` and `omr export --checkpoint`: parse, load the config, call the recipe, map the
//! outcome to an exit code (75 when preempted with a checkpoint committed).

use crate::exit::{Exit, Tag};
use clap::Args;
use omr_train::config::SftConfig;
use omr_train::sft::{self, Outcome, Resume, RunOptions};
use omr_train::signals::StopFlag;
use omr_train::TrainError;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args)]
pub struct SftArgs {
    /// Run config (TOML), e.g. configs/sft/tiny.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value: --set optim.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// auto (newest valid checkpoint of run.dir, else fresh) | never | a checkpoint directory.
    #[arg(long, default_value = "auto")]
    pub resume: String,
    /// Resume even if tokenizer, chat template or image processor files changed.
    #[arg(long)]
    pub allow_processor_change: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint directory (runs/x/checkpoints/step-000300).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// LoRA runs: write the merged full model instead of a PEFT adapter.
    #[arg(long)]
    pub merge_lora: bool,
}

/// `--resume auto|never|DIR`.
pub fn resume_arg(s: &str) -> Resume {
    match s {
        "auto" => Resume::Auto,
        "never" => Resume::Never,
        dir => Resume::From(PathBuf::from(dir)),
    }
}

pub fn train_error(e: TrainError) -> Exit {
    Exit {
        code: e.exit_code(),
        err: e.into(),
    }
}

pub fn run(a: SftArgs) -> crate::Result<()> {
    let cfg = SftConfig::load(&a.config, &a.sets).usage()?;
    let opts = RunOptions {
        resume: resume_arg(&a.resume),
        allow_processor_change: a.allow_processor_change,
        progress: std::io::stderr().is_terminal(),
        stop: StopFlag::from_signals()?,
    };
    let outcome = sft::run(&cfg, &opts).map_err(train_error)?;
    finish(outcome, &cfg.run.dir, "")
}

/// What a recipe's outcome prints, and its exit: 0 done, 75 preempted with a checkpoint.
pub fn finish(outcome: Outcome, run_dir: &std::path::Path, recipe: &str) -> crate::Result<()> {
    match outcome {
        Outcome::Done { step, eval } => {
            eprintln!(
                "done: {step} {recipe}steps; run directory {}",
                run_dir.display()
            );
            for r in eval {
                eprintln!("  eval/{} = {:.4}", r.metric, r.value);
            }
            Ok(())
        }
        Outcome::Preempted { step } => {
            eprintln!(
                "preempted: checkpoint at step {step} committed in {}; exiting 75 (requeue)",
                run_dir.join("checkpoints").display()
            );
            Err(Exit {
                code: 75,
                err: anyhow::anyhow!("preempted at step {step}"),
            })
        }
    }
}

pub fn export(a: ExportArgs) -> crate::Result<()> {
    omr_train::export::export_checkpoint(&a.checkpoint, &a.out, a.merge_lora)
        .map_err(train_error)?;
    eprintln!("exported {} to {}", a.checkpoint.display(), a.out.display());
    Ok(())
}
