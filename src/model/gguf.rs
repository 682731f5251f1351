//! GGUF files as llama.cpp's converter writes them → [`DecoderConfig`] and HF-named weights.
//!
//! [`crate::io::gguf`] serves metadata and tensors by llama.cpp name and knows nothing of
//! models; this module holds the model knowledge: which family an `general.architecture` is
//! (each [`Family`] reads its own `{arch}.*` keys in `from_gguf`), the HF ↔ llama.cpp tensor
//! names of each family, and the converter's transforms that a reader must undo:
//!
//! - Llama (`llama`, also written for Mistral): the q/k rows of every head are interleaved for
//!   rope on adjacent pairs (see [`unpermute_qk_rows`]); put back in HF's half-split order.
//! - Gemma 2/3: every norm weight is stored as 1 + w (llama.cpp's RMSNorm multiplies by the
//!   stored value); the decoder's RmsNorm adds the 1 itself, so 1 is subtracted.
//! - Gemma 3: `token_embd` is cut to the tokenizer's vocabulary (the vocabulary size is read from
//!   the tensor, so nothing to undo).
//! - Llama 3.x: the `llama3` RoPE parameters become a per-frequency divisor table
//!   (`rope_freqs.weight`, [rotary_dim / 2]): inv_freq(i) = θ^(−2i/d) / f_i.
//! - Phi-3 (and LongRoPE Llamas): the factor lists become the tensors
//!   `rope_factors_short/long.weight`.
//!
//! What the converter does not write is taken as llama.cpp takes it (so a file means here what
//! it means to llama.cpp): Gemma's attention scale is head_dim^−½ (the 27B sizes: (hidden /
//! heads)^−½), Gemma 2 slides every other layer (window 4096 unless given), Gemma 3 slides five
//! layers of every six, unless `{arch}.attention.sliding_window_pattern` says otherwise; a
//! Llama file has no sliding window.

use super::decoder::{DecoderConfig, RopeConfig};
use super::families::{self, Family};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::gguf::{unpermute_qk_rows, GgufFile, GgufValue};
use crate::nn::RopeScaling;
use crate::storage::HostData;
use crate::tensor::Tensor;

/// HF module names of a Llama-layout layer (Llama, Mistral, Qwen2, Qwen3) and their llama.cpp
/// counterparts.
pub const LLAMA_LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];
/// Gemma 2/3: norms before and after attention and the MLP. HF's `post_attention_layernorm`
/// is the norm after attention here (not the one before the MLP, as in Llama).
pub const GEMMA_LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];
/// Phi-3: fused projections keep their row order (q, k, v; gate, up) under llama.cpp's names.
pub const PHI3_LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.qkv_proj", "attn_qkv"),
    ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];
/// Whole-model tensors (HF, llama.cpp), every family.
const TOP_NAMES: [(&str, &str); 3] =
    [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];

/// Splits `<prefix><N>.<module>.<weight|bias>` into (N, module, suffix).
fn split_layer_name<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    let layer = n.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    matches!(suffix, "weight" | "bias").then_some((layer, module, suffix))
}

/// The family of a decoder config (by [`DecoderConfig::family`]; Llama when unknown).
pub fn family_of(cfg: &DecoderConfig) -> &'static Family {
    families::by_name(&cfg.family).unwrap_or(&families::llama::FAMILY)
}

/// The llama.cpp name of an HF tensor name in `family`'s layout
/// (`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight`), or `None` if it has none.
pub fn hf_to_gguf_name(family: &Family, hf: &str) -> Option<String> {
    if let Some((_, g)) = TOP_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, module, suffix) = split_layer_name(hf, "model.layers.")?;
    let (_, g) = family.gguf_names.iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// The HF name of a llama.cpp tensor name in `family`'s layout (`blk.3.ffn_up.weight` →
/// `model.layers.3.mlp.up_proj.weight`), or `None` if it has none.
pub fn gguf_to_hf_name(family: &Family, gguf: &str) -> Option<String> {
    if let Some((h, _)) = TOP_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let (layer, module, suffix) = split_layer_name(gguf, "blk.")?;
    let (h, _) = family.gguf_names.iter().find(|(_, g)| *g == module)?;
    Some(format!("model.layers.{layer}.{h}.{suffix}"))
}

/// Whether llama.cpp's converter permutes the q/k rows of architecture `arch` (`llama`; the
/// name `mistral` too, as older files spell it).
pub fn arch_permutes_qk(arch: &str) -> bool {
    arch == "mistral" || families::by_gguf_arch(arch).is_some_and(|f| f.gguf_permutes_qk)
}

/// The q/k row order of HF module `path` (`model.layers.N.self_attn.q_proj`) with `rows` output
/// rows in a file of `cfg`'s family: `perm[hf_row]` = the GGUF row (see [`unpermute_qk_rows`]);
/// `None` when the family's converter does not permute or the module is not q/k.
pub fn qk_permutation(cfg: &DecoderConfig, path: &str, rows: usize) -> Result<Option<Vec<u32>>> {
    if !family_of(cfg).gguf_permutes_qk {
        return Ok(None);
    }
    let heads = match path.rsplit('.').next() {
        Some("q_proj") => cfg.num_attention_heads,
        Some("k_proj") => cfg.num_key_value_heads,
        _ => return Ok(None),
    };
    unpermute_qk_rows(rows, heads)
        .map(Some)
        .ok_or_else(|| Error::invalid("gguf q/k permutation", format!("{rows} rows of {path} do not split into {heads} heads of an even size")))
}

/// The partial rotary factor f with ⌊head_dim · f⌋ = `rot` (the decoder rotates
/// int(head_dim · f) dimensions, as transformers does): rot / head_dim, nudged up when rounding
/// would make the product fall just short (e.g. 32 / 96).
fn rotary_factor(rot: usize, head_dim: usize) -> f64 {
    let f = rot as f64 / head_dim as f64;
    if (head_dim as f64 * f) as usize == rot {
        f
    } else {
        (rot as f64 + 0.25) / head_dim as f64
    }
}

/// Whether HF tensor `hf` is a norm weight (stored as 1 + w by the Gemma converters).
fn is_norm_weight(hf: &str) -> bool {
    hf == "model.norm.weight"
        || split_layer_name(hf, "model.layers.").is_some_and(|(_, m, s)| s == "weight" && (m.ends_with("layernorm") || m.ends_with("_norm")))
}

/// The metadata reader a family's `from_gguf` gets: `{arch}.*` keys by their suffix, and the
/// tensor table (for what the converter signals by a tensor's presence).
pub struct GgufMeta<'a> {
    pub file: &'a GgufFile,
    pub arch: &'a str,
}

impl GgufMeta<'_> {
    /// `{arch}.{suffix}`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }
    pub fn err(&self, msg: impl Into<String>) -> Error {
        self.file.err(msg)
    }
    pub fn opt_usize(&self, suffix: &str) -> Result<Option<usize>> {
        self.file.meta_usize(&self.key(suffix))
    }
    pub fn need_usize(&self, suffix: &str) -> Result<usize> {
        let key = self.key(suffix);
        let v = self.file.meta_usize(&key)?;
        self.file.required(&key, v, "needed for the model config")
    }
    /// A number (f32 metadata at its shortest decimal form, see [`GgufFile::meta_config_f64`]).
    pub fn opt_f64(&self, suffix: &str) -> Result<Option<f64>> {
        self.file.meta_config_f64(&self.key(suffix))
    }
    pub fn opt_str(&self, suffix: &str) -> Result<Option<&str>> {
        self.file.meta_str(&self.key(suffix))
    }
    pub fn has_tensor(&self, name: &str) -> bool {
        self.file.tensor_info(name).is_some()
    }
    /// A small 1-D f32 tensor's values (RoPE factor tables), length-checked.
    pub fn factors(&self, name: &str, len: usize) -> Result<Vec<f64>> {
        let info = self.file.tensor_info(name).ok_or_else(|| self.err(format!("no tensor `{name}`")))?;
        if info.dims != [len] {
            return Err(self.err(format!("tensor `{name}` has shape {:?}, expected [{len}] (rotary dimension / 2)", info.dims)));
        }
        // f32 values at their shortest decimal form (what the converter was given).
        let v: Vec<f64> = self.file.tensor(name)?.to_vec_f32().into_iter().map(|x| x.to_string().parse::<f64>().unwrap_or(f64::from(x))).collect();
        if let Some(x) = v.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
            return Err(self.err(format!("tensor `{name}` holds {x}; RoPE factors must be finite and > 0")));
        }
        Ok(v)
    }

    /// The sizes, norm epsilon, tied head and global RoPE every llama.cpp decoder file has:
    /// `{arch}.embedding_length`, `block_count`, `feed_forward_length`, `attention.head_count`
    /// (`_kv`), `attention.key_length` / `value_length` (default hidden / heads),
    /// `attention.layer_norm_rms_epsilon`, `context_length`, `rope.freq_base` (default 10000),
    /// `rope.dimension_count` (partial rotary when < head_dim), `rope.scaling.type` (none,
    /// linear with `rope.scaling.factor`, longrope; others are refused by name),
    /// `rope_freqs.weight` (per-frequency divisors) and LongRoPE's `rope_factors_short/long.weight`
    /// with `rope.scaling.original_context_length` / `attn_factor`. Vocabulary from `token_embd.weight`, tied head when
    /// `output.weight` is absent.
    pub fn base(&self) -> Result<DecoderConfig> {
        let hidden = self.need_usize("embedding_length")?;
        let layers = self.need_usize("block_count")?;
        let ffn = self.need_usize("feed_forward_length")?;
        let heads = self.need_usize("attention.head_count")?;
        let kv_heads = self.opt_usize("attention.head_count_kv")?.unwrap_or(heads);
        if heads == 0 {
            return Err(self.err(format!("metadata `{}` is 0", self.key("attention.head_count"))));
        }
        if let Some(n) = self.opt_usize("expert_count")?.filter(|&n| n > 0) {
            return Err(self.err(format!("metadata `{}` = {n}: mixture-of-experts models are not supported", self.key("expert_count"))));
        }
        let eps_key = self.key("attention.layer_norm_rms_epsilon");
        let eps = self.file.meta_config_f64(&eps_key)?;
        let eps = self.file.required(&eps_key, eps, "needed for the model config")?;
        let theta = self.opt_f64("rope.freq_base")?.unwrap_or(10000.0);
        let ctx = self.need_usize("context_length")?;
        let head_dim = match self.opt_usize("attention.key_length")? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(self
                    .err(format!("embedding_length {hidden} is not a multiple of head_count {heads} and `{}` is missing", self.key("attention.key_length"))))
            }
        };
        if let Some(vl) = self.opt_usize("attention.value_length")? {
            if vl != head_dim {
                return Err(self.err(format!(
                    "metadata `{}` = {vl} differs from the key length {head_dim}; spectune needs equal head sizes",
                    self.key("attention.value_length")
                )));
            }
        }
        let rot = self.opt_usize("rope.dimension_count")?.unwrap_or(head_dim);
        if rot == 0 || rot > head_dim || rot % 2 != 0 {
            return Err(self.err(format!("metadata `{}` = {rot}: expected an even number in 1..={head_dim} (head size)", self.key("rope.dimension_count"))));
        }
        let scaling_key = self.key("rope.scaling.type");
        let mut scaling = match self.file.meta_str(&scaling_key)? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => {
                let fk = self.key("rope.scaling.factor");
                let factor = self.file.meta_config_f64(&fk)?;
                let factor = self.file.required(&fk, factor, "needed for linear rope scaling")?;
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(self.err(format!("metadata `{fk}` = {factor}, expected a finite number > 0")));
                }
                if factor == 1.0 {
                    RopeScaling::None
                } else {
                    RopeScaling::Linear { factor }
                }
            }
            // The factor tables come as tensors (below).
            Some("longrope") => RopeScaling::None,
            Some(s) => return Err(self.err(format!("metadata `{scaling_key}` is {s:?}: spectune reads rope scaling none, linear or longrope from GGUF"))),
        };
        let (short, long) = (self.has_tensor("rope_factors_short.weight"), self.has_tensor("rope_factors_long.weight"));
        if short != long {
            return Err(self.err("only one of the tensors `rope_factors_short.weight` / `rope_factors_long.weight` is present; LongRoPE needs both"));
        }
        if short {
            if scaling != RopeScaling::None {
                return Err(self.err(format!("LongRoPE factor tensors together with `{scaling_key}`: spectune reads one rope scaling at a time")));
            }
            // inv_freq(i) = θ^(−2i/d) / f_i, short factors up to the original context, long
            // ones beyond; cos and sin × `rope.scaling.attn_factor` (computed from the context
            // lengths when absent).
            let key = self.key("rope.scaling.original_context_length");
            let orig = self.file.meta_usize(&key)?;
            let orig = self.file.required(&key, orig, "needed for LongRoPE")?;
            scaling = RopeScaling::LongRope {
                short_factor: self.factors("rope_factors_short.weight", rot / 2)?,
                long_factor: self.factors("rope_factors_long.weight", rot / 2)?,
                original_max_position_embeddings: orig as f64,
                factor: None,
                attention_factor: self.opt_f64("rope.scaling.attn_factor")?,
            };
        } else if self.file.meta_str(&scaling_key)? == Some("longrope") {
            return Err(self.err(format!(
                "metadata `{scaling_key}` is \"longrope\" but the tensors `rope_factors_short.weight` / `rope_factors_long.weight` are missing"
            )));
        }
        if self.has_tensor("rope_freqs.weight") {
            if scaling != RopeScaling::None {
                return Err(self.err(format!(
                    "tensor `rope_freqs.weight` together with another rope scaling (`{scaling_key}` or LongRoPE factors): spectune reads one at a time"
                )));
            }
            // θ^(−2i/d) / f_i for every position: LongRoPE's table with one factor list and no
            // switch (the original context is never exceeded) and no attention factor.
            let f = self.factors("rope_freqs.weight", rot / 2)?;
            scaling = RopeScaling::LongRope {
                short_factor: f.clone(),
                long_factor: f,
                original_max_position_embeddings: f64::MAX,
                factor: None,
                attention_factor: Some(1.0),
            };
        }
        let embd = self
            .file
            .tensor_info("token_embd.weight")
            .ok_or_else(|| self.err("no tensor `token_embd.weight` (HF `model.embed_tokens.weight`), needed for the vocabulary size"))?;
        if embd.dims.len() != 2 || embd.dims[1] != hidden {
            return Err(self.err(format!(
                "tensor `token_embd.weight` has shape {:?}, expected [vocab, {hidden}] (`{}`)",
                embd.dims,
                self.key("embedding_length")
            )));
        }
        let vocab_size = embd.dims[0];
        if let Some(v) = self.opt_usize("vocab_size")? {
            if v != vocab_size {
                return Err(self.err(format!("metadata `{}` = {v} but tensor `token_embd.weight` has {vocab_size} rows", self.key("vocab_size"))));
            }
        }
        Ok(DecoderConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: eps,
            rope: RopeConfig { theta, scaling, partial_rotary_factor: rotary_factor(rot, head_dim) },
            tie_word_embeddings: !self.has_tensor("output.weight"),
            max_position_embeddings: ctx,
            ..DecoderConfig::default()
        })
    }

    /// `{arch}.attention.sliding_window` (`None` when absent or 0).
    pub fn sliding_window(&self) -> Result<Option<usize>> {
        Ok(self.opt_usize("attention.sliding_window")?.filter(|&w| w > 0))
    }

    /// Which layers slide, as llama.cpp decides: `{arch}.attention.sliding_window_pattern` as a
    /// per-layer bool array, or as a period n (layer l slides iff l mod n < n − 1; n = 0: all),
    /// else `default_period`.
    pub fn swa_layers(&self, layers: usize, default_period: usize) -> Result<Vec<bool>> {
        let key = self.key("attention.sliding_window_pattern");
        match self.file.get(&key) {
            Some(GgufValue::Array(a)) => {
                if a.len() != layers {
                    return Err(self.err(format!("metadata `{key}` has {} entries for {layers} layers", a.len())));
                }
                a.iter().map(|v| v.as_bool().ok_or_else(|| self.err(format!("metadata `{key}` holds {v}, expected bools")))).collect()
            }
            Some(_) => {
                let n = self.file.meta_usize(&key)?.unwrap_or(default_period);
                Ok((0..layers).map(|l| n == 0 || l % n < n - 1).collect())
            }
            None => Ok((0..layers).map(|l| l % default_period < default_period - 1).collect()),
        }
    }
}

/// The model config of a GGUF file: its `general.architecture` picks the family, whose
/// `from_gguf` reads the `{arch}.*` metadata. An architecture no family reads is an error naming
/// it.
pub fn gguf_config(g: &GgufFile) -> Result<DecoderConfig> {
    let arch = g.architecture()?;
    // Older llama.cpp files name Mistral models `mistral` (the same tensors as `llama`).
    let family = if arch == "mistral" { Some(&families::llama::FAMILY) } else { families::by_gguf_arch(arch) };
    let readable: Vec<&str> = families::FAMILIES.iter().filter(|f| f.from_gguf.is_some()).filter_map(|f| f.gguf_arch).collect();
    let (family, from_gguf) = match family.and_then(|f| f.from_gguf.map(|r| (f, r))) {
        Some(x) => x,
        None => {
            return Err(g.err(format!("metadata `general.architecture` is {arch:?}; spectune reads the GGUF architectures {}", readable.join(", "))));
        }
    };
    let mut cfg = from_gguf(&GgufMeta { file: g, arch })?;
    cfg.family = family.name.to_string();
    cfg.validate().map_err(|e| g.err(format!("model config from metadata: {e}")))?;
    validate_tensors(g, &cfg)?;
    Ok(cfg)
}

/// Every weight the config needs is in the file with the shape the metadata implies (an error
/// names the llama.cpp tensor, its HF name and both shapes).
fn validate_tensors(g: &GgufFile, cfg: &DecoderConfig) -> Result<()> {
    let family = family_of(cfg);
    for (hf, shape) in cfg.expected_weights() {
        let name = hf_to_gguf_name(family, &hf).ok_or_else(|| g.err(format!("HF tensor `{hf}` has no llama.cpp name in the {} layout", family.name)))?;
        let info = g.tensor_info(&name).ok_or_else(|| g.err(format!("tensor `{name}` (HF `{hf}`, shape {shape:?}) is missing")))?;
        if info.dims != shape {
            return Err(g.err(format!("tensor `{name}` (HF `{hf}`) has shape {:?}, but the metadata implies {shape:?}", info.dims)));
        }
    }
    Ok(())
}

/// Tensor `hf_name` (HF naming) of a GGUF file in `cfg`'s family layout, with the converter's
/// transforms undone (module docs): the result equals the HF checkpoint's tensor. Weights
/// stay mapped; a re-ordered or shifted 1-D tensor is a small host copy.
pub fn hf_tensor(g: &GgufFile, cfg: &DecoderConfig, hf_name: &str) -> Result<Tensor> {
    let family = family_of(cfg);
    let gguf = hf_to_gguf_name(family, hf_name).ok_or_else(|| g.err(format!("HF tensor `{hf_name}` has no llama.cpp counterpart ({} layout)", family.name)))?;
    if g.tensor_info(&gguf).is_none() {
        return Err(g.err(format!("tensor `{gguf}` (HF `{hf_name}`) is not in this file")));
    }
    let t = g.tensor(&gguf)?;
    if cfg.norm_plus_one && is_norm_weight(hf_name) {
        // Stored 1 + w; the decoder's RmsNorm scales by 1 + w itself.
        let v: Vec<f32> = t.to_vec_f32().into_iter().map(|x| x - 1.0).collect();
        return Tensor::from_host(HostData::F32(v), t.dims().to_vec());
    }
    let path = hf_name.rsplit_once('.').map_or(hf_name, |(p, _)| p);
    let rows = t.dims().first().copied().unwrap_or(0);
    let Some(perm) = qk_permutation(cfg, path, rows).map_err(|e| g.err(format!("tensor `{gguf}` (HF `{hf_name}`): {e}")))? else {
        return Ok(t);
    };
    match t.dims().len() {
        2 => t.permute_rows(&perm).map_err(|e| g.err(format!("tensor `{gguf}`: {e}"))),
        1 => {
            let v = t.to_vec_f32();
            let p: Vec<f32> = perm.iter().map(|&i| v[i as usize]).collect();
            let data = match t.dtype() {
                DType::F16 => HostData::F16(p.iter().map(|&x| half::f16::from_f32(x)).collect()),
                DType::BF16 => HostData::BF16(p.iter().map(|&x| half::bf16::from_f32(x)).collect()),
                _ => HostData::F32(p),
            };
            Tensor::from_host(data, [rows])
        }
        n => Err(g.err(format!("tensor `{gguf}` (HF `{hf_name}`) has {n} dimensions, expected 1 or 2"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::families::{gemma2, gemma3, llama, phi3, qwen2, qwen3};

    #[test]
    fn name_mapping_round_trips() {
        // The names llama.cpp's converter writes for each layout (checked against converted files).
        let cases: &[(&Family, &str, &str)] = &[
            (&llama::FAMILY, "model.embed_tokens.weight", "token_embd.weight"),
            (&llama::FAMILY, "model.norm.weight", "output_norm.weight"),
            (&llama::FAMILY, "lm_head.weight", "output.weight"),
            (&llama::FAMILY, "model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
            (&llama::FAMILY, "model.layers.12.self_attn.q_proj.bias", "blk.12.attn_q.bias"),
            (&llama::FAMILY, "model.layers.3.self_attn.o_proj.weight", "blk.3.attn_output.weight"),
            (&llama::FAMILY, "model.layers.29.post_attention_layernorm.weight", "blk.29.ffn_norm.weight"),
            (&llama::FAMILY, "model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
            (&qwen2::FAMILY, "model.layers.0.self_attn.v_proj.bias", "blk.0.attn_v.bias"),
            (&qwen3::FAMILY, "model.layers.1.self_attn.q_norm.weight", "blk.1.attn_q_norm.weight"),
            (&qwen3::FAMILY, "model.layers.1.self_attn.k_norm.weight", "blk.1.attn_k_norm.weight"),
            (&gemma2::FAMILY, "model.layers.0.post_attention_layernorm.weight", "blk.0.post_attention_norm.weight"),
            (&gemma2::FAMILY, "model.layers.0.pre_feedforward_layernorm.weight", "blk.0.ffn_norm.weight"),
            (&gemma2::FAMILY, "model.layers.0.post_feedforward_layernorm.weight", "blk.0.post_ffw_norm.weight"),
            (&gemma3::FAMILY, "model.layers.1.self_attn.k_norm.weight", "blk.1.attn_k_norm.weight"),
            (&phi3::FAMILY, "model.layers.0.self_attn.qkv_proj.weight", "blk.0.attn_qkv.weight"),
            (&phi3::FAMILY, "model.layers.0.mlp.gate_up_proj.weight", "blk.0.ffn_up.weight"),
            (&phi3::FAMILY, "model.layers.0.post_attention_layernorm.weight", "blk.0.ffn_norm.weight"),
        ];
        for (f, hf, g) in cases {
            assert_eq!(hf_to_gguf_name(f, hf).as_deref(), Some(*g), "{}", f.name);
            assert_eq!(gguf_to_hf_name(f, g).as_deref(), Some(*hf), "{}", f.name);
        }
        for bad in
            ["model.layers.x.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.scale", "model.layers.01.mlp.up_proj.weight", "model.layers.1.foo.weight", "x"]
        {
            assert_eq!(hf_to_gguf_name(&llama::FAMILY, bad), None, "{bad}");
        }
        // Phi-3 has no separate q or gate; Llama no fused ones.
        assert_eq!(hf_to_gguf_name(&phi3::FAMILY, "model.layers.0.self_attn.q_proj.weight"), None);
        assert_eq!(hf_to_gguf_name(&llama::FAMILY, "model.layers.0.self_attn.qkv_proj.weight"), None);
    }

    #[test]
    fn only_llama_permutes() {
        assert!(arch_permutes_qk("llama") && arch_permutes_qk("mistral"));
        for a in ["qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"] {
            assert!(!arch_permutes_qk(a), "{a}");
        }
    }

    #[test]
    fn rotary_factor_gives_back_the_rotary_dimension() {
        for hd in [8usize, 64, 80, 96, 128, 256] {
            for rot in (2..=hd).step_by(2) {
                let f = rotary_factor(rot, hd);
                assert_eq!((hd as f64 * f) as usize, rot, "{rot} of {hd}");
            }
        }
    }

    #[test]
    fn norm_weights_are_recognised() {
        for n in [
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.3.post_feedforward_layernorm.weight",
            "model.layers.1.self_attn.q_norm.weight",
        ] {
            assert!(is_norm_weight(n), "{n}");
        }
        for n in ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.bias"] {
            assert!(!is_norm_weight(n), "{n}");
        }
    }
}
