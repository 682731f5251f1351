//! LoRA (Hu et al.): W' = W + s·B·A with s = α/r (rsLoRA: α/√r). Also the LoRA pieces the
//! other LoRA-style methods share (init, merge, export, the A/B tensors of a file).

use std::any::Any;

use super::adapter::{f32_entry, Adapter, AdapterCtx, LinearAdapter, LoraFactors, ModuleFile, ModuleNames, TensorMap};
use super::registry::{Method, MethodKind};
use crate::device::{with_float, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::ops;
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

/// Tensor suffixes of the LoRA layout (PEFT's names).
pub(crate) const SUFFIXES: &[&str] = &["lora_A.weight", "lora_B.weight"];

pub(crate) static KIND: MethodKind = MethodKind {
    name: "lora",
    help: "LoRA: W + s·B·A",
    takes_k: false,
    takes_by_norm: false,
    takes_block: false,
    label: |_| "LoRA".into(),
    trainable_count: |_, o, i, r| r * (o + i),
    build: |_, w, cfg, dtype, rng| Ok(Box::new(Lora::new(w.dims()[0], w.dims()[1], cfg, dtype, rng)?)),
};

impl Method {
    /// LoRA.
    pub const fn lora() -> Method {
        Method::with("lora", 0, false, 0)
    }
}

/// y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ;  A [r, in], B [out, r] trainable.
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl Lora {
    /// LoRA as HF PEFT initializes it: A ~ Kaiming-uniform(a = √5) = U(−1/√in, 1/√in), B = 0.
    pub fn new(out_features: usize, in_features: usize, cfg: &LoraConfig, dtype: DType, rng: &mut SplitMix) -> Result<Lora> {
        let (a, b) = init(out_features, in_features, cfg, dtype, rng)?;
        Ok(Lora { a, b, scale: cfg.scale(), dropout: cfg.dropout })
    }
}

/// A module in the plain LoRA layout (`lora_A.weight`, `lora_B.weight` and nothing else).
pub(crate) fn load(f: &ModuleFile) -> Result<Option<Adapter>> {
    if !f.has("lora_A.weight") {
        return Ok(None);
    }
    let (a, b) = f.lora_ab(false)?;
    Ok(Some(Box::new(Lora { a, b, scale: f.lora.scale(), dropout: f.lora.dropout })))
}

/// s·B·A as a plain LoRA at scale s' (B scaled by s/s'), with no extra directions.
pub(crate) fn lora_part(a: &Tensor, b: &Tensor, scale: f64, out_f: usize, in_f: usize, s_common: f64) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let r = a.dims()[0];
    if a.dims() != [r, in_f] || b.dims() != [out_f, r] {
        return Err(Error::shape("export_peft_lora", "lora A/B", format!("[r, {in_f}] and [{out_f}, r]"), format!("{:?} and {:?}", a.dims(), b.dims())));
    }
    let ratio = scale / s_common;
    Ok((a.to_vec_f64(), b.to_vec_f64().iter().map(|v| v * ratio).collect(), r))
}

/// LoRA factors A [r, in] and B·(s/s') [out, r] extended by k extra directions: A' = [A ; ea]
/// (ea [k, in]), B' = [B·(s/s') | eb] (eb [out, k]).
pub(crate) fn extend_factors(a: Vec<f64>, b: Vec<f64>, r: usize, ea: Vec<f64>, eb: &[f64], k: usize, out_f: usize) -> LoraFactors {
    let rk = r + k;
    let mut a2 = a;
    a2.extend(ea);
    let mut b2 = vec![0.0f64; out_f * rk];
    for i in 0..out_f {
        b2[i * rk..i * rk + r].copy_from_slice(&b[i * r..(i + 1) * r]);
        b2[i * rk + r..(i + 1) * rk].copy_from_slice(&eb[i * k..(i + 1) * k]);
    }
    LoraFactors { a: a2, b: b2, rk, r, uniform_r: true }
}

impl LinearAdapter for Lora {
    fn method(&self) -> Method {
        Method::lora()
    }
    fn forward(&self, x: &Tensor, w: &Tensor, ctx: &AdapterCtx) -> Result<Tensor> {
        ops::adapter_linear(x, w, ops::Spectral::None, &self.a, &self.b, self.scale, ctx.dropout(self.dropout))
    }
    fn forward_gated(&self, gate: &Tensor, up: &Tensor, act: ops::GatedAct, w: &Tensor, ctx: &AdapterCtx, graph_only: bool) -> Result<Tensor> {
        gated_op(graph_only)(gate, up, act, w, ops::Spectral::None, &self.a, &self.b, self.scale, ctx.dropout(self.dropout))
    }
    fn params(&self) -> Vec<Tensor> {
        vec![self.a.clone(), self.b.clone()]
    }
    fn scale(&self) -> Option<f64> {
        Some(self.scale)
    }
    fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let mut wm = w.to_vec_f64();
        add_delta(&mut wm, out_f, in_f, &self.a.to_vec_f64(), &self.b.to_vec_f64(), self.a.dims()[0], self.scale);
        Ok(wm)
    }
    fn lora_factors(&self, w: &Tensor, s_common: f64) -> Result<LoraFactors> {
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let (a, b, r) = lora_part(&self.a, &self.b, self.scale, out_f, in_f, s_common)?;
        Ok(extend_factors(a, b, r, Vec::new(), &[], 0, out_f))
    }
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
        save_ab(&self.a, &self.b, names, out)
    }
    fn to_device(&self, device: Device) -> Result<Adapter> {
        Ok(Box::new(Lora { a: self.a.to_device(device)?, b: self.b.to_device(device)?, ..self.clone() }))
    }
    fn clone_box(&self) -> Adapter {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Writes `lora_A.weight` and `lora_B.weight`.
pub(crate) fn save_ab(a: &Tensor, b: &Tensor, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
    out.insert(format!("{}.lora_A.weight", names.prefix), f32_entry(a)?);
    out.insert(format!("{}.lora_B.weight", names.prefix), f32_entry(b)?);
    Ok(())
}

/// The fused gate + adapter op: the values-computing one, or the graph-only one.
pub(crate) type GatedOp = fn(&Tensor, &Tensor, ops::GatedAct, &Tensor, ops::Spectral<'_>, &Tensor, &Tensor, f64, Option<ops::Dropout>) -> Result<Tensor>;

pub(crate) fn gated_op(graph_only: bool) -> GatedOp {
    if graph_only {
        ops::gated_adapter_linear_graph_only
    } else {
        ops::gated_adapter_linear
    }
}
