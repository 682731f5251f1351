//! Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`): one fused `qkv_proj` (rows q, k, v) and one
//! fused `gate_up_proj` (rows gate, up); LongRoPE (short factors up to the original context,
//! long beyond) and an optional partial rotary factor; every layer slides when `sliding_window`
//! is set.

use serde_json::Value;

use super::Family;
use crate::error::Result;
use crate::model::config::{any_window, base_json, Reader};
use crate::model::decoder::DecoderConfig;
use crate::model::gguf::GgufMeta;
use crate::model::gguf::PHI3_LAYER_NAMES;
use crate::nn::RopeScaling;

pub static FAMILY: Family = Family {
    name: "phi3",
    architecture: "Phi3ForCausalLM",
    model_types: &["phi3"],
    gguf_arch: Some("phi3"),
    gguf_permutes_qk: false,
    gguf_names: PHI3_LAYER_NAMES,
    from_gguf: Some(from_gguf),
    from_hf,
    to_hf,
};

fn from_hf(r: &Reader) -> Result<DecoderConfig> {
    r.activation("hidden_act", "silu", &["silu", "swish"])?;
    let mut c = r.base()?;
    (c.fused_qkv, c.fused_gate_up) = (true, true);
    c.layer_windows = r.layer_windows(c.num_hidden_layers, r.opt_usize("sliding_window")?, |_| true)?;
    Ok(c)
}

fn to_hf(c: &DecoderConfig) -> Value {
    let mut m = base_json(c, "Phi3ForCausalLM", "phi3");
    m.insert("hidden_act".into(), "silu".into());
    m.insert("sliding_window".into(), any_window(c).into());
    if let RopeScaling::LongRope { original_max_position_embeddings, .. } = &c.rope.scaling {
        m.insert("original_max_position_embeddings".into(), (*original_max_position_embeddings as usize).into());
    }
    Value::Object(m)
}

/// llama.cpp's `phi3`: fused `attn_qkv` (rows q, k, v) and `ffn_up` (rows gate, up, as in
/// HF); LongRoPE from the factor tensors (read by [`GgufMeta::base`]);
/// `attention.sliding_window` > 0 makes every layer slide, as
/// in transformers (llama.cpp currently ignores Phi-3's window).
fn from_gguf(m: &GgufMeta) -> Result<DecoderConfig> {
    let mut c = m.base()?;
    (c.fused_qkv, c.fused_gate_up) = (true, true);
    if let Some(w) = m.sliding_window()? {
        c.layer_windows = vec![Some(w); c.num_hidden_layers];
    }
    Ok(c)
}
