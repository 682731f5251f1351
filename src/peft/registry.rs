//! The one registry of adapter methods: their `--method` names, help, settings, constructors and
//! file loaders. The CLI, the TOML run file, `bench` and `compare` all parse method names here.
//!
//! Adding a method: its file in src/peft/ (a type implementing [`LinearAdapter`](super::LinearAdapter) and a
//! [`MethodKind`]), one line in [`METHODS`] (and in [`LOAD_ORDER`] if it has its own file
//! layout), and its `mod` line in src/peft/mod.rs.

use super::adapter::{Adapter, ModuleFile};
use super::{dora, full, lora, pissa, speclora, speclora_svd, spectral, LoraConfig};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::tensor::Tensor;

/// A method with its settings. Settings a method does not take are 0/false, so two equal
/// methods build the same adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Method {
    name: &'static str,
    /// SpecLoRA's k (rows or singular directions).
    pub k: usize,
    /// SpecLoRA: the k rows of largest norm instead of the first k.
    pub by_norm: bool,
    /// Spectral^A/R: the block of singular triplets.
    pub block: usize,
}

/// The settings a method name can take (flags `--k`, `--rows-by-norm`, `--block`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MethodOptions {
    pub k: usize,
    pub by_norm: bool,
    /// `Some` only when given explicitly (an error for methods without blocks).
    pub block: Option<usize>,
}

/// What the registry knows about one method.
pub struct MethodKind {
    /// The `--method` name.
    pub name: &'static str,
    /// One line for `--help`.
    pub help: &'static str,
    /// Which settings it takes.
    pub takes_k: bool,
    pub takes_by_norm: bool,
    pub takes_block: bool,
    /// A label with the settings, e.g. "Spectral^A (block 1)".
    pub label: fn(&Method) -> String,
    /// Trainable values on one [out, in] linear with rank r, after the constructor's clamping.
    pub trainable_count: fn(&Method, usize, usize, usize) -> usize,
    /// The adapter for frozen `w` [out, in] (identity at init).
    pub build: fn(&Method, &Tensor, &LoraConfig, DType, &mut SplitMix) -> Result<Adapter>,
}

/// Every method, in the order `--help` lists them.
pub static METHODS: [&MethodKind; 9] = [
    &lora::KIND,
    &speclora::KIND,
    &speclora_svd::KIND,
    &spectral::KIND_A,
    &spectral::KIND_R,
    &pissa::KIND_PISSA,
    &pissa::KIND_MILORA,
    &dora::KIND,
    &full::KIND,
];

/// A module loader: `Ok(None)` when the module's tensors are not in this method's layout.
pub type Loader = fn(&ModuleFile) -> Result<Option<Adapter>>;

/// The order in which an adapter file's modules are recognized (the most specific layout
/// first; plain LoRA last). Full fine-tuning is a file layout of its own (peft::io).
pub static LOAD_ORDER: [Loader; 6] = [spectral::load, pissa::load, dora::load, speclora_svd::load, speclora::load, lora::load];

/// Every tensor-name suffix an adapter file may hold after its module prefix, sorted.
pub fn file_suffixes() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = [lora::SUFFIXES, speclora::SUFFIXES, speclora_svd::SUFFIXES, spectral::SUFFIXES, pissa::SUFFIXES, dora::SUFFIXES]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The method names, comma-separated (for messages and help).
pub fn names() -> String {
    METHODS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// `--help` text: one line per method.
pub fn help() -> String {
    METHODS.iter().map(|m| format!("{:<13} {}", m.name, m.help)).collect::<Vec<_>>().join("\n")
}

fn kind_of(name: &str) -> Option<&'static MethodKind> {
    METHODS.iter().copied().find(|m| m.name == name)
}

impl Method {
    /// The method `name` with `opts` (settings it does not take are dropped; `block` given to a
    /// method without blocks is an error). `op` names the caller in errors (`train`, `bench`).
    pub fn parse(name: &str, opts: MethodOptions, op: &'static str) -> Result<Method> {
        let kind = kind_of(name).ok_or_else(|| Error::invalid(op, format!("--method: unknown method `{name}` ({})", names())))?;
        if opts.block.is_some() && !kind.takes_block {
            let with: Vec<&str> = METHODS.iter().filter(|m| m.takes_block).map(|m| m.name).collect();
            return Err(Error::invalid(op, format!("--block: only applies to {}, not {name}", with.join(" and "))));
        }
        Ok(Method {
            name: kind.name,
            k: if kind.takes_k { opts.k } else { 0 },
            by_norm: kind.takes_by_norm && opts.by_norm,
            block: if kind.takes_block { opts.block.unwrap_or(0) } else { 0 },
        })
    }

    /// Sets the settings directly (for the method files' constructors).
    pub(crate) const fn with(name: &'static str, k: usize, by_norm: bool, block: usize) -> Method {
        Method { name, k, by_norm, block }
    }

    /// The registry entry.
    pub fn kind(&self) -> &'static MethodKind {
        kind_of(self.name).expect("a Method is only built from a registry name")
    }

    /// The name `spectune train --method` takes.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// A human-readable label with the settings, e.g. "Spectral^A (block 1)".
    pub fn label(&self) -> String {
        (self.kind().label)(self)
    }

    /// Trainable values this method adds to one [out, in] linear with rank r, after the same
    /// clamping [`Method::build`] applies.
    pub fn trainable_count(&self, out_f: usize, in_f: usize, r: usize) -> usize {
        (self.kind().trainable_count)(self, out_f, in_f, r)
    }

    /// Builds this method's adapter for the frozen weight `w` [out, in] (SVD factors and row
    /// norms are computed from `w` here, once).
    pub fn build(&self, w: &Tensor, cfg: &LoraConfig, dtype: DType, rng: &mut SplitMix) -> Result<Adapter> {
        if w.dims().len() != 2 {
            return Err(Error::shape("adapter init", "w", "[out, in]", w.shape()));
        }
        (self.kind().build)(self, w, cfg, dtype, rng)
    }
}
