//! Elementwise ops: add (residuals, biases), mul, scale, silu, and the fused SwiGLU gate.
//! `add` and `mul` broadcast `b` over the leading dims of `a` when `b`'s shape is a suffix of
//! `a`'s (a bias [c] onto activations [rows, c]).

use super::{check_dtype, compute_dtype, out, vals};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::cpu;
use crate::device::with_float;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::Tensor;

fn check_broadcast(op: &'static str, a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.shape() == b.shape() {
        return Ok(false);
    }
    if b.numel() > 0 && a.shape().ends_with(b.shape()) {
        return Ok(true);
    }
    Err(Error::shape(op, "b", format!("{} or a suffix of it", a.shape()), b.shape()))
}

/// y = a + b.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = compute_dtype("add", "a", a)?;
    check_dtype("add", "b", b, dt, false)?;
    let broadcast = check_broadcast("add", a, b)?;
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[a, b]) {
        return crate::backend::cuda::ops::add(a, b, broadcast);
    }
    let y = with_float!(dt, "add", |T| {
        let (ag, bg) = (a.read(), b.read());
        let mut y = crate::backend::cpu::zeros::<T>(a.numel());
        cpu::add_fwd(&mut y, &vals::<T>(&ag), &vals::<T>(&bg));
        Ok(out(y, a.shape().clone()))
    })?;
    let b_shape = b.shape().clone();
    Ok(record(y, &[a, b], |_| Box::new(AddBwd { b_shape, broadcast })))
}

struct AddBwd {
    b_shape: Shape,
    broadcast: bool,
}
impl Backward for AddBwd {
    fn name(&self) -> &'static str {
        "add"
    }
    /// da = dy;  db = dy (or Σ over the broadcast dims).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let db = if !needs[1] {
            None
        } else if self.broadcast {
            Some(with_float!(dy.dtype(), "add.backward", |T| {
                let mut db = crate::backend::cpu::zeros::<T>(self.b_shape.numel());
                cpu::sum_leading(&mut db, &vals::<T>(&dy.read()));
                Ok(out(db, self.b_shape.clone()))
            })?)
        } else {
            Some(dy.detach())
        };
        Ok(vec![needs[0].then(|| dy.detach()), db])
    }
}

/// y = a ⊙ b.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = compute_dtype("mul", "a", a)?;
    check_dtype("mul", "b", b, dt, false)?;
    let broadcast = check_broadcast("mul", a, b)?;
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[a, b]) {
        return crate::backend::cuda::ops::mul(a, b, broadcast);
    }
    let y = with_float!(dt, "mul", |T| {
        let (ag, bg) = (a.read(), b.read());
        let mut y = crate::backend::cpu::zeros::<T>(a.numel());
        cpu::mul_fwd(&mut y, &vals::<T>(&ag), &vals::<T>(&bg));
        Ok(out(y, a.shape().clone()))
    })?;
    Ok(record(y, &[a, b], |needs| Box::new(MulBwd { a: needs[1].then(|| a.detach()), b: needs[0].then(|| b.detach()), b_shape: b.shape().clone(), broadcast })))
}

struct MulBwd {
    a: Option<Tensor>,
    b: Option<Tensor>,
    b_shape: Shape,
    broadcast: bool,
}
impl Backward for MulBwd {
    fn name(&self) -> &'static str {
        "mul"
    }
    /// da = dy ⊙ b;  db = dy ⊙ a (summed over broadcast dims).
    fn backward(&self, dy: &Tensor, _needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "mul.backward", |T| {
            let g = dy.read();
            let g = vals::<T>(&g);
            let da = self.b.as_ref().map(|b| {
                let mut da = crate::backend::cpu::zeros::<T>(g.len());
                cpu::mul_fwd(&mut da, &g, &vals::<T>(&b.read()));
                out(da, dy.shape().clone())
            });
            let db = self.a.as_ref().map(|a| {
                let av = a.read();
                let av = vals::<T>(&av);
                let bshape = self.b_shape.clone();
                if self.broadcast {
                    let mut db = crate::backend::cpu::zeros::<T>(bshape.numel());
                    cpu::sum_leading_mul(&mut db, &g, &av);
                    out(db, bshape)
                } else {
                    let mut db = crate::backend::cpu::zeros::<T>(g.len());
                    cpu::mul_fwd(&mut db, &g, &av);
                    out(db, bshape)
                }
            });
            Ok(vec![da, db])
        })
    }
}
/// y = s·x for a constant s.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    let dt = compute_dtype("scale", "x", x)?;
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[x]) {
        return crate::backend::cuda::ops::scale(x, s);
    }
    let y = with_float!(dt, "scale", |T| {
        let mut y = crate::backend::cpu::zeros::<T>(x.numel());
        cpu::scale(&mut y, &vals::<T>(&x.read()), T::from_f64(s));
        Ok(out(y, x.shape().clone()))
    })?;
    Ok(record(y, &[x], |_| Box::new(ScaleBwd { s })))
}

struct ScaleBwd {
    s: f64,
}
impl Backward for ScaleBwd {
    fn name(&self) -> &'static str {
        "scale"
    }
    /// dx = s·dy.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "scale.backward", |T| {
            let mut dx = crate::backend::cpu::zeros::<T>(dy.numel());
            cpu::scale(&mut dx, &vals::<T>(&dy.read()), T::from_f64(self.s));
            Ok(vec![Some(out(dx, dy.shape().clone()))])
        })
    }
}

/// y = silu(x) = x·σ(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let dt = compute_dtype("silu", "x", x)?;
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[x]) {
        return crate::backend::cuda::ops::silu(x);
    }
    let y = with_float!(dt, "silu", |T| {
        let mut y = crate::backend::cpu::zeros::<T>(x.numel());
        cpu::silu_fwd(&mut y, &vals::<T>(&x.read()));
        Ok(out(y, x.shape().clone()))
    })?;
    Ok(record(y, &[x], |_| Box::new(SiluBwd { x: x.detach() })))
}

struct SiluBwd {
    x: Tensor,
}
impl Backward for SiluBwd {
    fn name(&self) -> &'static str {
        "silu"
    }
    /// dx = dy·σ(x)(1 + x(1 − σ(x))).
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "silu.backward", |T| {
            let mut dx = crate::backend::cpu::zeros::<T>(dy.numel());
            cpu::silu_bwd(&mut dx, &vals::<T>(&dy.read()), &vals::<T>(&self.x.read()));
            Ok(vec![Some(out(dx, dy.shape().clone()))])
        })
    }
}

/// Fused SwiGLU: y = silu(gate) ⊙ up, gate and up of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let dt = check_swiglu_inputs(gate, up)?;
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[gate, up]) {
        return crate::backend::cuda::ops::swiglu(gate, up);
    }
    let y = with_float!(dt, "swiglu", |T| {
        let mut y = crate::backend::cpu::zeros::<T>(gate.numel());
        cpu::swiglu_fwd(&mut y, &vals::<T>(&gate.read()), &vals::<T>(&up.read()));
        Ok(out(y, gate.shape().clone()))
    })?;
    Ok(record(y, &[gate, up], |_| Box::new(SwigluBwd { g: gate.detach(), u: up.detach() })))
}

/// The checks [`swiglu`] makes on its inputs (same dtype, same shape); returns the dtype. Also
/// for callers that record swiglu(gate, up) without forming it.
pub(crate) fn check_swiglu_inputs(gate: &Tensor, up: &Tensor) -> Result<crate::dtype::DType> {
    let dt = compute_dtype("swiglu", "gate", gate)?;
    check_dtype("swiglu", "up", up, dt, true)?;
    if gate.shape() != up.shape() {
        return Err(Error::shape("swiglu", "up", gate.shape(), up.shape()));
    }
    Ok(dt)
}

struct SwigluBwd {
    g: Tensor,
    u: Tensor,
}
impl Backward for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    /// dgate = dy ⊙ up ⊙ silu'(gate);  dup = dy ⊙ silu(gate).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "swiglu.backward", |T| {
            let n = dy.numel();
            let (mut dg, mut du) = (crate::backend::cpu::zeros::<T>(n), crate::backend::cpu::zeros::<T>(n));
            cpu::swiglu_bwd(&mut dg, &mut du, &vals::<T>(&dy.read()), &vals::<T>(&self.g.read()), &vals::<T>(&self.u.read()));
            Ok(vec![needs[0].then(|| out(dg, dy.shape().clone())), needs[1].then(|| out(du, dy.shape().clone()))])
        })
    }
}
