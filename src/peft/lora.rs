//! LoRA (Hu et al.): W' = W + s·B·A with s = α/r (rsLoRA: α/√r).

use crate::device::with_float;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::tensor::Tensor;

/// Rank and scaling of a LoRA branch.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// rsLoRA: scale α/√r instead of α/r.
    pub rslora: bool,
    /// Dropout probability on the LoRA branch input while training (PEFT's `lora_dropout`).
    pub dropout: f64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 16, alpha: 32.0, rslora: false, dropout: 0.0 }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// A [r, in] ~ U(−1/√in, 1/√in) (kaiming_uniform with a = √5, as PEFT), B [out, r] = 0.
pub(crate) fn init(out_f: usize, in_f: usize, cfg: &LoraConfig, dtype: DType, rng: &mut SplitMix) -> Result<(Tensor, Tensor)> {
    if cfg.rank == 0 || in_f == 0 || out_f == 0 {
        return Err(Error::invalid("lora init", format!("rank {} on a [{out_f}, {in_f}] weight", cfg.rank)));
    }
    let bound = 1.0 / (in_f as f64).sqrt();
    let a = rng.vec(cfg.rank * in_f, -bound, bound);
    with_float!(dtype, "lora init", |T| {
        let a: Vec<T> = a.iter().map(|&v| T::from_f64(v)).collect();
        Ok((Tensor::from_vec(a, [cfg.rank, in_f])?.param()?, Tensor::zeros::<T>([out_f, cfg.rank]).param()?))
    })
}

/// W [out, in] += s·B·A (f64).
pub(crate) fn add_delta(w: &mut [f64], out_f: usize, in_f: usize, a: &[f64], b: &[f64], r: usize, s: f64) {
    for i in 0..out_f {
        for j in 0..in_f {
            let mut acc = 0.0;
            for q in 0..r {
                acc += b[i * r + q] * a[q * in_f + j];
            }
            w[i * in_f + j] += s * acc;
        }
    }
}
