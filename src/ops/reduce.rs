//! Reductions to a scalar: sum and mean over all elements.

use super::compute_dtype;
use crate::autograd::{record, Backward, GradStore};
use crate::backend::kernels;
use crate::device::Device;
use crate::error::Result;
use crate::shape::Shape;
use crate::tensor::kernels_for;
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
    let k = kernels_for(name, &[("x", x)])?;
    let mut y = k.zeros(dt, 1, name)?;
    k.sum(&mut y, &x.read(), factor, name)?;
    let y = Tensor::from_storage(y, Shape::scalar());
    let shape = x.shape().clone();
    Ok(record(y, &[x], |_| Box::new(ReduceBwd { shape, device: x.device(), factor, name })))
}

struct ReduceBwd {
    shape: Shape,
    /// x's device, where dx goes (the scalar dy may be a host seed).
    device: Device,
    factor: f64,
    name: &'static str,
}
impl Backward for ReduceBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    /// dx_i = factor·dy (factor = 1 for sum, 1/n for mean).
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "reduce.backward";
        let k = kernels(self.device)?;
        let g = dy.try_to_vec::<f64>()?[0] * self.factor;
        let mut dx = k.zeros(dy.dtype(), self.shape.numel(), OP)?;
        k.fill(&mut dx, g, OP)?;
        Ok(vec![Some(Tensor::from_storage(dx, self.shape.clone()))])
    }
}
