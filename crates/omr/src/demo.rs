//! `omr demo`: the README's first command. On a fresh machine it synthesises OpenMedReason-style
//! shards and a tiny processor, validates both splits through the full pipeline and shows one
//! encoded training sample. Training, evaluation and export join as their issues land.

use crate::data::{self, DataArgs, ModelArgs, RenderArgs, SynthArgs, ValidateArgs};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

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
}

pub fn run(a: DemoArgs) -> crate::Result<()> {
    let t0 = Instant::now();
    let data_dir = a.out.join("data");
    let processor = data::synth(&SynthArgs {
        out: data_dir.clone(),
        train: a.train,
        test: a.test,
        seed: a.seed,
        vocab_size: 2048,
    })?;
    let model = ModelArgs {
        model: processor,
        max_length: 2048,
        max_image_pixels: 64_000_000,
    };
    for split in ["train", "test"] {
        eprintln!("== validate {split}");
        data::validate(&ValidateArgs {
            data: data_args(&data_dir, split),
            config: None,
            model: model.clone(),
            quarantine: a.out.join(format!("quarantine-{split}.jsonl")),
            report: Some(a.out.join(format!("validate-{split}.json"))),
            max_bad: Some(0),
            max_bad_fraction: 0.0,
            threads: 0,
        })?;
    }
    eprintln!("== one encoded training sample");
    data::render(&RenderArgs {
        data: data_args(&data_dir, "train"),
        model,
        index: 0,
    })?;
    eprintln!(
        "demo finished in {:.1}s; everything is under {}",
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
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
