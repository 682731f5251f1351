//! Gemma 3 text (`Gemma3ForCausalLM`): Gemma 2's layout plus a per-head q/k RMSNorm (1 + w);
//! sliding-window layers from `layer_types` (older files: every `sliding_window_pattern`-th layer
//! is global) with their own RoPE (`rope_parameters.sliding_attention`, or the older
//! `rope_local_base_freq`), global layers with theirs (often linearly scaled).

use serde_json::Value;

use super::gemma2::{gemma_base, gemma_json};
use super::gemma2::{gemma_gguf_base, softcap};
use super::Family;
use crate::error::Result;
use crate::model::config::{base_json, Reader};
use crate::model::decoder::{DecoderConfig, RopeConfig};
use crate::model::gguf::GgufMeta;
use crate::model::gguf::GEMMA_LAYER_NAMES;

pub static FAMILY: Family = Family {
    name: "gemma3",
    architecture: "Gemma3ForCausalLM",
    model_types: &["gemma3_text"],
    gguf_arch: Some("gemma3"),
    gguf_permutes_qk: false,
    gguf_names: GEMMA_LAYER_NAMES,
    from_gguf: Some(from_gguf),
    from_hf,
    to_hf,
};

fn from_hf(r: &Reader) -> Result<DecoderConfig> {
    let mut c = gemma_base(r)?;
    c.qk_norm = true;
    let pattern = r.opt_usize("sliding_window_pattern")?.or(r.opt_usize("_sliding_window_pattern")?).unwrap_or(6).max(1);
    c.layer_windows = r.layer_windows(c.num_hidden_layers, r.opt_usize("sliding_window")?, |l| (l + 1) % pattern != 0)?;
    c.rope = r.rope(Some("full_attention"))?;
    let local = match r.opt_f64("rope_local_base_freq")? {
        Some(theta) if !r.present("rope_parameters") => RopeConfig { theta, ..RopeConfig::default() },
        _ => r.rope(Some("sliding_attention"))?,
    };
    c.rope_local = Some(local);
    Ok(c)
}

fn to_hf(c: &DecoderConfig) -> Value {
    let mut m = base_json(c, "Gemma3ForCausalLM", "gemma3_text");
    gemma_json(c, &mut m);
    if let Some(l) = &c.rope_local {
        m.insert("rope_local_base_freq".into(), l.theta.into());
    }
    Value::Object(m)
}

/// llama.cpp's `gemma3`: Gemma 2's layout with q/k norms, no attention soft-cap, a final one
/// only when written; with `attention.sliding_window` > 0, five layers of every six slide
/// (unless `attention.sliding_window_pattern`) with their own RoPE base (`rope.freq_base_swa`,
/// default 10000, unscaled); the global layers use `rope.freq_base` and the rope scaling.
/// The converter does not write HF's `layer_types`: a model whose layers do not follow the
/// pattern reads as llama.cpp runs it.
fn from_gguf(m: &GgufMeta) -> Result<DecoderConfig> {
    let mut c = gemma_gguf_base(m, 62)?;
    c.qk_norm = true;
    c.final_softcap = softcap(m, "final_logit_softcapping", 0.0)?;
    if let Some(w) = m.sliding_window()? {
        c.layer_windows = m.swa_layers(c.num_hidden_layers, 6)?.into_iter().map(|s| s.then_some(w)).collect();
        let theta = m.opt_f64("rope.freq_base_swa")?.unwrap_or(10000.0);
        c.rope_local = Some(RopeConfig { theta, partial_rotary_factor: c.rope.partial_rotary_factor, ..RopeConfig::default() });
    }
    Ok(c)
}
