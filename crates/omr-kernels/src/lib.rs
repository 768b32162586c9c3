//! omr-kernels: the fused ops of the training path, each a candle custom op with a plain-Rust
//! CPU reference (`cpu_fwd`, f32 accumulation, f32 and bf16 inputs), a CUDA version launching
//! the PTX of `kernels/<op>.cu` (behind the `cuda` feature) and a backward.
//!
//! | op | file | kernel |
//! |---|---|---|
//! | RMSNorm (Qwen2RMSNorm) fwd + bwd | [`rmsnorm`] | `kernels/rmsnorm.cu` |
//! | SwiGLU `silu(g)·u` fwd + bwd | [`swiglu`] | `kernels/swiglu.cu` |
//! | global gradient L2 norm (many tensors, f64 sums) | [`grad_norm`] | `kernels/grad_norm.cu` |
//! | AdamW on fp32 masters + moments, writing the bf16 copy | [`adamw`] | `kernels/adamw.cu` |
//! | gradient accumulation over micro-batches (f32 sums, in place) | [`grad_accum`] | `kernels/grad_accum.cu` |
//! | rotary (M-RoPE and the vision 2-D rotary) fwd + bwd | [`rotary`] | `kernels/rotary.cu` |
//! | fused linear cross-entropy (chunked, never N×V) | [`linear_ce`] | `kernels/linear_ce.cu` |
//! | fused per-token log-probabilities and entropy (GRPO; chunked, never N×V) | [`linear_logp`] | `kernels/linear_ce.cu` |
//! | one token per row by the Gumbel-max trick (generation, on the device) | [`sample`] | `kernels/sample.cu` |
//! | attention fwd + bwd (causal, segments, window, GQA) | [`flash_attn`] (CUDA: [`flash_mma`] for bf16, else [`gemm_attn::gemm_attn`]) | `kernels/flash_attn.cu`, `kernels/attn_softmax.cu` |
//!
//! omr-model calls the forward-path ops (rmsnorm, swiglu, rotary, flash_attn, linear_ce) when
//! a forward's `Ctx::kernels` is `Kernels::Fused` (dispatch in `omr_model::fused`;
//! `Kernels::auto` picks Fused on CUDA); its `tests/fused.rs` checks the model's logits, loss
//! and gradients against its candle-op path. Every op is checked
//! against an independent composition of candle ops in `tests/` (and CUDA against CPU where a
//! CUDA device exists, also by [`check::check_all`]), and timed by [`bench::run_all`]
//! (`omr bench kernels` runs both).

pub mod adamw;
pub mod bench;
pub mod check;
pub mod flash_attn;
pub mod flash_mma;
mod flash_ref;
pub mod gemm_attn;
pub mod grad_accum;
pub mod grad_norm;
pub mod grad_sink;
pub mod linear_ce;
pub mod linear_logp;
pub mod mask;
pub mod rmsnorm;
pub mod rotary;
pub mod sample;
pub mod swiglu;

mod host;

#[cfg(feature = "cuda")]
mod cuda;

pub use adamw::{adamw_step, adamw_step_in_place, AdamWHyper, AdamWOut};
pub use grad_accum::{grad_add_in_place, grad_sum};

/// Sets a device up for training: on CUDA, the default memory pool keeps freed memory for
/// reuse instead of returning it to the driver at every synchronisation (see
/// `cuda::keep_pool_memory`; `OMR_CUDA_POOL=release` keeps the driver's default), and buffers
/// allocated from now on skip the cross-stream events nothing here uses (see
/// `cuda::single_stream`). A no-op on the CPU. Call once after opening the device.
pub fn prepare_device(device: &candle_core::Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute as A;
        let cc = |a| dev.cuda_stream().context().attribute(a).unwrap_or(0) as u32;
        let (major, minor) = (
            cc(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            cc(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        );
        if let Some(msg) = gpu_too_old(env!("OMR_CUDA_CAP"), major, minor) {
            candle_core::bail!("{msg}")
        }
        if std::env::var("OMR_CUDA_POOL").as_deref() != Ok("release") {
            cuda::keep_pool_memory(dev)?;
        }
        cuda::single_stream(dev);
    }
    let _ = device;
    Ok(())
}

/// Why a binary whose kernels were built for compute capability `built` (`CUDA_COMPUTE_CAP`,
/// e.g. "90") cannot run on a GPU of capability `major.minor`, or None when it can: PTX
/// compiled for one capability loads on that one and newer ones only.
pub fn gpu_too_old(built: &str, major: u32, minor: u32) -> Option<String> {
    let digits: String = built.chars().take_while(char::is_ascii_digit).collect();
    let want: u32 = digits.parse().ok()?;
    let have = major * 10 + minor;
    (have < want).then(|| {
        format!(
            "this omr's CUDA kernels were built for compute capability {}.{} (sm_{built}) and \
             the GPU is {major}.{minor} (sm_{have}): they cannot load there. Rebuild on the \
             build machine with CUDA_COMPUTE_CAP={have} (README, \"Building with CUDA\"), or run \
             on a GPU of capability {}.{} or newer.",
            want / 10,
            want % 10,
            want / 10,
            want % 10
        )
    })
}

/// Returns the memory pool's free blocks to the driver (after [`prepare_device`] they are
/// kept), e.g. before another process uses the GPU. Waits for the device. A no-op on the CPU.
pub fn release_device_memory(device: &candle_core::Device) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        device.synchronize()?;
        cuda::trim_pool(dev)?;
    }
    let _ = device;
    Ok(())
}
pub use flash_attn::{attention_forward, flash_attn, AttnMask, AttnSaved};
pub use grad_norm::global_grad_norm;
pub use linear_ce::linear_cross_entropy;
pub use linear_logp::{linear_logp, LogpScore};
pub use rmsnorm::rmsnorm;
pub use rotary::{mrope_tables, rotary, vision_tables};
pub use swiglu::swiglu;
