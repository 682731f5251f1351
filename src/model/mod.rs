//! Transformer models built from [`crate::ops`] only.

pub mod llama;

pub use llama::{Llama, LlamaConfig, Target};
