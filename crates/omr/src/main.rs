//! `omr`: the command-line front of the trainer. Thin by design (STYLE.md): parse, build the
//! library objects, call them, map failures to the exit codes of RELIABILITY.md.

mod batches;
mod bench_common;
mod bench_data;
mod bench_dist;
mod bench_generate;
mod bench_kernels;
mod bench_train;
mod data;
mod demo;
mod eval_cmd;
mod exit;
mod grpo_cmd;
mod model_cmd;
mod plan_cmd;
mod plot;
mod sft_cmd;
mod tensors;

use clap::{Parser, Subcommand};

/// Image buffers of a few MB are allocated and freed per sample on every worker; mimalloc keeps
/// them in reused segments instead of a fresh zeroed mmap each time (measured: page faults were
/// half of the single-core preprocessing profile with the system allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use exit::Exit;

#[derive(Parser)]
#[command(
    name = "omr",
    version,
    about = "Fine-tune and evaluate medical vision-language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Data tools: synthesise, validate, render, preprocess.
    #[command(subcommand)]
    Data(data::DataCmd),
    /// Benchmarks that print ratios against a reference measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The end-to-end demo on synthetic data (the README's first command).
    Demo(demo::DemoArgs),
    /// Model tools: forward (parity with transformers), init (tiny), export.
    #[command(subcommand)]
    Model(model_cmd::ModelCmd),
    /// Generate a reply to a prompt (and an image) with a model folder.
    Generate(model_cmd::GenerateArgs),
    /// Supervised fine-tuning: omr sft --config configs/sft/tiny.toml [--set k=v]
    Sft(sft_cmd::SftArgs),
    /// GRPO reinforcement learning: omr grpo --config configs/grpo/tiny.toml [--set k=v]
    Grpo(grpo_cmd::GrpoArgs),
    /// Export a checkpoint (SFT or GRPO) as a Hugging Face folder with a model card.
    Export(sft_cmd::ExportArgs),
    /// OpenMedReason-Bench: answer accuracy, PKR trace score with a judge, pairwise preference.
    Eval(eval_cmd::EvalArgs),
    /// Peak GPU memory of a training config, predicted; exit 2 when it does not fit.
    Plan(plan_cmd::PlanArgs),
    /// Charts of a run's metrics.jsonl (loss, learning rate, eval metrics) as PNG and/or SVG.
    Plot(plot::PlotArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Decode + preprocess + tokenize throughput, against transformers' image processor.
    Data(bench_data::BenchDataArgs),
    /// Fused-kernel throughput (omr-kernels): achieved TB/s or TFLOP/s next to each floor.
    Kernels(bench_kernels::BenchKernelsArgs),
    /// Training-step throughput, FLOPs, MFU, phases and memory, against torch + transformers.
    Train(bench_train::BenchTrainArgs),
    /// GRPO's rollout engine: prefill, decoding ms/step, tokens/s, memory next to the plan.
    Generate(bench_generate::BenchGenerateArgs),
    /// Data parallelism's gradient exchange: ms per step and GB/s, against sums in memory.
    Dist(bench_dist::BenchDistArgs),
}

fn main() {
    // The other ranks of a data-parallel job say only what goes wrong: rank 0 reports the run.
    let level = match omr_data::loader::Rank::from_env().rank {
        0 => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OMR_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},openjp2=warn,jpeg2k=warn"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Data(c) => data::run(c),
        Cmd::Bench(BenchCmd::Data(a)) => bench_data::run(a),
        Cmd::Bench(BenchCmd::Kernels(a)) => bench_kernels::run(a),
        Cmd::Bench(BenchCmd::Train(a)) => bench_train::run(a),
        Cmd::Bench(BenchCmd::Generate(a)) => bench_generate::run(a),
        Cmd::Bench(BenchCmd::Dist(a)) => bench_dist::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Model(c) => model_cmd::run(c),
        Cmd::Generate(a) => model_cmd::generate_cmd(a),
        Cmd::Sft(a) => sft_cmd::run(a),
        Cmd::Grpo(a) => grpo_cmd::run(a),
        Cmd::Export(a) => sft_cmd::export(a),
        Cmd::Eval(a) => eval_cmd::run(a),
        Cmd::Plan(a) => plan_cmd::run(a),
        Cmd::Plot(a) => plot::run(a),
    };
    match result {
        Ok(()) => {}
        Err(e) => {
            let code = e.code();
            eprintln!("error: {e:#}");
            std::process::exit(code);
        }
    }
}

pub type Result<T> = std::result::Result<T, Exit>;
