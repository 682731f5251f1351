//! A frozen linear layer y = x·Wᵀ (+ b) at a module path, with an optional adapter.

use crate::error::Result;
use crate::ops;
use crate::peft::{Adapter, AdapterCtx};
use crate::tensor::Tensor;

pub use crate::ops::GatedAct;

/// A frozen linear layer, with an optional bias and an optional adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    /// HF module path, e.g. `model.layers.3.self_attn.q_proj` (the weight is `{path}.weight`,
    /// the PEFT adapter keys `base_model.model.{path}.lora_A.weight`, …).
    pub path: String,
    /// [out, in], frozen.
    pub weight: Tensor,
    /// `[out]`, frozen.
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
}

impl Linear {
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { path: path.into(), weight, bias, adapter: None }
    }

    /// `dropout_seed`: Some while training (adapter dropout on), None for evaluation.
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let y = match &self.adapter {
            Some(ad) => ad.forward(x, &self.weight, &AdapterCtx { dropout_seed })?,
            None => ops::linear(x, &self.weight)?,
        };
        self.add_bias(y)
    }

    /// `forward(act(gate) ⊙ up)` (SwiGLU or GeGLU). With an adapter this is fused so the
    /// product is not kept for the backward. `graph_only`: the caller never reads the output
    /// values (a checkpointed layer's last op while its backward re-runs it), so an adapter may
    /// skip computing them.
    pub fn forward_gated(&self, act: GatedAct, gate: &Tensor, up: &Tensor, dropout_seed: Option<u64>, graph_only: bool) -> Result<Tensor> {
        let y = match &self.adapter {
            Some(ad) => ad.forward_gated(gate, up, act, &self.weight, &AdapterCtx { dropout_seed }, graph_only)?,
            None => {
                let p = match act {
                    GatedAct::Silu => crate::profile::fwd("swiglu", || ops::swiglu(gate, up))?,
                    GatedAct::GeluTanh => crate::profile::fwd("geglu", || ops::geglu(gate, up))?,
                };
                ops::linear(&p, &self.weight)?
            }
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => ops::add(&y, b),
            None => Ok(y),
        }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    /// The module name: the last segment of the path (`q_proj`).
    pub fn module(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(&self.path)
    }
    /// The decoder layer index in the path (`….layers.3.…` → 3), if any.
    pub fn layer(&self) -> Option<usize> {
        layer_of(&self.path)
    }
}

/// A selector for [`Decoder::attach_adapters`](crate::model::Decoder::attach_adapters): the
/// linears whose module name (last path segment) is one of `names` (`["q_proj", "v_proj"]`).
pub fn modules<'a>(names: &'a [&'a str]) -> impl Fn(&str) -> crate::error::Result<bool> + 'a {
    move |path: &str| Ok(names.contains(&path.rsplit('.').next().unwrap_or(path)))
}

/// The index after `.layers.` (or a leading `layers.`) in a module path or tensor name.
pub fn layer_of(path: &str) -> Option<usize> {
    let rest = path.split_once("layers.").filter(|(pre, _)| pre.is_empty() || pre.ends_with('.'))?.1;
    rest.split('.').next()?.parse().ok()
}
