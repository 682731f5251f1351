//! DoRA (Liu et al. 2024; docs/ops.md §20–22) on a frozen W [m, n]:
//!
//!   W' = diag(g)·(W + s·B·A),   g_i = mag_i / ν_i,   ν_i = ‖W_i + s·B_i·A‖  (row i, i.e. per
//!   output feature), mag [m] trainable (init ‖W_i‖, so g = 1 at init).
//!
//! The forward never forms W + s·B·A: with O = X·Wᵀ + s·(X̃·Aᵀ)·Bᵀ (the LoRA output, X̃ the
//! dropped-out input of the LoRA branch), Y = O·diag(g). The row norms come from
//! [`dora_row_norms`]:
//!   ν_i² = ‖W_i‖² + 2s·B_i·(A·W_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ,
//! with ‖W_i‖² precomputed once (frozen, f64 [m]), A·Wᵀ [r, m] one GEMM over the stored W and
//! A·Aᵀ [r, r]. As in the paper (and PEFT's `weight_norm.detach()`), ν is a constant for the
//! backward: the caller computes it outside the graph and passes it in as a frozen input, so the
//! op's gradients are exact for the function it computes (and finite differences check them).
//! Derivation: docs/ops.md §20.

use super::adapter::Dropout;
use super::{check_dtype, check_shape, compute_dtype, out, vals};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::cpu;
use crate::device::with_float;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// Smallest row norm divided by (a zero row of W + s·B·A gives g_i = mag_i / 1e-30).
const MIN_NORM: f64 = 1e-30;

/// ν_i = ‖W_i + s·B_i·A‖ for every row, in f64 (W read through tiled GEMMs, never densely).
/// w [m, n] frozen (any stored dtype), wnorm2 `[m]` = ‖W_i‖², a [r, n], b [m, r] as f64 values.
pub fn dora_row_norms(w: &Tensor, wnorm2: &[f64], a: &[f64], b: &[f64], r: usize, s: f64) -> Vec<f64> {
    let (m, n) = (w.dims()[0], w.dims()[1]);
    // A·Wᵀ [r, m]
    let mut awt = vec![0.0f64; r * m];
    cpu::gemm_stored(&mut awt, a, &w.read(), 0, r, n, m, false, true, 0.0);
    // A·Aᵀ [r, r]
    let mut aat = vec![0.0f64; r * r];
    cpu::gemm(&mut aat, a, a, r, n, r, false, true, 1.0, 0.0);
    (0..m)
        .map(|i| {
            let bi = &b[i * r..(i + 1) * r];
            let cross: f64 = (0..r).map(|q| bi[q] * awt[q * m + i]).sum();
            let quad: f64 = (0..r).map(|p| bi[p] * (0..r).map(|q| aat[p * r + q] * bi[q]).sum::<f64>()).sum();
            (wnorm2[i] + 2.0 * s * cross + s * s * quad).max(0.0).sqrt()
        })
        .collect()
}

/// ‖W_i‖² for every row of a frozen w [m, n] (any stored dtype), in f64, one row at a time.
pub fn row_norms2(w: &Tensor) -> Result<Vec<f64>> {
    if w.dims().len() != 2 {
        return Err(Error::shape("row_norms2", "w", "[out, in]", w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    let g = w.read();
    let mut row = vec![0.0f64; n];
    Ok((0..m)
        .map(|i| {
            g.read_into(i * n, &mut row);
            row.iter().map(|v| v * v).sum()
        })
        .collect())
}

/// DoRA on a frozen W: x [.., n], w [m, n], nu `[m]` (the frozen row norms ‖W_i + s·B_i·A‖ from
/// [`dora_row_norms`], any float dtype), a [r, n], b [m, r], mag `[m]` → [.., m]:
/// y = (x·Wᵀ + s·(x̃·Aᵀ)·Bᵀ) ⊙ mag/ν. `dropout` acts on the LoRA branch input only.
#[allow(clippy::too_many_arguments)]
pub fn dora_linear(x: &Tensor, w: &Tensor, nu: &Tensor, a: &Tensor, b: &Tensor, mag: &Tensor, s: f64, dropout: Option<Dropout>) -> Result<Tensor> {
    const OP: &str = "dora_linear";
    let dt = compute_dtype(OP, "x", x)?;
    if let Some(dr) = dropout {
        if !(0.0..1.0).contains(&dr.p) {
            return Err(Error::invalid(OP, format!("dropout p must be in [0, 1), got {}", dr.p)));
        }
    }
    let dropout = dropout.filter(|d| d.p > 0.0);
    if w.requires_grad() || nu.requires_grad() {
        return Err(Error::invalid(OP, "the base weight W and its row norms must be frozen"));
    }
    if w.dims().len() != 2 || x.dims().is_empty() || x.shape().last() != w.dims()[1] {
        return Err(Error::shape(OP, "w", format!("[out, {}]", x.shape().last()), w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    if a.dims().len() != 2 || a.dims()[1] != n || a.dims()[0] == 0 {
        return Err(Error::shape(OP, "a", format!("[r, {n}]"), a.shape()));
    }
    let r = a.dims()[0];
    check_shape(OP, "b", b, &[m, r])?;
    check_shape(OP, "mag", mag, &[m])?;
    check_shape(OP, "nu", nu, &[m])?;
    for (name, t) in [("a", a), ("b", b), ("mag", mag)] {
        check_dtype(OP, name, t, dt, true)?;
    }
    if !s.is_finite() {
        return Err(Error::invalid(OP, format!("scale must be finite, got {s}")));
    }
    let nrows = x.shape().rows();
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank checked") = m;
    let nu = nu.to_vec_f64();
    if nu.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(Error::invalid(OP, "the row norms nu must be finite and ≥ 0"));
    }
    let (y, o, h, xd, g, nut) = with_float!(dt, OP, |T| {
        let xg = x.read();
        let xv = vals::<T>(&xg);
        // O = X·Wᵀ + s·(X̃·Aᵀ)·Bᵀ  [N, m]
        let mut o = crate::backend::cpu::zeros::<T>(nrows * m);
        cpu::gemm_stored(&mut o, &xv, &w.read(), 0, nrows, n, m, false, true, T::ZERO);
        let xd: Option<Vec<T>> = dropout.map(|dr| xv.iter().enumerate().map(|(i, &v)| v * T::from_f64(dr.factor(i))).collect());
        let xa: &[T] = xd.as_deref().unwrap_or(&xv);
        let mut h = crate::backend::cpu::zeros::<T>(nrows * r);
        cpu::gemm(&mut h, xa, &vals::<T>(&a.read()), nrows, n, r, false, true, T::ONE, T::ZERO);
        cpu::gemm(&mut o, &h, &vals::<T>(&b.read()), nrows, r, m, false, true, T::from_f64(s), T::ONE);
        // g = mag / ν, with ν rounded to T first so that mag = ‖W_i‖ (init) gives g = 1 exactly.
        let nut: Vec<T> = nu.iter().map(|&v| T::from_f64(v.max(MIN_NORM))).collect();
        let g: Vec<T> = mag.to_vec::<T>().iter().zip(&nut).map(|(m, n)| *m / *n).collect();
        let y: Vec<T> = o.chunks(m).flat_map(|row| row.iter().zip(&g).map(|(o, g)| *o * *g)).collect();
        Ok((out(y, Shape::new(out_dims.clone())), out(o, [nrows, m]), out(h, [nrows, r]), xd.map(|v| out(v, [nrows, n])), out(g, [m]), out(nut, [m])))
    })?;
    Ok(record(y, &[x, a, b, mag], |needs| {
        let (nx, na, nb, nm) = (needs[0], needs[1], needs[2], needs[3]);
        Box::new(DoraBwd {
            x_shape: x.shape().clone(),
            x: na.then(|| xd.unwrap_or_else(|| x.detach())),
            w: nx.then(|| w.detach()),
            a: nx.then(|| a.detach()),
            b: (nx || na).then(|| b.detach()),
            h: nb.then_some(h),
            o: nm.then_some(o),
            nu: nut,
            g,
            dropout,
            dims: (nrows, m, n, r, s),
        })
    }))
}

struct DoraBwd {
    x_shape: Shape,
    /// X̃ (dropped-out X when dropout is on), for dA.
    x: Option<Tensor>,
    w: Option<Tensor>,
    a: Option<Tensor>,
    b: Option<Tensor>,
    h: Option<Tensor>,
    /// O = X·Wᵀ + s·H·Bᵀ before the row scaling [N, m], for dmag.
    o: Option<Tensor>,
    /// ν [m] (as used in the forward) and g = mag/ν [m].
    nu: Tensor,
    g: Tensor,
    dropout: Option<Dropout>,
    dims: (usize, usize, usize, usize, f64),
}

impl Backward for DoraBwd {
    fn name(&self) -> &'static str {
        "dora_linear"
    }
    /// ν constant. With dO = dY·diag(g) and G = dO·B [N, r]:
    ///   dmag_i = Σ_t dY[t, i]·O[t, i] / ν_i
    ///   dX = dO·W + s·(G·A) ⊙ mask/(1−p);  dA = s·Gᵀ·X̃;  dB = s·dOᵀ·H
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let (nrows, m, n, r, s) = self.dims;
        let (nx, na, nb, nm) = (needs[0], needs[1], needs[2], needs[3]);
        with_float!(dy.dtype(), "dora_linear.backward", |T| {
            let gy = dy.read();
            let gy = vals::<T>(&gy);
            let st = T::from_f64(s);
            let gv = self.g.to_vec::<T>();
            let dmag = match (nm, &self.o) {
                (true, Some(o)) => {
                    let ov = o.read();
                    let ov = vals::<T>(&ov);
                    let mut acc = crate::backend::cpu::zeros::<T>(m);
                    for (gr, or) in gy.chunks(m).zip(ov.chunks(m)) {
                        acc.iter_mut().zip(gr.iter().zip(or)).for_each(|(a, (g, o))| *a += *g * *o);
                    }
                    let nu = self.nu.to_vec::<T>();
                    Some(out(acc.iter().zip(&nu).map(|(a, n)| *a / *n).collect::<Vec<T>>(), [m]))
                }
                _ => None,
            };
            // dO = dY·diag(g)
            let go: Vec<T> = gy.chunks(m).flat_map(|row| row.iter().zip(&gv).map(|(d, g)| *d * *g)).collect();
            let gb = self.b.as_ref().map(|b| {
                let mut g = crate::backend::cpu::zeros::<T>(nrows * r);
                cpu::gemm(&mut g, &go, &vals::<T>(&b.read()), nrows, m, r, false, false, T::ONE, T::ZERO);
                g
            });
            let dx = match (nx, &self.w, &self.a, &gb) {
                (true, Some(w), Some(a), Some(gb)) => {
                    let mut dx = crate::backend::cpu::zeros::<T>(nrows * n);
                    cpu::gemm_stored(&mut dx, &go, &w.read(), 0, nrows, m, n, false, false, T::ZERO);
                    match self.dropout {
                        Some(dr) => {
                            let mut ga = crate::backend::cpu::zeros::<T>(nrows * n);
                            cpu::gemm(&mut ga, gb, &vals::<T>(&a.read()), nrows, r, n, false, false, st, T::ZERO);
                            dx.iter_mut().zip(&ga).enumerate().for_each(|(i, (d, v))| *d += *v * T::from_f64(dr.factor(i)));
                        }
                        None => cpu::gemm(&mut dx, gb, &vals::<T>(&a.read()), nrows, r, n, false, false, st, T::ONE),
                    }
                    Some(out(dx, self.x_shape.clone()))
                }
                _ => None,
            };
            let da = match (na, &self.x, &gb) {
                (true, Some(x), Some(gb)) => {
                    let mut da = crate::backend::cpu::zeros::<T>(r * n);
                    cpu::gemm(&mut da, gb, &vals::<T>(&x.read()), r, nrows, n, true, false, st, T::ZERO);
                    Some(out(da, [r, n]))
                }
                _ => None,
            };
            let db = match (nb, &self.h) {
                (true, Some(h)) => {
                    let mut db = crate::backend::cpu::zeros::<T>(m * r);
                    cpu::gemm(&mut db, &go, &vals::<T>(&h.read()), m, nrows, r, true, false, st, T::ZERO);
                    Some(out(db, [m, r]))
                }
                _ => None,
            };
            Ok(vec![dx, da, db, dmag])
        })
    }
}

/// The merged DoRA weight diag(mag/ν)·(W + s·B·A), f64 [m, n] (for merging only).
pub fn dora_merged(w: &Tensor, wnorm2: &[f64], a: &[f64], b: &[f64], mag: &[f64], r: usize, s: f64) -> Vec<f64> {
    let (m, n) = (w.dims()[0], w.dims()[1]);
    let nu = dora_row_norms(w, wnorm2, a, b, r, s);
    let mut wm = w.to_vec_f64();
    for i in 0..m {
        let g = mag[i] / nu[i].max(MIN_NORM);
        for j in 0..n {
            let ba: f64 = (0..r).map(|q| b[i * r + q] * a[q * n + j]).sum();
            wm[i * n + j] = g * (wm[i * n + j] + s * ba);
        }
    }
    wm
}
