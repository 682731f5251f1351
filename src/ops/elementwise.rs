//! Elementwise ops: add (residuals, biases), mul, scale, silu, gelu_tanh, softcap, and the fused gates
//! SwiGLU (Llama) and GeGLU (Gemma). `add` and `mul` broadcast `b` over the leading dims of `a`
//! when `b`'s shape is a suffix of `a`'s (a bias [c] onto activations [rows, c]).

use super::{check_dtype, compute_dtype};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::Kernels;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::tensor::kernels_for;
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
    let k = kernels_for("add", &[("a", a), ("b", b)])?;
    let mut y = k.zeros(dt, a.numel(), "add")?;
    k.add(&mut y, &a.read(), &b.read(), "add")?;
    let y = Tensor::from_storage(y, a.shape().clone());
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
        const OP: &str = "add.backward";
        let db = if !needs[1] {
            None
        } else if self.broadcast {
            let k = kernels_for(OP, &[("dy", dy)])?;
            let mut db = k.zeros(dy.dtype(), self.b_shape.numel(), OP)?;
            k.sum_leading(&mut db, &dy.read(), None, OP)?;
            Some(Tensor::from_storage(db, self.b_shape.clone()))
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
    let k = kernels_for("mul", &[("a", a), ("b", b)])?;
    let mut y = k.zeros(dt, a.numel(), "mul")?;
    k.mul(&mut y, &a.read(), &b.read(), "mul")?;
    let y = Tensor::from_storage(y, a.shape().clone());
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
        const OP: &str = "mul.backward";
        let k = kernels_for(OP, &[("dy", dy)])?;
        let (g, dt) = (dy.read(), dy.dtype());
        let da = match &self.b {
            Some(b) => {
                let mut da = k.zeros(dt, dy.numel(), OP)?;
                k.mul(&mut da, &g, &b.read(), OP)?;
                Some(Tensor::from_storage(da, dy.shape().clone()))
            }
            None => None,
        };
        let db = match &self.a {
            Some(a) => {
                let mut db = k.zeros(dt, self.b_shape.numel(), OP)?;
                if self.broadcast {
                    k.sum_leading(&mut db, &g, Some(&a.read()), OP)?;
                } else {
                    k.mul(&mut db, &g, &a.read(), OP)?;
                }
                Some(Tensor::from_storage(db, self.b_shape.clone()))
            }
            None => None,
        };
        Ok(vec![da, db])
    }
}

/// y = s·x on `x`'s device (the forward and the backward of [`scale`]).
fn scaled(x: &Tensor, s: f64, op: &'static str) -> Result<Tensor> {
    let k = kernels_for(op, &[("x", x)])?;
    let mut y = k.zeros(x.dtype(), x.numel(), op)?;
    k.scale(&mut y, &x.read(), s, op)?;
    Ok(Tensor::from_storage(y, x.shape().clone()))
}

/// y = s·x for a constant s.
pub fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    compute_dtype("scale", "x", x)?;
    let y = scaled(x, s, "scale")?;
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
        Ok(vec![Some(scaled(dy, self.s, "scale.backward")?)])
    }
}

/// A pointwise activation f and its derivative, as a pair of kernels.
#[derive(Clone, Copy)]
enum Act {
    Silu,
    GeluTanh,
}

impl Act {
    fn name(self) -> &'static str {
        match self {
            Act::Silu => "silu",
            Act::GeluTanh => "gelu_tanh",
        }
    }
}

fn unary(x: &Tensor, act: Act) -> Result<Tensor> {
    let op = act.name();
    let dt = compute_dtype(op, "x", x)?;
    let k = kernels_for(op, &[("x", x)])?;
    let mut y = k.zeros(dt, x.numel(), op)?;
    match act {
        Act::Silu => k.silu_fwd(&mut y, &x.read())?,
        Act::GeluTanh => k.gelu_tanh_fwd(&mut y, &x.read())?,
    }
    let y = Tensor::from_storage(y, x.shape().clone());
    Ok(record(y, &[x], |_| Box::new(UnaryBwd { x: x.detach(), act })))
}

/// y = silu(x) = x·σ(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    unary(x, Act::Silu)
}

/// y = gelu_tanh(x) = ½x(1 + tanh(√(2/π)(x + 0.044715x³))), the tanh approximation of GELU
/// (Gemma's `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    unary(x, Act::GeluTanh)
}

struct UnaryBwd {
    x: Tensor,
    act: Act,
}
impl Backward for UnaryBwd {
    fn name(&self) -> &'static str {
        self.act.name()
    }
    /// dx = dy·f'(x):
    ///   silu'(x) = σ(x)(1 + x(1 − σ(x)));
    ///   gelu_tanh'(x) = ½(1 + τ) + ½x(1 − τ²)·√(2/π)(1 + 3·0.044715x²), τ = tanh(√(2/π)(x + 0.044715x³)).
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = self.act.name();
        let k = kernels_for(op, &[("dy", dy), ("x", &self.x)])?;
        let mut dx = k.zeros(dy.dtype(), dy.numel(), op)?;
        match self.act {
            Act::Silu => k.silu_bwd(&mut dx, &dy.read(), &self.x.read())?,
            Act::GeluTanh => k.gelu_tanh_bwd(&mut dx, &dy.read(), &self.x.read())?,
        }
        Ok(vec![Some(Tensor::from_storage(dx, dy.shape().clone()))])
    }
}

/// Fused SwiGLU: y = silu(gate) ⊙ up, gate and up of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gated(gate, up, Act::Silu)
}

/// Fused GeGLU: y = gelu_tanh(gate) ⊙ up, gate and up of one shape (Gemma's MLP).
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gated(gate, up, Act::GeluTanh)
}

fn gated(gate: &Tensor, up: &Tensor, act: Act) -> Result<Tensor> {
    let op = match act {
        Act::Silu => "swiglu",
        Act::GeluTanh => "geglu",
    };
    let dt = check_gated_inputs(op, gate, up)?;
    let k = kernels_for(op, &[("gate", gate), ("up", up)])?;
    let mut y = k.zeros(dt, gate.numel(), op)?;
    match act {
        Act::Silu => k.swiglu_fwd(&mut y, &gate.read(), &up.read())?,
        Act::GeluTanh => k.geglu_fwd(&mut y, &gate.read(), &up.read())?,
    }
    let y = Tensor::from_storage(y, gate.shape().clone());
    Ok(record(y, &[gate, up], |_| Box::new(GatedBwd { g: gate.detach(), u: up.detach(), act, op })))
}

/// The checks [`swiglu`] makes on its inputs (same dtype, same shape); returns the dtype. Also
/// for callers that record swiglu(gate, up) without forming it.
pub(crate) fn check_gated_inputs(op: &'static str, gate: &Tensor, up: &Tensor) -> Result<crate::dtype::DType> {
    let dt = compute_dtype(op, "gate", gate)?;
    check_dtype(op, "up", up, dt, true)?;
    if gate.shape() != up.shape() {
        return Err(Error::shape(op, "up", gate.shape(), up.shape()));
    }
    Ok(dt)
}

struct GatedBwd {
    g: Tensor,
    u: Tensor,
    act: Act,
    op: &'static str,
}
impl Backward for GatedBwd {
    fn name(&self) -> &'static str {
        self.op
    }
    /// y = f(gate) ⊙ up:  dgate = dy ⊙ up ⊙ f'(gate);  dup = dy ⊙ f(gate) (f = silu or gelu_tanh).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = self.op;
        let k: &dyn Kernels = kernels_for(op, &[("dy", dy), ("gate", &self.g)])?;
        let (n, dt) = (dy.numel(), dy.dtype());
        let mut dg = needs[0].then(|| k.zeros(dt, n, op)).transpose()?;
        let mut du = needs[1].then(|| k.zeros(dt, n, op)).transpose()?;
        let (dyg, gg, ug) = (dy.read(), self.g.read(), self.u.read());
        match self.act {
            Act::Silu => k.swiglu_bwd(dg.as_mut(), du.as_mut(), &dyg, &gg, &ug)?,
            Act::GeluTanh => k.geglu_bwd(dg.as_mut(), du.as_mut(), &dyg, &gg, &ug)?,
        }
        let wrap = |s: Storage| Tensor::from_storage(s, dy.shape().clone());
        Ok(vec![dg.map(wrap), du.map(wrap)])
    }
}

/// Soft-capping: y = cap·tanh(x/cap) elementwise (Gemma 2's attention and final-logit
/// soft-capping): |y| < cap, and y ≈ x for |x| ≪ cap. `cap` must be finite and > 0.
pub fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    const OP: &str = "softcap";
    let dt = compute_dtype(OP, "x", x)?;
    if !(cap > 0.0 && cap.is_finite()) {
        return Err(Error::invalid(OP, format!("cap must be finite and > 0, got {cap}")));
    }
    let k = kernels_for(OP, &[("x", x)])?;
    let mut y = k.zeros(dt, x.numel(), OP)?;
    k.softcap_fwd(&mut y, &x.read(), cap)?;
    let y = Tensor::from_storage(y, x.shape().clone());
    let saved = y.detach();
    Ok(record(y, &[x], |_| Box::new(SoftcapBwd { y: saved, cap })))
}

struct SoftcapBwd {
    /// The output: the derivative is a function of it, so x need not be kept.
    y: Tensor,
    cap: f64,
}
impl Backward for SoftcapBwd {
    fn name(&self) -> &'static str {
        "softcap"
    }
    /// d/dx cap·tanh(x/cap) = 1 − tanh²(x/cap) = 1 − (y/cap)², so dx = dy ⊙ (1 − (y/cap)²).
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "softcap.backward";
        let k = kernels_for(OP, &[("dy", dy), ("y", &self.y)])?;
        let mut dx = k.zeros(dy.dtype(), dy.numel(), OP)?;
        k.softcap_bwd(&mut dx, &dy.read(), &self.y.read(), self.cap)?;
        Ok(vec![Some(Tensor::from_storage(dx, dy.shape().clone()))])
    }
}
