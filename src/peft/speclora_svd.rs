//! SpecLoRA, SVD form: y = x·Wᵀ + ((x·V) ⊙ (d−1) ⊙ σ)·Uᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, i.e.
//! W' = W + U·diag((d − 1)⊙σ)·Vᵀ + s·B·A, with the frozen top-k SVD factors U [out, k], σ `[k]`,
//! V [in, k] computed once at init and stored with the adapter; d `[k]` (init 1), A, B trainable.

use std::any::Any;

use super::adapter::{f32_entry, tensor_of, Adapter, AdapterCtx, LinearAdapter, LoraFactors, ModuleFile, ModuleNames, TensorMap};
use super::lora::{self, add_delta, gated_op, lora_part, save_ab};
use super::registry::{Method, MethodKind};
use super::speclora::init_d;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::{self, SpecRows};
use crate::tensor::Tensor;

/// Tensor suffixes of the layout: `speclora_d` `[k]`, `speclora_u` [out, k], `speclora_sigma`
/// `[k]`, `speclora_v` [in, k], plus LoRA's A and B.
pub(crate) const SUFFIXES: &[&str] = &["speclora_d", "speclora_sigma", "speclora_u", "speclora_v"];

pub(crate) static KIND: MethodKind = MethodKind {
    name: "speclora-svd",
    help: "SpecLoRA-SVD: top-k singular values scaled by trainable d, plus LoRA (--k)",
    takes_k: true,
    takes_by_norm: false,
    takes_block: false,
    label: |m| format!("SpecLoRA-SVD (k={})", m.k),
    trainable_count: |m, o, i, r| r * (o + i) + m.k.min(o.min(i)),
    build: |m, w, cfg, dtype, rng| {
        let (o, i) = (w.dims()[0], w.dims()[1]);
        let (a, b) = lora::init(o, i, cfg, dtype, rng)?;
        let k = m.k.min(o.min(i));
        let top = crate::svd::top_k_svd(w, k, 2, rng.next_u64())?;
        const OP: &str = "speclora-svd init";
        Ok(Box::new(SpecLoraSvd {
            d: init_d(&SpecRows::Top(k), dtype)?,
            u: tensor_of(&top.u, vec![o, k], dtype, OP)?,
            sigma: tensor_of(&top.s, vec![k], dtype, OP)?,
            v: tensor_of(&top.v, vec![i, k], dtype, OP)?,
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        }))
    },
};

impl Method {
    /// SpecLoRA-SVD with the top-k singular directions (k clamped to min(out, in)).
    pub const fn speclora_svd(k: usize) -> Method {
        Method::with("speclora-svd", k, false, 0)
    }
}

/// The SVD-form SpecLoRA adapter (module docs).
#[derive(Clone, Debug)]
pub struct SpecLoraSvd {
    pub d: Tensor,
    pub u: Tensor,
    pub sigma: Tensor,
    pub v: Tensor,
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl SpecLoraSvd {
    fn spec(&self) -> ops::Spectral<'_> {
        ops::Spectral::Svd { d: &self.d, u: &self.u, sigma: &self.sigma, v: &self.v }
    }
}

/// A module with `speclora_u`.
pub(crate) fn load(f: &ModuleFile) -> Result<Option<Adapter>> {
    if !f.has("lora_A.weight") || !f.has("speclora_u") {
        return Ok(None);
    }
    let (a, b) = f.lora_ab(false)?;
    let (o, i) = f.dims();
    let k = f.shape("speclora_d")?.first().copied().unwrap_or(0);
    let d = f.tensor("speclora_d", &[k], true)?;
    Ok(Some(Box::new(SpecLoraSvd {
        d,
        u: f.tensor("speclora_u", &[o, k], false)?,
        sigma: f.tensor("speclora_sigma", &[k], false)?,
        v: f.tensor("speclora_v", &[i, k], false)?,
        a,
        b,
        scale: f.lora.scale(),
        dropout: f.lora.dropout,
    })))
}

impl LinearAdapter for SpecLoraSvd {
    fn method(&self) -> Method {
        Method::speclora_svd(self.d.numel())
    }
    fn forward(&self, x: &Tensor, w: &Tensor, ctx: &AdapterCtx) -> Result<Tensor> {
        ops::adapter_linear(x, w, self.spec(), &self.a, &self.b, self.scale, ctx.dropout(self.dropout))
    }
    fn forward_gated(&self, gate: &Tensor, up: &Tensor, act: ops::GatedAct, w: &Tensor, ctx: &AdapterCtx, graph_only: bool) -> Result<Tensor> {
        gated_op(graph_only)(gate, up, act, w, self.spec(), &self.a, &self.b, self.scale, ctx.dropout(self.dropout))
    }
    fn params(&self) -> Vec<Tensor> {
        vec![self.d.clone(), self.a.clone(), self.b.clone()]
    }
    fn no_decay_params(&self) -> Vec<Tensor> {
        vec![self.d.clone()]
    }
    fn scale(&self) -> Option<f64> {
        Some(self.scale)
    }
    fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let mut wm = w.to_vec_f64();
        // W += U·diag((d − 1) ⊙ σ)·Vᵀ
        let (dv, uv, sv, vv) = (self.d.to_vec_f64(), self.u.to_vec_f64(), self.sigma.to_vec_f64(), self.v.to_vec_f64());
        let k = dv.len();
        for i in 0..out_f {
            for j in 0..in_f {
                wm[i * in_f + j] += (0..k).map(|q| uv[i * k + q] * (dv[q] - 1.0) * sv[q] * vv[j * k + q]).sum::<f64>();
            }
        }
        add_delta(&mut wm, out_f, in_f, &self.a.to_vec_f64(), &self.b.to_vec_f64(), self.a.dims()[0], self.scale);
        Ok(wm)
    }
    /// U·diag((d − 1)⊙σ)·Vᵀ: k extra rows diag((d−1)⊙σ)·Vᵀ/s' of A' and the columns U of B'.
    fn lora_factors(&self, w: &Tensor, s_common: f64) -> Result<LoraFactors> {
        const OP: &str = "export_peft_lora";
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let (a, b, r) = lora_part(&self.a, &self.b, self.scale, out_f, in_f, s_common)?;
        let (dv, uv, sv, vv) = (self.d.to_vec_f64(), self.u.to_vec_f64(), self.sigma.to_vec_f64(), self.v.to_vec_f64());
        let k = dv.len();
        if self.u.dims() != [out_f, k] || self.sigma.dims() != [k] || self.v.dims() != [in_f, k] {
            return Err(Error::shape(
                OP,
                "speclora-svd factors",
                format!("u [{out_f}, {k}], sigma [{k}], v [{in_f}, {k}]"),
                format!("{:?}, {:?}, {:?}", self.u.dims(), self.sigma.dims(), self.v.dims()),
            ));
        }
        let mut ea = Vec::with_capacity(k * in_f);
        for q in 0..k {
            let f = (dv[q] - 1.0) * sv[q] / s_common;
            ea.extend((0..in_f).map(|j| vv[j * k + q] * f));
        }
        Ok(lora::extend_factors(a, b, r, ea, &uv, k, out_f))
    }
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
        let p = &names.prefix;
        out.insert(format!("{p}.speclora_d"), f32_entry(&self.d)?);
        out.insert(format!("{p}.speclora_u"), f32_entry(&self.u)?);
        out.insert(format!("{p}.speclora_sigma"), f32_entry(&self.sigma)?);
        out.insert(format!("{p}.speclora_v"), f32_entry(&self.v)?);
        save_ab(&self.a, &self.b, names, out)
    }
    fn to_device(&self, device: Device) -> Result<Adapter> {
        let mv = |t: &Tensor| t.to_device(device);
        Ok(Box::new(SpecLoraSvd {
            d: mv(&self.d)?,
            u: mv(&self.u)?,
            sigma: mv(&self.sigma)?,
            v: mv(&self.v)?,
            a: mv(&self.a)?,
            b: mv(&self.b)?,
            scale: self.scale,
            dropout: self.dropout,
        }))
    }
    fn clone_box(&self) -> Adapter {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
