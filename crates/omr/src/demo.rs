//! `omr demo`: the README's first command. On a fresh machine, on CPU: synthesise
//! OpenMedReason-style shards and train their tokenizer, validate both splits, train a tiny
//! Qwen2.5-VL from scratch with the SFT recipe (`configs/sft/tiny.toml`, embedded), export it
//! in Hugging Face format, continue it with GRPO (`configs/grpo/tiny.toml`, embedded), and
//! print base / SFT / GRPO accuracy on the synthetic bench (the test split), next to chance.
//! The SFT and GRPO columns are measured on the *exported* folders, loaded back the way any
//! user would load them, so the table also checks the exports.

use crate::data::{self, DataArgs, ModelArgs, SynthArgs, ValidateArgs};
use crate::exit::{Exit, Tag};
use crate::sft_cmd::train_error;
use candle_core::Device;
use clap::Args;
use omr_data::pipeline::Processor;
use omr_data::source::SourceSpec;
use omr_eval::judge::rules::RuleJudge;
use omr_eval::pkr::Axis;
use omr_eval::report::ModelReport;
use omr_eval::{run, EvalOptions};
use omr_model::model::Qwen2VL;
use omr_train::config::SftConfig;
use omr_train::grpo;
use omr_train::grpo_config::GrpoConfig;
use omr_train::setup;
use omr_train::sft::{self, Outcome, Resume, RunOptions};
use omr_train::signals::StopFlag;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

const PRESET: &str = include_str!("../../../configs/sft/tiny.toml");
const GRPO_PRESET: &str = include_str!("../../../configs/grpo/tiny.toml");

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub train: usize,
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra overrides of the embedded SFT preset (e.g. --set train.max_steps=50).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Extra overrides of the embedded GRPO preset (e.g. --grpo-set train.max_steps=10).
    #[arg(long = "grpo-set", value_name = "SECTION.KEY=VALUE")]
    pub grpo_sets: Vec<String>,
}

pub fn run(a: DemoArgs) -> crate::Result<()> {
    let t0 = Instant::now();
    let data_dir = a.out.join("data");
    eprintln!("== 1. synthetic shards + tokenizer");
    let processor_dir = data::synth(&SynthArgs {
        out: data_dir.clone(),
        train: a.train,
        test: a.test,
        seed: a.seed,
        vocab_size: 2048,
        // 112×112 → 16 image tokens: a quarter of the vision work of the 224 default.
        max_pixels: 112 * 112,
        fixed_option_order: true,
    })?;
    let model_args = ModelArgs {
        model: processor_dir.clone(),
        max_length: 2048,
        max_image_pixels: 64_000_000,
    };
    for split in ["train", "test"] {
        eprintln!("== 2. validate {split}");
        data::validate(&ValidateArgs {
            data: data_args(&data_dir, split),
            config: None,
            model: model_args.clone(),
            quarantine: a.out.join(format!("quarantine-{split}.jsonl")),
            report: Some(a.out.join(format!("validate-{split}.json"))),
            max_bad: Some(0),
            max_bad_fraction: 0.0,
            threads: 0,
        })?;
    }

    let run_dir = a.out.join("sft");
    let mut sets = vec![
        format!("run.dir={}", toml_str(&run_dir)),
        format!("model.processor={}", toml_str(&processor_dir)),
        format!("data.sources.0.path={}", toml_str(&data_dir)),
        format!("eval.generate_samples={}", a.test),
    ];
    sets.extend(a.sets.iter().cloned());
    let cfg =
        SftConfig::from_toml_str(PRESET, "configs/sft/tiny.toml (embedded)", &sets).usage()?;
    let processor = Processor::from_model_dir(&processor_dir, &cfg.data.process).usage()?;
    let bench_data = SourceSpec::local(&data_dir, "test");
    let eval_opts = EvalOptions {
        split: "test".into(),
        limit: Some(a.test),
        batch_size: cfg.eval.batch_size,
        max_new_tokens: cfg.eval.max_new_tokens,
        max_length: cfg.data.process.max_length,
        judge_threads: 2,
        ..EvalOptions::default()
    };
    let judge = RuleJudge;

    eprintln!("== 3. base model: the seeded tiny init, before training");
    let base = setup::build(&cfg.model, cfg.train.seed, &Device::Cpu).map_err(train_error)?;
    let base_gen = run::answer_bench(
        "base (seeded init)",
        &Qwen2VL::new(&base.cfg, &base.params)?,
        &processor,
        &base.eos_token_ids,
        &bench_data,
        &eval_opts,
    )?;
    let base_items = run::score(&base_gen, &judge, false)?;
    let base_report = run::model_report(&base_gen, &base_items);

    eprintln!(
        "== 4. SFT ({} steps, {})",
        cfg.train.max_steps,
        run_dir.display()
    );
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)?;
    }
    let opts = RunOptions {
        resume: Resume::Never,
        allow_processor_change: false,
        progress: std::io::stderr().is_terminal(),
        stop: StopFlag::from_signals()?,
    };
    let t_train = Instant::now();
    match sft::run(&cfg, &opts).map_err(train_error)? {
        Outcome::Done { .. } => {}
        Outcome::Preempted { step } => {
            return Err(Exit {
                code: 75,
                err: anyhow::anyhow!("demo interrupted at step {step}"),
            })
        }
    }
    let train_s = t_train.elapsed().as_secs_f64();

    let grpo_dir = a.out.join("grpo");
    let mut gsets = vec![
        format!("run.dir={}", toml_str(&grpo_dir)),
        format!("model.path={}", toml_str(&run_dir.join("export"))),
        format!("data.sources.0.path={}", toml_str(&data_dir)),
        "eval.generate_samples=0".to_string(),
    ];
    gsets.extend(a.grpo_sets.iter().cloned());
    let gcfg = GrpoConfig::from_toml_str(GRPO_PRESET, "configs/grpo/tiny.toml (embedded)", &gsets)
        .usage()?;
    eprintln!(
        "== 5. GRPO from the SFT export ({} steps of {} prompts × {} completions, {})",
        gcfg.train.max_steps,
        gcfg.grpo.prompts_per_step,
        gcfg.grpo.group_size,
        grpo_dir.display()
    );
    if grpo_dir.exists() {
        std::fs::remove_dir_all(&grpo_dir)?;
    }
    let t_grpo = Instant::now();
    match grpo::run(&gcfg, &opts).map_err(train_error)? {
        Outcome::Done { .. } => {}
        Outcome::Preempted { step } => {
            return Err(Exit {
                code: 75,
                err: anyhow::anyhow!("demo interrupted in GRPO at step {step}"),
            })
        }
    }
    let grpo_s = t_grpo.elapsed().as_secs_f64();

    // Both exports loaded back from disk the way any user would load them; GRPO is model A,
    // SFT the compared model B of the pairwise preference.
    eprintln!("== 6. omr eval of the SFT and GRPO exports (rule judge)");
    let eval_dir = a.out.join("eval");
    let ev = omr_eval::evaluate(
        &s(&grpo_dir.join("export")),
        &bench_data,
        &EvalOptions {
            compare: Some(s(&run_dir.join("export"))),
            ..eval_opts.clone()
        },
        &judge,
    )?;
    ev.write(&eval_dir)?;
    let sft_report = ev
        .report
        .compare
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the SFT model was not evaluated"))?;

    print_table(
        &[
            ("base", &base_report),
            ("SFT", &sft_report),
            ("GRPO", &ev.report.model),
        ],
        base_report.accuracy.chance,
    );
    if let Some(p) = &ev.report.pairwise {
        println!(
            "\npairwise, GRPO vs SFT traces ({:?}): {} wins, {} ties, {} losses (preference {:.1}%)",
            p.method,
            p.wins,
            p.ties,
            p.losses,
            100.0 * p.preference_rate
        );
    }
    eprintln!(
        "demo finished in {:.0}s (SFT {:.0}s, GRPO {:.0}s); runs {} and {} (HF exports in export/), \
         eval report {}; `omr plot DIR` draws the curves",
        t0.elapsed().as_secs_f64(),
        train_s,
        grpo_s,
        run_dir.display(),
        grpo_dir.display(),
        eval_dir.join("eval.md").display(),
    );
    Ok(())
}

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

fn print_table(cols: &[(&str, &ModelReport)], chance: f64) {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let row = |label: &str, values: Vec<String>| {
        let mut line = format!("| {label:<28} |");
        for v in values {
            line.push_str(&format!(" {v:>8} |"));
        }
        println!("{line}");
    };
    let Some((_, last)) = cols.last() else {
        return;
    };
    println!();
    println!(
        "OpenMedReason-style synthetic bench (test split, {} questions, greedy; trace = PKR with the offline rule judge)",
        last.accuracy.overall.total
    );
    let mut head: Vec<String> = cols.iter().map(|c| c.0.to_string()).collect();
    head.push("chance".into());
    row("", head);
    let mut sep = format!("|{:-<30}|", "");
    for _ in 0..=cols.len() {
        sep.push_str(&format!("{:->10}|", ""));
    }
    println!("{sep}");
    let mut acc: Vec<String> = cols
        .iter()
        .map(|c| pct(c.1.accuracy.overall.value))
        .collect();
    acc.push(pct(chance));
    row("answer accuracy", acc);
    let mut fmt: Vec<String> = cols.iter().map(|c| pct(c.1.accuracy.format_rate)).collect();
    fmt.push(String::new());
    row("<answer> tag well formed", fmt);
    if let Some(fams) = last.accuracy.by_group.get("task_family") {
        for (value, r) in fams {
            let mut v: Vec<String> = cols
                .iter()
                .map(|c| {
                    c.1.accuracy
                        .by_group
                        .get("task_family")
                        .and_then(|m| m.get(value))
                        .map_or(String::new(), |x| pct(x.value))
                })
                .collect();
            v.push(String::new());
            row(&format!("  {value} ({})", r.total), v);
        }
    }
    let trace = |c: &ModelReport| c.pkr.as_ref().map_or("n/a".to_string(), |p| pct(p.trace));
    let mut t: Vec<String> = cols.iter().map(|c| trace(c.1)).collect();
    t.push(String::new());
    row("trace score (PKR)", t);
    for axis in [Axis::Perception, Axis::Knowledge, Axis::Rationale] {
        let mut v: Vec<String> = cols
            .iter()
            .map(|c| {
                c.1.pkr
                    .as_ref()
                    .and_then(|p| p.axis(axis))
                    .map_or("n/a".to_string(), |x| pct(x.score))
            })
            .collect();
        v.push(String::new());
        row(&format!("  {axis:?}"), v);
    }
}

/// A path as a TOML string value for `--set`.
fn toml_str(p: &std::path::Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

fn data_args(dir: &std::path::Path, split: &str) -> DataArgs {
    DataArgs {
        data: Some(dir.to_path_buf()),
        hub: None,
        split: split.into(),
        format: "auto".into(),
        image_root: None,
    }
}
