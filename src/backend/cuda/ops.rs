//! The remaining device path of the old op layer: the adapter linears, which the op layer calls
//! (through [`crate::device::on_cuda`]) when their inputs live on the GPU. They launch the
//! kernels of `cuda/<family>.cu`, record their own backward step and return device tensors.
//! Every other op goes through [`crate::backend::Kernels`].

use super::{as_bytes, blocks_for, launch, Arg, DeviceBuf};
use crate::autograd::{record, Backward, GradStore};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::Dropout;
use crate::shape::Shape;
use crate::storage::Storage;
use crate::tensor::Tensor;

// ---------------------------------------------------------------------------------------------
// Buffers

/// Device address of `t`, which must live on the device (in `dtype` when given).
fn ptr(op: &str, arg: &str, t: &Tensor, dtype: Option<DType>) -> Result<u64> {
    let g = t.read();
    match &*g {
        Storage::Cuda(b) => {
            if let Some(dt) = dtype {
                if b.dtype() != dt {
                    return Err(Error::Cuda { op: op.into(), msg: format!("{arg} must be {dt} on the device, got {}", b.dtype()) });
                }
            }
            Ok(b.ptr())
        }
        _ => Err(Error::Cuda {
            op: op.into(),
            msg: format!("{arg} ({}) is on the CPU while other inputs are on the GPU; move every input with Tensor::to_device", t.shape()),
        }),
    }
}
fn f32p(op: &str, arg: &str, t: &Tensor) -> Result<u64> {
    ptr(op, arg, t, Some(DType::F32))
}
fn new_f32(shape: impl Into<Shape>, op: &str) -> Result<Tensor> {
    let shape = shape.into();
    let b = DeviceBuf::new(DType::F32, shape.numel(), op)?;
    Ok(Tensor::from_storage(Storage::Cuda(b), shape))
}
/// Host values uploaded as a temporary device buffer (ids, targets, positions, masks).
fn upload<T: Copy>(v: &[T], dtype_bytes: usize, op: &str) -> Result<DeviceBuf> {
    debug_assert_eq!(std::mem::size_of::<T>() % dtype_bytes, 0);
    let bytes = as_bytes(v);
    // Stored as an f32-sized buffer of the right byte length (the allocator only sees bytes).
    let words = bytes.len().div_ceil(4).max(1);
    let b = DeviceBuf::new(DType::F32, words, op)?;
    if !bytes.is_empty() {
        let mut padded = bytes.to_vec();
        padded.resize(words * 4, 0);
        b.write_bytes(&padded, op)?;
    }
    Ok(b)
}

// ---------------------------------------------------------------------------------------------
// GEMM (cuda/matmul.cu)

/// A matrix operand: element (i, k) of batch b at ptr[b·sb + i·s0 + k·s1] (elements, not bytes).
#[derive(Clone, Copy)]
struct Mat {
    ptr: u64,
    bf16: bool,
    s0: i64,
    s1: i64,
    sb: i64,
}
impl Mat {
    fn rows(t: &Tensor, op: &str, arg: &str, cols: usize) -> Result<Mat> {
        // Row-major [.., cols].
        let dt = t.dtype();
        Ok(Mat { ptr: ptr(op, arg, t, None)?, bf16: dt == DType::BF16, s0: cols as i64, s1: 1, sb: 0 })
    }
    fn t(self) -> Mat {
        Mat { s0: self.s1, s1: self.s0, ..self }
    }
}

/// C(i, j) = alpha·Σ_k A(i, k)·B(k, j) + beta·C(i, j) for i < m, j < n, over `batch` batches;
/// C(i, j) at c + b·scb + i·scm + j·scn. A is f32; B f32 or bf16 (tensor cores).
#[allow(clippy::too_many_arguments)]
fn gemm(
    op: &str,
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    a: Mat,
    b: Mat,
    c: u64,
    (scm, scn, scb): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    if a.bf16 {
        return Err(Error::Cuda { op: op.into(), msg: "the left operand of a device matmul must be f32".into() });
    }
    let (name, threads) = if b.bf16 { ("gemm_bf16", 128) } else { ("gemm_f32", 256) };
    let grid = (n.div_ceil(64) as u32, m.div_ceil(64) as u32, batch as u32);
    launch(
        name,
        grid,
        threads,
        &[
            Arg::I32(m as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::Ptr(a.ptr),
            Arg::I64(a.s0),
            Arg::I64(a.s1),
            Arg::I64(a.sb),
            Arg::Ptr(b.ptr),
            Arg::I64(b.s0),
            Arg::I64(b.s1),
            Arg::I64(b.sb),
            Arg::Ptr(c),
            Arg::I64(scm as i64),
            Arg::I64(scn as i64),
            Arg::I64(scb as i64),
            Arg::F32(alpha),
            Arg::F32(beta),
        ],
        || format!("{op}: m={m} n={n} k={k} batch={batch}"),
    )
}

/// Row-major C [m, n] = alpha·A·B + beta·C.
#[allow(clippy::too_many_arguments)]
fn gemm_rm(op: &str, m: usize, n: usize, k: usize, a: Mat, b: Mat, c: u64, alpha: f32, beta: f32) -> Result<()> {
    gemm(op, m, n, k, 1, a, b, c, (n, 1, 0), alpha, beta)
}

fn grid1(n: usize) -> (u32, u32, u32) {
    (blocks_for(n), 1, 1)
}

// ---------------------------------------------------------------------------------------------
// adapter linears

/// The spectral part of an adapter linear, resolved by the op layer.
pub(crate) enum SpecDev<'a> {
    None,
    Rows { d: &'a Tensor, idx: Vec<usize> },
    Svd { d: &'a Tensor, u: &'a Tensor, sigma: &'a Tensor, v: &'a Tensor },
}

fn dropout_apply(out: u64, x: u64, n: usize, dr: Dropout, accumulate: bool, op: &str) -> Result<()> {
    launch(
        "dropout_apply",
        grid1(n),
        256,
        &[Arg::Ptr(out), Arg::Ptr(x), Arg::I64(n as i64), Arg::U64(dr.seed), Arg::F64(dr.p), Arg::I32(accumulate as i32)],
        || format!("{op}: dropout on {n} elements"),
    )
}
#[allow(clippy::too_many_arguments)]
fn gather_scale_cols(z: u64, zk: u64, d: u64, idx: u64, rows: usize, m: usize, k: usize, op: &str) -> Result<()> {
    launch(
        "gather_scale_cols",
        grid1(rows * k),
        256,
        &[Arg::Ptr(z), Arg::Ptr(zk), Arg::Ptr(d), Arg::Ptr(idx), Arg::I64(rows as i64), Arg::I64(m as i64), Arg::I64(k as i64)],
        || format!("{op}: {rows}×{m}, {k} columns"),
    )
}
fn svd_coef(d: &Tensor, sigma: &Tensor, op: &str) -> Result<DeviceBuf> {
    let k = d.numel();
    let c = DeviceBuf::new(DType::F32, k, op)?;
    launch("svd_coef", grid1(k), 256, &[Arg::Ptr(c.ptr()), Arg::Ptr(f32p(op, "d", d)?), Arg::Ptr(f32p(op, "sigma", sigma)?), Arg::I64(k as i64)], || {
        format!("{op}: k={k}")
    })?;
    Ok(c)
}
fn scale_cols(out: u64, p: u64, c: u64, rows: usize, k: usize, op: &str) -> Result<()> {
    launch("scale_cols", grid1(rows * k), 256, &[Arg::Ptr(out), Arg::Ptr(p), Arg::Ptr(c), Arg::I64(rows as i64), Arg::I64(k as i64)], || {
        format!("{op}: {rows}×{k}")
    })
}
#[allow(clippy::too_many_arguments)]
fn col_dot(dd: u64, a: u64, lda: usize, idx: u64, b: u64, w: u64, rows: usize, k: usize, op: &str) -> Result<()> {
    launch(
        "col_dot",
        (k as u32, 1, 1),
        256,
        &[Arg::Ptr(dd), Arg::Ptr(a), Arg::I64(lda as i64), Arg::Ptr(idx), Arg::Ptr(b), Arg::Ptr(w), Arg::I64(rows as i64), Arg::I64(k as i64)],
        || format!("{op}: {rows} rows, {k} columns"),
    )
}

/// y = x·W'ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ on the device; see ops::adapter_linear for the forms of W'.
/// x [N, n] (already validated), w [m, n] frozen (bf16 or f32), a [r, n], b [m, r].
#[allow(clippy::too_many_arguments)]
pub(crate) fn adapter_linear(
    name: &'static str,
    x: &Tensor,
    w: &Tensor,
    spec: SpecDev<'_>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    dropout: Option<Dropout>,
    out_shape: Shape,
) -> Result<Tensor> {
    let op = name;
    let (m, n, r) = (w.dims()[0], w.dims()[1], a.dims()[0]);
    let nrows = x.numel() / n;
    let xm = Mat::rows(x, op, "x", n)?;
    let y = new_f32(out_shape, op)?;
    let yp = f32p(op, "out", &y)?;
    // Z = X·Wᵀ  [N, m]
    gemm_rm(op, nrows, m, n, xm, Mat::rows(w, op, "w", n)?.t(), yp, 1.0, 0.0)?;
    // SpecLoRA: save Z[:, idx] for dd, then scale those columns by d.
    let (idx, zk) = match &spec {
        SpecDev::Rows { d, idx } => {
            let k = idx.len();
            let ib = upload(&idx.iter().map(|&i| i as u32).collect::<Vec<u32>>(), 4, op)?;
            let zk = new_f32([nrows, k], op)?;
            gather_scale_cols(yp, f32p(op, "zk", &zk)?, f32p(op, "d", d)?, ib.ptr(), nrows, m, k, op)?;
            (Some(ib), Some(zk))
        }
        _ => (None, None),
    };
    // SpecLoRA-SVD: P = X·V [N, k];  Y += (P ⊙ c)·Uᵀ with c = (d − 1) ⊙ σ.
    let pk = match &spec {
        SpecDev::Svd { d, u, sigma, v } => {
            let k = d.numel();
            let p = new_f32([nrows, k], op)?;
            gemm_rm(op, nrows, k, n, xm, Mat::rows(v, op, "v", k)?, f32p(op, "p", &p)?, 1.0, 0.0)?;
            let c = svd_coef(d, sigma, op)?;
            let pc = DeviceBuf::new(DType::F32, nrows * k, op)?;
            scale_cols(pc.ptr(), f32p(op, "p", &p)?, c.ptr(), nrows, k, op)?;
            let pcm = Mat { ptr: pc.ptr(), bf16: false, s0: k as i64, s1: 1, sb: 0 };
            gemm_rm(op, nrows, m, k, pcm, Mat::rows(u, op, "u", k)?.t(), yp, 1.0, 1.0)?;
            Some(p)
        }
        _ => None,
    };
    // X̃ = dropout(X);  H = X̃·Aᵀ [N, r];  Y += s·H·Bᵀ
    let xd = match dropout {
        Some(dr) => {
            let xd = new_f32(x.shape().clone(), op)?;
            dropout_apply(f32p(op, "xd", &xd)?, f32p(op, "x", x)?, x.numel(), dr, false, op)?;
            Some(xd)
        }
        None => None,
    };
    let xam = match &xd {
        Some(t) => Mat::rows(t, op, "xd", n)?,
        None => xm,
    };
    let h = new_f32([nrows, r], op)?;
    gemm_rm(op, nrows, r, n, xam, Mat::rows(a, op, "a", n)?.t(), f32p(op, "h", &h)?, 1.0, 0.0)?;
    gemm_rm(op, nrows, m, r, Mat::rows(&h, op, "h", r)?, Mat::rows(b, op, "b", r)?.t(), yp, s as f32, 1.0)?;

    let has_d = !matches!(spec, SpecDev::None);
    let mut inputs: Vec<&Tensor> = vec![x];
    let svd = match &spec {
        SpecDev::Rows { d, .. } => {
            inputs.push(d);
            None
        }
        SpecDev::Svd { d, u, sigma, v } => {
            inputs.push(d);
            Some([d.detach(), u.detach(), sigma.detach(), v.detach()])
        }
        SpecDev::None => None,
    };
    let rows_d = match &spec {
        SpecDev::Rows { d, .. } => Some(d.detach()),
        _ => None,
    };
    inputs.extend([a, b]);
    Ok(record(y, &inputs, |needs| {
        let (nx, nd, na, nb) = if has_d { (needs[0], needs[1], needs[2], needs[3]) } else { (needs[0], false, needs[1], needs[2]) };
        Box::new(AdapterBwd {
            name,
            x_shape: x.shape().clone(),
            x: na.then(|| xd.unwrap_or_else(|| x.detach())),
            dropout,
            w: nx.then(|| w.detach()),
            a: nx.then(|| a.detach()),
            b: (nx || na).then(|| b.detach()),
            h: nb.then_some(h),
            d: rows_d.filter(|_| nx),
            zk: zk.filter(|_| nd),
            idx,
            svd: svd.filter(|_| nx || nd),
            pk: pk.filter(|_| nd),
            has_d,
            dims: (nrows, m, n, r, s),
        })
    }))
}

struct AdapterBwd {
    name: &'static str,
    x_shape: Shape,
    x: Option<Tensor>,
    dropout: Option<Dropout>,
    w: Option<Tensor>,
    a: Option<Tensor>,
    b: Option<Tensor>,
    h: Option<Tensor>,
    d: Option<Tensor>,
    zk: Option<Tensor>,
    idx: Option<DeviceBuf>,
    /// SVD form: d, u, sigma, v.
    svd: Option<[Tensor; 4]>,
    pk: Option<Tensor>,
    has_d: bool,
    dims: (usize, usize, usize, usize, f64),
}
impl Backward for AdapterBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    /// With G = dY·B [N, r], dYΓ = dY with its selected columns scaled by d, X̃ = dropout(X):
    ///   dX = dYΓ·W + s·(G·A) ⊙ mask/(1−p);  dA = s·Gᵀ·X̃;  dB = s·dYᵀ·H;  dd_j = Σ_t dY[t, i_j]·Z[t, i_j].
    /// SVD form: Q = dY·U;  dd_i = σ_i Σ_t Q[t,i]·P[t,i];  dX += (Q ⊙ c)·Vᵀ.
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "adapter_linear.backward";
        let (nrows, m, n, r, s) = self.dims;
        let (nx, nd, na, nb) = if self.has_d { (needs[0], needs[1], needs[2], needs[3]) } else { (needs[0], false, needs[1], needs[2]) };
        let gm = Mat::rows(dy, op, "dy", m)?;
        let gp = f32p(op, "dy", dy)?;
        // G = dY·B  [N, r]
        let g = match &self.b {
            Some(b) => {
                let g = DeviceBuf::new(DType::F32, nrows * r, op)?;
                gemm_rm(op, nrows, r, m, gm, Mat::rows(b, op, "b", r)?, g.ptr(), 1.0, 0.0)?;
                Some(g)
            }
            None => None,
        };
        let gmat = |g: &DeviceBuf| Mat { ptr: g.ptr(), bf16: false, s0: r as i64, s1: 1, sb: 0 };
        let dx = match (nx, &self.w, &self.a, &g) {
            (true, Some(w), Some(a), Some(g)) => {
                let dx = new_f32(self.x_shape.clone(), op)?;
                let dxp = f32p(op, "dx", &dx)?;
                let wm = Mat::rows(w, op, "w", n)?;
                match (&self.d, &self.idx) {
                    (Some(d), Some(idx)) => {
                        // dYΓ: a copy of dY with the selected columns scaled by d.
                        let copy = match &*dy.read() {
                            Storage::Cuda(b) => b.duplicate(op)?,
                            _ => return Err(Error::Cuda { op: op.into(), msg: "dy is not on the device".into() }),
                        };
                        gather_scale_cols(copy.ptr(), 0, f32p(op, "d", d)?, idx.ptr(), nrows, m, d.numel(), op)?;
                        let cm = Mat { ptr: copy.ptr(), bf16: false, s0: m as i64, s1: 1, sb: 0 };
                        gemm_rm(op, nrows, n, m, cm, wm, dxp, 1.0, 0.0)?;
                    }
                    _ => gemm_rm(op, nrows, n, m, gm, wm, dxp, 1.0, 0.0)?,
                }
                let am = Mat::rows(a, op, "a", n)?;
                match self.dropout {
                    Some(dr) => {
                        let ga = DeviceBuf::new(DType::F32, nrows * n, op)?;
                        gemm_rm(op, nrows, n, r, gmat(g), am, ga.ptr(), s as f32, 0.0)?;
                        dropout_apply(dxp, ga.ptr(), nrows * n, dr, true, op)?;
                    }
                    None => gemm_rm(op, nrows, n, r, gmat(g), am, dxp, s as f32, 1.0)?,
                }
                Some(dx)
            }
            _ => None,
        };
        let mut dd = match (nd, &self.zk, &self.idx) {
            (true, Some(zk), Some(idx)) => {
                let k = zk.dims()[1];
                let dd = new_f32([k], op)?;
                col_dot(f32p(op, "dd", &dd)?, gp, m, idx.ptr(), f32p(op, "zk", zk)?, 0, nrows, k, op)?;
                Some(dd)
            }
            _ => None,
        };
        let da = match (na, &self.x, &g) {
            (true, Some(x), Some(g)) => {
                let da = new_f32([r, n], op)?;
                gemm_rm(op, r, n, nrows, gmat(g).t(), Mat::rows(x, op, "x", n)?, f32p(op, "da", &da)?, s as f32, 0.0)?;
                Some(da)
            }
            _ => None,
        };
        let db = match (nb, &self.h) {
            (true, Some(h)) => {
                let db = new_f32([m, r], op)?;
                gemm_rm(op, m, r, nrows, gm.t(), Mat::rows(h, op, "h", r)?, f32p(op, "db", &db)?, s as f32, 0.0)?;
                Some(db)
            }
            _ => None,
        };
        if let Some([d, u, sigma, v]) = &self.svd {
            let k = sigma.numel();
            let q = DeviceBuf::new(DType::F32, nrows * k, op)?;
            gemm_rm(op, nrows, k, m, gm, Mat::rows(u, op, "u", k)?, q.ptr(), 1.0, 0.0)?;
            if let (true, Some(p)) = (nd, &self.pk) {
                let t = new_f32([k], op)?;
                col_dot(f32p(op, "dd", &t)?, q.ptr(), k, 0, f32p(op, "p", p)?, f32p(op, "sigma", sigma)?, nrows, k, op)?;
                dd = Some(t);
            }
            if let Some(dxt) = &dx {
                let c = svd_coef(d, sigma, op)?;
                let qc = DeviceBuf::new(DType::F32, nrows * k, op)?;
                scale_cols(qc.ptr(), q.ptr(), c.ptr(), nrows, k, op)?;
                let qcm = Mat { ptr: qc.ptr(), bf16: false, s0: k as i64, s1: 1, sb: 0 };
                gemm_rm(op, nrows, n, k, qcm, Mat::rows(v, op, "v", k)?.t(), f32p(op, "dx", dxt)?, 1.0, 1.0)?;
            }
        }
        Ok(if self.has_d { vec![dx, dd, da, db] } else { vec![dx, da, db] })
    }
}

// ---------------------------------------------------------------------------------------------
// optimizer and gradient utilities
