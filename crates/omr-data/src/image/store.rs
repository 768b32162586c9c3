//! Write-once stores into large output buffers that bypass the cache where possible.
//!
//! `pixel_values` is 24 bytes per resized pixel (tens of MB for a large image), written once and
//! not read again by this thread before it is batched. Ordinary stores first read every target
//! cache line (read-for-ownership) and then evict useful data; x86 non-temporal stores
//! (`movntps`, part of baseline SSE) write whole lines straight to memory instead. The values
//! stored are the same either way. Other targets, and unaligned slices, use plain stores.

use std::mem::MaybeUninit;

/// Copies `src` into `dst` (same length).
#[inline]
pub(crate) fn store(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "store needs equal lengths");
    #[cfg(target_arch = "x86_64")]
    if (dst.as_ptr() as usize).is_multiple_of(16) && src.len().is_multiple_of(4) {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        let (d, s) = (dst.as_mut_ptr().cast::<f32>(), src.as_ptr());
        for i in (0..src.len()).step_by(4) {
            // SAFETY: SSE is part of the x86_64 baseline; i + 4 <= len (len is a multiple of 4)
            // for both slices; `d + i` is 16-byte aligned (the start is, and i counts whole
            // 16-byte groups); the source load is unaligned.
            unsafe { _mm_stream_ps(d.add(i), _mm_loadu_ps(s.add(i))) };
        }
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// Orders the non-temporal stores before anything that follows (required before another thread
/// may read the buffer; a no-op elsewhere).
#[inline]
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}
