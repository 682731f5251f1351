//! The one decoder every supported family runs on. A family (see [`super::families`]) maps its
//! config onto the switches of [`DecoderConfig`]; the graph, the weight paths and every memory
//! feature (activation checkpointing with `checkpoint_keep`, the graph-only re-run of the down
//! projection, the fused LM-head loss with its final soft cap) are written here once:
//!
//!   h = embed(ids) · embed_scale
//!   per layer:  n = norm(h);  q, k, v = proj(n)  (separate or one fused qkv, split)
//!               q, k = q_norm(q), k_norm(k)      (per head, optional)
//!               q, k = rope(q), rope(k)           (this layer's table: local or global)
//!               a = o(attention(q, k, v; scale, soft cap, sliding window of this layer))
//!               h += post_attn_norm(a)            (the post norm only with sandwich norms)
//!               n = mlp_norm(h);  g, u = proj(n)  (separate or fused gate_up, split)
//!               h += post_mlp_norm(down(act(g) ⊙ u))
//!   logits = softcap(norm(h)·W_headᵀ)             (W_head = embed when tied)
//!
//! All weights are frozen tensors (any stored dtype, usually memory-mapped); only adapters on
//! the linears are trainable. Activations are [b·t, hidden] row-major; q/k/v are viewed as
//! [b, t, heads, head_dim] so no transposes are needed.

use crate::autograd::checkpoint;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::nn::{GatedAct, Linear, RmsNorm, RopeScaling};
use crate::ops::{self, AttnOptions, CeOptions, Rope};
use crate::tensor::Tensor;

/// RoPE of a set of layers: base θ, scaling variant and the rotated fraction of each head.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Fraction of head_dim that is rotated (`partial_rotary_factor`); the rest passes through.
    pub partial_rotary_factor: f64,
}

impl Default for RopeConfig {
    fn default() -> Self {
        RopeConfig { theta: 10000.0, scaling: RopeScaling::None, partial_rotary_factor: 1.0 }
    }
}

/// Shapes and switches of a decoder (HF config.json names where one exists).
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    /// The family that wrote this config (`llama`, `qwen3`, `gemma2`, …): picks the weight
    /// names' llama.cpp spelling and the config writer.
    pub family: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Longest sequence the model was trained for (generation stops there).
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// RoPE of full-attention layers (and of every layer without `rope_local`).
    pub rope: RopeConfig,
    /// RoPE of sliding-window layers when it differs (Gemma 3's local base).
    pub rope_local: Option<RopeConfig>,
    /// q/k/v projections carry a bias (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama's `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down carry a bias (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norm scale 1 + w (Gemma).
    pub norm_plus_one: bool,
    /// Norms after attention and after the MLP too (Gemma 2/3).
    pub sandwich_norms: bool,
    pub act: GatedAct,
    /// One `qkv_proj` [(nh + 2·nkv)·hd, hidden] instead of q/k/v (Phi-3).
    pub fused_qkv: bool,
    /// One `gate_up_proj` [2·ffn, hidden] instead of gate/up (Phi-3).
    pub fused_gate_up: bool,
    /// Attention-score soft cap (Gemma 2's `attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// Final-logit soft cap (Gemma 2's `final_logit_softcapping`).
    pub final_softcap: Option<f64>,
    /// Attention score scale; `None` = 1/√head_dim (Gemma: `query_pre_attn_scalar`^−½).
    pub attn_scale: Option<f64>,
    /// Embedding output multiplier (Gemma: √hidden).
    pub embed_scale: Option<f64>,
    /// Sliding window per layer (`None` = full attention); empty = full everywhere.
    pub layer_windows: Vec<Option<usize>>,
    /// The source's config.json, written back unchanged by merge (keeps keys spectune does not
    /// model, e.g. token ids and generation defaults); `None` for GGUF and random models.
    pub source_json: Option<serde_json::Value>,
}

impl Default for DecoderConfig {
    /// A tiny Llama (2 layers, hidden 32): set the sizes you need.
    fn default() -> Self {
        DecoderConfig {
            family: "llama".into(),
            vocab_size: 128,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            rope: RopeConfig::default(),
            rope_local: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            norm_plus_one: false,
            sandwich_norms: false,
            act: GatedAct::Silu,
            fused_qkv: false,
            fused_gate_up: false,
            attn_softcap: None,
            final_softcap: None,
            attn_scale: None,
            embed_scale: None,
            layer_windows: Vec::new(),
            source_json: None,
        }
    }
}

impl DecoderConfig {
    /// Checks the relations between the sizes.
    pub fn validate(&self) -> Result<()> {
        let op = "DecoderConfig";
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
        if !self.layer_windows.is_empty() && self.layer_windows.len() != self.num_hidden_layers {
            return Err(Error::invalid(op, format!("{} layer windows for {} layers", self.layer_windows.len(), self.num_hidden_layers)));
        }
        if self.layer_windows.contains(&Some(0)) {
            return Err(Error::invalid(op, "a sliding window must be > 0"));
        }
        for (what, v) in
            [("attn_softcap", self.attn_softcap), ("final_softcap", self.final_softcap), ("attn_scale", self.attn_scale), ("embed_scale", self.embed_scale)]
        {
            if let Some(x) = v {
                if !(x.is_finite() && x > 0.0) {
                    return Err(Error::invalid(op, format!("{what} must be finite and > 0, got {x}")));
                }
            }
        }
        for r in std::iter::once(&self.rope).chain(&self.rope_local) {
            let rot = rotary_dim(self.head_dim, r.partial_rotary_factor);
            if rot == 0 || rot % 2 != 0 || rot > self.head_dim {
                return Err(Error::invalid(
                    op,
                    format!(
                        "partial_rotary_factor {} of head_dim {} gives a rotary dimension of {rot} (must be even, > 0)",
                        r.partial_rotary_factor, self.head_dim
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether `other` describes the same model: every switch equal (the source config files
    /// may differ in keys that do not change the math).
    pub fn same_model(&self, other: &DecoderConfig) -> bool {
        DecoderConfig { source_json: None, ..self.clone() } == DecoderConfig { source_json: None, ..other.clone() }
    }

    /// The sliding window of layer `l` (None: full attention).
    pub fn window(&self, l: usize) -> Option<usize> {
        self.layer_windows.get(l).copied().flatten()
    }

    /// HF names of a layer's norms: (before attention, after attention, before the MLP, after
    /// the MLP); the "after" ones exist only with sandwich norms.
    fn norm_names(&self) -> [Option<&'static str>; 4] {
        if self.sandwich_norms {
            [Some("input_layernorm"), Some("post_attention_layernorm"), Some("pre_feedforward_layernorm"), Some("post_feedforward_layernorm")]
        } else {
            [Some("input_layernorm"), None, Some("post_attention_layernorm"), None]
        }
    }

    /// Every weight a model of this config needs, with its HF name and shape, in file order.
    pub fn expected_weights(&self) -> Vec<(String, Vec<usize>)> {
        let (h, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (qd, kvd) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        let [pre_attn, post_attn, pre_mlp, post_mlp] = self.norm_names();
        // Order: a layer's norm before the linears it feeds, weights before their biases (the
        // order random models draw their values in).
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let norm = |v: &mut Vec<(String, Vec<usize>)>, n: Option<&str>| {
                if let Some(n) = n {
                    v.push((format!("{p}.{n}.weight"), vec![h]));
                }
            };
            let group = |v: &mut Vec<(String, Vec<usize>)>, mods: &[(&str, usize, usize)], bias: bool| {
                for (m, o, i) in mods {
                    v.push((format!("{p}.{m}.weight"), vec![*o, *i]));
                }
                if bias {
                    for (m, o, _) in mods {
                        v.push((format!("{p}.{m}.bias"), vec![*o]));
                    }
                }
            };
            norm(&mut v, pre_attn);
            if self.fused_qkv {
                group(&mut v, &[("self_attn.qkv_proj", qd + 2 * kvd, h)], self.qkv_bias);
            } else {
                group(&mut v, &[("self_attn.q_proj", qd, h), ("self_attn.k_proj", kvd, h), ("self_attn.v_proj", kvd, h)], self.qkv_bias);
            }
            group(&mut v, &[("self_attn.o_proj", h, qd)], self.o_bias);
            if self.qk_norm {
                v.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                v.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            }
            norm(&mut v, post_attn);
            norm(&mut v, pre_mlp);
            if self.fused_gate_up {
                group(&mut v, &[("mlp.gate_up_proj", 2 * f, h), ("mlp.down_proj", h, f)], self.mlp_bias);
            } else {
                group(&mut v, &[("mlp.gate_proj", f, h), ("mlp.up_proj", f, h), ("mlp.down_proj", h, f)], self.mlp_bias);
            }
            norm(&mut v, post_mlp);
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            v.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        v
    }
}

fn rotary_dim(head_dim: usize, factor: f64) -> usize {
    // transformers: int(head_dim · partial_rotary_factor), pairs rotated.
    (head_dim as f64 * factor) as usize
}

/// The projections of attention: separate q/k/v or one fused qkv.
#[derive(Clone, Debug)]
pub enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The input projections of the MLP: separate gate/up or one fused gate_up.
#[derive(Clone, Debug)]
pub enum GateUp {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub qkv: Qkv,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub o: Linear,
    pub post_attn_norm: Option<RmsNorm>,
    pub mlp_norm: RmsNorm,
    pub gate_up: GateUp,
    pub down: Linear,
    pub post_mlp_norm: Option<RmsNorm>,
}

impl Block {
    /// The linears in HF module order (q, k, v | qkv, o, gate, up | gate_up, down).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = match &self.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(l) => vec![l],
        };
        v.push(&self.o);
        match &self.gate_up {
            GateUp::Separate { gate, up } => v.extend([gate, up]),
            GateUp::Fused(l) => v.push(l),
        }
        v.push(&self.down);
        v
    }
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = match &mut self.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v],
            Qkv::Fused(l) => vec![l],
        };
        v.push(&mut self.o);
        match &mut self.gate_up {
            GateUp::Separate { gate, up } => v.extend([gate, up]),
            GateUp::Fused(l) => v.push(l),
        }
        v.push(&mut self.down);
        v
    }
    /// The linear with module name `module` (`q_proj`, `gate_up_proj`, …), if this layer has one.
    pub fn linear(&self, module: &str) -> Option<&Linear> {
        self.linears().into_iter().find(|l| l.module() == module)
    }
    fn norms(&self) -> Vec<&RmsNorm> {
        [Some(&self.attn_norm), self.q_norm.as_ref(), self.k_norm.as_ref(), self.post_attn_norm.as_ref(), Some(&self.mlp_norm), self.post_mlp_norm.as_ref()]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Frozen weights by HF name: a getter over a checkpoint (safetensors by name, GGUF through its
/// family's name table), with the shape and frozenness checked on every fetch.
pub struct Weights<'a> {
    get: &'a mut dyn FnMut(&str) -> Result<Tensor>,
}

impl<'a> Weights<'a> {
    pub fn new(get: &'a mut dyn FnMut(&str) -> Result<Tensor>) -> Self {
        Weights { get }
    }
    /// The tensor `name`, which must have shape `dims` and be frozen.
    pub fn get(&mut self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let t = (self.get)(name)?;
        if t.dims() != dims {
            return Err(Error::shape("Decoder::from_weights", "weight", format!("{name} {:?}", dims), t.shape()));
        }
        if t.requires_grad() {
            return Err(Error::invalid("Decoder::from_weights", format!("{name} must be a frozen tensor")));
        }
        Ok(t)
    }
    /// The linear at module `path`: `{path}.weight` [out, in] and, with `bias`, `{path}.bias`.
    pub fn linear(&mut self, path: String, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = self.get(&format!("{path}.weight"), &[out, inp])?;
        let bias = if bias { Some(self.get(&format!("{path}.bias"), &[out])?) } else { None };
        Ok(Linear::new(path, weight, bias))
    }
}

/// Per-call inputs that every layer needs.
#[derive(Clone)]
struct Ctx {
    cfg: DecoderConfig,
    /// Global and (when configured) local RoPE tables of this call.
    rope: Rope,
    rope_local: Option<Rope>,
    b: usize,
    t: usize,
    positions: Vec<usize>,
    key_mask: Option<Vec<bool>>,
    /// Adapter-dropout seed of this forward (None: evaluation).
    seed: Option<u64>,
}

/// The decoder.
#[derive(Clone, Debug)]
pub struct Decoder {
    pub cfg: DecoderConfig,
    /// [vocab, hidden], frozen.
    pub embed: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// [vocab, hidden]; `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
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

impl Decoder {
    /// Builds the model from HF-named weights supplied by `get` (e.g.
    /// `model.layers.0.self_attn.q_proj.weight`), validating each tensor's shape against the
    /// config before any compute.
    pub fn from_weights(cfg: DecoderConfig, dtype: DType, mut get: impl FnMut(&str) -> Result<Tensor>) -> Result<Decoder> {
        cfg.validate()?;
        let mut w = Weights::new(&mut get);
        let (h, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let (eps, p1) = (cfg.rms_norm_eps, cfg.norm_plus_one);
        let embed = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let [pre_attn, post_attn, pre_mlp, post_mlp] = cfg.norm_names();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let norm = |w: &mut Weights, name: Option<&str>, d: usize| -> Result<Option<RmsNorm>> {
                name.map(|n| RmsNorm::new(w.get(&format!("{p}.{n}.weight"), &[d])?, eps, p1, dtype)).transpose()
            };
            let attn_norm = norm(&mut w, pre_attn, h)?.expect("always present");
            let post_attn_norm = norm(&mut w, post_attn, h)?;
            let mlp_norm = norm(&mut w, pre_mlp, h)?.expect("always present");
            let post_mlp_norm = norm(&mut w, post_mlp, h)?;
            let (q_norm, k_norm) =
                if cfg.qk_norm { (norm(&mut w, Some("self_attn.q_norm"), hd)?, norm(&mut w, Some("self_attn.k_norm"), hd)?) } else { (None, None) };
            let qkv = if cfg.fused_qkv {
                Qkv::Fused(w.linear(format!("{p}.self_attn.qkv_proj"), qd + 2 * kvd, h, cfg.qkv_bias)?)
            } else {
                Qkv::Separate {
                    q: w.linear(format!("{p}.self_attn.q_proj"), qd, h, cfg.qkv_bias)?,
                    k: w.linear(format!("{p}.self_attn.k_proj"), kvd, h, cfg.qkv_bias)?,
                    v: w.linear(format!("{p}.self_attn.v_proj"), kvd, h, cfg.qkv_bias)?,
                }
            };
            let o = w.linear(format!("{p}.self_attn.o_proj"), h, qd, cfg.o_bias)?;
            let gate_up = if cfg.fused_gate_up {
                GateUp::Fused(w.linear(format!("{p}.mlp.gate_up_proj"), 2 * f, h, cfg.mlp_bias)?)
            } else {
                GateUp::Separate {
                    gate: w.linear(format!("{p}.mlp.gate_proj"), f, h, cfg.mlp_bias)?,
                    up: w.linear(format!("{p}.mlp.up_proj"), f, h, cfg.mlp_bias)?,
                }
            };
            let down = w.linear(format!("{p}.mlp.down_proj"), h, f, cfg.mlp_bias)?;
            layers.push(Block { attn_norm, qkv, q_norm, k_norm, o, post_attn_norm, mlp_norm, gate_up, down, post_mlp_norm });
        }
        let norm = RmsNorm::new(w.get("model.norm.weight", &[h])?, eps, p1, dtype)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(w.get("lm_head.weight", &[cfg.vocab_size, h])?) };
        // Build the RoPE tables once to surface config errors at load time.
        rope_tables(&cfg, cfg.max_position_embeddings.min(1))?;
        Ok(Decoder { cfg, embed, layers, norm, lm_head, dtype, checkpointing: false, checkpoint_keep: 1, training: false, dropout_seed: 0 })
    }

    /// A model with random frozen weights (tests and benchmarks): linears and embeddings
    /// ~ U(−1/√in, 1/√in), norm weights ~ U(0.9, 1.1) (U(−0.1, 0.1) with the 1 + w scale).
    pub fn random(cfg: DecoderConfig, dtype: DType, seed: u64) -> Result<Decoder> {
        cfg.validate()?;
        let mut rng = SplitMix::new(seed);
        let mut weights = std::collections::HashMap::new();
        for (name, dims) in cfg.expected_weights() {
            let n: usize = dims.iter().product();
            let v = if name.ends_with(".bias") {
                rng.vec(n, -0.1, 0.1)
            } else if dims.len() == 1 {
                let c = if cfg.norm_plus_one { 0.0 } else { 1.0 };
                rng.vec(n, c - 0.1, c + 0.1)
            } else {
                let bound = 1.0 / (dims[1] as f64).sqrt();
                rng.vec(n, -bound, bound)
            };
            let t = crate::device::with_float!(dtype, "Decoder::random", |T| {
                Tensor::from_vec(v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>(), dims.clone())
            })?;
            weights.insert(name, t);
        }
        Self::from_weights(cfg, dtype, |name| weights.get(name).cloned().ok_or_else(|| Error::invalid("Decoder::random", format!("no weight {name}"))))
    }

    /// Attaches an adapter of `method` (identity at init) to every linear whose module path
    /// `select` accepts (e.g. `|p| spec.selects(p)` for a [`TargetSpec`](crate::peft::targets::TargetSpec),
    /// [`crate::nn::modules`]); returns how many ([`Model::attach_where`](super::Model::attach_where)).
    pub fn attach_adapters(
        &mut self,
        select: impl Fn(&str) -> Result<bool>,
        lora: &crate::peft::LoraConfig,
        method: &crate::peft::Method,
        seed: u64,
    ) -> Result<usize> {
        super::Model::attach_where(self, &select, lora, method, seed)
    }

    /// The linear at module `path`, if any.
    pub fn linear(&self, path: &str) -> Option<&Linear> {
        super::Model::linear(self, path)
    }

    /// Every linear of every layer, in layer then HF module order.
    pub fn linears(&self) -> Vec<&Linear> {
        self.layers.iter().flat_map(|l| l.linears()).collect()
    }
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers.iter_mut().flat_map(|l| l.linears_mut()).collect()
    }

    /// Every frozen tensor with its HF name, in file order (norm weights as stored, linears
    /// with any adapter): what a merged checkpoint holds.
    pub fn named_tensors(&self) -> Vec<(String, NamedTensor<'_>)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), NamedTensor::Plain(&self.embed))];
        let [pre_attn, post_attn, pre_mlp, post_mlp] = self.cfg.norm_names();
        for (li, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{li}");
            for lin in l.linears() {
                v.push((format!("{}.weight", lin.path), NamedTensor::Linear(lin)));
                if let Some(b) = &lin.bias {
                    v.push((format!("{}.bias", lin.path), NamedTensor::Plain(b)));
                }
            }
            if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
                v.push((format!("{p}.self_attn.q_norm.weight"), NamedTensor::Plain(&q.weight)));
                v.push((format!("{p}.self_attn.k_norm.weight"), NamedTensor::Plain(&k.weight)));
            }
            let norms =
                [(pre_attn, Some(&l.attn_norm)), (post_attn, l.post_attn_norm.as_ref()), (pre_mlp, Some(&l.mlp_norm)), (post_mlp, l.post_mlp_norm.as_ref())];
            for (name, n) in norms {
                if let (Some(name), Some(n)) = (name, n) {
                    v.push((format!("{p}.{name}.weight"), NamedTensor::Plain(&n.weight)));
                }
            }
        }
        v.push(("model.norm.weight".to_string(), NamedTensor::Plain(&self.norm.weight)));
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), NamedTensor::Plain(h)));
        }
        v
    }

    /// Every trainable tensor (adapter parameters), layer by layer.
    pub fn trainable_params(&self) -> Vec<Tensor> {
        super::Model::trainable_params(self)
    }

    /// The trainable tensors that should be excluded from weight decay (SpecLoRA's d).
    pub fn no_decay_params(&self) -> Vec<Tensor> {
        super::Model::no_decay_params(self)
    }

    /// The LM head weight [vocab, hidden] (the embedding when tied).
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let h = crate::profile::fwd("embedding", || ops::embedding(&self.embed, ids, self.dtype))?;
        match self.cfg.embed_scale {
            // Gemma rounds √hidden to the activation dtype before multiplying.
            Some(s) => ops::scale(&h, if self.dtype == DType::F32 { s as f32 as f64 } else { s }),
            None => Ok(h),
        }
    }

    /// Final hidden states [b·t, hidden] for token ids [b·t] (row-major [b, t]). `key_mask`
    /// ([b·t], true = real token) masks padding keys.
    pub fn hidden_states(&self, ids: &[u32], b: usize, t: usize, key_mask: Option<&[bool]>) -> Result<Tensor> {
        if ids.len() != b * t || b == 0 || t == 0 {
            return Err(Error::shape("Decoder::forward", "ids", format!("{b}×{t} ids (b, t > 0)"), ids.len()));
        }
        let (rope, rope_local) = rope_tables(&self.cfg, t)?;
        let ctx = Ctx {
            cfg: self.cfg.clone(),
            rope,
            rope_local,
            b,
            t,
            positions: (0..t).collect(),
            key_mask: key_mask.map(|m| m.to_vec()),
            seed: self.training.then_some(self.dropout_seed),
        };
        let mut h = self.embed_ids(ids)?;
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
        crate::profile::fwd("rms_norm", || self.norm.forward(&h))
    }

    /// Logits [n, vocab] of final hidden states [n, hidden] (soft-capped when configured).
    pub fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        let z = ops::linear(h, self.head())?;
        match self.cfg.final_softcap {
            Some(c) => ops::softcap(&z, c),
            None => Ok(z),
        }
    }

    /// Logits [b·t, vocab].
    pub fn logits(&self, ids: &[u32], b: usize, t: usize, key_mask: Option<&[bool]>) -> Result<Tensor> {
        super::Model::logits(self, ids, b, t, key_mask)
    }

    /// Mean next-token cross-entropy over counted targets (targets [b·t], −100 = ignored),
    /// through the chunked fused LM-head loss (with the final soft cap inside it).
    pub fn loss(&self, ids: &[u32], targets: &[i64], b: usize, t: usize, key_mask: Option<&[bool]>, opts: &CeOptions) -> Result<Tensor> {
        let h = self.hidden_states(ids, b, t, key_mask)?;
        let opts = CeOptions { softcap: self.cfg.final_softcap.or(opts.softcap), ..opts.clone() };
        crate::profile::fwd("linear_cross_entropy", || ops::linear_cross_entropy(&h, self.head(), targets, &opts))
    }

    /// A copy of the model on `device`. Frozen matrices are stored as `weight_dtype` there (bf16
    /// for the tensor-core GEMM, or f32), converted a tile at a time from whatever the checkpoint
    /// holds (f32, bf16, f16 or GGUF blocks); norm weights and biases stay f32; adapters become f32
    /// trainable leaves with fresh ids (create the optimizer after moving). Activations must be
    /// f32 on the device.
    pub fn to_device(&self, device: crate::device::Device, weight_dtype: DType) -> Result<Decoder> {
        use crate::device::Device;
        device.ensure_available()?;
        if device == Device::Cuda && self.dtype != DType::F32 {
            return Err(Error::dtype("Decoder::to_device", "activations", "f32 on the device", self.dtype));
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
                path: l.path.clone(),
                weight: mat(&l.weight)?,
                bias: l.bias.as_ref().map(vec).transpose()?,
                adapter: l.adapter.as_ref().map(|a| a.to_device(device)).transpose()?,
            })
        };
        let norm = |n: &RmsNorm| n.map(vec);
        let opt_norm = |n: &Option<RmsNorm>| n.as_ref().map(norm).transpose();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Block {
                    attn_norm: norm(&l.attn_norm)?,
                    qkv: match &l.qkv {
                        Qkv::Separate { q, k, v } => Qkv::Separate { q: lin(q)?, k: lin(k)?, v: lin(v)? },
                        Qkv::Fused(x) => Qkv::Fused(lin(x)?),
                    },
                    q_norm: opt_norm(&l.q_norm)?,
                    k_norm: opt_norm(&l.k_norm)?,
                    o: lin(&l.o)?,
                    post_attn_norm: opt_norm(&l.post_attn_norm)?,
                    mlp_norm: norm(&l.mlp_norm)?,
                    gate_up: match &l.gate_up {
                        GateUp::Separate { gate, up } => GateUp::Separate { gate: lin(gate)?, up: lin(up)? },
                        GateUp::Fused(x) => GateUp::Fused(lin(x)?),
                    },
                    down: lin(&l.down)?,
                    post_mlp_norm: opt_norm(&l.post_mlp_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            cfg: self.cfg.clone(),
            embed: mat(&self.embed)?,
            layers,
            norm: norm(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(mat).transpose()?,
            dtype: self.dtype,
            checkpointing: self.checkpointing,
            checkpoint_keep: self.checkpoint_keep,
            training: self.training,
            dropout_seed: self.dropout_seed,
        })
    }

    /// Runs `ids` ([b·t], the tokens after those already in `cache`) through the model without
    /// recording a graph, appending their keys/values to `cache`. Returns the final hidden
    /// states [b·t, hidden].
    pub fn forward_cached(&self, ids: &[u32], b: usize, t: usize, cache: &mut KvCache) -> Result<Tensor> {
        if ids.len() != b * t || b == 0 || t == 0 {
            return Err(Error::shape("Decoder::forward_cached", "ids", format!("{b}×{t} ids (b, t > 0)"), ids.len()));
        }
        let start = cache.len;
        if start + t > self.cfg.max_position_embeddings {
            return Err(Error::invalid(
                "Decoder::forward_cached",
                format!("position {} exceeds max_position_embeddings {}", start + t, self.cfg.max_position_embeddings),
            ));
        }
        crate::autograd::no_grad(|| {
            let (rope, rope_local) = rope_tables(&self.cfg, start + t)?;
            let ctx = Ctx { cfg: self.cfg.clone(), rope, rope_local, b, t, positions: (start..start + t).collect(), key_mask: None, seed: None };
            cache.layers.resize(self.layers.len(), (None, None));
            let mut h = self.embed_ids(ids)?;
            for (li, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
                h = layer_forward(layer, li, &ctx, &h, Some(kv))?;
            }
            cache.len = start + t;
            self.norm.forward(&h)
        })
    }

    /// Every norm weight (frozen), for checks that nothing frozen gets a gradient.
    pub fn norm_weights(&self) -> Vec<&Tensor> {
        self.layers.iter().flat_map(|l| l.norms()).chain([&self.norm]).map(|n| &n.weight).collect()
    }
}

/// A tensor of [`Decoder::named_tensors`]: a plain frozen tensor, or a linear's weight (with its
/// adapter, merged by writers).
pub enum NamedTensor<'a> {
    Plain(&'a Tensor),
    Linear(&'a Linear),
}

/// The RoPE tables (global, local) for sequences of up to `seq_len` positions (LongRoPE picks
/// its short or long factors by it).
fn rope_tables(cfg: &DecoderConfig, seq_len: usize) -> Result<(Rope, Option<Rope>)> {
    let table = |r: &RopeConfig| -> Result<Rope> {
        let rot = rotary_dim(cfg.head_dim, r.partial_rotary_factor);
        let inv_freq = r.scaling.inv_freq(rot, r.theta, seq_len)?;
        Rope::with_table(cfg.head_dim, inv_freq, r.scaling.attention_factor(Some(cfg.max_position_embeddings as f64)))
    };
    Ok((table(&cfg.rope)?, cfg.rope_local.as_ref().map(table).transpose()?))
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

/// One decoder layer (see the module docs). With `kv`, the new keys/values are appended to the
/// cache and attention runs over all cached positions.
fn layer_forward(l: &Block, li: usize, c: &Ctx, x: &Tensor, kv: Option<&mut (Option<Tensor>, Option<Tensor>)>) -> Result<Tensor> {
    let cfg = &c.cfg;
    let (b, t, hd, nh, nkv) = (c.b, c.t, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
    // A distinct dropout stream per (layer, module).
    let seed = |m: u64| c.seed.map(|s| s ^ ((li as u64) << 8 | m).wrapping_mul(0xd134_2543_de82_ef95));
    // Forward scopes for `bench --profile` (free when profiling is off).
    use crate::profile::fwd;
    let n = fwd("rms_norm", || l.attn_norm.forward(x))?;
    let (q, k, v) = match &l.qkv {
        Qkv::Separate { q, k, v } => {
            (fwd("q_proj", || q.forward(&n, seed(0)))?, fwd("k_proj", || k.forward(&n, seed(1)))?, fwd("v_proj", || v.forward(&n, seed(2)))?)
        }
        Qkv::Fused(qkv) => {
            let y = fwd("qkv_proj", || qkv.forward(&n, seed(0)))?;
            let mut parts = ops::split_last(&y, &[nh * hd, nkv * hd, nkv * hd])?.into_iter();
            let (q, k, v) = (parts.next(), parts.next(), parts.next());
            (q.expect("3 parts"), k.expect("3 parts"), v.expect("3 parts"))
        }
    };
    let mut q = ops::reshape(&q, [b, t, nh, hd])?;
    let mut k = ops::reshape(&k, [b, t, nkv, hd])?;
    let mut v = ops::reshape(&v, [b, t, nkv, hd])?;
    if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
        q = fwd("rms_norm", || qn.forward(&q))?;
        k = fwd("rms_norm", || kn.forward(&k))?;
    }
    let window = cfg.window(li);
    let rope = match (&c.rope_local, window) {
        (Some(local), Some(_)) => local,
        _ => &c.rope,
    };
    let q = fwd("rope", || ops::rope(&q, rope, &c.positions))?;
    k = fwd("rope", || ops::rope(&k, rope, &c.positions))?;
    if let Some((ck, cv)) = kv {
        if let (Some(pk), Some(pv)) = (ck.as_ref(), cv.as_ref()) {
            k = concat_seq(pk, &k)?;
            v = concat_seq(pv, &v)?;
        }
        *ck = Some(k.clone());
        *cv = Some(v.clone());
    }
    let opts = AttnOptions { causal: true, key_mask: c.key_mask.clone(), scale: cfg.attn_scale, softcap: cfg.attn_softcap, window };
    let a = fwd("attention", || ops::attention(&q, &k, &v, &opts))?;
    let a = ops::reshape(&a, [b * t, nh * hd])?;
    let mut o = fwd("o_proj", || l.o.forward(&a, seed(3)))?;
    if let Some(pn) = &l.post_attn_norm {
        o = fwd("rms_norm", || pn.forward(&o))?;
    }
    let x = fwd("add", || ops::add(x, &o))?;
    let n = fwd("rms_norm", || l.mlp_norm.forward(&x))?;
    let (gate, up) = match &l.gate_up {
        GateUp::Separate { gate, up } => (fwd("gate_proj", || gate.forward(&n, seed(4)))?, fwd("up_proj", || up.forward(&n, seed(5)))?),
        GateUp::Fused(gu) => {
            let y = fwd("gate_up_proj", || gu.forward(&n, seed(4)))?;
            let mut parts = ops::split_last(&y, &[cfg.intermediate_size, cfg.intermediate_size])?.into_iter();
            let (g, u) = (parts.next(), parts.next());
            (g.expect("2 parts"), u.expect("2 parts"))
        }
    };
    // While a checkpoint backward re-runs this layer, its output values are never read (only the
    // graph is played), so the down projection records its backward without computing values.
    let graph_only = crate::autograd::is_recomputing() && l.post_mlp_norm.is_none();
    let mut down = fwd("down_proj", || l.down.forward_gated(cfg.act, &gate, &up, seed(6), graph_only))?;
    drop((gate, up));
    if let Some(pn) = &l.post_mlp_norm {
        down = fwd("rms_norm", || pn.forward(&down))?;
    }
    fwd("add", || ops::add(&x, &down))
}
