//! `omr demo`: the README's first command. On a fresh machine, on CPU: synthesise
//! OpenMedReason-style shards and train their tokenizer, validate both splits, train a tiny
//! Qwen2.5-VL from scratch with the SFT recipe (`configs/sft/tiny.toml`, embedded), export it
//! in Hugging Face format, and print base vs SFT accuracy on the synthetic bench (the test
//! split), next to chance. The SFT row is measured on the *exported* folder, loaded back the
//! way any user would load it, so the table also checks the export.

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
use omr_train::setup;
use omr_train::sft::{self, Outcome, Resume, RunOptions};
use omr_train::signals::StopFlag;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

const PRESET: &str = include_str!("../../../configs/sft/tiny.toml");

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

    print_table(&base_acc, &sft_acc, eval::chance(&bench.gen_items));
    eprintln!(
        "demo finished in {:.0}s (training {:.0}s); run directory {}, HF export {}; `omr plot {}` draws the curves",
        t0.elapsed().as_secs_f64(),
        train_s,
        run_dir.display(),
        run_dir.join("export").display(),
        run_dir.display()
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

fn print_table(base: &Accuracy, sft: &Accuracy, chance: f64) {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    println!();
    println!(
        "OpenMedReason-style synthetic bench (test split, {} questions, greedy)",
        sft.total
    );
    println!(
        "| {:<28} | {:>8} | {:>8} | {:>8} |",
        "", "base", "SFT", "chance"
    );
    println!("|{:-<30}|{:->10}|{:->10}|{:->10}|", "", "", "", "");
    println!(
        "| {:<28} | {:>8} | {:>8} | {:>8} |",
        "answer accuracy",
        pct(base.value()),
        pct(sft.value()),
        pct(chance)
    );
    println!(
        "| {:<28} | {:>8} | {:>8} | {:>8} |",
        "<answer> tag present",
        pct(base.format_rate()),
        pct(sft.format_rate()),
        ""
    );
    for ((key, value), (ok, n)) in &sft.by_group {
        if key != "task_family" {
            continue;
        }
        let (bok, bn) = base
            .by_group
            .get(&(key.clone(), value.clone()))
            .copied()
            .unwrap_or((0, 0));
        println!(
            "| {:<28} | {:>8} | {:>8} | {:>8} |",
            format!("  {value} ({n})"),
            pct(bok as f64 / bn.max(1) as f64),
            pct(*ok as f64 / (*n).max(1) as f64),
            ""
        );
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
