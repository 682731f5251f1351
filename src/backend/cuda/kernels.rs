//! [`Kernels`] on the CUDA device: each method checks that its buffers are device buffers of the
//! dtype the kernel reads (f32 activations and trainables; the GEMM's right operand f32 or bf16)
//! and launches the kernels of `cuda/<family>.cu`. Nothing here records autograd steps.

use super::{as_bytes, blocks_for, launch, Arg, DeviceBuf};
use crate::backend::{AdamWStep, AttnDims, CeBlocks, GatedAct, Gemm, Kernels};
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

/// Host values (ids, targets, positions, masks) as a temporary device buffer of their bytes.
pub(crate) fn upload_host<T: Copy>(v: &[T], op: &str) -> Result<DeviceBuf> {
    let bytes = as_bytes(v);
    // An f32-typed buffer of the right byte length (the allocator only sees bytes).
    let words = bytes.len().div_ceil(4).max(1);
    let b = DeviceBuf::new(DType::F32, words, op)?;
    if !bytes.is_empty() {
        let mut padded = bytes.to_vec();
        padded.resize(words * 4, 0);
        b.write_bytes(&padded, op)?;
    }
    Ok(b)
}

/// Device address of an optional output (0 when absent: the kernels skip a null output).
fn opt_f32p(s: Option<&mut Storage>, op: &str, arg: &str) -> Result<u64> {
    Ok(s.map(|s| f32p(s, op, arg)).transpose()?.unwrap_or(0))
}

/// A pointwise kernel `name(y, x, n)` or `name(dx, dy, x, n)` over n elements.
fn pointwise(name: &'static str, outs: &[u64], ins: &[&Storage], op: &str) -> Result<()> {
    let n = ins[0].len();
    let mut args: Vec<Arg> = outs.iter().map(|p| Arg::Ptr(*p)).collect();
    for (i, s) in ins.iter().enumerate() {
        args.push(Arg::Ptr(f32p(s, op, if i == 0 { "x" } else { "input" })?));
    }
    args.push(Arg::I64(n as i64));
    launch(name, grid1(n), 256, &args, || format!("{op}: {n} elements"))
}

/// The attention dims as cuda/attention.cu's `Dims` struct (7 ints and a float).
fn attn_dims(d: &AttnDims) -> Arg {
    Arg::Dims([d.b as u32, d.t as u32, d.s as u32, d.nh as u32, d.nkv as u32, d.hd as u32, d.causal as u32, (d.scale as f32).to_bits()])
}

/// The sliding window as cuda/attention.cu's `window` argument (0 = none).
fn window_arg(d: &AttnDims) -> Result<i32> {
    match d.window {
        None => Ok(0),
        Some(w) => i32::try_from(w.min(d.s)).map_err(|_| Error::Cuda { op: "attention".into(), msg: format!("window {w} does not fit the kernel's int") }),
    }
}

/// Rows of CE over x [rows, vocab] at `xp`: lse (at `lse`) and per-row losses (at `loss`), of
/// the soft-capped logits c·tanh(x/c) when `cap` is set.
#[allow(clippy::too_many_arguments)]
fn ce_rows(op: &str, xp: u64, lse: u64, loss: u64, targets: u64, ignore: i64, rows: usize, vocab: usize, cap: Option<f64>) -> Result<()> {
    launch(
        "ce_fwd",
        (rows as u32, 1, 1),
        256,
        &[Arg::Ptr(lse), Arg::Ptr(loss), Arg::Ptr(xp), Arg::Ptr(targets), Arg::I64(ignore), Arg::I32(vocab as i32), Arg::F32(cap.unwrap_or(0.0) as f32)],
        || format!("{op}: {rows} rows × {vocab}"),
    )
}

/// In place over x [rows, vocab] at `xp`: x ← g·(softmax − onehot), 0 on ignored rows; under a
/// soft cap x holds raw logits, the softmax is of the capped ones and the result is times
/// 1 − (z/c)².
#[allow(clippy::too_many_arguments)]
fn ce_grad(op: &str, xp: u64, lse: u64, targets: u64, ignore: i64, rows: usize, vocab: usize, g: f64, cap: Option<f64>) -> Result<()> {
    launch(
        "ce_bwd",
        (rows as u32, 1, 1),
        256,
        &[Arg::Ptr(xp), Arg::Ptr(lse), Arg::Ptr(targets), Arg::I64(ignore), Arg::I32(vocab as i32), Arg::F32(g as f32), Arg::F32(cap.unwrap_or(0.0) as f32)],
        || format!("{op}: {rows} rows × {vocab}"),
    )
}

impl Kernels for Cuda {
    fn device(&self) -> Device {
        Device::Cuda
    }

    // --- memory -------------------------------------------------------------------------------

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
        src.release_read_pages();
        Ok(Storage::Cuda(buf))
    }

    // --- elementwise --------------------------------------------------------------------------

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

    fn mul(&self, y: &mut Storage, a: &Storage, b: &Storage, op: &'static str) -> Result<()> {
        let n = a.len();
        let args = [Arg::Ptr(f32p(y, op, "out")?), Arg::Ptr(f32p(a, op, "a")?), Arg::Ptr(f32p(b, op, "b")?), Arg::I64(n as i64), Arg::I64(b.len() as i64)];
        launch("mul_bcast", grid1(n), 256, &args, || format!("{op}: a {n} b {}", b.len()))
    }

    fn sum_leading(&self, db: &mut Storage, dy: &Storage, a: Option<&Storage>, op: &'static str) -> Result<()> {
        let bn = db.len();
        let ap = a.map(|a| f32p(a, op, "a")).transpose()?.unwrap_or(0);
        let args = [Arg::Ptr(f32p(db, op, "db")?), Arg::Ptr(f32p(dy, op, "dy")?), Arg::Ptr(ap), Arg::I64((dy.len() / bn) as i64), Arg::I64(bn as i64)];
        launch("sum_leading", grid1(bn), 256, &args, || format!("{op}: dy {} into {bn}", dy.len()))
    }

    fn scale(&self, y: &mut Storage, x: &Storage, s: f64, op: &'static str) -> Result<()> {
        let n = x.len();
        let args = [Arg::Ptr(f32p(y, op, "out")?), Arg::Ptr(f32p(x, op, "x")?), Arg::F32(s as f32), Arg::I64(n as i64)];
        launch("scale_f32", grid1(n), 256, &args, || format!("{op}: {n}"))
    }

    fn fill(&self, y: &mut Storage, v: f64, op: &'static str) -> Result<()> {
        let n = y.len();
        fill(f32p(y, op, "out")?, v as f32, n, op)
    }

    fn transpose(&self, y: &mut Storage, x: &Storage, batch: usize, rows: usize, cols: usize, op: &'static str) -> Result<()> {
        let n = batch * rows * cols;
        let args = [Arg::Ptr(f32p(y, op, "out")?), Arg::Ptr(f32p(x, op, "x")?), Arg::I64(batch as i64), Arg::I64(rows as i64), Arg::I64(cols as i64)];
        launch("transpose_f32", grid1(n), 256, &args, || format!("{op}: {batch} × [{rows}, {cols}]"))
    }

    fn silu_fwd(&self, y: &mut Storage, x: &Storage) -> Result<()> {
        pointwise("silu_fwd", &[f32p(y, "silu", "out")?], &[x], "silu")
    }

    fn silu_bwd(&self, dx: &mut Storage, dy: &Storage, x: &Storage) -> Result<()> {
        const OP: &str = "silu.backward";
        pointwise("silu_bwd", &[f32p(dx, OP, "dx")?], &[dy, x], OP)
    }

    fn swiglu_fwd(&self, y: &mut Storage, g: &Storage, u: &Storage) -> Result<()> {
        pointwise("swiglu_fwd", &[f32p(y, "swiglu", "out")?], &[g, u], "swiglu")
    }

    fn swiglu_bwd(&self, dg: Option<&mut Storage>, du: Option<&mut Storage>, dy: &Storage, g: &Storage, u: &Storage) -> Result<()> {
        const OP: &str = "swiglu.backward";
        pointwise("swiglu_bwd", &[opt_f32p(dg, OP, "dg")?, opt_f32p(du, OP, "du")?], &[dy, g, u], OP)
    }

    fn gelu_tanh_fwd(&self, y: &mut Storage, x: &Storage) -> Result<()> {
        pointwise("gelu_tanh_fwd", &[f32p(y, "gelu_tanh", "out")?], &[x], "gelu_tanh")
    }

    fn gelu_tanh_bwd(&self, dx: &mut Storage, dy: &Storage, x: &Storage) -> Result<()> {
        const OP: &str = "gelu_tanh.backward";
        pointwise("gelu_tanh_bwd", &[f32p(dx, OP, "dx")?], &[dy, x], OP)
    }

    fn geglu_fwd(&self, y: &mut Storage, g: &Storage, u: &Storage) -> Result<()> {
        pointwise("geglu_fwd", &[f32p(y, "geglu", "out")?], &[g, u], "geglu")
    }

    fn copy_cols(
        &self,
        dst: &mut Storage,
        dst_ld: usize,
        dst_off: usize,
        src: &Storage,
        src_ld: usize,
        src_off: usize,
        rows: usize,
        cols: usize,
        op: &'static str,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(f32p(dst, op, "dst")?),
            Arg::I64(dst_ld as i64),
            Arg::I64(dst_off as i64),
            Arg::Ptr(f32p(src, op, "src")?),
            Arg::I64(src_ld as i64),
            Arg::I64(src_off as i64),
            Arg::I64(rows as i64),
            Arg::I64(cols as i64),
        ];
        launch("copy_cols", grid1(rows * cols), 256, &args, || format!("{op}: {rows} rows × {cols} columns"))
    }

    fn softcap_fwd(&self, y: &mut Storage, x: &Storage, cap: f64) -> Result<()> {
        const OP: &str = "softcap";
        let n = x.len();
        let args = [Arg::Ptr(f32p(y, OP, "out")?), Arg::Ptr(f32p(x, OP, "x")?), Arg::F32(cap as f32), Arg::I64(n as i64)];
        launch("softcap_fwd", grid1(n), 256, &args, || format!("{OP}: {n} elements"))
    }

    fn softcap_bwd(&self, dx: &mut Storage, dy: &Storage, y: &Storage, cap: f64) -> Result<()> {
        const OP: &str = "softcap.backward";
        let n = dy.len();
        let args = [Arg::Ptr(f32p(dx, OP, "dx")?), Arg::Ptr(f32p(dy, OP, "dy")?), Arg::Ptr(f32p(y, OP, "y")?), Arg::F32(cap as f32), Arg::I64(n as i64)];
        launch("softcap_bwd", grid1(n), 256, &args, || format!("{OP}: {n} elements"))
    }

    fn geglu_bwd(&self, dg: Option<&mut Storage>, du: Option<&mut Storage>, dy: &Storage, g: &Storage, u: &Storage) -> Result<()> {
        const OP: &str = "geglu.backward";
        pointwise("geglu_bwd", &[opt_f32p(dg, OP, "dg")?, opt_f32p(du, OP, "du")?], &[dy, g, u], OP)
    }

    // --- reductions ---------------------------------------------------------------------------

    fn sum_squares(&self, x: &Storage, op: &'static str) -> Result<f64> {
        reduce_sum(x, true, op)
    }

    /// Σ x² is NaN or ∞ exactly when some element is (squares of finite f32 values cannot
    /// overflow the f64 sum; a square above f32's range, |x| > 1.8e19, also reads as not finite).
    fn all_finite(&self, x: &Storage, op: &'static str) -> Result<bool> {
        Ok(reduce_sum(x, true, op)?.is_finite())
    }

    fn sum(&self, y: &mut Storage, x: &Storage, factor: f64, op: &'static str) -> Result<()> {
        let s = reduce_sum(x, false, op)?;
        fill(f32p(y, op, "out")?, (s * factor) as f32, 1, op)
    }

    // --- matmul -------------------------------------------------------------------------------

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

    // --- norm ---------------------------------------------------------------------------------

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

    // --- rope ---------------------------------------------------------------------------------

    fn rope(&self, y: &mut Storage, x: &Storage, pos: &[usize], inv_freq: &[f64], h: usize, hd: usize, scale: f64, inverse: bool) -> Result<()> {
        let op = if inverse { "rope.backward" } else { "rope" };
        let posv: Vec<i64> = pos.iter().map(|&p| p as i64).collect();
        let (pb, fb) = (upload_host(&posv, op)?, upload_host(inv_freq, op)?);
        let (rows, half) = (pos.len(), inv_freq.len());
        let args = [
            Arg::Ptr(f32p(y, op, "out")?),
            Arg::Ptr(f32p(x, op, "x")?),
            Arg::Ptr(pb.ptr()),
            Arg::Ptr(fb.ptr()),
            Arg::I64(rows as i64),
            Arg::I32(h as i32),
            Arg::I32(hd as i32),
            Arg::I32(half as i32),
            Arg::F64(scale),
            Arg::I32(inverse as i32),
        ];
        // One thread per rotated pair or passed-through dim.
        let per = half + (hd - 2 * half);
        launch("rope", grid1(rows * h * per), 256, &args, || format!("{op}: {rows} rows × {h} heads × {hd} (rotary {})", 2 * half))
    }

    // --- attention ----------------------------------------------------------------------------

    fn attn_fwd(&self, o: &mut Storage, lse: &mut Storage, q: &Storage, k: &Storage, v: &Storage, mask: Option<&[bool]>, d: &AttnDims) -> Result<()> {
        const OP: &str = "attention";
        if d.hd > 256 {
            return Err(Error::Cuda { op: OP.into(), msg: format!("head_dim {} > 256 is not supported by cuda/attention.cu", d.hd) });
        }
        let mbuf = mask.map(|m| upload_host(&m.iter().map(|&x| x as u8).collect::<Vec<u8>>(), OP)).transpose()?;
        let args = [
            Arg::Ptr(f32p(o, OP, "out")?),
            Arg::Ptr(f32p(lse, OP, "lse")?),
            Arg::Ptr(f32p(q, OP, "q")?),
            Arg::Ptr(f32p(k, OP, "k")?),
            Arg::Ptr(f32p(v, OP, "v")?),
            Arg::Ptr(mbuf.as_ref().map_or(0, |m| m.ptr())),
            attn_dims(d),
            Arg::F32(d.softcap.unwrap_or(0.0) as f32),
            Arg::I32(window_arg(d)?),
        ];
        launch("attn_fwd", (d.t.div_ceil(4) as u32, d.nh as u32, d.b as u32), 128, &args, || format!("{OP}: {d:?}"))
    }

    fn attn_bwd(
        &self,
        dq: Option<&mut Storage>,
        dk: Option<&mut Storage>,
        dv: Option<&mut Storage>,
        dout: &Storage,
        q: &Storage,
        k: &Storage,
        v: &Storage,
        o: &Storage,
        lse: &Storage,
        mask: Option<&[bool]>,
        d: &AttnDims,
    ) -> Result<()> {
        const OP: &str = "attention.backward";
        let shapes = || format!("{OP}: {d:?}");
        let rows = d.b * d.t * d.nh;
        let dd = DeviceBuf::new(DType::F32, rows, OP)?;
        let gp = f32p(dout, OP, "dy")?;
        launch(
            "attn_bwd_prep",
            (rows.div_ceil(4) as u32, 1, 1),
            128,
            &[Arg::Ptr(dd.ptr()), Arg::Ptr(gp), Arg::Ptr(f32p(o, OP, "o")?), Arg::I64(rows as i64), Arg::I32(d.hd as i32)],
            shapes,
        )?;
        let mbuf = mask.map(|m| upload_host(&m.iter().map(|&x| x as u8).collect::<Vec<u8>>(), OP)).transpose()?;
        let mp = mbuf.as_ref().map_or(0, |m| m.ptr());
        let (qp, kp, vp, lp) = (f32p(q, OP, "q")?, f32p(k, OP, "k")?, f32p(v, OP, "v")?, f32p(lse, OP, "lse")?);
        let cap = Arg::F32(d.softcap.unwrap_or(0.0) as f32);
        let window = Arg::I32(window_arg(d)?);
        if let Some(dq) = dq {
            let args = [
                Arg::Ptr(f32p(dq, OP, "dq")?),
                Arg::Ptr(gp),
                Arg::Ptr(qp),
                Arg::Ptr(kp),
                Arg::Ptr(vp),
                Arg::Ptr(lp),
                Arg::Ptr(dd.ptr()),
                Arg::Ptr(mp),
                attn_dims(d),
                cap,
                window,
            ];
            launch("attn_bwd_dq", (d.t.div_ceil(4) as u32, d.nh as u32, d.b as u32), 128, &args, shapes)?;
        }
        if dk.is_some() || dv.is_some() {
            // One kernel writes both; an absent one goes to scratch.
            let scratch = |s: &Option<&mut Storage>| if s.is_none() { DeviceBuf::new(DType::F32, k.len(), OP).map(Some) } else { Ok(None) };
            let (sk, sv) = (scratch(&dk)?, scratch(&dv)?);
            let dkp = match dk {
                Some(s) => f32p(s, OP, "dk")?,
                None => sk.as_ref().map_or(0, |b| b.ptr()),
            };
            let dvp = match dv {
                Some(s) => f32p(s, OP, "dv")?,
                None => sv.as_ref().map_or(0, |b| b.ptr()),
            };
            let args = [
                Arg::Ptr(dkp),
                Arg::Ptr(dvp),
                Arg::Ptr(gp),
                Arg::Ptr(qp),
                Arg::Ptr(kp),
                Arg::Ptr(vp),
                Arg::Ptr(lp),
                Arg::Ptr(dd.ptr()),
                Arg::Ptr(mp),
                attn_dims(d),
                cap,
                window,
            ];
            launch("attn_bwd_dkv", (d.s.div_ceil(4) as u32, d.nkv as u32, d.b as u32), 128, &args, shapes)?;
        }
        Ok(())
    }

    // --- loss ---------------------------------------------------------------------------------

    fn ce_fwd(&self, lse: &mut Storage, x: &Storage, targets: &[i64], ignore: i64, vocab: usize) -> Result<f64> {
        const OP: &str = "cross_entropy";
        let rows = targets.len();
        let tb = upload_host(targets, OP)?;
        let lr = DeviceBuf::new(DType::F32, rows, OP)?;
        ce_rows(OP, f32p(x, OP, "logits")?, f32p(lse, OP, "lse")?, lr.ptr(), tb.ptr(), ignore, rows, vocab, None)?;
        Ok(lr.to_f32()?.iter().map(|&v| v as f64).sum())
    }

    fn ce_bwd(&self, x: &mut Storage, lse: &Storage, lse_off: usize, targets: &[i64], ignore: i64, vocab: usize, g: f64, softcap: Option<f64>) -> Result<()> {
        const OP: &str = "cross_entropy.backward";
        let tb = upload_host(targets, OP)?;
        ce_grad(OP, f32p(x, OP, "x")?, f32p(lse, OP, "lse")? + 4 * lse_off as u64, tb.ptr(), ignore, targets.len(), vocab, g, softcap)
    }

    /// Row chunks of `c.chunk` rows: L = h_chunk·Wᵀ [n, vocab] (tensor cores for a bf16 head),
    /// lse and the row losses from L (soft-capped inside the kernels under `c.softcap`); with dh,
    /// L becomes G = g·(softmax − onehot) (⊙ 1 − (z/c)² under a cap) in place and dh_chunk = G·W.
    fn linear_ce_fwd(&self, lse: &mut Storage, dh: Option<&mut Storage>, h: &Storage, w: &Storage, targets: &[i64], c: &CeBlocks, g: f64) -> Result<f64> {
        const OP: &str = "linear_cross_entropy";
        let (rows, d, vocab) = (targets.len(), c.d, c.vocab);
        let tb = upload_host(targets, OP)?;
        let lr = DeviceBuf::new(DType::F32, rows, OP)?;
        let logits = DeviceBuf::new(DType::F32, c.chunk.min(rows) * vocab, OP)?;
        let lm = Mat { ptr: logits.ptr(), bf16: false, s0: vocab as i64, s1: 1, sb: 0 };
        let lp = f32p(lse, OP, "lse")?;
        let dhp = dh.map(|s| f32p(s, OP, "dh")).transpose()?;
        for r0 in (0..rows).step_by(c.chunk) {
            let n = c.chunk.min(rows - r0);
            // L = h[r0..r0+n]·Wᵀ  [n, vocab]
            let hm = Mat::rows(h, OP, "h", d, r0 * d)?;
            gemm_strided(OP, n, vocab, d, 1, hm, Mat::rows(w, OP, "w", d, 0)?.t(), logits.ptr(), (vocab, 1, 0), 1.0, 0.0)?;
            ce_rows(OP, logits.ptr(), lp + 4 * r0 as u64, lr.ptr() + 4 * r0 as u64, tb.ptr() + 8 * r0 as u64, c.ignore, n, vocab, c.softcap)?;
            if let Some(dhp) = dhp {
                ce_grad(OP, logits.ptr(), lp + 4 * r0 as u64, tb.ptr() + 8 * r0 as u64, c.ignore, n, vocab, g, c.softcap)?;
                // dh[r0..r0+n] = G·W  [n, d]
                gemm_strided(OP, n, d, vocab, 1, lm, Mat::rows(w, OP, "w", d, 0)?, dhp + 4 * (r0 * d) as u64, (d, 1, 0), 1.0, 0.0)?;
            }
        }
        Ok(lr.to_f32()?.iter().map(|&v| v as f64).sum())
    }

    // --- embedding ----------------------------------------------------------------------------

    fn embedding_fwd(&self, y: &mut Storage, table: &Storage, ids: &[u32], dim: usize) -> Result<()> {
        const OP: &str = "embedding";
        let name = match table.dtype() {
            DType::BF16 => "embedding_fwd_bf16",
            DType::F32 => "embedding_fwd_f32",
            other => return Err(Error::dtype(OP, "table", "f32 or bf16 on the device", other)),
        };
        let ib = upload_host(ids, OP)?;
        let n = ids.len() * dim;
        let args =
            [Arg::Ptr(f32p(y, OP, "out")?), Arg::Ptr(dptr(table, OP, "table", None)?), Arg::Ptr(ib.ptr()), Arg::I64(ids.len() as i64), Arg::I64(dim as i64)];
        launch(name, grid1(n), 256, &args, || format!("{OP}: {} ids × {dim}", ids.len()))
    }

    fn embedding_bwd(&self, dtable: &mut Storage, dy: &Storage, ids: &[u32], dim: usize) -> Result<()> {
        const OP: &str = "embedding.backward";
        let ib = upload_host(ids, OP)?;
        let n = ids.len() * dim;
        let args = [Arg::Ptr(f32p(dtable, OP, "dtable")?), Arg::Ptr(f32p(dy, OP, "dy")?), Arg::Ptr(ib.ptr()), Arg::I64(ids.len() as i64), Arg::I64(dim as i64)];
        launch("embedding_bwd", grid1(n), 256, &args, || format!("{OP}: {} ids × {dim}", ids.len()))
    }

    // --- optimizer ----------------------------------------------------------------------------

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

    fn gated_recompute(&self, x: &mut Storage, g: &Storage, u: &Storage, act: GatedAct) -> Result<()> {
        const OP: &str = "gated_adapter_linear";
        let n = x.len();
        // The forward kernel of the swiglu / geglu op (cuda/elementwise.cu).
        let name = match act {
            GatedAct::Silu => "swiglu_fwd",
            GatedAct::GeluTanh => "geglu_fwd",
        };
        let args = [Arg::Ptr(f32p(x, OP, "x")?), Arg::Ptr(f32p(g, OP, "gate")?), Arg::Ptr(f32p(u, OP, "up")?), Arg::I64(n as i64)];
        launch(name, grid1(n), 256, &args, || format!("{OP}: {n}"))
    }

    fn gated_bwd_in_place(&self, dx_dg: &mut Storage, du: &mut Storage, g: &Storage, u: &Storage, act: GatedAct) -> Result<()> {
        const OP: &str = "gated_adapter_linear.backward";
        let n = du.len();
        let name = match act {
            GatedAct::Silu => "swiglu_bwd_in_place",
            GatedAct::GeluTanh => "geglu_bwd_in_place",
        };
        let args =
            [Arg::Ptr(f32p(dx_dg, OP, "dx")?), Arg::Ptr(f32p(du, OP, "du")?), Arg::Ptr(f32p(g, OP, "gate")?), Arg::Ptr(f32p(u, OP, "up")?), Arg::I64(n as i64)];
        launch(name, grid1(n), 256, &args, || format!("{OP}: {n}"))
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
