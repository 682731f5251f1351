//! Reading checkpoints: HF safetensors (single file or sharded) and GGUF, both memory-mapped.
//! Frozen weights come out as [`Tensor`](crate::Tensor)s viewing the mapped file.

pub mod gguf;
pub mod safetensors;
