//! Building blocks of the transformer families above the op layer: what a family's config turns
//! into before the decoder runs. So far the RoPE frequency tables with their scaling variants.

pub mod rope;

pub use rope::{RopeScaling, SUPPORTED_ROPE_TYPES};
