//! Where a tensor's elements live.
//!
//! - [`HostData`]: owned host memory, one variant per dtype.
//! - [`Storage::Mapped`]: a read-only byte range of a memory-mapped checkpoint file. Frozen
//!   weights stay here; an f32 weight is used in place when aligned (zero copy), other dtypes are
//!   converted per use, a tile at a time (see [`Storage::read_into`]). Block-quantized dtypes
//!   (blocks of 32 or super-blocks of 256) decode whole blocks; a range that starts or ends
//!   inside a block decodes that block and keeps the part asked for.
//!
//! - `Storage::Cuda` (feature `cuda`): a device buffer (f32 activations and adapters, bf16
//!   frozen matrices). Host-side reads of it copy the buffer back (tests, logging, checkpoints).

use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::dtype::{DType, Float, QK_K};

/// Owned host memory.
#[derive(Clone, Debug)]
pub enum HostData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F64(_) => DType::F64,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F64(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::F16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A byte range inside a shared read-only memory map.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    /// Hand the pages of every converting read back to the kernel once it is done (see
    /// [`MappedBytes::release_after_read`]).
    release: bool,
}

impl MappedBytes {
    /// Returns `None` if `offset..offset+len` is not inside the map.
    pub fn new(map: Arc<Mmap>, offset: usize, len: usize) -> Option<Self> {
        let end = offset.checked_add(len)?;
        (end <= map.len()).then_some(MappedBytes { map, offset, len, release: false })
    }

    /// Marks the range for [`Storage::release_read_pages`]: once a kernel has finished reading
    /// it (a whole frozen-weight GEMM, a device upload), its pages are dropped from this
    /// process's page tables (`MADV_DONTNEED`). The map is read-only and file-backed, so the
    /// bytes stay the file's: the next use faults them back in from the page cache (minor faults,
    /// no disk read while the cache holds them). A block-quantized weight is always decoded,
    /// never used in place, so its packed bytes then stay resident only while an op reads them.
    pub fn release_after_read(&mut self) {
        self.release = true;
    }

    /// Drops the pages of the whole range if [`release_after_read`](Self::release_after_read)
    /// was asked for.
    fn release_pages(&self) {
        #[cfg(unix)]
        if self.release && self.len > 0 {
            // SAFETY: MADV_DONTNEED on a read-only shared file mapping only drops page-table
            // entries: every later read through the map (or a slice borrowed from it) sees the
            // file's bytes again. The range lies inside the map (checked by `new`); memmap2
            // widens it to whole pages, which at worst re-faults a neighbour's bytes.
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.offset, self.len) };
        }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }
    /// Address of the first byte (used by tests to prove zero-copy use).
    pub fn as_ptr(&self) -> *const u8 {
        self.bytes().as_ptr()
    }
}

/// A logical-to-physical row mapping: logical row i of a mapped matrix is stored as physical
/// row `perm[i]`. Used to undo llama.cpp's q/k row permutation without copying the weight.
#[derive(Clone, Debug)]
pub struct RowMap {
    /// Elements per row (a whole number of blocks for quantized dtypes).
    pub row_len: usize,
    pub perm: std::sync::Arc<[u32]>,
}

/// The elements of one tensor.
pub enum Storage {
    Host(HostData),
    /// `numel` elements of `dtype` (block-quantized dtypes included) in a mapped byte range,
    /// optionally read through a row permutation.
    Mapped {
        bytes: MappedBytes,
        dtype: DType,
        numel: usize,
        rows: Option<RowMap>,
    },
    /// A device buffer (only constructible with the `cuda` feature).
    Cuda(crate::backend::DeviceBuf),
}

/// Reinterprets little-endian bytes as `[T]` when the dtype matches and the address is aligned.
fn cast_bytes<T: Float>(bytes: &[u8]) -> Option<&[T]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: f32/f64 have no invalid bit patterns; align_to only yields a middle slice whose
    // address is aligned for T.
    let (pre, mid, post) = unsafe { bytes.align_to::<T>() };
    (pre.is_empty() && post.is_empty()).then_some(mid)
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Host(h) => h.dtype(),
            Storage::Mapped { dtype, .. } => *dtype,
            Storage::Cuda(b) => b.dtype(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::Host(h) => h.len(),
            Storage::Mapped { numel, .. } => *numel,
            Storage::Cuda(b) => b.numel(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zero-copy view as `[T]`: host data of dtype T, or an aligned mapped range of dtype T.
    pub fn slice<T: Float>(&self) -> Option<&[T]> {
        match self {
            Storage::Host(h) => host_slice::<T>(h),
            Storage::Mapped { bytes, dtype, rows: None, .. } if *dtype == T::DTYPE => cast_bytes::<T>(bytes.bytes()),
            _ => None,
        }
    }

    pub fn slice_mut<T: Float>(&mut self) -> Option<&mut [T]> {
        match self {
            Storage::Host(h) => host_slice_mut::<T>(h),
            _ => None,
        }
    }

    /// As [`Storage::read_into`], with a failed device-to-host copy returned as an error.
    pub fn try_read_into<T: Float>(&self, start: usize, out: &mut [T]) -> crate::error::Result<()> {
        if let Storage::Cuda(b) = self {
            let v = b.to_f32()?;
            let end = start + out.len();
            out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = T::from_f64(*x as f64));
            return Ok(());
        }
        self.read_into(start, out);
        Ok(())
    }

    /// Converts elements `start .. start + out.len()` to `T` into `out`: the per-use conversion
    /// for frozen weights stored as bf16/f16 (or f32 read by an f64 kernel). The caller checks
    /// the range against `len()`.
    ///
    /// Device storage (feature `cuda`) is copied back whole first; if that copy fails `out` is
    /// filled with NaN — code that may see device tensors (checkpoints, optimizer state,
    /// `Tensor::item`) calls [`Storage::try_read_into`] instead, which returns the error.
    pub fn read_into<T: Float>(&self, start: usize, out: &mut [T]) {
        let end = start + out.len();
        if let Some(s) = self.slice::<T>() {
            out.copy_from_slice(&s[start..end]);
            return;
        }
        match self {
            Storage::Host(HostData::F32(v)) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = T::from_f64(*x as f64)),
            Storage::Host(HostData::F64(v)) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = T::from_f64(*x)),
            Storage::Host(HostData::BF16(v)) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = T::from_bf16(*x)),
            Storage::Host(HostData::F16(v)) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = T::from_f16(*x)),
            Storage::Mapped { bytes, dtype, rows: None, .. } => decode_range(bytes.bytes(), *dtype, start, out),
            Storage::Mapped { bytes, dtype, rows: Some(map), .. } => {
                // Split the logical range at row boundaries and read each piece from its
                // physical row.
                let (mut pos, mut done) = (start, 0);
                while done < out.len() {
                    let (row, col) = (pos / map.row_len, pos % map.row_len);
                    let n = (map.row_len - col).min(out.len() - done);
                    let phys = map.perm[row] as usize * map.row_len + col;
                    decode_range(bytes.bytes(), *dtype, phys, &mut out[done..done + n]);
                    pos += n;
                    done += n;
                }
            }
            // Device memory: copied back whole (host reads of device tensors are for tests,
            // logging and checkpoints, never for the training step itself).
            Storage::Cuda(_) => {
                if let Err(e) = self.try_read_into(start, out) {
                    panic!("reading a device tensor back to the host failed: {e}");
                }
            }
        }
    }

    /// For mapped storage marked with [`MappedBytes::release_after_read`]: drops its pages from
    /// the resident set now that a kernel has finished reading it (no-op otherwise). Kernels call
    /// this after an op's last read of a frozen operand, once per op, not per tile.
    pub fn release_read_pages(&self) {
        if let Storage::Mapped { bytes, .. } = self {
            bytes.release_pages();
        }
    }

    /// The raw bytes of a mapped range (in file order, ignoring any row map).
    pub fn mapped_bytes(&self) -> Option<&[u8]> {
        match self {
            Storage::Mapped { bytes, .. } => Some(bytes.bytes()),
            _ => None,
        }
    }

    /// True if the storage is a memory-mapped file range.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }

    /// Address of the first element, for zero-copy checks in tests.
    pub fn data_ptr(&self) -> *const u8 {
        match self {
            Storage::Host(HostData::F32(v)) => v.as_ptr() as *const u8,
            Storage::Host(HostData::F64(v)) => v.as_ptr() as *const u8,
            Storage::Host(HostData::BF16(v)) => v.as_ptr() as *const u8,
            Storage::Host(HostData::F16(v)) => v.as_ptr() as *const u8,
            Storage::Mapped { bytes, .. } => bytes.as_ptr(),
            Storage::Cuda(b) => b.ptr() as *const u8,
        }
    }
}

/// Decodes elements `start .. start + out.len()` of little-endian `bytes` holding `dtype`.
fn decode_range<T: Float>(bytes: &[u8], dtype: DType, start: usize, out: &mut [T]) {
    let end = start + out.len();
    match dtype {
        DType::BF16 => bytes[start * 2..end * 2]
            .chunks_exact(2)
            .zip(out.iter_mut())
            .for_each(|(c, o)| *o = T::from_bf16(bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))),
        DType::F16 => {
            bytes[start * 2..end * 2].chunks_exact(2).zip(out.iter_mut()).for_each(|(c, o)| *o = T::from_f16(f16::from_bits(u16::from_le_bytes([c[0], c[1]]))))
        }
        _ if dtype.is_quantized() => {
            // Whole blocks decode straight into `out` when T is f32, else through `blk`; a
            // block cut by the range (a row or tile seam inside it) decodes into `blk` and
            // copies the part asked for.
            let (bs, bb) = (dtype.block_size(), dtype.size());
            let mut blk = [0f32; QK_K];
            let mut i = start;
            while i < end {
                let b = i / bs;
                let off = i % bs;
                // A run of whole blocks decodes in one call straight into `out` when T is f32.
                let whole = if off == 0 { (end - i) / bs } else { 0 };
                if whole > 0 {
                    if let Some(o) = as_f32_mut(&mut out[i - start..i - start + whole * bs]) {
                        dtype.dequantize_blocks(&bytes[b * bb..(b + whole) * bb], o);
                        i += whole * bs;
                        continue;
                    }
                }
                // A block cut by the range (a row or tile seam inside it), or T = f64: through
                // `blk`, copying the part asked for.
                let n = (bs - off).min(end - i);
                dtype.dequantize_block(&bytes[b * bb..(b + 1) * bb], &mut blk[..bs]);
                out[i - start..i - start + n].iter_mut().zip(&blk[off..off + n]).for_each(|(o, &x)| *o = T::from_f32(x));
                i += n;
            }
        }
        _ => {
            let s = dtype.size();
            let b = &bytes[start * s..end * s];
            out.iter_mut().enumerate().for_each(|(i, o)| *o = T::from_f64(dtype.decode_le(b, i)));
        }
    }
}

/// `x` as `&[f32]` when T is f32.
pub(crate) fn as_f32<T: Float>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: as in `as_f32_mut`.
    (T::DTYPE == DType::F32).then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

/// `out` as `&mut [f32]` when T is f32.
pub(crate) fn as_f32_mut<T: Float>(out: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32 exactly when its DTYPE is F32 (Float is implemented for f32 and f64
    // only), so the cast reinterprets a slice as its own type.
    (T::DTYPE == DType::F32).then(|| unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()) })
}

fn host_slice<T: Float>(h: &HostData) -> Option<&[T]> {
    let any: &dyn std::any::Any = match h {
        HostData::F32(v) => v,
        HostData::F64(v) => v,
        _ => return None,
    };
    any.downcast_ref::<Vec<T>>().map(|v| v.as_slice())
}

fn host_slice_mut<T: Float>(h: &mut HostData) -> Option<&mut [T]> {
    let any: &mut dyn std::any::Any = match h {
        HostData::F32(v) => v,
        HostData::F64(v) => v,
        _ => return None,
    };
    any.downcast_mut::<Vec<T>>().map(|v| v.as_mut_slice())
}

/// Wraps a `Vec<T>` of a compute type as host data.
pub fn host_from_vec<T: Float>(v: Vec<T>) -> HostData {
    let mut slot = Some(v);
    let any: &mut dyn std::any::Any = &mut slot;
    if let Some(v) = any.downcast_mut::<Option<Vec<f32>>>() {
        return HostData::F32(v.take().unwrap_or_default());
    }
    if let Some(v) = any.downcast_mut::<Option<Vec<f64>>>() {
        return HostData::F64(v.take().unwrap_or_default());
    }
    unreachable!("Float is implemented only for f32 and f64")
}
