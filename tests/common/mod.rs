//! Shared by the integration tests.

use spectune::model::{DecoderConfig, RopeConfig};

/// A 2-layer Llama-style config small enough for finite differences: hidden 16, FFN 24, 4 query
/// heads sharing 2 KV heads (GQA) of width 4, 64 positions.
#[allow(dead_code)]
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

/// A frozen [rows, cols] matrix of a block-quantized `dtype` in an anonymous read-only map:
/// random bytes with every f16 scale set to 0.004 (a typical weight scale), so each block is
/// valid. For timing the frozen-weight GEMM.
#[allow(dead_code)]
pub fn random_blocks(rng: &mut spectune::gradcheck::SplitMix, dtype: spectune::DType, rows: usize, cols: usize, name: &str) -> spectune::Tensor {
    let size = dtype.storage_bytes(rows * cols).expect("whole blocks");
    let mut bytes: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
    for blk in bytes.chunks_exact_mut(dtype.size()) {
        for &o in dtype.scale_offsets() {
            blk[o..o + 2].copy_from_slice(&half::f16::from_f32(0.004).to_le_bytes());
        }
    }
    let mut map = memmap2::MmapOptions::new().len(size).map_anon().unwrap();
    map.copy_from_slice(&bytes);
    spectune::Tensor::from_mmap(std::sync::Arc::new(map.make_read_only().unwrap()), 0, dtype, [rows, cols], name).unwrap()
}
