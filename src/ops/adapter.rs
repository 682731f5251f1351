//! Fused adapter linears on a frozen weight W [m, n] (out × in).
//!
//! - LoRA:          y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ,                    A [r, n], B [m, r]
//! - SpecLoRA:      y = x·(Γ ⊙ W)ᵀ + s·(x·Aᵀ)·Bᵀ, Γ[i, :] = d_j for the j-th selected row i, else 1
//! - SpecLoRA-SVD:  y = x·Wᵀ + ((x·V) ⊙ (d − 1) ⊙ σ)·Uᵀ + s·(x·Aᵀ)·Bᵀ, with the frozen top-k SVD
//!   factors U [m, k], σ [k], V [n, k] of W, i.e. W' = W + U·diag((d − 1) ⊙ σ)·Vᵀ
//! - PiSSA / MiLoRA: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ − s·(x·A0ᵀ)·B0ᵀ with the frozen initial factors
//!   A0 [r0, n], B0 [m, r0], i.e. the residual base W − s·B0·A0 is never formed densely
//!
//! Invariant (tests/engine.rs and tests/no_dense_grad.rs): the backward returns dX, dA, dB and dd only. W is frozen — an
//! adapter op refuses a W that requires grad — and no m×n buffer is ever allocated for it: Γ ⊙ W
//! is never formed; the forward scales the selected output columns of Z = x·Wᵀ instead, and saves
//! only those k columns of Z for dd. Derivations: docs/ops.md.
//!
//! One implementation for every device: the forward and the one backward call only
//! [`Kernels`] (GEMMs with transposes and the adapter helpers), on the device of the inputs.

use super::{check_dtype, compute_dtype};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::{GatedAct, Gemm, Kernels};
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

/// Which rows of W the SpecLoRA vector d rescales.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecRows {
    /// The first k rows (the seed's positional, SVD-free form).
    Top(usize),
    /// An explicit list of distinct row indices (e.g. the k rows of largest norm).
    Indices(Vec<u32>),
}

impl SpecRows {
    fn resolve(&self, m: usize) -> Result<Vec<u32>> {
        match self {
            SpecRows::Top(k) if *k <= m => Ok((0..*k as u32).collect()),
            SpecRows::Top(k) => Err(Error::invalid("speclora_linear", format!("k = {k} exceeds the {m} rows of W (clamp k to the row count)"))),
            SpecRows::Indices(ix) => {
                let mut seen = vec![false; m];
                ix.iter()
                    .map(|&i| {
                        let i = i as usize;
                        if i >= m {
                            return Err(Error::OutOfRange { op: "speclora_linear", what: "row", index: i as i64, size: m });
                        }
                        if std::mem::replace(&mut seen[i], true) {
                            return Err(Error::invalid("speclora_linear", format!("row {i} is listed twice")));
                        }
                        Ok(i as u32)
                    })
                    .collect()
            }
        }
    }
}

/// Dropout on the input of the LoRA branch (as PEFT's `lora_dropout`): each element of x is kept
/// with probability 1 − p and scaled by 1/(1 − p). The mask is a pure function of `seed` and the
/// element index, so a recomputation (activation checkpointing) sees the same mask; callers
/// change the seed every step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

/// The spectral part of an adapter linear, next to its LoRA branch.
#[derive(Clone, Copy, Debug)]
pub enum Spectral<'a> {
    /// Plain LoRA.
    None,
    /// SpecLoRA, positional or row-index form: the selected rows of W scaled by d `[k]`.
    Rows { d: &'a Tensor, rows: &'a SpecRows },
    /// SpecLoRA-SVD: W + U·diag((d − 1) ⊙ σ)·Vᵀ with frozen u [m, k], sigma `[k]`, v [n, k].
    Svd { d: &'a Tensor, u: &'a Tensor, sigma: &'a Tensor, v: &'a Tensor },
    /// PiSSA / MiLoRA: the frozen residual correction −s·B0·A0 with a0 [r0, n], b0 [m, r0]
    /// (the initial LoRA factors), so that the base seen by the LoRA branch is W − s·B0·A0.
    Residual { a0: &'a Tensor, b0: &'a Tensor },
}

impl<'a> Spectral<'a> {
    fn d(&self) -> Option<&'a Tensor> {
        match *self {
            Spectral::None | Spectral::Residual { .. } => None,
            Spectral::Rows { d, .. } | Spectral::Svd { d, .. } => Some(d),
        }
    }
    fn op(&self) -> &'static str {
        match self {
            Spectral::None => "lora_linear",
            Spectral::Rows { .. } => "speclora_linear",
            Spectral::Svd { .. } => "speclora_svd_linear",
            Spectral::Residual { .. } => "pissa_linear",
        }
    }
}

/// LoRA on a frozen W: x [.., n], w [m, n], a [r, n], b [m, r] → [.., m].
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    adapter_linear(x, w, Spectral::None, a, b, scale, None)
}

/// SpecLoRA on a frozen W: as [`lora_linear`] with the selected rows of W scaled by d `[k]`.
pub fn speclora_linear(x: &Tensor, w: &Tensor, d: &Tensor, rows: &SpecRows, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    adapter_linear(x, w, Spectral::Rows { d, rows }, a, b, scale, None)
}

/// SpecLoRA-SVD on a frozen W: as [`lora_linear`] plus U·diag((d − 1) ⊙ σ)·Vᵀ.
#[allow(clippy::too_many_arguments)]
pub fn speclora_svd_linear(x: &Tensor, w: &Tensor, d: &Tensor, u: &Tensor, sigma: &Tensor, v: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    adapter_linear(x, w, Spectral::Svd { d, u, sigma, v }, a, b, scale, None)
}

/// PiSSA / MiLoRA on a frozen W: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ − s·(x·A0ᵀ)·B0ᵀ, with frozen
/// a0 [r0, n], b0 [m, r0]. At A = A0, B = B0 the two branches cancel exactly (each product is
/// formed on its own and their difference is taken before it is added to x·Wᵀ).
#[allow(clippy::too_many_arguments)]
pub fn pissa_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, a0: &Tensor, b0: &Tensor, scale: f64) -> Result<Tensor> {
    adapter_linear(x, w, Spectral::Residual { a0, b0 }, a, b, scale, None)
}

/// The general adapter linear: LoRA plus an optional spectral part, with optional dropout on the
/// LoRA branch input.
pub fn adapter_linear(x: &Tensor, w: &Tensor, spec: Spectral<'_>, a: &Tensor, b: &Tensor, s: f64, dropout: Option<Dropout>) -> Result<Tensor> {
    adapter_linear_impl(x, None, w, spec, a, b, s, dropout, true)
}

/// The adapter linear of `swiglu(gate, up)` (a Llama MLP's down projection), fused so that the
/// product silu(gate) ⊙ up is never kept for the backward: it is recomputed there from gate and
/// up (which the SwiGLU gradient needs anyway) for dA. Same result and gradients as
/// `adapter_linear(&swiglu(gate, up)?, ..)`, one [.., in] activation less held per layer.
/// [`gated_adapter_linear`] with [`GatedAct::Silu`].
#[allow(clippy::too_many_arguments)]
pub fn swiglu_adapter_linear(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    spec: Spectral<'_>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    gated_adapter(gate, up, GatedAct::Silu, w, spec, a, b, s, dropout, true)
}

/// [`swiglu_adapter_linear`] when only its backward is wanted: records the same backward step
/// (same saved tensors, same gradients) but returns zeros instead of computing the output (no
/// frozen GEMM, no LoRA product; for plain LoRA with A trained and no dropout, not even
/// swiglu(gate, up) or x·Aᵀ, which the backward forms itself). For a checkpointed block's last
/// op during recomputation, whose output values nobody reads. SpecLoRA's row form still
/// computes the output (its backward keeps columns of x·Wᵀ).
#[allow(clippy::too_many_arguments)]
pub fn swiglu_adapter_linear_graph_only(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    spec: Spectral<'_>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    gated_adapter_linear_graph_only(gate, up, GatedAct::Silu, w, spec, a, b, s, dropout)
}

/// The adapter linear of a gated MLP's down projection, x = act(gate) ⊙ up (SwiGLU, or GeGLU for
/// Gemma), fused as [`swiglu_adapter_linear`] is: x is recomputed in the backward rather than
/// kept. Same result and gradients as `adapter_linear(&swiglu(gate, up)?, ..)` or
/// `adapter_linear(&geglu(gate, up)?, ..)`.
#[allow(clippy::too_many_arguments)]
pub fn gated_adapter_linear(
    gate: &Tensor,
    up: &Tensor,
    act: GatedAct,
    w: &Tensor,
    spec: Spectral<'_>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    gated_adapter(gate, up, act, w, spec, a, b, s, dropout, true)
}

/// [`gated_adapter_linear`] when only its backward is wanted (see
/// [`swiglu_adapter_linear_graph_only`]).
#[allow(clippy::too_many_arguments)]
pub fn gated_adapter_linear_graph_only(
    gate: &Tensor,
    up: &Tensor,
    act: GatedAct,
    w: &Tensor,
    spec: Spectral<'_>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let values = matches!(spec, Spectral::Rows { .. });
    gated_adapter(gate, up, act, w, spec, a, b, s, dropout, values)
}

/// The shared body of the gated adapter ops: x = act(gate) ⊙ up computed outside the graph and
/// (gate, up) recorded in its place (the same on every device).
#[allow(clippy::too_many_arguments)]
fn gated_adapter(
    gate: &Tensor,
    up: &Tensor,
    act: GatedAct,
    w: &Tensor,
    spec: Spectral<'_>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    dropout: Option<Dropout>,
    values: bool,
) -> Result<Tensor> {
    // Graph-only plain LoRA without dropout, A trained: nothing in the forward reads x (no
    // output, and H = x·Aᵀ is recomputed by the backward, which forms x from gate and up
    // anyway), so x is not formed: gate and up get the gate op's checks, and gate (then of x's
    // shape and dtype) stands in for x in the linear's checks.
    let x_unread = !values && dropout.is_none() && matches!(spec, Spectral::None) && a.requires_grad();
    super::elementwise::check_gated_inputs(act.gate_name(), gate, up)?;
    let x = if x_unread {
        gate.clone()
    } else {
        let op = fused_op_name(act);
        let k = kernels_for(op, &[("gate", gate), ("up", up)])?;
        let mut x = k.zeros(gate.dtype(), gate.numel(), op)?;
        k.gated_recompute(&mut x, &gate.read(), &up.read(), act)?;
        Tensor::from_storage(x, gate.shape().clone())
    };
    adapter_linear_impl(&x, Some((gate, up, act)), w, spec, a, b, s, dropout, values)
}

/// The name of the fused op in errors and profiles.
fn fused_op_name(act: GatedAct) -> &'static str {
    match act {
        GatedAct::Silu => "swiglu_adapter_linear",
        GatedAct::GeluTanh => "geglu_adapter_linear",
    }
}

/// A kernel output as a constant tensor (the op layer attaches the graph link).
pub(super) fn tensor(s: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(s, shape.into())
}

/// `x_src`: x = act(gate) ⊙ up, the inputs recorded instead of x (see [`gated_adapter_linear`]).
/// `values = false`: the output is left zero (see [`swiglu_adapter_linear_graph_only`]).
#[allow(clippy::too_many_arguments)]
fn adapter_linear_impl(
    x: &Tensor,
    x_src: Option<(&Tensor, &Tensor, GatedAct)>,
    w: &Tensor,
    spec: Spectral<'_>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    dropout: Option<Dropout>,
    values: bool,
) -> Result<Tensor> {
    let op = match x_src {
        Some((.., act)) => fused_op_name(act),
        None => spec.op(),
    };
    if let Some(dr) = dropout {
        if !(0.0..1.0).contains(&dr.p) {
            return Err(Error::invalid(op, format!("dropout p must be in [0, 1), got {}", dr.p)));
        }
    }
    let dropout = dropout.filter(|d| d.p > 0.0);
    let dt = compute_dtype(op, "x", x)?;
    if w.requires_grad() {
        return Err(Error::invalid(op, "the base weight W requires grad; adapters keep W frozen (use matmul to train W densely)"));
    }
    if w.dims().len() != 2 || x.dims().is_empty() || x.shape().last() != w.dims()[1] {
        return Err(Error::shape(op, "w", format!("[out, {}]", x.shape().last()), w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    if a.dims().len() != 2 || a.dims()[1] != n || a.dims()[0] == 0 {
        return Err(Error::shape(op, "a", format!("[r, {n}]"), a.shape()));
    }
    let r = a.dims()[0];
    check_shape_eq(op, "b", b, &[m, r])?;
    check_dtype(op, "a", a, dt, true)?;
    check_dtype(op, "b", b, dt, true)?;
    if !s.is_finite() {
        return Err(Error::invalid(op, format!("scale must be finite, got {s}")));
    }
    let mut ins: Vec<(&str, &Tensor)> = vec![("x", x), ("w", w), ("a", a), ("b", b)];
    let idx = match spec {
        Spectral::Rows { d, rows } => {
            let idx = rows.resolve(m)?;
            check_shape_eq(op, "d", d, &[idx.len()])?;
            check_dtype(op, "d", d, dt, true)?;
            ins.push(("d", d));
            Some(idx)
        }
        Spectral::Svd { d, u, sigma, v } => {
            let k = d.numel();
            check_shape_eq(op, "d", d, &[k])?;
            check_dtype(op, "d", d, dt, true)?;
            check_shape_eq(op, "u", u, &[m, k])?;
            check_shape_eq(op, "sigma", sigma, &[k])?;
            check_shape_eq(op, "v", v, &[n, k])?;
            for (name, t) in [("u", u), ("sigma", sigma), ("v", v)] {
                check_dtype(op, name, t, dt, false)?;
                if t.requires_grad() {
                    return Err(Error::invalid(op, format!("the SVD factor {name} must be frozen (it is stored with the adapter, never trained)")));
                }
            }
            ins.extend([("d", d), ("u", u), ("sigma", sigma), ("v", v)]);
            None
        }
        Spectral::Residual { a0, b0 } => {
            if a0.dims().len() != 2 || a0.dims()[1] != n || a0.dims()[0] == 0 {
                return Err(Error::shape(op, "a0", format!("[r0, {n}]"), a0.shape()));
            }
            check_shape_eq(op, "b0", b0, &[m, a0.dims()[0]])?;
            for (name, t) in [("a0", a0), ("b0", b0)] {
                check_dtype(op, name, t, dt, false)?;
                if t.requires_grad() {
                    return Err(Error::invalid(op, format!("the residual factor {name} must be frozen (it is stored with the adapter, never trained)")));
                }
            }
            ins.extend([("a0", a0), ("b0", b0)]);
            None
        }
        Spectral::None => None,
    };
    if let Some((g, u, _)) = x_src {
        ins.extend([("gate", g), ("up", u)]);
    }
    let k = kernels_for(op, &ins)?;
    let nrows = x.shape().rows();
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank checked above") = m;
    let dims = LinDims { nrows, m, n, r, s };

    // Z = X·Wᵀ  [N, m]
    let mut y = k.zeros(dt, nrows * m, op)?;
    if values {
        k.gemm(&mut y, &x.read(), &w.read(), &Gemm::new(nrows, n, m).trans(false, true).frozen(), op)?;
    }
    // Γ: save Z[:, idx] for dd, then scale those columns by d.
    let zk = match (&idx, spec) {
        (Some(idx), Spectral::Rows { d, .. }) => {
            let mut zk = k.zeros(dt, nrows * idx.len(), op)?;
            k.gather_scale_cols(&mut y, &mut zk, &d.read(), idx, m)?;
            Some(tensor(zk, [nrows, idx.len()]))
        }
        _ => None,
    };
    // SVD form: P = X·V [N, k];  Y += (P ⊙ c)·Uᵀ with c = (d − 1) ⊙ σ. Saves P for dd.
    let pk = match spec {
        Spectral::Svd { d, u, sigma, v } => {
            let kk = d.numel();
            let mut p = k.zeros(dt, nrows * kk, op)?;
            k.gemm(&mut p, &x.read(), &v.read(), &Gemm::new(nrows, n, kk), op)?;
            let c = svd_coef(k, d, sigma, op)?;
            let mut pc = k.zeros(dt, nrows * kk, op)?;
            k.scale_cols(&mut pc, &p, &c)?;
            if values {
                k.gemm(&mut y, &pc, &u.read(), &Gemm::new(nrows, kk, m).trans(false, true).scaled(1.0, 1.0), op)?;
            }
            Some(tensor(p, [nrows, kk]))
        }
        _ => None,
    };
    // X̃ = dropout(X) for the LoRA branch only;  H = X̃·Aᵀ [N, r];  Y += s·H·Bᵀ
    let xd = match dropout {
        Some(dr) => {
            let mut xd = k.zeros(dt, nrows * n, op)?;
            k.dropout_apply(&mut xd, &x.read(), dr.p, dr.seed, false)?;
            Some(tensor(xd, [nrows, n]))
        }
        None => None,
    };
    // H is read by the output, or kept for dB when A is frozen (otherwise the backward
    // recomputes it from X̃): a graph-only call with A trained skips it.
    let h = if values || !a.requires_grad() {
        let mut h = k.zeros(dt, nrows * r, op)?;
        let xa = xd.as_ref().unwrap_or(x).read();
        k.gemm(&mut h, &xa, &a.read(), &Gemm::new(nrows, n, r).trans(false, true), op)?;
        Some(h)
    } else {
        None
    };
    if let (true, Some(h)) = (values, &h) {
        match spec {
            // Residual: T1 = H·Bᵀ and T0 = (X·A0ᵀ)·B0ᵀ separately, then Y += s·(T1 − T0), so that
            // A = A0, B = B0 (the PiSSA init, no dropout) gives exact zeros.
            Spectral::Residual { a0, b0 } => {
                let r0 = a0.dims()[0];
                let mut t1 = k.zeros(dt, nrows * m, op)?;
                k.gemm(&mut t1, h, &b.read(), &Gemm::new(nrows, r, m).trans(false, true), op)?;
                let mut h0 = k.zeros(dt, nrows * r0, op)?;
                k.gemm(&mut h0, &x.read(), &a0.read(), &Gemm::new(nrows, n, r0).trans(false, true), op)?;
                let mut t0 = k.zeros(dt, nrows * m, op)?;
                k.gemm(&mut t0, &h0, &b0.read(), &Gemm::new(nrows, r0, m).trans(false, true), op)?;
                drop(h0);
                k.add_scaled(&mut t1, &t0, -1.0)?;
                drop(t0);
                k.add_scaled(&mut y, &t1, s)?;
            }
            _ => k.gemm(&mut y, h, &b.read(), &Gemm::new(nrows, r, m).trans(false, true).scaled(s, 1.0), op)?,
        }
    }
    let y = tensor(y, Shape::new(out_dims));
    let h = h.map(|h| tensor(h, [nrows, r]));
    let mut inputs: Vec<&Tensor> = match x_src {
        Some((g, u, _)) => vec![g, u],
        None => vec![x],
    };
    inputs.extend(spec.d());
    inputs.extend([a, b]);
    let has_d = spec.d().is_some();
    let fused = x_src.is_some();
    let act = x_src.map_or(GatedAct::Silu, |(.., act)| act);
    Ok(record(y, &inputs, |needs| {
        // With x_src, needs[0..2] are gate and up; either needs dX.
        let (nx, needs) = if fused { (needs[0] || needs[1], &needs[1..]) } else { (needs[0], needs) };
        let (nd, na, nb) = if has_d { (needs[1], needs[2], needs[3]) } else { (false, needs[1], needs[2]) };
        // Fused without dropout: keep gate and up (not x) and recompute x for dA.
        let src = x_src.filter(|_| xd.is_none() || nx).map(|(g, u, _)| (g.detach(), u.detach()));
        let svd = match spec {
            Spectral::Svd { d, u, sigma, v } if nx || nd => Some(SvdSaved { d: d.detach(), u: u.detach(), sigma: sigma.detach(), v: v.detach() }),
            _ => None,
        };
        Box::new(AdapterBwd {
            name: op,
            x_shape: x.shape().clone(),
            // dA = s·Gᵀ·X̃ needs the dropped-out input when dropout is on.
            x: match (na, xd, &src) {
                (false, ..) => None,
                (true, Some(xd), _) => Some(xd),
                (true, None, Some(_)) => None,
                (true, None, None) => Some(x.detach()),
            },
            src,
            fused,
            act,
            dropout,
            w: nx.then(|| w.detach()),
            a: (nx || (nb && na)).then(|| a.detach()),
            b: (nx || na).then(|| b.detach()),
            // With A trainable too, x̃ is kept for dA and H = x̃·Aᵀ is recomputed for dB (an [N, r]
            // buffer less per linear for one N·n·r GEMM); otherwise H is kept.
            h: h.filter(|_| nb && !na),
            d: if let (Spectral::Rows { d, .. }, true) = (spec, nx) { Some(d.detach()) } else { None },
            zk: zk.filter(|_| nd),
            idx,
            svd,
            residual: match spec {
                Spectral::Residual { a0, b0 } if nx => Some((a0.detach(), b0.detach())),
                _ => None,
            },
            pk: pk.filter(|_| nd),
            has_d,
            dims,
        })
    }))
}

fn check_shape_eq(op: &'static str, arg: &'static str, t: &Tensor, dims: &[usize]) -> Result<()> {
    super::check_shape(op, arg, t, dims)
}

/// c = (d − 1) ⊙ σ `[k]`, the SVD form's per-direction coefficient.
fn svd_coef(k: &dyn Kernels, d: &Tensor, sigma: &Tensor, op: &'static str) -> Result<Storage> {
    let mut c = k.zeros(d.dtype(), d.numel(), op)?;
    k.svd_coef(&mut c, &d.read(), &sigma.read())?;
    Ok(c)
}

#[derive(Clone, Copy)]
struct LinDims {
    nrows: usize,
    m: usize,
    n: usize,
    r: usize,
    s: f64,
}

struct AdapterBwd {
    name: &'static str,
    /// Fused gate input: (gate, up), for recomputing x = act(gate) ⊙ up (dA) and for dgate/dup.
    src: Option<(Tensor, Tensor)>,
    fused: bool,
    /// The fused gate's activation (meaningful when `fused`).
    act: GatedAct,
    x_shape: Shape,
    x: Option<Tensor>,
    w: Option<Tensor>,
    a: Option<Tensor>,
    b: Option<Tensor>,
    h: Option<Tensor>,
    d: Option<Tensor>,
    zk: Option<Tensor>,
    idx: Option<Vec<u32>>,
    /// SVD form: the factors and d (for dX and dd), and P = X·V (for dd).
    svd: Option<SvdSaved>,
    /// PiSSA / MiLoRA: the frozen A0, B0 (for dX).
    residual: Option<(Tensor, Tensor)>,
    pk: Option<Tensor>,
    has_d: bool,
    dims: LinDims,
    dropout: Option<Dropout>,
}

struct SvdSaved {
    d: Tensor,
    u: Tensor,
    sigma: Tensor,
    v: Tensor,
}

impl Backward for AdapterBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    /// With G = dY·B [N, r], dYΓ = dY with its selected columns scaled by d, and X̃ = dropout(X)
    /// (X̃ = X, mask = 1 without dropout):
    ///   dX = dYΓ·W + s·(G·A) ⊙ mask/(1−p);  dA = s·Gᵀ·X̃;  dB = s·dYᵀ·H;  dd_j = Σ_t dY[t, i_j]·Z[t, i_j].
    /// SVD form, with Q = dY·U [N, k]: dd_i = σ_i·Σ_t Q[t, i]·P[t, i];  dX += (Q ⊙ c)·Vᵀ.
    /// Residual form: dX −= s·(dY·B0)·A0.
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "adapter_linear.backward";
        let LinDims { nrows, m, n, r, s } = self.dims;
        let (nx, needs) = if self.fused { (needs[0] || needs[1], &needs[1..]) } else { (needs[0], needs) };
        let (nd, na, nb) = if self.has_d { (needs[1], needs[2], needs[3]) } else { (false, needs[1], needs[2]) };
        let k = kernels_for(OP, &[("dy", dy)])?;
        let dt = dy.dtype();
        let gy = dy.read();
        // G = dY·B  [N, r]
        let g = match &self.b {
            Some(b) => {
                let mut g = k.zeros(dt, nrows * r, OP)?;
                k.gemm(&mut g, &gy, &b.read(), &Gemm::new(nrows, m, r), OP)?;
                Some(g)
            }
            None => None,
        };
        let dx = match (nx, &self.w, &self.a, &g) {
            (true, Some(w), Some(a), Some(g)) => {
                let mut dx = k.zeros(dt, nrows * n, OP)?;
                let wg = w.read();
                k.gemm(&mut dx, &gy, &wg, &Gemm::new(nrows, m, n).frozen(), OP)?;
                if let (Some(d), Some(idx)) = (&self.d, &self.idx) {
                    // dYΓ·W = dY·W + (dY[:, idx] ⊙ (d − 1))·W[idx, :]: the full GEMM reads dY in
                    // place and the k selected columns add a rank-k correction (no N×m copy of dY).
                    let kk = idx.len();
                    if kk > 0 {
                        let mut gk = k.zeros(dt, nrows * kk, OP)?;
                        k.gather_cols(&mut gk, &gy, &d.read(), idx, m, 1.0)?;
                        // W[idx, :] [k, n], converted from W's stored dtype.
                        let mut wk = k.zeros(dt, kk * n, OP)?;
                        k.gather_rows(&mut wk, &wg, idx, n)?;
                        k.gemm(&mut dx, &gk, &wk, &Gemm::new(nrows, kk, n).scaled(1.0, 1.0), OP)?;
                    }
                }
                match self.dropout {
                    // dX += s·(G·A) ⊙ mask/(1 − p)
                    Some(dr) => {
                        let mut ga = k.zeros(dt, nrows * n, OP)?;
                        k.gemm(&mut ga, g, &a.read(), &Gemm::new(nrows, r, n).scaled(s, 0.0), OP)?;
                        k.dropout_apply(&mut dx, &ga, dr.p, dr.seed, true)?;
                    }
                    None => k.gemm(&mut dx, g, &a.read(), &Gemm::new(nrows, r, n).scaled(s, 1.0), OP)?,
                }
                Some(dx)
            }
            _ => None,
        };
        let mut dd = match (nd, &self.zk, &self.idx) {
            (true, Some(zk), Some(idx)) => {
                let mut dd = k.zeros(dt, idx.len(), OP)?;
                k.col_dot(&mut dd, &gy, m, Some(idx), &zk.read(), None, false)?;
                Some(tensor(dd, [idx.len()]))
            }
            _ => None,
        };
        // X̃ (the LoRA branch input): saved, or recomputed as act(gate) ⊙ up for the fused
        // down projection. Needed for dA, and for dB when H was not kept.
        let xt: Option<Tensor> = if na || (nb && self.h.is_none()) {
            match (&self.x, &self.src) {
                (Some(x), _) => Some(x.clone()),
                (None, Some((gt, up))) => {
                    let mut x = k.zeros(dt, nrows * n, OP)?;
                    k.gated_recompute(&mut x, &gt.read(), &up.read(), self.act)?;
                    Some(tensor(x, [nrows, n]))
                }
                _ => None,
            }
        } else {
            None
        };
        let da = match (na, &xt, &g) {
            (true, Some(x), Some(g)) => {
                let mut da = k.zeros(dt, r * n, OP)?;
                k.gemm(&mut da, g, &x.read(), &Gemm::new(r, nrows, n).trans(true, false).scaled(s, 0.0), OP)?;
                Some(tensor(da, [r, n]))
            }
            _ => None,
        };
        let db = if nb {
            // H = X̃·Aᵀ [N, r]: kept, or recomputed (the same GEMM as the forward's).
            let h = match (&self.h, &xt, &self.a) {
                (Some(h), ..) => h.clone(),
                (None, Some(x), Some(a)) => {
                    let mut h = k.zeros(dt, nrows * r, OP)?;
                    k.gemm(&mut h, &x.read(), &a.read(), &Gemm::new(nrows, n, r).trans(false, true), OP)?;
                    tensor(h, [nrows, r])
                }
                _ => return Err(Error::Autograd(format!("{}: backward has neither H nor X̃ for dB", self.name))),
            };
            let mut db = k.zeros(dt, m * r, OP)?;
            k.gemm(&mut db, &gy, &h.read(), &Gemm::new(m, nrows, r).trans(true, false).scaled(s, 0.0), OP)?;
            Some(tensor(db, [m, r]))
        } else {
            None
        };
        // SVD form: Q = dY·U [N, k];  dd_i = σ_i Σ_t Q[t,i]·P[t,i];  dX += (Q ⊙ c)·Vᵀ.
        let mut dx = dx;
        if let Some(sv) = &self.svd {
            let kk = sv.sigma.numel();
            let mut q = k.zeros(dt, nrows * kk, OP)?;
            k.gemm(&mut q, &gy, &sv.u.read(), &Gemm::new(nrows, m, kk), OP)?;
            if let (true, Some(p)) = (nd, &self.pk) {
                let mut t = k.zeros(dt, kk, OP)?;
                k.col_dot(&mut t, &q, kk, None, &p.read(), Some(&sv.sigma.read()), false)?;
                dd = Some(tensor(t, [kk]));
            }
            if let Some(dxv) = dx.as_mut() {
                let c = svd_coef(k, &sv.d, &sv.sigma, OP)?;
                let mut qc = k.zeros(dt, nrows * kk, OP)?;
                k.scale_cols(&mut qc, &q, &c)?;
                k.gemm(dxv, &qc, &sv.v.read(), &Gemm::new(nrows, kk, n).trans(false, true).scaled(1.0, 1.0), OP)?;
            }
        }
        // Residual: dX −= s·(dY·B0)·A0 (the residual branch sees the un-dropped X).
        if let (Some((a0, b0)), Some(dxv)) = (&self.residual, dx.as_mut()) {
            let r0 = a0.dims()[0];
            let mut g0 = k.zeros(dt, nrows * r0, OP)?;
            k.gemm(&mut g0, &gy, &b0.read(), &Gemm::new(nrows, m, r0), OP)?;
            k.gemm(dxv, &g0, &a0.read(), &Gemm::new(nrows, r0, n).scaled(-s, 1.0), OP)?;
        }
        // A recomputed X̃ is done with: free it before the SwiGLU gradient's buffers exist
        // (this op's backward is where a checkpointed step peaks).
        drop(xt);
        drop(g);
        // Fused: dx is ∂L/∂x for x = act(gate) ⊙ up; pass it through the gate's gradient,
        // dgate written over dx (one [N, n] buffer less at the peak).
        let mut grads = match (&self.src, dx) {
            (Some((gt, up)), Some(mut dxv)) if self.fused => {
                let mut du = k.zeros(dt, nrows * n, OP)?;
                k.gated_bwd_in_place(&mut dxv, &mut du, &gt.read(), &up.read(), self.act)?;
                vec![Some(tensor(dxv, gt.shape().clone())), Some(tensor(du, up.shape().clone()))]
            }
            (_, dx) if self.fused => {
                let dx = dx.map(|v| tensor(v, self.x_shape.clone()));
                vec![dx.clone(), dx]
            }
            (_, dx) => vec![dx.map(|v| tensor(v, self.x_shape.clone()))],
        };
        if self.has_d {
            grads.push(dd);
        }
        grads.extend([da, db]);
        Ok(grads)
    }
}
