//! Transformer models built from [`crate::ops`] only.

pub mod config;
pub mod llama;

pub use llama::{Llama, LlamaConfig, Target};
