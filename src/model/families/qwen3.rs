//! Qwen3 (`Qwen3ForCausalLM`): Qwen2's layout with a per-head RMSNorm of q and k before RoPE
//! (`q_norm`, `k_norm`, of size head_dim), no fixed q/k/v bias (`attention_bias` biases q, k, v and o).

use serde_json::Value;

use super::qwen2::{qwen_json, qwen_windows};
use super::Family;
use crate::error::Result;
use crate::model::config::{base_json, Reader};
use crate::model::decoder::DecoderConfig;
use crate::model::gguf::GgufMeta;
use crate::model::gguf::LLAMA_LAYER_NAMES;

pub static FAMILY: Family = Family {
    name: "qwen3",
    architecture: "Qwen3ForCausalLM",
    model_types: &["qwen3"],
    gguf_arch: Some("qwen3"),
    gguf_permutes_qk: false,
    gguf_names: LLAMA_LAYER_NAMES,
    from_gguf: Some(from_gguf),
    from_hf,
    to_hf,
};

fn from_hf(r: &Reader) -> Result<DecoderConfig> {
    r.activation("hidden_act", "silu", &["silu", "swish"])?;
    let mut c = r.base()?;
    c.qk_norm = true;
    let bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    (c.qkv_bias, c.o_bias) = (bias, bias);
    c.layer_windows = qwen_windows(r, c.num_hidden_layers)?;
    Ok(c)
}

fn to_hf(c: &DecoderConfig) -> Value {
    let mut m = base_json(c, "Qwen3ForCausalLM", "qwen3");
    qwen_json(c, &mut m);
    m.insert("attention_bias".into(), c.o_bias.into());
    Value::Object(m)
}

/// llama.cpp's `qwen3`: q/k norms always; biases by tensor presence.
fn from_gguf(m: &GgufMeta) -> Result<DecoderConfig> {
    let mut c = m.base()?;
    c.qk_norm = true;
    c.qkv_bias = m.has_tensor("blk.0.attn_q.bias");
    c.o_bias = m.has_tensor("blk.0.attn_output.bias");
    Ok(c)
}
