//! The spectral analysis of weight changes (docs/ops.md §22): how does a
//! fine-tuned or adapted weight W' differ from its base W0 in terms of singular values and
//! singular vectors?
//!
//! For every analysed matrix, with thin SVDs W0 = U Σ Vᵀ and W' = U' Σ' V'ᵀ (r = min(m, n),
//! σ descending) and three index blocks of the same size k — top [0, k), middle [⌊(r−k)/2⌋, +k),
//! bottom [r−k, r):
//!
//! - singular-value ratios ρ_i = σ_i(W') / σ_i(W0), matched by rank order, on each block;
//! - matched singular-vector alignment |⟨u_i, u'_i⟩| and |⟨v_i, v'_i⟩| on each block (the absolute
//!   value removes the sign ambiguity; it is fragile where σ_i ≈ σ_{i+1}, since near-equal
//!   singular values may swap or mix their vectors);
//! - principal angles between the block subspaces: cos θ_j = the singular values of
//!   U_B(W0)ᵀ·U_B(W') (k×k) for block B, and the same for V. They do not depend on the order or
//!   sign of vectors inside the block, only on the gaps at the block's edges;
//! - ‖W' − W0‖_F, ‖W0‖_F and their ratio;
//! - the share of ‖ΔW‖_F² that lies in the top-k singular block of W0: ‖U_kᵀ·ΔW·V_k‖_F² / ‖ΔW‖_F²;
//! - "intruder dimensions" (Shuttleworth et al.): for each top-k left singular vector u'_i of W',
//!   max_j |⟨u'_i, u_j⟩| over all left singular vectors of W0; below [`INTRUDER_THRESHOLD`] it is
//!   counted as an intruder (a direction the base weight did not have);
//! - optionally (`control`) the same numbers for W0 + G, a Gaussian change with ‖G‖_F = ‖ΔW‖_F:
//!   perturbation theory rotates singular vectors by about ‖ΔW‖/gap, so blocks with small gaps
//!   (the bottom of the spectrum) move under any change; the control says how much of a
//!   block's movement is just that.
//!
//! Matrices come from two checkpoints (`--tuned`: every linear that changed) or from a base and
//! an adapter folder (`--adapter`: every adapted linear, merged one at a time through
//! [`LinearAdapter::merged_weight`](crate::peft::LinearAdapter::merged_weight), whatever the method). Work is
//! parallel over matrices (rayon); each task holds only its own two dense f64 matrices and their
//! SVD factors, never the whole model densely.

pub mod plot;
mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::peft::targets::TargetSpec;
use crate::svd::thin_svd;

pub use table::render_table;

/// k when none is asked for: 32, or a third of min(m, n) when that is smaller (so the three
/// blocks do not overlap).
pub const DEFAULT_K: usize = 32;
/// A top singular vector of W' whose best |cos| against every singular vector of W0 is below
/// this is counted as an intruder dimension.
pub const INTRUDER_THRESHOLD: f64 = 0.5;

/// One value per index block: top, middle, bottom.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Blocks<T> {
    pub top: T,
    pub mid: T,
    pub bottom: T,
}

impl<T> Blocks<T> {
    pub fn map<U>(&self, f: impl Fn(&T) -> U) -> Blocks<U> {
        Blocks { top: f(&self.top), mid: f(&self.mid), bottom: f(&self.bottom) }
    }
}

/// The comparison of one matrix pair W0 → W' (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairSpectrum {
    /// [m, n] = [out, in].
    pub shape: [usize; 2],
    /// Block size.
    pub k: usize,
    /// First index of each block (0-based).
    pub block_start: Blocks<usize>,
    /// ‖W0‖_F, ‖W' − W0‖_F and their ratio.
    pub norm_base: f64,
    pub norm_delta: f64,
    pub rel_delta: f64,
    /// σ_1..σ_k of W0 and of W'.
    pub sigma_base: Vec<f64>,
    pub sigma_tuned: Vec<f64>,
    /// ρ_i = σ_i(W')/σ_i(W0) per block (NaN where σ_i(W0) = 0; JSON null).
    pub ratio: Blocks<Vec<f64>>,
    /// |⟨u_i, u'_i⟩| and |⟨v_i, v'_i⟩| per block.
    pub align_u: Blocks<Vec<f64>>,
    pub align_v: Blocks<Vec<f64>>,
    /// Principal-angle cosines (descending) between the block subspaces of W0 and W'.
    pub cos_u: Blocks<Vec<f64>>,
    pub cos_v: Blocks<Vec<f64>>,
    /// ‖U_kᵀ·ΔW·V_k‖_F² / ‖ΔW‖_F² (NaN when ΔW = 0).
    pub delta_top_share: f64,
    /// What that share is on average for a ΔW with i.i.d. random entries: k²/(m·n).
    pub delta_top_share_random: f64,
    /// max_j |⟨u'_i, u_j⟩| for each top-k u'_i of W'.
    pub intruder_cos: Vec<f64>,
    /// How many of those are below [`INTRUDER_THRESHOLD`].
    pub intruders: usize,
}

/// [`PairSpectrum`] of one named linear of the model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MatrixSpectrum {
    /// HF tensor name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub name: String,
    pub layer: usize,
    /// HF module name (`q_proj`, …).
    pub module: String,
    #[serde(flatten)]
    pub stats: PairSpectrum,
    /// With [`SpectrumOptions::control`]: the same analysis of W0 + G, G Gaussian with
    /// ‖G‖_F = ‖ΔW‖_F — what an unstructured change of the same size does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<PairSpectrum>,
}

/// Where W' comes from.
#[derive(Clone, Debug)]
pub enum TunedSource {
    /// A second checkpoint (GGUF, safetensors file or HF folder) of the same architecture.
    Checkpoint(PathBuf),
    /// An adapter folder saved by `spectune train` (or a plain PEFT LoRA), merged into the base.
    Adapter(PathBuf),
}

/// Options of [`analyze`].
#[derive(Clone, Debug)]
pub struct SpectrumOptions {
    /// Block size; `None` = [`DEFAULT_K`] clamped per matrix to min(m, n)/3. An explicit k larger
    /// than some analysed matrix's min(m, n) is an error.
    pub k: Option<usize>,
    /// Which linears to consider (default: all seven).
    pub targets: TargetSpec,
    /// Also analyse a random change of the same norm per matrix (see [`MatrixSpectrum::control`]).
    pub control: bool,
}

impl Default for SpectrumOptions {
    fn default() -> Self {
        SpectrumOptions {
            k: None,
            targets: TargetSpec { modules: crate::peft::targets::Modules::AllLinear, exclude: None, layers: None, layers_pattern: None },
            control: false,
        }
    }
}

/// The whole analysis: per matrix, and per module type (means over layers).
#[derive(Clone, Debug, Serialize)]
pub struct SpectrumReport {
    pub base: String,
    pub tuned: Option<String>,
    pub adapter: Option<String>,
    /// The adapter's method (from its config; "lora" for a plain PEFT LoRA), or "checkpoint".
    pub method: String,
    /// The k asked for (None: the default rule).
    pub k: Option<usize>,
    pub intruder_threshold: f64,
    /// Matrices analysed, ordered by module type (q, k, v, o, gate, up, down) then layer.
    pub matrices: Vec<MatrixSpectrum>,
    /// Linears that are bit-identical in base and tuned (`--tuned` only), skipped.
    pub unchanged: Vec<String>,
    /// One summary row per module type.
    pub summary: Vec<SummaryRow>,
    /// The same for the random-change control (empty without it).
    pub summary_control: Vec<SummaryRow>,
}

/// The scalar digest of one matrix (a table row) or the mean over a module type's matrices.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SummaryRow {
    pub module: String,
    /// The layer, or None for a module-type summary.
    pub layer: Option<usize>,
    /// Matrices averaged (1 for a single matrix).
    pub count: usize,
    pub rel_delta: f64,
    /// ρ_1, and the mean ρ over each block.
    pub rho1: f64,
    pub rho: Blocks<f64>,
    /// |⟨u_1, u'_1⟩|, |⟨v_1, v'_1⟩| and the mean matched alignment over the top block.
    pub align_u1: f64,
    pub align_v1: f64,
    pub align_u_top: f64,
    pub align_v_top: f64,
    /// Mean principal-angle cosine per block.
    pub cos_u: Blocks<f64>,
    pub cos_v: Blocks<f64>,
    pub delta_top_share: f64,
    pub delta_top_share_random: f64,
    /// Intruders (summed over the matrices of a module type).
    pub intruders: usize,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl MatrixSpectrum {
    /// The table row of this matrix.
    pub fn row(&self) -> SummaryRow {
        row_of(&self.module, self.layer, &self.stats)
    }
}

/// The table row of one comparison.
fn row_of(module: &str, layer: usize, s: &PairSpectrum) -> SummaryRow {
    {
        SummaryRow {
            module: module.to_string(),
            layer: Some(layer),
            count: 1,
            rel_delta: s.rel_delta,
            rho1: s.ratio.top.first().copied().unwrap_or(f64::NAN),
            rho: s.ratio.map(|v| mean(v)),
            align_u1: s.align_u.top.first().copied().unwrap_or(f64::NAN),
            align_v1: s.align_v.top.first().copied().unwrap_or(f64::NAN),
            align_u_top: mean(&s.align_u.top),
            align_v_top: mean(&s.align_v.top),
            cos_u: s.cos_u.map(|v| mean(v)),
            cos_v: s.cos_v.map(|v| mean(v)),
            delta_top_share: s.delta_top_share,
            delta_top_share_random: s.delta_top_share_random,
            intruders: s.intruders,
        }
    }
}

/// Mean of the rows (intruders summed), labelled `module`.
fn summarize(module: &str, rows: &[SummaryRow]) -> SummaryRow {
    let m = |f: &dyn Fn(&SummaryRow) -> f64| mean(&rows.iter().map(f).collect::<Vec<_>>());
    let b = |f: &dyn Fn(&SummaryRow) -> &Blocks<f64>| Blocks { top: m(&|r| f(r).top), mid: m(&|r| f(r).mid), bottom: m(&|r| f(r).bottom) };
    SummaryRow {
        module: module.to_string(),
        layer: None,
        count: rows.len(),
        rel_delta: m(&|r| r.rel_delta),
        rho1: m(&|r| r.rho1),
        rho: b(&|r| &r.rho),
        align_u1: m(&|r| r.align_u1),
        align_v1: m(&|r| r.align_v1),
        align_u_top: m(&|r| r.align_u_top),
        align_v_top: m(&|r| r.align_v_top),
        cos_u: b(&|r| &r.cos_u),
        cos_v: b(&|r| &r.cos_v),
        delta_top_share: m(&|r| r.delta_top_share),
        delta_top_share_random: m(&|r| r.delta_top_share_random),
        intruders: rows.iter().map(|r| r.intruders).sum(),
    }
}

/// Column `j` of a row-major [rows, cols] matrix.
fn col(a: &[f64], rows: usize, cols: usize, j: usize) -> Vec<f64> {
    (0..rows).map(|i| a[i * cols + j]).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Principal-angle cosines between span(A[:, s..s+k]) and span(B[:, s..s+k]) for orthonormal
/// columns of row-major A, B [rows, r]: the singular values of the k×k matrix A_blkᵀ·B_blk,
/// clamped to [0, 1] (rounding can push them a hair above 1).
fn principal_cosines(a: &[f64], b: &[f64], rows: usize, r: usize, s: usize, k: usize) -> Result<Vec<f64>> {
    let ac: Vec<Vec<f64>> = (s..s + k).map(|j| col(a, rows, r, j)).collect();
    let bc: Vec<Vec<f64>> = (s..s + k).map(|j| col(b, rows, r, j)).collect();
    let mut m = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            m[i * k + j] = dot(&ac[i], &bc[j]);
        }
    }
    let (_, sv, _) = thin_svd(&m, k, k)?;
    Ok(sv.into_iter().map(|c| c.clamp(0.0, 1.0)).collect())
}

/// Compares W0 and W' (both row-major [m, n], f64) with blocks of size `k` (1 ≤ k ≤ min(m, n)).
pub fn compare_matrices(w0: &[f64], w1: &[f64], m: usize, n: usize, k: usize) -> Result<PairSpectrum> {
    const OP: &str = "spectrum";
    if m == 0 || n == 0 || w0.len() != m * n {
        return Err(Error::shape(OP, "base matrix", format!("{m}×{n} values (m, n > 0)"), w0.len()));
    }
    if w1.len() != m * n {
        return Err(Error::shape(OP, "tuned matrix", format!("{m}×{n} values (the base's shape)"), w1.len()));
    }
    let r = m.min(n);
    if k == 0 || k > r {
        return Err(Error::invalid(OP, format!("k = {k} must be in 1..={r} (min(m, n) of a {m}×{n} matrix)")));
    }
    let (u0, s0, v0) = thin_svd(w0, m, n)?;
    let (u1, s1, v1) = thin_svd(w1, m, n)?;
    let starts = Blocks { top: 0, mid: (r - k) / 2, bottom: r - k };
    let ratio = starts.map(|&s| (s..s + k).map(|i| if s0[i] > 0.0 { s1[i] / s0[i] } else { f64::NAN }).collect::<Vec<f64>>());
    let align = |a: &[f64], b: &[f64], rows: usize| {
        starts.map(|&s| (s..s + k).map(|i| dot(&col(a, rows, r, i), &col(b, rows, r, i)).abs().min(1.0)).collect::<Vec<f64>>())
    };
    let align_u = align(&u0, &u1, m);
    let align_v = align(&v0, &v1, n);
    let cosines = |a: &[f64], b: &[f64], rows: usize| -> Result<Blocks<Vec<f64>>> {
        Ok(Blocks {
            top: principal_cosines(a, b, rows, r, starts.top, k)?,
            mid: principal_cosines(a, b, rows, r, starts.mid, k)?,
            bottom: principal_cosines(a, b, rows, r, starts.bottom, k)?,
        })
    };
    let cos_u = cosines(&u0, &u1, m)?;
    let cos_v = cosines(&v0, &v1, n)?;
    // ΔW and its norms.
    let delta: Vec<f64> = w1.iter().zip(w0).map(|(a, b)| a - b).collect();
    let norm_base = dot(w0, w0).sqrt();
    let norm_delta = dot(&delta, &delta).sqrt();
    // T = U_kᵀ·ΔW·V_k: first P = ΔW·V_k [m, k], then T[a, b] = Σ_i U[i, a]·P[i, b].
    let mut p = vec![0.0; m * k];
    for i in 0..m {
        let drow = &delta[i * n..(i + 1) * n];
        for (j, &d) in drow.iter().enumerate() {
            if d != 0.0 {
                let vrow = &v0[j * r..j * r + k];
                for b in 0..k {
                    p[i * k + b] += d * vrow[b];
                }
            }
        }
    }
    let mut top_energy = 0.0;
    for a in 0..k {
        for b in 0..k {
            let t: f64 = (0..m).map(|i| u0[i * r + a] * p[i * k + b]).sum();
            top_energy += t * t;
        }
    }
    let delta_top_share = if norm_delta > 0.0 { top_energy / (norm_delta * norm_delta) } else { f64::NAN };
    // Intruders: best |cos| of each top-k u'_i against all r columns of U.
    let u0_cols: Vec<Vec<f64>> = (0..r).map(|j| col(&u0, m, r, j)).collect();
    let intruder_cos: Vec<f64> = (0..k)
        .map(|i| {
            let ui = col(&u1, m, r, i);
            u0_cols.iter().map(|c| dot(&ui, c).abs()).fold(0.0, f64::max).min(1.0)
        })
        .collect();
    let intruders = intruder_cos.iter().filter(|&&c| c < INTRUDER_THRESHOLD).count();
    Ok(PairSpectrum {
        shape: [m, n],
        k,
        block_start: starts,
        norm_base,
        norm_delta,
        rel_delta: if norm_base > 0.0 { norm_delta / norm_base } else { f64::NAN },
        sigma_base: s0[..k].to_vec(),
        sigma_tuned: s1[..k].to_vec(),
        ratio,
        align_u,
        align_v,
        cos_u,
        cos_v,
        delta_top_share,
        delta_top_share_random: (k * k) as f64 / (m * n) as f64,
        intruder_cos,
        intruders,
    })
}

/// The block size for an [m, n] matrix: `requested` (validated), or the default rule.
pub fn block_size(requested: Option<usize>, m: usize, n: usize, name: &str) -> Result<usize> {
    let r = m.min(n);
    match requested {
        Some(k) if k == 0 || k > r => Err(Error::invalid(
            "spectrum",
            format!("--k {k} must be in 1..={r}: {name} is {m}×{n}, so min(m, n) = {r} (pass a smaller --k, or restrict --targets)"),
        )),
        Some(k) => Ok(k),
        None => Ok(DEFAULT_K.min(r / 3).max(1)),
    }
}

/// The method an adapter folder records (`spectune.method` in its config), "lora" for a plain
/// PEFT LoRA.
fn adapter_method(dir: &Path) -> Result<String> {
    let p = dir.join(crate::peft::io::CONFIG_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::Io { path: p.clone(), source: e })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Format { path: p.clone(), msg: format!("not valid JSON: {e}") })?;
    Ok(v.pointer("/spectune/method").and_then(Value::as_str).unwrap_or("lora").to_string())
}

/// Layer indices named by an adapter's tensors (`…layers.{i}.…`), to catch an adapter made for
/// a deeper model (the loader would silently skip those layers).
fn adapter_layers(dir: &Path) -> Result<Vec<usize>> {
    let p = dir.join(crate::peft::io::WEIGHTS_FILE);
    let bytes = std::fs::read(&p).map_err(|e| Error::Io { path: p.clone(), source: e })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format { path: p.clone(), msg: e.to_string() })?;
    let mut layers: Vec<usize> = st.names().into_iter().filter_map(|name| name.split(".layers.").nth(1)?.split('.').next()?.parse().ok()).collect();
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}

/// The linear of module type `module` in layer `li` (the jobs were built from these).
fn lin_of<'a>(m: &'a dyn Model, li: usize, module: &str) -> &'a crate::nn::Linear {
    m.linears().into_iter().find(|l| l.layer() == Some(li) && l.module() == module).expect("a module type of this model")
}

/// The tuned side: a second model (or none: the adapter on the base), the method, the tuned
/// checkpoint's path and the adapter's path.
type Tuned = (Option<Box<dyn Model>>, String, Option<String>, Option<String>);

/// Runs the analysis of `base` against `tuned` (see the module docs).
pub fn analyze(base: &Path, tuned: &TunedSource, opts: &SpectrumOptions) -> Result<SpectrumReport> {
    const OP: &str = "spectrum";
    let mut base_model: Box<dyn Model> = Box::new(crate::model::open(base, DType::F32)?);
    let n_layers = base_model.num_layers();
    // W' from a second model, or (None) from the adapter loaded onto the base below.
    let (tuned_model, method, tuned_path, adapter_path): Tuned = match tuned {
        TunedSource::Checkpoint(p) => {
            let t: Box<dyn Model> = Box::new(crate::model::open(p, DType::F32)?);
            if t.num_layers() != n_layers {
                return Err(Error::invalid(
                    OP,
                    format!("{} has {} layers but the base {} has {n_layers}: not the same architecture", p.display(), t.num_layers(), base.display()),
                ));
            }
            (Some(t), "checkpoint".into(), Some(p.display().to_string()), None)
        }
        TunedSource::Adapter(dir) => {
            if let Some(&l) = adapter_layers(dir)?.iter().find(|&&l| l >= n_layers) {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "{} has weights for layer {l} but the base {} has {n_layers} layers: is it the adapter of another model?",
                        dir.display(),
                        base.display()
                    ),
                ));
            }
            (None, adapter_method(dir)?, None, Some(dir.display().to_string()))
        }
    };
    if let TunedSource::Adapter(dir) = tuned {
        crate::peft::io::load_adapter(&mut *base_model, dir)?;
    }
    // Jobs in report order: module type, then layer.
    // Module types in the order of a layer's linears (q, k, v, o, gate, up, down, or the fused ones).
    let module_types: Vec<String> = base_model.linears().iter().filter(|l| l.layer() == Some(0)).map(|l| l.module().to_string()).collect();
    opts.targets.check_names(&base_model.linears().iter().map(|l| l.path.as_str()).collect::<Vec<_>>())?;
    let matcher = opts.targets.matcher()?;
    let mut jobs: Vec<(usize, usize, usize)> = Vec::new();
    let mut unchanged = Vec::new();
    for (ti, t) in module_types.iter().enumerate() {
        for li in 0..n_layers {
            let Some(lin) = base_model.linears().into_iter().find(|l| l.layer() == Some(li) && l.module() == t) else { continue };
            if !matcher.selects(&lin.path) {
                continue;
            }
            let name = format!("{}.weight", lin.path);
            let (m, n) = (lin.out_features(), lin.in_features());
            match &tuned_model {
                Some(tm) => {
                    let tl = tm.linear(&lin.path).ok_or_else(|| Error::invalid(OP, format!("the tuned model has no module {}", lin.path)))?;
                    if tl.weight.dims() != lin.weight.dims() {
                        return Err(Error::shape(
                            OP,
                            "tuned weight",
                            format!("{name} {:?} (the base's shape)", lin.weight.dims()),
                            format!("{:?}", tl.weight.dims()),
                        ));
                    }
                }
                None if lin.adapter.is_none() => continue,
                None => {}
            }
            jobs.push((li, ti, block_size(opts.k, m, n, &name)?));
        }
    }
    let results: Vec<Option<MatrixSpectrum>> = jobs
        .par_iter()
        .map(|&(li, ti, k)| -> Result<Option<MatrixSpectrum>> {
            let lin = lin_of(&*base_model, li, &module_types[ti]);
            let (m, n) = (lin.out_features(), lin.in_features());
            let w0 = lin.weight.to_vec_f64();
            let w1 = match (&tuned_model, &lin.adapter) {
                (Some(tm), _) => tm.linear(&lin.path).map(|l| l.weight.to_vec_f64()).unwrap_or_default(),
                (None, Some(ad)) => ad.merged_weight(&lin.weight)?,
                (None, None) => return Ok(None),
            };
            if tuned_model.is_some() && w0 == w1 {
                return Ok(None);
            }
            let name = format!("{}.weight", lin.path);
            if let Some(i) = w1.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFinite { op: OP, what: format!("the tuned {name}, element {i}") });
            }
            let stats = compare_matrices(&w0, &w1, m, n, k).map_err(|e| Error::invalid(OP, format!("{name}: {e}")))?;
            let control = if opts.control {
                let wc = random_change(&w0, stats.norm_delta, (li as u64) << 8 | ti as u64);
                Some(compare_matrices(&w0, &wc, m, n, k).map_err(|e| Error::invalid(OP, format!("{name} (control): {e}")))?)
            } else {
                None
            };
            Ok(Some(MatrixSpectrum { name, layer: li, module: module_types[ti].clone(), stats, control }))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut matrices = Vec::with_capacity(results.len());
    for (res, &(li, ti, _)) in results.into_iter().zip(&jobs) {
        match res {
            Some(ms) => matrices.push(ms),
            None => unchanged.push(format!("{}.weight", lin_of(&*base_model, li, &module_types[ti]).path)),
        }
    }
    if matrices.is_empty() {
        return Err(Error::invalid(
            OP,
            match tuned {
                TunedSource::Checkpoint(p) => format!("no analysed linear differs between {} and {}", base.display(), p.display()),
                TunedSource::Adapter(d) => format!("{} adapts none of the selected modules", d.display()),
            },
        ));
    }
    let mut by_module: BTreeMap<usize, (String, Vec<SummaryRow>, Vec<SummaryRow>)> = BTreeMap::new();
    for ms in &matrices {
        let pos = module_types.iter().position(|t| *t == ms.module).unwrap_or(usize::MAX);
        let e = by_module.entry(pos).or_insert_with(|| (ms.module.clone(), Vec::new(), Vec::new()));
        e.1.push(ms.row());
        if let Some(c) = &ms.control {
            e.2.push(row_of(&ms.module, ms.layer, c));
        }
    }
    let summary = by_module.values().map(|(name, rows, _)| summarize(name, rows)).collect();
    let summary_control = by_module.values().filter(|(_, _, c)| !c.is_empty()).map(|(name, _, c)| summarize(name, c)).collect();
    Ok(SpectrumReport {
        base: base.display().to_string(),
        tuned: tuned_path,
        adapter: adapter_path,
        method,
        k: opts.k,
        intruder_threshold: INTRUDER_THRESHOLD,
        matrices,
        unchanged,
        summary,
        summary_control,
    })
}

/// W0 + G with G i.i.d. Gaussian (Box–Muller, seeded) scaled to ‖G‖_F = `norm`.
pub fn random_change(w0: &[f64], norm: f64, seed: u64) -> Vec<f64> {
    let mut rng = crate::gradcheck::SplitMix::new(seed ^ 0x5eed_c0de);
    let g: Vec<f64> = (0..w0.len())
        .map(|_| {
            let (u1, u2) = (rng.uniform(f64::MIN_POSITIVE, 1.0), rng.uniform(0.0, 1.0));
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    let gn = dot(&g, &g).sqrt();
    let f = if gn > 0.0 { norm / gn } else { 0.0 };
    w0.iter().zip(&g).map(|(w, x)| w + f * x).collect()
}

/// Writes the report as pretty JSON (non-finite numbers become null).
pub fn write_json(report: &SpectrumReport, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(report).map_err(|e| Error::invalid("spectrum", format!("cannot serialize the report: {e}")))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    }
    crate::peft::io::write_atomic(path, text.as_bytes())
}
