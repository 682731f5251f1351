//! # spectune
//!
//! A lean tensor engine with reverse-mode autograd, specialized for parameter-efficient
//! fine-tuning (PEFT) of transformers: LoRA and SpecLoRA (learnable rescaling of the top rows of
//! each frozen weight, plus LoRA) on the decoder families people fine-tune (Llama 2/3.x, Mistral,
//! Qwen2/2.5/3, Gemma 2/3, Phi-3), from HF folders or GGUF files.
//!
//! - Frozen weights are constant tensors: host or memory-mapped, f32/bf16/f16, converted per use,
//!   never given a gradient or optimizer state ([`Tensor::from_mmap`]).
//! - Trainable tensors are adapter parameters ([`Tensor::param`]); [`backward`] returns a
//!   [`GradStore`] holding gradients for exactly those, and [`AdamW`] keeps state only for them.
//! - Every op in [`ops`] has its backward beside its forward and a finite-difference check
//!   ([`gradcheck`]); CPU kernels ([`backend::cpu`]) are generic over f32 and f64.
//! - Adapter methods implement one trait ([`peft::LinearAdapter`]), one file per method, and
//!   their `--method` names live in one registry ([`peft::registry`]).
//! - [`checkpoint`] trades compute for memory: a block keeps only its input and is recomputed
//!   during backward.
//! - A training program should call [`memory::retain_freed_memory`] once at start-up (the CLI
//!   does): steps then reuse freed buffers instead of page-faulting them in again every step.
//!
//! ## Training adapters from a program
//!
//! ```
//! use spectune::ops::CeOptions;
//! use spectune::peft::{targets::TargetSpec, LoraConfig, Method};
//! use spectune::{backward, clip_grad_norm, AdamW, AdamWConfig, DType};
//! use std::path::Path;
//!
//! // Any supported family from an HF folder or a GGUF file; frozen weights stay memory-mapped.
//! // (Here a tiny Qwen3 with random weights from the test fixtures.)
//! let base = Path::new("tests/data/families/qwen3");
//! let mut model = spectune::model::open(base, DType::F32)?;
//! model.checkpointing = true; // recompute each layer in backward
//!
//! // SpecLoRA (k = 8 rows per weight) plus rank-4 LoRA, on modules chosen as PEFT's
//! // `target_modules` chooses them (names, `re:<regex>`, or `all-linear`).
//! let lora = LoraConfig { rank: 4, alpha: 8.0, rslora: false, dropout: 0.0 };
//! let targets = TargetSpec::parse("q_proj,v_proj,down_proj")?;
//! model.attach_adapters(|path| targets.selects(path), &lora, &Method::speclora(8), 1)?;
//! let params = model.trainable_params();
//! let mut opt = AdamW::new(&params, AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..AdamWConfig::default() })?;
//! for d in model.no_decay_params() {
//!     opt.set_weight_decay(&d, false)?; // SpecLoRA's d scales W: never decay it toward 0
//! }
//! assert_eq!(opt.state_numel(), 2 * params.iter().map(|p| p.numel()).sum::<usize>());
//!
//! // One batch of 2 sequences × 8 tokens; targets are the next tokens, -100 = ignored.
//! let ids: Vec<u32> = (0..16).map(|i| (3 + i * 5 % 120) as u32).collect();
//! let targets: Vec<i64> = (0..16).map(|i| if i % 8 == 7 { -100 } else { ids[i + 1] as i64 }).collect();
//! let mut losses = Vec::new();
//! for _ in 0..10 {
//!     let loss = model.loss(&ids, &targets, 2, 8, None, &CeOptions::default())?;
//!     losses.push(loss.item()?);
//!     let mut grads = backward(&loss)?;
//!     clip_grad_norm(&mut grads, 1.0)?;
//!     opt.step(&grads, 1e-2)?;
//! }
//! assert!(losses[9] < losses[0]);
//!
//! // Save the adapters as an HF PEFT folder (adapter_config.json + adapter_model.safetensors)
//! // and load them onto a fresh copy of the base.
//! let dir = std::env::temp_dir().join(format!("spectune-doctest-{}", std::process::id()));
//! spectune::peft::io::save_adapter(&model, &dir, &lora, "random")?;
//! let mut fresh = spectune::model::open(base, DType::F32)?;
//! spectune::peft::io::load_adapter(&mut fresh, &dir)?;
//! assert_eq!(fresh.trainable_params().len(), params.len());
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), spectune::Error>(())
//! ```
pub mod autograd;
pub mod backend;
pub mod bench;
pub mod device;
pub mod dtype;
pub mod error;
pub mod fetch;
pub mod gradcheck;
pub mod io;
pub mod memory;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod peft;
pub mod profile;
pub mod shape;
pub mod spectrum;
pub mod storage;
pub mod svd;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use autograd::{backward, checkpoint, no_grad, GradStore};
pub use dtype::{DType, Float};
pub use error::{Error, Result};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
pub use shape::Shape;
pub use tensor::{Tensor, TensorId};
