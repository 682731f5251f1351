//! GGUF metadata (`{arch}.*` keys written by llama.cpp's converter) → [`DecoderConfig`].
//! The tensors themselves come through [`GgufFile::hf_tensor`], which maps llama.cpp's names to
//! HF's and undoes the converter's q/k row permutation where the architecture has it.

use super::decoder::{DecoderConfig, RopeConfig};
use crate::error::Result;
use crate::io::gguf::GgufFile;

/// The model config from `{arch}.*` metadata (arch = llama, mistral or qwen2) and the tensor
/// table: vocab from `token_embd.weight`, tied embeddings when `output.weight` is absent,
/// q/k/v biases when `blk.0.attn_q.bias` is present.
pub fn gguf_config(g: &GgufFile) -> Result<DecoderConfig> {
    let arch = g.architecture()?;
    if !matches!(arch, "llama" | "mistral" | "qwen2") {
        return Err(g.err(format!("metadata `general.architecture` is {arch:?}; spectune reads llama, mistral and qwen2 models")));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let need = |s: &str| -> Result<usize> {
        let key = k(s);
        let v = g.meta_usize(&key)?;
        g.required(&key, v, "needed for the model config")
    };
    let hidden = need("embedding_length")?;
    let layers = need("block_count")?;
    let ffn = need("feed_forward_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = g.meta_usize(&k("attention.head_count_kv"))?.unwrap_or(heads);
    let eps_key = k("attention.layer_norm_rms_epsilon");
    let eps = g.meta_config_f64(&eps_key)?;
    let eps = g.required(&eps_key, eps, "needed for the model config")?;
    let theta = g.meta_config_f64(&k("rope.freq_base"))?.unwrap_or(10000.0);
    let ctx = need("context_length")?;
    if heads == 0 {
        return Err(g.err(format!("metadata `{}` is 0", k("attention.head_count"))));
    }
    let head_dim = match g.meta_usize(&k("attention.key_length"))? {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => return Err(g.err(format!("embedding_length {hidden} is not a multiple of head_count {heads} and `{}` is missing", k("attention.key_length")))),
    };
    if let Some(vl) = g.meta_usize(&k("attention.value_length"))? {
        if vl != head_dim {
            return Err(
                g.err(format!("metadata `{}` = {vl} differs from the key length {head_dim}; spectune needs equal head sizes", k("attention.value_length")))
            );
        }
    }
    let scaling_key = k("rope.scaling.type");
    if let Some(s) = g.meta_str(&scaling_key)? {
        if s != "none" {
            return Err(g.err(format!("metadata `{scaling_key}` is {s:?}: rope scaling is not supported (expected absent or \"none\")")));
        }
    }
    if g.tensor_info("rope_freqs.weight").is_some() {
        return Err(g.err("tensor `rope_freqs.weight` present: per-frequency rope scaling (Llama 3.1 style) is not supported"));
    }
    let embd = g
        .tensor_info("token_embd.weight")
        .ok_or_else(|| g.err("no tensor `token_embd.weight` (HF `model.embed_tokens.weight`), needed for the vocabulary size"))?;
    if embd.dims.len() != 2 || embd.dims[1] != hidden {
        return Err(g.err(format!("tensor `token_embd.weight` has shape {:?}, expected [vocab, {hidden}]", embd.dims)));
    }
    let vocab_size = embd.dims[0];
    if let Some(v) = g.meta_usize(&k("vocab_size"))? {
        if v != vocab_size {
            return Err(g.err(format!("metadata `{}` = {v} but tensor `token_embd.weight` has {vocab_size} rows", k("vocab_size"))));
        }
    }
    let qkv_bias = g.tensor_info("blk.0.attn_q.bias").is_some();
    // q/k/v-only biases are the Qwen2 layout (a Llama config cannot express them).
    let family = if arch == "qwen2" || qkv_bias { "qwen2" } else { "llama" };

    let cfg = DecoderConfig {
        family: family.into(),
        vocab_size,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: eps,
        rope: RopeConfig { theta, ..RopeConfig::default() },
        tie_word_embeddings: g.tensor_info("output.weight").is_none(),
        qkv_bias,
        max_position_embeddings: ctx,
        ..DecoderConfig::default()
    };
    cfg.validate().map_err(|e| g.err(format!("model config from metadata: {e}")))?;
    Ok(cfg)
}
