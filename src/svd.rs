//! Singular value decompositions on the CPU: the thin SVD of a small dense matrix (faer), and a
//! randomized block-power truncated SVD for the top-k triplets of a large frozen weight, which
//! reads the weight only through tiled GEMMs (so mapped bf16/quantized weights are never
//! converted whole).
//!
//! Randomized range finder (Halko, Martinsson & Tropp): with l = k + oversampling,
//!   Y = W·Ω (Ω [n, l] Gaussian), Q = orth(Y); repeat q times: Q = orth(W·orth(Wᵀ·Q));
//!   B = Qᵀ·W [l, n] = Ũ Σ Vᵀ;  U ≈ Q·Ũ.
//! Each power iteration sharpens the decay (σ_i/σ_{l+1})^(2q+1). Deterministic given the seed.
//!
//! The bottom-k triplets ([`bottom_k_svd`], MiLoRA's init) have no cheap randomized form (a
//! range finder sees the top of the spectrum first), so they come from the exact thin SVD: the
//! weight is read once into an f64 m×n buffer, at init only. Every returned triplet has a fixed
//! sign convention ([`normalize_signs`]): the largest-magnitude entry of each u column is
//! positive, so the exact and the randomized paths store the same factors.

use faer::Mat;

use crate::backend::cpu;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::tensor::Tensor;

/// k singular triplets of an m×n matrix (the top k, or a block of them), row-major:
/// u [m, k], s `[k]` (descending), v [n, k], so the block is u·diag(s)·vᵀ.
#[derive(Clone, Debug)]
pub struct TopSvd {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub u: Vec<f64>,
    pub s: Vec<f64>,
    pub v: Vec<f64>,
}

/// Thin SVD of a dense row-major a [m, n]: (u [m, r], s `[r]`, v [n, r]), r = min(m, n).
pub fn thin_svd(a: &[f64], m: usize, n: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    if a.len() != m * n || m == 0 || n == 0 {
        return Err(Error::shape("thin_svd", "a", format!("{m}×{n} values"), a.len()));
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { op: "thin_svd", what: "the input matrix".into() });
    }
    let mat = Mat::<f64>::from_fn(m, n, |i, j| a[i * n + j]);
    let svd = mat.thin_svd().map_err(|e| Error::invalid("thin_svd", format!("did not converge: {e:?}")))?;
    let r = m.min(n);
    let (uu, vv, ss) = (svd.U(), svd.V(), svd.S().column_vector());
    let mut u = vec![0.0; m * r];
    let mut v = vec![0.0; n * r];
    let s: Vec<f64> = (0..r).map(|j| ss[j]).collect();
    for i in 0..m {
        for j in 0..r {
            u[i * r + j] = uu[(i, j)];
        }
    }
    for i in 0..n {
        for j in 0..r {
            v[i * r + j] = vv[(i, j)];
        }
    }
    Ok((u, s, v))
}

/// Orthonormal basis of the columns of y [rows, cols] (row-major), returned row-major.
fn orth(y: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let q = Mat::<f64>::from_fn(rows, cols, |i, j| y[i * cols + j]).qr().compute_thin_Q();
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[i * cols + j] = q[(i, j)];
        }
    }
    out
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// Top-k singular triplets of a frozen matrix w [m, n] (any stored dtype). Small matrices (or
/// k + oversampling ≥ min(m, n)) use the exact thin SVD; large ones the randomized method with
/// `power_iters` power iterations and 10 oversampling columns.
pub fn top_k_svd(w: &Tensor, k: usize, power_iters: usize, seed: u64) -> Result<TopSvd> {
    const OP: &str = "top_k_svd";
    if w.dims().len() != 2 {
        return Err(Error::shape(OP, "w", "[m, n]", w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    let r = m.min(n);
    if k == 0 || k > r {
        return Err(Error::invalid(OP, format!("k = {k} must be in 1..={r} for a {m}×{n} matrix")));
    }
    let l = (k + 10).min(r);
    let g = w.read();
    if l == r {
        let mut a = vec![0.0; m * n];
        g.read_into(0, &mut a);
        let (u, s, v) = thin_svd(&a, m, n)?;
        return Ok(columns(u, s, v, m, n, r, 0, k));
    }
    // Ωᵀ [l, n], Gaussian by Box–Muller.
    let mut rng = SplitMix::new(seed);
    let omega_t: Vec<f64> = (0..l * n)
        .map(|_| {
            let (u1, u2) = (rng.uniform(f64::MIN_POSITIVE, 1.0), rng.uniform(0.0, 1.0));
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    // Yᵀ [l, m] = Ωᵀ·Wᵀ;  Q = orth(Y) [m, l]
    let mut yt = vec![0.0; l * m];
    cpu::gemm_stored(&mut yt, &omega_t, &g, 0, l, n, m, false, true, 0.0);
    let mut q = orth(&transpose(&yt, l, m), m, l);
    let mut zt = vec![0.0; l * n];
    for _ in 0..power_iters {
        // Zᵀ [l, n] = Qᵀ·W;  Qz = orth(Z) [n, l];  Yᵀ = Qzᵀ·Wᵀ;  Q = orth(Y)
        cpu::gemm_stored(&mut zt, &transpose(&q, m, l), &g, 0, l, m, n, false, false, 0.0);
        let qz = orth(&transpose(&zt, l, n), n, l);
        cpu::gemm_stored(&mut yt, &transpose(&qz, n, l), &g, 0, l, n, m, false, true, 0.0);
        q = orth(&transpose(&yt, l, m), m, l);
    }
    // B = Qᵀ·W [l, n] = Ũ Σ Vᵀ;  U = Q·Ũ
    cpu::gemm_stored(&mut zt, &transpose(&q, m, l), &g, 0, l, m, n, false, false, 0.0);
    let (ub, s, v) = thin_svd(&zt, l, n)?;
    let mut u = vec![0.0; m * l];
    cpu::gemm(&mut u, &q, &ub, m, l, l, false, false, 1.0, 0.0);
    Ok(columns(u, s, v, m, n, l, 0, k))
}

/// The bottom-k singular triplets of a frozen matrix w [m, n] (any stored dtype): triplets
/// r−k … r−1 of the r = min(m, n), in descending order. Exact (thin SVD of the whole matrix,
/// read once into f64 — m·n·8 bytes, at init only) and deterministic.
pub fn bottom_k_svd(w: &Tensor, k: usize) -> Result<TopSvd> {
    const OP: &str = "bottom_k_svd";
    if w.dims().len() != 2 {
        return Err(Error::shape(OP, "w", "[m, n]", w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    let r = m.min(n);
    if k == 0 || k > r {
        return Err(Error::invalid(OP, format!("k = {k} must be in 1..={r} for a {m}×{n} matrix")));
    }
    let mut a = vec![0.0; m * n];
    w.read().read_into(0, &mut a);
    let (u, s, v) = thin_svd(&a, m, n)?;
    Ok(columns(u, s, v, m, n, r, r - k, k))
}

/// Singular triplets `start … start+k−1` of w [m, n] (block j of size r is start = j·r): the
/// top start+k triplets by [`top_k_svd`] (same seed and power iterations), sliced.
pub fn svd_block(w: &Tensor, start: usize, k: usize, power_iters: usize, seed: u64) -> Result<TopSvd> {
    let top = top_k_svd(w, start + k, power_iters, seed)?;
    let r = top.k;
    Ok(columns(top.u, top.s, top.v, top.m, top.n, r, start, k))
}

/// Keeps columns start … start+k−1 of r, with the sign convention applied.
#[allow(clippy::too_many_arguments)]
fn columns(u: Vec<f64>, s: Vec<f64>, v: Vec<f64>, m: usize, n: usize, r: usize, start: usize, k: usize) -> TopSvd {
    let cols = |a: &[f64], rows: usize| -> Vec<f64> { (0..rows).flat_map(|i| a[i * r + start..i * r + start + k].iter().copied()).collect() };
    let mut t = TopSvd { m, n, k, u: cols(&u, m), s: s[start..start + k].to_vec(), v: cols(&v, n) };
    normalize_signs(&mut t);
    t
}

/// Singular vectors are defined up to a joint sign flip of (u_j, v_j). This fixes it: the entry
/// of largest |value| in each u column (the first such on ties) is made positive.
pub fn normalize_signs(t: &mut TopSvd) {
    let k = t.k;
    for j in 0..k {
        let mut best = (0.0f64, 0usize);
        for i in 0..t.m {
            let a = t.u[i * k + j].abs();
            if a > best.0 {
                best = (a, i);
            }
        }
        if t.u[best.1 * k + j] < 0.0 {
            (0..t.m).for_each(|i| t.u[i * k + j] = -t.u[i * k + j]);
            (0..t.n).for_each(|i| t.v[i * k + j] = -t.v[i * k + j]);
        }
    }
}
