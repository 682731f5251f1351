//! Llama 2 / 3 / 3.1 / 3.2 (`LlamaForCausalLM`; SmolLM too): the plain decoder. `attention_bias`
//! puts a bias on q, k, v and o; `mlp_bias` on gate, up and down; RoPE scaling of any supported
//! type (Llama 3.x: `llama3`). HF's Llama has no sliding window (the key is ignored there).

use serde_json::Value;

use super::Family;
use crate::error::Result;
use crate::model::config::{base_json, Reader};
use crate::model::decoder::DecoderConfig;
use crate::model::gguf::GgufMeta;
use crate::model::gguf::LLAMA_LAYER_NAMES;

pub static FAMILY: Family = Family {
    name: "llama",
    architecture: "LlamaForCausalLM",
    model_types: &["llama"],
    gguf_arch: Some("llama"),
    gguf_permutes_qk: true,
    gguf_names: LLAMA_LAYER_NAMES,
    from_gguf: Some(from_gguf),
    from_hf,
    to_hf,
};

fn from_hf(r: &Reader) -> Result<DecoderConfig> {
    r.activation("hidden_act", "silu", &["silu", "swish"])?;
    let mut c = r.base()?;
    let bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    (c.qkv_bias, c.o_bias) = (bias, bias);
    c.mlp_bias = r.opt_bool("mlp_bias")?.unwrap_or(false);
    Ok(c)
}

fn to_hf(c: &DecoderConfig) -> Value {
    let mut m = base_json(c, "LlamaForCausalLM", "llama");
    m.insert("hidden_act".into(), "silu".into());
    m.insert("attention_bias".into(), c.o_bias.into());
    m.insert("mlp_bias".into(), c.mlp_bias.into());
    m.insert("pretraining_tp".into(), 1.into());
    Value::Object(m)
}

/// llama.cpp's `llama` (Llama and Mistral): biases by tensor presence (`attn_q.bias`,
/// `attn_output.bias`, `ffn_gate.bias`); no sliding window (llama.cpp's Llama has none, and the
/// converter does not write Mistral's).
fn from_gguf(m: &GgufMeta) -> Result<DecoderConfig> {
    let mut c = m.base()?;
    c.qkv_bias = m.has_tensor("blk.0.attn_q.bias");
    c.o_bias = m.has_tensor("blk.0.attn_output.bias");
    c.mlp_bias = m.has_tensor("blk.0.ffn_gate.bias");
    Ok(c)
}
