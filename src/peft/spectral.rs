//! Spectral Adapter (Zhang & Pilanci 2024; methods.md §3): the top singular vectors of W tuned
//! additively (Spectral^A: U + ΔU, V + ΔV) or by Cayley rotations plus a singular-value scale
//! (Spectral^R), on one block of singular triplets, and the fusion of several adapters trained
//! on disjoint blocks.
//!
//! Block j of size r is the triplets j·r … (j+1)·r − 1 (block 0 = the top r). The block's frozen
//! factors U_b [out, r], σ_b [r], V_b [in, r] are computed once at init and stored with the
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

use crate::error::{Error, Result};
use crate::ops::cayley_f64;
use crate::peft::Adapter;
use crate::tensor::Tensor;

/// One adapter's block of singular triplets, before (frozen) and after tuning, f64 row-major.
#[derive(Clone, Debug)]
pub struct TunedBlock {
    pub block: usize,
    pub r: usize,
    /// U_b [out, r], σ_b [r], V_b [in, r] (frozen).
    pub u: Vec<f64>,
    pub sigma: Vec<f64>,
    pub v: Vec<f64>,
    /// U'_b [out, r], σ'_b [r], V'_b [in, r] (tuned).
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
        if !(dev <= 1e-3 * smax) {
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
