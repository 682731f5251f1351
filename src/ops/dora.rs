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

use super::adapter::{tensor, Dropout};
use super::{check_dtype, check_shape, compute_dtype};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::{cpu, Gemm};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

/// Smallest row norm divided by (a zero row of W + s·B·A gives g_i = mag_i / 1e-30).
const MIN_NORM: f64 = 1e-30;

/// ν_i = ‖W_i + s·B_i·A‖ `[m]` on the device of the inputs, outside the graph (a constant for
/// [`dora_linear`]'s backward): w [m, n] frozen (any stored dtype), wnorm2 `[m]` = ‖W_i‖²,
/// a [r, n], b [m, r]. Two small GEMMs (A·Wᵀ [r, m] over the stored W, A·Aᵀ [r, r]) and the
/// per-row combination of [`Kernels::dora_norms`](crate::backend::Kernels::dora_norms); W + s·B·A
/// is never formed. f64 on the CPU (as [`dora_row_norms`]), f32 on the device.
pub fn dora_nu(w: &Tensor, wnorm2: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    const OP: &str = "dora_row_norms";
    if w.dims().len() != 2 {
        return Err(Error::shape(OP, "w", "[out, in]", w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    if a.dims().len() != 2 || a.dims()[1] != n || a.dims()[0] == 0 {
        return Err(Error::shape(OP, "a", format!("[r, {n}]"), a.shape()));
    }
    let r = a.dims()[0];
    check_shape(OP, "b", b, &[m, r])?;
    check_shape(OP, "wnorm2", wnorm2, &[m])?;
    if !s.is_finite() {
        return Err(Error::invalid(OP, format!("scale must be finite, got {s}")));
    }
    let k = kernels_for(OP, &[("w", w), ("wnorm2", wnorm2), ("a", a), ("b", b)])?;
    let dt = if k.device() == Device::Cpu { DType::F64 } else { DType::F32 };
    // a, b, ‖W_i‖² in dt: converted copies only where the stored dtype differs.
    let conv = |t: &Tensor| -> Result<Option<Storage>> {
        if t.dtype() == dt {
            Ok(None)
        } else {
            k.upload(&t.read(), dt, OP).map(Some)
        }
    };
    let (ac, bc, wc) = (conv(a)?, conv(b)?, conv(wnorm2)?);
    let (ag, bg, wg) = (a.read(), b.read(), wnorm2.read());
    let (av, bv, wn) = (ac.as_ref().unwrap_or(&ag), bc.as_ref().unwrap_or(&bg), wc.as_ref().unwrap_or(&wg));
    let mut awt = k.zeros(dt, r * m, OP)?;
    k.gemm(&mut awt, av, &w.read(), &Gemm::new(r, n, m).trans(false, true), OP)?;
    let mut aat = k.zeros(dt, r * r, OP)?;
    k.gemm(&mut aat, av, av, &Gemm::new(r, n, r).trans(false, true), OP)?;
    let mut nu = k.zeros(dt, m, OP)?;
    k.dora_norms(&mut nu, wn, bv, &awt, &aat, r, s)?;
    Ok(tensor(nu, [m]))
}

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
    let k = kernels_for(OP, &[("x", x), ("w", w), ("nu", nu), ("a", a), ("b", b), ("mag", mag)])?;
    let nrows = x.shape().rows();
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank checked") = m;
    // ν is [m]: its check reads m values (never W).
    if nu.try_to_vec::<f64>()?.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(Error::invalid(OP, "the row norms nu must be finite and ≥ 0"));
    }
    let xg = x.read();
    // O = X·Wᵀ + s·(X̃·Aᵀ)·Bᵀ  [N, m]
    let mut o = k.zeros(dt, nrows * m, OP)?;
    k.gemm(&mut o, &xg, &w.read(), &Gemm::new(nrows, n, m).trans(false, true).frozen(), OP)?;
    let xd = match dropout {
        Some(dr) => {
            let mut xd = k.zeros(dt, nrows * n, OP)?;
            k.dropout_apply(&mut xd, &xg, dr.p, dr.seed, false)?;
            Some(xd)
        }
        None => None,
    };
    let mut h = k.zeros(dt, nrows * r, OP)?;
    k.gemm(&mut h, xd.as_ref().unwrap_or(&xg), &a.read(), &Gemm::new(nrows, n, r).trans(false, true), OP)?;
    k.gemm(&mut o, &h, &b.read(), &Gemm::new(nrows, r, m).trans(false, true).scaled(s, 1.0), OP)?;
    drop(xg);
    // g = mag / ν̂ with ν̂ = max(ν, MIN_NORM) rounded to the compute dtype first, so that
    // mag = ‖W_i‖ (init) gives g = 1 exactly;  Y = O·diag(g).
    let (mut g, mut nut) = (k.zeros(dt, m, OP)?, k.zeros(dt, m, OP)?);
    k.dora_scale(&mut g, &mut nut, &nu.read(), &mag.read(), MIN_NORM)?;
    let mut y = k.zeros(dt, nrows * m, OP)?;
    k.scale_cols(&mut y, &o, &g)?;
    let (y, o, h) = (tensor(y, Shape::new(out_dims)), tensor(o, [nrows, m]), tensor(h, [nrows, r]));
    let (xd, g, nut) = (xd.map(|v| tensor(v, [nrows, n])), tensor(g, [m]), tensor(nut, [m]));
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
    /// ν̂ [m] (as used in the forward) and g = mag/ν̂ [m].
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
        const OP: &str = "dora_linear.backward";
        let (nrows, m, n, r, s) = self.dims;
        let (nx, na, nb, nm) = (needs[0], needs[1], needs[2], needs[3]);
        let k = kernels_for(OP, &[("dy", dy)])?;
        let dt = dy.dtype();
        let gy = dy.read();
        let dmag = match (nm, &self.o) {
            (true, Some(o)) => {
                let mut dm = k.zeros(dt, m, OP)?;
                k.col_dot(&mut dm, &gy, m, None, &o.read(), Some(&self.nu.read()), true)?;
                Some(tensor(dm, [m]))
            }
            _ => None,
        };
        // dO = dY·diag(g)
        let mut go = k.zeros(dt, nrows * m, OP)?;
        k.scale_cols(&mut go, &gy, &self.g.read())?;
        drop(gy);
        let gb = match &self.b {
            Some(b) => {
                let mut g = k.zeros(dt, nrows * r, OP)?;
                k.gemm(&mut g, &go, &b.read(), &Gemm::new(nrows, m, r), OP)?;
                Some(g)
            }
            None => None,
        };
        let dx = match (nx, &self.w, &self.a, &gb) {
            (true, Some(w), Some(a), Some(gb)) => {
                let mut dx = k.zeros(dt, nrows * n, OP)?;
                k.gemm(&mut dx, &go, &w.read(), &Gemm::new(nrows, m, n).frozen(), OP)?;
                match self.dropout {
                    Some(dr) => {
                        let mut ga = k.zeros(dt, nrows * n, OP)?;
                        k.gemm(&mut ga, gb, &a.read(), &Gemm::new(nrows, r, n).scaled(s, 0.0), OP)?;
                        k.dropout_apply(&mut dx, &ga, dr.p, dr.seed, true)?;
                    }
                    None => k.gemm(&mut dx, gb, &a.read(), &Gemm::new(nrows, r, n).scaled(s, 1.0), OP)?,
                }
                Some(tensor(dx, self.x_shape.clone()))
            }
            _ => None,
        };
        let da = match (na, &self.x, &gb) {
            (true, Some(x), Some(gb)) => {
                let mut da = k.zeros(dt, r * n, OP)?;
                k.gemm(&mut da, gb, &x.read(), &Gemm::new(r, nrows, n).trans(true, false).scaled(s, 0.0), OP)?;
                Some(tensor(da, [r, n]))
            }
            _ => None,
        };
        let db = match (nb, &self.h) {
            (true, Some(h)) => {
                let mut db = k.zeros(dt, m * r, OP)?;
                k.gemm(&mut db, &go, &h.read(), &Gemm::new(m, nrows, r).trans(true, false).scaled(s, 0.0), OP)?;
                Some(tensor(db, [m, r]))
            }
            _ => None,
        };
        Ok(vec![dx, da, db, dmag])
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
