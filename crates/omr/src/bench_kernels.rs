//! `omr bench kernels`: times every fused op of omr-kernels on the first CUDA device (when
//! built with `--features cuda` and one is present; bf16) or on the CPU (f32, small sizes: a
//! smoke test), and prints each kernel's achieved TB/s or TFLOP/s next to its floor.

use clap::Args;

#[derive(Args)]
pub struct BenchKernelsArgs {
    /// Run on the CPU even when a CUDA device is present.
    #[arg(long)]
    pub cpu: bool,
}

pub fn run(a: BenchKernelsArgs) -> crate::Result<()> {
    let dev = if a.cpu {
        candle_core::Device::Cpu
    } else {
        candle_core::Device::cuda_if_available(0).map_err(anyhow::Error::from)?
    };
    let (ceilings, rows) = omr_kernels::bench::run_all(&dev).map_err(anyhow::Error::from)?;
    print!("{}", omr_kernels::bench::format(&dev, &ceilings, &rows));
    Ok(())
}
