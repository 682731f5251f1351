//! Transformer models built from [`crate::nn`] blocks and [`crate::ops`]: one config-driven
//! decoder ([`decoder`]), a file per family mapping its config onto the decoder's switches
//! ([`families`]), and the [`Model`] interface that training, evaluation, generation, export,
//! merging, fusing, spectrum analysis and benchmarks use.

pub mod config;
pub mod decoder;
pub mod families;
pub mod generate;
pub mod gguf;

use std::path::Path;

pub use decoder::{Block, Decoder, DecoderConfig, GateUp, KvCache, NamedTensor, Qkv, RopeConfig};
pub use generate::{generate, GenerateOptions};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsCheckpoint;
use crate::io::Checkpoint;

/// The model config of a checkpoint: `config.json` beside safetensors weights, or GGUF metadata.
pub fn config_of(ck: &Checkpoint) -> Result<DecoderConfig> {
    match ck {
        Checkpoint::Gguf(g) => gguf::gguf_config(g),
        Checkpoint::Safetensors(_) => config::parse_config(&ck.config_json_path()?.expect("safetensors checkpoints have a config path")),
    }
}

/// Builds the model of a checkpoint: validates every weight's presence, dtype and shape against
/// the config before any compute, then maps them (no weight is copied where its dtype allows use
/// in place). `dtype` is the compute dtype (f32 or f64).
pub fn load(ck: &Checkpoint, dtype: DType) -> Result<Decoder> {
    if !dtype.is_compute() {
        return Err(Error::dtype("model::load", "dtype", "f32 or f64 (compute dtype)", dtype));
    }
    let cfg = config_of(ck)?;
    match ck {
        Checkpoint::Safetensors(s) => {
            cfg.validate()?;
            s.validate_weights(&cfg.expected_weights(), if cfg.tie_word_embeddings { &["lm_head.weight"] } else { &[] })?;
            Decoder::from_weights(cfg, dtype, |n| s.tensor(n))
        }
        // gguf_config has checked every weight's presence and shape.
        Checkpoint::Gguf(g) => {
            let c = cfg.clone();
            Decoder::from_weights(cfg, dtype, |n| gguf::hf_tensor(g, &c, n))
        }
    }
}

/// Opens `path` (an HF folder, a `.safetensors` file in one, or a `.gguf`) and builds its model.
pub fn open(path: &Path, dtype: DType) -> Result<Decoder> {
    load(&Checkpoint::open(path)?, dtype)
}

/// Loads a model from an HF folder (or a `.safetensors` file / index inside it), returning the
/// checkpoint too (the model's tensors keep the maps alive on their own).
pub fn load_safetensors(dir: &Path, dtype: DType) -> Result<(Decoder, SafetensorsCheckpoint)> {
    let ck = Checkpoint::Safetensors(SafetensorsCheckpoint::open(dir)?);
    let model = load(&ck, dtype)?;
    let Checkpoint::Safetensors(s) = ck else { unreachable!() };
    Ok((model, s))
}
