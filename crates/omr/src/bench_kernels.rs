//! `omr bench kernels`: on the first CUDA device (built with `--features cuda`), first every
//! fused op of omr-kernels against its CPU reference (values and gradients, f32 and bf16), then
//! the whole model's loss and gradients and the optimizer's step against the CPU
//! (`omr_train::device_check`), then each kernel's achieved TB/s or TFLOP/s next to its floor; on the CPU (or `--cpu`) the
//! timings only, at small sizes (a smoke test). Exits 1 when a CUDA-vs-CPU check fails, after
//! printing both tables, so one binary copied to a GPU machine checks and times in one call.

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct BenchKernelsArgs {
    /// Run on the CPU even when a CUDA device is present.
    #[arg(long)]
    pub cpu: bool,
    /// Skip the CUDA-vs-CPU correctness checks.
    #[arg(long)]
    pub no_check: bool,
}

pub fn run(a: BenchKernelsArgs) -> crate::Result<()> {
    let dev = if a.cpu {
        candle_core::Device::Cpu
    } else {
        candle_core::Device::cuda_if_available(0).context("opening CUDA device 0")?
    };
    omr_kernels::prepare_device(&dev).context("setting up the CUDA memory pool")?;
    let checks = if a.no_check {
        Vec::new()
    } else {
        omr_kernels::check::check_all(&dev).context("CUDA-vs-CPU checks")?
    };
    if !checks.is_empty() {
        println!("{}", omr_kernels::check::format(&checks));
    }
    let models = if a.no_check || !dev.is_cuda() {
        Vec::new()
    } else {
        omr_train::device_check::model_checks(&dev).context("model checks")?
    };
    if !models.is_empty() {
        println!("{}", omr_train::device_check::format(&models));
    }
    let (ceilings, rows) = omr_kernels::bench::run_all(&dev).context("kernel benchmark")?;
    print!("{}", omr_kernels::bench::format(&dev, &ceilings, &rows));
    let failed =
        checks.iter().filter(|c| !c.ok()).count() + models.iter().filter(|c| !c.ok()).count();
    if failed > 0 {
        return Err(anyhow::anyhow!(
            "{failed} of {} CUDA-vs-CPU checks failed",
            checks.len() + models.len()
        )
        .into());
    }
    Ok(())
}
