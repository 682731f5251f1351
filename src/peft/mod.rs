//! Adapter methods on a frozen linear layer, behind one trait ([`LinearAdapter`]: forward through
//! the ops in [`crate::ops`], parameters, merge, export factors, file tensors, device moves), one
//! file per method, and one registry of method names ([`registry`]).
//!
//! Every method is the identity at init (adapted layer == frozen layer): bit-exactly for LoRA,
//! SpecLoRA (B = 0, d = 1 make the deltas exact zeros), and also for Spectral^A (ΔU = ΔV = 0),
//! Spectral^R (Q = 0 gives R = I exactly, c = 1), PiSSA/MiLoRA (the two branches are formed
//! separately and cancel exactly), DoRA (mag = ν, B = 0) and full fine-tuning (the trainable copy
//! of W). tests/spectral_methods.rs checks each.
//!
//! | method | file | trainable (per [out, in] linear) | frozen extras stored with the adapter |
//! |---|---|---|---|
//! | LoRA | lora.rs | A [r, in], B [out, r] | — |
//! | SpecLoRA | speclora.rs | d `[k]`, A, B | row indices |
//! | SpecLoRA-SVD | speclora_svd.rs | d `[k]`, A, B | U_k, σ_k, V_k |
//! | Spectral^A | spectral.rs | ΔU [out, r], ΔV [in, r] | U_b, σ_b, V_b (block b) |
//! | Spectral^R | spectral.rs | Q_U, Q_V [r, r], c `[r]` | U_b, σ_b, V_b (block b) |
//! | PiSSA / MiLoRA | pissa.rs | A, B (init from the top / bottom r triplets) | A0, B0 (the initial A, B) |
//! | DoRA | dora.rs | A, B, mag `[out]` | ‖W_i‖² (recomputed from W at load) |
//! | full | full.rs | W' [out, in] (a dense copy) | — |
//!
//! File workflows on whole models live beside the methods, above them in the layering: adapter
//! folders ([`io`]), export and merge ([`export`]), and fusing Spectral adapters ([`fuse`]).

mod adapter;
pub mod dora;
pub mod export;
pub mod full;
pub mod fuse;
pub mod io;
pub mod lora;
pub mod pissa;
pub mod registry;
pub mod speclora;
pub mod speclora_svd;
pub mod spectral;
pub mod targets;

pub use adapter::{Adapter, AdapterCtx, LinearAdapter, LoraFactors, ModuleFile, ModuleNames, TensorMap};
pub use lora::LoraConfig;
pub use registry::{Method, MethodKind, MethodOptions};
pub use speclora::top_rows_by_norm;
