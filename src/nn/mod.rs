//! Building blocks of the transformer families above the op layer: a linear layer at a module
//! path with its optional adapter, RMSNorm (plain and Gemma's 1 + w) and the RoPE frequency
//! tables with their scaling variants.

pub mod linear;
pub mod norm;
pub mod rope;

pub use linear::{layer_of, modules, GatedAct, Linear};
pub use norm::RmsNorm;
pub use rope::{RopeScaling, SUPPORTED_ROPE_TYPES};
