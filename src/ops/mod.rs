//! Differentiable ops, one file per family, forward and backward side by side.
//!
//! Each public op: validates shapes and dtypes at its boundary (returning an [`Error`] that names
//! the op and the shapes), allocates its output, calls the kernels in [`crate::backend`], and
//! records a backward step only when an input needs a gradient, saving only what that step needs.
//! Inputs that need a gradient must have the compute dtype (f32 or f64) of the op; frozen inputs
//! (weights) may be stored in any dtype and are converted per use.

mod adapter;
mod attention;
mod dora;
mod elementwise;
mod embedding;
mod loss;
mod matmul;
mod norm;
mod reduce;
mod rope;
mod spectral;
mod split;

pub use crate::backend::GatedAct;
pub use adapter::{
    adapter_linear, gated_adapter_linear, gated_adapter_linear_graph_only, lora_linear, pissa_linear, speclora_linear, speclora_svd_linear,
    swiglu_adapter_linear, swiglu_adapter_linear_graph_only, Dropout, SpecRows, Spectral,
};
pub use attention::{attention, AttnOptions};
pub use dora::{dora_linear, dora_merged, dora_nu, dora_row_norms, row_norms2};
pub use elementwise::{add, geglu, gelu_tanh, mul, scale, silu, softcap, swiglu};
pub use embedding::embedding;
pub use loss::{cross_entropy, linear_cross_entropy, CeOptions};
pub use matmul::{linear, matmul};
pub use norm::rms_norm;
pub use reduce::{mean, sum};
pub use rope::{rope, Rope};
pub use spectral::{cayley, cayley_f64, spectral_a_linear, spectral_r_linear};
pub use split::split_last;

use crate::autograd::{record, Backward, GradStore};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// Rejects tensors with a zero-sized dimension (empty tensors are not supported by the ops).
pub(crate) fn nonempty(op: &'static str, arg: &'static str, t: &Tensor) -> Result<()> {
    if t.dims().contains(&0) {
        return Err(Error::shape(op, arg, "no zero-sized dimension", t.shape()));
    }
    Ok(())
}

/// Checks that `t` is non-empty and has a compute dtype, and returns the dtype.
pub(crate) fn compute_dtype(op: &'static str, arg: &'static str, t: &Tensor) -> Result<DType> {
    nonempty(op, arg, t)?;
    if t.dtype().is_compute() {
        Ok(t.dtype())
    } else {
        Err(Error::dtype(op, arg, "f32 or f64", t.dtype()))
    }
}

/// Checks that `t` (a second activation, or a trainable input) has the op's compute dtype `dt`.
/// Frozen inputs that need no gradient are exempt: they are converted per use.
pub(crate) fn check_dtype(op: &'static str, arg: &'static str, t: &Tensor, dt: DType, strict: bool) -> Result<()> {
    nonempty(op, arg, t)?;
    if (strict || t.requires_grad()) && t.dtype() != dt {
        return Err(Error::dtype(op, arg, dt, t.dtype()));
    }
    Ok(())
}

pub(crate) fn check_shape(op: &'static str, arg: &'static str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::shape(op, arg, Shape::new(expected), t.shape()));
    }
    Ok(())
}

/// Reshape (same elements, row-major). Shares storage; backward reshapes the gradient back.
pub fn reshape(x: &Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    if shape.numel() != x.numel() {
        return Err(Error::shape("reshape", "shape", format!("{} elements (from {})", x.numel(), x.shape()), shape));
    }
    let y = x.detach().with_shape(shape);
    let from = x.shape().clone();
    Ok(record(y, &[x], |_| Box::new(ReshapeBwd { from })))
}

struct ReshapeBwd {
    from: Shape,
}
impl Backward for ReshapeBwd {
    fn name(&self) -> &'static str {
        "reshape"
    }
    /// dx = dy viewed with x's shape.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(dy.detach().with_shape(self.from.clone()))])
    }
}
