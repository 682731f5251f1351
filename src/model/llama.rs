//! A Llama-style decoder (Llama, Qwen2, Mistral and SmolLM share this graph):
//!
//!   h = embed(ids)
//!   per layer:  h += o(attn(rope(q(n)), rope(k(n)), v(n)))   with n = rms_norm(h)
//!               h += down(swiglu(gate(n'), up(n')))          with n' = rms_norm(h)
//!   loss = cross_entropy(rms_norm(h)·W_headᵀ, targets)       (W_head = embed when tied)
//!
//! All weights are frozen tensors (any stored dtype, usually memory-mapped); only adapters
//! attached to the seven linears are trainable. Activations are [b·t, hidden] row-major, and
//! q/k/v are viewed as [b, t, heads, head_dim] so no transposes are ever needed.

use crate::autograd::checkpoint;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::ops::{self, AttnOptions, CeOptions, Rope};
use crate::peft::{Adapter, AdapterCtx, LoraConfig, Method};
use crate::tensor::Tensor;

/// Shape hyper-parameters of a Llama-family model (HF config.json names).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Longest sequence the model was trained for (generation stops there).
    pub max_position_embeddings: usize,
}

impl LlamaConfig {
    /// Checks the relations between the sizes.
    pub fn validate(&self) -> Result<()> {
        let op = "LlamaConfig";
        if self.num_key_value_heads == 0 || self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::invalid(
                op,
                format!("num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", self.num_attention_heads, self.num_key_value_heads),
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(Error::invalid(op, format!("head_dim must be even and > 0, got {}", self.head_dim)));
        }
        if [self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers].contains(&0) {
            return Err(Error::invalid(op, "vocab_size, hidden_size, intermediate_size and num_hidden_layers must be > 0"));
        }
        Ok(())
    }
}

/// The seven adaptable linears of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];
    /// HF module name (`q_proj`, …, `down_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }
}

/// A frozen linear layer, with an optional bias and an optional adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    /// [out, in], frozen.
    pub weight: Tensor,
    /// `[out]`, frozen (Qwen2's q/k/v).
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
}

impl Linear {
    /// `dropout_seed`: Some while training (adapter dropout on), None for evaluation.
    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let y = match &self.adapter {
            Some(ad) => ad.forward(x, &self.weight, &AdapterCtx { dropout_seed })?,
            None => ops::linear(x, &self.weight)?,
        };
        match &self.bias {
            Some(b) => ops::add(&y, b),
            None => Ok(y),
        }
    }
    /// `forward(act(gate) ⊙ up)` (SwiGLU, or GeGLU for `GatedAct::GeluTanh`); with an adapter,
    /// fused so the product is not kept for the backward. `graph_only`: the caller never reads
    /// the output values (a checkpointed layer's last op while its backward re-runs it), so an
    /// adapter skips computing them.
    pub fn forward_gated(&self, gate: &Tensor, up: &Tensor, act: ops::GatedAct, dropout_seed: Option<u64>, graph_only: bool) -> Result<Tensor> {
        let gated = || if act == ops::GatedAct::Silu { ops::swiglu(gate, up) } else { ops::geglu(gate, up) };
        let y = match &self.adapter {
            Some(ad) => ad.forward_gated(gate, up, act, &self.weight, &AdapterCtx { dropout_seed }, graph_only)?,
            None => ops::linear(&crate::profile::fwd(act.gate_name(), gated)?, &self.weight)?,
        };
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
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Layer {
    pub input_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Layer {
    pub fn linear(&self, t: Target) -> &Linear {
        match t {
            Target::Q => &self.q,
            Target::K => &self.k,
            Target::V => &self.v,
            Target::O => &self.o,
            Target::Gate => &self.gate,
            Target::Up => &self.up,
            Target::Down => &self.down,
        }
    }
    pub fn linear_mut(&mut self, t: Target) -> &mut Linear {
        match t {
            Target::Q => &mut self.q,
            Target::K => &mut self.k,
            Target::V => &mut self.v,
            Target::O => &mut self.o,
            Target::Gate => &mut self.gate,
            Target::Up => &mut self.up,
            Target::Down => &mut self.down,
        }
    }
}

/// Per-call inputs that every layer needs.
#[derive(Clone)]
struct Ctx {
    cfg: LlamaConfig,
    rope: Rope,
    b: usize,
    t: usize,
    positions: Vec<usize>,
    attn: AttnOptions,
    /// Adapter-dropout seed of this forward (None: evaluation).
    seed: Option<u64>,
}

/// A Llama-family decoder.
#[derive(Clone, Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    /// [vocab, hidden], frozen.
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    /// `[hidden]`, frozen.
    pub norm: Tensor,
    /// [vocab, hidden]; `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
    rope: Rope,
    /// Compute dtype of activations (f32 for training, f64 for gradient checks).
    pub dtype: DType,
    /// Activation checkpointing per decoder layer: each checkpointed layer keeps only its input
    /// and is re-run in the backward.
    pub checkpointing: bool,
    /// With `checkpointing`, the last `checkpoint_keep` layers keep their activations instead
    /// (default 1: the last layer's re-run would come first in the backward, when its
    /// activations are alive beside the checkpoints anyway, so keeping it costs no peak memory).
    /// Each further kept layer trades its activations (~b·t·(4·hidden + 2·kv + 2·ffn) values) for
    /// one layer's forward per step: raise it while memory allows.
    pub checkpoint_keep: usize,
    /// Training mode: adapter dropout is active, seeded by `dropout_seed` (set it anew each
    /// step; the same seed gives the same masks, which checkpoint recomputation relies on).
    pub training: bool,
    pub dropout_seed: u64,
}

impl Llama {
    /// Builds the model from HF-named weights supplied by `get` (e.g. `model.layers.0.self_attn.q_proj.weight`),
    /// validating each tensor's shape against the config before any compute.
    pub fn from_weights(cfg: LlamaConfig, dtype: DType, mut get: impl FnMut(&str) -> Result<Tensor>) -> Result<Llama> {
        cfg.validate()?;
        let (h, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let mut fetch = |name: String, dims: &[usize]| -> Result<Tensor> {
            let t = get(&name)?;
            if t.dims() != dims {
                return Err(Error::shape("Llama::from_weights", "weight", format!("{name} {:?}", dims), t.shape()));
            }
            if t.requires_grad() {
                return Err(Error::invalid("Llama::from_weights", format!("{name} must be a frozen tensor")));
            }
            Ok(t)
        };
        let embed = fetch("model.embed_tokens.weight".into(), &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, o: usize, i: usize, bias: bool| -> Result<Linear> {
                let weight = fetch(format!("{p}.{name}.weight"), &[o, i])?;
                let bias = if bias { Some(fetch(format!("{p}.{name}.bias"), &[o])?) } else { None };
                Ok(Linear { weight, bias, adapter: None })
            };
            let qkv_bias = cfg.attention_bias;
            let q = lin("self_attn.q_proj", qd, h, qkv_bias)?;
            let k = lin("self_attn.k_proj", kvd, h, qkv_bias)?;
            let v = lin("self_attn.v_proj", kvd, h, qkv_bias)?;
            let o = lin("self_attn.o_proj", h, qd, false)?;
            let gate = lin("mlp.gate_proj", f, h, false)?;
            let up = lin("mlp.up_proj", f, h, false)?;
            let down = lin("mlp.down_proj", h, f, false)?;
            layers.push(Layer {
                input_norm: fetch(format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: fetch(format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = fetch("model.norm.weight".into(), &[h])?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(fetch("lm_head.weight".into(), &[cfg.vocab_size, h])?) };
        let rope = Rope::new(hd, cfg.rope_theta)?;
        Ok(Llama { cfg, embed, layers, norm, lm_head, rope, dtype, checkpointing: false, checkpoint_keep: 1, training: false, dropout_seed: 0 })
    }

    /// A model with random frozen weights (tests and benchmarks): linears and embeddings
    /// ~ U(−1/√in, 1/√in), norm weights ~ U(0.9, 1.1).
    pub fn random(cfg: LlamaConfig, dtype: DType, seed: u64) -> Result<Llama> {
        cfg.validate()?;
        let mut rng = SplitMix::new(seed);
        let mut weights = std::collections::HashMap::new();
        for (name, dims) in expected_weights(&cfg) {
            let n: usize = dims.iter().product();
            let v = if name.ends_with(".bias") {
                rng.vec(n, -0.1, 0.1)
            } else if name.ends_with("norm.weight") {
                rng.vec(n, 0.9, 1.1)
            } else {
                let bound = 1.0 / (dims[1] as f64).sqrt();
                rng.vec(n, -bound, bound)
            };
            let t = crate::device::with_float!(dtype, "Llama::random", |T| {
                Tensor::from_vec(v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>(), dims.clone())
            })?;
            weights.insert(name, t);
        }
        Self::from_weights(cfg, dtype, |name| weights.get(name).cloned().ok_or_else(|| Error::invalid("Llama::random", format!("no weight {name}"))))
    }

    /// Attaches an adapter of `method` to the `targets` linears of every layer (identity at init).
    pub fn attach_adapters(&mut self, targets: &[Target], lora: &LoraConfig, method: &Method, seed: u64) -> Result<()> {
        let mut rng = SplitMix::new(seed);
        let dtype = self.dtype;
        for layer in &mut self.layers {
            for &t in targets {
                let lin = layer.linear_mut(t);
                lin.adapter = Some(method.build(&lin.weight, lora, dtype, &mut rng)?);
            }
        }
        Ok(())
    }

    /// Every trainable tensor (adapter parameters), layer by layer.
    pub fn trainable_params(&self) -> Vec<Tensor> {
        self.layers.iter().flat_map(|l| Target::ALL.iter().filter_map(move |&t| l.linear(t).adapter.as_ref().map(|a| a.params()))).flatten().collect()
    }

    /// The trainable tensors that should be excluded from weight decay (SpecLoRA's d).
    pub fn no_decay_params(&self) -> Vec<Tensor> {
        self.layers.iter().flat_map(|l| Target::ALL.iter().filter_map(move |&t| l.linear(t).adapter.as_ref().map(|a| a.no_decay_params()))).flatten().collect()
    }

    /// Final hidden states [b·t, hidden] for token ids [b·t] (row-major [b, t]). `key_mask`
    /// ([b·t], true = real token) masks padding keys.
    pub fn hidden_states(&self, ids: &[u32], b: usize, t: usize, key_mask: Option<&[bool]>) -> Result<Tensor> {
        if ids.len() != b * t || b == 0 || t == 0 {
            return Err(Error::shape("Llama::forward", "ids", format!("{b}×{t} ids (b, t > 0)"), ids.len()));
        }
        let ctx = Ctx {
            cfg: self.cfg.clone(),
            rope: self.rope.clone(),
            b,
            t,
            positions: (0..t).collect(),
            attn: AttnOptions { causal: true, key_mask: key_mask.map(|m| m.to_vec()), ..Default::default() },
            seed: self.training.then_some(self.dropout_seed),
        };
        let mut h = crate::profile::fwd("embedding", || ops::embedding(&self.embed, ids, self.dtype))?;
        // Layers from `first_kept` on keep their activations (see `checkpoint_keep`).
        let first_kept = self.layers.len().saturating_sub(self.checkpoint_keep);
        for (li, layer) in self.layers.iter().enumerate() {
            h = if self.checkpointing && li < first_kept {
                let (layer, ctx) = (layer.clone(), ctx.clone());
                checkpoint(&h, move |x| layer_forward(&layer, li, &ctx, x, None))?
            } else {
                layer_forward(layer, li, &ctx, &h, None)?
            };
        }
        crate::profile::fwd("rms_norm", || ops::rms_norm(&h, &self.norm, self.cfg.rms_norm_eps))
    }

    /// A copy of the model on `device`. Frozen matrices are stored as `weight_dtype` there (bf16
    /// for the tensor-core GEMM, or f32), converted a tile at a time from whatever the checkpoint
    /// holds (f32, bf16, f16 or GGUF blocks); norm weights and biases stay f32; adapters become f32
    /// trainable leaves with fresh ids (create the optimizer after moving). Activations must be
    /// f32 on the device.
    pub fn to_device(&self, device: crate::device::Device, weight_dtype: DType) -> Result<Llama> {
        use crate::device::Device;
        device.ensure_available()?;
        if device == Device::Cuda && self.dtype != DType::F32 {
            return Err(Error::dtype("Llama::to_device", "activations", "f32 on the device", self.dtype));
        }
        let (mat_dt, vec_dt) = match device {
            Device::Cuda => (weight_dtype, DType::F32),
            Device::Cpu => (self.dtype, self.dtype),
        };
        // On the CPU frozen weights stay as they are (mapped, any dtype); only device copies convert.
        let keep = |t: &Tensor| device == Device::Cpu && t.device() == Device::Cpu && !t.is_param();
        let mat = |t: &Tensor| if keep(t) { Ok(t.clone()) } else { t.to_device_as(device, mat_dt) };
        let vec = |t: &Tensor| if keep(t) { Ok(t.clone()) } else { t.to_device_as(device, vec_dt) };
        let lin = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                weight: mat(&l.weight)?,
                bias: l.bias.as_ref().map(vec).transpose()?,
                adapter: l.adapter.as_ref().map(|a| a.to_device(device)).transpose()?,
            })
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    input_norm: vec(&l.input_norm)?,
                    q: lin(&l.q)?,
                    k: lin(&l.k)?,
                    v: lin(&l.v)?,
                    o: lin(&l.o)?,
                    post_norm: vec(&l.post_norm)?,
                    gate: lin(&l.gate)?,
                    up: lin(&l.up)?,
                    down: lin(&l.down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Llama {
            cfg: self.cfg.clone(),
            embed: mat(&self.embed)?,
            layers,
            norm: vec(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(mat).transpose()?,
            rope: self.rope.clone(),
            dtype: self.dtype,
            checkpointing: self.checkpointing,
            checkpoint_keep: self.checkpoint_keep,
            training: self.training,
            dropout_seed: self.dropout_seed,
        })
    }

    /// The LM head weight [vocab, hidden] (the embedding when tied).
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Logits [b·t, vocab].
    pub fn logits(&self, ids: &[u32], b: usize, t: usize, key_mask: Option<&[bool]>) -> Result<Tensor> {
        let h = self.hidden_states(ids, b, t, key_mask)?;
        ops::linear(&h, self.head())
    }

    /// Mean next-token cross-entropy over counted targets (targets [b·t], −100 = ignored),
    /// through the chunked fused LM-head loss.
    pub fn loss(&self, ids: &[u32], targets: &[i64], b: usize, t: usize, key_mask: Option<&[bool]>, opts: &CeOptions) -> Result<Tensor> {
        let h = self.hidden_states(ids, b, t, key_mask)?;
        crate::profile::fwd("linear_cross_entropy", || ops::linear_cross_entropy(&h, self.head(), targets, opts))
    }
}

/// Every weight a model of this config needs, with its HF name and shape.
pub fn expected_weights(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qd, kvd) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![qd, h]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kvd, h]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kvd, h]));
        if cfg.attention_bias {
            v.push((format!("{p}.self_attn.q_proj.bias"), vec![qd]));
            v.push((format!("{p}.self_attn.k_proj.bias"), vec![kvd]));
            v.push((format!("{p}.self_attn.v_proj.bias"), vec![kvd]));
        }
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, qd]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    v
}

/// Keys and values of the positions already processed, per layer ([b, s, nkv, hd] each, after
/// RoPE), for incremental decoding.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<(Option<Tensor>, Option<Tensor>)>,
    /// Positions already in the cache.
    pub len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Concatenates [b, s1, h, d] and [b, s2, h, d] along the sequence axis.
fn concat_seq(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() != 4 || bd.len() != 4 || ad[0] != bd[0] || ad[2..] != bd[2..] || a.dtype() != b.dtype() {
        return Err(Error::shape("kv_cache", "new keys", format!("[{}, s, {}, {}] {}", ad[0], ad[2], ad[3], a.dtype()), b.shape()));
    }
    let (bs, row) = (ad[0], ad[2] * ad[3]);
    crate::device::with_float!(a.dtype(), "kv_cache", |T| {
        let (av, bv) = (a.to_vec::<T>(), b.to_vec::<T>());
        let mut out = Vec::with_capacity(av.len() + bv.len());
        for i in 0..bs {
            out.extend_from_slice(&av[i * ad[1] * row..(i + 1) * ad[1] * row]);
            out.extend_from_slice(&bv[i * bd[1] * row..(i + 1) * bd[1] * row]);
        }
        Tensor::from_vec(out, [bs, ad[1] + bd[1], ad[2], ad[3]])
    })
}

impl Llama {
    /// Runs `ids` ([b·t], the tokens after those already in `cache`) through the model without
    /// recording a graph, appending their keys/values to `cache`. Returns the final hidden
    /// states [b·t, hidden].
    pub fn forward_cached(&self, ids: &[u32], b: usize, t: usize, cache: &mut KvCache) -> Result<Tensor> {
        if ids.len() != b * t || b == 0 || t == 0 {
            return Err(Error::shape("Llama::forward_cached", "ids", format!("{b}×{t} ids (b, t > 0)"), ids.len()));
        }
        let start = cache.len;
        if start + t > self.cfg.max_position_embeddings {
            return Err(Error::invalid(
                "Llama::forward_cached",
                format!("position {} exceeds max_position_embeddings {}", start + t, self.cfg.max_position_embeddings),
            ));
        }
        crate::autograd::no_grad(|| {
            let ctx = Ctx {
                cfg: self.cfg.clone(),
                rope: self.rope.clone(),
                b,
                t,
                positions: (start..start + t).collect(),
                attn: AttnOptions { causal: true, ..Default::default() },
                seed: None,
            };
            cache.layers.resize(self.layers.len(), (None, None));
            let mut h = ops::embedding(&self.embed, ids, self.dtype)?;
            for (li, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
                h = layer_forward(layer, li, &ctx, &h, Some(kv))?;
            }
            cache.len = start + t;
            ops::rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)
        })
    }
}

/// One decoder layer: pre-norm attention and SwiGLU MLP, each with a residual. With `kv`, the
/// new keys/values are appended to the cache and attention runs over all cached positions.
fn layer_forward(l: &Layer, li: usize, c: &Ctx, x: &Tensor, kv: Option<&mut (Option<Tensor>, Option<Tensor>)>) -> Result<Tensor> {
    let cfg = &c.cfg;
    let (b, t, hd) = (c.b, c.t, cfg.head_dim);
    // A distinct dropout stream per (layer, module).
    let seed = |m: u64| c.seed.map(|s| s ^ ((li as u64) << 8 | m).wrapping_mul(0xd134_2543_de82_ef95));
    // Forward scopes for `bench --profile` (free when profiling is off).
    use crate::profile::fwd;
    let n = fwd("rms_norm", || ops::rms_norm(x, &l.input_norm, cfg.rms_norm_eps))?;
    let q = ops::reshape(&fwd("q_proj", || l.q.forward(&n, seed(0)))?, [b, t, cfg.num_attention_heads, hd])?;
    let k = ops::reshape(&fwd("k_proj", || l.k.forward(&n, seed(1)))?, [b, t, cfg.num_key_value_heads, hd])?;
    let v = ops::reshape(&fwd("v_proj", || l.v.forward(&n, seed(2)))?, [b, t, cfg.num_key_value_heads, hd])?;
    let q = fwd("rope", || ops::rope(&q, &c.rope, &c.positions))?;
    let mut k = fwd("rope", || ops::rope(&k, &c.rope, &c.positions))?;
    let mut v = v;
    if let Some((ck, cv)) = kv {
        if let (Some(pk), Some(pv)) = (ck.as_ref(), cv.as_ref()) {
            k = concat_seq(pk, &k)?;
            v = concat_seq(pv, &v)?;
        }
        *ck = Some(k.clone());
        *cv = Some(v.clone());
    }
    let a = fwd("attention", || ops::attention(&q, &k, &v, &c.attn))?;
    let a = ops::reshape(&a, [b * t, cfg.num_attention_heads * hd])?;
    let o = fwd("o_proj", || l.o.forward(&a, seed(3)))?;
    let x = fwd("add", || ops::add(x, &o))?;
    let n = fwd("rms_norm", || ops::rms_norm(&x, &l.post_norm, cfg.rms_norm_eps))?;
    let gate = fwd("gate_proj", || l.gate.forward(&n, seed(4)))?;
    let up = fwd("up_proj", || l.up.forward(&n, seed(5)))?;
    // While a checkpoint backward re-runs this layer, its output values are never read (only the
    // graph is played), so the down projection records its backward without computing values.
    let graph_only = crate::autograd::is_recomputing();
    let down = fwd("down_proj", || l.down.forward_gated(&gate, &up, ops::GatedAct::Silu, seed(6), graph_only))?;
    drop((gate, up));
    fwd("add", || ops::add(&x, &down))
}
