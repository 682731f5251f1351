//! Splitting the last axis: the fused projections of Phi-3 (qkv_proj [b·t, (nh + 2·nkv)·hd],
//! gate_up_proj [b·t, 2f]) come out as one matrix whose column ranges are separate tensors.

use super::compute_dtype;
use crate::autograd::{record, Backward, GradStore};
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

/// Splits x [.., D] into parts `[.., sizes[i]]` along the last axis (Σ sizes = D, each > 0); the
/// parts keep x's leading dims and are contiguous copies. Part i holds columns
/// `c_i..c_i + sizes[i]` of every row, `c_i = Σ_{j<i} sizes[j]`.
pub fn split_last(x: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
    const OP: &str = "split_last";
    let dt = compute_dtype(OP, "x", x)?;
    let dims = x.dims();
    let Some(&d) = dims.last() else {
        return Err(Error::shape(OP, "x", "rank ≥ 1 ([.., D])", x.shape()));
    };
    if sizes.is_empty() || sizes.contains(&0) || sizes.iter().sum::<usize>() != d {
        return Err(Error::invalid(OP, format!("sizes must be > 0 and sum to x's last dim {d}, got {sizes:?}")));
    }
    let rows = x.numel() / d;
    let k = kernels_for(OP, &[("x", x)])?;
    let xs = x.read();
    let mut parts = Vec::with_capacity(sizes.len());
    let mut c0 = 0;
    for &cols in sizes {
        let mut y = k.zeros(dt, rows * cols, OP)?;
        // y[r, :] = x[r, c0..c0 + cols]
        k.copy_cols(&mut y, cols, 0, &xs, d, c0, rows, cols, OP)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank ≥ 1 checked above") = cols;
        let y = Tensor::from_storage(y, Shape::new(shape));
        let x_shape = x.shape().clone();
        parts.push(record(y, &[x], |_| Box::new(SplitLastBwd { x_shape, c0, cols, d })));
        c0 += cols;
    }
    Ok(parts)
}

/// The backward of one part: its gradient placed in its column range of a zero dx. Each part is
/// its own node, so the engine sums the parts' contributions into x's gradient (parts that get no
/// gradient contribute nothing, i.e. zeros in their range).
struct SplitLastBwd {
    x_shape: Shape,
    c0: usize,
    cols: usize,
    d: usize,
}
impl Backward for SplitLastBwd {
    fn name(&self) -> &'static str {
        "split_last"
    }
    /// y_i = x[:, c0..c0 + cols] is a selection (y_i = x·S_i with S_i a 0/1 column selector), so
    /// dx = dy_i·S_iᵀ: dx[:, c0..c0 + cols] = dy_i, zeros elsewhere.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "split_last.backward";
        let k = kernels_for(OP, &[("dy", dy)])?;
        let rows = self.x_shape.numel() / self.d;
        let mut dx = k.zeros(dy.dtype(), self.x_shape.numel(), OP)?;
        k.copy_cols(&mut dx, self.d, self.c0, &dy.read(), self.cols, 0, rows, self.cols, OP)?;
        Ok(vec![Some(Tensor::from_storage(dx, self.x_shape.clone()))])
    }
}
