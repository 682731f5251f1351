//! HF `config.json` for the Llama family (Llama, Qwen2, Mistral names) → [`LlamaConfig`].
//!
//! The three architectures share one graph ([`super::llama`]): pre-norm RMSNorm, RoPE attention
//! with grouped KV heads, SwiGLU MLP. They differ only in a few config keys:
//!
//! | key                      | Llama                     | Qwen2                  | Mistral                   |
//! |--------------------------|---------------------------|------------------------|---------------------------|
//! | q/k/v bias               | never (see below)         | always true            | never                     |
//! | sliding window attention | —                         | `use_sliding_window`   | `sliding_window`          |
//!
//! Keys that would change the math in a way this engine does not implement are rejected with
//! an error naming the key (never silently ignored): Llama's `attention_bias: true` (HF puts
//! that bias on o_proj too, which the graph does not have), a RoPE scaling type other than `default`
//! (`rope_scaling` or `rope_parameters.rope_type`), a partial rotary factor, an active sliding
//! window, `mlp_bias: true`, a `hidden_act` other than SiLU, `pretraining_tp > 1` and a
//! `quantization_config` (GPTQ/AWQ/bitsandbytes weights).
//!
//! RoPE θ is read from either spelling: top-level `rope_theta` (transformers ≤ 4.x) or
//! `rope_parameters.rope_theta` (newer transformers); 10000 when neither is present.

use std::path::Path;

use serde_json::{Map, Value};

use super::llama::LlamaConfig;
use crate::error::{Error, Result};

/// Architectures (`architectures[0]`) accepted by [`parse_config`].
pub const SUPPORTED_ARCHITECTURES: [&str; 3] = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"];

/// The member of the Llama family a config describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Mistral,
}

impl Family {
    fn from_architecture(a: &str) -> Option<Family> {
        match a {
            "LlamaForCausalLM" => Some(Family::Llama),
            "Qwen2ForCausalLM" => Some(Family::Qwen2),
            "MistralForCausalLM" => Some(Family::Mistral),
            _ => None,
        }
    }
    fn from_model_type(t: &str) -> Option<Family> {
        match t {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "mistral" => Some(Family::Mistral),
            _ => None,
        }
    }
}

/// Reads and parses an HF `config.json` of a LlamaForCausalLM, Qwen2ForCausalLM or
/// MistralForCausalLM checkpoint. Errors name the file and the offending key.
pub fn parse_config(path: &Path) -> Result<LlamaConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    parse_config_str(&text, &path.display().to_string())
}

/// Parses the text of an HF `config.json`; `source_name` (usually the file path) is named in
/// every error.
pub fn parse_config_str(json: &str, source_name: &str) -> Result<LlamaConfig> {
    parse_config_with_family(json, source_name).map(|(c, _)| c)
}

/// Like [`parse_config_str`], also returning which family the config belongs to.
pub fn parse_config_with_family(json: &str, source_name: &str) -> Result<(LlamaConfig, Family)> {
    let value: Value = serde_json::from_str(json).map_err(|e| err(source_name, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(err(source_name, "config.json must be a JSON object"));
    };
    let r = Reader { obj: &obj, src: source_name };
    let family = r.family()?;

    // Keys that change the math and are not implemented.
    let act = r.opt_str("hidden_act")?.unwrap_or("silu");
    if act != "silu" && act != "swish" {
        return Err(err(source_name, format!("hidden_act = {act:?} is not supported (only \"silu\")")));
    }
    if r.opt_bool("mlp_bias")? == Some(true) {
        return Err(err(source_name, "mlp_bias = true is not supported (MLP linears without bias only)"));
    }
    if let Some(tp) = r.opt_usize("pretraining_tp")? {
        if tp > 1 {
            return Err(err(source_name, format!("pretraining_tp = {tp} is not supported (only 1)")));
        }
    }
    if r.present("quantization_config") {
        return Err(err(source_name, "quantization_config is present: quantized (GPTQ/AWQ/bitsandbytes) checkpoints are not supported"));
    }

    let hidden_size = r.req_usize("hidden_size")?;
    let num_hidden_layers = r.req_usize("num_hidden_layers")?;
    let num_attention_heads = r.req_usize("num_attention_heads")?;
    let intermediate_size = r.req_usize("intermediate_size")?;
    let vocab_size = r.req_usize("vocab_size")?;
    let rms_norm_eps = r.req_f64("rms_norm_eps")?;
    let max_position_embeddings = r.req_usize("max_position_embeddings")?;
    let num_key_value_heads = r.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
    if num_attention_heads == 0 {
        return Err(err(source_name, "num_attention_heads must be > 0"));
    }
    let head_dim = match r.opt_usize("head_dim")? {
        Some(d) => d,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(err(
                    source_name,
                    format!("head_dim is absent and hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})"),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    let tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
        return Err(err(source_name, format!("rms_norm_eps must be finite and > 0, got {rms_norm_eps}")));
    }

    let rope_theta = r.rope_theta()?;
    r.check_rope_scaling()?;
    r.check_sliding_window(family, num_hidden_layers, max_position_embeddings)?;

    let attention_bias = match family {
        // Qwen2's q/k/v projections always carry a bias (hard-coded in HF's Qwen2Attention).
        Family::Qwen2 => true,
        // HF's LlamaAttention puts `attention_bias` on o_proj as well, which this graph's
        // LlamaConfig cannot express (its attention_bias is q/k/v only, as in Qwen2).
        Family::Llama => match r.opt_bool("attention_bias")? {
            Some(true) => {
                return Err(err(
                    source_name,
                    "attention_bias = true is not supported for LlamaForCausalLM (HF also gives o_proj a bias there; only q/k/v biases are implemented)",
                ))
            }
            _ => false,
        },
        // HF's MistralAttention has no bias (and ignores any attention_bias key).
        Family::Mistral => false,
    };

    let cfg = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        tie_word_embeddings,
        attention_bias,
        max_position_embeddings,
    };
    cfg.validate().map_err(|e| err(source_name, format!("inconsistent config: {e}")))?;
    Ok((cfg, family))
}

fn err(src: &str, msg: impl Into<String>) -> Error {
    Error::Format { path: src.into(), msg: msg.into() }
}

/// Typed access to the top-level keys; `null` counts as absent (HF writes `"head_dim": null`).
struct Reader<'a> {
    obj: &'a Map<String, Value>,
    src: &'a str,
}

impl<'a> Reader<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn present(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    fn type_err(&self, key: &str, want: &str, v: &Value) -> Error {
        err(self.src, format!("key `{key}` must be {want}, got {v}"))
    }
    fn missing(&self, key: &str) -> Error {
        err(self.src, format!("missing required key `{key}`"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| as_usize(v).ok_or_else(|| self.type_err(key, "a non-negative integer", v))).transpose()
    }
    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.type_err(key, "a number", v))).transpose()
    }
    fn req_f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.type_err(key, "true or false", v))).transpose()
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.type_err(key, "a string", v))).transpose()
    }

    /// `architectures[0]` decides; `model_type` is used when it is absent. Both present and
    /// naming different families is an error.
    fn family(&self) -> Result<Family> {
        let arch = match self.get("architectures") {
            None => None,
            Some(Value::Array(a)) => match a.first() {
                None => None,
                Some(Value::String(s)) => Some(s.as_str()),
                Some(v) => return Err(self.type_err("architectures", "a list of strings", v)),
            },
            Some(v) => return Err(self.type_err("architectures", "a list of strings", v)),
        };
        let model_type = self.opt_str("model_type")?;
        let supported = SUPPORTED_ARCHITECTURES.join(", ");
        let from_arch = match arch {
            Some(a) => Some(
                Family::from_architecture(a)
                    .ok_or_else(|| err(self.src, format!("architecture `{a}` (architectures[0]) is not supported; supported: {supported}")))?,
            ),
            None => None,
        };
        let from_type = match model_type {
            Some(t) => {
                let f = Family::from_model_type(t);
                if f.is_none() && from_arch.is_none() {
                    return Err(err(self.src, format!("model_type `{t}` is not supported; supported: llama, qwen2, mistral")));
                }
                f
            }
            None => None,
        };
        match (from_arch, from_type) {
            (Some(a), Some(t)) if a != t => Err(err(
                self.src,
                format!("architectures[0] `{}` and model_type `{}` name different architectures", arch.unwrap_or(""), model_type.unwrap_or("")),
            )),
            (Some(a), _) => Ok(a),
            (None, Some(t)) => Ok(t),
            (None, None) => Err(err(self.src, format!("missing required key `architectures` (or `model_type`); supported: {supported}"))),
        }
    }

    fn rope_parameters(&self) -> Result<Option<&'a Map<String, Value>>> {
        match self.get("rope_parameters") {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.type_err("rope_parameters", "an object", v)),
        }
    }

    /// θ from `rope_theta` or `rope_parameters.rope_theta` (they must agree when both are given).
    fn rope_theta(&self) -> Result<f64> {
        let top = self.opt_f64("rope_theta")?;
        let nested = match self.rope_parameters()? {
            Some(m) => match m.get("rope_theta").filter(|v| !v.is_null()) {
                Some(v) => Some(v.as_f64().ok_or_else(|| self.type_err("rope_parameters.rope_theta", "a number", v))?),
                None => None,
            },
            None => None,
        };
        let theta = match (top, nested) {
            (Some(a), Some(b)) if a != b => {
                return Err(err(self.src, format!("rope_theta ({a}) and rope_parameters.rope_theta ({b}) disagree")));
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => 10000.0,
        };
        if !(theta.is_finite() && theta > 0.0) {
            return Err(err(self.src, format!("rope_theta must be finite and > 0, got {theta}")));
        }
        Ok(theta)
    }

    /// Only unscaled RoPE ("default") is implemented.
    fn check_rope_scaling(&self) -> Result<()> {
        match self.get("rope_scaling") {
            None => {}
            Some(Value::Object(m)) => {
                let ty = m.get("rope_type").or_else(|| m.get("type")).filter(|v| !v.is_null());
                match ty.and_then(|v| v.as_str()) {
                    Some("default") => {}
                    Some(t) => return Err(err(self.src, format!("rope_scaling of type {t:?} is not supported (only unscaled RoPE)"))),
                    None => return Err(err(self.src, format!("rope_scaling = {} has no rope_type; scaled RoPE is not supported", Value::Object(m.clone())))),
                }
            }
            Some(v) => return Err(self.type_err("rope_scaling", "null or an object", v)),
        }
        if let Some(m) = self.rope_parameters()? {
            if let Some(v) = m.get("rope_type").filter(|v| !v.is_null()) {
                match v.as_str() {
                    Some("default") => {}
                    Some(t) => return Err(err(self.src, format!("rope_parameters.rope_type = {t:?} is not supported (only \"default\")"))),
                    None => return Err(self.type_err("rope_parameters.rope_type", "a string", v)),
                }
            }
            if let Some(v) = m.get("partial_rotary_factor").filter(|v| !v.is_null()) {
                if v.as_f64() != Some(1.0) {
                    return Err(err(self.src, format!("rope_parameters.partial_rotary_factor = {v} is not supported (only 1.0)")));
                }
            }
        }
        if let Some(v) = self.get("partial_rotary_factor") {
            if v.as_f64() != Some(1.0) {
                return Err(err(self.src, format!("partial_rotary_factor = {v} is not supported (only 1.0)")));
            }
        }
        Ok(())
    }

    /// Sliding-window attention is not implemented: reject configs where some layer would use a
    /// window shorter than the longest sequence (HF semantics per family).
    fn check_sliding_window(&self, family: Family, layers: usize, max_pos: usize) -> Result<()> {
        let window = self.opt_usize("sliding_window")?;
        match family {
            // HF's LlamaAttention has no sliding window; the key is ignored there.
            Family::Llama => Ok(()),
            Family::Mistral => match window {
                Some(w) if w < max_pos => Err(err(
                    self.src,
                    format!("sliding_window = {w} (< max_position_embeddings = {max_pos}) is not supported: sliding-window attention is not implemented"),
                )),
                _ => Ok(()),
            },
            Family::Qwen2 => {
                let use_sw = self.opt_bool("use_sliding_window")?.unwrap_or(false);
                let Some(w) = window.filter(|_| use_sw) else { return Ok(()) };
                if w >= max_pos {
                    return Ok(());
                }
                // Which layers slide: `layer_types` when given (newer transformers), else layers
                // i >= max_window_layers.
                let sliding = match self.get("layer_types") {
                    Some(Value::Array(a)) => a.iter().any(|t| t.as_str() == Some("sliding_attention")),
                    Some(v) => return Err(self.type_err("layer_types", "a list of strings", v)),
                    None => self.opt_usize("max_window_layers")?.unwrap_or(28) < layers,
                };
                if sliding {
                    Err(err(
                        self.src,
                        format!("sliding_window = {w} with use_sliding_window = true is not supported: sliding-window attention is not implemented"),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A JSON number that is a non-negative integer (also accepts `4096.0`).
fn as_usize(v: &Value) -> Option<usize> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).ok();
    }
    let f = v.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f <= usize::MAX as f64).then_some(f as usize)
}
