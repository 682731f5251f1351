//! The device path of every op in [`crate::ops`]: the op layer validates shapes and dtypes, sees
//! (through [`crate::device::on_cuda`]) that its inputs live on the GPU, and calls the function of
//! the same name here. Each function launches the kernels of `cuda/<family>.cu`, records its own
//! backward step (the same math as the CPU op's backward, written beside it), and returns device
//! tensors. Activations and trainables are f32; frozen matrices may be bf16 (the tensor-core GEMM
//! reads them directly) or f32.

use super::{as_bytes, blocks_for, launch, Arg, DeviceBuf};
use crate::autograd::{record, Backward, GradStore};
use crate::dtype::DType;
use crate::error::{Error, Result};
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
fn zeros_f32(shape: impl Into<Shape>, op: &str) -> Result<Tensor> {
    let shape = shape.into();
    let b = DeviceBuf::zeros(DType::F32, shape.numel(), op)?;
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
fn scalar_value(t: &Tensor) -> Result<f64> {
    Ok(t.to_vec_f64()[0])
}
fn scalar_out(v: f64, op: &str) -> Result<Tensor> {
    let b = DeviceBuf::from_f32(&[v as f32], op)?;
    Ok(Tensor::from_storage(Storage::Cuda(b), Shape::scalar()))
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
    fn batch(self, sb: usize) -> Mat {
        Mat { sb: sb as i64, ..self }
    }
    fn offset(self, elems: usize) -> Mat {
        let bytes = if self.bf16 { 2 } else { 4 };
        Mat { ptr: self.ptr + (elems * bytes) as u64, ..self }
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
// matmul

/// Batched matmul on the device (see ops::matmul): a [.., m, k] (or [.., k, m] with ta),
/// b [k, n] / [.., k, n] (or transposed with tb).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool, batch: usize, m: usize, k: usize, n: usize, b_batched: bool, shape: Shape) -> Result<Tensor> {
    let op = "matmul";
    let (am, bm) = operands(op, a, b, ta, tb, m, k, n, b_batched)?;
    let y = new_f32(shape, op)?;
    let c = f32p(op, "out", &y)?;
    if !b_batched && !ta {
        gemm_rm(op, batch * m, n, k, am, bm, c, 1.0, 0.0)?;
    } else {
        gemm(op, m, n, k, batch, am, bm, c, (n, 1, m * n), 1.0, 0.0)?;
    }
    let d = MmDims { batch, m, k, n, ta, tb, b_batched };
    Ok(record(y, &[a, b], |needs| {
        Box::new(MatmulBwd { a: needs[1].then(|| a.detach()), b: needs[0].then(|| b.detach()), a_shape: a.shape().clone(), b_shape: b.shape().clone(), d })
    }))
}

#[derive(Clone, Copy)]
struct MmDims {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    b_batched: bool,
}

/// op(A)(i, kk) and op(B)(kk, j) as strided operands.
#[allow(clippy::too_many_arguments)]
fn operands(op: &str, a: &Tensor, b: &Tensor, ta: bool, tb: bool, m: usize, k: usize, n: usize, b_batched: bool) -> Result<(Mat, Mat)> {
    let am = if ta { Mat::rows(a, op, "a", m)?.t() } else { Mat::rows(a, op, "a", k)? }.batch(m * k);
    let bm = if tb { Mat::rows(b, op, "b", k)?.t() } else { Mat::rows(b, op, "b", n)? }.batch(if b_batched { k * n } else { 0 });
    Ok((am, bm))
}

struct MatmulBwd {
    a: Option<Tensor>,
    b: Option<Tensor>,
    a_shape: Shape,
    b_shape: Shape,
    d: MmDims,
}
impl Backward for MatmulBwd {
    fn name(&self) -> &'static str {
        "matmul"
    }
    /// dA_op = dY·op(B)ᵀ (written in A's layout);  dB_op = op(A)ᵀ·dY (summed over the batch when
    /// B is shared).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "matmul.backward";
        let MmDims { batch, m, k, n, ta, tb, b_batched } = self.d;
        let g = Mat::rows(dy, op, "dy", n)?.batch(m * n);
        let da = match (&self.b, needs[0]) {
            (Some(b), true) => {
                let bm = if tb { Mat::rows(b, op, "b", k)?.t() } else { Mat::rows(b, op, "b", n)? }.batch(if b_batched { k * n } else { 0 });
                let da = new_f32(self.a_shape.clone(), op)?;
                let c = f32p(op, "da", &da)?;
                // (i, kk) = Σ_j dY(i, j)·op(B)(kk, j)
                if !b_batched && !ta {
                    gemm_rm(op, batch * m, k, n, g, bm.t(), c, 1.0, 0.0)?;
                } else {
                    let cs = if ta { (1, m, m * k) } else { (k, 1, m * k) };
                    gemm(op, m, k, n, batch, g, bm.t(), c, cs, 1.0, 0.0)?;
                }
                Some(da)
            }
            _ => None,
        };
        let db = match (&self.a, needs[1]) {
            (Some(a), true) => {
                let am = if ta { Mat::rows(a, op, "a", m)?.t() } else { Mat::rows(a, op, "a", k)? }.batch(m * k);
                let db = new_f32(self.b_shape.clone(), op)?;
                let c = f32p(op, "db", &db)?;
                // (kk, j) = Σ_i op(A)(i, kk)·dY(i, j), stored in B's layout.
                let (scm, scn) = if tb { (1, k) } else { (n, 1) };
                if b_batched {
                    gemm(op, k, n, m, batch, am.t(), g, c, (scm, scn, k * n), 1.0, 0.0)?;
                } else if !ta {
                    // Rows of all batches are contiguous: one product over batch·m rows.
                    gemm(op, k, n, batch * m, 1, am.t(), g, c, (scm, scn, 0), 1.0, 0.0)?;
                } else {
                    for i in 0..batch {
                        let beta = if i == 0 { 0.0 } else { 1.0 };
                        gemm(op, k, n, m, 1, am.offset(i * m * k).t(), g.offset(i * m * n), c, (scm, scn, 0), 1.0, beta)?;
                    }
                }
                Some(db)
            }
            _ => None,
        };
        Ok(vec![da, db])
    }
}

// ---------------------------------------------------------------------------------------------
// elementwise

fn binary(name: &'static str, a: &Tensor, b: &Tensor, op: &str) -> Result<Tensor> {
    let y = new_f32(a.shape().clone(), op)?;
    let n = a.numel();
    launch(
        name,
        grid1(n),
        256,
        &[Arg::Ptr(f32p(op, "out", &y)?), Arg::Ptr(f32p(op, "a", a)?), Arg::Ptr(f32p(op, "b", b)?), Arg::I64(n as i64), Arg::I64(b.numel() as i64)],
        || format!("{op}: a {} b {}", a.shape(), b.shape()),
    )?;
    Ok(y)
}

/// Σ over the leading rows of dy [rows, bn] (times a when given): the gradient of a broadcast
/// operand of bn elements.
fn sum_leading(dy: &Tensor, a: Option<&Tensor>, shape: Shape, op: &str) -> Result<Tensor> {
    let bn = shape.numel();
    let out = new_f32(shape, op)?;
    let ap = match a {
        Some(a) => f32p(op, "a", a)?,
        None => 0,
    };
    launch(
        "sum_leading",
        grid1(bn),
        256,
        &[Arg::Ptr(f32p(op, "out", &out)?), Arg::Ptr(f32p(op, "dy", dy)?), Arg::Ptr(ap), Arg::I64((dy.numel() / bn) as i64), Arg::I64(bn as i64)],
        || format!("{op}: dy {}", dy.shape()),
    )?;
    Ok(out)
}

pub(crate) fn add(a: &Tensor, b: &Tensor, broadcast: bool) -> Result<Tensor> {
    let y = binary("add_bcast", a, b, "add")?;
    let b_shape = b.shape().clone();
    Ok(record(y, &[a, b], |_| Box::new(AddBwd { b_shape, broadcast })))
}
struct AddBwd {
    b_shape: Shape,
    broadcast: bool,
}
impl Backward for AddBwd {
    fn name(&self) -> &'static str {
        "add"
    }
    /// da = dy;  db = dy (summed over the broadcast rows).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let db = match (needs[1], self.broadcast) {
            (false, _) => None,
            (true, true) => Some(sum_leading(dy, None, self.b_shape.clone(), "add.backward")?),
            (true, false) => Some(dy.detach()),
        };
        Ok(vec![needs[0].then(|| dy.detach()), db])
    }
}

pub(crate) fn mul(a: &Tensor, b: &Tensor, broadcast: bool) -> Result<Tensor> {
    let y = binary("mul_bcast", a, b, "mul")?;
    Ok(record(y, &[a, b], |needs| Box::new(MulBwd { a: needs[1].then(|| a.detach()), b: needs[0].then(|| b.detach()), b_shape: b.shape().clone(), broadcast })))
}
struct MulBwd {
    a: Option<Tensor>,
    b: Option<Tensor>,
    b_shape: Shape,
    broadcast: bool,
}
impl Backward for MulBwd {
    fn name(&self) -> &'static str {
        "mul"
    }
    /// da = dy ⊙ b;  db = dy ⊙ a (summed over the broadcast rows).
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "mul.backward";
        let da = match &self.b {
            Some(b) => Some(binary("mul_bcast", dy, b, op)?),
            None => None,
        };
        let db = match &self.a {
            Some(a) if self.broadcast => Some(sum_leading(dy, Some(a), self.b_shape.clone(), op)?),
            Some(a) => Some(binary("mul_bcast", dy, a, op)?),
            None => None,
        };
        Ok(vec![da, db])
    }
}

fn scale_raw(x: &Tensor, s: f64, op: &str) -> Result<Tensor> {
    let y = new_f32(x.shape().clone(), op)?;
    let n = x.numel();
    launch("scale_f32", grid1(n), 256, &[Arg::Ptr(f32p(op, "out", &y)?), Arg::Ptr(f32p(op, "x", x)?), Arg::F32(s as f32), Arg::I64(n as i64)], || {
        format!("{op}: x {}", x.shape())
    })?;
    Ok(y)
}

pub(crate) fn scale(x: &Tensor, s: f64) -> Result<Tensor> {
    let y = scale_raw(x, s, "scale")?;
    Ok(record(y, &[x], |_| Box::new(ScaleBwd { s })))
}
struct ScaleBwd {
    s: f64,
}
impl Backward for ScaleBwd {
    fn name(&self) -> &'static str {
        "scale"
    }
    /// dx = s·dy.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(scale_raw(dy, self.s, "scale.backward")?)])
    }
}

pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    let op = "silu";
    let y = new_f32(x.shape().clone(), op)?;
    let n = x.numel();
    launch("silu_fwd", grid1(n), 256, &[Arg::Ptr(f32p(op, "out", &y)?), Arg::Ptr(f32p(op, "x", x)?), Arg::I64(n as i64)], || format!("{op}: x {}", x.shape()))?;
    Ok(record(y, &[x], |_| Box::new(SiluBwd { x: x.detach() })))
}
struct SiluBwd {
    x: Tensor,
}
impl Backward for SiluBwd {
    fn name(&self) -> &'static str {
        "silu"
    }
    /// dx = dy·σ(x)·(1 + x·(1 − σ(x))).
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "silu.backward";
        let dx = new_f32(dy.shape().clone(), op)?;
        let n = dy.numel();
        launch(
            "silu_bwd",
            grid1(n),
            256,
            &[Arg::Ptr(f32p(op, "dx", &dx)?), Arg::Ptr(f32p(op, "dy", dy)?), Arg::Ptr(f32p(op, "x", &self.x)?), Arg::I64(n as i64)],
            || format!("{op}: {}", dy.shape()),
        )?;
        Ok(vec![Some(dx)])
    }
}

pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let op = "swiglu";
    let y = new_f32(gate.shape().clone(), op)?;
    let n = gate.numel();
    launch(
        "swiglu_fwd",
        grid1(n),
        256,
        &[Arg::Ptr(f32p(op, "out", &y)?), Arg::Ptr(f32p(op, "gate", gate)?), Arg::Ptr(f32p(op, "up", up)?), Arg::I64(n as i64)],
        || format!("{op}: {}", gate.shape()),
    )?;
    Ok(record(y, &[gate, up], |_| Box::new(SwigluBwd { g: gate.detach(), u: up.detach() })))
}
struct SwigluBwd {
    g: Tensor,
    u: Tensor,
}
impl Backward for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    /// y = silu(g)·u:  dg = dy·u·silu'(g),  du = dy·silu(g).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "swiglu.backward";
        let n = dy.numel();
        let dg = needs[0].then(|| new_f32(dy.shape().clone(), op)).transpose()?;
        let du = needs[1].then(|| new_f32(dy.shape().clone(), op)).transpose()?;
        let p = |t: &Option<Tensor>| t.as_ref().map(|t| f32p(op, "grad", t)).transpose().map(|p| p.unwrap_or(0));
        launch(
            "swiglu_bwd",
            grid1(n),
            256,
            &[
                Arg::Ptr(p(&dg)?),
                Arg::Ptr(p(&du)?),
                Arg::Ptr(f32p(op, "dy", dy)?),
                Arg::Ptr(f32p(op, "gate", &self.g)?),
                Arg::Ptr(f32p(op, "up", &self.u)?),
                Arg::I64(n as i64),
            ],
            || format!("{op}: {}", dy.shape()),
        )?;
        Ok(vec![dg, du])
    }
}

// ---------------------------------------------------------------------------------------------
// rope

/// Rotates x [b, t, h, hd] by pos (b·t entries); `inverse` applies R(−θ).
pub(crate) fn rope_raw(x: &Tensor, pos: &[usize], inv_freq: &[f64], h: usize, hd: usize, inverse: bool) -> Result<Tensor> {
    let op = if inverse { "rope.backward" } else { "rope" };
    let y = new_f32(x.shape().clone(), op)?;
    let posv: Vec<i64> = pos.iter().map(|&p| p as i64).collect();
    let pb = upload(&posv, 8, op)?;
    let fb = upload(inv_freq, 8, op)?;
    let rows = pos.len();
    launch(
        "rope",
        grid1(rows * h * hd / 2),
        256,
        &[
            Arg::Ptr(f32p(op, "out", &y)?),
            Arg::Ptr(f32p(op, "x", x)?),
            Arg::Ptr(pb.ptr()),
            Arg::Ptr(fb.ptr()),
            Arg::I64(rows as i64),
            Arg::I32(h as i32),
            Arg::I32(hd as i32),
            Arg::I32(inverse as i32),
        ],
        || format!("{op}: x {}", x.shape()),
    )?;
    Ok(y)
}

// ---------------------------------------------------------------------------------------------
// attention

/// The attention dims as cuda/attention.cu's `Dims` struct (7 ints and a float).
#[allow(clippy::too_many_arguments)]
fn attn_dims(b: usize, t: usize, s: usize, nh: usize, nkv: usize, hd: usize, causal: bool, scale: f64) -> Arg {
    Arg::Dims([b as u32, t as u32, s as u32, nh as u32, nkv as u32, hd as u32, causal as u32, (scale as f32).to_bits()])
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&[bool]>, dims: [usize; 6], causal: bool, scale: f64) -> Result<Tensor> {
    let op = "attention";
    let [b, t, s, nh, nkv, hd] = dims;
    if hd > 256 {
        return Err(Error::Cuda { op: op.into(), msg: format!("head_dim {hd} > 256 is not supported by cuda/attention.cu") });
    }
    let o = new_f32(q.shape().clone(), op)?;
    let lse = new_f32([b, t, nh], op)?;
    let mbuf = mask.map(|m| upload(&m.iter().map(|&x| x as u8).collect::<Vec<u8>>(), 1, op)).transpose()?;
    let mp = mbuf.as_ref().map_or(0, |m| m.ptr());
    launch(
        "attn_fwd",
        (t.div_ceil(4) as u32, nh as u32, b as u32),
        128,
        &[
            Arg::Ptr(f32p(op, "out", &o)?),
            Arg::Ptr(f32p(op, "lse", &lse)?),
            Arg::Ptr(f32p(op, "q", q)?),
            Arg::Ptr(f32p(op, "k", k)?),
            Arg::Ptr(f32p(op, "v", v)?),
            Arg::Ptr(mp),
            attn_dims(b, t, s, nh, nkv, hd, causal, scale),
        ],
        || format!("{op}: q {} k {}", q.shape(), k.shape()),
    )?;
    let saved_o = o.detach();
    Ok(record(o, &[q, k, v], |_| Box::new(AttentionBwd { q: q.detach(), k: k.detach(), v: v.detach(), o: saved_o, lse, mask: mbuf, dims, causal, scale })))
}
struct AttentionBwd {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    mask: Option<DeviceBuf>,
    dims: [usize; 6],
    causal: bool,
    scale: f64,
}
impl Backward for AttentionBwd {
    fn name(&self) -> &'static str {
        "attention"
    }
    /// P = exp(scale·QKᵀ − lse) recomputed; D = rowsum(dO ⊙ O); dV = Pᵀ dO; dS = P ⊙ (dO Vᵀ − D);
    /// dQ = scale·dS K; dK = scale·dSᵀ Q (summed over the query heads sharing a kv head).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "attention.backward";
        let [b, t, s, nh, nkv, hd] = self.dims;
        let shapes = || format!("{op}: q {} k {}", self.q.shape(), self.k.shape());
        let dd = new_f32([b, t, nh], op)?;
        let rows = b * t * nh;
        launch(
            "attn_bwd_prep",
            (rows.div_ceil(4) as u32, 1, 1),
            128,
            &[Arg::Ptr(f32p(op, "D", &dd)?), Arg::Ptr(f32p(op, "dy", dy)?), Arg::Ptr(f32p(op, "o", &self.o)?), Arg::I64(rows as i64), Arg::I32(hd as i32)],
            shapes,
        )?;
        let mp = self.mask.as_ref().map_or(0, |m| m.ptr());
        let dims = attn_dims(b, t, s, nh, nkv, hd, self.causal, self.scale);
        let (qp, kp, vp, lp, dp, gp) =
            (f32p(op, "q", &self.q)?, f32p(op, "k", &self.k)?, f32p(op, "v", &self.v)?, f32p(op, "lse", &self.lse)?, f32p(op, "D", &dd)?, f32p(op, "dy", dy)?);
        let dq = if needs[0] {
            let dq = new_f32(self.q.shape().clone(), op)?;
            launch(
                "attn_bwd_dq",
                (t.div_ceil(4) as u32, nh as u32, b as u32),
                128,
                &[Arg::Ptr(f32p(op, "dq", &dq)?), Arg::Ptr(gp), Arg::Ptr(qp), Arg::Ptr(kp), Arg::Ptr(vp), Arg::Ptr(lp), Arg::Ptr(dp), Arg::Ptr(mp), dims],
                shapes,
            )?;
            Some(dq)
        } else {
            None
        };
        let (dk, dv) = if needs[1] || needs[2] {
            let dk = new_f32(self.k.shape().clone(), op)?;
            let dv = new_f32(self.v.shape().clone(), op)?;
            launch(
                "attn_bwd_dkv",
                (s.div_ceil(4) as u32, nkv as u32, b as u32),
                128,
                &[
                    Arg::Ptr(f32p(op, "dk", &dk)?),
                    Arg::Ptr(f32p(op, "dv", &dv)?),
                    Arg::Ptr(gp),
                    Arg::Ptr(qp),
                    Arg::Ptr(kp),
                    Arg::Ptr(vp),
                    Arg::Ptr(lp),
                    Arg::Ptr(dp),
                    Arg::Ptr(mp),
                    dims,
                ],
                shapes,
            )?;
            (needs[1].then_some(dk), needs[2].then_some(dv))
        } else {
            (None, None)
        };
        Ok(vec![dq, dk, dv])
    }
}

// ---------------------------------------------------------------------------------------------
// embedding

pub(crate) fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let op = "embedding";
    let (vocab, dim) = (table.dims()[0], table.dims()[1]);
    let y = new_f32([ids.len(), dim], op)?;
    let ib = upload(ids, 4, op)?;
    let name = match table.dtype() {
        DType::BF16 => "embedding_fwd_bf16",
        _ => "embedding_fwd_f32",
    };
    let n = ids.len() * dim;
    launch(
        name,
        grid1(n),
        256,
        &[Arg::Ptr(f32p(op, "out", &y)?), Arg::Ptr(ptr(op, "table", table, None)?), Arg::Ptr(ib.ptr()), Arg::I64(ids.len() as i64), Arg::I64(dim as i64)],
        || format!("{op}: table {} ids {}", table.shape(), ids.len()),
    )?;
    Ok(record(y, &[table], |_| Box::new(EmbeddingBwd { ids: ib, n: ids.len(), vocab, dim })))
}
struct EmbeddingBwd {
    ids: DeviceBuf,
    n: usize,
    vocab: usize,
    dim: usize,
}
impl Backward for EmbeddingBwd {
    fn name(&self) -> &'static str {
        "embedding"
    }
    /// dtable[id] += dy[i] for each position i with ids[i] = id.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "embedding.backward";
        let dt = zeros_f32([self.vocab, self.dim], op)?;
        let n = self.n * self.dim;
        launch(
            "embedding_bwd",
            grid1(n),
            256,
            &[Arg::Ptr(f32p(op, "dtable", &dt)?), Arg::Ptr(f32p(op, "dy", dy)?), Arg::Ptr(self.ids.ptr()), Arg::I64(self.n as i64), Arg::I64(self.dim as i64)],
            || format!("{op}: dy {}", dy.shape()),
        )?;
        Ok(vec![Some(dt)])
    }
}

// ---------------------------------------------------------------------------------------------
// reductions

/// Σ x (or Σ x² with `squares`), accumulated in f64 on the device.
pub(crate) fn reduce_sum_value(x: &Tensor, squares: bool, op: &str) -> Result<f64> {
    let acc = DeviceBuf::zeros(DType::F32, 2, op)?;
    let n = x.numel();
    launch(
        "reduce_sum",
        (blocks_for(n).min(1024), 1, 1),
        256,
        &[Arg::Ptr(acc.ptr()), Arg::Ptr(f32p(op, "x", x)?), Arg::I64(n as i64), Arg::I32(squares as i32)],
        || format!("{op}: x {}", x.shape()),
    )?;
    let b = acc.to_bytes()?;
    Ok(f64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
}

pub(crate) fn reduce(x: &Tensor, factor: f64, name: &'static str) -> Result<Tensor> {
    let s = reduce_sum_value(x, false, name)?;
    let y = scalar_out(s * factor, name)?;
    let shape = x.shape().clone();
    Ok(record(y, &[x], |_| Box::new(ReduceBwd { shape, factor, name })))
}
struct ReduceBwd {
    shape: Shape,
    factor: f64,
    name: &'static str,
}
impl Backward for ReduceBwd {
    fn name(&self) -> &'static str {
        self.name
    }
    /// dx_i = factor·dy.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let g = scalar_value(dy)? * self.factor;
        Ok(vec![Some(filled(self.shape.clone(), g as f32, "reduce.backward")?)])
    }
}

fn filled(shape: Shape, v: f32, op: &str) -> Result<Tensor> {
    let t = new_f32(shape, op)?;
    let n = t.numel();
    launch("fill_f32", grid1(n), 256, &[Arg::Ptr(f32p(op, "out", &t)?), Arg::F32(v), Arg::I64(n as i64)], || format!("{op}: {n} elements"))?;
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// loss

#[allow(clippy::too_many_arguments)]
fn ce_rows(op: &str, logits: u64, lse: u64, loss: u64, targets: u64, ignore: i64, rows: usize, vocab: usize) -> Result<()> {
    launch(
        "ce_fwd",
        (rows as u32, 1, 1),
        256,
        &[Arg::Ptr(lse), Arg::Ptr(loss), Arg::Ptr(logits), Arg::Ptr(targets), Arg::I64(ignore), Arg::I32(vocab as i32)],
        || format!("{op}: {rows} rows × {vocab}"),
    )
}
#[allow(clippy::too_many_arguments)]
fn ce_grad(op: &str, logits: u64, lse: u64, targets: u64, ignore: i64, rows: usize, vocab: usize, g: f64) -> Result<()> {
    launch(
        "ce_bwd",
        (rows as u32, 1, 1),
        256,
        &[Arg::Ptr(logits), Arg::Ptr(lse), Arg::Ptr(targets), Arg::I64(ignore), Arg::I32(vocab as i32), Arg::F32(g as f32)],
        || format!("{op}: {rows} rows × {vocab}"),
    )
}
/// Σ of the per-row losses, in f64 on the host.
fn total(loss_rows: &DeviceBuf) -> Result<f64> {
    Ok(loss_rows.to_f32()?.iter().map(|&v| v as f64).sum())
}

pub(crate) fn cross_entropy(logits: &Tensor, targets: &[i64], ignore: i64, denom: f64) -> Result<Tensor> {
    let op = "cross_entropy";
    let (rows, vocab) = (logits.dims()[0], logits.dims()[1]);
    let tb = upload(targets, 8, op)?;
    let lse = new_f32([rows], op)?;
    let lr = DeviceBuf::new(DType::F32, rows, op)?;
    ce_rows(op, f32p(op, "logits", logits)?, f32p(op, "lse", &lse)?, lr.ptr(), tb.ptr(), ignore, rows, vocab)?;
    let y = scalar_out(total(&lr)? / denom, op)?;
    Ok(record(y, &[logits], |_| Box::new(CrossEntropyBwd { logits: logits.detach(), lse, targets: tb, ignore, denom })))
}
struct CrossEntropyBwd {
    logits: Tensor,
    lse: Tensor,
    targets: DeviceBuf,
    ignore: i64,
    denom: f64,
}
impl Backward for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    /// dlogits_rj = dy/denom · (exp(x_rj − lse_r) − [j = target_r]); 0 on ignored rows.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "cross_entropy.backward";
        let g = scalar_value(dy)? / self.denom;
        let (rows, vocab) = (self.logits.dims()[0], self.logits.dims()[1]);
        let dx = match &*self.logits.read() {
            Storage::Cuda(b) => Tensor::from_storage(Storage::Cuda(b.duplicate(op)?), self.logits.shape().clone()),
            _ => return Err(Error::Cuda { op: op.into(), msg: "saved logits left the device".into() }),
        };
        ce_grad(op, f32p(op, "dx", &dx)?, f32p(op, "lse", &self.lse)?, self.targets.ptr(), self.ignore, rows, vocab, g)?;
        Ok(vec![Some(dx)])
    }
}

pub(crate) fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[i64], ignore: i64, denom: f64, chunk: usize) -> Result<Tensor> {
    let op = "linear_cross_entropy";
    let (rows, d, vocab) = (h.dims()[0], h.dims()[1], w.dims()[0]);
    let tb = upload(targets, 8, op)?;
    let lse = new_f32([rows], op)?;
    let lr = DeviceBuf::new(DType::F32, rows, op)?;
    let logits = DeviceBuf::new(DType::F32, chunk * vocab, op)?;
    let hm = Mat::rows(h, op, "h", d)?;
    let wm = Mat::rows(w, op, "w", d)?.t();
    let lp = f32p(op, "lse", &lse)?;
    for r0 in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - r0);
        // logits = h[r0..r0+n]·Wᵀ  [n, vocab]
        gemm_rm(op, n, vocab, d, hm.offset(r0 * d), wm, logits.ptr(), 1.0, 0.0)?;
        ce_rows(op, logits.ptr(), lp + 4 * r0 as u64, lr.ptr() + 4 * r0 as u64, tb.ptr() + 8 * r0 as u64, ignore, n, vocab)?;
    }
    let y = scalar_out(total(&lr)? / denom, op)?;
    Ok(record(y, &[h, w], |_| Box::new(LinearCeBwd { h: h.detach(), w: w.detach(), lse, targets: tb, ignore, denom, chunk })))
}
struct LinearCeBwd {
    h: Tensor,
    w: Tensor,
    lse: Tensor,
    targets: DeviceBuf,
    ignore: i64,
    denom: f64,
    chunk: usize,
}
impl Backward for LinearCeBwd {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }
    /// Per chunk: G = dy/denom·(softmax(h Wᵀ) − onehot) recomputed;  dh = G·W;  dW += Gᵀ·h.
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        let op = "linear_cross_entropy.backward";
        let g = scalar_value(dy)? / self.denom;
        let (rows, d, vocab) = (self.h.dims()[0], self.h.dims()[1], self.w.dims()[0]);
        let logits = DeviceBuf::new(DType::F32, self.chunk * vocab, op)?;
        let hm = Mat::rows(&self.h, op, "h", d)?;
        let wrow = Mat::rows(&self.w, op, "w", d)?;
        let dh = needs[0].then(|| new_f32([rows, d], op)).transpose()?;
        let dw = needs[1].then(|| new_f32([vocab, d], op)).transpose()?;
        let lp = f32p(op, "lse", &self.lse)?;
        let lm = Mat { ptr: logits.ptr(), bf16: false, s0: vocab as i64, s1: 1, sb: 0 };
        for r0 in (0..rows).step_by(self.chunk) {
            let n = self.chunk.min(rows - r0);
            gemm_rm(op, n, vocab, d, hm.offset(r0 * d), wrow.t(), logits.ptr(), 1.0, 0.0)?;
            ce_grad(op, logits.ptr(), lp + 4 * r0 as u64, self.targets.ptr() + 8 * r0 as u64, self.ignore, n, vocab, g)?;
            if let Some(dh) = &dh {
                // dh[r0..r0+n] = G·W  [n, d]
                gemm_rm(op, n, d, vocab, lm, wrow, f32p(op, "dh", dh)? + 4 * (r0 * d) as u64, 1.0, 0.0)?;
            }
            if let Some(dw) = &dw {
                // dW (+)= Gᵀ·h  [vocab, d]
                let beta = if r0 == 0 { 0.0 } else { 1.0 };
                gemm_rm(op, vocab, d, n, lm.t(), hm.offset(r0 * d), f32p(op, "dw", dw)?, 1.0, beta)?;
            }
        }
        Ok(vec![dh, dw])
    }
}

// ---------------------------------------------------------------------------------------------
// optimizer and gradient utilities
