//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): q/k/v always biased (o not); with
//! `use_sliding_window`, layers from `max_window_layers` on (or those `layer_types` names) attend
//! over `sliding_window` keys.

use serde_json::Value;

use super::Family;
use crate::error::Result;
use crate::model::config::{any_window, base_json, layer_types_json, Reader};
use crate::model::decoder::DecoderConfig;
use crate::model::gguf::GgufMeta;
use crate::model::gguf::LLAMA_LAYER_NAMES;

pub static FAMILY: Family = Family {
    name: "qwen2",
    architecture: "Qwen2ForCausalLM",
    model_types: &["qwen2"],
    gguf_arch: Some("qwen2"),
    gguf_permutes_qk: false,
    gguf_names: LLAMA_LAYER_NAMES,
    from_gguf: Some(from_gguf),
    from_hf,
    to_hf,
};

/// Qwen2/Qwen3 sliding layers: `use_sliding_window` turns `sliding_window` on for layers
/// i ≥ `max_window_layers` (default 28) unless `layer_types` says otherwise.
pub(crate) fn qwen_windows(r: &Reader, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = if r.opt_bool("use_sliding_window")?.unwrap_or(false) { r.opt_usize("sliding_window")? } else { None };
    let from = r.opt_usize("max_window_layers")?.unwrap_or(28);
    r.layer_windows(layers, window, |l| l >= from)
}

fn from_hf(r: &Reader) -> Result<DecoderConfig> {
    r.activation("hidden_act", "silu", &["silu", "swish"])?;
    let mut c = r.base()?;
    c.qkv_bias = true;
    c.layer_windows = qwen_windows(r, c.num_hidden_layers)?;
    Ok(c)
}

/// The Qwen keys shared with Qwen3.
pub(crate) fn qwen_json(c: &DecoderConfig, m: &mut serde_json::Map<String, Value>) {
    m.insert("hidden_act".into(), "silu".into());
    m.insert("use_sliding_window".into(), any_window(c).is_some().into());
    m.insert("sliding_window".into(), any_window(c).into());
    m.insert("max_window_layers".into(), (0..c.num_hidden_layers).find(|&l| c.window(l).is_some()).unwrap_or(c.num_hidden_layers).into());
    m.insert("layer_types".into(), layer_types_json(c));
}

fn to_hf(c: &DecoderConfig) -> Value {
    let mut m = base_json(c, "Qwen2ForCausalLM", "qwen2");
    qwen_json(c, &mut m);
    Value::Object(m)
}

/// llama.cpp's `qwen2`: q/k/v biases always (a missing one is reported by name), no sliding
/// window (the converter does not write Qwen2's).
fn from_gguf(m: &GgufMeta) -> Result<DecoderConfig> {
    let mut c = m.base()?;
    c.qkv_bias = true;
    Ok(c)
}
