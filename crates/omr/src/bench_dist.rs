//! `omr bench dist`: the gradient exchange of a data-parallel step (`omr_train::dist::bench`),
//! W ranks on loopback against the same sums in memory, measured in the same run.

use clap::Args;
use omr_train::dist::bench::{run as bench, DistBench};

#[derive(Args)]
pub struct BenchDistArgs {
    /// Ranks (processes of a data-parallel run; threads with their own sockets here).
    #[arg(long, default_value_t = 4)]
    pub world: usize,
    /// Millions of f32 gradient values per rank (40: a LoRA rank 16 on every linear of the
    /// 7B decoder).
    #[arg(long, default_value_t = 40.0)]
    pub mfloats: f64,
    /// Values per tensor (1.44 M: that adapter's tensors of one layer).
    #[arg(long, default_value_t = 1_441_792)]
    pub tensor: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
}

pub fn run(a: BenchDistArgs) -> crate::Result<()> {
    let report = bench(&DistBench {
        world: a.world,
        floats: (a.mfloats * 1e6).round() as usize,
        tensor: a.tensor,
        steps: a.steps,
    })
    .map_err(crate::sft_cmd::train_error)?;
    print!("{}", report.format());
    Ok(())
}
