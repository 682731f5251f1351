//! The interface every adapter method implements ([`LinearAdapter`]) and the helpers the method
//! files share: the forward context, the plain-LoRA export factors, and the tensors of one module
//! in an adapter file (for saving and loading under a module prefix).
//!
//! An adapter sits on one frozen linear W [out, in] and replaces y = x·Wᵀ by the method's
//! adapted forward. It owns its trainable tensors (leaves from [`Tensor::param`]) and any frozen
//! extras (SVD factors, PiSSA's initial A0/B0, DoRA's ‖W_i‖²); W itself stays with the linear.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use super::registry::Method;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops;
use crate::tensor::Tensor;

/// Per-forward settings shared by every adapter of a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterCtx {
    /// Seed of the branch dropout while training; `None` means evaluation (no dropout).
    pub dropout_seed: Option<u64>,
}

impl AdapterCtx {
    /// The dropout of a branch with probability `p` in this forward (None at evaluation or p = 0).
    pub fn dropout(&self, p: f64) -> Option<ops::Dropout> {
        self.dropout_seed.filter(|_| p > 0.0).map(|seed| ops::Dropout { p, seed })
    }
}

/// One adapted module's update written as a LoRA for the export's common scale s':
/// W' − W = s'·B'·A' with A' [rk, in] and B' [out, rk] (f64, row-major). `r` is the method's own
/// LoRA rank (rk − r extra directions were added, e.g. SpecLoRA's k); `uniform_r` says every
/// module of one adapter must share that r (methods with a trained LoRA part).
#[derive(Clone, Debug)]
pub struct LoraFactors {
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub rk: usize,
    pub r: usize,
    pub uniform_r: bool,
}

/// Adapter tensors being saved: file name → (shape, little-endian bytes, dtype).
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<u8>, Dtype)>;

/// The names of one adapted module in an adapter file.
#[derive(Clone, Debug)]
pub struct ModuleNames {
    /// PEFT's module prefix, `base_model.model.model.layers.{i}.self_attn.q_proj`; a method's
    /// tensors are `{prefix}.{suffix}`.
    pub prefix: String,
    /// The HF name of the frozen weight, `model.layers.{i}.self_attn.q_proj.weight`.
    pub weight: String,
}

/// The adapter method of one frozen linear: forward, parameters, merge and export, files, device.
pub trait LinearAdapter: Debug + Send + Sync {
    /// The method with its settings (name, k, block).
    fn method(&self) -> Method;

    /// y [.., out] for x [.., in] through the frozen `w` [out, in] with this adapter.
    fn forward(&self, x: &Tensor, w: &Tensor, ctx: &AdapterCtx) -> Result<Tensor>;

    /// As [`forward`](Self::forward) on x = act(gate) ⊙ up (SwiGLU or GeGLU). Methods with a
    /// fused op avoid keeping the product for the backward; with `graph_only` the output values
    /// may be left uncomputed (the backward is the same). The default records the gate op and
    /// keeps x.
    fn forward_gated(&self, gate: &Tensor, up: &Tensor, act: ops::GatedAct, w: &Tensor, ctx: &AdapterCtx, graph_only: bool) -> Result<Tensor> {
        let _ = graph_only;
        self.forward(&if act == ops::GatedAct::Silu { ops::swiglu(gate, up)? } else { ops::geglu(gate, up)? }, w, ctx)
    }

    /// The trainable tensors, in a fixed order (the optimizer's and the checkpoint's order).
    fn params(&self) -> Vec<Tensor>;

    /// Parameters that must not get weight decay: multiplicative scales whose identity is not 0.
    fn no_decay_params(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// The LoRA scale s of methods that have one.
    fn scale(&self) -> Option<f64> {
        None
    }

    /// The merged dense weight W' (f64, [out, in]) such that x·W'ᵀ equals the adapted forward.
    fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>>;

    /// The update W' − W as an exact low-rank product `scale·B'·A'` (B' [out, q], A' [q, in],
    /// f64, row-major, returned as (B', A', q, scale)) for methods whose update is a product of
    /// their own factors; None otherwise.
    fn delta_factors(&self) -> Option<(Vec<f64>, Vec<f64>, usize, f64)> {
        None
    }

    /// The update as a plain LoRA at the common scale `s_common` (for `spectune export`). The
    /// default converts [`delta_factors`](Self::delta_factors): A'' = A'·(scale/s').
    fn lora_factors(&self, w: &Tensor, s_common: f64) -> Result<LoraFactors> {
        const OP: &str = "export_peft_lora";
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let Some((bp, ap, q, scale)) = self.delta_factors() else {
            return Err(Error::invalid(OP, format!("{} has no exact low-rank update", self.method().label())));
        };
        if bp.len() != out_f * q || ap.len() != q * in_f {
            return Err(Error::shape(OP, "update factors", format!("[{out_f}, {q}] and [{q}, {in_f}]"), format!("{} and {} values", bp.len(), ap.len())));
        }
        let ratio = scale / s_common;
        let a = if ratio == 1.0 { ap } else { ap.iter().map(|x| x * ratio).collect() };
        Ok(LoraFactors { a, b: bp, rk: q, r: q, uniform_r: false })
    }

    /// Adds this module's tensors to `out` under `names` (f32, or I64 for indices).
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()>;

    /// Adds the method's settings to the `spectune` object of `adapter_config.json`.
    fn save_config(&self, spectune: &mut serde_json::Map<String, serde_json::Value>) {
        let _ = spectune;
    }

    /// A copy on `device`: trainables stay trainable leaves (fresh ids: build the optimizer
    /// afterwards), frozen extras become constants there.
    fn to_device(&self, device: Device) -> Result<Box<dyn LinearAdapter>>;

    /// A copy sharing the tensors (the `Clone` of [`Adapter`]).
    fn clone_box(&self) -> Box<dyn LinearAdapter>;

    /// For downcasting to the method's type (`downcast_ref` on `dyn LinearAdapter`).
    fn as_any(&self) -> &dyn Any;
}

/// An adapter attached to a linear.
pub type Adapter = Box<dyn LinearAdapter>;

impl Clone for Box<dyn LinearAdapter> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

impl<'a> dyn LinearAdapter + 'a {
    /// The method's concrete type, e.g. `ad.downcast_ref::<peft::lora::Lora>()`.
    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        self.as_any().downcast_ref::<T>()
    }
}

/// f64 values as a tensor of compute dtype `dtype`.
pub(crate) fn tensor_of(v: &[f64], dims: Vec<usize>, dtype: DType, op: &'static str) -> Result<Tensor> {
    crate::device::with_float!(dtype, op, |T| { Tensor::from_vec(v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>(), dims) })
}

/// `t` as little-endian f32 bytes for an adapter file.
pub(crate) fn f32_entry(t: &Tensor) -> Result<(Vec<usize>, Vec<u8>, Dtype)> {
    Ok((t.dims().to_vec(), t.try_to_vec::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(), Dtype::F32))
}

/// Integers as an I64 `[len]` entry of an adapter file.
pub(crate) fn i64_entry(v: &[i64]) -> (Vec<usize>, Vec<u8>, Dtype) {
    (vec![v.len()], v.iter().flat_map(|x| x.to_le_bytes()).collect(), Dtype::I64)
}

/// One module of an adapter file being loaded: the file, the module's names, the frozen weight's
/// shape and the folder's LoRA settings. A method's loader reads its tensors through it.
pub struct ModuleFile<'a> {
    pub(crate) st: &'a SafeTensors<'a>,
    pub(crate) path: &'a std::path::Path,
    pub names: ModuleNames,
    /// The frozen weight W [out, in] of this module.
    pub weight: &'a Tensor,
    /// Compute dtype of the model (the loaded tensors get it).
    pub dtype: DType,
    /// The LoRA settings of the folder (`r`, `lora_alpha`, `use_rslora`, `lora_dropout`).
    pub lora: &'a super::LoraConfig,
    /// `use_dora` of the config.
    pub use_dora: bool,
    /// `spectune.method` of the config, if any.
    pub spectune_method: Option<&'a str>,
}

impl ModuleFile<'_> {
    /// [out, in] of the frozen weight.
    pub fn dims(&self) -> (usize, usize) {
        (self.weight.dims()[0], self.weight.dims()[1])
    }
    /// The full name of `suffix` (`{prefix}.{suffix}`).
    pub fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.names.prefix)
    }
    /// Whether the file holds `{prefix}.{suffix}`.
    pub fn has(&self, suffix: &str) -> bool {
        self.st.tensor(&self.name(suffix)).is_ok()
    }
    /// A format error naming the file.
    pub fn err(&self, msg: String) -> Error {
        Error::Format { path: self.path.to_path_buf(), msg }
    }
    /// The shape of `{prefix}.{suffix}`.
    pub fn shape(&self, suffix: &str) -> Result<Vec<usize>> {
        let name = self.name(suffix);
        Ok(self.st.tensor(&name).map_err(|_| self.err(format!("missing tensor {name}")))?.shape().to_vec())
    }
    /// `{prefix}.{suffix}` checked to have shape `dims`, as a tensor of the model's dtype (a
    /// trainable leaf with `param`). Stored as f32, bf16 or f16.
    pub fn tensor(&self, suffix: &str, dims: &[usize], param: bool) -> Result<Tensor> {
        let name = self.name(suffix);
        let v = self.values(&name, dims)?;
        let t = crate::device::with_float!(self.dtype, "load_adapter", |T| {
            Tensor::from_vec(v.iter().map(|&x| T::from_f64(x as f64)).collect::<Vec<T>>(), dims.to_vec())
        })?;
        if param {
            t.param()
        } else {
            Ok(t)
        }
    }
    fn values(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        let t = self.st.tensor(name).map_err(|_| self.err(format!("missing tensor {name}")))?;
        if t.shape() != dims {
            return Err(self.err(format!("{name}: expected shape {dims:?}, got {:?}", t.shape())));
        }
        let data = t.data();
        match t.dtype() {
            Dtype::F32 => Ok(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Dtype::BF16 => Ok(data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            Dtype::F16 => Ok(data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
            other => Err(self.err(format!("{name}: unsupported dtype {other:?}"))),
        }
    }
    /// `{prefix}.{suffix}` as I64 values of shape `[len]` (any len when `len` is None).
    pub fn i64s(&self, suffix: &str, len: Option<usize>, expect: &str) -> Result<Vec<i64>> {
        let name = self.name(suffix);
        let t = self.st.tensor(&name).map_err(|_| self.err(format!("missing tensor {name}")))?;
        if t.dtype() != Dtype::I64 || t.shape().len() != 1 || len.is_some_and(|n| t.shape() != [n]) {
            return Err(self.err(format!("{name}: expected I64 {expect}, got {:?} {:?}", t.dtype(), t.shape())));
        }
        Ok(t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
    }
    /// A and B of a LoRA-layout module: `lora_A.weight` [r, in] and `lora_B.weight` [out, r] as
    /// trainable leaves, with r = the folder's rank, or with `clamped` any rank in 1..=r (PiSSA
    /// and MiLoRA clamp r to min(out, in) per module).
    pub fn lora_ab(&self, clamped: bool) -> Result<(Tensor, Tensor)> {
        let (o, i) = self.dims();
        let rank = self.lora.rank;
        let a_name = self.name("lora_A.weight");
        let ra = if clamped { self.shape("lora_A.weight")?.first().copied().unwrap_or(0) } else { rank };
        if ra == 0 || ra > rank {
            return Err(self.err(format!("{a_name}: rank {ra} is not in 1..={rank}")));
        }
        let a = self.tensor("lora_A.weight", &[ra, i], true)?;
        let b = self.tensor("lora_B.weight", &[o, ra], true)?;
        let mag = self.name("lora_magnitude_vector");
        if self.use_dora && !self.has("lora_magnitude_vector") {
            return Err(self.err(format!("use_dora is set but {mag} is missing")));
        }
        Ok((a, b))
    }
}
