//! Shared by the integration tests.

use spectune::model::{DecoderConfig, RopeConfig};

/// A 2-layer Llama-style config small enough for finite differences: hidden 16, FFN 24, 4 query
/// heads sharing 2 KV heads (GQA) of width 4, 64 positions.
pub fn tiny_config(vocab_size: usize, tie_word_embeddings: bool) -> DecoderConfig {
    DecoderConfig {
        vocab_size,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope: RopeConfig { theta: 10000.0, ..Default::default() },
        tie_word_embeddings,
        max_position_embeddings: 64,
        ..DecoderConfig::default()
    }
}
