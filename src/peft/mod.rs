//! Adapter methods on a frozen linear layer: initialization, forward (through the fused ops in
//! [`crate::ops`]) and merge. Every method is the identity at init (adapted layer == frozen
//! layer, bit-exactly for LoRA and SpecLoRA: B = 0 and d = 1 make the deltas exact zeros).

pub mod export;
pub mod io;
mod lora;
mod speclora;

pub use lora::LoraConfig;
pub use speclora::top_rows_by_norm as rows_by_norm;
pub use speclora::top_rows_by_norm;

use crate::error::Result;
use crate::gradcheck::SplitMix;
use crate::ops::{self, SpecRows};
use crate::tensor::Tensor;
use crate::DType;

/// The trainable part attached to one frozen linear.
#[derive(Clone, Debug)]
pub enum Adapter {
    /// y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ;  A [r, in], B [out, r].
    Lora { a: Tensor, b: Tensor, scale: f64, dropout: f64 },
    /// y = x·(Γ⊙W)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ with d [k] on the selected rows.
    SpecLora { d: Tensor, rows: SpecRows, a: Tensor, b: Tensor, scale: f64, dropout: f64 },
    /// y = x·Wᵀ + ((x·V) ⊙ (d−1) ⊙ σ)·Uᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, with the frozen top-k SVD
    /// factors u [out, k], sigma [k], v [in, k] computed once at init and stored with the adapter.
    SpecLoraSvd { d: Tensor, u: Tensor, sigma: Tensor, v: Tensor, a: Tensor, b: Tensor, scale: f64, dropout: f64 },
}

/// Which adapter to attach, and its method-specific settings.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    Lora,
    /// SpecLoRA with k rows per weight (clamped to the row count): the first k rows, or with
    /// `by_norm` the k rows of largest L2 norm.
    SpecLora {
        k: usize,
        by_norm: bool,
    },
    /// SpecLoRA-SVD with the top-k singular directions (k clamped to min(out, in)).
    SpecLoraSvd {
        k: usize,
    },
}

impl Adapter {
    /// LoRA as HF PEFT initializes it: A ~ Kaiming-uniform(a = √5) = U(−1/√in, 1/√in), B = 0.
    pub fn lora(out_features: usize, in_features: usize, cfg: &LoraConfig, dtype: DType, rng: &mut SplitMix) -> Result<Adapter> {
        let (a, b) = lora::init(out_features, in_features, cfg, dtype, rng)?;
        Ok(Adapter::Lora { a, b, scale: cfg.scale(), dropout: cfg.dropout })
    }

    /// SpecLoRA: LoRA plus d = 1 on `rows` (k clamped to the row count by the caller).
    pub fn speclora(out_features: usize, in_features: usize, cfg: &LoraConfig, rows: SpecRows, dtype: DType, rng: &mut SplitMix) -> Result<Adapter> {
        let (a, b) = lora::init(out_features, in_features, cfg, dtype, rng)?;
        let d = speclora::init_d(&rows, dtype)?;
        Ok(Adapter::SpecLora { d, rows, a, b, scale: cfg.scale(), dropout: cfg.dropout })
    }

    /// Builds the adapter `method` for the frozen weight `w` [out, in] (SVD factors and row norms
    /// are computed from `w` here, once).
    pub fn new(method: &Method, w: &Tensor, cfg: &LoraConfig, dtype: DType, rng: &mut SplitMix) -> Result<Adapter> {
        let (o, i) = (w.dims()[0], w.dims()[1]);
        match method {
            Method::Lora => Adapter::lora(o, i, cfg, dtype, rng),
            Method::SpecLora { k, by_norm: false } => Adapter::speclora(o, i, cfg, SpecRows::Top((*k).min(o)), dtype, rng),
            Method::SpecLora { k, by_norm: true } => Adapter::speclora(o, i, cfg, top_rows_by_norm(w, *k)?, dtype, rng),
            Method::SpecLoraSvd { k } => {
                let (a, b) = lora::init(o, i, cfg, dtype, rng)?;
                let k = (*k).min(o.min(i));
                let top = crate::svd::top_k_svd(w, k, 2, rng.next_u64())?;
                let t = |v: &[f64], dims: Vec<usize>| -> Result<Tensor> {
                    crate::device::with_float!(dtype, "speclora-svd init", |T| {
                        Tensor::from_vec(v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>(), dims)
                    })
                };
                let d = speclora::init_d(&SpecRows::Top(k), dtype)?;
                Ok(Adapter::SpecLoraSvd {
                    d,
                    u: t(&top.u, vec![o, k])?,
                    sigma: t(&top.s, vec![k])?,
                    v: t(&top.v, vec![i, k])?,
                    a,
                    b,
                    scale: cfg.scale(),
                    dropout: cfg.dropout,
                })
            }
        }
    }

    /// y for input x [.., in] through frozen `w` [out, in] with this adapter. `dropout_seed`
    /// switches the branch dropout on (training); `None` means evaluation (no dropout).
    pub fn forward(&self, x: &Tensor, w: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let drop = |p: f64| dropout_seed.filter(|_| p > 0.0).map(|seed| ops::Dropout { p, seed });
        match self {
            Adapter::Lora { a, b, scale, dropout } => ops::adapter_linear(x, w, ops::Spectral::None, a, b, *scale, drop(*dropout)),
            Adapter::SpecLora { d, rows, a, b, scale, dropout } => ops::adapter_linear(x, w, ops::Spectral::Rows { d, rows }, a, b, *scale, drop(*dropout)),
            Adapter::SpecLoraSvd { d, u, sigma, v, a, b, scale, dropout } => {
                ops::adapter_linear(x, w, ops::Spectral::Svd { d, u, sigma, v }, a, b, *scale, drop(*dropout))
            }
        }
    }

    /// As [`Adapter::forward`] on x = swiglu(gate, up), without keeping x for the backward
    /// ([`ops::swiglu_adapter_linear`]).
    /// With `graph_only`, the output values are not computed (zeros) but the backward is the
    /// same ([`ops::swiglu_adapter_linear_graph_only`]).
    pub fn forward_swiglu(&self, gate: &Tensor, up: &Tensor, w: &Tensor, dropout_seed: Option<u64>, graph_only: bool) -> Result<Tensor> {
        let drop = |p: f64| dropout_seed.filter(|_| p > 0.0).map(|seed| ops::Dropout { p, seed });
        let op = if graph_only { ops::swiglu_adapter_linear_graph_only } else { ops::swiglu_adapter_linear };
        match self {
            Adapter::Lora { a, b, scale, dropout } => op(gate, up, w, ops::Spectral::None, a, b, *scale, drop(*dropout)),
            Adapter::SpecLora { d, rows, a, b, scale, dropout } => op(gate, up, w, ops::Spectral::Rows { d, rows }, a, b, *scale, drop(*dropout)),
            Adapter::SpecLoraSvd { d, u, sigma, v, a, b, scale, dropout } => {
                op(gate, up, w, ops::Spectral::Svd { d, u, sigma, v }, a, b, *scale, drop(*dropout))
            }
        }
    }

    /// The trainable tensors, in a fixed order.
    pub fn params(&self) -> Vec<Tensor> {
        match self {
            Adapter::Lora { a, b, .. } => vec![a.clone(), b.clone()],
            Adapter::SpecLora { d, a, b, .. } | Adapter::SpecLoraSvd { d, a, b, .. } => vec![d.clone(), a.clone(), b.clone()],
        }
    }

    /// Parameters that must not get weight decay: multiplicative scales whose identity is 1.
    pub fn no_decay_params(&self) -> Vec<Tensor> {
        match self {
            Adapter::Lora { .. } => Vec::new(),
            Adapter::SpecLora { d, .. } | Adapter::SpecLoraSvd { d, .. } => vec![d.clone()],
        }
    }

    /// The merged dense weight W' (f64, [out, in]) such that x·W'ᵀ equals the adapted forward.
    pub fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let mut wm = w.to_vec_f64();
        let (a, b, scale) = match self {
            Adapter::Lora { a, b, scale, .. } => (a, b, *scale),
            Adapter::SpecLora { d, rows, a, b, scale, .. } => {
                speclora::scale_rows(&mut wm, out_f, in_f, rows, &d.to_vec_f64())?;
                (a, b, *scale)
            }
            Adapter::SpecLoraSvd { d, u, sigma, v, a, b, scale, .. } => {
                // W += U·diag((d − 1) ⊙ σ)·Vᵀ
                let (dv, uv, sv, vv) = (d.to_vec_f64(), u.to_vec_f64(), sigma.to_vec_f64(), v.to_vec_f64());
                let k = dv.len();
                for i in 0..out_f {
                    for j in 0..in_f {
                        wm[i * in_f + j] += (0..k).map(|q| uv[i * k + q] * (dv[q] - 1.0) * sv[q] * vv[j * k + q]).sum::<f64>();
                    }
                }
                (a, b, *scale)
            }
        };
        lora::add_delta(&mut wm, out_f, in_f, &a.to_vec_f64(), &b.to_vec_f64(), a.dims()[0], scale);
        Ok(wm)
    }
}
