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
        for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
            // SAFETY: SSE is part of the x86_64 baseline; `d` is 4 writable f32 at a 16-byte
            // aligned address (the slice start is aligned and every chunk is 16 bytes), `s` is 4
            // readable f32 (unaligned load).
            unsafe { _mm_stream_ps(d.as_mut_ptr().cast::<f32>(), _mm_loadu_ps(s.as_ptr())) };
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
