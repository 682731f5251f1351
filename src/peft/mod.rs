//! Adapter methods on a frozen linear layer: initialization, forward (through the fused ops in
//! [`crate::ops`]) and merge. Every method is the identity at init (adapted layer == frozen
//! layer): bit-exactly for LoRA, SpecLoRA (B = 0, d = 1 make the deltas exact zeros), and also
//! for Spectral^A (ΔU = ΔV = 0), Spectral^R (Q = 0 gives R = I exactly, c = 1), PiSSA/MiLoRA
//! (the two branches are formed separately and cancel exactly), DoRA (mag = ν, B = 0) and full
//! fine-tuning (the trainable copy of W). tests/spectral_methods.rs checks each.
//!
//! | method | trainable (per [out, in] linear) | frozen extras stored with the adapter |
//! |---|---|---|
//! | LoRA | A [r, in], B [out, r] | — |
//! | SpecLoRA | d `[k]`, A, B | row indices |
//! | SpecLoRA-SVD | d `[k]`, A, B | U_k, σ_k, V_k |
//! | Spectral^A | ΔU [out, r], ΔV [in, r] | U_b, σ_b, V_b (block b) |
//! | Spectral^R | Q_U, Q_V [r, r], c `[r]` | U_b, σ_b, V_b (block b) |
//! | PiSSA / MiLoRA | A, B (init from the top / bottom r triplets) | A0, B0 (the initial A, B) |
//! | DoRA | A, B, mag `[out]` | ‖W_i‖² (recomputed from W at load) |
//! | full | W' [out, in] (a dense copy) | — |

mod device;
pub mod export;
pub mod io;
mod lora;
mod speclora;
pub mod spectral;

pub use lora::LoraConfig;
pub use speclora::top_rows_by_norm as rows_by_norm;
pub use speclora::top_rows_by_norm;

use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::ops::{self, SpecRows};
use crate::tensor::Tensor;
use crate::DType;

/// The trainable part attached to one frozen linear.
#[derive(Clone, Debug)]
pub enum Adapter {
    /// y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ;  A [r, in], B [out, r].
    Lora { a: Tensor, b: Tensor, scale: f64, dropout: f64 },
    /// y = x·(Γ⊙W)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ with d `[k]` on the selected rows.
    SpecLora { d: Tensor, rows: SpecRows, a: Tensor, b: Tensor, scale: f64, dropout: f64 },
    /// y = x·Wᵀ + ((x·V) ⊙ (d−1) ⊙ σ)·Uᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, with the frozen top-k SVD
    /// factors u [out, k], sigma `[k]`, v [in, k] computed once at init and stored with the adapter.
    SpecLoraSvd { d: Tensor, u: Tensor, sigma: Tensor, v: Tensor, a: Tensor, b: Tensor, scale: f64, dropout: f64 },
    /// Spectral^A: W' = W − U·Σ·Vᵀ + (U + ΔU)·Σ·(V + ΔV)ᵀ on block `block` of W's singular
    /// triplets: du [out, r], dv [in, r] trainable (init 0); u [out, r], sigma `[r]`, v [in, r] frozen.
    SpectralA { du: Tensor, dv: Tensor, u: Tensor, sigma: Tensor, v: Tensor, block: usize },
    /// Spectral^R: W' = W − U·Σ·Vᵀ + (U·R_U)·diag(c ⊙ σ)·(V·R_V)ᵀ with R = cayley(Q):
    /// qu, qv [r, r] (init 0) and c `[r]` (init 1) trainable; u, sigma, v frozen as in Spectral^A.
    SpectralR { qu: Tensor, qv: Tensor, c: Tensor, u: Tensor, sigma: Tensor, v: Tensor, block: usize },
    /// PiSSA (`milora = false`: top-r triplets) or MiLoRA (bottom-r): a LoRA whose A, B start at
    /// √(Σ_r/s)·V_rᵀ and U_r·√(Σ_r/s), on the residual base W − s·B0·A0, where a0 [r, in],
    /// b0 [out, r] are frozen copies of the initial A, B (so W is never copied densely).
    Pissa { a: Tensor, b: Tensor, a0: Tensor, b0: Tensor, scale: f64, dropout: f64, milora: bool },
    /// DoRA: W' = diag(mag/ν)·(W + s·B·A), ν_i = ‖W_i + s·B_i·A‖; mag `[out]` (init ‖W_i‖), A, B
    /// trainable; wnorm2 `[out]` = ‖W_i‖² (f64, frozen, derived from W).
    Dora { a: Tensor, b: Tensor, mag: Tensor, wnorm2: Tensor, scale: f64, dropout: f64 },
    /// Full fine-tuning of this linear: w [out, in] is a trainable dense copy of the frozen W
    /// (dense dW and AdamW state for this matrix only).
    Full { w: Tensor },
}

/// Which adapter to attach, and its method-specific settings. The rank r of the LoRA-style
/// methods and the number of singular directions of the Spectral methods is
/// [`LoraConfig::rank`] (clamped to min(out, in) where an SVD is involved).
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
    /// Spectral^A on singular-triplet block `block` (columns block·r … (block+1)·r − 1).
    SpectralA {
        block: usize,
    },
    /// Spectral^R on singular-triplet block `block`.
    SpectralR {
        block: usize,
    },
    /// PiSSA: LoRA initialized from the top-r singular triplets.
    Pissa,
    /// MiLoRA: LoRA initialized from the bottom-r singular triplets.
    Milora,
    /// DoRA: magnitude and direction (LoRA on the direction).
    Dora,
    /// Full fine-tuning of the targeted matrices.
    Full,
}

impl Method {
    /// The name `spectune train --method` takes.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::SpecLora { .. } => "speclora",
            Method::SpecLoraSvd { .. } => "speclora-svd",
            Method::SpectralA { .. } => "spectral-a",
            Method::SpectralR { .. } => "spectral-r",
            Method::Pissa => "pissa",
            Method::Milora => "milora",
            Method::Dora => "dora",
            Method::Full => "full",
        }
    }

    /// A human-readable label with the settings, e.g. "Spectral^A (block 1)".
    pub fn label(&self) -> String {
        match self {
            Method::Lora => "LoRA".into(),
            Method::SpecLora { k, by_norm } => format!("SpecLoRA (k={k}{})", if *by_norm { ", rows by norm" } else { "" }),
            Method::SpecLoraSvd { k } => format!("SpecLoRA-SVD (k={k})"),
            Method::SpectralA { block } => format!("Spectral^A (block {block})"),
            Method::SpectralR { block } => format!("Spectral^R (block {block})"),
            Method::Pissa => "PiSSA".into(),
            Method::Milora => "MiLoRA".into(),
            Method::Dora => "DoRA".into(),
            Method::Full => "full fine-tuning".into(),
        }
    }

    /// Trainable values this method adds to one [out, in] linear with rank r (and SpecLoRA's k),
    /// after the same clamping [`Adapter::new`] applies.
    pub fn trainable_count(&self, out_f: usize, in_f: usize, r: usize) -> usize {
        let lora = r * (out_f + in_f);
        let rr = r.min(out_f.min(in_f));
        match self {
            Method::Lora => lora,
            Method::SpecLora { k, .. } => lora + (*k).min(out_f),
            Method::SpecLoraSvd { k } => lora + (*k).min(out_f.min(in_f)),
            Method::SpectralA { .. } => rr * (out_f + in_f),
            Method::SpectralR { .. } => 2 * rr * rr + rr,
            Method::Pissa | Method::Milora => rr * (out_f + in_f),
            Method::Dora => lora + out_f,
            Method::Full => out_f * in_f,
        }
    }
}

/// Power iterations of the randomized SVD behind Spectral^A/R and PiSSA (exact SVD when the
/// weight is small). Each costs two passes over W with (block + 1)·r + 10 columns.
const SVD_POWER_ITERS: usize = 4;

/// f64 values as a tensor of `dtype`.
fn tensor_of(v: &[f64], dims: Vec<usize>, dtype: DType, op: &'static str) -> Result<Tensor> {
    crate::device::with_float!(dtype, op, |T| { Tensor::from_vec(v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>(), dims) })
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
            Method::SpectralA { block } | Method::SpectralR { block } => {
                const OP: &str = "spectral init";
                let lim = o.min(i);
                let r = cfg.rank.min(lim);
                if cfg.rank == 0 || (block + 1) * r > lim {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "block {block} of rank {} needs singular triplets {}..{} but a [{o}, {i}] weight has only {lim}",
                            cfg.rank,
                            block * r,
                            (block + 1) * r
                        ),
                    ));
                }
                let t = crate::svd::svd_block(w, block * r, r, SVD_POWER_ITERS, rng.next_u64())?;
                let (u, sigma, v) = (tensor_of(&t.u, vec![o, r], dtype, OP)?, tensor_of(&t.s, vec![r], dtype, OP)?, tensor_of(&t.v, vec![i, r], dtype, OP)?);
                crate::device::with_float!(dtype, OP, |T| {
                    Ok(match method {
                        Method::SpectralA { .. } => {
                            Adapter::SpectralA { du: Tensor::zeros::<T>([o, r]).param()?, dv: Tensor::zeros::<T>([i, r]).param()?, u, sigma, v, block: *block }
                        }
                        _ => Adapter::SpectralR {
                            qu: Tensor::zeros::<T>([r, r]).param()?,
                            qv: Tensor::zeros::<T>([r, r]).param()?,
                            c: Tensor::full(T::ONE, [r]).param()?,
                            u,
                            sigma,
                            v,
                            block: *block,
                        },
                    })
                })
            }
            Method::Pissa | Method::Milora => {
                const OP: &str = "pissa init";
                if cfg.rank == 0 {
                    return Err(Error::invalid(OP, "rank must be > 0"));
                }
                let r = cfg.rank.min(o.min(i));
                let milora = *method == Method::Milora;
                let t = if milora { crate::svd::bottom_k_svd(w, r)? } else { crate::svd::top_k_svd(w, r, SVD_POWER_ITERS, rng.next_u64())? };
                let s = cfg.scale();
                if !(s.is_finite() && s > 0.0) {
                    return Err(Error::invalid(OP, format!("the LoRA scale α/r must be > 0, got {s}")));
                }
                // B = U_r·√(Σ_r/s) [o, r],  A = √(Σ_r/s)·V_rᵀ [r, i]  →  s·B·A = U_r·Σ_r·V_rᵀ
                let root: Vec<f64> = t.s.iter().map(|x| (x / s).sqrt()).collect();
                let bv: Vec<f64> = (0..o * r).map(|idx| t.u[idx] * root[idx % r]).collect();
                let av: Vec<f64> = (0..r * i).map(|idx| root[idx / i] * t.v[(idx % i) * r + idx / i]).collect();
                let (a0, b0) = (tensor_of(&av, vec![r, i], dtype, OP)?, tensor_of(&bv, vec![o, r], dtype, OP)?);
                Ok(Adapter::Pissa { a: a0.param()?, b: b0.param()?, a0, b0, scale: s, dropout: cfg.dropout, milora })
            }
            Method::Dora => {
                let (a, b) = lora::init(o, i, cfg, dtype, rng)?;
                let wn2 = ops::row_norms2(w)?;
                let mag: Vec<f64> = wn2.iter().map(|v| v.sqrt()).collect();
                Ok(Adapter::Dora {
                    a,
                    b,
                    mag: tensor_of(&mag, vec![o], dtype, "dora init")?.param()?,
                    wnorm2: Tensor::from_vec(wn2, [o])?,
                    scale: cfg.scale(),
                    dropout: cfg.dropout,
                })
            }
            Method::Full => Ok(Adapter::Full { w: tensor_of(&w.to_vec_f64(), vec![o, i], dtype, "full init")?.param()? }),
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
            Adapter::SpectralA { du, dv, u, sigma, v, .. } => ops::spectral_a_linear(x, w, u, sigma, v, du, dv),
            Adapter::SpectralR { qu, qv, c, u, sigma, v, .. } => ops::spectral_r_linear(x, w, u, sigma, v, &ops::cayley(qu)?, &ops::cayley(qv)?, c),
            Adapter::Pissa { a, b, a0, b0, scale, dropout, .. } => ops::adapter_linear(x, w, ops::Spectral::Residual { a0, b0 }, a, b, *scale, drop(*dropout)),
            Adapter::Dora { a, b, mag, wnorm2, scale, dropout } => {
                // ν from the current A, B, outside the graph (a constant for the backward), on the
                // device of W: W is never read back to the host.
                let nu = ops::dora_nu(w, wnorm2, a, b, *scale)?;
                ops::dora_linear(x, w, &nu, a, b, mag, *scale, drop(*dropout))
            }
            Adapter::Full { w: tuned } => ops::linear(x, tuned),
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
            // The other methods have no fused variant: swiglu is recorded and x kept.
            _ => self.forward(&ops::swiglu(gate, up)?, w, dropout_seed),
        }
    }

    /// The trainable tensors, in a fixed order.
    pub fn params(&self) -> Vec<Tensor> {
        match self {
            Adapter::Lora { a, b, .. } => vec![a.clone(), b.clone()],
            Adapter::SpecLora { d, a, b, .. } | Adapter::SpecLoraSvd { d, a, b, .. } => vec![d.clone(), a.clone(), b.clone()],
            Adapter::SpectralA { du, dv, .. } => vec![du.clone(), dv.clone()],
            Adapter::SpectralR { qu, qv, c, .. } => vec![qu.clone(), qv.clone(), c.clone()],
            Adapter::Pissa { a, b, .. } => vec![a.clone(), b.clone()],
            Adapter::Dora { a, b, mag, .. } => vec![mag.clone(), a.clone(), b.clone()],
            Adapter::Full { w } => vec![w.clone()],
        }
    }

    /// Parameters that must not get weight decay: multiplicative scales whose identity is 1.
    pub fn no_decay_params(&self) -> Vec<Tensor> {
        match self {
            Adapter::SpecLora { d, .. } | Adapter::SpecLoraSvd { d, .. } => vec![d.clone()],
            // c's identity is 1 and mag's is ‖W_i‖: decay toward 0 would pull them off it.
            Adapter::SpectralR { c, .. } => vec![c.clone()],
            Adapter::Dora { mag, .. } => vec![mag.clone()],
            Adapter::Lora { .. } | Adapter::SpectralA { .. } | Adapter::Pissa { .. } | Adapter::Full { .. } => Vec::new(),
        }
    }

    /// The method this adapter implements (with its settings).
    pub fn method(&self) -> Method {
        match self {
            Adapter::Lora { .. } => Method::Lora,
            Adapter::SpecLora { d, rows, .. } => Method::SpecLora { k: d.numel(), by_norm: matches!(rows, SpecRows::Indices(_)) },
            Adapter::SpecLoraSvd { d, .. } => Method::SpecLoraSvd { k: d.numel() },
            Adapter::SpectralA { block, .. } => Method::SpectralA { block: *block },
            Adapter::SpectralR { block, .. } => Method::SpectralR { block: *block },
            Adapter::Pissa { milora: false, .. } => Method::Pissa,
            Adapter::Pissa { milora: true, .. } => Method::Milora,
            Adapter::Dora { .. } => Method::Dora,
            Adapter::Full { .. } => Method::Full,
        }
    }

    /// The LoRA scale s of methods that have one (None for the Spectral methods and full).
    pub fn scale(&self) -> Option<f64> {
        match self {
            Adapter::Lora { scale, .. }
            | Adapter::SpecLora { scale, .. }
            | Adapter::SpecLoraSvd { scale, .. }
            | Adapter::Pissa { scale, .. }
            | Adapter::Dora { scale, .. } => Some(*scale),
            Adapter::SpectralA { .. } | Adapter::SpectralR { .. } | Adapter::Full { .. } => None,
        }
    }

    /// The update W' − W as an exact low-rank product `scale·B'·A'` (B' [out, q], A' [q, in],
    /// f64, row-major), for the methods whose update is low-rank and not already covered by the
    /// SpecLoRA export: PiSSA/MiLoRA (q = 2r: [B | −B0], [A ; A0], scale s), Spectral^A
    /// (q = 2r: [ΔU | U], [Σ·(V + ΔV)ᵀ ; Σ·ΔVᵀ], scale 1) and Spectral^R (q = r: U, M·Vᵀ with
    /// M = R_U·diag(c⊙σ)·R_Vᵀ − Σ, scale 1). None for DoRA and full fine-tuning (not low-rank)
    /// and for LoRA/SpecLoRA (exported by [`export`]'s own factors).
    pub fn delta_factors(&self) -> Option<(Vec<f64>, Vec<f64>, usize, f64)> {
        match self {
            Adapter::Pissa { a, b, a0, b0, scale, .. } => {
                let (r, r0) = (a.dims()[0], a0.dims()[0]);
                let (o, i) = (b.dims()[0], a.dims()[1]);
                let q = r + r0;
                let (bv, b0v) = (b.to_vec_f64(), b0.to_vec_f64());
                let mut bp = vec![0.0; o * q];
                for row in 0..o {
                    bp[row * q..row * q + r].copy_from_slice(&bv[row * r..(row + 1) * r]);
                    for j in 0..r0 {
                        bp[row * q + r + j] = -b0v[row * r0 + j];
                    }
                }
                let mut ap = a.to_vec_f64();
                ap.extend(a0.to_vec_f64());
                debug_assert_eq!(ap.len(), q * i);
                Some((bp, ap, q, *scale))
            }
            Adapter::SpectralA { du, dv, u, sigma, v, .. } => {
                let r = sigma.numel();
                let (o, i) = (u.dims()[0], v.dims()[0]);
                let (duv, dvv, uv, sv, vv) = (du.to_vec_f64(), dv.to_vec_f64(), u.to_vec_f64(), sigma.to_vec_f64(), v.to_vec_f64());
                let q = 2 * r;
                let mut bp = vec![0.0; o * q];
                for row in 0..o {
                    bp[row * q..row * q + r].copy_from_slice(&duv[row * r..(row + 1) * r]);
                    bp[row * q + r..row * q + q].copy_from_slice(&uv[row * r..(row + 1) * r]);
                }
                let mut ap = vec![0.0; q * i];
                for p in 0..r {
                    for col in 0..i {
                        ap[p * i + col] = sv[p] * (vv[col * r + p] + dvv[col * r + p]);
                        ap[(r + p) * i + col] = sv[p] * dvv[col * r + p];
                    }
                }
                Some((bp, ap, q, 1.0))
            }
            Adapter::SpectralR { qu, qv, c, u, sigma, v, .. } => {
                let r = sigma.numel();
                let i = v.dims()[0];
                let (ru, rv) = (ops::cayley_f64(&qu.to_vec_f64(), r), ops::cayley_f64(&qv.to_vec_f64(), r));
                let (cv, sv, vv) = (c.to_vec_f64(), sigma.to_vec_f64(), v.to_vec_f64());
                // M = R_U·diag(c⊙σ)·R_Vᵀ − Σ  [r, r];  A' = M·Vᵀ [r, i]
                let mut mm = vec![0.0; r * r];
                for a_ in 0..r {
                    for b_ in 0..r {
                        mm[a_ * r + b_] = (0..r).map(|q| ru[a_ * r + q] * cv[q] * sv[q] * rv[b_ * r + q]).sum::<f64>() - if a_ == b_ { sv[a_] } else { 0.0 };
                    }
                }
                let ap: Vec<f64> = (0..r * i).map(|idx| (0..r).map(|q| mm[(idx / i) * r + q] * vv[(idx % i) * r + q]).sum()).collect();
                Some((u.to_vec_f64(), ap, r, 1.0))
            }
            _ => None,
        }
    }

    /// The merged dense weight W' (f64, [out, in]) such that x·W'ᵀ equals the adapted forward.
    pub fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        match self {
            Adapter::SpectralA { .. } | Adapter::SpectralR { .. } => return spectral::merged(w, self),
            Adapter::Dora { a, b, mag, wnorm2, scale, .. } => {
                return Ok(ops::dora_merged(w, &wnorm2.to_vec_f64(), &a.to_vec_f64(), &b.to_vec_f64(), &mag.to_vec_f64(), a.dims()[0], *scale));
            }
            Adapter::Full { w: tuned } => {
                if tuned.dims() != w.dims() {
                    return Err(Error::shape("merge", "full weight", w.shape(), tuned.shape()));
                }
                return Ok(tuned.to_vec_f64());
            }
            _ => {}
        }
        let mut wm = w.to_vec_f64();
        let (a, b, scale) = match self {
            Adapter::Pissa { a, b, a0, b0, scale, .. } => {
                // W − s·B0·A0, then + s·B·A below.
                lora::add_delta(&mut wm, out_f, in_f, &a0.to_vec_f64(), &b0.to_vec_f64(), a0.dims()[0], -*scale);
                (a, b, *scale)
            }
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
            Adapter::SpectralA { .. } | Adapter::SpectralR { .. } | Adapter::Dora { .. } | Adapter::Full { .. } => unreachable!("returned above"),
        };
        lora::add_delta(&mut wm, out_f, in_f, &a.to_vec_f64(), &b.to_vec_f64(), a.dims()[0], scale);
        Ok(wm)
    }
}
