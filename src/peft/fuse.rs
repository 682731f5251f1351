//! Fusing Spectral adapters trained on disjoint blocks of one base model (`spectune fuse`): the
//! model-level and file-level workflow over [`crate::peft::spectral::fuse_weight`].

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::Model;
use crate::peft::export::{merge_report, merge_to_hf, probe_ids, write_tokenizer, PROBE_TEXT};
use crate::peft::io::load_adapter;
use crate::peft::spectral::{fuse_weight, tuned_block};
use crate::peft::LinearAdapter;
use crate::tensor::Tensor;

/// Fuses the Spectral adapters of several models that share one frozen base (each a clone of
/// `base` with its own adapters attached, e.g. one per task, each on its own `--block`) into a
/// model without adapters: every linear adapted in any of them gets the dense
/// [`fuse_weight`] of all their adapters on it (owned, in the model's compute dtype); the other
/// linears keep their frozen weights.
pub fn fuse_models(base: &dyn Model, adapted: &[&dyn Model]) -> Result<Box<dyn Model>> {
    const OP: &str = "fuse_spectral";
    if adapted.is_empty() {
        return Err(Error::invalid(OP, "no adapted models to fuse"));
    }
    let mut fused = base.clone_model();
    for (mi, m) in adapted.iter().enumerate() {
        if !m.config().same_model(base.config()) {
            return Err(Error::invalid(OP, format!("adapted model {mi} has a different config from the base")));
        }
    }
    let dtype = base.dtype();
    for lin in fused.linears_mut() {
        {
            let ads: Vec<&dyn LinearAdapter> = adapted.iter().filter_map(|m| m.linear(&lin.path).and_then(|l| l.adapter.as_deref())).collect();
            if ads.is_empty() {
                continue;
            }
            let wm = fuse_weight(&lin.weight, &ads).map_err(|e| Error::invalid(OP, format!("{}: {e}", lin.path)))?;
            lin.weight = crate::device::with_float!(dtype, OP, |T| {
                Tensor::from_vec(wm.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>(), lin.weight.dims().to_vec())
            })?;
            lin.adapter = None;
        }
    }
    Ok(fused)
}

/// What [`fuse_checkpoint`] did.
#[derive(Clone, Debug)]
pub struct FuseSummary {
    /// Linears rebuilt, and adapters fused.
    pub modules: usize,
    pub adapters: usize,
    /// The blocks of each adapter folder, in the order given.
    pub blocks: Vec<usize>,
    /// Largest |Δlogit| between the written folder and the in-memory fused model.
    pub max_abs_diff: f64,
    pub tokenizer_files: Vec<String>,
}

/// `spectune fuse`: loads the base at `model_path` (HF folder, .safetensors or .gguf), loads each
/// Spectral adapter folder onto its own copy, fuses them ([`fuse_models`]) and writes the fused
/// model as an HF folder `out` (f32 weights, config, tokenizer), checked by reloading it.
pub fn fuse_checkpoint(model_path: &Path, adapter_dirs: &[&Path], out: &Path) -> Result<FuseSummary> {
    let ck = Checkpoint::open(model_path)?;
    let base = crate::model::load(&ck, DType::F32)?;
    let mut adapted = Vec::with_capacity(adapter_dirs.len());
    let mut blocks = Vec::new();
    for dir in adapter_dirs {
        let mut m = base.clone_model();
        load_adapter(&mut *m, dir)?;
        let b = m.linears().into_iter().find_map(|l| l.adapter.as_deref().and_then(tuned_block).map(|b| b.block));
        blocks.push(b.ok_or_else(|| Error::invalid("fuse_spectral", format!("{}: not a Spectral^A/R adapter", dir.display())))?);
        adapted.push(m);
    }
    let refs: Vec<&dyn Model> = adapted.iter().map(|m| &**m).collect();
    let fused = fuse_models(&base, &refs)?;
    let modules = fused.linears().iter().filter(|l| refs.iter().any(|m| m.linear(&l.path).is_some_and(|x| x.adapter.is_some()))).count();
    merge_to_hf(&*fused, out)?;
    let tok = ck.tokenizer().ok();
    let tokenizer_files = match &tok {
        Some(t) => write_tokenizer(model_path, t, out)?,
        None => Vec::new(),
    };
    let probe = probe_ids(tok.as_ref(), PROBE_TEXT, fused.config().vocab_size, 32.min(fused.config().max_position_embeddings))?;
    let max_abs_diff = merge_report(&*fused, out, &probe)?;
    Ok(FuseSummary { modules, adapters: adapter_dirs.len(), blocks, max_abs_diff, tokenizer_files })
}
