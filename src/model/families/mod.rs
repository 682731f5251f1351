//! One file per decoder family: how its config.json (and GGUF metadata) maps onto the switches of
//! [`DecoderConfig`], and its config writer. The graph and the weight paths live once in
//! [`super::decoder`]. Adding a family: a file here and its line in [`FAMILIES`].

use serde_json::Value;

use super::config::Reader;
use super::decoder::DecoderConfig;
use super::gguf::GgufMeta;
use crate::error::Result;

pub mod gemma2;
pub mod gemma3;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;

/// A decoder family.
pub struct Family {
    /// Short name (`DecoderConfig::family`).
    pub name: &'static str,
    /// HF `architectures[0]`.
    pub architecture: &'static str,
    /// HF `model_type` values.
    pub model_types: &'static [&'static str],
    /// llama.cpp's `general.architecture`, when llama.cpp writes this family.
    pub gguf_arch: Option<&'static str>,
    /// Whether llama.cpp's converter permutes the q/k rows for this architecture (so readers
    /// undo it and adapter writers apply it).
    pub gguf_permutes_qk: bool,
    /// HF layer module names → llama.cpp's (`self_attn.q_proj` → `attn_q`), see
    /// [`super::gguf`].
    pub gguf_names: &'static [(&'static str, &'static str)],
    /// GGUF metadata (`{arch}.*`) and tensor table → switches; `None` when files of this family
    /// carry another family's architecture (Mistral is written as `llama`).
    pub from_gguf: Option<fn(&GgufMeta) -> Result<DecoderConfig>>,
    /// config.json → switches.
    pub from_hf: fn(&Reader) -> Result<DecoderConfig>,
    /// switches → config.json (for models that did not come with one, e.g. from GGUF).
    pub to_hf: fn(&DecoderConfig) -> Value,
}

/// Every supported family.
pub static FAMILIES: [&Family; 7] = [&llama::FAMILY, &mistral::FAMILY, &qwen2::FAMILY, &qwen3::FAMILY, &gemma2::FAMILY, &gemma3::FAMILY, &phi3::FAMILY];

pub fn by_name(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.name == name)
}
pub fn by_architecture(a: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.architecture == a)
}
pub fn by_model_type(t: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.model_types.contains(&t))
}
pub fn by_gguf_arch(a: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.gguf_arch == Some(a))
}
/// The `architectures[0]` values [`super::config::parse_config`] accepts.
pub fn supported_architectures() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.architecture).collect()
}

/// The config.json of `cfg`: the source's own (dtype set to the f32 a merge writes), else the
/// family's writer.
pub fn config_json(cfg: &DecoderConfig) -> Value {
    if let Some(Value::Object(m)) = &cfg.source_json {
        let mut m = m.clone();
        m.insert("torch_dtype".into(), "float32".into());
        if m.contains_key("dtype") {
            m.insert("dtype".into(), "float32".into());
        }
        return Value::Object(m);
    }
    match by_name(&cfg.family) {
        Some(f) => (f.to_hf)(cfg),
        None => (llama::FAMILY.to_hf)(cfg),
    }
}
