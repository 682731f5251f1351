//! Spectral Adapter (Zhang & Pilanci 2024; docs/ops.md §17–19, §22): the top singular vectors of W tuned
//! additively (Spectral^A: U + ΔU, V + ΔV) or by Cayley rotations plus a singular-value scale
//! (Spectral^R), on one block of singular triplets, and the fusion of several adapters trained
//! on disjoint blocks.
//!
//! Block j of size r is the triplets j·r … (j+1)·r − 1 (block 0 = the top r). The block's frozen
//! factors U_b [out, r], σ_b `[r]`, V_b [in, r] are computed once at init and stored with the
//! adapter: the reference code recomputes the SVD when merging, and a sign flip between the two
//! SVDs silently corrupts the merged weight.
//!
//! Per block, the tuned triplets are (U'_b, σ'_b, V'_b):
//! - Spectral^A: U'_b = U_b + ΔU, σ'_b = σ_b, V'_b = V_b + ΔV;
//! - Spectral^R: U'_b = U_b·R_U, σ'_b = c ⊙ σ_b, V'_b = V_b·R_V.
//!
//! and the adapted weight is W' = W − U_b·Σ_b·V_bᵀ + U'_b·Σ'_b·V'_bᵀ. Fusion ([`fuse_weight`])
//! replaces every adapter's block in one U, Σ, V: with disjoint blocks j₁, j₂, …
//!   W_fused = W_rest + Σ_j U'_j·Σ'_j·V'_jᵀ,   W_rest = W − Σ_j U_j·Σ_j·V_jᵀ,
//! so the adapters do not overwrite each other.

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::{Llama, Target};
use crate::ops::cayley_f64;
use crate::peft::export::{merge_report, merge_to_hf, probe_ids, write_tokenizer, PROBE_TEXT};
use crate::peft::io::load_adapter;
use crate::peft::Adapter;
use crate::tensor::Tensor;

/// One adapter's block of singular triplets, before (frozen) and after tuning, f64 row-major.
#[derive(Clone, Debug)]
pub struct TunedBlock {
    pub block: usize,
    pub r: usize,
    /// U_b [out, r], σ_b `[r]`, V_b [in, r] (frozen).
    pub u: Vec<f64>,
    pub sigma: Vec<f64>,
    pub v: Vec<f64>,
    /// U'_b [out, r], σ'_b `[r]`, V'_b [in, r] (tuned).
    pub u_new: Vec<f64>,
    pub sigma_new: Vec<f64>,
    pub v_new: Vec<f64>,
}

/// x [rows, r]·y [r, r] (f64 row-major).
fn matmul_rr(x: &[f64], y: &[f64], rows: usize, r: usize) -> Vec<f64> {
    let mut o = vec![0.0; rows * r];
    for i in 0..rows {
        for q in 0..r {
            let xv = x[i * r + q];
            if xv != 0.0 {
                for j in 0..r {
                    o[i * r + j] += xv * y[q * r + j];
                }
            }
        }
    }
    o
}

/// The tuned block of a Spectral^A or Spectral^R adapter (None for other methods).
pub fn tuned_block(ad: &Adapter) -> Option<TunedBlock> {
    match ad {
        Adapter::SpectralA { du, dv, u, sigma, v, block } => {
            let (u, sigma, v) = (u.to_vec_f64(), sigma.to_vec_f64(), v.to_vec_f64());
            let u_new = u.iter().zip(du.to_vec_f64()).map(|(a, b)| a + b).collect();
            let v_new = v.iter().zip(dv.to_vec_f64()).map(|(a, b)| a + b).collect();
            Some(TunedBlock { block: *block, r: sigma.len(), sigma_new: sigma.clone(), u, sigma, v, u_new, v_new })
        }
        Adapter::SpectralR { qu, qv, c, u, sigma, v, block } => {
            let r = sigma.numel();
            let (u, sigma, v) = (u.to_vec_f64(), sigma.to_vec_f64(), v.to_vec_f64());
            let (ru, rv) = (cayley_f64(&qu.to_vec_f64(), r), cayley_f64(&qv.to_vec_f64(), r));
            let (m, n) = (u.len() / r, v.len() / r);
            let sigma_new = sigma.iter().zip(c.to_vec_f64()).map(|(s, c)| s * c).collect();
            Some(TunedBlock { block: *block, r, u_new: matmul_rr(&u, &ru, m, r), v_new: matmul_rr(&v, &rv, n, r), u, sigma, v, sigma_new })
        }
        _ => None,
    }
}

/// w [out, in] += sign·u·diag(s)·vᵀ (f64).
fn add_triplets(w: &mut [f64], out_f: usize, in_f: usize, u: &[f64], s: &[f64], v: &[f64], sign: f64) {
    let r = s.len();
    for i in 0..out_f {
        let us: Vec<f64> = (0..r).map(|q| sign * u[i * r + q] * s[q]).collect();
        let row = &mut w[i * in_f..(i + 1) * in_f];
        for (j, x) in row.iter_mut().enumerate() {
            *x += (0..r).map(|q| us[q] * v[j * r + q]).sum::<f64>();
        }
    }
}

/// W' of one Spectral adapter (f64 [out, in]): W − U_b·Σ_b·V_bᵀ + U'_b·Σ'_b·V'_bᵀ — the
/// adapter's definition, whatever the accuracy of its stored factors.
pub fn merged(w: &Tensor, ad: &Adapter) -> Result<Vec<f64>> {
    combine(w, &[ad], false)
}

/// Fuses Spectral adapters trained on disjoint blocks of the same frozen w [out, in] into one
/// dense weight: W_fused = (W − Σ_j U_j·Σ_j·V_jᵀ) + Σ_j U'_j·Σ'_j·V'_jᵀ (f64, row-major).
///
/// Errors: an adapter that is not Spectral^A/R, two adapters on overlapping blocks, or stored
/// factors that do not belong to w (|u_iᵀ·W·v_i − σ_i| > 10⁻³·σ_max for a stored triplet: an
/// adapter trained on another base model).
pub fn fuse_weight(w: &Tensor, adapters: &[&Adapter]) -> Result<Vec<f64>> {
    combine(w, adapters, true)
}

fn combine(w: &Tensor, adapters: &[&Adapter], check: bool) -> Result<Vec<f64>> {
    const OP: &str = "fuse_spectral";
    if w.dims().len() != 2 {
        return Err(Error::shape(OP, "w", "[out, in]", w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    let mut wm = w.to_vec_f64();
    let mut blocks: Vec<TunedBlock> = Vec::with_capacity(adapters.len());
    for ad in adapters {
        let b = tuned_block(ad).ok_or_else(|| Error::invalid(OP, "only Spectral^A / Spectral^R adapters can be fused on singular-vector blocks"))?;
        if b.u.len() != m * b.r || b.v.len() != n * b.r {
            return Err(Error::shape(OP, "spectral factors", format!("u [{m}, {}], v [{n}, {}]", b.r, b.r), format!("{} and {} values", b.u.len(), b.v.len())));
        }
        // Columns of this block: [block·r, (block+1)·r). Blocks of different sizes may still
        // overlap, so compare the column ranges.
        let range = b.block * b.r..(b.block + 1) * b.r;
        if let Some(o) = blocks.iter().find(|o| {
            let other = o.block * o.r..(o.block + 1) * o.r;
            range.start < other.end && other.start < range.end
        }) {
            return Err(Error::invalid(
                OP,
                format!("blocks overlap: block {} (r = {}) and block {} (r = {}) share singular directions", b.block, b.r, o.block, o.r),
            ));
        }
        if check {
            check_factors_belong(&wm, m, n, &b)?;
        }
        blocks.push(b);
    }
    for b in &blocks {
        add_triplets(&mut wm, m, n, &b.u, &b.sigma, &b.v, -1.0);
    }
    for b in &blocks {
        add_triplets(&mut wm, m, n, &b.u_new, &b.sigma_new, &b.v_new, 1.0);
    }
    Ok(wm)
}

/// Checks |u_iᵀ·W·v_i − σ_i| ≤ 10⁻³·max σ for every stored triplet of the block (w the original
/// weight, f64 [m, n]). The Rayleigh quotient equals σ_i for the exact SVD and also for the
/// randomized one (u = Q·ũ with Qᵀ·W = Ũ·Σ·Vᵀ gives uᵀ·W·v = σ), even where the randomized
/// triplets are not accurate singular triplets; factors of another matrix fail it.
fn check_factors_belong(w: &[f64], m: usize, n: usize, b: &TunedBlock) -> Result<()> {
    let r = b.r;
    let smax = b.sigma.iter().cloned().fold(0.0f64, f64::max).max(f64::MIN_POSITIVE);
    for q in 0..r {
        let rq: f64 = (0..m).map(|i| b.u[i * r + q] * (0..n).map(|j| w[i * n + j] * b.v[j * r + q]).sum::<f64>()).sum();
        let dev = (rq - b.sigma[q]).abs();
        if dev.is_nan() || dev > 1e-3 * smax {
            return Err(Error::invalid(
                "fuse_spectral",
                format!(
                    "the stored singular triplet {} of block {} does not belong to this weight (uᵀ·W·v = {rq:.4e} but σ = {:.4e}): was the adapter trained on another base model?",
                    b.block * r + q,
                    b.block,
                    b.sigma[q]
                ),
            ));
        }
    }
    Ok(())
}

/// Fuses the Spectral adapters of several models that share one frozen base (each a clone of
/// `base` with its own adapters attached, e.g. one per task, each on its own `--block`) into a
/// model without adapters: every linear adapted in any of them gets the dense
/// [`fuse_weight`] of all their adapters on it (owned, in the model's compute dtype); the other
/// linears keep their frozen weights.
pub fn fuse_models(base: &Llama, adapted: &[&Llama]) -> Result<Llama> {
    const OP: &str = "fuse_spectral";
    if adapted.is_empty() {
        return Err(Error::invalid(OP, "no adapted models to fuse"));
    }
    let mut fused = base.clone();
    for (mi, m) in adapted.iter().enumerate() {
        if m.cfg != base.cfg {
            return Err(Error::invalid(OP, format!("adapted model {mi} has a different config from the base")));
        }
    }
    for (li, layer) in fused.layers.iter_mut().enumerate() {
        for t in Target::ALL {
            let ads: Vec<&Adapter> = adapted.iter().filter_map(|m| m.layers[li].linear(t).adapter.as_ref()).collect();
            if ads.is_empty() {
                continue;
            }
            let lin = layer.linear_mut(t);
            let wm = fuse_weight(&lin.weight, &ads).map_err(|e| Error::invalid(OP, format!("layer {li} {}: {e}", t.hf_name())))?;
            lin.weight = crate::device::with_float!(base.dtype, OP, |T| {
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
    let base = ck.llama(DType::F32)?;
    let mut adapted = Vec::with_capacity(adapter_dirs.len());
    let mut blocks = Vec::new();
    for dir in adapter_dirs {
        let mut m = base.clone();
        load_adapter(&mut m, dir)?;
        let b = m.layers.iter().flat_map(|l| Target::ALL.map(|t| l.linear(t).adapter.as_ref().and_then(tuned_block).map(|b| b.block))).flatten().next();
        blocks.push(b.ok_or_else(|| Error::invalid("fuse_spectral", format!("{}: not a Spectral^A/R adapter", dir.display())))?);
        adapted.push(m);
    }
    let refs: Vec<&Llama> = adapted.iter().collect();
    let fused = fuse_models(&base, &refs)?;
    let modules = fused
        .layers
        .iter()
        .enumerate()
        .map(|(li, _)| Target::ALL.iter().filter(|&&t| refs.iter().any(|m| m.layers[li].linear(t).adapter.is_some())).count())
        .sum();
    merge_to_hf(&fused, out)?;
    let tok = ck.tokenizer().ok();
    let tokenizer_files = match &tok {
        Some(t) => write_tokenizer(model_path, t, out)?,
        None => Vec::new(),
    };
    let probe = probe_ids(tok.as_ref(), PROBE_TEXT, fused.cfg.vocab_size, 32.min(fused.cfg.max_position_embeddings))?;
    let max_abs_diff = merge_report(&fused, out, &probe)?;
    Ok(FuseSummary { modules, adapters: adapter_dirs.len(), blocks, max_abs_diff, tokenizer_files })
}
