//! Rotary position embedding in the HF "rotate-half" layout: dim i pairs with dim i + hd/2,
//! angle = position · inv_freq[i], inv_freq[i] = θ^(−2i/hd). Positions are integers and never
//! differentiable; the backward is the inverse rotation.

use super::compute_dtype;
use crate::autograd::{record, Backward, GradStore};
use crate::error::{Error, Result};
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

/// The frequency table of one model (head_dim/2 inverse frequencies).
#[derive(Clone, Debug)]
pub struct Rope {
    pub head_dim: usize,
    pub inv_freq: Vec<f64>,
}

impl Rope {
    /// Standard RoPE: `inv_freq[i]` = θ^(−2i/head_dim), i < head_dim/2.
    pub fn new(head_dim: usize, theta: f64) -> Result<Rope> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::invalid("rope", format!("head_dim must be even and > 0, got {head_dim}")));
        }
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(Error::invalid("rope", format!("rope theta must be finite and > 0, got {theta}")));
        }
        let inv_freq = (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64)).collect();
        Ok(Rope { head_dim, inv_freq })
    }
}

/// x: [b, t, h, hd]; `positions`: t entries (shared by the batch) or b·t entries (per row, for
/// left padding or a KV-cache offset).
pub fn rope(x: &Tensor, table: &Rope, positions: &[usize]) -> Result<Tensor> {
    compute_dtype("rope", "x", x)?;
    let xd = x.dims();
    if xd.len() != 4 || xd[3] != table.head_dim {
        return Err(Error::shape("rope", "x", format!("[b, t, heads, {}]", table.head_dim), x.shape()));
    }
    let (b, t, h, hd) = (xd[0], xd[1], xd[2], xd[3]);
    let pos: Vec<usize> = if positions.len() == t {
        (0..b).flat_map(|_| positions.iter().copied()).collect()
    } else if positions.len() == b * t {
        positions.to_vec()
    } else {
        return Err(Error::shape("rope", "positions", format!("{t} or {} entries", b * t), positions.len()));
    };
    let y = rotate(x, &pos, table, h, hd, false)?;
    Ok(record(y, &[x], |_| Box::new(RopeBwd { pos, table: table.clone(), h, hd })))
}

/// y = R(±θ)·x on x's device.
fn rotate(x: &Tensor, pos: &[usize], table: &Rope, h: usize, hd: usize, inverse: bool) -> Result<Tensor> {
    let op = if inverse { "rope.backward" } else { "rope" };
    let k = kernels_for(op, &[("x", x)])?;
    let mut y = k.zeros(x.dtype(), x.numel(), op)?;
    k.rope(&mut y, &x.read(), pos, &table.inv_freq, h, hd, inverse)?;
    Ok(Tensor::from_storage(y, x.shape().clone()))
}

struct RopeBwd {
    pos: Vec<usize>,
    table: Rope,
    h: usize,
    hd: usize,
}
impl Backward for RopeBwd {
    fn name(&self) -> &'static str {
        "rope"
    }
    /// y = R(θ)x with R orthogonal, so dx = R(θ)ᵀ dy = R(−θ) dy.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(rotate(dy, &self.pos, &self.table, self.h, self.hd, true)?)])
    }
}
