//! DoRA (Liu et al. 2024): W' = diag(mag/ν)·(W + s·B·A), ν_i = ‖W_i + s·B_i·A‖ (docs/ops.md
//! §20–22); mag `[out]` (init ‖W_i‖), A and B trainable; ‖W_i‖² `[out]` kept frozen in f64 (derived
//! from W at init and at load). Saved as stock PEFT DoRA: `use_dora = true` and
//! `…lora_magnitude_vector` `[out]` beside `lora_A/lora_B`.

use std::any::Any;

use super::adapter::{f32_entry, tensor_of, Adapter, AdapterCtx, LinearAdapter, LoraFactors, ModuleFile, ModuleNames, TensorMap};
use super::lora::{self, save_ab};
use super::registry::{Method, MethodKind};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops;
use crate::tensor::Tensor;

/// Tensor suffixes of the layout besides LoRA's A and B.
pub(crate) const SUFFIXES: &[&str] = &["lora_magnitude_vector"];

pub(crate) static KIND: MethodKind = MethodKind {
    name: "dora",
    help: "DoRA: magnitude and direction (LoRA on the direction)",
    takes_k: false,
    takes_by_norm: false,
    takes_block: false,
    label: |_| "DoRA".into(),
    trainable_count: |_, o, i, r| r * (o + i) + o,
    build: |_, w, cfg, dtype, rng| {
        let (o, i) = (w.dims()[0], w.dims()[1]);
        let (a, b) = lora::init(o, i, cfg, dtype, rng)?;
        let wn2 = ops::row_norms2(w)?;
        let mag: Vec<f64> = wn2.iter().map(|v| v.sqrt()).collect();
        Ok(Box::new(Dora {
            a,
            b,
            mag: tensor_of(&mag, vec![o], dtype, "dora init")?.param()?,
            wnorm2: Tensor::from_vec(wn2, [o])?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        }))
    },
};

impl Method {
    /// DoRA: magnitude and direction (LoRA on the direction).
    pub const fn dora() -> Method {
        Method::with("dora", 0, false, 0)
    }
}

/// The DoRA adapter (module docs).
#[derive(Clone, Debug)]
pub struct Dora {
    pub a: Tensor,
    pub b: Tensor,
    pub mag: Tensor,
    /// ‖W_i‖² `[out]`, frozen (f64 on the CPU, f32 on a device).
    pub wnorm2: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

/// A LoRA-layout module with `lora_magnitude_vector`.
pub(crate) fn load(f: &ModuleFile) -> Result<Option<Adapter>> {
    if !f.has("lora_A.weight") || !f.has("lora_magnitude_vector") {
        return Ok(None);
    }
    let (a, b) = f.lora_ab(false)?;
    let o = f.dims().0;
    let wn2 = ops::row_norms2(f.weight)?;
    Ok(Some(Box::new(Dora {
        a,
        b,
        mag: f.tensor("lora_magnitude_vector", &[o], true)?,
        wnorm2: Tensor::from_vec(wn2, [o])?,
        scale: f.lora.scale(),
        dropout: f.lora.dropout,
    })))
}

impl LinearAdapter for Dora {
    fn method(&self) -> Method {
        Method::dora()
    }
    fn forward(&self, x: &Tensor, w: &Tensor, ctx: &AdapterCtx) -> Result<Tensor> {
        // ν from the current A, B, outside the graph (a constant for the backward), on the device
        // of W: W is never read back to the host.
        let nu = ops::dora_nu(w, &self.wnorm2, &self.a, &self.b, self.scale)?;
        ops::dora_linear(x, w, &nu, &self.a, &self.b, &self.mag, self.scale, ctx.dropout(self.dropout))
    }
    fn params(&self) -> Vec<Tensor> {
        vec![self.mag.clone(), self.a.clone(), self.b.clone()]
    }
    /// mag's identity is ‖W_i‖: decay toward 0 would pull it off it.
    fn no_decay_params(&self) -> Vec<Tensor> {
        vec![self.mag.clone()]
    }
    fn scale(&self) -> Option<f64> {
        Some(self.scale)
    }
    fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        Ok(ops::dora_merged(w, &self.wnorm2.to_vec_f64(), &self.a.to_vec_f64(), &self.b.to_vec_f64(), &self.mag.to_vec_f64(), self.a.dims()[0], self.scale))
    }
    fn lora_factors(&self, _w: &Tensor, _s_common: f64) -> Result<LoraFactors> {
        Err(Error::invalid(
            "export_peft_lora",
            "DoRA's update diag(mag/ν)·(W + s·B·A) − W is not low-rank, so it has no plain-LoRA form; its adapter folder is already a stock PEFT DoRA adapter (use_dora = true, lora_magnitude_vector), or merge it with `spectune merge`",
        ))
    }
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
        out.insert(format!("{}.lora_magnitude_vector", names.prefix), f32_entry(&self.mag)?);
        save_ab(&self.a, &self.b, names, out)
    }
    fn to_device(&self, device: Device) -> Result<Adapter> {
        let mv = |t: &Tensor| t.to_device(device);
        // ‖W_i‖² is f64 for the CPU op; the device keeps it in f32.
        let wnorm2 = self.wnorm2.to_device_as(device, if device == Device::Cpu { self.wnorm2.dtype() } else { crate::DType::F32 })?;
        Ok(Box::new(Dora { a: mv(&self.a)?, b: mv(&self.b)?, mag: mv(&self.mag)?, wnorm2, scale: self.scale, dropout: self.dropout }))
    }
    fn clone_box(&self) -> Adapter {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
