//! `[runtime]`: where and how a run computes. Device, precision and kernels, each `auto` by
//! default: on a CUDA build with a GPU, the first GPU, bf16 compute on fp32 masters, and the
//! fused kernels (forward, backward and the optimizer); elsewhere the CPU in fp32 with candle
//! ops (the fastest there, and the reference the fused path is tested against).
//!
//! Mixed precision (`precision = "bf16"`): trainable parameters stay fp32 masters, which the
//! optimizer updates together with its fp32 moments; the modules compute with bf16 casts of
//! them (rebuilt after every optimizer step); frozen parameters are stored in bf16. Norms,
//! softmax, the loss and gradient accumulation stay in fp32 (the kernels accumulate in fp32;
//! candle's softmax and RMSNorm paths upcast), and gradients reach the masters in fp32.

use crate::{Result, TrainError};
use candle_core::{DType, Device};
use omr_model::{Kernels, Params};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The first CUDA GPU when this build has CUDA support and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The first CUDA GPU, or an error.
    Cuda,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on CUDA, fp32 on the CPU.
    #[default]
    Auto,
    Fp32,
    /// bf16 compute, fp32 masters and optimizer state.
    Bf16,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelChoice {
    /// Fused on CUDA, candle ops on the CPU.
    #[default]
    Auto,
    Candle,
    Fused,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryCheck {
    /// Refuse on a GPU, warn on the CPU (where the plan is a rough guide to RAM).
    #[default]
    Auto,
    /// Stop at start-up (exit 2) when the plan's peak exceeds the device's usable memory.
    Refuse,
    /// Log the same finding and train anyway.
    Warn,
    /// No check.
    Off,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// "auto" | "cpu" | "cuda"
    pub device: DeviceChoice,
    /// "auto" | "fp32" | "bf16"
    pub precision: Precision,
    /// "auto" | "candle" | "fused": the ops of forward and backward, and of the optimizer
    /// (fused AdamW + global grad norm).
    pub kernels: KernelChoice,
    /// "auto" | "refuse" | "warn" | "off": at start-up, before the model is built, the run's
    /// step is planned (`omr plan`'s prediction) against the device's memory; a config that
    /// does not fit stops with exit 2 and what each change would give.
    pub memory_check: MemoryCheck,
    /// The memory this run may use ("70GiB", "141GB"), when less than the device's: a GPU
    /// shared with other work, or a MIG slice. Default: the GPU's total (the CPU: the RAM the
    /// OS reports available). Start-up planning (`memory_check`, `kept_decoder_layers =
    /// "auto"`) plans for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
}

/// The command-line words of the `[runtime]` keys (`--device`, `--precision`, `--kernels`),
/// the same as in TOML; the error names the flag's choices.
macro_rules! from_words {
    ($t:ty, $flag:literal, $($word:literal => $v:expr),+) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($word => Ok($v),)+
                    other => Err(format!(
                        concat!($flag, " {}: ", from_words!(@list $($word),+)),
                        other
                    )),
                }
            }
        }
    };
    (@list $first:literal $(, $rest:literal)*) => { concat!($first $(, ", ", $rest)*) };
}
from_words!(DeviceChoice, "--device", "auto" => DeviceChoice::Auto, "cpu" => DeviceChoice::Cpu, "cuda" => DeviceChoice::Cuda);
from_words!(Precision, "--precision", "auto" => Precision::Auto, "fp32" => Precision::Fp32, "bf16" => Precision::Bf16);
from_words!(KernelChoice, "--kernels", "auto" => KernelChoice::Auto, "candle" => KernelChoice::Candle, "fused" => KernelChoice::Fused);

/// A resolved `[runtime]`.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub device: Device,
    /// What modules compute in (masters stay fp32).
    pub compute: DType,
    pub kernels: Kernels,
    /// Refuse, Warn or Off (`Auto` resolved by the device).
    pub memory_check: MemoryCheck,
    /// `[runtime] memory_limit` in bytes.
    pub memory_limit: Option<u64>,
}

impl RuntimeConfig {
    pub fn resolve(&self) -> Result<Runtime> {
        self.resolve_on(0)
    }

    /// [`RuntimeConfig::resolve`] with GPU `ordinal` for `cuda` and `auto` (a data-parallel
    /// process's local rank).
    pub fn resolve_on(&self, ordinal: usize) -> Result<Runtime> {
        let device = match self.device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda => Device::new_cuda(ordinal).map_err(|e| {
                TrainError::Usage(format!(
                    "[runtime] device = \"cuda\" (GPU {ordinal}): {e} (a build with `--features cuda` on a machine \
                     with an NVIDIA GPU is needed; use device = \"cpu\" or \"auto\" elsewhere)"
                ))
            })?,
            DeviceChoice::Auto => {
                if candle_core::utils::cuda_is_available() {
                    match Device::new_cuda(ordinal) {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::warn!("[runtime] device = \"auto\": no usable GPU ({e}), training on the CPU");
                            Device::Cpu
                        }
                    }
                } else {
                    Device::Cpu
                }
            }
        };
        omr_kernels::prepare_device(&device)?;
        let compute = match self.precision {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Auto if device.is_cuda() => DType::BF16,
            Precision::Auto => DType::F32,
        };
        let kernels = match self.kernels {
            KernelChoice::Auto => Kernels::auto(&device),
            KernelChoice::Candle => Kernels::Candle,
            KernelChoice::Fused => Kernels::Fused,
        };
        let memory_limit = match &self.memory_limit {
            None => None,
            Some(text) => Some(
                crate::plan::parse_bytes(text)
                    .map_err(|e| TrainError::Usage(format!("[runtime] memory_limit: {e}")))?,
            ),
        };
        let memory_check = match self.memory_check {
            MemoryCheck::Auto if device.is_cuda() => MemoryCheck::Refuse,
            MemoryCheck::Auto => MemoryCheck::Warn,
            other => other,
        };
        Ok(Runtime {
            device,
            compute,
            kernels,
            memory_check,
            memory_limit,
        })
    }
}

impl Runtime {
    /// The CPU in fp32 with candle ops.
    pub fn cpu() -> Runtime {
        Runtime {
            device: Device::Cpu,
            compute: DType::F32,
            kernels: Kernels::Candle,
            memory_check: MemoryCheck::Warn,
            memory_limit: None,
        }
    }

    /// Applies the precision to freshly built parameters (after freezing): see the module doc.
    pub fn prepare(&self, params: &mut Params) -> Result<()> {
        params.set_compute_dtype(self.compute)?;
        Ok(())
    }

    /// Memory of the run's device in bytes, for planning at start-up: the GPU's total, or the
    /// RAM the OS reports available (`MemAvailable`) for the CPU; `[runtime] memory_limit`
    /// when set (at most the device's own, when that is known). None when unknown.
    pub fn device_memory(&self) -> Option<u64> {
        let own = self.own_device_memory();
        match (self.memory_limit, own) {
            (Some(limit), Some(own)) => Some(limit.min(own)),
            (limit, own) => limit.or(own),
        }
    }

    fn own_device_memory(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Ok(d) = self.device.as_cuda_device() {
            return d
                .cuda_stream()
                .context()
                .mem_get_info()
                .ok()
                .map(|(_, total)| total as u64);
        }
        crate::metrics::proc_kib("/proc/meminfo", "MemAvailable:").map(|kib| kib as u64 * 1024)
    }

    /// Whether the optimizer uses the fused update and norm.
    pub fn fused_optimizer(&self) -> bool {
        self.kernels == Kernels::Fused
    }

    /// "cuda:0 bf16 fused", for the log.
    pub fn describe(&self) -> String {
        format!(
            "{} {} {}",
            match self.device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                _ => "cpu".to_string(),
            },
            match self.compute {
                DType::BF16 => "bf16 (fp32 masters)",
                DType::F16 => "f16",
                _ => "fp32",
            },
            match self.kernels {
                Kernels::Candle => "candle ops",
                Kernels::Fused => "fused kernels",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_cpu_in_fp32_with_candle_ops_without_a_gpu() {
        let rt = RuntimeConfig::default().resolve().unwrap();
        if !rt.device.is_cuda() {
            assert_eq!((rt.compute, rt.kernels), (DType::F32, Kernels::Candle));
            assert!(!rt.fused_optimizer());
            assert_eq!(rt.describe(), "cpu fp32 candle ops");
        }
        let bf16 = RuntimeConfig {
            device: DeviceChoice::Cpu,
            precision: Precision::Bf16,
            kernels: KernelChoice::Fused,
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!((bf16.compute, bf16.kernels), (DType::BF16, Kernels::Fused));
        assert!(bf16.fused_optimizer());
    }

    #[test]
    fn cuda_without_a_gpu_is_a_usage_error_naming_the_key() {
        if candle_core::utils::cuda_is_available() {
            return; // a CUDA build: a GPU may be present
        }
        let err = RuntimeConfig {
            device: DeviceChoice::Cuda,
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(err, TrainError::Usage(_)), "{err}");
        assert!(err.to_string().contains("[runtime] device"), "{err}");
    }

    #[test]
    fn memory_limit_and_check_resolve() {
        let c: RuntimeConfig =
            toml::from_str("device = \"cpu\"\nmemory_check = \"refuse\"\nmemory_limit = \"3GiB\"")
                .unwrap();
        let rt = c.resolve().unwrap();
        assert_eq!(rt.memory_check, MemoryCheck::Refuse);
        assert_eq!(rt.memory_limit, Some(3 << 30));
        // At most the limit (the RAM available, when less).
        assert!(rt.device_memory().is_some_and(|b| b <= 3 << 30));
        // "auto" warns on the CPU; a GPU refuses.
        let auto = RuntimeConfig {
            device: DeviceChoice::Cpu,
            ..Default::default()
        };
        assert_eq!(auto.resolve().unwrap().memory_check, MemoryCheck::Warn);
        let bad = RuntimeConfig {
            device: DeviceChoice::Cpu,
            memory_limit: Some("lots".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(matches!(bad, TrainError::Usage(_)), "{bad}");
        assert!(bad.to_string().contains("[runtime] memory_limit"), "{bad}");
        assert!(toml::from_str::<RuntimeConfig>("memory_check = \"maybe\"").is_err());
    }

    #[test]
    fn the_section_parses_and_rejects_unknown_values() {
        let c: RuntimeConfig =
            toml::from_str("device = \"cpu\"\nprecision = \"bf16\"\nkernels = \"fused\"").unwrap();
        assert_eq!(c.precision, Precision::Bf16);
        assert!(toml::from_str::<RuntimeConfig>("precision = \"fp8\"").is_err());
        assert!(toml::from_str::<RuntimeConfig>("dtype = \"bf16\"").is_err());
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!(
            "fp8".parse::<Precision>(),
            Err("--precision fp8: auto, fp32, bf16".to_string())
        );
    }
}
