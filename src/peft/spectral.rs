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
//! so the adapters do not overwrite each other. Fusing the adapters of several adapter folders
//! into a checkpoint is [`crate::peft::fuse`].
//!
//! Trainables: Spectral^A ΔU [out, r], ΔV [in, r] (init 0); Spectral^R Q_U, Q_V [r, r] (init 0,
//! R = cayley(Q) = I) and c `[r]` (init 1). File layout: `…spectral_du/dv` or
//! `…spectral_qu/qv/c`, the frozen `…spectral_u/sigma/v` and `…spectral_block` (I64 `[1]`).

use std::any::Any;

use super::adapter::{f32_entry, i64_entry, tensor_of, Adapter, AdapterCtx, LinearAdapter, ModuleFile, ModuleNames, TensorMap};
use super::registry::{Method, MethodKind};
use super::LoraConfig;
use crate::device::{with_float, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::ops::{self, cayley_f64};
use crate::tensor::Tensor;

/// Power iterations of the randomized SVD behind Spectral^A/R and PiSSA (exact SVD when the
/// weight is small). Each costs two passes over W with (block + 1)·r + 10 columns.
pub(crate) const SVD_POWER_ITERS: usize = 4;

/// Tensor suffixes of both layouts.
pub(crate) const SUFFIXES: &[&str] =
    &["spectral_block", "spectral_c", "spectral_du", "spectral_dv", "spectral_qu", "spectral_qv", "spectral_sigma", "spectral_u", "spectral_v"];

fn trainable(m: &Method, o: usize, i: usize, r: usize) -> usize {
    let rr = r.min(o.min(i));
    if m.name() == "spectral-a" {
        rr * (o + i)
    } else {
        2 * rr * rr + rr
    }
}

pub(crate) static KIND_A: MethodKind = MethodKind {
    name: "spectral-a",
    help: "Spectral^A: additive tuning of one block of singular vectors (--block)",
    takes_k: false,
    takes_by_norm: false,
    takes_block: true,
    label: |m| format!("Spectral^A (block {})", m.block),
    trainable_count: trainable,
    build,
};

pub(crate) static KIND_R: MethodKind = MethodKind {
    name: "spectral-r",
    help: "Spectral^R: Cayley rotations + scales of one block of singular vectors (--block)",
    takes_k: false,
    takes_by_norm: false,
    takes_block: true,
    label: |m| format!("Spectral^R (block {})", m.block),
    trainable_count: trainable,
    build,
};

impl Method {
    /// Spectral^A on singular-triplet block `block` (columns block·r … (block+1)·r − 1).
    pub const fn spectral_a(block: usize) -> Method {
        Method::with("spectral-a", 0, false, block)
    }
    /// Spectral^R on singular-triplet block `block`.
    pub const fn spectral_r(block: usize) -> Method {
        Method::with("spectral-r", 0, false, block)
    }
}

/// The frozen factors of block `block` (r = the LoRA rank clamped to min(out, in)).
fn build(m: &Method, w: &Tensor, cfg: &LoraConfig, dtype: DType, rng: &mut SplitMix) -> Result<Adapter> {
    const OP: &str = "spectral init";
    let (o, i) = (w.dims()[0], w.dims()[1]);
    let block = m.block;
    let lim = o.min(i);
    let r = cfg.rank.min(lim);
    if cfg.rank == 0 || (block + 1) * r > lim {
        return Err(Error::invalid(
            OP,
            format!("block {block} of rank {} needs singular triplets {}..{} but a [{o}, {i}] weight has only {lim}", cfg.rank, block * r, (block + 1) * r),
        ));
    }
    let t = crate::svd::svd_block(w, block * r, r, SVD_POWER_ITERS, rng.next_u64())?;
    let (u, sigma, v) = (tensor_of(&t.u, vec![o, r], dtype, OP)?, tensor_of(&t.s, vec![r], dtype, OP)?, tensor_of(&t.v, vec![i, r], dtype, OP)?);
    with_float!(dtype, OP, |T| {
        Ok(if m.name() == "spectral-a" {
            Box::new(SpectralA { du: Tensor::zeros::<T>([o, r]).param()?, dv: Tensor::zeros::<T>([i, r]).param()?, u, sigma, v, block }) as Adapter
        } else {
            Box::new(SpectralR {
                qu: Tensor::zeros::<T>([r, r]).param()?,
                qv: Tensor::zeros::<T>([r, r]).param()?,
                c: Tensor::full(T::ONE, [r]).param()?,
                u,
                sigma,
                v,
                block,
            })
        })
    })
}

/// Spectral^A: W' = W − U·Σ·Vᵀ + (U + ΔU)·Σ·(V + ΔV)ᵀ on block `block` of W's singular
/// triplets: du [out, r], dv [in, r] trainable (init 0); u [out, r], sigma `[r]`, v [in, r] frozen.
#[derive(Clone, Debug)]
pub struct SpectralA {
    pub du: Tensor,
    pub dv: Tensor,
    pub u: Tensor,
    pub sigma: Tensor,
    pub v: Tensor,
    pub block: usize,
}

/// Spectral^R: W' = W − U·Σ·Vᵀ + (U·R_U)·diag(c ⊙ σ)·(V·R_V)ᵀ with R = cayley(Q):
/// qu, qv [r, r] (init 0) and c `[r]` (init 1) trainable; u, sigma, v frozen as in Spectral^A.
#[derive(Clone, Debug)]
pub struct SpectralR {
    pub qu: Tensor,
    pub qv: Tensor,
    pub c: Tensor,
    pub u: Tensor,
    pub sigma: Tensor,
    pub v: Tensor,
    pub block: usize,
}

/// A module with `spectral_u`: Spectral^A if it has `spectral_du`, else Spectral^R.
pub(crate) fn load(f: &ModuleFile) -> Result<Option<Adapter>> {
    if !f.has("spectral_u") {
        return Ok(None);
    }
    let (o, i) = f.dims();
    let r = f.shape("spectral_sigma")?.first().copied().unwrap_or(0);
    let block = f.i64s("spectral_block", Some(1), "[1]")?[0];
    if block < 0 || (block as usize + 1) * r > o.min(i) {
        return Err(f.err(format!("{}: block {block} of rank {r} does not fit a [{o}, {i}] weight", f.name("spectral_block"))));
    }
    let block = block as usize;
    let u = f.tensor("spectral_u", &[o, r], false)?;
    let sigma = f.tensor("spectral_sigma", &[r], false)?;
    let v = f.tensor("spectral_v", &[i, r], false)?;
    Ok(Some(if f.has("spectral_du") {
        Box::new(SpectralA { du: f.tensor("spectral_du", &[o, r], true)?, dv: f.tensor("spectral_dv", &[i, r], true)?, u, sigma, v, block })
    } else {
        Box::new(SpectralR {
            qu: f.tensor("spectral_qu", &[r, r], true)?,
            qv: f.tensor("spectral_qv", &[r, r], true)?,
            c: f.tensor("spectral_c", &[r], true)?,
            u,
            sigma,
            v,
            block,
        })
    }))
}

/// The frozen block factors and its index, written by both forms.
fn save_block(u: &Tensor, sigma: &Tensor, v: &Tensor, block: usize, p: &str, out: &mut TensorMap) -> Result<()> {
    out.insert(format!("{p}.spectral_u"), f32_entry(u)?);
    out.insert(format!("{p}.spectral_sigma"), f32_entry(sigma)?);
    out.insert(format!("{p}.spectral_v"), f32_entry(v)?);
    out.insert(format!("{p}.spectral_block"), i64_entry(&[block as i64]));
    Ok(())
}

impl LinearAdapter for SpectralA {
    fn method(&self) -> Method {
        Method::spectral_a(self.block)
    }
    fn forward(&self, x: &Tensor, w: &Tensor, _ctx: &AdapterCtx) -> Result<Tensor> {
        ops::spectral_a_linear(x, w, &self.u, &self.sigma, &self.v, &self.du, &self.dv)
    }
    fn params(&self) -> Vec<Tensor> {
        vec![self.du.clone(), self.dv.clone()]
    }
    fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        merged(w, self)
    }
    /// ΔU·Σ·(V+ΔV)ᵀ + U·Σ·ΔVᵀ = [ΔU | U]·[Σ·(V + ΔV)ᵀ ; Σ·ΔVᵀ] (q = 2r, scale 1).
    fn delta_factors(&self) -> Option<(Vec<f64>, Vec<f64>, usize, f64)> {
        let r = self.sigma.numel();
        let (o, i) = (self.u.dims()[0], self.v.dims()[0]);
        let (duv, dvv, uv, sv, vv) = (self.du.to_vec_f64(), self.dv.to_vec_f64(), self.u.to_vec_f64(), self.sigma.to_vec_f64(), self.v.to_vec_f64());
        let q = 2 * r;
        let mut bp = vec![0.0; o * q];
        for row in 0..o {
            bp[row * q..row * q + r].copy_from_slice(&duv[row * r..(row + 1) * r]);
            bp[row * q + r..row * q + q].copy_from_slice(&uv[row * r..(row + 1) * r]);
        }
        let mut ap = vec![0.0; q * i];
        for p in 0..r {
            for col in 0..i {
                ap[p * i + col] = sv[p] * (vv[col * r + p] + dvv[col * r + p]);
                ap[(r + p) * i + col] = sv[p] * dvv[col * r + p];
            }
        }
        Some((bp, ap, q, 1.0))
    }
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
        let p = &names.prefix;
        out.insert(format!("{p}.spectral_du"), f32_entry(&self.du)?);
        out.insert(format!("{p}.spectral_dv"), f32_entry(&self.dv)?);
        save_block(&self.u, &self.sigma, &self.v, self.block, p, out)
    }
    fn save_config(&self, spectune: &mut serde_json::Map<String, serde_json::Value>) {
        spectune.insert("block".into(), self.block.into());
    }
    fn to_device(&self, device: Device) -> Result<Adapter> {
        let mv = |t: &Tensor| t.to_device(device);
        Ok(Box::new(SpectralA { du: mv(&self.du)?, dv: mv(&self.dv)?, u: mv(&self.u)?, sigma: mv(&self.sigma)?, v: mv(&self.v)?, block: self.block }))
    }
    fn clone_box(&self) -> Adapter {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl LinearAdapter for SpectralR {
    fn method(&self) -> Method {
        Method::spectral_r(self.block)
    }
    fn forward(&self, x: &Tensor, w: &Tensor, _ctx: &AdapterCtx) -> Result<Tensor> {
        ops::spectral_r_linear(x, w, &self.u, &self.sigma, &self.v, &ops::cayley(&self.qu)?, &ops::cayley(&self.qv)?, &self.c)
    }
    fn params(&self) -> Vec<Tensor> {
        vec![self.qu.clone(), self.qv.clone(), self.c.clone()]
    }
    /// c's identity is 1: decay toward 0 would pull it off it.
    fn no_decay_params(&self) -> Vec<Tensor> {
        vec![self.c.clone()]
    }
    fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        merged(w, self)
    }
    /// U·(R_U·diag(c⊙σ)·R_Vᵀ − Σ)·Vᵀ = U·(M·Vᵀ) (q = r, scale 1).
    fn delta_factors(&self) -> Option<(Vec<f64>, Vec<f64>, usize, f64)> {
        let r = self.sigma.numel();
        let i = self.v.dims()[0];
        let (ru, rv) = (cayley_f64(&self.qu.to_vec_f64(), r), cayley_f64(&self.qv.to_vec_f64(), r));
        let (cv, sv, vv) = (self.c.to_vec_f64(), self.sigma.to_vec_f64(), self.v.to_vec_f64());
        // M = R_U·diag(c⊙σ)·R_Vᵀ − Σ  [r, r];  A' = M·Vᵀ [r, i]
        let mut mm = vec![0.0; r * r];
        for a_ in 0..r {
            for b_ in 0..r {
                mm[a_ * r + b_] = (0..r).map(|q| ru[a_ * r + q] * cv[q] * sv[q] * rv[b_ * r + q]).sum::<f64>() - if a_ == b_ { sv[a_] } else { 0.0 };
            }
        }
        let ap: Vec<f64> = (0..r * i).map(|idx| (0..r).map(|q| mm[(idx / i) * r + q] * vv[(idx % i) * r + q]).sum()).collect();
        Some((self.u.to_vec_f64(), ap, r, 1.0))
    }
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
        let p = &names.prefix;
        out.insert(format!("{p}.spectral_qu"), f32_entry(&self.qu)?);
        out.insert(format!("{p}.spectral_qv"), f32_entry(&self.qv)?);
        out.insert(format!("{p}.spectral_c"), f32_entry(&self.c)?);
        save_block(&self.u, &self.sigma, &self.v, self.block, p, out)
    }
    fn save_config(&self, spectune: &mut serde_json::Map<String, serde_json::Value>) {
        spectune.insert("block".into(), self.block.into());
    }
    fn to_device(&self, device: Device) -> Result<Adapter> {
        let mv = |t: &Tensor| t.to_device(device);
        Ok(Box::new(SpectralR {
            qu: mv(&self.qu)?,
            qv: mv(&self.qv)?,
            c: mv(&self.c)?,
            u: mv(&self.u)?,
            sigma: mv(&self.sigma)?,
            v: mv(&self.v)?,
            block: self.block,
        }))
    }
    fn clone_box(&self) -> Adapter {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

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
pub fn tuned_block(ad: &dyn LinearAdapter) -> Option<TunedBlock> {
    if let Some(SpectralA { du, dv, u, sigma, v, block }) = ad.downcast_ref::<SpectralA>() {
        {
            let (u, sigma, v) = (u.to_vec_f64(), sigma.to_vec_f64(), v.to_vec_f64());
            let u_new = u.iter().zip(du.to_vec_f64()).map(|(a, b)| a + b).collect();
            let v_new = v.iter().zip(dv.to_vec_f64()).map(|(a, b)| a + b).collect();
            Some(TunedBlock { block: *block, r: sigma.len(), sigma_new: sigma.clone(), u, sigma, v, u_new, v_new })
        }
    } else if let Some(SpectralR { qu, qv, c, u, sigma, v, block }) = ad.downcast_ref::<SpectralR>() {
        {
            let r = sigma.numel();
            let (u, sigma, v) = (u.to_vec_f64(), sigma.to_vec_f64(), v.to_vec_f64());
            let (ru, rv) = (cayley_f64(&qu.to_vec_f64(), r), cayley_f64(&qv.to_vec_f64(), r));
            let (m, n) = (u.len() / r, v.len() / r);
            let sigma_new = sigma.iter().zip(c.to_vec_f64()).map(|(s, c)| s * c).collect();
            Some(TunedBlock { block: *block, r, u_new: matmul_rr(&u, &ru, m, r), v_new: matmul_rr(&v, &rv, n, r), u, sigma, v, sigma_new })
        }
    } else {
        None
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
pub fn merged(w: &Tensor, ad: &dyn LinearAdapter) -> Result<Vec<f64>> {
    combine(w, &[ad], false)
}

/// Fuses Spectral adapters trained on disjoint blocks of the same frozen w [out, in] into one
/// dense weight: W_fused = (W − Σ_j U_j·Σ_j·V_jᵀ) + Σ_j U'_j·Σ'_j·V'_jᵀ (f64, row-major).
///
/// Errors: an adapter that is not Spectral^A/R, two adapters on overlapping blocks, or stored
/// factors that do not belong to w (|u_iᵀ·W·v_i − σ_i| > 10⁻³·σ_max for a stored triplet: an
/// adapter trained on another base model).
pub fn fuse_weight(w: &Tensor, adapters: &[&dyn LinearAdapter]) -> Result<Vec<f64>> {
    combine(w, adapters, true)
}

fn combine(w: &Tensor, adapters: &[&dyn LinearAdapter], check: bool) -> Result<Vec<f64>> {
    const OP: &str = "fuse_spectral";
    if w.dims().len() != 2 {
        return Err(Error::shape(OP, "w", "[out, in]", w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    let mut wm = w.to_vec_f64();
    let mut blocks: Vec<TunedBlock> = Vec::with_capacity(adapters.len());
    for ad in adapters {
        let b = tuned_block(*ad).ok_or_else(|| Error::invalid(OP, "only Spectral^A / Spectral^R adapters can be fused on singular-vector blocks"))?;
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
