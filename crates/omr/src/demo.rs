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
use candle_core::{DType, Device};
use clap::Args;
use omr_data::pipeline::Processor;
use omr_model::generate::SamplingConfig;
use omr_model::model::Qwen2VL;
use omr_model::pretrained;
use omr_train::config::SftConfig;
use omr_train::eval::{self, Accuracy, GenItem};
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
    let bench = eval::load_eval_set(&cfg.data.sources, "test", &processor, 0, a.test)?;

    eprintln!("== 3. base model: the seeded tiny init, before training");
    let base = setup::build(&cfg.model, cfg.train.seed, &Device::Cpu).map_err(train_error)?;
    let base_acc = score(
        &Qwen2VL::new(&base.cfg, &base.params)?,
        &bench.gen_items,
        &cfg,
        &processor,
        &base.eos_token_ids,
    )?;

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

    eprintln!(
        "== 5. the exported model, loaded back from {}",
        run_dir.join("export").display()
    );
    let exported = pretrained::load_dir(&run_dir.join("export"), DType::F32, &Device::Cpu)?;
    let eos = omr_model::generate::eos_ids(&exported.dir, &exported.config.eos_token_ids);
    let sft_acc = score(
        &Qwen2VL::new(&exported.config, &exported.params)?,
        &bench.gen_items,
        &cfg,
        &processor,
        &eos,
    )?;

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
        "== 6. GRPO from the SFT model ({} steps of {} prompts × {} completions, {})",
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
    eprintln!(
        "== 7. the GRPO export, loaded back from {}",
        grpo_dir.join("export").display()
    );
    let exported = pretrained::load_dir(&grpo_dir.join("export"), DType::F32, &Device::Cpu)?;
    let grpo_acc = score(
        &Qwen2VL::new(&exported.config, &exported.params)?,
        &bench.gen_items,
        &cfg,
        &processor,
        &eos,
    )?;

    print_table(
        &[("base", &base_acc), ("SFT", &sft_acc), ("GRPO", &grpo_acc)],
        eval::chance(&bench.gen_items),
    );
    eprintln!(
        "demo finished in {:.0}s (SFT {:.0}s, GRPO {:.0}s); runs {} and {}, HF exports in their export/; `omr plot DIR` draws the curves",
        t0.elapsed().as_secs_f64(),
        train_s,
        grpo_s,
        run_dir.display(),
        grpo_dir.display(),
    );
    Ok(())
}

fn score(
    model: &Qwen2VL,
    items: &[GenItem],
    cfg: &SftConfig,
    processor: &Processor,
    eos: &[u32],
) -> crate::Result<Accuracy> {
    let sampling = SamplingConfig {
        max_new_tokens: cfg.eval.max_new_tokens,
        eos_token_ids: eos.to_vec(),
        ..Default::default()
    };
    let tok = processor.encoder().tokenizer();
    let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_default();
    Ok(eval::eval_accuracy(
        model,
        items,
        cfg.eval.batch_size,
        processor.pad_id(),
        &sampling,
        &decode,
    )?)
}

fn print_table(cols: &[(&str, &Accuracy)], chance: f64) {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let row = |label: &str, values: Vec<String>| {
        let mut line = format!("| {label:<28} |");
        for v in values {
            line.push_str(&format!(" {v:>8} |"));
        }
        println!("{line}");
    };
    println!();
    println!(
        "OpenMedReason-style synthetic bench (test split, {} questions, greedy)",
        cols.last().map_or(0, |c| c.1.total)
    );
    let mut head: Vec<String> = cols.iter().map(|c| c.0.to_string()).collect();
    head.push("chance".into());
    row("", head);
    let mut sep = format!("|{:-<30}|", "");
    for _ in 0..=cols.len() {
        sep.push_str(&format!("{:->10}|", ""));
    }
    println!("{sep}");
    let mut acc: Vec<String> = cols.iter().map(|c| pct(c.1.value())).collect();
    acc.push(pct(chance));
    row("answer accuracy", acc);
    let mut fmt: Vec<String> = cols.iter().map(|c| pct(c.1.format_rate())).collect();
    fmt.push(String::new());
    row("<answer> tag present", fmt);
    let Some((_, last)) = cols.last() else {
        return;
    };
    for ((key, value), (_, n)) in &last.by_group {
        if key != "task_family" {
            continue;
        }
        let mut v: Vec<String> = cols
            .iter()
            .map(|c| {
                let (ok, n) =
                    c.1.by_group
                        .get(&(key.clone(), value.clone()))
                        .copied()
                        .unwrap_or((0, 0));
                pct(ok as f64 / n.max(1) as f64)
            })
            .collect();
        v.push(String::new());
        row(&format!("  {value} ({n})"), v);
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
