//! Fused adapter linears on a frozen weight W [m, n] (out × in).
//!
//! - LoRA:      y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ,                    A [r, n], B [m, r]
//! - SpecLoRA:  y = x·(Γ ⊙ W)ᵀ + s·(x·Aᵀ)·Bᵀ, Γ[i, :] = d_j for the j-th selected row i, else 1
//!
//! Invariant (tests/frozen.rs): the backward returns dX, dA, dB and dd only. W is frozen — an
//! adapter op refuses a W that requires grad — and no m×n buffer is ever allocated for it: Γ ⊙ W
//! is never formed; the forward scales the selected output columns of Z = x·Wᵀ instead, and saves
//! only those k columns of Z for dd. Derivations: docs/ops.md.

use super::{check_dtype, compute_dtype, out, vals};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::cpu;
use crate::device::with_float;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// Which rows of W the SpecLoRA vector d rescales.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecRows {
    /// The first k rows (the seed's positional, SVD-free form).
    Top(usize),
    /// An explicit list of distinct row indices (e.g. the k rows of largest norm).
    Indices(Vec<u32>),
}

impl SpecRows {
    fn resolve(&self, m: usize) -> Result<Vec<usize>> {
        match self {
            SpecRows::Top(k) if *k <= m => Ok((0..*k).collect()),
            SpecRows::Top(k) => Err(Error::invalid("speclora_linear", format!("k = {k} exceeds the {m} rows of W (clamp k to the row count)"))),
            SpecRows::Indices(ix) => {
                let mut seen = vec![false; m];
                ix.iter()
                    .map(|&i| {
                        let i = i as usize;
                        if i >= m {
                            return Err(Error::OutOfRange { op: "speclora_linear", what: "row", index: i as i64, size: m });
                        }
                        if std::mem::replace(&mut seen[i], true) {
                            return Err(Error::invalid("speclora_linear", format!("row {i} is listed twice")));
                        }
                        Ok(i)
                    })
                    .collect()
            }
        }
    }
}

/// Dropout on the input of the LoRA branch (as PEFT's `lora_dropout`): each element of x is kept
/// with probability 1 − p and scaled by 1/(1 − p). The mask is a pure function of `seed` and the
/// element index, so a recomputation (activation checkpointing) sees the same mask; callers
/// change the seed every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    /// The multiplier of element `i`: 0 (dropped) or 1/(1 − p).
    #[inline]
    fn factor(&self, i: usize) -> f64 {
        let mut z = self.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = (z >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.p {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }
}

/// LoRA on a frozen W: x [.., n], w [m, n], a [r, n], b [m, r] → [.., m].
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    adapter_linear(x, w, None, a, b, scale, None)
}

/// SpecLoRA on a frozen W: as [`lora_linear`] with the selected rows of W scaled by d [k].
pub fn speclora_linear(x: &Tensor, w: &Tensor, d: &Tensor, rows: &SpecRows, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    adapter_linear(x, w, Some((d, rows)), a, b, scale, None)
}

/// The general adapter linear: LoRA, or SpecLoRA when `spec` = (d, rows), with optional dropout
/// on the LoRA branch input.
pub fn adapter_linear(x: &Tensor, w: &Tensor, spec: Option<(&Tensor, &SpecRows)>, a: &Tensor, b: &Tensor, s: f64, dropout: Option<Dropout>) -> Result<Tensor> {
    let op = if spec.is_some() { "speclora_linear" } else { "lora_linear" };
    if let Some(dr) = dropout {
        if !(0.0..1.0).contains(&dr.p) {
            return Err(Error::invalid(op, format!("dropout p must be in [0, 1), got {}", dr.p)));
        }
    }
    let dropout = dropout.filter(|d| d.p > 0.0);
    let dt = compute_dtype(op, "x", x)?;
    if w.requires_grad() {
        return Err(Error::invalid(op, "the base weight W requires grad; adapters keep W frozen (use matmul to train W densely)"));
    }
    if w.dims().len() != 2 || x.dims().is_empty() || x.shape().last() != w.dims()[1] {
        return Err(Error::shape(op, "w", format!("[out, {}]", x.shape().last()), w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    if a.dims().len() != 2 || a.dims()[1] != n || a.dims()[0] == 0 {
        return Err(Error::shape(op, "a", format!("[r, {n}]"), a.shape()));
    }
    let r = a.dims()[0];
    check_shape_eq(op, "b", b, &[m, r])?;
    check_dtype(op, "a", a, dt, true)?;
    check_dtype(op, "b", b, dt, true)?;
    if !s.is_finite() {
        return Err(Error::invalid(op, format!("scale must be finite, got {s}")));
    }
    let idx = match spec {
        Some((d, rows)) => {
            let idx = rows.resolve(m)?;
            check_shape_eq(op, "d", d, &[idx.len()])?;
            check_dtype(op, "d", d, dt, true)?;
            Some(idx)
        }
        None => None,
    };
    let nrows = x.shape().rows();
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank checked above") = m;
    let dims = LinDims { nrows, m, n, r, s };
    let (y, h, zk, xd) = with_float!(dt, op, |T| {
        let (xg, wg, ag, bg) = (x.read(), w.read(), a.read(), b.read());
        let xv = vals::<T>(&xg);
        // Z = X·Wᵀ  [N, m]
        let mut y = vec![T::ZERO; nrows * m];
        cpu::gemm_stored(&mut y, &xv, &wg, 0, nrows, n, m, false, true, T::ZERO);
        // Γ: save Z[:, idx] for dd, then scale those columns by d.
        let zk = match (&idx, spec) {
            (Some(idx), Some((d, _))) => {
                let dv = vals::<T>(&d.read()).into_owned();
                let k = idx.len();
                let mut zk = vec![T::ZERO; nrows * k];
                for (yr, zr) in y.chunks_mut(m).zip(zk.chunks_mut(k.max(1))) {
                    for (j, &i) in idx.iter().enumerate() {
                        zr[j] = yr[i];
                        yr[i] *= dv[j];
                    }
                }
                Some(out(zk, [nrows, k]))
            }
            _ => None,
        };
        // X̃ = dropout(X) for the LoRA branch only;  H = X̃·Aᵀ [N, r];  Y += s·H·Bᵀ
        let xd: Option<Vec<T>> = dropout.map(|dr| xv.iter().enumerate().map(|(i, &v)| v * T::from_f64(dr.factor(i))).collect());
        let xa: &[T] = xd.as_deref().unwrap_or(&xv);
        let mut h = vec![T::ZERO; nrows * r];
        cpu::gemm(&mut h, xa, &vals::<T>(&ag), nrows, n, r, false, true, T::ONE, T::ZERO);
        cpu::gemm(&mut y, &h, &vals::<T>(&bg), nrows, r, m, false, true, T::from_f64(s), T::ONE);
        Ok((out(y, Shape::new(out_dims.clone())), out(h, [nrows, r]), zk, xd.map(|v| out(v, [nrows, n]))))
    })?;
    let inputs: Vec<&Tensor> = match spec {
        Some((d, _)) => vec![x, d, a, b],
        None => vec![x, a, b],
    };
    Ok(record(y, &inputs, |needs| {
        let (nx, nd, na, nb) = if spec.is_some() { (needs[0], needs[1], needs[2], needs[3]) } else { (needs[0], false, needs[1], needs[2]) };
        Box::new(AdapterBwd {
            name: op,
            x_shape: x.shape().clone(),
            // dA = s·Gᵀ·X̃ needs the dropped-out input when dropout is on.
            x: na.then(|| xd.unwrap_or_else(|| x.detach())),
            dropout,
            w: nx.then(|| w.detach()),
            a: (nx).then(|| a.detach()),
            b: (nx || na).then(|| b.detach()),
            h: nb.then_some(h),
            d: spec.filter(|_| nx).map(|(d, _)| d.detach()),
            zk: zk.filter(|_| nd),
            idx,
            spec: spec.is_some(),
            dims,
        })
    }))
}

fn check_shape_eq(op: &'static str, arg: &'static str, t: &Tensor, dims: &[usize]) -> Result<()> {
    super::check_shape(op, arg, t, dims)
}

#[derive(Clone, Copy)]
struct LinDims {
    nrows: usize,
    m: usize,
    n: usize,
    r: usize,
    s: f64,
}

struct AdapterBwd {
    name: &'static str,
    x_shape: Shape,
    x: Option<Tensor>,
    w: Option<Tensor>,
    a: Option<Tensor>,
    b: Option<Tensor>,
    h: Option<Tensor>,
    d: Option<Tensor>,
    zk: Option<Tensor>,
    idx: Option<Vec<usize>>,
    spec: bool,
    dims: LinDims,
    dropout: Option<Dropout>,
}

impl Backward for AdapterBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    /// With G = dY·B [N, r], dYΓ = dY with its selected columns scaled by d, and X̃ = dropout(X)
    /// (X̃ = X, mask = 1 without dropout):
    ///   dX = dYΓ·W + s·(G·A) ⊙ mask/(1−p);  dA = s·Gᵀ·X̃;  dB = s·dYᵀ·H;  dd_j = Σ_t dY[t, i_j]·Z[t, i_j].
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let LinDims { nrows, m, n, r, s } = self.dims;
        let (nx, nd, na, nb) = if self.spec { (needs[0], needs[1], needs[2], needs[3]) } else { (needs[0], false, needs[1], needs[2]) };
        with_float!(dy.dtype(), "adapter_linear.backward", |T| {
            let gy = dy.read();
            let gy = vals::<T>(&gy);
            let st = T::from_f64(s);
            // G = dY·B  [N, r]
            let g = self.b.as_ref().map(|b| {
                let mut g = vec![T::ZERO; nrows * r];
                cpu::gemm(&mut g, &gy, &vals::<T>(&b.read()), nrows, m, r, false, false, T::ONE, T::ZERO);
                g
            });
            let dx = match (nx, &self.w, &self.a, &g) {
                (true, Some(w), Some(a), Some(g)) => {
                    let mut dx = vec![T::ZERO; nrows * n];
                    match (&self.d, &self.idx) {
                        (Some(d), Some(idx)) => {
                            let dv = vals::<T>(&d.read()).into_owned();
                            let mut gs = gy.to_vec();
                            for row in gs.chunks_mut(m) {
                                for (j, &i) in idx.iter().enumerate() {
                                    row[i] *= dv[j];
                                }
                            }
                            cpu::gemm_stored(&mut dx, &gs, &w.read(), 0, nrows, m, n, false, false, T::ZERO);
                        }
                        _ => cpu::gemm_stored(&mut dx, &gy, &w.read(), 0, nrows, m, n, false, false, T::ZERO),
                    }
                    match self.dropout {
                        // dX += s·(G·A) ⊙ mask/(1 − p)
                        Some(dr) => {
                            let mut ga = vec![T::ZERO; nrows * n];
                            cpu::gemm(&mut ga, g, &vals::<T>(&a.read()), nrows, r, n, false, false, st, T::ZERO);
                            dx.iter_mut().zip(&ga).enumerate().for_each(|(i, (d, v))| *d += *v * T::from_f64(dr.factor(i)));
                        }
                        None => cpu::gemm(&mut dx, g, &vals::<T>(&a.read()), nrows, r, n, false, false, st, T::ONE),
                    }
                    Some(out(dx, self.x_shape.clone()))
                }
                _ => None,
            };
            let dd = match (nd, &self.zk, &self.idx) {
                (true, Some(zk), Some(idx)) => {
                    let k = idx.len();
                    let zv = zk.read();
                    let zv = vals::<T>(&zv);
                    let mut dd = vec![T::ZERO; k];
                    for (gr, zr) in gy.chunks(m).zip(zv.chunks(k.max(1))) {
                        for (j, &i) in idx.iter().enumerate() {
                            dd[j] += gr[i] * zr[j];
                        }
                    }
                    Some(out(dd, [k]))
                }
                _ => None,
            };
            let da = match (na, &self.x, &g) {
                (true, Some(x), Some(g)) => {
                    let mut da = vec![T::ZERO; r * n];
                    cpu::gemm(&mut da, g, &vals::<T>(&x.read()), r, nrows, n, true, false, st, T::ZERO);
                    Some(out(da, [r, n]))
                }
                _ => None,
            };
            let db = match (nb, &self.h) {
                (true, Some(h)) => {
                    let mut db = vec![T::ZERO; m * r];
                    cpu::gemm(&mut db, &gy, &vals::<T>(&h.read()), m, nrows, r, true, false, st, T::ZERO);
                    Some(out(db, [m, r]))
                }
                _ => None,
            };
            Ok(if self.spec { vec![dx, dd, da, db] } else { vec![dx, da, db] })
        })
    }
}
