//! Build script: with the `cuda` feature, compiles every `kernels/*.cu` of the workspace to PTX
//! (`$OUT_DIR/<name>.ptx`, embedded by `src/cuda.rs` with `include_str!`); without it, does
//! nothing, so the default build needs no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH (scripts/cuda/env.sh
//! exports all three). The target is `sm_$CUDA_COMPUTE_CAP` (default 90: H100/H200; files named
//! `*_sm90a.cu` always `sm_90a`), the same
//! flags as scripts/cuda/compile-ptx.sh, and any nvcc warning fails the build.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let kernels = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC")
        .ok()
        .unwrap_or_else(|| match std::env::var("CUDA_HOME") {
            Ok(home) => format!("{home}/bin/nvcc"),
            Err(_) => "nvcc".into(),
        });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    // The host refuses a GPU older than this with a clear error (`prepare_device`).
    println!("cargo:rustc-env=OMR_CUDA_CAP={cap}");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .expect("kernels/ is readable")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src
            .file_stem()
            .expect("a file name")
            .to_string_lossy()
            .to_string();
        let ptx = out.join(format!("{stem}.ptx"));
        // `*_sm90a.cu` uses Hopper's arch-specific instructions (wgmma): always sm_90a; the
        // host loads it only on a compute capability 9.0 device.
        let arch = if stem.ends_with("_sm90a") {
            "sm_90a".to_string()
        } else {
            format!("sm_{cap}")
        };
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-Werror", "all-warnings"])
            .arg(format!("-arch={arch}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("running {nvcc} (set NVCC or source scripts/cuda/env.sh): {e}")
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
