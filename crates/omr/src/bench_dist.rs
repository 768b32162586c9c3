//! `omr bench dist`: the gradient exchange of a data-parallel step (`omr_train::dist::bench`),
//! W ranks on loopback against the same sums in memory, measured in the same run.

use candle_core::DType;
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
    /// The gradients' dtype: f32 (sums of several micro-batches) or bf16 (one micro-batch of
    /// a bf16 run: copied out at half the bytes, widened on the host).
    #[arg(long, default_value = "f32")]
    pub grad_dtype: String,
    /// Millions of values per bucket (training's: 64 Mi = 67.1); smaller makes several
    /// buckets, whose exchanges overlap their neighbours' copies.
    #[arg(long)]
    pub bucket_mfloats: Option<f64>,
    /// Sum over loopback TCP instead of shared memory (what ranks on different nodes use).
    #[arg(long)]
    pub tcp: bool,
}

pub fn run(a: BenchDistArgs) -> crate::Result<()> {
    let dtype = match a.grad_dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        o => {
            return Err(crate::exit::Exit::usage(anyhow::anyhow!(
                "--grad-dtype {o}: f32 or bf16"
            )))
        }
    };
    let report = bench(&DistBench {
        dtype,
        shm: !a.tcp,
        bucket: a
            .bucket_mfloats
            .map_or(omr_train::dist::BUCKET_FLOATS, |m| {
                (m * 1e6).round() as usize
            }),
        world: a.world,
        floats: (a.mfloats * 1e6).round() as usize,
        tensor: a.tensor,
        steps: a.steps,
    })
    .map_err(crate::sft_cmd::train_error)?;
    print!("{}", report.format());
    Ok(())
}
