//! HF `config.json` → [`DecoderConfig`]: the typed reader every family file uses, the keys all
//! decoder families share (sizes, RoPE, tied embeddings, sliding-window layers), and the
//! dispatch on `architectures[0]` / `model_type` to the family (see [`super::families`]).
//!
//! Keys that change the math in a way a family does not implement are rejected with an error
//! naming the key (never silently ignored). RoPE θ and scaling are read from either spelling:
//! top-level `rope_theta` + `rope_scaling` (transformers ≤ 4.x) or `rope_parameters`
//! (newer transformers); θ = 10000 when neither gives one.

use std::path::Path;

use serde_json::{Map, Value};

use super::decoder::{DecoderConfig, RopeConfig};
use super::families::{self, Family};
use crate::error::{Error, Result};
use crate::nn::RopeScaling;

/// Reads and parses an HF `config.json` of a supported architecture. Errors name the file and
/// the offending key.
pub fn parse_config(path: &Path) -> Result<DecoderConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    parse_config_str(&text, &path.display().to_string())
}

/// Parses the text of an HF `config.json`; `source_name` (usually the file path) is named in
/// every error.
pub fn parse_config_str(json: &str, source_name: &str) -> Result<DecoderConfig> {
    let value: Value = serde_json::from_str(json).map_err(|e| err(source_name, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(err(source_name, "config.json must be a JSON object"));
    };
    let r = Reader { obj, src: source_name };
    let family = r.family()?;
    if r.present("quantization_config") {
        return Err(err(source_name, "quantization_config is present: quantized (GPTQ/AWQ/bitsandbytes) checkpoints are not supported"));
    }
    if let Some(tp) = r.opt_usize("pretraining_tp")? {
        if tp > 1 {
            return Err(err(source_name, format!("pretraining_tp = {tp} is not supported (only 1)")));
        }
    }
    let mut cfg = (family.from_hf)(&r)?;
    cfg.family = family.name.to_string();
    cfg.source_json = Some(value.clone());
    cfg.validate().map_err(|e| err(source_name, format!("inconsistent config: {e}")))?;
    Ok(cfg)
}

pub(crate) fn err(src: &str, msg: impl Into<String>) -> Error {
    Error::Format { path: src.into(), msg: msg.into() }
}

impl<'a> Reader<'a> {
    pub(crate) fn err(&self, msg: impl Into<String>) -> Error {
        err(self.src, msg)
    }

    /// `architectures[0]` decides; `model_type` is used when it is absent. Both present and
    /// naming different families is an error.
    fn family(&self) -> Result<&'static Family> {
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
        let supported = families::supported_architectures().join(", ");
        let from_arch = match arch {
            Some(a) => Some(
                families::by_architecture(a)
                    .ok_or_else(|| self.err(format!("architecture `{a}` (architectures[0]) is not supported; supported: {supported}")))?,
            ),
            None => None,
        };
        let from_type = match model_type {
            Some(t) => {
                let f = families::by_model_type(t);
                if f.is_none() && from_arch.is_none() {
                    return Err(self.err(format!("model_type `{t}` is not supported; supported: {supported}")));
                }
                f
            }
            None => None,
        };
        match (from_arch, from_type) {
            (Some(a), Some(t)) if a.name != t.name => {
                Err(self.err(format!("architectures[0] `{}` and model_type `{}` name different architectures", arch.unwrap_or(""), model_type.unwrap_or(""))))
            }
            (Some(a), _) => Ok(a),
            (None, Some(t)) => Ok(t),
            (None, None) => Err(self.err(format!("missing required key `architectures` (or `model_type`); supported: {supported}"))),
        }
    }

    /// The sizes, norm epsilon, tied embeddings and global RoPE every decoder config has.
    pub(crate) fn base(&self) -> Result<DecoderConfig> {
        let hidden_size = self.req_usize("hidden_size")?;
        let num_attention_heads = self.req_usize("num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(self.err("num_attention_heads must be > 0"));
        }
        let head_dim = match self.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(
                    self.err(format!("head_dim is absent and hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})"))
                )
            }
        };
        let rms_norm_eps = self.req_f64("rms_norm_eps")?;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(self.err(format!("rms_norm_eps must be finite and > 0, got {rms_norm_eps}")));
        }
        let max_position_embeddings = self.req_usize("max_position_embeddings")?;
        Ok(DecoderConfig {
            vocab_size: self.req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: self.req_usize("intermediate_size")?,
            num_hidden_layers: self.req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: self.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps,
            max_position_embeddings,
            tie_word_embeddings: self.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            rope: self.rope(None)?,
            ..DecoderConfig::default()
        })
    }

    /// RoPE from `rope_parameters` (for `layer_type` when it is keyed by layer type, as Gemma
    /// 3's is) or from `rope_theta` + `rope_scaling`. The partial rotary factor may sit at the
    /// top level or inside the parameters.
    pub(crate) fn rope(&self, layer_type: Option<&str>) -> Result<RopeConfig> {
        let max_pos = self.opt_usize("max_position_embeddings")?.map(|m| m as f64);
        let params = match (self.rope_parameters()?, layer_type) {
            (Some(m), Some(lt)) if m.get(lt).is_some_and(|v| v.is_object()) => m.get(lt).and_then(|v| v.as_object()),
            (Some(m), _) if m.values().any(|v| v.is_object()) && !m.contains_key("rope_type") => {
                let lt = layer_type.unwrap_or("full_attention");
                Some(m.get(lt).and_then(|v| v.as_object()).ok_or_else(|| self.err(format!("rope_parameters has no entry for layer type `{lt}`")))?)
            }
            (Some(m), _) => Some(m),
            (None, _) => None,
        };
        // The key the scaling comes from, named in every error.
        let (key, mut scaling_map) = match (params, self.get("rope_scaling")) {
            (Some(m), _) => ("rope_parameters", m.clone()),
            (None, Some(Value::Object(m))) => {
                if !m.contains_key("rope_type") && !m.contains_key("type") {
                    return Err(self.err(format!("rope_scaling = {} has no rope_type (or type): which scaling is meant is unknown", Value::Object(m.clone()))));
                }
                ("rope_scaling", m.clone())
            }
            (None, None) => ("rope_scaling", Map::new()),
            (None, Some(v)) => return Err(self.type_err("rope_scaling", "null or an object", v)),
        };
        // Phi-3 keeps the original context at the top level.
        if !scaling_map.contains_key("original_max_position_embeddings") {
            if let Some(v) = self.get("original_max_position_embeddings") {
                scaling_map.insert("original_max_position_embeddings".into(), v.clone());
            }
        }
        let scaling = RopeScaling::from_params(&scaling_map, max_pos).map_err(|e| self.err(format!("{key}: {e}")))?;
        let theta = match params.and_then(|m| m.get("rope_theta")).filter(|v| !v.is_null()) {
            Some(v) => {
                let nested = v.as_f64().filter(|t| t.is_finite() && *t > 0.0).ok_or_else(|| self.type_err("rope_parameters.rope_theta", "a number > 0", v))?;
                match self.opt_f64("rope_theta")? {
                    Some(top) if top != nested => {
                        return Err(self.err(format!("rope_theta ({top}) and rope_parameters.rope_theta ({nested}) disagree")));
                    }
                    _ => nested,
                }
            }
            None => self.rope_theta()?,
        };
        let factor = |v: &Value| v.as_f64().filter(|f| *f > 0.0 && *f <= 1.0).ok_or_else(|| self.type_err("partial_rotary_factor", "a number in (0, 1]", v));
        let nested = params.and_then(|m| m.get("partial_rotary_factor")).filter(|v| !v.is_null()).map(factor).transpose()?;
        let top = self.get("partial_rotary_factor").map(factor).transpose()?;
        let prf = match (top, nested) {
            (Some(a), Some(b)) if a != b => {
                return Err(self.err(format!("partial_rotary_factor ({a}) and rope_parameters.partial_rotary_factor ({b}) disagree")));
            }
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => 1.0,
        };
        Ok(RopeConfig { theta, scaling, partial_rotary_factor: prf })
    }

    /// The sliding window of each layer: from `layer_types` ("sliding_attention" /
    /// "full_attention") when given, else `default_sliding(layer)`; the window itself is
    /// `sliding_window`. Empty when no layer slides.
    pub(crate) fn layer_windows(&self, layers: usize, window: Option<usize>, default_sliding: impl Fn(usize) -> bool) -> Result<Vec<Option<usize>>> {
        let Some(w) = window else { return Ok(Vec::new()) };
        let sliding: Vec<bool> = match self.get("layer_types") {
            Some(Value::Array(a)) => {
                if a.len() != layers {
                    return Err(self.err(format!("layer_types has {} entries for {layers} layers", a.len())));
                }
                a.iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(self.err(format!("layer_types entry {t} is not supported (sliding_attention or full_attention)"))),
                    })
                    .collect::<Result<_>>()?
            }
            Some(v) => return Err(self.type_err("layer_types", "a list of strings", v)),
            None => (0..layers).map(default_sliding).collect(),
        };
        Ok(if sliding.iter().any(|s| *s) { sliding.into_iter().map(|s| s.then_some(w)).collect() } else { Vec::new() })
    }

    /// `hidden_act` (or Gemma's `hidden_activation`) must be one of `allowed`.
    pub(crate) fn activation(&self, key: &str, default: &'static str, allowed: &[&str]) -> Result<&'a str> {
        let act = self.opt_str(key)?.unwrap_or(default);
        if allowed.contains(&act) {
            Ok(act)
        } else {
            Err(self.err(format!("{key} = {act:?} is not supported (supported: {})", allowed.join(", "))))
        }
    }

    /// Errors when `key` is true (a feature the family does not implement).
    pub(crate) fn refuse_true(&self, key: &str, why: &str) -> Result<()> {
        if self.opt_bool(key)? == Some(true) {
            return Err(self.err(format!("{key} = true is not supported ({why})")));
        }
        Ok(())
    }
}

/// The config.json keys every family writes (sizes, RoPE in the layout both transformers 4.x and
/// 5.x read: `rope_theta` + `rope_scaling`).
pub(crate) fn base_json(cfg: &DecoderConfig, architecture: &str, model_type: &str) -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("architectures", serde_json::json!([architecture]));
    put("model_type", model_type.into());
    put("vocab_size", cfg.vocab_size.into());
    put("hidden_size", cfg.hidden_size.into());
    put("intermediate_size", cfg.intermediate_size.into());
    put("num_hidden_layers", cfg.num_hidden_layers.into());
    put("num_attention_heads", cfg.num_attention_heads.into());
    put("num_key_value_heads", cfg.num_key_value_heads.into());
    put("head_dim", cfg.head_dim.into());
    put("max_position_embeddings", cfg.max_position_embeddings.into());
    put("rms_norm_eps", cfg.rms_norm_eps.into());
    put("rope_theta", cfg.rope.theta.into());
    put("rope_scaling", cfg.rope.scaling.to_json());
    if cfg.rope.partial_rotary_factor != 1.0 {
        put("partial_rotary_factor", cfg.rope.partial_rotary_factor.into());
    }
    put("tie_word_embeddings", cfg.tie_word_embeddings.into());
    put("attention_dropout", 0.0.into());
    put("initializer_range", 0.02.into());
    put("use_cache", true.into());
    put("torch_dtype", "float32".into());
    m
}

/// The sliding window of the first sliding layer, if any.
pub(crate) fn any_window(cfg: &DecoderConfig) -> Option<usize> {
    cfg.layer_windows.iter().flatten().next().copied()
}

/// `layer_types` for the writer.
pub(crate) fn layer_types_json(cfg: &DecoderConfig) -> Value {
    (0..cfg.num_hidden_layers).map(|l| Value::from(if cfg.window(l).is_some() { "sliding_attention" } else { "full_attention" })).collect()
}

/// Typed access to the top-level keys; `null` counts as absent (HF writes `"head_dim": null`).
pub struct Reader<'a> {
    obj: &'a Map<String, Value>,
    src: &'a str,
}

impl<'a> Reader<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    pub(crate) fn present(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
    pub(crate) fn type_err(&self, key: &str, want: &str, v: &Value) -> Error {
        err(self.src, format!("key `{key}` must be {want}, got {v}"))
    }
    pub(crate) fn missing(&self, key: &str) -> Error {
        err(self.src, format!("missing required key `{key}`"))
    }
    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| as_usize(v).ok_or_else(|| self.type_err(key, "a non-negative integer", v))).transpose()
    }
    pub(crate) fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.type_err(key, "a number", v))).transpose()
    }
    pub(crate) fn req_f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }
    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.type_err(key, "true or false", v))).transpose()
    }
    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.type_err(key, "a string", v))).transpose()
    }

    pub(crate) fn rope_parameters(&self) -> Result<Option<&'a Map<String, Value>>> {
        match self.get("rope_parameters") {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.type_err("rope_parameters", "an object", v)),
        }
    }

    /// θ from `rope_theta` or `rope_parameters.rope_theta` (they must agree when both are given).
    pub(crate) fn rope_theta(&self) -> Result<f64> {
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
}

/// A JSON number that is a non-negative integer (also accepts `4096.0`).
fn as_usize(v: &Value) -> Option<usize> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).ok();
    }
    let f = v.as_f64()?;
    (f >= 0.0 && f.fract() == 0.0 && f <= usize::MAX as f64).then_some(f as usize)
}
