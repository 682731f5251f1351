//! Spectral Adapter ops (Zhang & Pilanci, NeurIPS 2024; docs/ops.md §17–19, §22) on a frozen W [m, n]
//! (out × in) with its frozen top-r SVD factors U [m, r], σ [r], V [n, r], stored with the
//! adapter and never recomputed.
//!
//! - [`cayley`]: R = (I − K)(I + K)⁻¹ with K = (Q − Qᵀ)/2, Q [r, r] → R [r, r] orthogonal.
//! - [`spectral_a_linear`] (additive): W' = W − U·Σ·Vᵀ + (U + ΔU)·Σ·(V + ΔV)ᵀ, computed as
//!   `Y = X·Wᵀ + ((P + E) ⊙ σ)·ΔUᵀ + (E ⊙ σ)·Uᵀ` with P = X·V, E = X·ΔV [N, r]. The frozen
//!   product X·Wᵀ is kept and only delta terms are added, so at ΔU = ΔV = 0 the output equals
//!   the frozen layer bit for bit.
//! - [`spectral_r_linear`] (rotational): W' = W + U·M·Vᵀ with
//!   M = R_U·diag(c ⊙ σ)·R_Vᵀ − diag(σ) [r, r], i.e. the top-r block U·Σ·Vᵀ replaced by
//!   (U·R_U)·diag(c ⊙ σ)·(V·R_V)ᵀ. At R = I, c = 1 the matrix M is exactly 0.
//!
//! No m×n buffer is ever allocated: the backwards return dX and the r-sized trainables only.
//! Derivations: docs/ops.md §17–19.

use faer::linalg::solvers::Solve;
use faer::Mat;

use super::adapter::tensor;
use super::{check_dtype, check_shape, compute_dtype};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::{Gemm, Kernels};
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::{host_from_vec, Storage};
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

// ---------------------------------------------------------------------------------------------
// Cayley transform
// ---------------------------------------------------------------------------------------------

/// Solves A·X = B for a square a [r, r] and b [r, c] (row-major, f64) by LU with partial
/// pivoting. I + K with K skew-symmetric is always invertible (its eigenvalues are 1 + iλ).
fn solve_f64(a: &[f64], b: &[f64], r: usize, c: usize) -> Vec<f64> {
    let am = Mat::<f64>::from_fn(r, r, |i, j| a[i * r + j]);
    let bm = Mat::<f64>::from_fn(r, c, |i, j| b[i * c + j]);
    let x = am.partial_piv_lu().solve(&bm);
    let mut v = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            v[i * c + j] = x[(i, j)];
        }
    }
    v
}

/// (I + K, I − K) for K = (Q − Qᵀ)/2, q [r, r] row-major.
fn cayley_parts(q: &[f64], r: usize) -> (Vec<f64>, Vec<f64>) {
    let mut ipk = vec![0.0; r * r];
    let mut imk = vec![0.0; r * r];
    for i in 0..r {
        for j in 0..r {
            let k = 0.5 * (q[i * r + j] - q[j * r + i]);
            let e = if i == j { 1.0 } else { 0.0 };
            ipk[i * r + j] = e + k;
            imk[i * r + j] = e - k;
        }
    }
    (ipk, imk)
}

/// The Cayley transform of q [r, r] in f64: R = (I + K)⁻¹·(I − K) (= (I − K)·(I + K)⁻¹: both
/// factors are functions of K and commute), by a linear solve, never an explicit inverse.
pub fn cayley_f64(q: &[f64], r: usize) -> Vec<f64> {
    let (ipk, imk) = cayley_parts(q, r);
    solve_f64(&ipk, &imk, r, r)
}

/// R = (I − K)(I + K)⁻¹ with K = (Q − Qᵀ)/2, for q [r, r]. R is orthogonal with det R = 1;
/// Q = 0 gives R = I exactly. Computed in f64 whatever the dtype (r×r, negligible cost).
pub fn cayley(q: &Tensor) -> Result<Tensor> {
    const OP: &str = "cayley";
    let dt = compute_dtype(OP, "q", q)?;
    if q.dims().len() != 2 || q.dims()[0] != q.dims()[1] {
        return Err(Error::shape(OP, "q", "[r, r]", q.shape()));
    }
    let r = q.dims()[0];
    let qv = q.to_vec_f64();
    if qv.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite { op: OP, what: "q".into() });
    }
    let rv = cayley_f64(&qv, r);
    let y = f64_to_device(kernels_for(OP, &[("q", q)])?, &rv, dt, [r, r], OP)?;
    Ok(record(y, &[q], |_| Box::new(CayleyBwd { q: qv, r: rv, n: r })))
}

/// Host f64 values as a tensor of `dt` on the device of `k` (the r×r Cayley matrices are solved
/// on the host in f64 whatever the device: r ≤ a few hundred, a few KiB each way).
fn f64_to_device(k: &dyn Kernels, v: &[f64], dt: crate::DType, shape: impl Into<Shape>, op: &'static str) -> Result<Tensor> {
    Ok(tensor(k.upload(&Storage::Host(host_from_vec(v.to_vec())), dt, op)?, shape))
}

struct CayleyBwd {
    /// Q and R = cayley(Q), f64 [r, r].
    q: Vec<f64>,
    r: Vec<f64>,
    n: usize,
}

impl Backward for CayleyBwd {
    fn name(&self) -> &'static str {
        "cayley"
    }
    /// With G_R = dR and (I + K)⁻ᵀ = (I − K)⁻¹:
    ///   G_K = −(I + R)ᵀ·G_R·(I + K)⁻ᵀ,   dQ = ½(G_K − G_Kᵀ).
    /// Z = (I + R)ᵀ·G_R·(I + K)⁻ᵀ is formed as Zᵀ = solve(I + K, ((I + R)ᵀ·G_R)ᵀ).
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let r = self.n;
        let g = dy.to_vec_f64();
        // A = (I + R)ᵀ·G_R;  Aᵀ[j, i] = Σ_a (I + R)[a, i]·G[a, j]
        let mut at = vec![0.0; r * r];
        for i in 0..r {
            for j in 0..r {
                let mut acc = g[i * r + j]; // the I term: (I)[a, i] = [a = i]
                for a in 0..r {
                    acc += self.r[a * r + i] * g[a * r + j];
                }
                at[j * r + i] = acc;
            }
        }
        let (ipk, _) = cayley_parts(&self.q, r);
        let zt = solve_f64(&ipk, &at, r, r);
        // G_K = −Z, with Z[i, j] = Zᵀ[j, i];  dQ = ½(G_K − G_Kᵀ) = ½(Zᵀ − Z)
        let mut dq = vec![0.0; r * r];
        for i in 0..r {
            for j in 0..r {
                dq[i * r + j] = 0.5 * (zt[i * r + j] - zt[j * r + i]);
            }
        }
        const OP: &str = "cayley.backward";
        Ok(vec![Some(f64_to_device(kernels_for(OP, &[("dy", dy)])?, &dq, dy.dtype(), [r, r], OP)?)])
    }
}

// ---------------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------------

/// Validates x [.., n], a frozen w [m, n] and the frozen factors u [m, r], sigma [r], v [n, r];
/// returns (dtype, rows N, m, n, r).
fn check_factors(op: &'static str, x: &Tensor, w: &Tensor, u: &Tensor, sigma: &Tensor, v: &Tensor) -> Result<(crate::DType, usize, usize, usize, usize)> {
    let dt = compute_dtype(op, "x", x)?;
    if w.requires_grad() {
        return Err(Error::invalid(op, "the base weight W requires grad; adapters keep W frozen (use matmul to train W densely)"));
    }
    if w.dims().len() != 2 || x.dims().is_empty() || x.shape().last() != w.dims()[1] {
        return Err(Error::shape(op, "w", format!("[out, {}]", x.shape().last()), w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    if sigma.dims().len() != 1 || sigma.dims()[0] == 0 {
        return Err(Error::shape(op, "sigma", "[r] with r > 0", sigma.shape()));
    }
    let r = sigma.dims()[0];
    check_shape(op, "u", u, &[m, r])?;
    check_shape(op, "v", v, &[n, r])?;
    for (name, t) in [("u", u), ("sigma", sigma), ("v", v)] {
        check_dtype(op, name, t, dt, false)?;
        if t.requires_grad() {
            return Err(Error::invalid(op, format!("the SVD factor {name} must be frozen (it is stored with the adapter, never trained)")));
        }
    }
    Ok((dt, x.shape().rows(), m, n, r))
}

fn out_dims(x: &Tensor, m: usize) -> Shape {
    let mut d = x.dims().to_vec();
    *d.last_mut().expect("rank checked") = m;
    Shape::new(d)
}

/// out = p ⊙ c per column: p [rows, k], c `[k]` (a right product with diag(c)).
fn scale_cols(k: &dyn Kernels, p: &Storage, c: &Storage, op: &'static str) -> Result<Storage> {
    let mut o = k.zeros(p.dtype(), p.len(), op)?;
    k.scale_cols(&mut o, p, c)?;
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// Spectral^A
// ---------------------------------------------------------------------------------------------

/// Spectral Adapter, additive: x [.., n] through W' = W − U·Σ·Vᵀ + (U + ΔU)·Σ·(V + ΔV)ᵀ.
/// w [m, n], u [m, r], sigma `[r]`, v [n, r] frozen; du [m, r], dv [n, r] trainable → [.., m].
pub fn spectral_a_linear(x: &Tensor, w: &Tensor, u: &Tensor, sigma: &Tensor, v: &Tensor, du: &Tensor, dv: &Tensor) -> Result<Tensor> {
    const OP: &str = "spectral_a_linear";
    let (dt, nrows, m, n, r) = check_factors(OP, x, w, u, sigma, v)?;
    check_shape(OP, "du", du, &[m, r])?;
    check_shape(OP, "dv", dv, &[n, r])?;
    check_dtype(OP, "du", du, dt, true)?;
    check_dtype(OP, "dv", dv, dt, true)?;
    let k = kernels_for(OP, &[("x", x), ("w", w), ("u", u), ("sigma", sigma), ("v", v), ("du", du), ("dv", dv)])?;
    let (xg, sg) = (x.read(), sigma.read());
    // Y = X·Wᵀ  [N, m]
    let mut y = k.zeros(dt, nrows * m, OP)?;
    k.gemm(&mut y, &xg, &w.read(), &Gemm::new(nrows, n, m).trans(false, true).frozen(), OP)?;
    // P = X·V, E = X·ΔV  [N, r]
    let mut p = k.zeros(dt, nrows * r, OP)?;
    k.gemm(&mut p, &xg, &v.read(), &Gemm::new(nrows, n, r), OP)?;
    let mut e = k.zeros(dt, nrows * r, OP)?;
    k.gemm(&mut e, &xg, &dv.read(), &Gemm::new(nrows, n, r), OP)?;
    drop(xg);
    // Y += ((P + E) ⊙ σ)·ΔUᵀ + (E ⊙ σ)·Uᵀ
    k.add_assign(&mut p, &e, OP)?;
    let ps = scale_cols(k, &p, &sg, OP)?;
    drop(p);
    let es = scale_cols(k, &e, &sg, OP)?;
    drop(e);
    k.gemm(&mut y, &ps, &du.read(), &Gemm::new(nrows, r, m).trans(false, true).scaled(1.0, 1.0), OP)?;
    k.gemm(&mut y, &es, &u.read(), &Gemm::new(nrows, r, m).trans(false, true).scaled(1.0, 1.0), OP)?;
    drop(sg);
    let (y, ps) = (tensor(y, out_dims(x, m)), tensor(ps, [nrows, r]));
    Ok(record(y, &[x, du, dv], |needs| {
        let (nx, ndu, ndv) = (needs[0], needs[1], needs[2]);
        Box::new(SpectralABwd {
            x_shape: x.shape().clone(),
            x: ndv.then(|| x.detach()),
            ps: ndu.then_some(ps),
            w: nx.then(|| w.detach()),
            v: nx.then(|| v.detach()),
            u: (nx || ndv).then(|| u.detach()),
            sigma: (nx || ndv).then(|| sigma.detach()),
            du: (nx || ndv).then(|| du.detach()),
            dv: nx.then(|| dv.detach()),
            dims: (nrows, m, n, r),
        })
    }))
}

struct SpectralABwd {
    x_shape: Shape,
    x: Option<Tensor>,
    /// (P + E) ⊙ σ = (X·(V + ΔV)) ⊙ σ  [N, r]
    ps: Option<Tensor>,
    w: Option<Tensor>,
    u: Option<Tensor>,
    sigma: Option<Tensor>,
    v: Option<Tensor>,
    du: Option<Tensor>,
    dv: Option<Tensor>,
    dims: (usize, usize, usize, usize),
}

impl Backward for SpectralABwd {
    fn name(&self) -> &'static str {
        "spectral_a_linear"
    }
    /// With Q = dY·U, Q_Δ = dY·ΔU, Q' = Q + Q_Δ = dY·(U + ΔU)  [N, r]:
    ///   dΔU = dYᵀ·((X·(V + ΔV)) ⊙ σ)
    ///   dΔV = Xᵀ·(Q' ⊙ σ)
    ///   dX  = dY·W + (Q_Δ ⊙ σ)·Vᵀ + (Q' ⊙ σ)·ΔVᵀ
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "spectral_a_linear.backward";
        let (nrows, m, n, r) = self.dims;
        let (nx, ndu, ndv) = (needs[0], needs[1], needs[2]);
        let k = kernels_for(OP, &[("dy", dy)])?;
        let dt = dy.dtype();
        let gy = dy.read();
        let ddu = match (ndu, &self.ps) {
            (true, Some(ps)) => {
                let mut g = k.zeros(dt, m * r, OP)?;
                k.gemm(&mut g, &gy, &ps.read(), &Gemm::new(m, nrows, r).trans(true, false), OP)?;
                Some(tensor(g, [m, r]))
            }
            _ => None,
        };
        let (mut ddv, mut dx) = (None, None);
        if let (true, Some(u), Some(sigma), Some(du)) = (nx || ndv, &self.u, &self.sigma, &self.du) {
            let sg = sigma.read();
            let mut qd = k.zeros(dt, nrows * r, OP)?;
            k.gemm(&mut qd, &gy, &du.read(), &Gemm::new(nrows, m, r), OP)?;
            // Q' = dY·U + Q_Δ
            let mut qp = k.upload(&qd, dt, OP)?;
            k.gemm(&mut qp, &gy, &u.read(), &Gemm::new(nrows, m, r).scaled(1.0, 1.0), OP)?;
            let qps = scale_cols(k, &qp, &sg, OP)?;
            drop(qp);
            if let (true, Some(x)) = (ndv, &self.x) {
                let mut g = k.zeros(dt, n * r, OP)?;
                k.gemm(&mut g, &x.read(), &qps, &Gemm::new(n, nrows, r).trans(true, false), OP)?;
                ddv = Some(tensor(g, [n, r]));
            }
            if let (true, Some(w), Some(v), Some(dvt)) = (nx, &self.w, &self.v, &self.dv) {
                let mut g = k.zeros(dt, nrows * n, OP)?;
                k.gemm(&mut g, &gy, &w.read(), &Gemm::new(nrows, m, n).frozen(), OP)?;
                let qds = scale_cols(k, &qd, &sg, OP)?;
                k.gemm(&mut g, &qds, &v.read(), &Gemm::new(nrows, r, n).trans(false, true).scaled(1.0, 1.0), OP)?;
                k.gemm(&mut g, &qps, &dvt.read(), &Gemm::new(nrows, r, n).trans(false, true).scaled(1.0, 1.0), OP)?;
                dx = Some(tensor(g, self.x_shape.clone()));
            }
        }
        Ok(vec![dx, ddu, ddv])
    }
}

// ---------------------------------------------------------------------------------------------
// Spectral^R
// ---------------------------------------------------------------------------------------------

/// M = R_U·diag(c ⊙ σ)·R_Vᵀ − diag(σ)  [r, r].
fn rot_core(k: &dyn Kernels, ru: &Storage, rv: &Storage, c: &Storage, sg: &Storage, r: usize, op: &'static str) -> Result<Storage> {
    let cs = scale_cols(k, c, sg, op)?;
    let ruc = scale_cols(k, ru, &cs, op)?;
    let mut mm = k.zeros(ru.dtype(), r * r, op)?;
    k.gemm(&mut mm, &ruc, rv, &Gemm::new(r, r, r).trans(false, true), op)?;
    k.sub_diag(&mut mm, sg)?;
    Ok(mm)
}

/// Spectral Adapter, rotational: x [.., n] through
/// W' = W + U·(R_U·diag(c ⊙ σ)·R_Vᵀ − diag(σ))·Vᵀ, i.e. the top-r singular vectors rotated by
/// R_U, R_V [r, r] (usually [`cayley`] outputs) and the top-r singular values scaled by c `[r]`.
/// w [m, n], u [m, r], sigma `[r]`, v [n, r] frozen → [.., m].
#[allow(clippy::too_many_arguments)]
pub fn spectral_r_linear(x: &Tensor, w: &Tensor, u: &Tensor, sigma: &Tensor, v: &Tensor, ru: &Tensor, rv: &Tensor, c: &Tensor) -> Result<Tensor> {
    const OP: &str = "spectral_r_linear";
    let (dt, nrows, m, n, r) = check_factors(OP, x, w, u, sigma, v)?;
    check_shape(OP, "ru", ru, &[r, r])?;
    check_shape(OP, "rv", rv, &[r, r])?;
    check_shape(OP, "c", c, &[r])?;
    for (name, t) in [("ru", ru), ("rv", rv), ("c", c)] {
        check_dtype(OP, name, t, dt, true)?;
    }
    let k = kernels_for(OP, &[("x", x), ("w", w), ("u", u), ("sigma", sigma), ("v", v), ("ru", ru), ("rv", rv), ("c", c)])?;
    let mm = rot_core(k, &ru.read(), &rv.read(), &c.read(), &sigma.read(), r, OP)?;
    let xg = x.read();
    let mut y = k.zeros(dt, nrows * m, OP)?;
    k.gemm(&mut y, &xg, &w.read(), &Gemm::new(nrows, n, m).trans(false, true).frozen(), OP)?;
    // P = X·V [N, r];  Z = P·Mᵀ [N, r];  Y += Z·Uᵀ
    let mut p = k.zeros(dt, nrows * r, OP)?;
    k.gemm(&mut p, &xg, &v.read(), &Gemm::new(nrows, n, r), OP)?;
    drop(xg);
    let mut z = k.zeros(dt, nrows * r, OP)?;
    k.gemm(&mut z, &p, &mm, &Gemm::new(nrows, r, r).trans(false, true), OP)?;
    k.gemm(&mut y, &z, &u.read(), &Gemm::new(nrows, r, m).trans(false, true).scaled(1.0, 1.0), OP)?;
    drop(z);
    let (y, p, mm) = (tensor(y, out_dims(x, m)), tensor(p, [nrows, r]), tensor(mm, [r, r]));
    Ok(record(y, &[x, ru, rv, c], |needs| {
        let (nx, nr) = (needs[0], needs[1] || needs[2] || needs[3]);
        Box::new(SpectralRBwd {
            x_shape: x.shape().clone(),
            p: nr.then_some(p),
            mm: nx.then_some(mm),
            w: nx.then(|| w.detach()),
            u: u.detach(),
            v: nx.then(|| v.detach()),
            rot: nr.then(|| (ru.detach(), rv.detach(), c.detach(), sigma.detach())),
            dims: (nrows, m, n, r),
        })
    }))
}

struct SpectralRBwd {
    x_shape: Shape,
    /// P = X·V [N, r]
    p: Option<Tensor>,
    /// M [r, r]
    mm: Option<Tensor>,
    w: Option<Tensor>,
    u: Tensor,
    v: Option<Tensor>,
    /// R_U, R_V, c, σ
    rot: Option<(Tensor, Tensor, Tensor, Tensor)>,
    dims: (usize, usize, usize, usize),
}

impl Backward for SpectralRBwd {
    fn name(&self) -> &'static str {
        "spectral_r_linear"
    }
    /// With Q = dY·U [N, r], dM = Qᵀ·P [r, r] and C = diag(c ⊙ σ):
    ///   dX   = dY·W + (Q·M)·Vᵀ
    ///   dR_U = dM·R_V·C,   dR_V = dMᵀ·R_U·C,   dc_i = σ_i·(R_Uᵀ·dM·R_V)_ii
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "spectral_r_linear.backward";
        let (nrows, m, n, r) = self.dims;
        let k = kernels_for(OP, &[("dy", dy)])?;
        let dt = dy.dtype();
        let gy = dy.read();
        let mut q = k.zeros(dt, nrows * r, OP)?;
        k.gemm(&mut q, &gy, &self.u.read(), &Gemm::new(nrows, m, r), OP)?;
        let dx = match (needs[0], &self.w, &self.v, &self.mm) {
            (true, Some(w), Some(v), Some(mm)) => {
                let mut g = k.zeros(dt, nrows * n, OP)?;
                k.gemm(&mut g, &gy, &w.read(), &Gemm::new(nrows, m, n).frozen(), OP)?;
                let mut qm = k.zeros(dt, nrows * r, OP)?;
                k.gemm(&mut qm, &q, &mm.read(), &Gemm::new(nrows, r, r), OP)?;
                k.gemm(&mut g, &qm, &v.read(), &Gemm::new(nrows, r, n).trans(false, true).scaled(1.0, 1.0), OP)?;
                Some(tensor(g, self.x_shape.clone()))
            }
            _ => None,
        };
        drop(gy);
        let (mut dru, mut drv, mut dc) = (None, None, None);
        if let (Some(p), Some((ru, rv, c, sigma))) = (&self.p, &self.rot) {
            let (ru, rv, c, sg) = (ru.read(), rv.read(), c.read(), sigma.read());
            let cs = scale_cols(k, &c, &sg, OP)?;
            let mut dm = k.zeros(dt, r * r, OP)?;
            k.gemm(&mut dm, &q, &p.read(), &Gemm::new(r, nrows, r).trans(true, false), OP)?;
            // dM·R_V [r, r]
            let mut dmrv = k.zeros(dt, r * r, OP)?;
            k.gemm(&mut dmrv, &dm, &rv, &Gemm::new(r, r, r), OP)?;
            if needs[1] {
                dru = Some(tensor(scale_cols(k, &dmrv, &cs, OP)?, [r, r]));
            }
            if needs[2] {
                let mut t = k.zeros(dt, r * r, OP)?;
                k.gemm(&mut t, &dm, &ru, &Gemm::new(r, r, r).trans(true, false), OP)?;
                drv = Some(tensor(scale_cols(k, &t, &cs, OP)?, [r, r]));
            }
            if needs[3] {
                // dc_i = σ_i·Σ_a R_U[a, i]·(dM·R_V)[a, i]
                let mut g = k.zeros(dt, r, OP)?;
                k.col_dot(&mut g, &ru, r, None, &dmrv, Some(&sg), false)?;
                dc = Some(tensor(g, [r]));
            }
        }
        Ok(vec![dx, dru, drv, dc])
    }
}
