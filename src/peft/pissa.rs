//! PiSSA (top-r singular triplets) and MiLoRA (bottom-r): a LoRA whose A, B start at
//! √(Σ_r/s)·V_rᵀ and U_r·√(Σ_r/s) (so s·B·A = U_r·Σ_r·V_rᵀ at init), on the residual base
//! W − s·B0·A0, where A0 [r, in], B0 [out, r] are frozen copies of the initial A, B (so W is
//! never copied densely): y = x·Wᵀ − s·(x·A0ᵀ)·B0ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ. r is clamped to
//! min(out, in). File layout: `lora_A/lora_B` plus the frozen `…pissa_A0`, `…pissa_B0`.

use std::any::Any;

use super::adapter::{f32_entry, tensor_of, Adapter, AdapterCtx, LinearAdapter, ModuleFile, ModuleNames, TensorMap};
use super::lora::{add_delta, save_ab};
use super::registry::{Method, MethodKind};
use super::spectral::SVD_POWER_ITERS;
use super::LoraConfig;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::ops;
use crate::tensor::Tensor;

/// Tensor suffixes of the layout besides LoRA's A and B.
pub(crate) const SUFFIXES: &[&str] = &["pissa_A0", "pissa_B0"];

pub(crate) static KIND_PISSA: MethodKind = MethodKind {
    name: "pissa",
    help: "PiSSA: LoRA initialized from the top-r singular triplets",
    takes_k: false,
    takes_by_norm: false,
    takes_block: false,
    label: |_| "PiSSA".into(),
    trainable_count: |_, o, i, r| r.min(o.min(i)) * (o + i),
    build,
};

pub(crate) static KIND_MILORA: MethodKind = MethodKind {
    name: "milora",
    help: "MiLoRA: LoRA initialized from the bottom-r singular triplets",
    takes_k: false,
    takes_by_norm: false,
    takes_block: false,
    label: |_| "MiLoRA".into(),
    trainable_count: |_, o, i, r| r.min(o.min(i)) * (o + i),
    build,
};

impl Method {
    /// PiSSA: LoRA initialized from the top-r singular triplets.
    pub const fn pissa() -> Method {
        Method::with("pissa", 0, false, 0)
    }
    /// MiLoRA: LoRA initialized from the bottom-r singular triplets.
    pub const fn milora() -> Method {
        Method::with("milora", 0, false, 0)
    }
}

fn build(m: &Method, w: &Tensor, cfg: &LoraConfig, dtype: DType, rng: &mut SplitMix) -> Result<Adapter> {
    const OP: &str = "pissa init";
    let (o, i) = (w.dims()[0], w.dims()[1]);
    if cfg.rank == 0 {
        return Err(Error::invalid(OP, "rank must be > 0"));
    }
    let r = cfg.rank.min(o.min(i));
    let milora = m.name() == "milora";
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
    Ok(Box::new(Pissa { a: a0.param()?, b: b0.param()?, a0, b0, scale: s, dropout: cfg.dropout, milora }))
}

/// The PiSSA / MiLoRA adapter (module docs).
#[derive(Clone, Debug)]
pub struct Pissa {
    pub a: Tensor,
    pub b: Tensor,
    pub a0: Tensor,
    pub b0: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// Initialized from the bottom triplets (MiLoRA) rather than the top ones (PiSSA).
    pub milora: bool,
}

/// A LoRA-layout module with `pissa_A0` (MiLoRA when the config's `spectune.method` says so).
pub(crate) fn load(f: &ModuleFile) -> Result<Option<Adapter>> {
    if !f.has("lora_A.weight") || !f.has("pissa_A0") {
        return Ok(None);
    }
    let (a, b) = f.lora_ab(true)?;
    let (ra, (o, i)) = (a.dims()[0], f.dims());
    Ok(Some(Box::new(Pissa {
        a,
        b,
        a0: f.tensor("pissa_A0", &[ra, i], false)?,
        b0: f.tensor("pissa_B0", &[o, ra], false)?,
        scale: f.lora.scale(),
        dropout: f.lora.dropout,
        milora: f.spectune_method == Some("milora"),
    })))
}

impl LinearAdapter for Pissa {
    fn method(&self) -> Method {
        if self.milora {
            Method::milora()
        } else {
            Method::pissa()
        }
    }
    fn forward(&self, x: &Tensor, w: &Tensor, ctx: &AdapterCtx) -> Result<Tensor> {
        ops::adapter_linear(x, w, ops::Spectral::Residual { a0: &self.a0, b0: &self.b0 }, &self.a, &self.b, self.scale, ctx.dropout(self.dropout))
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
        // W − s·B0·A0 + s·B·A
        add_delta(&mut wm, out_f, in_f, &self.a0.to_vec_f64(), &self.b0.to_vec_f64(), self.a0.dims()[0], -self.scale);
        add_delta(&mut wm, out_f, in_f, &self.a.to_vec_f64(), &self.b.to_vec_f64(), self.a.dims()[0], self.scale);
        Ok(wm)
    }
    /// s·B·A − s·B0·A0 = s·[B | −B0]·[A ; A0] (q = 2r).
    fn delta_factors(&self) -> Option<(Vec<f64>, Vec<f64>, usize, f64)> {
        let (r, r0) = (self.a.dims()[0], self.a0.dims()[0]);
        let (o, i) = (self.b.dims()[0], self.a.dims()[1]);
        let q = r + r0;
        let (bv, b0v) = (self.b.to_vec_f64(), self.b0.to_vec_f64());
        let mut bp = vec![0.0; o * q];
        for row in 0..o {
            bp[row * q..row * q + r].copy_from_slice(&bv[row * r..(row + 1) * r]);
            for j in 0..r0 {
                bp[row * q + r + j] = -b0v[row * r0 + j];
            }
        }
        let mut ap = self.a.to_vec_f64();
        ap.extend(self.a0.to_vec_f64());
        debug_assert_eq!(ap.len(), q * i);
        Some((bp, ap, q, self.scale))
    }
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
        let p = &names.prefix;
        out.insert(format!("{p}.pissa_A0"), f32_entry(&self.a0)?);
        out.insert(format!("{p}.pissa_B0"), f32_entry(&self.b0)?);
        save_ab(&self.a, &self.b, names, out)
    }
    fn to_device(&self, device: Device) -> Result<Adapter> {
        let mv = |t: &Tensor| t.to_device(device);
        Ok(Box::new(Pissa { a: mv(&self.a)?, b: mv(&self.b)?, a0: mv(&self.a0)?, b0: mv(&self.b0)?, ..self.clone() }))
    }
    fn clone_box(&self) -> Adapter {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
