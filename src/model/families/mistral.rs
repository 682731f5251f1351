//! Mistral (`MistralForCausalLM`): the Llama graph without biases, every layer attending over a
//! sliding window of `sliding_window` keys when it is set.

use serde_json::Value;

use super::Family;
use crate::error::Result;
use crate::model::config::{any_window, base_json, Reader};
use crate::model::decoder::DecoderConfig;
use crate::model::gguf::LLAMA_LAYER_NAMES;

pub static FAMILY: Family = Family {
    name: "mistral",
    architecture: "MistralForCausalLM",
    model_types: &["mistral"],
    // llama.cpp writes Mistral 7B as `llama`.
    gguf_arch: None,
    gguf_permutes_qk: true,
    gguf_names: LLAMA_LAYER_NAMES,
    from_gguf: None,
    from_hf,
    to_hf,
};

fn from_hf(r: &Reader) -> Result<DecoderConfig> {
    r.activation("hidden_act", "silu", &["silu", "swish"])?;
    let mut c = r.base()?;
    c.layer_windows = r.layer_windows(c.num_hidden_layers, r.opt_usize("sliding_window")?, |_| true)?;
    Ok(c)
}

fn to_hf(c: &DecoderConfig) -> Value {
    let mut m = base_json(c, "MistralForCausalLM", "mistral");
    m.insert("hidden_act".into(), "silu".into());
    m.insert("sliding_window".into(), any_window(c).into());
    Value::Object(m)
}
