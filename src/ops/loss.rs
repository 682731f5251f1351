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

use super::{check_dtype, compute_dtype, out, vals};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::cpu;
use crate::device::with_float;
use crate::error::{Error, Result};
use crate::shape::Shape;
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
}

impl Default for CeOptions {
    fn default() -> Self {
        CeOptions { ignore_index: -100, denominator: None, chunk_rows: None, chunk_cols: None }
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

/// Mean cross-entropy of logits [N, V] against N targets (a scalar).
pub fn cross_entropy(logits: &Tensor, targets: &[i64], opts: &CeOptions) -> Result<Tensor> {
    let dt = compute_dtype("cross_entropy", "logits", logits)?;
    if logits.dims().len() != 2 {
        return Err(Error::shape("cross_entropy", "logits", "[N, vocab]", logits.shape()));
    }
    let (rows, vocab) = (logits.dims()[0], logits.dims()[1]);
    let denom = check_targets("cross_entropy", targets, rows, vocab, opts)?;
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[logits]) {
        return crate::backend::cuda::ops::cross_entropy(logits, targets, opts.ignore_index, denom);
    }
    let (y, lse) = with_float!(dt, "cross_entropy", |T| {
        let mut lse = crate::backend::cpu::zeros::<T>(rows);
        let total = cpu::cross_entropy_fwd(&mut lse, &vals::<T>(&logits.read()), targets, opts.ignore_index, vocab);
        Ok((out(vec![T::from_f64(total / denom)], Shape::scalar()), out(lse, [rows])))
    })?;
    Ok(record(y, &[logits], |_| Box::new(CrossEntropyBwd { logits: logits.detach(), lse, targets: targets.to_vec(), ignore_index: opts.ignore_index, denom })))
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
        with_float!(dy.dtype(), "cross_entropy.backward", |T| {
            let g = T::from_f64(vals::<T>(&dy.read())[0].to_f64() / self.denom);
            let mut dx = vals::<T>(&self.logits.read()).into_owned();
            let vocab = self.logits.dims()[1];
            cpu::cross_entropy_bwd_inplace(&mut dx, &vals::<T>(&self.lse.read()), &self.targets, self.ignore_index, vocab, g);
            Ok(vec![Some(out(dx, self.logits.shape().clone()))])
        })
    }
}

/// Cross-entropy of the logits h·Wᵀ without materializing them: h [N, d], W [V, d] (the LM head
/// or the tied embedding, any stored dtype), N targets → scalar.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[i64], opts: &CeOptions) -> Result<Tensor> {
    let dt = compute_dtype("linear_cross_entropy", "h", h)?;
    check_dtype("linear_cross_entropy", "w", w, dt, false)?;
    let (hd, wd) = (h.dims(), w.dims());
    if hd.len() != 2 {
        return Err(Error::shape("linear_cross_entropy", "h", "[N, d]", h.shape()));
    }
    if wd.len() != 2 || wd[1] != hd[1] {
        return Err(Error::shape("linear_cross_entropy", "w", format!("[vocab, {}]", hd[1]), w.shape()));
    }
    let (rows, d, vocab) = (hd[0], hd[1], wd[0]);
    let denom = check_targets("linear_cross_entropy", targets, rows, vocab, opts)?;
    // Default: about 8M logits per chunk (32 MiB in f32), chunks balanced so that no small tail
    // chunk re-reads the whole head for a handful of rows.
    let budget = opts.chunk_rows.unwrap_or((1 << 23) / vocab.max(1)).clamp(1, rows.max(1));
    let chunk = rows.div_ceil(rows.div_ceil(budget));
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[h, w]) {
        return crate::backend::cuda::ops::linear_cross_entropy(h, w, targets, opts.ignore_index, denom, chunk);
    }
    // CPU forward blocks: `cols` vocabulary columns × `rows_blk` rows of logits, about
    // CPU_BLOCK_LOGITS (8 MiB in f32) unless the options say otherwise.
    let cols = opts.chunk_cols.unwrap_or((CPU_BLOCK_LOGITS / rows.max(1)).max(512)).clamp(1, vocab.max(1));
    let rows_blk = opts.chunk_rows.unwrap_or(CPU_BLOCK_LOGITS / cols).clamp(1, rows.max(1));
    // Training through a frozen head (the usual case): the backward's softmax − onehot depends
    // on dy only through a scalar factor, so the forward computes dh for dy = 1 chunk by chunk
    // while the logits are at hand, and the backward only scales it — no second pass over the
    // head (one GEMM of N·d·V less per step) and no logits kept.
    let fuse = crate::autograd::is_grad_enabled() && h.requires_grad() && !w.requires_grad();
    let (y, lse, dh) = with_float!(dt, "linear_cross_entropy", |T| {
        let (hg, wg) = (h.read(), w.read());
        let hv = vals::<T>(&hg);
        let mut lse = crate::backend::cpu::zeros::<T>(rows);
        let mut dh = fuse.then(|| crate::backend::cpu::zeros::<T>(rows * d));
        let g = T::from_f64(1.0 / denom);
        let total = cpu::linear_cross_entropy_fwd(&mut lse, dh.as_deref_mut(), &hv, &wg, targets, opts.ignore_index, d, vocab, rows_blk, cols, g);
        Ok((out(vec![T::from_f64(total / denom)], Shape::scalar()), out(lse, [rows]), dh.map(|v| out(v, [rows, d]))))
    })?;
    Ok(record(y, &[h, w], |_| match dh {
        Some(dh) => Box::new(LinearCeFusedBwd { dh }) as Box<dyn Backward>,
        None => Box::new(LinearCeBwd { h: h.detach(), w: w.detach(), lse, targets: targets.to_vec(), ignore_index: opts.ignore_index, denom, chunk }),
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
        with_float!(dy.dtype(), "linear_cross_entropy.backward", |T| {
            let g = vals::<T>(&dy.read())[0];
            let mut dh = crate::backend::cpu::zeros::<T>(self.dh.numel());
            cpu::scale(&mut dh, &vals::<T>(&self.dh.read()), g);
            Ok(vec![Some(out(dh, self.dh.shape().clone())), None])
        })
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
}
impl Backward for LinearCeBwd {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }
    /// Per chunk: G = dy/denom·(softmax(h Wᵀ) − onehot) recomputed;  dh = G·W;  dW += Gᵀ·h.
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "linear_cross_entropy.backward", |T| {
            let g = T::from_f64(vals::<T>(&dy.read())[0].to_f64() / self.denom);
            let (rows, d) = (self.h.dims()[0], self.h.dims()[1]);
            let vocab = self.w.dims()[0];
            let (hg, wg, lg) = (self.h.read(), self.w.read(), self.lse.read());
            let (hv, lse) = (vals::<T>(&hg), vals::<T>(&lg));
            let mut dh = needs[0].then(|| crate::backend::cpu::zeros::<T>(rows * d));
            let mut dw = needs[1].then(|| crate::backend::cpu::zeros::<T>(vocab * d));
            let mut logits = crate::backend::cpu::zeros::<T>(self.chunk * vocab);
            for r0 in (0..rows).step_by(self.chunk) {
                let r1 = (r0 + self.chunk).min(rows);
                let n = r1 - r0;
                let lgc = &mut logits[..n * vocab];
                let hc = &hv[r0 * d..r1 * d];
                cpu::gemm_stored(lgc, hc, &wg, 0, n, d, vocab, false, true, T::ZERO);
                cpu::cross_entropy_bwd_inplace(lgc, &lse[r0..r1], &self.targets[r0..r1], self.ignore_index, vocab, g);
                if let Some(dh) = dh.as_mut() {
                    cpu::gemm_stored(&mut dh[r0 * d..r1 * d], lgc, &wg, 0, n, vocab, d, false, false, T::ZERO);
                }
                if let Some(dw) = dw.as_mut() {
                    let beta = if r0 == 0 { T::ZERO } else { T::ONE };
                    cpu::gemm(dw, lgc, hc, vocab, n, d, true, false, T::ONE, beta);
                }
            }
            Ok(vec![dh.map(|v| out(v, [rows, d])), dw.map(|v| out(v, [vocab, d]))])
        })
    }
}
