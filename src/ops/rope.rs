//! Rotary position embedding in the HF "rotate-half" layout: over the rotary dims rot =
//! 2·inv_freq.len() ≤ head_dim, dim i pairs with dim i + rot/2 at angle position · inv_freq[i]
//! (standard RoPE: rot = head_dim, inv_freq[i] = θ^(−2i/hd)); dims at or beyond rot pass through
//! (partial rotary, Phi-3/Phi-4). cos and sin are multiplied by `scale` (LongRoPE's and YaRN's
//! attention factor). Positions are integers and never differentiable; the backward is the
//! inverse rotation, scaled.

use super::compute_dtype;
use crate::autograd::{record, Backward, GradStore};
use crate::error::{Error, Result};
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

/// The frequency table of one model: rot/2 inverse frequencies for the first rot =
/// 2·inv_freq.len() ≤ head_dim dims of each head, and the factor on cos and sin.
#[derive(Clone, Debug)]
pub struct Rope {
    pub head_dim: usize,
    pub inv_freq: Vec<f64>,
    /// Multiplies cos and sin (1 for plain RoPE): y = scale·R(θ)·x on the rotary dims.
    pub scale: f64,
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
        Ok(Rope { head_dim, inv_freq, scale: 1.0 })
    }

    /// A given frequency table (scaled RoPE variants, partial rotary): the rotary dimension is
    /// rot = 2·inv_freq.len(), which must be > 0 and ≤ head_dim; dims rot..head_dim pass through.
    /// `scale` multiplies cos and sin (finite, > 0). Frequencies must be finite.
    pub fn with_table(head_dim: usize, inv_freq: Vec<f64>, scale: f64) -> Result<Rope> {
        if inv_freq.is_empty() || 2 * inv_freq.len() > head_dim {
            return Err(Error::invalid(
                "rope",
                format!("inv_freq must hold 1 to head_dim/2 = {} entries (rotary dim 2·len ≤ head_dim {head_dim}), got {}", head_dim / 2, inv_freq.len()),
            ));
        }
        if let Some((i, f)) = inv_freq.iter().enumerate().find(|(_, f)| !f.is_finite()) {
            return Err(Error::invalid("rope", format!("inv_freq[{i}] must be finite, got {f}")));
        }
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(Error::invalid("rope", format!("scale must be finite and > 0, got {scale}")));
        }
        Ok(Rope { head_dim, inv_freq, scale })
    }

    /// The rotary dimension: 2·inv_freq.len() (≤ head_dim).
    pub fn rotary_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }
}

/// x: [b, t, h, hd]; `positions`: t entries (shared by the batch) or b·t entries (per row, for
/// left padding or a KV-cache offset).
pub fn rope(x: &Tensor, table: &Rope, positions: &[usize]) -> Result<Tensor> {
    compute_dtype("rope", "x", x)?;
    if table.inv_freq.is_empty() || table.rotary_dim() > table.head_dim || !(table.scale > 0.0 && table.scale.is_finite()) {
        // The fields are public: a table edited after construction is checked here too.
        return Err(Error::invalid(
            "rope",
            format!("table: rotary dim {} must be in 1..={} and scale {} finite and > 0", table.rotary_dim(), table.head_dim, table.scale),
        ));
    }
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

/// y = s·R(±θ)·x on x's device (rotary dims; the rest copied).
fn rotate(x: &Tensor, pos: &[usize], table: &Rope, h: usize, hd: usize, inverse: bool) -> Result<Tensor> {
    let op = if inverse { "rope.backward" } else { "rope" };
    let k = kernels_for(op, &[("x", x)])?;
    let mut y = k.zeros(x.dtype(), x.numel(), op)?;
    k.rope(&mut y, &x.read(), pos, &table.inv_freq, h, hd, table.scale, inverse)?;
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
    /// y = s·R(θ)x on the rotary dims with R orthogonal, so dx = s·R(θ)ᵀ dy = s·R(−θ) dy there;
    /// the passed-through dims have y = x, so dx = dy.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(rotate(dy, &self.pos, &self.table, self.h, self.hd, true)?)])
    }
}
