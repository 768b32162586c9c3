//! CUDA plumbing shared by the ops (only with the `cuda` feature): the PTX of each
//! `kernels/<op>.cu` embedded at build time (build.rs), module loading through candle's
//! custom-module cache, typed views of tensor storages, output allocation and launches.
//!
//! Kernels are `extern "C"` entry points named `<op>_<dtype>` (dtype suffix `f32` | `bf16`);
//! every pointer argument is a contiguous buffer, sizes are `int` (element counts fit in 2^31
//! for every tensor of a 7B model) and launches go on candle's stream for the device, so the
//! ops order correctly with candle's own kernels without extra synchronisation.

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchArgs};
use candle_core::cuda::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

pub(crate) use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};

macro_rules! ptx {
    ($name:literal) => {
        include_str!(concat!(env!("OUT_DIR"), "/", $name, ".ptx"))
    };
}

/// The PTX of `kernels/<module>.cu`.
fn ptx_of(module: &str) -> Result<&'static str> {
    Ok(match module {
        "rmsnorm" => ptx!("rmsnorm"),
        "swiglu" => ptx!("swiglu"),
        "grad_norm" => ptx!("grad_norm"),
        "adamw" => ptx!("adamw"),
        "grad_accum" => ptx!("grad_accum"),
        "rotary" => ptx!("rotary"),
        "linear_ce" => ptx!("linear_ce"),
        "sample" => ptx!("sample"),
        "flash_attn" => ptx!("flash_attn"),
        "attn_softmax" => ptx!("attn_softmax"),
        "flash_mma" => ptx!("flash_mma"),
        "flash_wgmma_sm90a" => ptx!("flash_wgmma_sm90a"),
        "wgmma_probe_sm90a" => ptx!("wgmma_probe_sm90a"),
        other => bail!("omr-kernels: no PTX module `{other}`"),
    })
}

/// A scalar argument of a kernel launch.
pub(crate) enum Scalar {
    I32(i32),
    F32(f32),
}

/// Launches entry `{name}_{dtype of x}` of `module` with its arguments in the order the
/// row-wise kernels take them (`linear_ce.cu`, `sample.cu`): `x`, the `side` inputs, a new
/// output of `out_len` elements of `out_dtype`, then `scalars`. Returns the output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_rowwise(
    x: &CudaStorage,
    x_layout: &Layout,
    side: &[In<'_>],
    module: &str,
    name: &str,
    (out_dtype, out_len): (DType, usize),
    scalars: &[Scalar],
    cfg: LaunchConfig,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let f = kernel(&dev, module, &format!("{name}_{}", suffix(x.dtype())?))?;
    let input = In::new(x, x_layout)?;
    let mut out = Out::alloc(&dev, out_dtype, out_len)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    input.push(&mut b);
    for t in side {
        t.push(&mut b);
    }
    out.push(&mut b);
    for v in scalars {
        match v {
            Scalar::I32(v) => b.arg(v),
            Scalar::F32(v) => b.arg(v),
        };
    }
    run(b, cfg)?;
    Ok(out.into_storage(&dev))
}

/// Function `name` of module `module`, loaded once per device (candle caches the module).
pub(crate) fn kernel(dev: &CudaDevice, module: &str, name: &str) -> Result<CudaFunction> {
    let m = format!("omr_{module}");
    Ok(dev
        .get_or_load_custom_func(name, &m, ptx_of(module)?)?
        .into_cuda_function())
}

/// `f32` | `bf16`, the suffix of a kernel's entry point.
pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => bail!("omr-kernels (cuda): dtype {other:?} is not supported"),
    })
}

/// A contiguous read-only device buffer of one of the supported dtypes.
pub(crate) enum In<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
    U32(CudaView<'a, u32>),
}

impl<'a> In<'a> {
    /// The elements of `s` seen through `l`, which must be contiguous.
    pub(crate) fn new(s: &'a CudaStorage, l: &Layout) -> Result<In<'a>> {
        let Some((a, b)) = l.contiguous_offsets() else {
            bail!("omr-kernels (cuda): inputs must be contiguous")
        };
        Self::span(s, a, b)
    }

    /// Elements `a..b` of `s` (a kernel that takes strides reads a strided layout's span).
    pub(crate) fn span(s: &'a CudaStorage, a: usize, b: usize) -> Result<In<'a>> {
        Ok(match &s.slice {
            CudaStorageSlice::F32(v) => In::F32(v.slice(a..b)),
            CudaStorageSlice::BF16(v) => In::Bf16(v.slice(a..b)),
            CudaStorageSlice::U32(v) => In::U32(v.slice(a..b)),
            _ => bail!("omr-kernels (cuda): dtype {:?} not supported", s.dtype()),
        })
    }

    pub(crate) fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
        match self {
            In::F32(v) => b.arg(v),
            In::Bf16(v) => b.arg(v),
            In::U32(v) => b.arg(v),
        };
    }
}

/// The device views of storage guards (`t.storage_and_layout()` of each input), in order.
pub(crate) fn views<'a, G: std::ops::Deref<Target = Storage>>(
    guards: &'a [(G, &Layout)],
) -> Result<Vec<In<'a>>> {
    guards
        .iter()
        .map(|(s, l)| In::new(storage(s)?, l))
        .collect()
}

/// A freshly allocated device output (uninitialised: the kernel writes every element).
pub(crate) enum Out {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl Out {
    pub(crate) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<Out> {
        // SAFETY: every kernel writing an `Out` writes all of its elements.
        Ok(match dtype {
            DType::F32 => Out::F32(unsafe { dev.alloc::<f32>(n)? }),
            DType::BF16 => Out::Bf16(unsafe { dev.alloc::<bf16>(n)? }),
            other => bail!("omr-kernels (cuda): dtype {other:?} not supported"),
        })
    }

    pub(crate) fn push<'b>(&'b mut self, b: &mut LaunchArgs<'b>) {
        match self {
            Out::F32(v) => b.arg(v),
            Out::Bf16(v) => b.arg(v),
        };
    }

    pub(crate) fn into_storage(self, dev: &CudaDevice) -> CudaStorage {
        match self {
            Out::F32(v) => CudaStorage::wrap_cuda_slice(v, dev.clone()),
            Out::Bf16(v) => CudaStorage::wrap_cuda_slice(v, dev.clone()),
        }
    }

    /// A tensor without a graph (the result of a backward kernel, or a saved statistic).
    pub(crate) fn into_tensor(self, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_storage(
            Storage::Cuda(self.into_storage(dev)),
            shape,
            BackpropOp::none(),
            false,
        )
    }
}

/// The CUDA storage of a tensor's storage guard (an error for any other device).
pub(crate) fn storage(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("omr-kernels (cuda): tensor is not on a CUDA device"),
    }
}

/// The CUDA device of a tensor.
pub(crate) fn device_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("omr-kernels (cuda): tensor is not on a CUDA device"),
    }
}

/// Launches the arguments collected in `b` (from `dev.cuda_stream().launch_builder(&f)`).
pub(crate) fn run(mut b: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: the argument lists match the kernels' signatures in kernels/*.cu (each op checks
    // shapes and dtypes before launching), and every buffer outlives the launch on this stream.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Allows `f` up to `bytes` of dynamic shared memory per block (beyond the default 48 KB).
/// The driver call is made once per function and size (it cost ≈ 1 ms of host time per call
/// in run 7's profile): later calls with a size already allowed return at once.
pub(crate) fn allow_dynamic_smem(f: &CudaFunction, bytes: u32) -> Result<()> {
    use candle_core::cuda::cudarc::driver::sys::CUfunction_attribute;
    static ALLOWED: std::sync::Mutex<Vec<(usize, u32)>> = std::sync::Mutex::new(Vec::new());
    let key = f.cu_function() as usize;
    let mut allowed = ALLOWED.lock().unwrap_or_else(|e| e.into_inner());
    if allowed.iter().any(|&(k, b)| k == key && b >= bytes) {
        return Ok(());
    }
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()?;
    allowed.retain(|&(k, _)| k != key);
    allowed.push((key, bytes));
    Ok(())
}

/// How many blocks of `threads` threads and `smem` bytes of dynamic shared memory `f` keeps
/// resident on the whole device at once (multiprocessors × blocks per multiprocessor), asked
/// of the driver once per function and shape.
pub(crate) fn resident_blocks(
    dev: &CudaDevice,
    f: &CudaFunction,
    threads: u32,
    smem: usize,
) -> Result<usize> {
    use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute;
    type Key = (usize, u32, usize);
    static KNOWN: std::sync::Mutex<Vec<(Key, usize)>> = std::sync::Mutex::new(Vec::new());
    let key = (f.cu_function() as usize, threads, smem);
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, n)) = known.iter().find(|(k, _)| *k == key) {
        return Ok(n);
    }
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
        .w()? as usize;
    known.push((key, sms * per_sm));
    Ok(sms * per_sm)
}

/// A 1-D launch of `blocks` blocks of `threads` threads with `smem` bytes of dynamic shared memory.
pub(crate) fn cfg(blocks: usize, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Blocks of 256 threads for `n` elements of `dtype` walked in 16-byte accesses, two per thread
/// (swiglu.cu, grad_accum.cu's grad_scale, linear_ce.cu's gradients along a row): one step of
/// the kernels' grid-stride loops covers everything up to 2^20 blocks (measured on an H200 with
/// SwiGLU: 4.3 TB/s, against 3.9 with the grid capped at 16 blocks per multiprocessor and ~18
/// steps per thread).
pub(crate) fn vec16_blocks(n: usize, dtype: DType) -> usize {
    n.div_ceil(256 * 2 * (16 / dtype.size_in_bytes()))
        .clamp(1, 1 << 20)
}

/// The launch of `linear_ce.cu`'s tile statistics over `rows` rows: one block of 256 threads
/// per row (the kernel's grid-stride loop takes rows past 65 535).
pub(crate) fn tile_stats_cfg(rows: usize) -> LaunchConfig {
    cfg(rows.min(65_535), 256, 0)
}

/// The launch of `linear_ce.cu`'s tile gradients over a (rows, vc) tile of `dtype`: blocks of
/// 256 threads, x across a row's 16-byte accesses (two per thread), y down the rows (the
/// kernel's loops take what the grid does not cover).
pub(crate) fn tile_grad_cfg(rows: usize, vc: usize, dtype: DType) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            vec16_blocks(vc, dtype) as u32,
            rows.clamp(1, 65_535) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Makes the device's default memory pool keep what it has allocated. candle allocates every
/// output through `cuMemAllocAsync` on that pool, whose release threshold is 0 by default: at
/// each synchronisation (a loss read back, a norm for clipping) the pool hands its free memory
/// back to the driver, and the next allocations map it again, page by page. A training step
/// allocates and frees tens of GB, so this churn is paid every step. With the threshold at
/// u64::MAX the pool behaves like PyTorch's caching allocator: freed blocks are reused.
pub(crate) fn keep_pool_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    // SAFETY: a plain driver call on a live pool; `value` outlives the call.
    unsafe {
        let mut value: u64 = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut value as *mut u64 as *mut std::ffi::c_void,
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuMemPoolSetAttribute(RELEASE_THRESHOLD): {r:?}")
        }
    }
    Ok(())
}

/// Turns off cudarc's per-buffer event tracking when the device works on one stream, as
/// candle's `Device::new_cuda` does (its per-thread default stream). cudarc creates a read
/// and a write event for every buffer it allocates and destroys both when the buffer is
/// freed, but records or waits on them only once a context has several streams: on one
/// stream they are four driver calls per allocation for nothing (≈ 1.6 µs of host time; a
/// 3B training step allocates ≈ 14 000 buffers, run 7 profile: 82 532 cuEventCreate and as
/// many cuEventDestroy over 3 steps). A context that has or later gets a second stream keeps
/// tracking.
pub(crate) fn single_stream(dev: &CudaDevice) {
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.is_in_multi_stream_mode() {
        // SAFETY: cudarc's contract for turning tracking off is that the user synchronises
        // streams by hand; with a single stream every use is already ordered by the stream.
        // Buffers allocated before this call keep their events, which is harmless.
        unsafe { ctx.disable_event_tracking() };
    }
}

/// The device's default memory pool (the one candle's `cuMemAllocAsync` allocates from).
fn default_pool(dev: &CudaDevice) -> Result<candle_core::cuda::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver call on a live context's device.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("cuDeviceGetDefaultMemPool: {r:?}")
    }
    Ok(pool)
}

/// Releases every free block of the default pool to the driver.
pub(crate) fn trim_pool(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    // SAFETY: a plain driver call on a live pool.
    let r = unsafe { sys::cuMemPoolTrimTo(pool, 0) };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("cuMemPoolTrimTo: {r:?}")
    }
    Ok(())
}
