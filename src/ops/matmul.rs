//! Matrix products: C = op(A)·op(B), op = identity or transpose (flags, never strided views).
//!
//! A: [..batch, r, c] (rank ≥ 2). B: [r2, c2] shared by every batch, or [..batch, r2, c2].
//! B may be a frozen weight stored in any dtype (bf16/f16 mapped, say): it is then converted per
//! tile inside the GEMM and never copied whole, and needs no gradient. A trainable B must have
//! A's dtype.

use super::{check_dtype, compute_dtype};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::Gemm;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    /// B has its own matrix per batch (else one B is shared).
    b_batched: bool,
}

impl Dims {
    /// One GEMM over batch·m rows when B is shared and A is not transposed.
    fn folded(&self) -> bool {
        !self.b_batched && !self.ta
    }
}

fn dims(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<(Dims, Shape)> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() < 2 {
        return Err(Error::shape("matmul", "a", "rank ≥ 2", a.shape()));
    }
    let r = ad.len();
    let batch_dims = &ad[..r - 2];
    let b_batched = match bd.len() {
        2 => false,
        n if n == r && &bd[..n - 2] == batch_dims => true,
        _ => return Err(Error::shape("matmul", "b", format!("[r, c] or [{batch_dims:?}.., r, c]"), b.shape())),
    };
    let (m, k) = if ta { (ad[r - 1], ad[r - 2]) } else { (ad[r - 2], ad[r - 1]) };
    let bl = bd.len();
    let (k2, n) = if tb { (bd[bl - 1], bd[bl - 2]) } else { (bd[bl - 2], bd[bl - 1]) };
    if k != k2 {
        return Err(Error::shape("matmul", "b", format!("inner dim {k} (a is {}, ta={ta}, tb={tb})", a.shape()), b.shape()));
    }
    let mut out_dims = batch_dims.to_vec();
    out_dims.extend([m, n]);
    Ok((Dims { batch: batch_dims.iter().product(), m, k, n, ta, tb, b_batched }, Shape::new(out_dims)))
}

/// C = op(A)·op(B) (see the module docs for the shapes).
pub fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    matmul_with(a, b, ta, tb, false)
}

/// [`matmul`]; with `frozen`, B is a frozen weight and its products (forward and dA) may run at
/// the process's matmul precision (`backend::amx`).
fn matmul_with(a: &Tensor, b: &Tensor, ta: bool, tb: bool, frozen: bool) -> Result<Tensor> {
    let dt = compute_dtype("matmul", "a", a)?;
    check_dtype("matmul", "b", b, dt, false)?;
    let (d, shape) = dims(a, b, ta, tb)?;
    let k = kernels_for("matmul", &[("a", a), ("b", b)])?;
    let mut c = k.zeros(dt, shape.numel(), "matmul")?;
    let mut g = Gemm::new(d.m, d.k, d.n).trans(d.ta, d.tb).batched(d.batch, d.b_batched);
    g.frozen = frozen;
    k.gemm(&mut c, &a.read(), &b.read(), &g, "matmul")?;
    let y = Tensor::from_storage(c, shape);
    Ok(record(y, &[a, b], |needs| {
        // dA needs B; dB needs A. Save each only if the other side wants a gradient.
        Box::new(MatmulBwd {
            a: needs[1].then(|| a.detach()),
            b: needs[0].then(|| b.detach()),
            a_shape: a.shape().clone(),
            b_shape: b.shape().clone(),
            d,
            frozen,
        })
    }))
}

/// A linear layer without bias: y = x·Wᵀ for x [.., in], W [out, in] → y [.., out].
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dims().len() != 2 || x.dims().is_empty() || x.shape().last() != w.dims()[1] {
        return Err(Error::shape("linear", "w", format!("[out, {}]", x.shape().last()), w.shape()));
    }
    let x2 = super::reshape(x, [x.shape().rows(), x.shape().last()])?;
    // A weight that takes no gradient is frozen (a full fine-tuning's trainable one is not).
    let y = matmul_with(&x2, w, false, true, !w.requires_grad())?;
    let mut od = x.dims().to_vec();
    *od.last_mut().unwrap_or(&mut 0) = w.dims()[0];
    super::reshape(&y, od)
}

struct MatmulBwd {
    a: Option<Tensor>,
    b: Option<Tensor>,
    a_shape: Shape,
    b_shape: Shape,
    d: Dims,
    frozen: bool,
}

impl Backward for MatmulBwd {
    fn name(&self) -> &'static str {
        "matmul"
    }
    /// dA = dC·op(B)ᵀ (transposed back if ta);  dB = op(A)ᵀ·dC, or dCᵀ·op(A) if tb
    /// (summed over the batch when B is shared).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "matmul.backward";
        let kr = kernels_for(OP, &[("dy", dy)])?;
        let (g, dt) = (dy.read(), dy.dtype());
        let Dims { batch, m, k, n, ta, tb, b_batched } = self.d;
        let da = match (&self.b, needs[0]) {
            (Some(b), true) => {
                let bg = b.read();
                let mut da = kr.zeros(dt, batch * m * k, OP)?;
                // dC·op(B)ᵀ [batch, m, k]: op(B)ᵀ is B read with the opposite transpose flag.
                let mut gm = Gemm::new(m, n, k).trans(false, !tb).batched(batch, b_batched);
                gm.frozen = self.frozen;
                if ta {
                    // dA is stored [k×m] per batch = (dC·op(B)ᵀ)ᵀ.
                    let mut tmp = kr.zeros(dt, batch * m * k, OP)?;
                    kr.gemm(&mut tmp, &g, &bg, &gm, OP)?;
                    kr.transpose(&mut da, &tmp, batch, m, k, OP)?;
                } else {
                    kr.gemm(&mut da, &g, &bg, &gm, OP)?;
                }
                Some(Tensor::from_storage(da, self.a_shape.clone()))
            }
            _ => None,
        };
        let db = match (&self.a, needs[1]) {
            (Some(a), true) => {
                let ag = a.read();
                let bn = k * n;
                let mut db = kr.zeros(dt, if b_batched { batch * bn } else { bn }, OP)?;
                let (mm, nb) = if self.d.folded() { (batch * m, 1) } else { (m, batch) };
                for i in 0..nb {
                    // Batch i of dB, or the shared dB accumulated over the batches.
                    let (c_off, beta) = if b_batched { (i * bn, 0.0) } else { (0, if i == 0 { 0.0 } else { 1.0 }) };
                    let (g_off, a_off) = (i * mm * n, i * mm * k);
                    let gm = if tb {
                        // dB [n, k] = dCᵀ·op(A)
                        Gemm::new(n, mm, k).trans(true, ta).offsets(g_off, a_off, c_off)
                    } else {
                        // dB [k, n] = op(A)ᵀ·dC
                        Gemm::new(k, mm, n).trans(!ta, false).offsets(a_off, g_off, c_off)
                    };
                    let gm = gm.scaled(1.0, beta);
                    if tb {
                        kr.gemm(&mut db, &g, &ag, &gm, OP)?;
                    } else {
                        kr.gemm(&mut db, &ag, &g, &gm, OP)?;
                    }
                }
                Some(Tensor::from_storage(db, self.b_shape.clone()))
            }
            _ => None,
        };
        Ok(vec![da, db])
    }
}
