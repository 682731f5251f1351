//! Training: data loading and batching ([`data`]), the training loop with gradient
//! accumulation, evaluation, and atomic checkpoints that resume bit-identically.

pub mod data;
