//! Matrix products: C = op(A)·op(B), op = identity or transpose (flags, never strided views).
//!
//! A: [..batch, r, c] (rank ≥ 2). B: [r2, c2] shared by every batch, or [..batch, r2, c2].
//! B may be a frozen weight stored in any dtype (bf16/f16 mapped, say): it is then converted per
//! tile inside the GEMM and never copied whole, and needs no gradient. A trainable B must have
//! A's dtype.

use super::{check_dtype, compute_dtype, out, vals};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::cpu;
use crate::device::with_float;
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::shape::Shape;
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
    let dt = compute_dtype("matmul", "a", a)?;
    check_dtype("matmul", "b", b, dt, false)?;
    let (d, shape) = dims(a, b, ta, tb)?;
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[a, b]) {
        return crate::backend::cuda::ops::matmul(a, b, ta, tb, d.batch, d.m, d.k, d.n, d.b_batched, shape);
    }
    let y = with_float!(dt, "matmul", |T| {
        let mut c = crate::backend::cpu::zeros::<T>(shape.numel());
        let (ag, bg) = (a.read(), b.read());
        let av = vals::<T>(&ag);
        if d.folded() {
            cpu::gemm_stored(&mut c, &av, &bg, 0, d.batch * d.m, d.k, d.n, false, d.tb, T::ZERO);
        } else {
            for i in 0..d.batch {
                let b0 = if d.b_batched { i * d.k * d.n } else { 0 };
                cpu::gemm_stored(
                    &mut c[i * d.m * d.n..(i + 1) * d.m * d.n],
                    &av[i * d.m * d.k..(i + 1) * d.m * d.k],
                    &bg,
                    b0,
                    d.m,
                    d.k,
                    d.n,
                    d.ta,
                    d.tb,
                    T::ZERO,
                );
            }
        }
        Ok(out(c, shape))
    })?;
    Ok(record(y, &[a, b], |needs| {
        // dA needs B; dB needs A. Save each only if the other side wants a gradient.
        Box::new(MatmulBwd { a: needs[1].then(|| a.detach()), b: needs[0].then(|| b.detach()), a_shape: a.shape().clone(), b_shape: b.shape().clone(), d })
    }))
}

/// A linear layer without bias: y = x·Wᵀ for x [.., in], W [out, in] → y [.., out].
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dims().len() != 2 || x.dims().is_empty() || x.shape().last() != w.dims()[1] {
        return Err(Error::shape("linear", "w", format!("[out, {}]", x.shape().last()), w.shape()));
    }
    let x2 = super::reshape(x, [x.shape().rows(), x.shape().last()])?;
    let y = matmul(&x2, w, false, true)?;
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
}

impl Backward for MatmulBwd {
    fn name(&self) -> &'static str {
        "matmul"
    }
    /// dA = dC·op(B)ᵀ (transposed back if ta);  dB = op(A)ᵀ·dC, or dCᵀ·op(A) if tb
    /// (summed over the batch when B is shared).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "matmul.backward", |T| {
            let g = dy.read();
            let g = vals::<T>(&g);
            let Dims { batch, m, k, n, ta, tb, b_batched } = self.d;
            let da = match (&self.b, needs[0]) {
                (Some(b), true) => {
                    let bg = b.read();
                    let mut da = crate::backend::cpu::zeros::<T>(batch * m * k);
                    if self.d.folded() {
                        cpu::gemm_stored(&mut da, &g, &bg, 0, batch * m, n, k, false, !tb, T::ZERO);
                    } else {
                        let mut tmp = crate::backend::cpu::zeros::<T>(m * k);
                        for i in 0..batch {
                            let b0 = if b_batched { i * k * n } else { 0 };
                            let gi = &g[i * m * n..(i + 1) * m * n];
                            let dai = &mut da[i * m * k..(i + 1) * m * k];
                            if ta {
                                // dA is stored [k×m] = (dC·op(B)ᵀ)ᵀ.
                                cpu::gemm_stored(&mut tmp, gi, &bg, b0, m, n, k, false, !tb, T::ZERO);
                                transpose(dai, &tmp, m, k);
                            } else {
                                cpu::gemm_stored(dai, gi, &bg, b0, m, n, k, false, !tb, T::ZERO);
                            }
                        }
                    }
                    Some(out(da, self.a_shape.clone()))
                }
                _ => None,
            };
            let db = match (&self.a, needs[1]) {
                (Some(a), true) => {
                    let ag = a.read();
                    let av = vals::<T>(&ag);
                    let bn = k * n;
                    let mut db = crate::backend::cpu::zeros::<T>(if b_batched { batch * bn } else { bn });
                    let (mm, nb) = if self.d.folded() { (batch * m, 1) } else { (m, batch) };
                    for i in 0..nb {
                        let ai = &av[i * mm * k..(i + 1) * mm * k];
                        let gi = &g[i * mm * n..(i + 1) * mm * n];
                        let (dbi, beta) =
                            if b_batched { (&mut db[i * bn..(i + 1) * bn], T::ZERO) } else { (&mut db[..], if i == 0 { T::ZERO } else { T::ONE }) };
                        if tb {
                            cpu::gemm(dbi, gi, ai, n, mm, k, true, ta, T::ONE, beta);
                        } else {
                            cpu::gemm(dbi, ai, gi, k, mm, n, !ta, false, T::ONE, beta);
                        }
                    }
                    Some(out(db, self.b_shape.clone()))
                }
                _ => None,
            };
            Ok(vec![da, db])
        })
    }
}

fn transpose<T: Float>(dst: &mut [T], src: &[T], rows: usize, cols: usize) {
    for i in 0..rows {
        for j in 0..cols {
            dst[j * rows + i] = src[i * cols + j];
        }
    }
}
