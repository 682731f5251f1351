//! CPU reference kernels: matrixmultiply for GEMMs (split across the rayon pool), rayon across
//! rows, heads and batches.
//! Every kernel is generic over `T: Float` (f32 for training, f64 for gradient checks).

use rayon::prelude::*;

use super::amx;
use crate::dtype::Float;
use crate::storage::{as_f32, as_f32_mut, Storage};

/// Rows handed to one rayon task in row-wise kernels.
const ROW_GRAIN: usize = 16;
/// Elements converted per tile when a stored (bf16/f16/f32-for-f64) matrix feeds a GEMM: 4 MiB
/// of f32, a whole weight of a small model, a slice of a large one or of an LM head. Smaller
/// tiles make the GEMMs skinny (2048³ with bf16 B: 30 GFLOP/s at 256 Ki elements per tile).
const TILE_ELEMS: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------------------------

/// Elements above which [`zeros`] fills in parallel.
const PAR_ZERO_MIN: usize = 1 << 18;

/// A zeroed buffer of `n` elements. Large buffers are filled by the rayon pool: the allocator
/// reuses freed memory (src/memory.rs), so calloc's zeroing is a memset, which on the thread that
/// drives the graph would leave the other cores idle.
pub fn zeros<T: Float>(n: usize) -> Vec<T> {
    if n < PAR_ZERO_MIN {
        return vec![T::ZERO; n];
    }
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(PAR_ZERO_MIN / 4).for_each(|c| c.fill(std::mem::MaybeUninit::new(T::ZERO)));
    // SAFETY: the first n elements were all written just above.
    unsafe { v.set_len(n) };
    v
}

/// C[m×n] = alpha·op(A)·op(B) + beta·C, with op(A) = A [m×k] or Aᵀ (A stored [k×m]) when `ta`,
/// op(B) = B [k×n] or Bᵀ (B stored [n×k]) when `tb`. With beta = 0, C is not read.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Float>(c: &mut [T], a: &[T], b: &[T], m: usize, k: usize, n: usize, ta: bool, tb: bool, alpha: T, beta: T) {
    gemm_ld(c, n, a, b, m, k, n, ta, tb, alpha, beta)
}

/// As [`gemm`](fn@gemm), but C has row stride `ldc` (to write a column block of a wider matrix).
#[allow(clippy::too_many_arguments)]
pub fn gemm_ld<T: Float>(c: &mut [T], ldc: usize, a: &[T], b: &[T], m: usize, k: usize, n: usize, ta: bool, tb: bool, alpha: T, beta: T) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n);
    debug_assert!(m == 0 || c.len() >= (m - 1) * ldc + n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            c[i * ldc..i * ldc + n].iter_mut().for_each(|x| *x = if beta == T::ZERO { T::ZERO } else { *x * beta });
        }
        return;
    }
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the slices cover the strided extents (asserted above); C does not alias A or B
    // because it is borrowed mutably.
    unsafe { gemm_par(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), ldc as isize) }
}

/// Multiply-adds below which a GEMM runs on the calling thread (splitting costs a task handoff).
const PAR_GEMM_MIN: usize = 1 << 19;
/// Split points are multiples of this (the microkernel's register tile), so each part keeps
/// whole tiles.
const PAR_GEMM_ALIGN: usize = 16;

/// A raw pointer that may cross to a rayon task (each task writes a disjoint part of C).
#[derive(Clone, Copy)]
struct RawPtr<T>(*mut T);
// SAFETY: only used to hand disjoint C blocks (and shared read-only A/B) to rayon tasks.
unsafe impl<T> Send for RawPtr<T> {}
unsafe impl<T> Sync for RawPtr<T> {}

/// C[m×n] (row stride ldc) = alpha·A·B + beta·C on the rayon pool: the longer of C's two sides is
/// cut into one part per thread and each part is a single-threaded matrixmultiply call. One pool
/// does all the step's parallel work; a second pool for GEMMs (matrixmultiply's own threads)
/// would leave idle workers of one spinning on the cores the other computes on.
///
/// # Safety
/// As [`Float::gemm_raw`](crate::Float::gemm_raw), with C's column stride 1.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_par<T: Float>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    beta: T,
    c: *mut T,
    ldc: isize,
) {
    let threads = rayon::current_num_threads();
    let long = m.max(n);
    let parts = threads.min(long / PAR_GEMM_ALIGN);
    if parts <= 1 || m * n * k < PAR_GEMM_MIN {
        return T::gemm_raw(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, ldc, 1);
    }
    let per = long.div_ceil(parts).div_ceil(PAR_GEMM_ALIGN) * PAR_GEMM_ALIGN;
    let (ap, bp, cp) = (RawPtr(a as *mut T), RawPtr(b as *mut T), RawPtr(c));
    (0..long.div_ceil(per)).into_par_iter().for_each(move |i| {
        let (lo, hi) = (i * per, ((i + 1) * per).min(long));
        let (ap, bp, cp) = (ap, bp, cp);
        // SAFETY: part i covers rows (or columns) lo..hi of C, disjoint from every other part;
        // A's rows lo..hi (or B's columns lo..hi) lie inside the caller's extents.
        unsafe {
            if m >= n {
                T::gemm_raw(hi - lo, k, n, alpha, ap.0.offset(lo as isize * rsa), rsa, csa, bp.0, rsb, csb, beta, cp.0.offset(lo as isize * ldc), ldc, 1)
            } else {
                T::gemm_raw(m, k, hi - lo, alpha, ap.0, rsa, csa, bp.0.offset(lo as isize * csb), rsb, csb, beta, cp.0.add(lo), ldc, 1)
            }
        }
    });
}

/// C[m×n] = op(A)·op(B) + beta·C where B is a stored matrix of any dtype beginning at element
/// `b_start` of `b` (stored [k×n], or [n×k] when `tb`). Used in place when B is already `[T]`;
/// otherwise converted per row-tile of the stored matrix, so no full converted copy exists.
#[allow(clippy::too_many_arguments)]
pub fn gemm_stored<T: Float>(c: &mut [T], a: &[T], b: &Storage, b_start: usize, m: usize, k: usize, n: usize, ta: bool, tb: bool, beta: T) {
    if let Some(bs) = b.slice::<T>() {
        return gemm(c, a, &bs[b_start..b_start + k * n], m, k, n, ta, tb, T::ONE, beta);
    }
    gemm_tiled(c, a, b, b_start, m, k, n, ta, tb, beta, TILE_ELEMS)
}

/// As [`gemm_stored`] for a product whose right operand is a frozen weight: at the process's
/// matmul precision (`amx`) when that is below `highest`, AMX is usable, T is f32 and A is not
/// transposed; exactly [`gemm_stored`] otherwise.
#[allow(clippy::too_many_arguments)]
pub fn gemm_frozen<T: Float>(c: &mut [T], a: &[T], b: &Storage, b_start: usize, m: usize, k: usize, n: usize, ta: bool, tb: bool, beta: T) {
    if !ta && amx_product(c, a, amx::Src::Stored(b), b_start, m, k, n, tb, beta) {
        return;
    }
    gemm_stored(c, a, b, b_start, m, k, n, ta, tb, beta)
}

/// [`gemm_frozen`] with the frozen matrix as values in place (an LM-head tile).
#[allow(clippy::too_many_arguments)]
fn gemm_frozen_slice<T: Float>(c: &mut [T], a: &[T], b: &[T], m: usize, k: usize, n: usize, tb: bool, beta: T) {
    if let Some(b32) = as_f32(b) {
        if amx_product(c, a, amx::Src::F32(b32), 0, m, k, n, tb, beta) {
            return;
        }
    }
    gemm(c, a, b, m, k, n, false, tb, T::ONE, beta)
}

/// C = A·op(W) + beta·C on AMX tiles when [`amx::wanted`] and T is f32; false (nothing done)
/// otherwise.
#[allow(clippy::too_many_arguments)]
fn amx_product<T: Float>(c: &mut [T], a: &[T], w: amx::Src<'_>, w0: usize, m: usize, k: usize, n: usize, tb: bool, beta: T) -> bool {
    let Some(p) = amx::wanted(m) else { return false };
    let (Some(c32), Some(a32)) = (as_f32_mut(c), as_f32(a)) else { return false };
    let beta = beta.to_f64() as f32;
    // SAFETY: `wanted` returns a precision only where `amx::available()`.
    unsafe {
        if tb {
            amx::gemm_abt(c32, a32, w, w0, m, k, n, beta, p)
        } else {
            amx::gemm_ab(c32, a32, w, w0, m, k, n, beta, p)
        }
    }
    true
}

/// The converting path of [`gemm_stored`], with the tile size as a parameter (tests use tiny
/// tiles to exercise the tile seams).
#[allow(clippy::too_many_arguments)]
fn gemm_tiled<T: Float>(c: &mut [T], a: &[T], b: &Storage, b_start: usize, m: usize, k: usize, n: usize, ta: bool, tb: bool, beta: T, tile_elems: usize) {
    // The stored matrix has `rows` rows of `cols` elements.
    let (rows, cols) = if tb { (n, k) } else { (k, n) };
    let tile_rows = (tile_elems / cols.max(1)).clamp(1, rows.max(1));
    let mut tile = zeros::<T>(tile_rows * cols);
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + tile_rows).min(rows);
        let nr = r1 - r0;
        let t = &mut tile[..nr * cols];
        // Convert the tile's rows in parallel (the conversion is memory-bound and serial otherwise).
        t.par_chunks_mut(cols).enumerate().with_min_len(8).for_each(|(i, row)| b.read_into(b_start + (r0 + i) * cols, row));
        if tb {
            // Columns r0..r1 of C: C[:, r0..r1] = op(A) · tileᵀ.
            gemm_ld(&mut c[r0..], n, a, t, m, k, nr, ta, true, T::ONE, beta);
        } else {
            // Rows r0..r1 of B are the k-slice r0..r1: C += op(A)[:, r0..r1] · tile.
            let beta = if r0 == 0 { beta } else { T::ONE };
            if ta {
                // op(A) = Aᵀ with A stored [k×m]: the k-slice is rows r0..r1 of A.
                gemm(c, &a[r0 * m..r1 * m], t, m, nr, n, true, false, T::ONE, beta);
            } else {
                gemm_cols(c, a, k, r0, r1, t, m, n, beta);
            }
        }
        r0 = r1;
    }
}

/// C[m×n] = A[:, k0..k1] · Bt[(k1−k0)×n] + beta·C, A stored [m×lda].
#[allow(clippy::too_many_arguments)]
fn gemm_cols<T: Float>(c: &mut [T], a: &[T], lda: usize, k0: usize, k1: usize, bt: &[T], m: usize, n: usize, beta: T) {
    let kk = k1 - k0;
    // SAFETY: A[:, k0..k1] with row stride lda lies within `a` (m rows of lda elements).
    unsafe { gemm_par(m, kk, n, T::ONE, a[k0..].as_ptr(), lda as isize, 1, bt.as_ptr(), n as isize, 1, beta, c.as_mut_ptr(), n as isize) }
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

/// Elements per rayon task in elementwise kernels.
const ELEM_GRAIN: usize = 1 << 14;

/// y = f(a, b) elementwise, b broadcast over leading dims (b.len() divides a.len()).
fn zip_broadcast<T: Float>(y: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) {
    let nb = b.len();
    if nb == a.len() {
        y.par_chunks_mut(ELEM_GRAIN).zip(a.par_chunks(ELEM_GRAIN).zip(b.par_chunks(ELEM_GRAIN))).for_each(|(y, (a, b))| {
            y.iter_mut().zip(a).zip(b).for_each(|((y, a), b)| *y = f(*a, *b));
        });
    } else {
        y.par_chunks_mut(nb).zip(a.par_chunks(nb)).for_each(|(y, a)| y.iter_mut().zip(a).zip(b).for_each(|((y, a), b)| *y = f(*a, *b)));
    }
}

/// y = a + b, b broadcast over leading dims (b.len() divides a.len()).
pub fn add_fwd<T: Float>(y: &mut [T], a: &[T], b: &[T]) {
    zip_broadcast(y, a, b, |a, b| a + b)
}

/// y = a ⊙ b, b broadcast over leading dims.
pub fn mul_fwd<T: Float>(y: &mut [T], a: &[T], b: &[T]) {
    zip_broadcast(y, a, b, |a, b| a * b)
}

/// db = Σ_leading dy (the broadcast operand's gradient), db.len() divides dy.len().
pub fn sum_leading<T: Float>(db: &mut [T], dy: &[T]) {
    db.iter_mut().for_each(|x| *x = T::ZERO);
    for row in dy.chunks(db.len()) {
        db.iter_mut().zip(row).for_each(|(d, g)| *d += *g);
    }
}

/// db = Σ_leading dy ⊙ a (gradient of a broadcast multiplier).
pub fn sum_leading_mul<T: Float>(db: &mut [T], dy: &[T], a: &[T]) {
    let n = db.len();
    db.iter_mut().for_each(|x| *x = T::ZERO);
    for (g, a) in dy.chunks(n).zip(a.chunks(n)) {
        db.iter_mut().zip(g).zip(a).for_each(|((d, g), a)| *d += *g * *a);
    }
}

/// y = s·x.
pub fn scale<T: Float>(y: &mut [T], x: &[T], s: T) {
    y.par_iter_mut().zip(x.par_iter()).for_each(|(y, x)| *y = *x * s);
}

/// y = silu(x) = x·σ(x).
pub fn silu_fwd<T: Float>(y: &mut [T], x: &[T]) {
    y.par_chunks_mut(ELEM_GRAIN).zip(x.par_chunks(ELEM_GRAIN)).for_each(|(y, x)| T::silu(y, x));
}

/// dx = dy · σ(x)·(1 + x·(1 − σ(x))).
pub fn silu_bwd<T: Float>(dx: &mut [T], dy: &[T], x: &[T]) {
    dx.par_chunks_mut(ELEM_GRAIN).zip(dy.par_chunks(ELEM_GRAIN).zip(x.par_chunks(ELEM_GRAIN))).for_each(|(dx, (dy, x))| T::silu_grad(dx, dy, x));
}

/// y = silu(g) ⊙ u (the SwiGLU gate of a Llama MLP).
pub fn swiglu_fwd<T: Float>(y: &mut [T], g: &[T], u: &[T]) {
    y.par_chunks_mut(ELEM_GRAIN).zip(g.par_chunks(ELEM_GRAIN).zip(u.par_chunks(ELEM_GRAIN))).for_each(|(y, (g, u))| T::swiglu(y, g, u));
}

/// dg = dy ⊙ u ⊙ silu'(g), du = dy ⊙ silu(g), silu'(g) = σ(g)(1 + g(1 − σ(g))).
pub fn swiglu_bwd<T: Float>(dg: &mut [T], du: &mut [T], dy: &[T], g: &[T], u: &[T]) {
    let c = ELEM_GRAIN;
    dg.par_chunks_mut(c)
        .zip(du.par_chunks_mut(c))
        .zip(dy.par_chunks(c).zip(g.par_chunks(c).zip(u.par_chunks(c))))
        .for_each(|((dg, du), (dy, (g, u)))| T::swiglu_grad(dg, du, dy, g, u));
}

/// tanh in T, computed in f64 and rounded (the [`Float`] trait has no tanh).
#[inline]
pub fn tanh<T: Float>(x: T) -> T {
    T::from_f64(x.to_f64().tanh())
}

/// √(2/π), the slope of gelu_tanh's inner polynomial.
const GELU_C: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of gelu_tanh's inner polynomial.
const GELU_A: f64 = 0.044_715;

/// gelu_tanh(x) = ½x(1 + τ), τ = tanh(c(x + a·x³)).
#[inline]
fn gelu_tanh<T: Float>(x: T) -> T {
    let (c, a, h) = (T::from_f64(GELU_C), T::from_f64(GELU_A), T::from_f64(0.5));
    h * x * (T::ONE + tanh(c * (x + a * x * x * x)))
}

/// gelu_tanh'(x) = ½(1 + τ) + ½x(1 − τ²)·c(1 + 3a·x²).
#[inline]
fn gelu_tanh_grad<T: Float>(x: T) -> T {
    let (c, a, h) = (T::from_f64(GELU_C), T::from_f64(GELU_A), T::from_f64(0.5));
    let th = tanh(c * (x + a * x * x * x));
    h * (T::ONE + th) + h * x * (T::ONE - th * th) * c * (T::ONE + T::from_f64(3.0) * a * x * x)
}

/// y = gelu_tanh(x) (see [`gelu_tanh_bwd`] for the derivative).
pub fn gelu_tanh_fwd<T: Float>(y: &mut [T], x: &[T]) {
    y.par_chunks_mut(ELEM_GRAIN).zip(x.par_chunks(ELEM_GRAIN)).for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y = gelu_tanh(*x)));
}

/// dx = dy·gelu_tanh'(x), gelu_tanh'(x) = ½(1 + τ) + ½x(1 − τ²)·c(1 + 3a·x²).
pub fn gelu_tanh_bwd<T: Float>(dx: &mut [T], dy: &[T], x: &[T]) {
    dx.par_chunks_mut(ELEM_GRAIN)
        .zip(dy.par_chunks(ELEM_GRAIN).zip(x.par_chunks(ELEM_GRAIN)))
        .for_each(|(dx, (dy, x))| dx.iter_mut().zip(dy).zip(x).for_each(|((dx, dy), x)| *dx = *dy * gelu_tanh_grad(*x)));
}

/// y = gelu_tanh(g) ⊙ u (GeGLU).
pub fn geglu_fwd<T: Float>(y: &mut [T], g: &[T], u: &[T]) {
    y.par_chunks_mut(ELEM_GRAIN)
        .zip(g.par_chunks(ELEM_GRAIN).zip(u.par_chunks(ELEM_GRAIN)))
        .for_each(|(y, (g, u))| y.iter_mut().zip(g).zip(u).for_each(|((y, g), u)| *y = gelu_tanh(*g) * *u));
}

/// dg = dy ⊙ u ⊙ gelu_tanh'(g), du = dy ⊙ gelu_tanh(g).
pub fn geglu_bwd<T: Float>(dg: &mut [T], du: &mut [T], dy: &[T], g: &[T], u: &[T]) {
    let c = ELEM_GRAIN;
    dg.par_chunks_mut(c).zip(du.par_chunks_mut(c)).zip(dy.par_chunks(c).zip(g.par_chunks(c).zip(u.par_chunks(c)))).for_each(|((dg, du), (dy, (g, u)))| {
        for i in 0..dy.len() {
            dg[i] = dy[i] * u[i] * gelu_tanh_grad(g[i]);
            du[i] = dy[i] * gelu_tanh(g[i]);
        }
    });
}

/// Strided column copy: `dst[r·dst_ld + dst_off + c] = src[r·src_ld + src_off + c]` for r < rows,
/// c < cols (the rest of dst untouched).
#[allow(clippy::too_many_arguments)]
pub fn copy_cols<T: Float>(dst: &mut [T], dst_ld: usize, dst_off: usize, src: &[T], src_ld: usize, src_off: usize, rows: usize, cols: usize) {
    debug_assert!(rows == 0 || (dst.len() >= (rows - 1) * dst_ld + dst_off + cols && src.len() >= (rows - 1) * src_ld + src_off + cols));
    dst.par_chunks_mut(dst_ld).zip(src.par_chunks(src_ld)).take(rows).with_min_len(ROW_GRAIN).for_each(|(d, s)| {
        d[dst_off..dst_off + cols].copy_from_slice(&s[src_off..src_off + cols]);
    });
}

/// y = c·tanh(x/c).
pub fn softcap_fwd<T: Float>(y: &mut [T], x: &[T], c: f64) {
    let c = T::from_f64(c);
    y.par_chunks_mut(ELEM_GRAIN).zip(x.par_chunks(ELEM_GRAIN)).for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, x)| *y = c * tanh(*x / c)));
}

/// dx = dy·(1 − (y/c)²), y = c·tanh(x/c) the forward's output (d/dx c·tanh(x/c) = 1 − tanh²(x/c)).
pub fn softcap_bwd<T: Float>(dx: &mut [T], dy: &[T], y: &[T], c: f64) {
    let c = T::from_f64(c);
    dx.par_chunks_mut(ELEM_GRAIN).zip(dy.par_chunks(ELEM_GRAIN).zip(y.par_chunks(ELEM_GRAIN))).for_each(|(dx, (dy, y))| {
        dx.iter_mut().zip(dy).zip(y).for_each(|((dx, dy), y)| {
            let t = *y / c;
            *dx = *dy * (T::ONE - t * t);
        })
    });
}

/// [`swiglu_bwd`] with dg written over dy: `dy_dg` holds dy on entry and dg on return (each
/// chunk of dy is copied aside first, so the arithmetic is exactly `swiglu_bwd`'s).
pub fn swiglu_bwd_in_place<T: Float>(dy_dg: &mut [T], du: &mut [T], g: &[T], u: &[T]) {
    let c = ELEM_GRAIN;
    dy_dg.par_chunks_mut(c).zip(du.par_chunks_mut(c)).zip(g.par_chunks(c).zip(u.par_chunks(c))).for_each_init(Vec::new, |dy, ((dg, du), (g, u))| {
        dy.clear();
        dy.extend_from_slice(dg);
        T::swiglu_grad(dg, du, dy, g, u)
    });
}

/// [`geglu_bwd`] with dg written over dy, as [`swiglu_bwd_in_place`] does for SwiGLU (each chunk
/// of dy copied aside first, so the arithmetic is exactly `geglu_bwd`'s).
pub fn geglu_bwd_in_place<T: Float>(dy_dg: &mut [T], du: &mut [T], g: &[T], u: &[T]) {
    let c = ELEM_GRAIN;
    dy_dg.par_chunks_mut(c).zip(du.par_chunks_mut(c)).zip(g.par_chunks(c).zip(u.par_chunks(c))).for_each_init(Vec::new, |dy, ((dg, du), (g, u))| {
        dy.clear();
        dy.extend_from_slice(dg);
        geglu_bwd(dg, du, dy, g, u)
    });
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

/// y = x·r ⊙ w per row, r = 1/√(mean(x²) + eps); saves r per row. x, y: `[rows, c]`; w: `[c]`.
pub fn rms_norm_fwd<T: Float>(y: &mut [T], rstd: &mut [T], x: &[T], w: &[T], c: usize, eps: T) {
    y.par_chunks_mut(c).zip(rstd.par_iter_mut()).zip(x.par_chunks(c)).with_min_len(ROW_GRAIN).for_each(|((y, r), x)| {
        let ms = x.iter().map(|v| *v * *v).sum::<T>() / T::from_f64(c as f64);
        *r = T::ONE / (ms + eps).sqrt();
        y.iter_mut().zip(x).zip(w).for_each(|((y, x), w)| *y = *x * *r * *w);
    });
}

/// With x̂ = x·r and g = dy ⊙ w:  dx = r·(g − x̂·mean(g ⊙ x̂));  dw = Σ_rows dy ⊙ x̂ (if wanted).
pub fn rms_norm_bwd<T: Float>(dx: Option<&mut [T]>, dw: Option<&mut [T]>, dy: &[T], x: &[T], w: &[T], rstd: &[T], c: usize) {
    if let Some(dx) = dx {
        dx.par_chunks_mut(c).zip(dy.par_chunks(c).zip(x.par_chunks(c))).zip(rstd.par_iter()).with_min_len(ROW_GRAIN).for_each(|((dx, (dy, x)), r)| {
            let dot = dy.iter().zip(x).zip(w).map(|((g, x), w)| *g * *w * *x * *r).sum::<T>() / T::from_f64(c as f64);
            dx.iter_mut().zip(dy.iter().zip(x)).zip(w).for_each(|((dx, (g, x)), w)| *dx = *r * (*g * *w - *x * *r * dot));
        });
    }
    if let Some(dw) = dw {
        dw.iter_mut().for_each(|v| *v = T::ZERO);
        for ((dy, x), r) in dy.chunks(c).zip(x.chunks(c)).zip(rstd) {
            dw.iter_mut().zip(dy.iter().zip(x)).for_each(|(dw, (g, x))| *dw += *g * *x * *r);
        }
    }
}

/// [`rms_norm_bwd`]'s dx from the output y = x̂ ⊙ w instead of x (w with no zero entry):
///   dx = r·(dy ⊙ w − (y / w)·mean(dy ⊙ y)).
pub fn rms_norm_bwd_from_y<T: Float>(dx: &mut [T], dy: &[T], y: &[T], w: &[T], rstd: &[T], c: usize) {
    let inv_c = T::ONE / T::from_f64(c as f64);
    dx.par_chunks_mut(c).zip(dy.par_chunks(c).zip(y.par_chunks(c))).zip(rstd.par_iter()).with_min_len(ROW_GRAIN).for_each(|((dx, (dy, y)), r)| {
        let mean = dy.iter().zip(y).map(|(g, y)| *g * *y).sum::<T>() * inv_c;
        dx.iter_mut().zip(dy.iter().zip(y)).zip(w).for_each(|((dx, (g, y)), w)| *dx = *r * (*g * *w - (*y / *w) * mean));
    });
}

// ---------------------------------------------------------------------------------------------
// RoPE (HF rotate-half layout)
// ---------------------------------------------------------------------------------------------

/// Rotary embedding on x [b, t, h, hd] over the first rot = 2·half dims of each head (half =
/// `inv_freq.len()`, rot ≤ hd), angle θ = pos·`inv_freq[i]`, cos and sin scaled by s = `scale`:
///   `y[i] = s·(x[i]·cos θ − x[i+half]·sin θ)`,   `y[i+half] = s·(x[i+half]·cos θ + x[i]·sin θ)`,
///   `y[j] = x[j]` for rot ≤ j < hd (partial rotary).
/// `pos` holds one position per (b, t) row. With `inverse`, applies s·R(−θ): that is the
/// backward (the adjoint of s·R(θ) is s·R(θ)ᵀ = s·R(−θ)), dx = s·R(−θ)·dy.
#[allow(clippy::too_many_arguments)]
pub fn rope<T: Float>(y: &mut [T], x: &[T], pos: &[usize], inv_freq: &[f64], h: usize, hd: usize, scale: f64, inverse: bool) {
    let half = inv_freq.len();
    let rot = 2 * half;
    debug_assert!(rot <= hd);
    let row = h * hd;
    let npos = pos.iter().copied().max().map_or(0, |p| p + 1);
    // Positions up to 64 Ki share one cached table; beyond that each row computes its own.
    let table = (npos <= 1 << 16).then(|| rope_table(inv_freq, npos));
    y.par_chunks_mut(row).zip(x.par_chunks(row)).zip(pos.par_iter()).with_min_len(ROW_GRAIN).for_each(|((y, x), &p)| {
        // (sin θ, cos θ) of this position, θ = p·inv_freq[i].
        let own: Vec<(f64, f64)>;
        let sc = match &table {
            Some(t) => &t[p * half..(p + 1) * half],
            None => {
                own = inv_freq.iter().map(|f| (p as f64 * f).sin_cos()).collect();
                &own
            }
        };
        // s·sin, s·cos rounded once to T (s = 1 leaves them exactly as the unscaled table).
        let sc: Vec<(T, T)> = sc.iter().map(|&(sn, c)| (T::from_f64(scale * if inverse { -sn } else { sn }), T::from_f64(scale * c))).collect();
        for (y, x) in y.chunks_mut(hd).zip(x.chunks(hd)) {
            let (xr, xp) = x.split_at(rot);
            let (yr, yp) = y.split_at_mut(rot);
            let (x1, x2) = xr.split_at(half);
            let (y1, y2) = yr.split_at_mut(half);
            for i in 0..half {
                let (s, c) = sc[i];
                let (a, b) = (x1[i], x2[i]);
                y1[i] = a * c - b * s;
                y2[i] = b * c + a * s;
            }
            yp.copy_from_slice(xp);
        }
    });
}

/// The (sin, cos) table of positions 0..npos for `inv_freq` ([npos × half], f64), cached per
/// thread: every rope call of a training step (2 per layer, forward and backward) shares it.
fn rope_table(inv_freq: &[f64], npos: usize) -> std::sync::Arc<Vec<(f64, f64)>> {
    use std::cell::RefCell;
    use std::sync::Arc;
    type Cached = (Vec<f64>, usize, Arc<Vec<(f64, f64)>>);
    thread_local! {
        static CACHE: RefCell<Option<Cached>> = const { RefCell::new(None) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((f, n, t)) = c.as_ref() {
            if f.as_slice() == inv_freq && *n >= npos {
                return t.clone();
            }
        }
        let t: Arc<Vec<(f64, f64)>> = Arc::new((0..npos).flat_map(|p| inv_freq.iter().map(move |f| (p as f64 * f).sin_cos())).collect());
        *c = Some((inv_freq.to_vec(), npos, t.clone()));
        t
    })
}

// ---------------------------------------------------------------------------------------------
// Attention: causal SDPA with grouped KV heads, key padding mask, logsumexp saved
// ---------------------------------------------------------------------------------------------

/// Dimensions of one attention call. q: [b, t, nh, hd]; k, v: [b, s, nkv, hd]; nh = nkv·group.
/// With `causal`, query i (absolute position p = s − t + i) sees keys j ≤ p; with a sliding
/// `window` w (causal only) also only keys with p − j < w, i.e. j ≥ p + 1 − w. With a soft cap
/// c, a score z = scale·q·k becomes c·tanh(z/c) before the masks and the softmax.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub causal: bool,
    pub scale: f64,
    pub softcap: Option<f64>,
    /// Sliding window w ≥ 1 (needs `causal`): query at p sees keys j with p − j < w.
    pub window: Option<usize>,
}

impl AttnDims {
    /// The first key query `i` may see (before the padding mask): p + 1 − w under a sliding
    /// window w (p = s − t + i), else 0. Keys `first(i)..visible(i)` are the visible band.
    #[inline]
    pub(crate) fn first(&self, i: usize) -> usize {
        match self.window {
            Some(w) => (self.s - self.t + i + 1).saturating_sub(w),
            None => 0,
        }
    }
    /// Number of keys query `i` may see (before the padding mask).
    #[inline]
    pub(crate) fn visible(&self, i: usize) -> usize {
        if self.causal {
            (self.s - self.t + i + 1).min(self.s)
        } else {
            self.s
        }
    }
}

#[inline]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).map(|(x, y)| *x * *y).sum()
}

/// o = softmax(scale·q·kᵀ + mask)·v per head; lse [b, t, nh] = logsumexp of the masked scores
/// (−∞ and o = 0 for a query that sees no key). `mask` [b, s]: true = key is real. Query i
/// reads keys `d.first(i)..d.visible(i)` (causal band, sliding window).
pub fn attention_fwd<T: Float>(o: &mut [T], lse: &mut [T], q: &[T], k: &[T], v: &[T], mask: Option<&[bool]>, d: AttnDims) {
    let AttnDims { t, s, nh, nkv, hd, .. } = d;
    let group = nh / nkv;
    let scale = T::from_f64(d.scale);
    o.par_chunks_mut(nh * hd).zip(lse.par_chunks_mut(nh)).enumerate().for_each(|(row, (o, lse))| {
        let (bi, i) = (row / t, row % t);
        let (lo, vis) = (d.first(i), d.visible(i));
        let mut p = zeros::<T>(s);
        for h in 0..nh {
            let kh = h / group;
            let qv = &q[(row * nh + h) * hd..][..hd];
            let mut m = T::NEG_INFINITY;
            for (j, pj) in p.iter_mut().enumerate().take(vis).skip(lo) {
                if mask.is_some_and(|mk| !mk[bi * s + j]) {
                    *pj = T::NEG_INFINITY;
                    continue;
                }
                let kv = &k[((bi * s + j) * nkv + kh) * hd..][..hd];
                *pj = scale * dot(qv, kv);
                if let Some(c) = d.softcap {
                    let c = T::from_f64(c);
                    *pj = c * tanh(*pj / c);
                }
                m = m.max(*pj);
            }
            let oh = &mut o[h * hd..(h + 1) * hd];
            oh.iter_mut().for_each(|x| *x = T::ZERO);
            if m == T::NEG_INFINITY {
                lse[h] = T::NEG_INFINITY;
                continue;
            }
            let mut l = T::ZERO;
            for (j, pj) in p.iter_mut().enumerate().take(vis).skip(lo) {
                if *pj == T::NEG_INFINITY {
                    continue;
                }
                let e = (*pj - m).exp();
                l += e;
                let vv = &v[((bi * s + j) * nkv + kh) * hd..][..hd];
                oh.iter_mut().zip(vv).for_each(|(o, v)| *o += e * *v);
            }
            oh.iter_mut().for_each(|x| *x /= l);
            lse[h] = m + l.ln();
        }
    });
}

/// Backward of [`attention_fwd`], recomputing P = exp(S − lse) instead of storing it:
///   D_i = dO_i·O_i;  dV_j = Σ_i P_ij dO_i;  dS_ij = P_ij (dO_i·v_j − D_i) (times
///   1 − tanh²(z_ij/c) under a soft cap c, z = scale·q·k);
///   dQ_i = scale Σ_j dS_ij k_j;  dK_j = scale Σ_i dS_ij q_i.
/// Parallel over (batch, kv head): each task owns its kv head's dK/dV and its query heads' dQ.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    mask: Option<&[bool]>,
    d: AttnDims,
) {
    let AttnDims { b, t, s, nh, nkv, hd, .. } = d;
    let group = nh / nkv;
    let scale = T::from_f64(d.scale);
    // Each task returns (dq for its heads [t, group, hd], dk [s, hd], dv [s, hd]).
    let parts: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..b * nkv)
        .into_par_iter()
        .map(|task| {
            let (bi, kh) = (task / nkv, task % nkv);
            let mut ldq = zeros::<T>(t * group * hd);
            let mut ldk = zeros::<T>(s * hd);
            let mut ldv = zeros::<T>(s * hd);
            for gi in 0..group {
                let h = kh * group + gi;
                for i in 0..t {
                    let row = bi * t + i;
                    let l = lse[row * nh + h];
                    if l == T::NEG_INFINITY {
                        continue;
                    }
                    let qv = &q[(row * nh + h) * hd..][..hd];
                    let dov = &dout[(row * nh + h) * hd..][..hd];
                    let ov = &o[(row * nh + h) * hd..][..hd];
                    let di = dot(dov, ov);
                    let dqi = &mut ldq[(i * group + gi) * hd..][..hd];
                    for j in d.first(i)..d.visible(i) {
                        if mask.is_some_and(|mk| !mk[bi * s + j]) {
                            continue;
                        }
                        let kv = &k[((bi * s + j) * nkv + kh) * hd..][..hd];
                        let vv = &v[((bi * s + j) * nkv + kh) * hd..][..hd];
                        // z = scale·q·k; under a soft cap S = c·tanh(z/c) and dS/dz = 1 − tanh²(z/c).
                        let z = scale * dot(qv, kv);
                        let (sc, dz) = match d.softcap {
                            Some(c) => {
                                let c = T::from_f64(c);
                                let th = tanh(z / c);
                                (c * th, T::ONE - th * th)
                            }
                            None => (z, T::ONE),
                        };
                        let p = (sc - l).exp();
                        ldv[j * hd..(j + 1) * hd].iter_mut().zip(dov).for_each(|(x, g)| *x += p * *g);
                        let ds = p * (dot(dov, vv) - di) * dz * scale;
                        dqi.iter_mut().zip(kv).for_each(|(x, kk)| *x += ds * *kk);
                        ldk[j * hd..(j + 1) * hd].iter_mut().zip(qv).for_each(|(x, qq)| *x += ds * *qq);
                    }
                }
            }
            (ldq, ldk, ldv)
        })
        .collect();
    for (task, (ldq, ldk, ldv)) in parts.into_iter().enumerate() {
        let (bi, kh) = (task / nkv, task % nkv);
        for i in 0..t {
            for gi in 0..group {
                let h = kh * group + gi;
                dq[((bi * t + i) * nh + h) * hd..][..hd].copy_from_slice(&ldq[(i * group + gi) * hd..][..hd]);
            }
        }
        for j in 0..s {
            dk[((bi * s + j) * nkv + kh) * hd..][..hd].copy_from_slice(&ldk[j * hd..][..hd]);
            dv[((bi * s + j) * nkv + kh) * hd..][..hd].copy_from_slice(&ldv[j * hd..][..hd]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax cross-entropy
// ---------------------------------------------------------------------------------------------

/// Per row r of logits [rows, vocab]: lse_r = log Σ_j exp(x_rj); loss_r = lse_r − x_r,target
/// (0 where the target is ignored). Returns Σ_r loss_r.
pub fn cross_entropy_fwd<T: Float>(lse: &mut [T], logits: &[T], targets: &[i64], ignore_index: i64, vocab: usize) -> f64 {
    lse.par_iter_mut()
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map_init(Vec::new, |row: &mut Vec<T>, ((l, x), &tg)| {
            let m = T::max_of(x);
            row.clear();
            row.extend_from_slice(x);
            let s = T::exp_sub_sum(row, m);
            *l = m + s.ln();
            if tg == ignore_index {
                0.0
            } else {
                (*l - x[tg as usize]).to_f64()
            }
        })
        .sum()
}

/// dlogits_rj = g·(softmax_rj − [j = target_r]) for counted rows, 0 for ignored ones.
/// Writes in place over `x` (the logits), so a chunked caller needs no second buffer. With a
/// soft cap c, x holds raw logits and the softmax is of z = c·tanh(x/c) (`lse` of z); the
/// gradient then reaches x through dz/dx = 1 − (z/c)²:
///   x_rj ← g·(exp(z_rj − lse_r) − [j = target_r])·(1 − (z_rj/c)²).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_bwd_inplace<T: Float>(x: &mut [T], lse: &[T], targets: &[i64], ignore_index: i64, vocab: usize, g: T, softcap: Option<f64>) {
    x.par_chunks_mut(vocab).zip(lse.par_iter()).zip(targets.par_iter()).for_each(|((x, l), &tg)| {
        if tg == ignore_index {
            x.iter_mut().for_each(|v| *v = T::ZERO);
            return;
        }
        match softcap {
            None => {
                T::scaled_exp_sub(x, *l, g);
                x[tg as usize] -= g;
            }
            Some(c) => {
                let c = T::from_f64(c);
                for (j, v) in x.iter_mut().enumerate() {
                    let th = tanh(*v / c);
                    let onehot = if j == tg as usize { T::ONE } else { T::ZERO };
                    *v = g * ((c * th - *l).exp() - onehot) * (T::ONE - th * th);
                }
            }
        }
    });
}

/// The LM-head loss without storing logits: h [N, d], W [vocab, d] stored in any dtype, N targets.
/// Returns Σ loss over counted rows and writes lse `[N]`.
///
/// Rows are taken `rows_blk` at a time and, within them, the vocabulary `cols` columns at a time:
/// L = h_b·W_cᵀ [rows_blk × cols], and per row an online softmax keeps the running max m, the sum
/// s = Σ exp(l − m) and the target's logit; lse = m + ln s at the end. Every block of W is read
/// (converted, when stored bf16/f16/quantized) once per row block, and both GEMMs have the shapes of
/// a linear layer (M = rows, K = d or cols) instead of a skinny chunk against the whole head.
///
/// With `dh`, also the gradient for dy = 1: dh = g·(softmax − onehot)·W, accumulated as
/// acc += exp(L − m)·W_c with acc rescaled by exp(m_old − m_new) whenever a row's max rises (the
/// output rescaling of flash attention), then dh = g·(acc/s − `W[target]`); rows whose target is
/// `ignore_index` get dh = 0.
///
/// With a soft cap c every logit becomes z = c·tanh(l/c) right after its GEMM (the softmax, lse
/// and target logit are of z), and dh picks up dz/dl = 1 − (z/c)² per logit: acc += (exp(z − m)
/// ⊙ (1 − (z/c)²))·W_c and dh = g·(acc/s − (1 − (z_target/c)²)·`W[target]`).
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy_fwd<T: Float>(
    lse: &mut [T],
    mut dh: Option<&mut [T]>,
    h: &[T],
    w: &Storage,
    targets: &[i64],
    ignore_index: i64,
    d: usize,
    vocab: usize,
    rows_blk: usize,
    cols: usize,
    g: T,
    softcap: Option<f64>,
) -> f64 {
    let rows = lse.len();
    if rows == 0 {
        return 0.0;
    }
    let rb = rows_blk.clamp(1, rows);
    let cb = cols.clamp(1, vocab.max(1));
    let mut logits = zeros::<T>(rb * cb);
    // Under a soft cap with dh: 1 − (z/c)² of the block's logits.
    let mut dz = if softcap.is_some() && dh.is_some() { zeros::<T>(rb * cb) } else { Vec::new() };
    let direct = w.slice::<T>();
    // Whether a block of n rows takes the AMX path (then the stored head is never copied).
    let amx_rows = |n: usize| T::DTYPE == crate::dtype::DType::F32 && amx::wanted(n).is_some();
    let mut wbuf = if direct.is_none() && !amx_rows(rb) { zeros::<T>(cb * d) } else { Vec::new() };
    // Per row of the block: running max, Σ exp(l − max), target logit.
    let mut stats = vec![(T::NEG_INFINITY, T::ZERO, T::ZERO); rb];
    let mut total = 0.0;
    for r0 in (0..rows).step_by(rb) {
        let r1 = (r0 + rb).min(rows);
        let n = r1 - r0;
        let hb = &h[r0 * d..r1 * d];
        let tgs = &targets[r0..r1];
        let st = &mut stats[..n];
        st.fill((T::NEG_INFINITY, T::ZERO, T::ZERO));
        let mut acc = dh.as_deref_mut().map(|dh| &mut dh[r0 * d..r1 * d]);
        if let Some(acc) = acc.as_deref_mut() {
            acc.fill(T::ZERO);
        }
        for c0 in (0..vocab).step_by(cb) {
            let c1 = (c0 + cb).min(vocab);
            let nc = c1 - c0;
            // On AMX tiles, a stored head is read by each GEMM task a row block at a time (in
            // cache) instead of through an f32 copy of the whole tile, which would be tens of
            // MiB written and read twice from memory.
            let wc: Option<&[T]> = match direct {
                Some(ws) => Some(&ws[c0 * d..c1 * d]),
                None if amx_rows(n) => None,
                None => {
                    if wbuf.is_empty() {
                        // A last row block too short for AMX tiles.
                        wbuf = zeros::<T>(cb * d);
                    }
                    let t = &mut wbuf[..nc * d];
                    t.par_chunks_mut(d).enumerate().with_min_len(8).for_each(|(i, row)| w.read_into((c0 + i) * d, row));
                    Some(t)
                }
            };
            let lg = &mut logits[..n * nc];
            match wc {
                Some(wc) => gemm_frozen_slice(lg, hb, wc, n, d, nc, true, T::ZERO),
                None => {
                    let done = amx_product(lg, hb, amx::Src::Stored(w), c0 * d, n, d, nc, true, T::ZERO);
                    debug_assert!(done, "amx_rows promised the AMX path");
                }
            }
            if let Some(c) = softcap {
                // z = c·tanh(l/c), and 1 − (z/c)² when dh is wanted.
                let c = T::from_f64(c);
                if dz.is_empty() {
                    lg.par_chunks_mut(nc).for_each(|x| x.iter_mut().for_each(|v| *v = c * tanh(*v / c)));
                } else {
                    lg.par_chunks_mut(nc).zip(dz[..n * nc].par_chunks_mut(nc)).for_each(|(x, f)| {
                        x.iter_mut().zip(f).for_each(|(v, f)| {
                            let th = tanh(*v / c);
                            *v = c * th;
                            *f = T::ONE - th * th;
                        })
                    });
                }
            }
            // One online-softmax step per row; returns the factor the row's acc must be scaled by.
            let step = |x: &mut [T], (m, s, tl): &mut (T, T, T), tg: i64| -> T {
                if tg != ignore_index && (c0..c1).contains(&(tg as usize)) {
                    *tl = x[tg as usize - c0];
                }
                let cm = T::max_of(x);
                let mn = if cm > *m { cm } else { *m };
                if mn == T::NEG_INFINITY {
                    // Nothing finite yet (only possible with −∞ logits): contributes nothing.
                    x.iter_mut().for_each(|v| *v = T::ZERO);
                    return T::ONE;
                }
                let r = (*m - mn).exp();
                *s = *s * r + T::exp_sub_sum(x, mn);
                *m = mn;
                r
            };
            match acc.as_deref_mut() {
                None => {
                    lg.par_chunks_mut(nc).zip(st.par_iter_mut()).zip(tgs.par_iter()).for_each(|((x, st), &tg)| {
                        step(x, st, tg);
                    });
                }
                Some(acc) => {
                    lg.par_chunks_mut(nc).zip(st.par_iter_mut()).zip(tgs.par_iter()).zip(acc.par_chunks_mut(d)).for_each(|(((x, st), &tg), a)| {
                        let r = step(x, st, tg);
                        if r != T::ONE {
                            a.iter_mut().for_each(|v| *v *= r);
                        }
                    });
                    if !dz.is_empty() {
                        // P ⊙ (1 − (z/c)²): the chain through the cap.
                        lg.par_chunks_mut(nc).zip(dz[..n * nc].par_chunks(nc)).for_each(|(x, f)| x.iter_mut().zip(f).for_each(|(v, f)| *v *= *f));
                    }
                    // acc[n×d] += P[n×nc]·W_c[nc×d] with P = exp(L − m), unnormalized.
                    match wc {
                        Some(wc) => gemm_frozen_slice(acc, lg, wc, n, nc, d, false, T::ONE),
                        None => {
                            let done = amx_product(acc, lg, amx::Src::Stored(w), c0 * d, n, nc, d, false, T::ONE);
                            debug_assert!(done, "amx_rows promised the AMX path");
                        }
                    }
                }
            }
        }
        let finish = |l: &mut T, (m, s, tl): &(T, T, T), tg: i64| -> f64 {
            *l = *m + s.ln();
            if tg == ignore_index {
                0.0
            } else {
                (*l - *tl).to_f64()
            }
        };
        let lb = &mut lse[r0..r1];
        total += match acc {
            None => lb.par_iter_mut().zip(st.par_iter()).zip(tgs.par_iter()).map(|((l, st), &tg)| finish(l, st, tg)).sum::<f64>(),
            Some(acc) => lb
                .par_iter_mut()
                .zip(st.par_iter())
                .zip(tgs.par_iter())
                .zip(acc.par_chunks_mut(d))
                .map_init(
                    || zeros::<T>(d),
                    |wt, (((l, st), &tg), a)| {
                        let loss = finish(l, st, tg);
                        if tg == ignore_index {
                            a.iter_mut().for_each(|v| *v = T::ZERO);
                        } else {
                            // dh = g·(acc/s − W[target]), the target term times 1 − (z_t/c)² under a cap.
                            w.read_into(tg as usize * d, wt);
                            let gs = g / st.1;
                            let gt = match softcap {
                                Some(c) => {
                                    let t = st.2 / T::from_f64(c);
                                    g * (T::ONE - t * t)
                                }
                                None => g,
                            };
                            a.iter_mut().zip(wt.iter()).for_each(|(v, wt)| *v = gs * *v - gt * *wt);
                        }
                        loss
                    },
                )
                .sum::<f64>(),
        };
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------------

/// `y[i, :] = table[ids[i], :]`, table stored in any dtype (converted per row).
pub fn embedding_fwd<T: Float>(y: &mut [T], table: &Storage, ids: &[u32], dim: usize) {
    y.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(y, &id)| table.read_into(id as usize * dim, y));
}

/// `dtable[ids[i], :] += dy[i, :]` (dtable must be zeroed by the caller).
pub fn embedding_bwd<T: Float>(dtable: &mut [T], dy: &[T], ids: &[u32], dim: usize) {
    for (g, &id) in dy.chunks(dim).zip(ids) {
        dtable[id as usize * dim..][..dim].iter_mut().zip(g).for_each(|(d, g)| *d += *g);
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// One AdamW step on a flat parameter (decoupled weight decay, bias-corrected moments):
///   m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;
///   p −= lr·( m/(1−β1^t) / (√(v/(1−β2^t)) + eps) + wd·p ).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step<T: Float>(p: &mut [T], m: &mut [T], v: &mut [T], g: &[T], lr: f64, beta1: f64, beta2: f64, eps: f64, wd: f64, step: u64) {
    let bc1 = 1.0 - beta1.powi(step as i32);
    let bc2 = 1.0 - beta2.powi(step as i32);
    let (b1, b2) = (T::from_f64(beta1), T::from_f64(beta2));
    let (lr_t, eps_t, wd_t) = (T::from_f64(lr), T::from_f64(eps), T::from_f64(wd));
    let (ibc1, ibc2) = (T::from_f64(1.0 / bc1), T::from_f64(1.0 / bc2));
    p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g).for_each(|(((p, m), v), g)| {
        *m = b1 * *m + (T::ONE - b1) * *g;
        *v = b2 * *v + (T::ONE - b2) * *g * *g;
        let upd = (*m * ibc1) / ((*v * ibc2).sqrt() + eps_t);
        *p -= lr_t * (upd + wd_t * *p);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::HostData;

    #[test]
    fn tiled_stored_gemm_matches_plain_gemm_across_tile_seams() {
        let (m, k, n) = (5, 7, 6);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let bv: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let b64: Vec<f64> = bv.iter().map(|&v| v as f64).collect();
        let stored = Storage::Host(HostData::F32(bv));
        for ta in [false, true] {
            for tb in [false, true] {
                for beta in [0.0, 1.0] {
                    for tile in [1, 5, 7, 13, 1000] {
                        let c0: Vec<f64> = (0..m * n).map(|i| i as f64 * 0.01).collect();
                        let mut want = c0.clone();
                        gemm(&mut want, &a, &b64, m, k, n, ta, tb, 1.0, beta);
                        let mut got = c0.clone();
                        gemm_tiled(&mut got, &a, &stored, 0, m, k, n, ta, tb, beta, tile);
                        for (w, g) in want.iter().zip(&got) {
                            assert!((w - g).abs() < 1e-12, "ta={ta} tb={tb} beta={beta} tile={tile}: {w} vs {g}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn zeros_are_zero_on_both_sides_of_the_parallel_threshold() {
        for n in [0, 1, PAR_ZERO_MIN - 1, PAR_ZERO_MIN, PAR_ZERO_MIN + 7, 5 * PAR_ZERO_MIN + 3] {
            // Dirty memory first, so a reused block would show through an unwritten element.
            drop(vec![f32::NAN; n]);
            let z = zeros::<f32>(n);
            assert_eq!(z.len(), n);
            assert!(z.iter().all(|&x| x.to_bits() == 0), "n = {n}");
            assert!(zeros::<f64>(n).iter().all(|&x| x.to_bits() == 0), "n = {n}");
        }
    }

    /// The in-place SwiGLU gradient gives exactly the out-of-place one, across chunk seams.
    #[test]
    fn in_place_swiglu_gradient_is_bitwise_the_out_of_place_one() {
        for n in [1, 5, ELEM_GRAIN - 1, ELEM_GRAIN, 3 * ELEM_GRAIN + 17] {
            let f = |i: usize, a: f32| ((i + 1) as f32 * a).sin() * 3.0;
            let (g, u, dy): (Vec<f32>, Vec<f32>, Vec<f32>) =
                ((0..n).map(|i| f(i, 0.37)).collect(), (0..n).map(|i| f(i, 0.11)).collect(), (0..n).map(|i| f(i, 0.23)).collect());
            let (mut dg, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
            swiglu_bwd(&mut dg, &mut du, &dy, &g, &u);
            let (mut dy_dg, mut du2) = (dy.clone(), vec![0.0f32; n]);
            swiglu_bwd_in_place(&mut dy_dg, &mut du2, &g, &u);
            assert!(dg.iter().zip(&dy_dg).all(|(a, b)| a.to_bits() == b.to_bits()), "dg, n = {n}");
            assert!(du.iter().zip(&du2).all(|(a, b)| a.to_bits() == b.to_bits()), "du, n = {n}");
            assert!(dg.iter().zip(&dy).any(|(a, b)| a != b), "the gradient differs from dy");
        }
    }

    /// The pool-split GEMM against a plain triple loop, on shapes above the split threshold
    /// (tall, wide, with a ragged last part), every transposition, beta ≠ 0 and ldc > n.
    #[test]
    fn split_gemm_matches_a_triple_loop() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for &(m, k, n) in &[(301, 67, 40), (37, 70, 290), (16, 1100, 48), (130, 8, 700)] {
            assert!(m * n * k >= PAR_GEMM_MIN, "{m}x{k}x{n} would not be split");
            for ta in [false, true] {
                for tb in [false, true] {
                    let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
                    let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
                    let ldc = n + 3;
                    let c0: Vec<f64> = (0..m * ldc).map(|i| i as f64 * 1e-3).collect();
                    let (alpha, beta) = (0.5, 2.0);
                    let mut want = c0.clone();
                    for i in 0..m {
                        for j in 0..n {
                            let mut acc = 0.0;
                            for p in 0..k {
                                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                                acc += av * bv;
                            }
                            want[i * ldc + j] = alpha * acc + beta * c0[i * ldc + j];
                        }
                    }
                    let mut got = c0.clone();
                    pool.install(|| gemm_ld(&mut got, ldc, &a, &b, m, k, n, ta, tb, alpha, beta));
                    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                        assert!((w - g).abs() < 1e-9 * (1.0 + w.abs()), "{m}x{k}x{n} ta={ta} tb={tb} at {i}: {w} vs {g}");
                    }
                }
            }
        }
    }
}
