//! What `omr bench train` reads of memory: the process's resident set and the device memory
//! in use over the timed steps.

use candle_core::Device;

/// (VmRSS, VmHWM) of this process in MiB.
pub(super) fn rss() -> (f64, f64) {
    let field = |k: &str| {
        omr_train::metrics::proc_kib("/proc/self/status", k).map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The high-water mark of device memory in use (total − free, MiB) over the timed steps. While
/// the memory pool keeps what it allocated (`omr_kernels::prepare_device`, the default), what
/// the process holds never shrinks during the steps, so the reading after them is the peak
/// (candle frees into the driver's stream-ordered pool: this counts what the pool holds). With
/// `OMR_CUDA_POOL=release` the pool shrinks at synchronisations, and a thread polls every
/// 0.2 ms instead (each poll is a driver call beside the step's own). None on the CPU.
/// Reads device memory in use (MiB).
type MemReader = Box<dyn Fn() -> Option<f64> + Send>;

pub(crate) struct GpuMemPoller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Option<(f64, f64)>>>,
    /// Without polling: the reader and the reading at the start.
    ends: Option<(MemReader, Option<f64>)>,
}

impl GpuMemPoller {
    pub(crate) fn start(device: &Device) -> GpuMemPoller {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let Some(read) = gpu_mem_reader(device) else {
            return GpuMemPoller {
                stop,
                handle: None,
                ends: None,
            };
        };
        if std::env::var("OMR_CUDA_POOL").as_deref() != Ok("release") {
            let first = read();
            return GpuMemPoller {
                stop,
                handle: None,
                ends: Some((read, first)),
            };
        }
        let handle = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let first = read()?;
                let mut peak = first;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(u) = read() {
                        peak = peak.max(u);
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Some((first, peak))
            })
        };
        GpuMemPoller {
            stop,
            handle: Some(handle),
            ends: None,
        }
    }
    /// (in use when started, peak) in MiB.
    pub(crate) fn finish(mut self) -> Option<(f64, f64)> {
        if let Some((read, first)) = self.ends.take() {
            let first = first?;
            return Some((first, read()?.max(first)));
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.take()?.join().ok()?
    }
}

#[cfg(feature = "cuda")]
fn gpu_mem_reader(device: &Device) -> Option<MemReader> {
    let ctx = device
        .as_cuda_device()
        .ok()?
        .cuda_stream()
        .context()
        .clone();
    Some(Box::new(move || {
        let (free, total) = ctx.mem_get_info().ok()?;
        Some((total - free) as f64 / 1048576.0)
    }))
}

#[cfg(not(feature = "cuda"))]
fn gpu_mem_reader(_device: &Device) -> Option<MemReader> {
    None
}
