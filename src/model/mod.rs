//! Transformer models built from [`crate::ops`] only.

pub mod config;
pub mod generate;
pub mod llama;

pub use generate::{generate, GenerateOptions};
pub use llama::{KvCache, Llama, LlamaConfig, Target};
