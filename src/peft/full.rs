//! Full fine-tuning of chosen linears: W' [out, in] is a trainable dense copy of the frozen W
//! (dense dW and AdamW state for these matrices only). Saved without PEFT keys
//! (`spectune.method = "full"`), the tuned matrices under their HF names
//! (`model.layers.{i}.self_attn.q_proj.weight`); see [`crate::peft::io`].

use std::any::Any;

use super::adapter::{f32_entry, tensor_of, Adapter, AdapterCtx, LinearAdapter, LoraFactors, ModuleNames, TensorMap};
use super::registry::{Method, MethodKind};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops;
use crate::tensor::Tensor;

pub(crate) static KIND: MethodKind = MethodKind {
    name: "full",
    help: "full fine-tuning of the targeted matrices",
    takes_k: false,
    takes_by_norm: false,
    takes_block: false,
    label: |_| "full fine-tuning".into(),
    trainable_count: |_, o, i, _| o * i,
    build: |_, w, _, dtype, _| {
        let (o, i) = (w.dims()[0], w.dims()[1]);
        Ok(Box::new(Full { w: tensor_of(&w.to_vec_f64(), vec![o, i], dtype, "full init")?.param()? }))
    },
};

impl Method {
    /// Full fine-tuning of the targeted matrices.
    pub const fn full() -> Method {
        Method::with("full", 0, false, 0)
    }
}

/// y = x·W'ᵀ with the trainable copy W' (module docs).
#[derive(Clone, Debug)]
pub struct Full {
    /// [out, in], trainable.
    pub w: Tensor,
}

impl LinearAdapter for Full {
    fn method(&self) -> Method {
        Method::full()
    }
    fn forward(&self, x: &Tensor, _w: &Tensor, _ctx: &AdapterCtx) -> Result<Tensor> {
        ops::linear(x, &self.w)
    }
    fn params(&self) -> Vec<Tensor> {
        vec![self.w.clone()]
    }
    fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        if self.w.dims() != w.dims() {
            return Err(Error::shape("merge", "full weight", w.shape(), self.w.shape()));
        }
        Ok(self.w.to_vec_f64())
    }
    fn lora_factors(&self, _w: &Tensor, _s_common: f64) -> Result<LoraFactors> {
        Err(Error::invalid("export_peft_lora", "full fine-tuning changes W densely (not low-rank); use `spectune merge` to write the tuned checkpoint"))
    }
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
        out.insert(names.weight.clone(), f32_entry(&self.w)?);
        Ok(())
    }
    fn to_device(&self, device: Device) -> Result<Adapter> {
        Ok(Box::new(Full { w: self.w.to_device(device)? }))
    }
    fn clone_box(&self) -> Adapter {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
