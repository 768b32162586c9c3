//! The GPU-capability check of `prepare_device`: a binary built for a newer GPU than the one
//! it runs on stops with an error that names both capabilities and the rebuild to do.

use omr_kernels::gpu_too_old;

#[test]
fn an_older_gpu_than_the_build_is_refused_with_the_rebuild_to_do() {
    let msg = gpu_too_old("90", 8, 0).expect("sm_90 PTX cannot load on an A100");
    assert!(msg.contains("9.0") && msg.contains("8.0"), "{msg}");
    assert!(msg.contains("CUDA_COMPUTE_CAP=80"), "{msg}");
    assert!(gpu_too_old("86", 8, 0).is_some());
    assert!(gpu_too_old("90", 8, 9).is_some());
}

#[test]
fn the_same_or_a_newer_gpu_runs() {
    assert_eq!(gpu_too_old("90", 9, 0), None);
    assert_eq!(gpu_too_old("80", 9, 0), None);
    assert_eq!(gpu_too_old("80", 8, 6), None);
    assert_eq!(gpu_too_old("90", 10, 0), None);
    assert_eq!(gpu_too_old("90", 12, 0), None);
    // An unparsable setting checks nothing (the driver's own error remains).
    assert_eq!(gpu_too_old("native", 8, 0), None);
}
