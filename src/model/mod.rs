//! Transformer models built from [`crate::nn`] blocks and [`crate::ops`]: one config-driven
//! decoder ([`decoder`]), a file per family mapping its config onto the decoder's switches
//! ([`families`]), and the [`Model`] interface that training, evaluation, generation, export,
//! merging, fusing, spectrum analysis and benchmarks use.

pub mod config;
pub mod decoder;
pub mod families;
pub mod generate;
pub mod gguf;

use std::path::Path;

pub use decoder::{Block, Decoder, DecoderConfig, GateUp, KvCache, NamedTensor, Qkv, RopeConfig};
pub use generate::{generate, GenerateOptions};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::io::safetensors::SafetensorsCheckpoint;
use crate::io::Checkpoint;
use crate::nn::Linear;
use crate::ops::CeOptions;
use crate::peft::{LoraConfig, Method};
use crate::tensor::Tensor;

/// A causal language model as training, evaluation, generation, export, merging, fusing,
/// spectrum analysis and benchmarks see it: token ids in, hidden states / logits / loss out, and
/// its linears (each at an HF module path, with its frozen weight and optional adapter).
/// [`Decoder`] implements it for every supported family.
pub trait Model: Send + Sync {
    /// Sizes and switches (family, vocabulary, context length, …).
    fn config(&self) -> &DecoderConfig;
    /// Compute dtype of activations and adapters (f32, or f64 for gradient checks).
    fn dtype(&self) -> DType;
    /// Every linear, layer by layer in HF module order.
    fn linears(&self) -> Vec<&Linear>;
    fn linears_mut(&mut self) -> Vec<&mut Linear>;
    /// Final hidden states [b·t, hidden] of ids [b·t]; `key_mask` ([b·t], true = real) masks padding keys.
    fn hidden_states(&self, ids: &[u32], b: usize, t: usize, key_mask: Option<&[bool]>) -> Result<Tensor>;
    /// Logits [n, vocab] of hidden states [n, hidden] (the LM head, soft-capped where the family caps).
    fn head_logits(&self, h: &Tensor) -> Result<Tensor>;
    /// Mean next-token cross-entropy over counted targets ([b·t], −100 ignored), through the fused
    /// LM-head loss.
    fn loss(&self, ids: &[u32], targets: &[i64], b: usize, t: usize, key_mask: Option<&[bool]>, opts: &CeOptions) -> Result<Tensor>;
    /// Incremental decoding without a graph: appends the keys/values of `ids` to `cache`.
    fn forward_cached(&self, ids: &[u32], b: usize, t: usize, cache: &mut KvCache) -> Result<Tensor>;
    /// Every frozen tensor under its HF name, in file order (what a merged checkpoint holds).
    fn named_tensors(&self) -> Vec<(String, NamedTensor<'_>)>;
    /// Training mode (adapter dropout on, seeded by `dropout_seed`) or evaluation.
    fn set_training(&mut self, training: bool, dropout_seed: u64);
    /// Activation checkpointing per layer, the last `keep` layers keeping their activations.
    fn set_checkpointing(&mut self, on: bool, keep: usize);
    /// A copy on `device` (frozen matrices stored as `weight_dtype` there).
    fn to_device(&self, device: crate::device::Device, weight_dtype: DType) -> Result<Box<dyn Model>>;
    fn clone_model(&self) -> Box<dyn Model>;

    /// Logits [b·t, vocab].
    fn logits(&self, ids: &[u32], b: usize, t: usize, key_mask: Option<&[bool]>) -> Result<Tensor> {
        self.head_logits(&self.hidden_states(ids, b, t, key_mask)?)
    }
    /// Every trainable tensor (adapter parameters), layer by layer.
    fn trainable_params(&self) -> Vec<Tensor> {
        self.linears().into_iter().filter_map(|l| l.adapter.as_ref().map(|a| a.params())).flatten().collect()
    }
    /// The trainable tensors excluded from weight decay (SpecLoRA's d).
    fn no_decay_params(&self) -> Vec<Tensor> {
        self.linears().into_iter().filter_map(|l| l.adapter.as_ref().map(|a| a.no_decay_params())).flatten().collect()
    }
    /// Attaches an adapter of `method` (identity at init) to every linear whose module path
    /// `select` accepts; returns how many. Selecting none is an error naming the paths there are.
    fn attach_where(&mut self, select: &dyn Fn(&str) -> Result<bool>, lora: &LoraConfig, method: &Method, seed: u64) -> Result<usize> {
        let mut rng = SplitMix::new(seed);
        let dtype = self.dtype();
        let mut n = 0;
        for lin in self.linears_mut() {
            if select(&lin.path)? {
                lin.adapter = Some(method.build(&lin.weight, lora, dtype, &mut rng)?);
                n += 1;
            }
        }
        if n == 0 {
            let names: std::collections::BTreeSet<&str> = self.linears().into_iter().map(|l| l.module()).collect();
            return Err(Error::invalid(
                "attach_adapters",
                format!("the targets select no module; this model's linears are {}", names.into_iter().collect::<Vec<_>>().join(", ")),
            ));
        }
        Ok(n)
    }

    /// The linear at module `path`, if any.
    fn linear(&self, path: &str) -> Option<&Linear> {
        self.linears().into_iter().find(|l| l.path == path)
    }
    fn num_layers(&self) -> usize {
        self.config().num_hidden_layers
    }
}

impl Model for Decoder {
    fn config(&self) -> &DecoderConfig {
        &self.cfg
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn linears(&self) -> Vec<&Linear> {
        Decoder::linears(self)
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        Decoder::linears_mut(self)
    }
    fn hidden_states(&self, ids: &[u32], b: usize, t: usize, key_mask: Option<&[bool]>) -> Result<Tensor> {
        Decoder::hidden_states(self, ids, b, t, key_mask)
    }
    fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        Decoder::head_logits(self, h)
    }
    fn loss(&self, ids: &[u32], targets: &[i64], b: usize, t: usize, key_mask: Option<&[bool]>, opts: &CeOptions) -> Result<Tensor> {
        Decoder::loss(self, ids, targets, b, t, key_mask, opts)
    }
    fn forward_cached(&self, ids: &[u32], b: usize, t: usize, cache: &mut KvCache) -> Result<Tensor> {
        Decoder::forward_cached(self, ids, b, t, cache)
    }
    fn named_tensors(&self) -> Vec<(String, NamedTensor<'_>)> {
        Decoder::named_tensors(self)
    }
    fn set_training(&mut self, training: bool, dropout_seed: u64) {
        (self.training, self.dropout_seed) = (training, dropout_seed);
    }
    fn set_checkpointing(&mut self, on: bool, keep: usize) {
        (self.checkpointing, self.checkpoint_keep) = (on, keep);
    }
    fn to_device(&self, device: crate::device::Device, weight_dtype: DType) -> Result<Box<dyn Model>> {
        Ok(Box::new(Decoder::to_device(self, device, weight_dtype)?))
    }
    fn clone_model(&self) -> Box<dyn Model> {
        Box::new(self.clone())
    }
}

/// A boxed model is a model (so `&Box<dyn Model>` goes wherever `&dyn Model` does).
impl<M: Model + ?Sized> Model for Box<M> {
    fn config(&self) -> &DecoderConfig {
        (**self).config()
    }
    fn dtype(&self) -> DType {
        (**self).dtype()
    }
    fn linears(&self) -> Vec<&Linear> {
        (**self).linears()
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        (**self).linears_mut()
    }
    fn hidden_states(&self, ids: &[u32], b: usize, t: usize, key_mask: Option<&[bool]>) -> Result<Tensor> {
        (**self).hidden_states(ids, b, t, key_mask)
    }
    fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        (**self).head_logits(h)
    }
    fn loss(&self, ids: &[u32], targets: &[i64], b: usize, t: usize, key_mask: Option<&[bool]>, opts: &CeOptions) -> Result<Tensor> {
        (**self).loss(ids, targets, b, t, key_mask, opts)
    }
    fn forward_cached(&self, ids: &[u32], b: usize, t: usize, cache: &mut KvCache) -> Result<Tensor> {
        (**self).forward_cached(ids, b, t, cache)
    }
    fn named_tensors(&self) -> Vec<(String, NamedTensor<'_>)> {
        (**self).named_tensors()
    }
    fn set_training(&mut self, training: bool, dropout_seed: u64) {
        (**self).set_training(training, dropout_seed)
    }
    fn set_checkpointing(&mut self, on: bool, keep: usize) {
        (**self).set_checkpointing(on, keep)
    }
    fn to_device(&self, device: crate::device::Device, weight_dtype: DType) -> Result<Box<dyn Model>> {
        (**self).to_device(device, weight_dtype)
    }
    fn clone_model(&self) -> Box<dyn Model> {
        (**self).clone_model()
    }
}

/// The model config of a checkpoint: `config.json` beside safetensors weights, or GGUF metadata.
pub fn config_of(ck: &Checkpoint) -> Result<DecoderConfig> {
    match ck {
        Checkpoint::Gguf(g) => gguf::gguf_config(g),
        Checkpoint::Safetensors(_) => config::parse_config(&ck.config_json_path()?.expect("safetensors checkpoints have a config path")),
    }
}

/// Builds the model of a checkpoint: validates every weight's presence, dtype and shape against
/// the config before any compute, then maps them (no weight is copied where its dtype allows use
/// in place). `dtype` is the compute dtype (f32 or f64).
pub fn load(ck: &Checkpoint, dtype: DType) -> Result<Decoder> {
    if !dtype.is_compute() {
        return Err(Error::dtype("model::load", "dtype", "f32 or f64 (compute dtype)", dtype));
    }
    let cfg = config_of(ck)?;
    match ck {
        Checkpoint::Safetensors(s) => {
            cfg.validate()?;
            s.validate_weights(&cfg.expected_weights(), if cfg.tie_word_embeddings { &["lm_head.weight"] } else { &[] })?;
            Decoder::from_weights(cfg, dtype, |n| s.tensor(n))
        }
        // gguf_config has checked every weight's presence and shape.
        Checkpoint::Gguf(g) => {
            let c = cfg.clone();
            Decoder::from_weights(cfg, dtype, |n| gguf::hf_tensor(g, &c, n))
        }
    }
}

/// Opens `path` (an HF folder, a `.safetensors` file in one, or a `.gguf`) and builds its model.
pub fn open(path: &Path, dtype: DType) -> Result<Decoder> {
    load(&Checkpoint::open(path)?, dtype)
}

/// Loads a model from an HF folder (or a `.safetensors` file / index inside it), returning the
/// checkpoint too (the model's tensors keep the maps alive on their own).
pub fn load_safetensors(dir: &Path, dtype: DType) -> Result<(Decoder, SafetensorsCheckpoint)> {
    let ck = Checkpoint::Safetensors(SafetensorsCheckpoint::open(dir)?);
    let model = load(&ck, dtype)?;
    let Checkpoint::Safetensors(s) = ck else { unreachable!() };
    Ok((model, s))
}
