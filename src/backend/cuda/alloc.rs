//! A caching device allocator and the device buffer type.
//!
//! Freed blocks go to a free list keyed by their rounded size and are handed out again, so a
//! training loop whose shapes repeat calls `cuMemAlloc` only during its first step. Sizes round
//! up to a power of two (min 512 B) below 1 MiB and to a multiple of 2 MiB above. When the
//! device is full, every cached block is released and the allocation retried once; if it still
//! fails the error says how much was asked, how much is free and what spectune holds. Under the
//! emulated driver (cuda/emu) sizes are not rounded and reused blocks are refilled with NaN.

use std::collections::HashMap;
use std::sync::Mutex;

use cust::sys as cu;

use super::{check, gpu, mem_info};
use crate::dtype::DType;
use crate::error::{Error, Result};

#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<u64>>,
    /// Bytes in blocks handed out / held in the free lists.
    in_use: usize,
    cached: usize,
    peak: usize,
    /// cuMemAlloc calls so far (a steady-state step adds none).
    device_mallocs: u64,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Device memory as the allocator sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in live tensors (rounded block sizes).
    pub in_use: usize,
    /// Bytes freed by tensors but kept for reuse.
    pub cached: usize,
    /// Highest `in_use` since start or [`reset_peak`].
    pub peak: usize,
    pub device_mallocs: u64,
}

pub fn memory_stats() -> MemoryStats {
    let g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    g.as_ref().map(|p| MemoryStats { in_use: p.in_use, cached: p.cached, peak: p.peak, device_mallocs: p.device_mallocs }).unwrap_or_default()
}

/// Starts a new peak measurement at the current usage.
pub fn reset_peak() {
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = g.as_mut() {
        p.peak = p.in_use;
    }
}

fn rounded(bytes: usize) -> usize {
    const MIB: usize = 1 << 20;
    if bytes <= MIB {
        bytes.max(512).next_power_of_two()
    } else {
        bytes.div_ceil(2 * MIB) * 2 * MIB
    }
}

fn alloc(bytes: usize, op: &str) -> Result<(u64, usize)> {
    // Under the emulated driver blocks have the exact size asked (its guard page then sits right
    // after the last element) and a reused block is refilled with the NaN pattern a fresh one
    // has, so an out-of-bounds or uninitialized read is caught as on a new allocation.
    let emulated = gpu()?.emulated;
    let size = if emulated { bytes.max(1) } else { rounded(bytes.max(1)) };
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let p = g.get_or_insert_with(Pool::default);
    let ptr = match p.free.get_mut(&size).and_then(|v| v.pop()) {
        Some(ptr) => {
            p.cached -= size;
            if emulated {
                // SAFETY: the block holds `size` bytes and no tensor uses it.
                check(unsafe { cu::cuMemsetD8_v2(ptr, 0xff, size) }, || format!("refilling a reused block of {size} bytes for {op}"))?;
            }
            ptr
        }
        None => {
            let mut ptr: cu::CUdeviceptr = 0;
            // SAFETY: valid out-pointer.
            let mut st = unsafe { cu::cuMemAlloc_v2(&mut ptr, size) };
            if st == cu::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY && p.cached > 0 {
                for (_, list) in p.free.drain() {
                    for b in list {
                        // SAFETY: blocks in the free list came from cuMemAlloc and are unused.
                        unsafe { cu::cuMemFree_v2(b) };
                    }
                }
                p.cached = 0;
                // SAFETY: as above.
                st = unsafe { cu::cuMemAlloc_v2(&mut ptr, size) };
            }
            if st == cu::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                let (free, total) = mem_info().unwrap_or((0, 0));
                return Err(Error::DeviceOom { op: op.to_string(), asked: size, free, total, held: p.in_use });
            }
            check(st, || format!("cuMemAlloc of {size} bytes for {op}"))?;
            p.device_mallocs += 1;
            ptr
        }
    };
    p.in_use += size;
    p.peak = p.peak.max(p.in_use);
    Ok((ptr, size))
}

fn release(ptr: u64, size: usize) {
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = g.as_mut() {
        p.in_use -= size;
        p.cached += size;
        p.free.entry(size).or_default().push(ptr);
    }
}

/// `numel` elements of `dtype` (f32 or bf16) in device memory. Returned to the cache on drop.
pub struct DeviceBuf {
    ptr: u64,
    size: usize,
    dtype: DType,
    numel: usize,
}

impl std::fmt::Debug for DeviceBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuf({} × {} at {:#x})", self.numel, self.dtype, self.ptr)
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        release(self.ptr, self.size);
    }
}

impl DeviceBuf {
    /// Uninitialized storage for `numel` elements; `op` names the caller in an out-of-memory error.
    pub fn new(dtype: DType, numel: usize, op: &str) -> Result<DeviceBuf> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::dtype("cuda alloc", "tensor", "f32 or bf16 on the device", dtype));
        }
        let (ptr, size) = alloc(numel * dtype.size(), op)?;
        Ok(DeviceBuf { ptr, size, dtype, numel })
    }
    /// Zero-filled storage.
    pub fn zeros(dtype: DType, numel: usize, op: &str) -> Result<DeviceBuf> {
        let b = Self::new(dtype, numel, op)?;
        let bytes = numel * dtype.size();
        // SAFETY: the block holds at least `bytes` bytes.
        check(unsafe { cu::cuMemsetD8_v2(b.ptr, 0, bytes) }, || format!("cuMemset of {bytes} bytes for {op}"))?;
        Ok(b)
    }
    /// Copies little-endian host bytes of `dtype` to a new buffer.
    pub fn from_bytes(dtype: DType, bytes: &[u8], op: &str) -> Result<DeviceBuf> {
        let numel = bytes.len() / dtype.size();
        let b = Self::new(dtype, numel, op)?;
        b.write_bytes(bytes, op)?;
        Ok(b)
    }
    pub fn from_f32(v: &[f32], op: &str) -> Result<DeviceBuf> {
        Self::from_bytes(DType::F32, as_bytes(v), op)
    }
    /// Overwrites the buffer with host bytes (same length).
    pub fn write_bytes(&self, bytes: &[u8], op: &str) -> Result<()> {
        debug_assert_eq!(bytes.len(), self.numel * self.dtype.size());
        gpu()?; // the context must be current on this thread (it may be a rayon worker)
                // SAFETY: the block holds `bytes.len()` bytes; the copy is synchronous for pageable memory.
        check(unsafe { cu::cuMemcpyHtoD_v2(self.ptr, bytes.as_ptr() as *const _, bytes.len()) }, || {
            format!("copy of {} bytes to the device for {op}", bytes.len())
        })
    }
    /// Writes host bytes at element offset `start`.
    pub fn write_range(&self, start: usize, bytes: &[u8], op: &str) -> Result<()> {
        let off = start * self.dtype.size();
        debug_assert!(off + bytes.len() <= self.numel * self.dtype.size());
        gpu()?;
        // SAFETY: the range lies inside the block (checked by the caller's tiling).
        check(unsafe { cu::cuMemcpyHtoD_v2(self.ptr + off as u64, bytes.as_ptr() as *const _, bytes.len()) }, || {
            format!("copy of {} bytes to the device for {op}", bytes.len())
        })
    }
    /// Copies the buffer to the host (waits for queued work).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.numel * self.dtype.size();
        // Device tensors are read back from any thread (e.g. a CPU kernel's rayon worker), and
        // a driver call needs the context current on the calling thread.
        gpu()?;
        let mut out = vec![0u8; n];
        // SAFETY: `out` holds n bytes; the block holds at least n.
        check(unsafe { cu::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut _, self.ptr, n) }, || format!("copy of {n} bytes from the device"))?;
        Ok(out)
    }
    /// The elements as f32 (bf16 widened).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.to_bytes()?;
        Ok(match self.dtype {
            DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            _ => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        })
    }
    /// A new buffer with the same contents (device-to-device copy).
    pub fn duplicate(&self, op: &str) -> Result<DeviceBuf> {
        let b = Self::new(self.dtype, self.numel, op)?;
        let n = self.numel * self.dtype.size();
        // SAFETY: both blocks hold at least n bytes.
        check(unsafe { cu::cuMemcpyDtoD_v2(b.ptr, self.ptr, n) }, || format!("device copy of {n} bytes for {op}"))?;
        Ok(b)
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.numel
    }
}

pub(crate) fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data slices (f32, i64, u32, f64, u8) viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}
