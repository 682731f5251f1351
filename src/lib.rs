//! spectune: a lean tensor engine with reverse-mode autograd for parameter-efficient fine-tuning.
pub mod autograd;
pub mod backend;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gradcheck;
pub mod model;
pub mod ops;
pub mod optim;
pub mod peft;
pub mod shape;
pub mod storage;
pub mod tensor;

pub use autograd::{backward, checkpoint, no_grad, GradStore};
pub use dtype::{DType, Float};
pub use error::{Error, Result};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
pub use shape::Shape;
pub use tensor::{Tensor, TensorId};
