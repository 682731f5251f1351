//! Frozen-weight GEMMs at a lower f32 matmul precision, on Intel AMX tiles.
//!
//! PyTorch's `torch.set_float32_matmul_precision` names three levels; spectune takes the same
//! three ([`MatmulPrecision`]) for the products whose right operand is a frozen weight (the
//! linears' forward and dX, the fused LM-head loss). Adapter products, attention and every f64
//! computation stay f32/f64 whatever the setting.
//!
//! - `highest` (the default): f32 products.
//! - `high`: each f32 operand x is split into two bf16 numbers, hi = bf16(x) and
//!   lo = bf16(x − hi) (rounding to nearest even; x − hi is exact in f32), and a·b is formed from
//!   the three largest terms hi·hi + hi·lo + lo·hi with f32 accumulation: about 16 significant
//!   bits per operand (the dropped lo·lo term is 2⁻¹⁶ of the product).
//! - `medium`: one bf16 per operand (8 significant bits), f32 accumulation.
//!
//! The bf16 products run on AMX (TDPBF16PS: C[16×16] f32 += A[16×32] bf16 · B[32×16] bf16, B in
//! the "VNNI" layout where row p of a B tile holds the 16 pairs (B(2p, j), B(2p+1, j))). Where
//! the CPU lacks AMX-BF16 or the kernel does not grant the tile state, every level computes in
//! f32 (the setting is a permission, as in PyTorch, not a demand).
//!
//! Layout of the two frozen-weight products, with the stored matrix W read a row block at a
//! time (decoded to f32 by [`Storage::read_into`], then rounded to bf16 here):
//! - **forward** y = x·Wᵀ (W stored [n×k], rows along k): computed transposed, yᵀ = W·xᵀ, so the
//!   rows of W are AMX's left operand as they are (bf16 row-major: a vertical conversion, no
//!   shuffle), and xᵀ, packed once per GEMM, is the right operand. Tasks own blocks of W's rows
//!   (columns of y).
//! - **dX** dx = dy·W (W stored [k×n]): dy (bf16 row-major, packed once) is the left operand and
//!   two consecutive rows of W interleave into one VNNI row of the right operand (again a
//!   vertical operation). Tasks own column slices of W, walked down k in chunks.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::storage::Storage;

/// How exactly f32 products with a frozen weight are computed (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 products.
    #[default]
    Highest,
    /// bf16x3: about 16 significant bits per operand, f32 accumulation.
    High,
    /// bf16: 8 significant bits per operand, f32 accumulation.
    Medium,
}

impl MatmulPrecision {
    /// The name PyTorch uses for the level.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::Highest => "highest",
            MatmulPrecision::High => "high",
            MatmulPrecision::Medium => "medium",
        }
    }
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "highest" => Ok(MatmulPrecision::Highest),
            "high" => Ok(MatmulPrecision::High),
            "medium" => Ok(MatmulPrecision::Medium),
            _ => Err(format!("unknown matmul precision {s:?}: expected highest, high or medium")),
        }
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the process-wide precision of frozen-weight f32 products (PyTorch's
/// `torch.set_float32_matmul_precision`). Takes effect at the next GEMM.
pub fn set_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
}

/// The level set by [`set_matmul_precision`].
pub fn matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => MatmulPrecision::High,
        2 => MatmulPrecision::Medium,
        _ => MatmulPrecision::Highest,
    }
}

/// The precision frozen-weight products actually run at: the setting where AMX is usable,
/// `Highest` otherwise.
pub fn effective_precision() -> MatmulPrecision {
    match matmul_precision() {
        MatmulPrecision::Highest => MatmulPrecision::Highest,
        p if available() => p,
        _ => MatmulPrecision::Highest,
    }
}

/// Whether this CPU has AMX-BF16 (with AVX-512BW for the packing) and the kernel granted this
/// process the tile state, unless the environment says `SPECTUNE_AMX=0`. Asked once.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| std::env::var("SPECTUNE_AMX").as_deref() != Ok("0") && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID.(EAX=7, ECX=0): EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    // Leaf 7 is asked only where the maximum leaf reaches it.
    let max = __cpuid_count(0, 0).eax;
    if max < 7 {
        return false;
    }
    let l7 = __cpuid_count(7, 0);
    let amx = l7.edx & (1 << 22) != 0 && l7.edx & (1 << 24) != 0;
    if !amx || !std::arch::is_x86_feature_detected!("avx512bw") || !std::arch::is_x86_feature_detected!("avx512f") {
        return false;
    }
    // Linux hands out the (8 KiB) tile data state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM,
    // XFEATURE_XTILEDATA). Permission is per process.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Whether a frozen-weight product of `m` rows should take this path: AMX usable, precision
/// below `highest`, and enough rows to fill tiles (a single-token step is a GEMV, where f32 at
/// memory speed is as fast).
pub(crate) fn wanted(m: usize) -> Option<MatmulPrecision> {
    if m < MIN_ROWS {
        return None;
    }
    match effective_precision() {
        MatmulPrecision::Highest => None,
        p => Some(p),
    }
}

/// Rows of the left operand below which products stay f32.
const MIN_ROWS: usize = 16;

/// Stored rows of W per forward task (two 16-row AMX tiles, twice).
const FWD_ROWS: usize = 64;
/// f32 values of W decoded per dX chunk (256 KiB: the chunk, its packed copy and the task's
/// accumulator stay in L2).
const DX_CHUNK_ELEMS: usize = 1 << 16;
/// Largest dX accumulator (f32 values, 512 KiB) for which the reduction is split instead of the
/// columns.
const KSPLIT_MAX_ACC: usize = 1 << 17;

/// Rounds `x` to bf16, nearest even; a NaN stays a (quiet) NaN.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16
}

/// (hi, lo) bf16 bits with x ≈ hi + lo.
#[inline(always)]
fn split(x: f32) -> (u32, u32) {
    let h = bf16_bits(x);
    (h, bf16_bits(x - f32::from_bits(h << 16)))
}

/// dst_hi[r][0..kp] (row stride kp) = bf16(src[r][0..k]) (row stride lds), zero beyond k; with
/// `dst_lo`, the (hi, lo) split. Rows 0..rows only.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw,avx512vl"))]
unsafe fn pack_rows(hi: &mut [u16], mut lo: Option<&mut [u16]>, src: &[f32], rows: usize, k: usize, lds: usize, kp: usize) {
    for r in 0..rows {
        let s = &src[r * lds..r * lds + k];
        let h = &mut hi[r * kp..(r + 1) * kp];
        match lo.as_deref_mut() {
            Some(lo) => {
                let l = &mut lo[r * kp..(r + 1) * kp];
                for ((h, l), &x) in h.iter_mut().zip(l.iter_mut()).zip(s) {
                    let (a, b) = split(x);
                    *h = a as u16;
                    *l = b as u16;
                }
                l[k..].fill(0);
            }
            None => {
                for (h, &x) in h.iter_mut().zip(s) {
                    *h = bf16_bits(x) as u16;
                }
            }
        }
        h[k..].fill(0);
    }
}

/// One VNNI row of the right operand from the rows r0 (even k) and r1 (odd k, or zeros) over
/// columns 0..n: the pair (r0[j], r1[j]) goes to panel j / 16, row `p`, slot j % 16, where a
/// panel is `prows` rows of 16 u32. Slots n..16·panels are zero.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw,avx512vl"))]
unsafe fn pack_pair_row(hi: &mut [u32], mut lo: Option<&mut [u32]>, r0: &[f32], r1: Option<&[f32]>, n: usize, panels: usize, p: usize, prows: usize) {
    let mut a = [0f32; 16];
    let mut b = [0f32; 16];
    for q in 0..panels {
        let (j0, j1) = ((16 * q).min(n), (16 * q + 16).min(n));
        if j1 - j0 == 16 {
            a.copy_from_slice(&r0[j0..j1]);
            match r1 {
                Some(r) => b.copy_from_slice(&r[j0..j1]),
                None => b = [0.0; 16],
            }
        } else {
            a = [0.0; 16];
            b = [0.0; 16];
            a[..j1 - j0].copy_from_slice(&r0[j0..j1]);
            if let Some(r) = r1 {
                b[..j1 - j0].copy_from_slice(&r[j0..j1]);
            }
        }
        let o = q * prows * 16 + p * 16;
        let oh: &mut [u32; 16] = (&mut hi[o..o + 16]).try_into().expect("16 slots");
        match lo.as_deref_mut() {
            Some(lo) => {
                let ol: &mut [u32; 16] = (&mut lo[o..o + 16]).try_into().expect("16 slots");
                for i in 0..16 {
                    let (ah, al) = split(a[i]);
                    let (bh, bl) = split(b[i]);
                    oh[i] = ah | bh << 16;
                    ol[i] = al | bl << 16;
                }
            }
            None => {
                for i in 0..16 {
                    oh[i] = bf16_bits(a[i]) | bf16_bits(b[i]) << 16;
                }
            }
        }
    }
}

/// Per-thread scratch, grown as needed and reused (its contents are garbage between uses).
#[derive(Default)]
struct Scratch {
    f: Vec<f32>,
    h16: Vec<u16>,
    l16: Vec<u16>,
    h32: Vec<u32>,
    l32: Vec<u32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// The tile configuration: all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile configuration on this thread.
///
/// # Safety
/// Only after [`available`] returned true.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles_on() {
    let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    std::arch::asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
}

/// Releases this thread's tile state.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles_off() {
    std::arch::asm!("tilerelease", options(nostack, nomem));
}

/// T[32×16] = (T if `load` else 0) + A[32×32·ks]·B[32·ks×16], written back to T.
///
/// T: two 16-row f32 tiles at `c` and `c + 16` rows, row stride `ldc` bytes. A: 32 rows of bf16
/// at `ah` (and `al`), row stride `lda` bytes, 32 k per step (64 bytes). B: a VNNI panel at `bh`
/// (and `bl`), 16 rows of 64 bytes per step. With `al`/`bl` non-null (`high`), the products
/// hi·hi + hi·lo + lo·hi.
///
/// # Safety
/// Tiles configured by [`tiles_on`]; every pointer valid for the extents above.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_32x16(c: *mut f32, ldc: usize, load: bool, ah: *const u16, al: *const u16, lda: usize, bh: *const u32, bl: *const u32, ks: usize) {
    use std::arch::asm;
    let c1 = (c as *mut u8).add(16 * ldc);
    if load {
        asm!("tileloadd tmm0, [{p} + {s}*1]", p = in(reg) c, s = in(reg) ldc, options(nostack, readonly));
        asm!("tileloadd tmm1, [{p} + {s}*1]", p = in(reg) c1, s = in(reg) ldc, options(nostack, readonly));
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
    }
    let (a1h, a1l) = ((ah as *const u8).add(16 * lda), (al as *const u8).add(16 * lda));
    let two = !al.is_null();
    for s in 0..ks {
        let (ka, kb) = (64 * s, 1024 * s);
        asm!(
            "tileloadd tmm2, [{a0} + {s}*1]",
            "tileloadd tmm3, [{a1} + {s}*1]",
            "tileloadd tmm4, [{b} + {bs}*1]",
            "tdpbf16ps tmm0, tmm2, tmm4",
            "tdpbf16ps tmm1, tmm3, tmm4",
            a0 = in(reg) (ah as *const u8).add(ka),
            a1 = in(reg) a1h.add(ka),
            s = in(reg) lda,
            b = in(reg) (bh as *const u8).add(kb),
            bs = in(reg) 64usize,
            options(nostack, readonly)
        );
        if two {
            asm!(
                "tileloadd tmm7, [{b} + {bs}*1]",
                "tdpbf16ps tmm0, tmm2, tmm7",
                "tdpbf16ps tmm1, tmm3, tmm7",
                "tileloadd tmm5, [{a0} + {s}*1]",
                "tileloadd tmm6, [{a1} + {s}*1]",
                "tdpbf16ps tmm0, tmm5, tmm4",
                "tdpbf16ps tmm1, tmm6, tmm4",
                a0 = in(reg) (al as *const u8).add(ka),
                a1 = in(reg) a1l.add(ka),
                s = in(reg) lda,
                b = in(reg) (bl as *const u8).add(kb),
                bs = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
    }
    asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) c, s = in(reg) ldc, options(nostack));
    asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) c1, s = in(reg) ldc, options(nostack));
}

/// T[32×32] = (T if `load` else 0) + A[32×32·ks]·B[32·ks×32] in one bf16 part: four
/// accumulator tiles, so consecutive TDPBF16PS are independent (the instruction's latency is
/// several times its issue interval). B is two VNNI panels `pst` u32 apart; the rest as
/// [`block_32x16`].
///
/// # Safety
/// As [`block_32x16`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_32x32(c: *mut f32, ldc: usize, load: bool, a: *const u16, lda: usize, b: *const u32, pst: usize, ks: usize) {
    use std::arch::asm;
    let c = c as *mut u8;
    let (c01, c10) = (c.add(64), c.add(16 * ldc));
    let c11 = c10.add(64);
    if load {
        asm!(
            "tileloadd tmm0, [{p0} + {s}*1]",
            "tileloadd tmm1, [{p1} + {s}*1]",
            "tileloadd tmm2, [{p2} + {s}*1]",
            "tileloadd tmm3, [{p3} + {s}*1]",
            p0 = in(reg) c, p1 = in(reg) c01, p2 = in(reg) c10, p3 = in(reg) c11, s = in(reg) ldc,
            options(nostack, readonly)
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    let a1 = (a as *const u8).add(16 * lda);
    let b1 = (b as *const u8).add(4 * pst);
    for s in 0..ks {
        let (ka, kb) = (64 * s, 1024 * s);
        asm!(
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{b0} + {bs}*1]",
            "tileloadd tmm7, [{b1} + {bs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) (a as *const u8).add(ka),
            a1 = in(reg) a1.add(ka),
            s = in(reg) lda,
            b0 = in(reg) (b as *const u8).add(kb),
            b1 = in(reg) b1.add(kb),
            bs = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
    asm!(
        "tilestored [{p0} + {s}*1], tmm0",
        "tilestored [{p1} + {s}*1], tmm1",
        "tilestored [{p2} + {s}*1], tmm2",
        "tilestored [{p3} + {s}*1], tmm3",
        p0 = in(reg) c, p1 = in(reg) c01, p2 = in(reg) c10, p3 = in(reg) c11, s = in(reg) ldc,
        options(nostack)
    );
}

/// T[32×32] (+)= A·B over two B panels `pst` u32 apart: [`block_32x32`] for one part,
/// [`block_32x16`] per panel for two (`al`/`bl` non-null).
///
/// # Safety
/// As [`block_32x16`].
#[allow(clippy::too_many_arguments)]
unsafe fn block(c: *mut f32, ldc: usize, load: bool, ah: *const u16, al: *const u16, lda: usize, bh: *const u32, bl: *const u32, pst: usize, ks: usize) {
    if al.is_null() {
        block_32x32(c, ldc, load, ah, lda, bh, pst, ks)
    } else {
        block_32x16(c, ldc, load, ah, al, lda, bh, bl, ks);
        block_32x16(c.add(16), ldc, load, ah, al, lda, bh.add(pst), bl.add(pst), ks);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles_on() {
    unreachable!("AMX is x86_64 only")
}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles_off() {}
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn block_32x16(_: *mut f32, _: usize, _: bool, _: *const u16, _: *const u16, _: usize, _: *const u32, _: *const u32, _: usize) {
    unreachable!("AMX is x86_64 only")
}
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn block_32x32(_: *mut f32, _: usize, _: bool, _: *const u16, _: usize, _: *const u32, _: usize, _: usize) {
    unreachable!("AMX is x86_64 only")
}

/// The stored matrix of a product: a [`Storage`] (decoded per row block) or f32 values in
/// place (an LM-head tile already decoded for two products).
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    Stored(&'a Storage),
    F32(&'a [f32]),
}

impl Src<'_> {
    /// Elements start..start + out.len() as f32.
    fn read(&self, start: usize, out: &mut [f32]) {
        match self {
            Src::Stored(s) => s.read_into(start, out),
            Src::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
        }
    }
    /// Elements start..start + len as f32: in place for f32 values, else decoded into `buf`.
    fn rows<'b>(&'b self, start: usize, len: usize, buf: &'b mut [f32]) -> &'b [f32] {
        match self {
            Src::F32(v) => &v[start..start + len],
            Src::Stored(s) => {
                s.read_into(start, &mut buf[..len]);
                &buf[..len]
            }
        }
    }
    fn block_size(&self) -> usize {
        match self {
            Src::Stored(s) => s.dtype().block_size(),
            Src::F32(_) => 1,
        }
    }
}

/// A raw pointer that may cross to a rayon task (each task writes a disjoint part of C).
#[derive(Clone, Copy)]
struct RawPtr(*mut f32);
// SAFETY: only used to hand disjoint column blocks of C to rayon tasks.
unsafe impl Send for RawPtr {}
unsafe impl Sync for RawPtr {}

impl RawPtr {
    /// Element `i` (a method, so closures capture the whole Sync wrapper, not its raw field).
    ///
    /// # Safety
    /// `i` lies inside the buffer.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// C[m×n] = A[m×k]·Wᵀ + beta·C with W stored [n×k] at element `w0` of `w` (the forward of a
/// frozen linear), at precision `p` (`High` or `Medium`).
///
/// # Safety
/// [`available`] returned true.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_abt(c: &mut [f32], a: &[f32], w: Src<'_>, w0: usize, m: usize, k: usize, n: usize, beta: f32, p: MatmulPrecision) {
    let two = p == MatmulPrecision::High;
    let (kp, mp) = (k.div_ceil(32) * 32, m.div_ceil(32) * 32);
    // xᵀ as the right operand: panel q holds rows 16q..16q+16 of A as VNNI pairs along k, its
    // hi part then (for `high`) its lo part, each prows × 16 u32.
    let prows = kp / 2;
    let parts = if two { 2 } else { 1 };
    let mut xt = vec![0u32; mp * prows * parts];
    xt.par_chunks_mut(16 * prows * parts).enumerate().for_each(|(q, panel)| {
        let (h, l) = panel.split_at_mut(16 * prows);
        for i in 0..16.min(m.saturating_sub(16 * q)) {
            let row = &a[(16 * q + i) * k..(16 * q + i + 1) * k];
            for pr in 0..k.div_ceil(2) {
                let x0 = row[2 * pr];
                let x1 = if 2 * pr + 1 < k { row[2 * pr + 1] } else { 0.0 };
                if two {
                    let ((h0, l0), (h1, l1)) = (split(x0), split(x1));
                    h[pr * 16 + i] = h0 | h1 << 16;
                    l[pr * 16 + i] = l0 | l1 << 16;
                } else {
                    h[pr * 16 + i] = bf16_bits(x0) | bf16_bits(x1) << 16;
                }
            }
        }
    });
    let cp = RawPtr(c.as_mut_ptr());
    let xt = &xt;
    (0..n.div_ceil(FWD_ROWS)).into_par_iter().for_each(move |blk| {
        let cp = cp;
        let (n0, n1) = (blk * FWD_ROWS, ((blk + 1) * FWD_ROWS).min(n));
        let nr = n1 - n0;
        let nrp = nr.div_ceil(32) * 32;
        SCRATCH.with_borrow_mut(|sc| {
            let wf = w.rows(w0 + n0 * k, nr * k, grow(&mut sc.f, nr * k));
            let wh = grow(&mut sc.h16, nrp * kp);
            let wl = if two { Some(grow(&mut sc.l16, nrp * kp)) } else { None };
            pack_rows(wh, wl, wf, nr, k, k, kp);
            wh[nr * kp..].fill(0);
            if two {
                sc.l16[nr * kp..nrp * kp].fill(0);
            }
            let (wh, wl) = (&sc.h16[..nrp * kp], &sc.l16[..if two { nrp * kp } else { 0 }]);
            let mut t = [0f32; 32 * 32];
            tiles_on();
            for r in (0..nrp).step_by(32) {
                for q in (0..mp / 16).step_by(2) {
                    let pst = 16 * prows * parts;
                    let bh = xt.as_ptr().add(q * pst);
                    let bl = if two { bh.add(16 * prows) } else { std::ptr::null() };
                    let al = if two { wl.as_ptr().add(r * kp) } else { std::ptr::null() };
                    block(t.as_mut_ptr(), 128, false, wh.as_ptr().add(r * kp), al, 2 * kp, bh, bl, pst, kp / 32);
                    // t[i][j] = C[16q + j][n0 + r + i]: row by row of C, contiguous writes.
                    let ni = 32.min(nr.saturating_sub(r));
                    for j in 0..32.min(m - 16 * q) {
                        let row = std::slice::from_raw_parts_mut(cp.0.add((16 * q + j) * n + n0 + r), ni);
                        for (i, dst) in row.iter_mut().enumerate() {
                            *dst = if beta == 0.0 { t[i * 32 + j] } else { t[i * 32 + j] + beta * *dst };
                        }
                    }
                }
            }
            tiles_off();
        });
    });
}

/// C[m×n] = A[m×k]·W + beta·C with W stored [k×n] at element `w0` of `w` (the dX of a frozen
/// linear), at precision `p`.
///
/// # Safety
/// [`available`] returned true.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_ab(c: &mut [f32], a: &[f32], w: Src<'_>, w0: usize, m: usize, k: usize, n: usize, beta: f32, p: MatmulPrecision) {
    let two = p == MatmulPrecision::High;
    let (kp, mp) = (k.div_ceil(32) * 32, m.div_ceil(32) * 32);
    let mut ah = vec![0u16; mp * kp];
    let mut al = if two { vec![0u16; mp * kp] } else { Vec::new() };
    pack_rows(&mut ah, two.then_some(&mut al[..]), a, m, k, k, kp);
    let a = Packed { h: &ah, l: &al, kp, mp };
    let threads = rayon::current_num_threads();
    let cp = RawPtr(c.as_mut_ptr());
    let store = |acc: &[f32], ld: usize, c0: usize, nc: usize| {
        for i in 0..m {
            for j in 0..nc {
                let dst = cp.at(i * n + c0 + j);
                let v = acc[i * ld + j];
                *dst = if beta == 0.0 { v } else { v + beta * *dst };
            }
        }
    };
    let np = n.div_ceil(32) * 32;
    if mp * np <= KSPLIT_MAX_ACC && k >= 2 * n && k >= 64 * threads {
        // A narrow C over a long reduction: split the reduction. Each task owns a range of W's rows, decodes them whole
        // (one contiguous read per chunk) and streams only its part of A; the partial products
        // are summed at the end.
        let kt = k.div_ceil(4 * threads).div_ceil(32) * 32;
        let parts: Vec<Vec<f32>> = (0..k.div_ceil(kt))
            .into_par_iter()
            .map(|t| {
                let mut acc = vec![0f32; mp * np];
                dx_part(&mut acc, &a, w, w0, n, 0, n, t * kt, ((t + 1) * kt).min(k), two);
                acc
            })
            .collect();
        let mut sum = parts[0].clone();
        for q in &parts[1..] {
            sum.par_chunks_mut(1 << 14).zip(q.par_chunks(1 << 14)).for_each(|(s, q)| s.iter_mut().zip(q).for_each(|(s, q)| *s += q));
        }
        store(&sum, np, 0, n);
        return;
    }
    // Column slices whole in W's blocks (a K-quant block is 256 values of a row): about eight
    // per thread (fewer, wider slices decode longer runs of each row per call; more balance the
    // threads better), a multiple of 32 columns (two panels) and of the block.
    let bs = w.block_size().max(1);
    let align = if bs > 32 { bs.div_ceil(32) * 32 } else { 32 };
    let width = n.div_ceil(8 * threads).div_ceil(align).max(1) * align;
    (0..n.div_ceil(width)).into_par_iter().for_each(|sl| {
        let (c0, c1) = (sl * width, ((sl + 1) * width).min(n));
        let ld = (c1 - c0).div_ceil(32) * 32;
        let mut acc = vec![0f32; mp * ld];
        dx_part(&mut acc, &a, w, w0, n, c0, c1, 0, k, two);
        store(&acc, ld, c0, c1 - c0);
    });
}

/// The left operand of a dX product, bf16 row-major [mp × kp] (hi, and lo for `high`).
struct Packed<'a> {
    h: &'a [u16],
    l: &'a [u16],
    kp: usize,
    mp: usize,
}

/// acc[mp × ld] (ld = columns c0..c1 rounded up to 32) += A[:, ka..kb]·W[ka..kb, c0..c1], W
/// stored [k × n] at `w0`, decoded DX_CHUNK_ELEMS values at a time.
///
/// # Safety
/// AMX available; `acc` holds mp × ld values.
#[allow(clippy::too_many_arguments)]
unsafe fn dx_part(acc: &mut [f32], a: &Packed<'_>, w: Src<'_>, w0: usize, n: usize, c0: usize, c1: usize, ka: usize, kb: usize, two: bool) {
    let nc = c1 - c0;
    // Whole pairs of panels (a zero panel pads an odd count).
    let panels = nc.div_ceil(32) * 2;
    let chunk = (DX_CHUNK_ELEMS / (panels * 16)).clamp(32, 256) / 32 * 32;
    let prows = chunk / 2;
    SCRATCH.with_borrow_mut(|sc| {
        let Scratch { f, h32, l32, .. } = sc;
        let bh = grow(h32, panels * prows * 16);
        let mut bl = if two { Some(grow(l32, panels * prows * 16)) } else { None };
        for k0 in (ka..kb).step_by(chunk) {
            let k1 = (k0 + chunk).min(kb);
            let kr = k1 - k0;
            // Rows k0..k1, columns c0..c1 of W: one read when the slice spans whole rows.
            let wf: &[f32] = if nc == n {
                w.rows(w0 + k0 * n, kr * n, grow(f, kr * n))
            } else {
                let buf = grow(f, kr * nc);
                for (i, row) in buf.chunks_mut(nc).enumerate() {
                    w.read(w0 + (k0 + i) * n + c0, row);
                }
                buf
            };
            let krp = kr.div_ceil(32) * 32;
            for pr in 0..krp / 2 {
                let (i0, i1) = (2 * pr, 2 * pr + 1);
                if i0 < kr {
                    let r1 = (i1 < kr).then(|| &wf[i1 * nc..(i1 + 1) * nc]);
                    pack_pair_row(bh, bl.as_deref_mut(), &wf[i0 * nc..(i0 + 1) * nc], r1, nc, panels, pr, prows);
                } else {
                    // Past the end of the rows: zero pairs (A is zero there too, but the
                    // scratch holds old values that may be NaN).
                    for q in 0..panels {
                        let o = q * prows * 16 + pr * 16;
                        bh[o..o + 16].fill(0);
                        if let Some(bl) = bl.as_deref_mut() {
                            bl[o..o + 16].fill(0);
                        }
                    }
                }
            }
            tiles_on();
            for mb in (0..a.mp).step_by(32) {
                let a_h = a.h.as_ptr().add(mb * a.kp + k0);
                let a_l = if two { a.l.as_ptr().add(mb * a.kp + k0) } else { std::ptr::null() };
                for q in (0..panels).step_by(2) {
                    let o = q * prows * 16;
                    let b_l = bl.as_deref().map_or(std::ptr::null(), |b| b.as_ptr().add(o));
                    block(
                        acc.as_mut_ptr().add(mb * panels * 16 + q * 16),
                        panels * 64,
                        true,
                        a_h,
                        a_l,
                        2 * a.kp,
                        bh.as_ptr().add(o),
                        b_l,
                        prows * 16,
                        krp / 32,
                    );
                }
            }
            tiles_off();
        }
    });
}
