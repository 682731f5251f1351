//! Reductions to a scalar: sum and mean over all elements.

use super::{compute_dtype, out, vals};
use crate::autograd::{record, Backward, GradStore};
use crate::device::with_float;
use crate::error::Result;
use crate::shape::Shape;
use crate::tensor::Tensor;

/// Σ x over all elements, a scalar (accumulated in f64).
pub fn sum(x: &Tensor) -> Result<Tensor> {
    reduce(x, 1.0, "sum")
}

/// mean(x) over all elements, a scalar.
pub fn mean(x: &Tensor) -> Result<Tensor> {
    reduce(x, 1.0 / x.numel().max(1) as f64, "mean")
}

fn reduce(x: &Tensor, factor: f64, name: &'static str) -> Result<Tensor> {
    let dt = compute_dtype(name, "x", x)?;
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[x]) {
        return crate::backend::cuda::ops::reduce(x, factor, name);
    }
    let y = with_float!(dt, name, |T| {
        let s: f64 = vals::<T>(&x.read()).iter().map(|v| v.to_f64()).sum();
        Ok(out(vec![T::from_f64(s * factor)], Shape::scalar()))
    })?;
    let shape = x.shape().clone();
    Ok(record(y, &[x], |_| Box::new(ReduceBwd { shape, factor, name })))
}

struct ReduceBwd {
    shape: Shape,
    factor: f64,
    name: &'static str,
}
impl Backward for ReduceBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    /// dx_i = factor·dy (factor = 1 for sum, 1/n for mean).
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "reduce.backward", |T| {
            let g = T::from_f64(vals::<T>(&dy.read())[0].to_f64() * self.factor);
            Ok(vec![Some(out(vec![g; self.shape.numel()], self.shape.clone()))])
        })
    }
}
