//! Softmax cross-entropy, fused with its backward: dlogits = (softmax − onehot)·g / denominator.
//!
//! [`linear_cross_entropy`] also fuses the LM head: logits = h·Wᵀ are computed a block at a time
//! and never stored. On the CPU the forward walks the vocabulary in column blocks with an online
//! softmax and, for a frozen head, accumulates dh in the same pass; the general backward recomputes
//! row chunks. For a 49k vocabulary this keeps the largest loss buffer at 8 MiB instead of
//! tokens × vocab.
//!
//! Targets equal to `ignore_index` (HF's −100) count for nothing. The loss is the sum over counted
//! tokens divided by `denominator` — by default the number of counted tokens in this call; a
//! trainer with gradient accumulation passes the count over the whole accumulated batch.

use super::{check_dtype, compute_dtype};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::{CeBlocks, Gemm, Kernels};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::{HostData, Storage};
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

/// Logits per block in the CPU forward of [`linear_cross_entropy`] (1024 rows × 2048 columns).
const CPU_BLOCK_LOGITS: usize = 1 << 21;

/// Options for the cross-entropy ops.
#[derive(Clone, Debug)]
pub struct CeOptions {
    pub ignore_index: i64,
    /// Divide the summed loss by this; default: the number of counted targets (at least 1).
    pub denominator: Option<f64>,
    /// Most rows per chunk in [`linear_cross_entropy`] (chunks are balanced); default keeps a
    /// chunk near 8M logits (2M on the CPU's forward, see `chunk_cols`).
    pub chunk_rows: Option<usize>,
    /// Most vocabulary columns per block in the CPU forward of [`linear_cross_entropy`] (which
    /// walks the vocabulary with an online softmax); default: 2M logits per block over the rows
    /// of a chunk, at least 512 columns.
    pub chunk_cols: Option<usize>,
    /// Soft cap c of the logits before the softmax (Gemma 2's final_logit_softcapping):
    /// z = c·tanh(logit/c). Finite and > 0; `None`: uncapped.
    pub softcap: Option<f64>,
}

impl Default for CeOptions {
    fn default() -> Self {
        CeOptions { ignore_index: -100, denominator: None, chunk_rows: None, chunk_cols: None, softcap: None }
    }
}

fn check_softcap(op: &'static str, opts: &CeOptions) -> Result<()> {
    match opts.softcap {
        Some(c) if !(c > 0.0 && c.is_finite()) => Err(Error::invalid(op, format!("softcap must be finite and > 0, got {c}"))),
        _ => Ok(()),
    }
}

fn check_targets(op: &'static str, targets: &[i64], rows: usize, vocab: usize, opts: &CeOptions) -> Result<f64> {
    if targets.len() != rows {
        return Err(Error::shape(op, "targets", format!("{rows} entries"), targets.len()));
    }
    let mut count = 0usize;
    for &t in targets {
        if t == opts.ignore_index {
            continue;
        }
        if t < 0 || t as usize >= vocab {
            return Err(Error::OutOfRange { op, what: "target", index: t, size: vocab });
        }
        count += 1;
    }
    let denom = opts.denominator.unwrap_or(count.max(1) as f64);
    if !(denom > 0.0 && denom.is_finite()) {
        return Err(Error::invalid(op, format!("denominator must be finite and > 0, got {denom}")));
    }
    Ok(denom)
}

/// The value of the scalar upstream gradient dy, read to the host (dy may be the host seed of a
/// device loss, so the backwards below take their device from their saved tensors).
fn scalar(dy: &Tensor) -> Result<f64> {
    Ok(dy.try_to_vec::<f64>()?[0])
}

/// Mean cross-entropy of logits [N, V] against N targets (a scalar); with `opts.softcap` the
/// logits are soft-capped first (the [`crate::ops::softcap`] op, whose backward chains in).
pub fn cross_entropy(logits: &Tensor, targets: &[i64], opts: &CeOptions) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    check_softcap(OP, opts)?;
    if let Some(c) = opts.softcap {
        compute_dtype(OP, "logits", logits)?;
        let capped = super::softcap(logits, c)?;
        return cross_entropy(&capped, targets, &CeOptions { softcap: None, ..opts.clone() });
    }
    let dt = compute_dtype(OP, "logits", logits)?;
    if logits.dims().len() != 2 {
        return Err(Error::shape(OP, "logits", "[N, vocab]", logits.shape()));
    }
    let (rows, vocab) = (logits.dims()[0], logits.dims()[1]);
    let denom = check_targets(OP, targets, rows, vocab, opts)?;
    let k = kernels_for(OP, &[("logits", logits)])?;
    let mut lse = k.zeros(dt, rows, OP)?;
    let total = k.ce_fwd(&mut lse, &logits.read(), targets, opts.ignore_index, vocab)?;
    let (y, lse) = (scalar_out(k, dt, total / denom, OP)?, Tensor::from_storage(lse, [rows].into()));
    Ok(record(y, &[logits], |_| Box::new(CrossEntropyBwd { logits: logits.detach(), lse, targets: targets.to_vec(), ignore_index: opts.ignore_index, denom })))
}

/// A scalar tensor holding `v` on `k`'s device.
fn scalar_out(k: &dyn Kernels, dt: DType, v: f64, op: &'static str) -> Result<Tensor> {
    let one = Storage::Host(HostData::F64(vec![v]));
    Ok(Tensor::from_storage(k.upload(&one, dt, op)?, Shape::scalar()))
}

struct CrossEntropyBwd {
    logits: Tensor,
    lse: Tensor,
    targets: Vec<i64>,
    ignore_index: i64,
    denom: f64,
}
impl Backward for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    /// dlogits_rj = dy/denom · (exp(x_rj − lse_r) − [j = target_r]); 0 on ignored rows.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "cross_entropy.backward";
        let k = kernels_for(OP, &[("logits", &self.logits)])?;
        let g = scalar(dy)? / self.denom;
        let vocab = self.logits.dims()[1];
        let mut dx = k.upload(&self.logits.read(), dy.dtype(), OP)?;
        k.ce_bwd(&mut dx, &self.lse.read(), 0, &self.targets, self.ignore_index, vocab, g, None)?;
        Ok(vec![Some(Tensor::from_storage(dx, self.logits.shape().clone()))])
    }
}

/// Cross-entropy of the logits h·Wᵀ without materializing them: h [N, d], W [V, d] (the LM head
/// or the tied embedding, any stored dtype), N targets → scalar. With `opts.softcap` = c each
/// logit l becomes c·tanh(l/c) before the softmax, in the forward and both backwards.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[i64], opts: &CeOptions) -> Result<Tensor> {
    const OP: &str = "linear_cross_entropy";
    check_softcap(OP, opts)?;
    let dt = compute_dtype(OP, "h", h)?;
    check_dtype(OP, "w", w, dt, false)?;
    let (hd, wd) = (h.dims(), w.dims());
    if hd.len() != 2 {
        return Err(Error::shape(OP, "h", "[N, d]", h.shape()));
    }
    if wd.len() != 2 || wd[1] != hd[1] {
        return Err(Error::shape(OP, "w", format!("[vocab, {}]", hd[1]), w.shape()));
    }
    let (rows, d, vocab) = (hd[0], hd[1], wd[0]);
    let denom = check_targets(OP, targets, rows, vocab, opts)?;
    // Row chunks of full-vocabulary logits (the CUDA forward and every backward): about 8M
    // logits per chunk (32 MiB in f32), balanced so that no small tail chunk re-reads the whole
    // head for a handful of rows.
    let budget = opts.chunk_rows.unwrap_or((1 << 23) / vocab.max(1)).clamp(1, rows.max(1));
    let chunk = rows.div_ceil(rows.div_ceil(budget));
    // CPU forward blocks: `cols` vocabulary columns × `rows_blk` rows of logits, about
    // CPU_BLOCK_LOGITS (8 MiB in f32) unless the options say otherwise.
    let cols = opts.chunk_cols.unwrap_or((CPU_BLOCK_LOGITS / rows.max(1)).max(512)).clamp(1, vocab.max(1));
    let rows_blk = opts.chunk_rows.unwrap_or(CPU_BLOCK_LOGITS / cols).clamp(1, rows.max(1));
    let blocks = CeBlocks { d, vocab, ignore: opts.ignore_index, rows_blk, cols, chunk, softcap: opts.softcap };
    // Training through a frozen head (the usual case): the backward's softmax − onehot depends
    // on dy only through a scalar factor, so the forward computes dh for dy = 1 chunk by chunk
    // while the logits are at hand, and the backward only scales it — no second pass over the
    // head (one GEMM of N·d·V less per step) and no logits kept.
    let fuse = crate::autograd::is_grad_enabled() && h.requires_grad() && !w.requires_grad();
    let k = kernels_for(OP, &[("h", h), ("w", w)])?;
    let mut lse = k.zeros(dt, rows, OP)?;
    let mut dh = fuse.then(|| k.zeros(dt, rows * d, OP)).transpose()?;
    let total = k.linear_ce_fwd(&mut lse, dh.as_mut(), &h.read(), &w.read(), targets, &blocks, 1.0 / denom)?;
    let y = scalar_out(k, dt, total / denom, OP)?;
    let lse = Tensor::from_storage(lse, [rows].into());
    let dh = dh.map(|s| Tensor::from_storage(s, [rows, d].into()));
    Ok(record(y, &[h, w], |_| match dh {
        Some(dh) => Box::new(LinearCeFusedBwd { dh }) as Box<dyn Backward>,
        None => Box::new(LinearCeBwd {
            h: h.detach(),
            w: w.detach(),
            lse,
            targets: targets.to_vec(),
            ignore_index: opts.ignore_index,
            denom,
            chunk,
            softcap: opts.softcap,
        }),
    }))
}

/// Backward of the fused path: dh was computed by the forward for dy = 1.
struct LinearCeFusedBwd {
    dh: Tensor,
}
impl Backward for LinearCeFusedBwd {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }
    /// dh = dy · dh|dy=1 (the loss is linear in dy); the frozen head gets nothing.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "linear_cross_entropy.backward";
        let k = kernels_for(OP, &[("dh", &self.dh)])?;
        let mut dh = k.zeros(dy.dtype(), self.dh.numel(), OP)?;
        k.scale(&mut dh, &self.dh.read(), scalar(dy)?, OP)?;
        Ok(vec![Some(Tensor::from_storage(dh, self.dh.shape().clone())), None])
    }
}

struct LinearCeBwd {
    h: Tensor,
    w: Tensor,
    lse: Tensor,
    targets: Vec<i64>,
    ignore_index: i64,
    denom: f64,
    chunk: usize,
    softcap: Option<f64>,
}
impl Backward for LinearCeBwd {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }
    /// Per chunk: G = dy/denom·(softmax(h Wᵀ) − onehot) recomputed (under a soft cap c: the
    /// softmax of z = c·tanh(h Wᵀ/c), and G ⊙ (1 − (z/c)²) to reach the raw logits);
    /// dh = G·W;  dW += Gᵀ·h.
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "linear_cross_entropy.backward";
        let k = kernels_for(OP, &[("h", &self.h)])?;
        let g = scalar(dy)? / self.denom;
        let (rows, d, dt) = (self.h.dims()[0], self.h.dims()[1], dy.dtype());
        let vocab = self.w.dims()[0];
        let (hg, wg, lg) = (self.h.read(), self.w.read(), self.lse.read());
        let mut dh = needs[0].then(|| k.zeros(dt, rows * d, OP)).transpose()?;
        let mut dw = needs[1].then(|| k.zeros(dt, vocab * d, OP)).transpose()?;
        let mut logits = k.zeros(dt, self.chunk * vocab, OP)?;
        for r0 in (0..rows).step_by(self.chunk) {
            let r1 = (r0 + self.chunk).min(rows);
            let n = r1 - r0;
            // L = h[r0..r1]·Wᵀ [n, vocab] (raw logits), then G in place.
            k.gemm(&mut logits, &hg, &wg, &Gemm::new(n, d, vocab).trans(false, true).offsets(r0 * d, 0, 0), OP)?;
            k.ce_bwd(&mut logits, &lg, r0, &self.targets[r0..r1], self.ignore_index, vocab, g, self.softcap)?;
            if let Some(dh) = dh.as_mut() {
                // dh[r0..r1] = G·W [n, d]
                k.gemm(dh, &logits, &wg, &Gemm::new(n, vocab, d).offsets(0, 0, r0 * d), OP)?;
            }
            if let Some(dw) = dw.as_mut() {
                // dW (+)= Gᵀ·h[r0..r1] [vocab, d]
                let beta = if r0 == 0 { 0.0 } else { 1.0 };
                k.gemm(dw, &logits, &hg, &Gemm::new(vocab, n, d).trans(true, false).scaled(1.0, beta).offsets(0, r0 * d, 0), OP)?;
            }
        }
        Ok(vec![dh.map(|s| Tensor::from_storage(s, [rows, d].into())), dw.map(|s| Tensor::from_storage(s, [vocab, d].into()))])
    }
}
