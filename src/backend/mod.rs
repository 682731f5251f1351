//! The kernel interface.
//!
//! A kernel is a free function on contiguous, row-major buffers with explicit dimensions, in
//! llm.c's argument order: outputs first, then saved buffers, then inputs, then dims. Forward and
//! backward kernels of one family sit side by side. `cpu` holds the readable reference kernels,
//! generic over [`Float`](crate::Float) so gradient checks can run them in f64. The CUDA
//! backend (feature `cuda`) mirrors these names in `cuda/<family>.cu`.
//!
//! Conventions: a kernel never allocates its outputs (the op layer does), never checks user
//! input (the op layer has validated shapes; kernels only `debug_assert!`), and writes its
//! outputs with `=` unless its doc says it accumulates.

pub mod cpu;
pub mod cpu_attn;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod vmath;

/// Starts a new peak-device-memory measurement (no-op without the `cuda` feature).
pub fn cuda_reset_peak() {
    #[cfg(feature = "cuda")]
    cuda::reset_peak();
}

/// Peak bytes held by device tensors since start or [`cuda_reset_peak`] (0 without `cuda`).
pub fn cuda_peak_bytes() -> usize {
    #[cfg(feature = "cuda")]
    return cuda::memory_stats().peak;
    #[cfg(not(feature = "cuda"))]
    0
}

/// Waits for queued device work (no-op on the CPU or without the `cuda` feature), so a timed
/// step includes its kernels.
pub fn device_synchronize() -> crate::error::Result<()> {
    #[cfg(feature = "cuda")]
    if cuda::available() {
        return cuda::synchronize(|| "device_synchronize".into());
    }
    Ok(())
}
