//! RMSNorm with a frozen weight, plain (y = x/rms(x)·w) or Gemma's (y = x/rms(x)·(1 + w)).

use crate::dtype::DType;
use crate::error::Result;
use crate::ops;
use crate::tensor::Tensor;

/// RMSNorm over the last axis.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    /// The weight as the checkpoint stores it (`[d]`, frozen): what writers write back.
    pub weight: Tensor,
    pub eps: f64,
    /// Gemma: the scale is 1 + w.
    pub plus_one: bool,
    /// The scale the forward multiplies by: `weight`, or 1 + w as a small owned copy.
    scale: Tensor,
}

impl RmsNorm {
    /// `dtype`: the compute dtype (the 1 + w copy is made in it).
    pub fn new(weight: Tensor, eps: f64, plus_one: bool, dtype: DType) -> Result<RmsNorm> {
        let scale = if plus_one {
            let v: Vec<f64> = weight.to_vec_f64().iter().map(|w| 1.0 + w).collect();
            crate::device::with_float!(dtype, "RmsNorm", |T| {
                Tensor::from_vec(v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>(), weight.shape().clone())
            })?
        } else {
            weight.clone()
        };
        Ok(RmsNorm { weight, eps, plus_one, scale })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.scale, self.eps)
    }
    /// A copy whose tensors were moved by `f` (device moves; `weight` and the scale alike).
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: f(&self.weight)?, eps: self.eps, plus_one: self.plus_one, scale: f(&self.scale)? })
    }
}
