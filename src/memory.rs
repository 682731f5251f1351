//! Host allocator policy for training loops.
//!
//! A training step allocates and frees the same few hundred activation buffers (0.1–32 MiB each)
//! every step. glibc's malloc serves buffers above its mmap threshold with a fresh `mmap` and
//! returns them with `munmap`, and trims freed memory at the top of its heaps back to the kernel:
//! every step then page-faults its whole working set in again, and each fault zeroes a 4 KiB page
//! (in a VM, also a nested-page-table walk). On the reference CPU machine that was 330 k faults
//! and about 1.9 s of a 9 s checkpointed step (docs/performance.md, optimization 8).
//!
//! [`retain_freed_memory`] keeps freed memory in the process for reuse by the next step: the mmap
//! threshold is raised to glibc's maximum (32 MiB on 64-bit), automatic trimming is turned off,
//! and all threads share one arena. (With one arena per thread, a buffer freed into a rayon
//! worker's arena cannot serve the main thread's next allocation: each arena would keep its own
//! peak, +105 MiB on the reference step. The lock is uncontended: a step makes a few thousand
//! allocations.) Peak RSS is then the peak of live buffers plus fragmentation, and
//! memory freed after setup (weight conversion temporaries) is handed back once with
//! [`release_free_memory`]. Process-wide state: the CLI sets it at start-up; a program embedding
//! spectune decides for itself (it is never changed behind its back). `SPECTUNE_KEEP_FREED=0`
//! makes the CLI leave the allocator at its defaults.
//!
//! On targets other than Linux/glibc both functions do nothing and report `false`.

/// glibc's largest allowed mmap threshold on 64-bit targets (`HEAP_MAX_SIZE / 2`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;

/// Keeps freed heap memory in the process instead of returning it to the kernel after every
/// free (see the module docs). Returns whether the allocator accepted the settings. Call it
/// before starting threads: threads that already have an arena keep it.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts allocator parameters; it is thread-safe and takes effect
        // for later allocations.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Returns free heap pages to the kernel now (`malloc_trim(0)`): after setup, so that the
/// temporaries of loading/converting weights do not stay resident under [`retain_freed_memory`].
/// Returns whether any memory was released.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory; live allocations are untouched.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_is_accepted_and_allocation_still_works() {
        let applied = retain_freed_memory();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
        // Buffers across the threshold (below, at, above 32 MiB) allocate, fill and free.
        for mib in [1usize, 8, 31, 33] {
            let v = vec![1u8; mib << 20];
            assert_eq!(v.iter().map(|&x| x as usize).sum::<usize>(), mib << 20);
        }
        release_free_memory();
        let v = vec![2u32; 1 << 20];
        assert_eq!(v[12345], 2);
    }
}
