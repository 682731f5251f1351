//! Gemma 2 (`Gemma2ForCausalLM`): norms scale by 1 + w and sit before and after both attention
//! and the MLP; GeGLU (tanh GELU); embeddings × √hidden; attention scores scaled by
//! `query_pre_attn_scalar`^−½ and soft-capped (`attn_logit_softcapping`), final logits
//! soft-capped (`final_logit_softcapping`); every other layer (even ones, or `layer_types`)
//! attends over `sliding_window` keys.

use serde_json::Value;

use super::Family;
use crate::error::Result;
use crate::model::config::{any_window, base_json, layer_types_json, Reader};
use crate::model::decoder::DecoderConfig;
use crate::model::gguf::GgufMeta;
use crate::model::gguf::GEMMA_LAYER_NAMES;
use crate::nn::GatedAct;

pub static FAMILY: Family = Family {
    name: "gemma2",
    architecture: "Gemma2ForCausalLM",
    model_types: &["gemma2"],
    gguf_arch: Some("gemma2"),
    gguf_permutes_qk: false,
    gguf_names: GEMMA_LAYER_NAMES,
    from_gguf: Some(from_gguf),
    from_hf,
    to_hf,
};

/// The switches Gemma 2 and 3 share.
pub(crate) fn gemma_base(r: &Reader) -> Result<DecoderConfig> {
    // Gemma names the activation `hidden_activation` (older files: `hidden_act`).
    let key = if r.present("hidden_activation") { "hidden_activation" } else { "hidden_act" };
    r.activation(key, "gelu_pytorch_tanh", &["gelu_pytorch_tanh"])?;
    let mut c = r.base()?;
    c.tie_word_embeddings = r.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    c.act = GatedAct::GeluTanh;
    c.norm_plus_one = true;
    c.sandwich_norms = true;
    c.embed_scale = Some((c.hidden_size as f64).sqrt());
    c.attn_scale = Some(r.opt_f64("query_pre_attn_scalar")?.unwrap_or(c.head_dim as f64).powf(-0.5));
    c.attn_softcap = r.opt_f64("attn_logit_softcapping")?;
    c.final_softcap = r.opt_f64("final_logit_softcapping")?;
    let bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    (c.qkv_bias, c.o_bias) = (bias, bias);
    r.refuse_true("use_bidirectional_attention", "bidirectional attention")?;
    Ok(c)
}

/// The writer keys Gemma 2 and 3 share.
pub(crate) fn gemma_json(c: &DecoderConfig, m: &mut serde_json::Map<String, Value>) {
    m.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    m.insert("query_pre_attn_scalar".into(), c.attn_scale.map(|s| s.powi(-2)).unwrap_or(c.head_dim as f64).into());
    m.insert("attn_logit_softcapping".into(), c.attn_softcap.into());
    m.insert("final_logit_softcapping".into(), c.final_softcap.into());
    m.insert("attention_bias".into(), c.o_bias.into());
    m.insert("sliding_window".into(), any_window(c).into());
    m.insert("layer_types".into(), layer_types_json(c));
}

fn from_hf(r: &Reader) -> Result<DecoderConfig> {
    let mut c = gemma_base(r)?;
    c.layer_windows = r.layer_windows(c.num_hidden_layers, r.opt_usize("sliding_window")?, |l| l % 2 == 0)?;
    Ok(c)
}

fn to_hf(c: &DecoderConfig) -> Value {
    let mut m = base_json(c, "Gemma2ForCausalLM", "gemma2");
    gemma_json(c, &mut m);
    Value::Object(m)
}

/// The GGUF switches Gemma 2 and 3 share: 1 + w norms (the reader subtracts the converter's
/// 1), sandwich norms, tanh-GELU, embeddings × √hidden, tied head, and llama.cpp's attention
/// scale: head_dim^−½, or (hidden / heads)^−½ for the 27B sizes (`big_layers` layers) — the
/// converter does not write `query_pre_attn_scalar`.
pub(crate) fn gemma_gguf_base(m: &GgufMeta, big_layers: usize) -> Result<DecoderConfig> {
    let mut c = m.base()?;
    c.act = GatedAct::GeluTanh;
    c.norm_plus_one = true;
    c.sandwich_norms = true;
    c.embed_scale = Some((c.hidden_size as f64).sqrt());
    let scalar = if c.num_hidden_layers == big_layers { c.hidden_size / c.num_attention_heads } else { c.head_dim };
    c.attn_scale = Some((scalar as f64).powf(-0.5));
    if !c.tie_word_embeddings {
        return Err(m.err("tensor `output.weight` present: Gemma ties the output head to `token_embd.weight`"));
    }
    Ok(c)
}

/// A soft-cap from `{arch}.<suffix>` (llama.cpp's default when absent; 0 = none).
pub(crate) fn softcap(m: &GgufMeta, suffix: &str, default: f64) -> Result<Option<f64>> {
    let v = m.opt_f64(suffix)?.unwrap_or(default);
    if !(v.is_finite() && v >= 0.0) {
        return Err(m.err(format!("metadata `{}` = {v}, expected a finite number >= 0", m.key(suffix))));
    }
    Ok((v > 0.0).then_some(v))
}

/// llama.cpp's `gemma2`: soft-caps (`attn_logit_softcapping`, `final_logit_softcapping`;
/// llama.cpp's defaults 50 and 30 when absent), every other layer sliding (even ones, unless
/// `attention.sliding_window_pattern`) over `attention.sliding_window` keys (default 4096).
fn from_gguf(m: &GgufMeta) -> Result<DecoderConfig> {
    let mut c = gemma_gguf_base(m, 46)?;
    c.attn_softcap = softcap(m, "attn_logit_softcapping", 50.0)?;
    c.final_softcap = softcap(m, "final_logit_softcapping", 30.0)?;
    let window = m.opt_usize("attention.sliding_window")?.unwrap_or(4096);
    if window == 0 {
        return Err(m.err(format!("metadata `{}` is 0", m.key("attention.sliding_window"))));
    }
    c.layer_windows = m.swa_layers(c.num_hidden_layers, 2)?.into_iter().map(|s| s.then_some(window)).collect();
    Ok(c)
}
