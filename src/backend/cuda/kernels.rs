//! [`Kernels`] on the CUDA device: each method checks that its buffers are device buffers of the
//! dtype the kernel reads (f32 activations and trainables; the GEMM's right operand f32 or bf16)
//! and launches the kernels of `cuda/<family>.cu`. Nothing here records autograd steps.

use super::{as_bytes, blocks_for, launch, Arg, DeviceBuf};
use crate::backend::{AdamWStep, Gemm, Kernels};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// The CUDA device.
pub struct Cuda;

/// Device address of `s`, which must be a device buffer (of `dtype` when given).
pub(crate) fn dptr(s: &Storage, op: &str, arg: &str, dtype: Option<DType>) -> Result<u64> {
    match s {
        Storage::Cuda(b) => match dtype {
            Some(dt) if b.dtype() != dt => Err(Error::Cuda { op: op.into(), msg: format!("{arg} must be {dt} on the device, got {}", b.dtype()) }),
            _ => Ok(b.ptr()),
        },
        _ => Err(Error::Cuda { op: op.into(), msg: format!("{arg} is not on the device; move every input with Tensor::to_device") }),
    }
}
/// As [`dptr`] for an f32 buffer.
pub(crate) fn f32p(s: &Storage, op: &str, arg: &str) -> Result<u64> {
    dptr(s, op, arg, Some(DType::F32))
}

pub(crate) fn grid1(n: usize) -> (u32, u32, u32) {
    (blocks_for(n), 1, 1)
}

/// A GEMM operand: element (i, k) of batch b at ptr[b·sb + i·s0 + k·s1] (elements, not bytes).
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: u64,
    pub bf16: bool,
    pub s0: i64,
    pub s1: i64,
    pub sb: i64,
}
impl Mat {
    /// Row-major [.., cols] starting at element `off` of `s`.
    pub fn rows(s: &Storage, op: &str, arg: &str, cols: usize, off: usize) -> Result<Mat> {
        let p = dptr(s, op, arg, None)?;
        let bf16 = s.dtype() == DType::BF16;
        if !bf16 && s.dtype() != DType::F32 {
            return Err(Error::Cuda { op: op.into(), msg: format!("{arg} must be f32 or bf16 on the device, got {}", s.dtype()) });
        }
        let bytes = if bf16 { 2 } else { 4 };
        Ok(Mat { ptr: p + (off * bytes) as u64, bf16, s0: cols as i64, s1: 1, sb: 0 })
    }
    pub fn t(self) -> Mat {
        Mat { s0: self.s1, s1: self.s0, ..self }
    }
    pub fn batch(self, sb: usize) -> Mat {
        Mat { sb: sb as i64, ..self }
    }
}

/// C(i, j) = alpha·Σ_k A(i, k)·B(k, j) + beta·C(i, j) for i < m, j < n, over `batch` batches;
/// C(i, j) at c + b·scb + i·scm + j·scn. A is f32; B f32 or bf16 (tensor cores).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
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

fn fill(y: u64, v: f32, n: usize, op: &str) -> Result<()> {
    launch("fill_f32", grid1(n), 256, &[Arg::Ptr(y), Arg::F32(v), Arg::I64(n as i64)], || format!("{op}: fill {n}"))
}

/// Σ x (or Σ x² with `squares`) over an f32 device buffer, accumulated in f64 on the device.
pub(crate) fn reduce_sum(x: &Storage, squares: bool, op: &str) -> Result<f64> {
    let acc = DeviceBuf::zeros(DType::F32, 2, op)?;
    let n = x.len();
    launch(
        "reduce_sum",
        (blocks_for(n).min(1024), 1, 1),
        256,
        &[Arg::Ptr(acc.ptr()), Arg::Ptr(f32p(x, op, "x")?), Arg::I64(n as i64), Arg::I32(squares as i32)],
        || format!("{op}: {n} elements"),
    )?;
    let b = acc.to_bytes()?;
    Ok(f64::from_le_bytes(b[..8].try_into().map_err(|_| Error::Cuda { op: op.into(), msg: "reduce_sum read back fewer than 8 bytes".into() })?))
}

impl Kernels for Cuda {
    fn device(&self) -> Device {
        Device::Cuda
    }

    fn zeros(&self, dtype: DType, n: usize, op: &'static str) -> Result<Storage> {
        if dtype != DType::F32 {
            return Err(Error::dtype(op, "buffer", "f32 (the device computes in f32)", dtype));
        }
        Ok(Storage::Cuda(DeviceBuf::zeros(dtype, n, op)?))
    }

    fn upload(&self, src: &Storage, dtype: DType, op: &'static str) -> Result<Storage> {
        let n = src.len();
        if let (Storage::Cuda(b), true) = (src, src.dtype() == dtype) {
            return Ok(Storage::Cuda(b.duplicate(op)?));
        }
        let buf = DeviceBuf::new(dtype, n, op)?;
        // Convert and upload in tiles so a mapped or quantized weight is never copied whole.
        const TILE: usize = 1 << 20;
        let mut tmp = vec![0f32; TILE.min(n)];
        for start in (0..n).step_by(TILE) {
            let len = TILE.min(n - start);
            src.try_read_into(start, &mut tmp[..len])?;
            let bytes: Vec<u8> = match dtype {
                DType::F32 => as_bytes(&tmp[..len]).to_vec(),
                DType::BF16 => tmp[..len].iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
                other => return Err(Error::dtype(op, "dtype", "f32 or bf16 on the device", other)),
            };
            buf.write_range(start, &bytes, op)?;
        }
        Ok(Storage::Cuda(buf))
    }

    fn add(&self, y: &mut Storage, a: &Storage, b: &Storage, op: &'static str) -> Result<()> {
        let n = a.len();
        let args = [Arg::Ptr(f32p(y, op, "out")?), Arg::Ptr(f32p(a, op, "a")?), Arg::Ptr(f32p(b, op, "b")?), Arg::I64(n as i64), Arg::I64(b.len() as i64)];
        launch("add_bcast", grid1(n), 256, &args, || format!("{op}: a {n} b {}", b.len()))
    }

    fn add_assign(&self, acc: &mut Storage, g: &Storage, op: &'static str) -> Result<()> {
        let n = acc.len();
        launch("add_inplace", grid1(n), 256, &[Arg::Ptr(f32p(acc, op, "acc")?), Arg::Ptr(f32p(g, op, "grad")?), Arg::I64(n as i64)], || format!("{op}: {n}"))
    }

    fn scale_assign(&self, x: &mut Storage, s: f64, op: &'static str) -> Result<()> {
        let n = x.len();
        let p = f32p(x, op, "x")?;
        launch("scale_f32", grid1(n), 256, &[Arg::Ptr(p), Arg::Ptr(p), Arg::F32(s as f32), Arg::I64(n as i64)], || format!("{op}: {n}"))
    }

    fn sum_squares(&self, x: &Storage, op: &'static str) -> Result<f64> {
        reduce_sum(x, true, op)
    }

    /// Σ x² is NaN or ∞ exactly when some element is (squares of finite f32 values cannot
    /// overflow the f64 sum; a square above f32's range, |x| > 1.8e19, also reads as not finite).
    fn all_finite(&self, x: &Storage, op: &'static str) -> Result<bool> {
        Ok(reduce_sum(x, true, op)?.is_finite())
    }

    fn gemm(&self, c: &mut Storage, a: &Storage, b: &Storage, g: &Gemm, op: &'static str) -> Result<()> {
        let (m, k, n) = (g.m, g.k, g.n);
        let am = if g.ta { Mat::rows(a, op, "a", m, g.a_off)?.t() } else { Mat::rows(a, op, "a", k, g.a_off)? }.batch(m * k);
        let bm = if g.tb { Mat::rows(b, op, "b", k, g.b_off)?.t() } else { Mat::rows(b, op, "b", n, g.b_off)? }.batch(if g.b_batched { k * n } else { 0 });
        let cp = f32p(c, op, "c")? + (g.c_off * 4) as u64;
        let (alpha, beta) = (g.alpha as f32, g.beta as f32);
        if !g.b_batched && !g.ta {
            // One GEMM over batch·m rows.
            gemm_strided(op, g.batch * m, n, k, 1, am, bm, cp, (n, 1, 0), alpha, beta)
        } else {
            gemm_strided(op, m, n, k, g.batch, am, bm, cp, (n, 1, m * n), alpha, beta)
        }
    }

    fn rms_norm_fwd(&self, y: &mut Storage, rstd: &mut Storage, x: &Storage, w: &Storage, c: usize, eps: f64) -> Result<()> {
        const OP: &str = "rms_norm";
        let rows = x.len() / c;
        let args = [
            Arg::Ptr(f32p(y, OP, "out")?),
            Arg::Ptr(f32p(rstd, OP, "rstd")?),
            Arg::Ptr(f32p(x, OP, "x")?),
            Arg::Ptr(f32p(w, OP, "w (norm weights are kept f32 on the device)")?),
            Arg::I32(c as i32),
            Arg::F32(eps as f32),
        ];
        launch("rms_norm_fwd", (rows as u32, 1, 1), 256, &args, || format!("{OP}: {rows} rows of {c}"))
    }

    fn rms_norm_bwd(&self, dx: Option<&mut Storage>, dw: Option<&mut Storage>, dy: &Storage, x: &Storage, w: &Storage, rstd: &Storage, c: usize) -> Result<()> {
        const OP: &str = "rms_norm.backward";
        let rows = x.len() / c;
        let dxp = dx.map(|s| f32p(s, OP, "dx")).transpose()?.unwrap_or(0);
        let dwp = dw.map(|s| f32p(s, OP, "dw")).transpose()?.unwrap_or(0);
        if dwp != 0 {
            // The kernel accumulates dw with atomics.
            fill(dwp, 0.0, c, OP)?;
        }
        let args = [
            Arg::Ptr(dxp),
            Arg::Ptr(dwp),
            Arg::Ptr(f32p(dy, OP, "dy")?),
            Arg::Ptr(f32p(x, OP, "x")?),
            Arg::Ptr(f32p(w, OP, "w")?),
            Arg::Ptr(f32p(rstd, OP, "rstd")?),
            Arg::I32(c as i32),
        ];
        launch("rms_norm_bwd", (rows as u32, 1, 1), 256, &args, || format!("{OP}: {rows} rows of {c}"))
    }

    fn rms_norm_bwd_from_y(&self, dx: &mut Storage, dy: &Storage, y: &Storage, w: &Storage, rstd: &Storage, c: usize) -> Result<()> {
        const OP: &str = "rms_norm.backward";
        let rows = y.len() / c;
        let args = [
            Arg::Ptr(f32p(dx, OP, "dx")?),
            Arg::Ptr(f32p(dy, OP, "dy")?),
            Arg::Ptr(f32p(y, OP, "y")?),
            Arg::Ptr(f32p(w, OP, "w")?),
            Arg::Ptr(f32p(rstd, OP, "rstd")?),
            Arg::I32(c as i32),
        ];
        launch("rms_norm_bwd_from_y", (rows as u32, 1, 1), 256, &args, || format!("{OP}: {rows} rows of {c}"))
    }

    fn adamw_step(&self, p: &mut Storage, m: &mut Storage, v: &mut Storage, g: &Storage, h: &AdamWStep) -> Result<()> {
        const OP: &str = "adamw";
        let n = p.len();
        let ibc1 = 1.0 / (1.0 - h.beta1.powi(h.step as i32));
        let ibc2 = 1.0 / (1.0 - h.beta2.powi(h.step as i32));
        let args = [
            Arg::Ptr(f32p(p, OP, "param")?),
            Arg::Ptr(f32p(m, OP, "m")?),
            Arg::Ptr(f32p(v, OP, "v")?),
            Arg::Ptr(f32p(g, OP, "grad")?),
            Arg::I64(n as i64),
            Arg::F32(h.lr as f32),
            Arg::F32(h.beta1 as f32),
            Arg::F32(h.beta2 as f32),
            Arg::F32(h.eps as f32),
            Arg::F32(h.weight_decay as f32),
            Arg::F32(ibc1 as f32),
            Arg::F32(ibc2 as f32),
        ];
        launch("adamw_step", grid1(n), 256, &args, || format!("{OP}: {n}"))
    }

    // --- adapter helpers ----------------------------------------------------------------------

    fn dropout_apply(&self, y: &mut Storage, x: &Storage, p: f64, seed: u64, accumulate: bool) -> Result<()> {
        const OP: &str = "dropout";
        let n = x.len();
        let args = [Arg::Ptr(f32p(y, OP, "y")?), Arg::Ptr(f32p(x, OP, "x")?), Arg::I64(n as i64), Arg::U64(seed), Arg::F64(p), Arg::I32(accumulate as i32)];
        launch("dropout_apply", grid1(n), 256, &args, || format!("{OP}: {n} elements"))
    }

    fn gather_scale_cols(&self, z: &mut Storage, zk: &mut Storage, d: &Storage, idx: &[u32], m: usize) -> Result<()> {
        const OP: &str = "speclora_linear";
        let (k, rows) = (idx.len(), z.len() / m);
        let ib = index_buf(idx, OP)?;
        let args = [
            Arg::Ptr(f32p(z, OP, "z")?),
            Arg::Ptr(f32p(zk, OP, "zk")?),
            Arg::Ptr(f32p(d, OP, "d")?),
            Arg::Ptr(ib.ptr()),
            Arg::I64(rows as i64),
            Arg::I64(m as i64),
            Arg::I64(k as i64),
        ];
        launch("gather_scale_cols", grid1(rows * k), 256, &args, || format!("{OP}: {rows}×{m}, {k} columns"))
    }

    fn gather_cols(&self, out: &mut Storage, z: &Storage, d: &Storage, idx: &[u32], m: usize, shift: f64) -> Result<()> {
        const OP: &str = "speclora_linear.backward";
        let (k, rows) = (idx.len(), z.len() / m);
        let ib = index_buf(idx, OP)?;
        let args = [
            Arg::Ptr(f32p(out, OP, "out")?),
            Arg::Ptr(f32p(z, OP, "z")?),
            Arg::Ptr(f32p(d, OP, "d")?),
            Arg::Ptr(ib.ptr()),
            Arg::I64(rows as i64),
            Arg::I64(m as i64),
            Arg::I64(k as i64),
            Arg::F32(shift as f32),
        ];
        launch("gather_cols", grid1(rows * k), 256, &args, || format!("{OP}: {rows}×{m}, {k} columns"))
    }

    fn gather_rows(&self, out: &mut Storage, w: &Storage, idx: &[u32], n: usize) -> Result<()> {
        const OP: &str = "speclora_linear.backward";
        let k = idx.len();
        let name = match w.dtype() {
            DType::F32 => "gather_rows_f32",
            DType::BF16 => "gather_rows_bf16",
            other => return Err(Error::Cuda { op: OP.into(), msg: format!("w must be f32 or bf16 on the device, got {other}") }),
        };
        let ib = index_buf(idx, OP)?;
        let args = [Arg::Ptr(f32p(out, OP, "out")?), Arg::Ptr(dptr(w, OP, "w", None)?), Arg::Ptr(ib.ptr()), Arg::I64(k as i64), Arg::I64(n as i64)];
        launch(name, grid1(k * n), 256, &args, || format!("{OP}: {k} rows of {n}"))
    }

    fn scale_cols(&self, out: &mut Storage, p: &Storage, c: &Storage) -> Result<()> {
        const OP: &str = "scale_cols";
        let (k, n) = (c.len(), p.len());
        let args = [Arg::Ptr(f32p(out, OP, "out")?), Arg::Ptr(f32p(p, OP, "p")?), Arg::Ptr(f32p(c, OP, "c")?), Arg::I64((n / k) as i64), Arg::I64(k as i64)];
        launch("scale_cols", grid1(n), 256, &args, || format!("{OP}: {}×{k}", n / k))
    }

    fn svd_coef(&self, c: &mut Storage, d: &Storage, sigma: &Storage) -> Result<()> {
        const OP: &str = "speclora_svd_linear";
        let k = c.len();
        let args = [Arg::Ptr(f32p(c, OP, "c")?), Arg::Ptr(f32p(d, OP, "d")?), Arg::Ptr(f32p(sigma, OP, "sigma")?), Arg::I64(k as i64)];
        launch("svd_coef", grid1(k), 256, &args, || format!("{OP}: k={k}"))
    }

    fn col_dot(&self, dd: &mut Storage, a: &Storage, lda: usize, idx: Option<&[u32]>, b: &Storage, w: Option<&Storage>, divide: bool) -> Result<()> {
        const OP: &str = "col_dot";
        let k = dd.len();
        let rows = b.len() / k.max(1);
        let ib = idx.map(|ix| index_buf(ix, OP)).transpose()?;
        let args = [
            Arg::Ptr(f32p(dd, OP, "dd")?),
            Arg::Ptr(f32p(a, OP, "a")?),
            Arg::I64(lda as i64),
            Arg::Ptr(ib.as_ref().map_or(0, |b| b.ptr())),
            Arg::Ptr(f32p(b, OP, "b")?),
            Arg::Ptr(w.map(|w| f32p(w, OP, "w")).transpose()?.unwrap_or(0)),
            Arg::I32(divide as i32),
            Arg::I64(rows as i64),
            Arg::I64(k as i64),
        ];
        launch("col_dot", (k as u32, 1, 1), 256, &args, || format!("{OP}: {rows} rows, {k} columns"))
    }

    fn add_scaled(&self, y: &mut Storage, x: &Storage, s: f64) -> Result<()> {
        const OP: &str = "add_scaled";
        let n = y.len();
        launch("add_scaled", grid1(n), 256, &[Arg::Ptr(f32p(y, OP, "y")?), Arg::Ptr(f32p(x, OP, "x")?), Arg::F32(s as f32), Arg::I64(n as i64)], || {
            format!("{OP}: {n}")
        })
    }

    fn sub_diag(&self, mm: &mut Storage, v: &Storage) -> Result<()> {
        const OP: &str = "sub_diag";
        let r = v.len();
        launch("sub_diag", grid1(r), 256, &[Arg::Ptr(f32p(mm, OP, "m")?), Arg::Ptr(f32p(v, OP, "v")?), Arg::I64(r as i64)], || format!("{OP}: r={r}"))
    }

    fn swiglu_recompute(&self, x: &mut Storage, g: &Storage, u: &Storage) -> Result<()> {
        const OP: &str = "swiglu_adapter_linear";
        let n = x.len();
        // The forward kernel of the swiglu op (cuda/elementwise.cu).
        let args = [Arg::Ptr(f32p(x, OP, "x")?), Arg::Ptr(f32p(g, OP, "gate")?), Arg::Ptr(f32p(u, OP, "up")?), Arg::I64(n as i64)];
        launch("swiglu_fwd", grid1(n), 256, &args, || format!("{OP}: {n}"))
    }

    fn swiglu_bwd_in_place(&self, dx_dg: &mut Storage, du: &mut Storage, g: &Storage, u: &Storage) -> Result<()> {
        const OP: &str = "swiglu_adapter_linear.backward";
        let n = du.len();
        let args =
            [Arg::Ptr(f32p(dx_dg, OP, "dx")?), Arg::Ptr(f32p(du, OP, "du")?), Arg::Ptr(f32p(g, OP, "gate")?), Arg::Ptr(f32p(u, OP, "up")?), Arg::I64(n as i64)];
        launch("swiglu_bwd_in_place", grid1(n), 256, &args, || format!("{OP}: {n}"))
    }

    fn dora_norms(&self, nu: &mut Storage, wnorm2: &Storage, b: &Storage, awt: &Storage, aat: &Storage, r: usize, s: f64) -> Result<()> {
        const OP: &str = "dora_row_norms";
        let m = nu.len();
        let args = [
            Arg::Ptr(f32p(nu, OP, "nu")?),
            Arg::Ptr(f32p(wnorm2, OP, "wnorm2")?),
            Arg::Ptr(f32p(b, OP, "b")?),
            Arg::Ptr(f32p(awt, OP, "awt")?),
            Arg::Ptr(f32p(aat, OP, "aat")?),
            Arg::I64(m as i64),
            Arg::I64(r as i64),
            Arg::F32(s as f32),
        ];
        launch("dora_norms", grid1(m), 256, &args, || format!("{OP}: m={m} r={r}"))
    }

    fn dora_scale(&self, g: &mut Storage, nu_hat: &mut Storage, nu: &Storage, mag: &Storage, floor: f64) -> Result<()> {
        const OP: &str = "dora_linear";
        let m = g.len();
        let args = [
            Arg::Ptr(f32p(g, OP, "g")?),
            Arg::Ptr(f32p(nu_hat, OP, "nu_hat")?),
            Arg::Ptr(f32p(nu, OP, "nu")?),
            Arg::Ptr(f32p(mag, OP, "mag")?),
            Arg::F32(floor as f32),
            Arg::I64(m as i64),
        ];
        launch("dora_scale", grid1(m), 256, &args, || format!("{OP}: m={m}"))
    }
}

/// An index list uploaded as a temporary device buffer of u32 (k entries; at least one word).
fn index_buf(idx: &[u32], op: &str) -> Result<DeviceBuf> {
    let b = DeviceBuf::new(DType::F32, idx.len().max(1), op)?;
    if !idx.is_empty() {
        b.write_bytes(as_bytes(idx), op)?;
    }
    Ok(b)
}
