//! Tiled attention kernels: the same math as the reference [`cpu::attention_fwd`] /
//! [`cpu::attention_bwd`] (which stay as the readable reference the tests compare against), as
//! GEMMs over blocks of query rows, FlashAttention-style: the probabilities are never stored
//! beyond one block (memory linear in the sequence length) and the backward recomputes them
//! from the saved logsumexp.
//!
//! Layouts are the op's: q [b, t, nh, hd], k/v [b, s, nkv, hd], o like q, lse [b, t, nh]. One
//! head of one sequence is a strided matrix (row stride nh·hd or nkv·hd), so the GEMMs read q, k,
//! v and write o, dq, dk, dv in place, with no transposes or copies.
//!
//! Forward, per (batch, head, block of BQ query rows i0..i1), with kbeg..kend the band of keys
//! some row of the block sees (causal: kend = s − t + i1; a sliding window w: kbeg = s − t + i0 +
//! 1 − w, else 0):
//!   S = scale·Q_blk·K[kbeg..kend]ᵀ [BQ, kend − kbeg];  P = softmax_row(S + mask);
//!   lse = rowmax + ln rowsum;  O_blk = P·V[kbeg..kend].
//! Backward, per (batch, kv head), over the query heads of its group and their query blocks:
//!   P = exp(scale·Q_blk·Kᵀ − lse) (masked entries 0);  dV += Pᵀ·dO_blk;  dP = dO_blk·Vᵀ;
//!   D = rowsum(dO ⊙ O);  dS = scale·P ⊙ (dP − D);  dQ_blk = dS·K;  dK += dSᵀ·Q_blk.
//! Each backward task owns its kv head's dK/dV and its query heads' dQ: no two tasks write the
//! same memory. The small per-task GEMMs run single-threaded (`gemm` crate, no parallelism)
//! inside rayon tasks.
//!
//! [`cpu::attention_fwd`]: super::cpu::attention_fwd
//! [`cpu::attention_bwd`]: super::cpu::attention_bwd

use rayon::prelude::*;

use super::cpu::tanh;
use super::cpu::AttnDims;
use crate::dtype::Float;

/// Query rows per block.
const BQ: usize = 64;

/// A raw pointer that rayon tasks may share; every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint output regions to parallel tasks (see each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole Send + Sync wrapper).
    #[inline]
    fn get(self) -> *mut T {
        self.0
    }
}

/// dst[m×n] = beta·dst + alpha·lhs[m×k]·rhs[k×n] (dst not read when beta = 0), all strided
/// (row stride, column stride), single-threaded.
///
/// # Safety
/// The pointers and strides must describe valid regions; dst must not alias lhs or rhs.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn gemm_seq<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: isize,
    dst_cs: isize,
    lhs: *const T,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const T,
    rhs_rs: isize,
    rhs_cs: isize,
    alpha: T,
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    // gemm's convention: dst = a·dst + b·lhs·rhs, dst read only when `read_dst`.
    let read_dst = beta != T::ZERO;
    gemm::gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, beta, alpha, false, false, false, gemm::Parallelism::None)
}

/// Forward attention (same contract as [`super::cpu::attention_fwd`]).
pub fn attention_fwd<T: Float>(o: &mut [T], lse: &mut [T], q: &[T], k: &[T], v: &[T], mask: Option<&[bool]>, d: AttnDims) {
    let AttnDims { b, t, s, nh, nkv, hd, .. } = d;
    debug_assert!(q.len() == b * t * nh * hd && o.len() == q.len() && lse.len() == b * t * nh);
    debug_assert!(k.len() == b * s * nkv * hd && v.len() == k.len());
    let group = nh / nkv;
    let scale = T::from_f64(d.scale);
    let nblk = t.div_ceil(BQ);
    let (op, lp) = (SendPtr(o.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    let (qrs, krs) = ((nh * hd) as isize, (nkv * hd) as isize);
    (0..b * nh * nblk).into_par_iter().for_each_init(Vec::new, |p: &mut Vec<T>, task| {
        let (bh, blk) = (task / nblk, task % nblk);
        let (bi, h) = (bh / nh, bh % nh);
        let kh = h / group;
        let (i0, i1) = (blk * BQ, ((blk + 1) * BQ).min(t));
        let rows = i1 - i0;
        // The block's key band: kbeg = the first row's first key (sliding window), kend = the
        // last row's causal limit; w = kend − kbeg columns.
        let (kbeg, kend) = (d.first(i0), d.visible(i1 - 1));
        let w = kend - kbeg;
        p.clear();
        p.resize(rows * w, T::ZERO);
        let q0 = ((bi * t + i0) * nh + h) * hd;
        let k0 = (bi * s * nkv + kh) * hd + kbeg * nkv * hd;
        // SAFETY: Q_blk is rows × hd at q0 with row stride nh·hd, K[kbeg..kend] is w × hd at k0
        // with row stride nkv·hd: both lie inside q and k; p is rows × w.
        unsafe {
            gemm_seq(rows, w, hd, p.as_mut_ptr(), w as isize, 1, q[q0..].as_ptr(), qrs, 1, k[k0..].as_ptr(), 1, krs, scale, T::ZERO);
        }
        if let Some(c) = d.softcap {
            // Soft cap: S = c·tanh(z/c) (the hidden entries are zeroed below).
            let c = T::from_f64(c);
            p.iter_mut().for_each(|x| *x = c * tanh(*x / c));
        }
        let mut row_lse = vec![T::ZERO; rows];
        for (r, pr) in p.chunks_mut(w).enumerate() {
            // Keys lo..vis are visible to this query (window, causal); padded keys among them get −∞.
            let (lo, vis) = (d.first(i0 + r) - kbeg, d.visible(i0 + r) - kbeg);
            let (before, rest) = pr.split_at_mut(lo);
            let (pv, hidden) = rest.split_at_mut(vis - lo);
            before.iter_mut().for_each(|x| *x = T::ZERO);
            hidden.iter_mut().for_each(|x| *x = T::ZERO);
            if let Some(mk) = mask {
                pv.iter_mut().zip(&mk[bi * s + kbeg + lo..]).filter(|(_, keep)| !**keep).for_each(|(x, _)| *x = T::NEG_INFINITY);
            }
            let m = T::max_of(pv);
            if m == T::NEG_INFINITY {
                pv.iter_mut().for_each(|x| *x = T::ZERO);
                row_lse[r] = T::NEG_INFINITY;
                continue;
            }
            // exp(−∞ − m) = 0 for the padded keys.
            let l = T::exp_sub_sum(pv, m);
            let inv = T::ONE / l;
            pv.iter_mut().for_each(|x| *x *= inv);
            row_lse[r] = m + l.ln();
        }
        // SAFETY: task (bi, h, blk) alone writes rows i0..i1 of head h of sequence bi in o
        // (rows × hd at q0, row stride nh·hd) and the matching lse entries.
        unsafe {
            gemm_seq(rows, hd, w, op.get().add(q0), qrs, 1, p.as_ptr(), w as isize, 1, v[k0..].as_ptr(), krs, 1, T::ONE, T::ZERO);
            for (r, l) in row_lse.iter().enumerate() {
                *lp.get().add((bi * t + i0 + r) * nh + h) = *l;
            }
        }
    });
}

/// Backward attention (same contract as [`super::cpu::attention_bwd`]): writes dq, dk, dv.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    mask: Option<&[bool]>,
    d: AttnDims,
) {
    let AttnDims { b, t, s, nh, nkv, hd, .. } = d;
    let group = nh / nkv;
    let scale = T::from_f64(d.scale);
    let nblk = t.div_ceil(BQ);
    let (dqp, dkp, dvp) = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let (qrs, krs) = ((nh * hd) as isize, (nkv * hd) as isize);
    (0..b * nkv).into_par_iter().for_each(|task| {
        let (bi, kh) = (task / nkv, task % nkv);
        let k0 = (bi * s * nkv + kh) * hd;
        // SAFETY (for every write below): this task alone owns dK/dV of kv head kh of sequence
        // bi (s × hd at k0, row stride nkv·hd) and dQ of its query heads kh·group.. for bi.
        unsafe {
            for j in 0..s {
                std::ptr::write_bytes(dkp.get().add(k0 + j * nkv * hd), 0, hd);
                std::ptr::write_bytes(dvp.get().add(k0 + j * nkv * hd), 0, hd);
            }
        }
        let mut p: Vec<T> = Vec::new();
        let mut dp: Vec<T> = Vec::new();
        // Under a soft cap: tanh(z/c) per score, for dS/dz = 1 − tanh².
        let mut th: Vec<T> = Vec::new();
        for gi in 0..group {
            let h = kh * group + gi;
            for blk in 0..nblk {
                let (i0, i1) = (blk * BQ, ((blk + 1) * BQ).min(t));
                let rows = i1 - i0;
                // The block's key band kbeg..kend (w columns), as in the forward.
                let (kbeg, kend) = (d.first(i0), d.visible(i1 - 1));
                let w = kend - kbeg;
                let kb = k0 + kbeg * nkv * hd;
                let q0 = ((bi * t + i0) * nh + h) * hd;
                p.clear();
                p.resize(rows * w, T::ZERO);
                dp.clear();
                dp.resize(rows * w, T::ZERO);
                // SAFETY: as in the forward; dp is rows × w.
                unsafe {
                    // S = scale·Q_blk·K[kbeg..kend]ᵀ, then P = exp(S − lse) in place.
                    gemm_seq(rows, w, hd, p.as_mut_ptr(), w as isize, 1, q[q0..].as_ptr(), qrs, 1, k[kb..].as_ptr(), 1, krs, scale, T::ZERO);
                    // dP = dO_blk·V[kbeg..kend]ᵀ
                    gemm_seq(rows, w, hd, dp.as_mut_ptr(), w as isize, 1, dout[q0..].as_ptr(), qrs, 1, v[kb..].as_ptr(), 1, krs, T::ONE, T::ZERO);
                }
                if let Some(c) = d.softcap {
                    let c = T::from_f64(c);
                    th.clear();
                    th.extend(p.iter().map(|x| tanh(*x / c)));
                    p.iter_mut().zip(&th).for_each(|(x, t)| *x = c * *t);
                }
                for (r, (pr, dpr)) in p.chunks_mut(w).zip(dp.chunks_mut(w)).enumerate() {
                    let i = i0 + r;
                    let l = lse[(bi * t + i) * nh + h];
                    // Visible band lo..vis of this row, relative to kbeg (empty for a row that saw no key).
                    let (lo, vis) = if l == T::NEG_INFINITY { (0, 0) } else { (d.first(i) - kbeg, d.visible(i) - kbeg) };
                    let row = q0 + r * nh * hd;
                    // D_i = dO_i·O_i
                    let di: T = dout[row..row + hd].iter().zip(&o[row..row + hd]).map(|(a, b)| *a * *b).sum();
                    let (pb, prest) = pr.split_at_mut(lo);
                    let (pv, ph) = prest.split_at_mut(vis - lo);
                    let (gb, grest) = dpr.split_at_mut(lo);
                    let (gv, gh) = grest.split_at_mut(vis - lo);
                    for x in pb.iter_mut().chain(ph.iter_mut()).chain(gb.iter_mut()).chain(gh.iter_mut()) {
                        *x = T::ZERO;
                    }
                    if let Some(mk) = mask {
                        // exp(−∞ − l) = 0 makes P and dS vanish at padded keys.
                        pv.iter_mut().zip(&mk[bi * s + kbeg + lo..]).filter(|(_, keep)| !**keep).for_each(|(x, _)| *x = T::NEG_INFINITY);
                    }
                    // P = exp(S − lse);  dS = scale·P ⊙ (dP − D)
                    T::softmax_grad_row(pv, gv, l, di, scale);
                    if d.softcap.is_some() {
                        // dz = dS ⊙ (1 − tanh²(z/c)).
                        gv.iter_mut().zip(&th[r * w + lo..]).for_each(|(g, t)| *g *= T::ONE - *t * *t);
                    }
                }
                // SAFETY: see the task comment; dq rows of head h (owned), dk/dv of kv head kh.
                unsafe {
                    // dV[kbeg..kend] += Pᵀ·dO_blk
                    gemm_seq(w, hd, rows, dvp.get().add(kb), krs, 1, p.as_ptr(), 1, w as isize, dout[q0..].as_ptr(), qrs, 1, T::ONE, T::ONE);
                    // dQ_blk = dS·K[kbeg..kend]
                    gemm_seq(rows, hd, w, dqp.get().add(q0), qrs, 1, dp.as_ptr(), w as isize, 1, k[kb..].as_ptr(), krs, 1, T::ONE, T::ZERO);
                    // dK[kbeg..kend] += dSᵀ·Q_blk
                    gemm_seq(w, hd, rows, dkp.get().add(kb), krs, 1, dp.as_ptr(), 1, w as isize, q[q0..].as_ptr(), qrs, 1, T::ONE, T::ONE);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu;
    use crate::gradcheck::SplitMix;

    fn check(d: AttnDims, with_mask: bool, seed: u64) {
        let AttnDims { b, t, s, nh, nkv, hd, .. } = d;
        let mut rng = SplitMix::new(seed);
        let q = rng.vec(b * t * nh * hd, -1.0, 1.0);
        let k = rng.vec(b * s * nkv * hd, -1.0, 1.0);
        let v = rng.vec(b * s * nkv * hd, -1.0, 1.0);
        let g = rng.vec(b * t * nh * hd, -1.0, 1.0);
        // Padding: the first key of sequence 0 and, for b > 1, every key of sequence 1 but one
        // (so some queries see nothing).
        let mask: Option<Vec<bool>> = with_mask.then(|| (0..b * s).map(|i| !(i == 0 || (i / s == 1 && i % s != s - 1))).collect());
        let (mut o1, mut l1) = (vec![0.0; q.len()], vec![0.0; b * t * nh]);
        let (mut o2, mut l2) = (vec![0.0; q.len()], vec![0.0; b * t * nh]);
        cpu::attention_fwd(&mut o1, &mut l1, &q, &k, &v, mask.as_deref(), d);
        attention_fwd(&mut o2, &mut l2, &q, &k, &v, mask.as_deref(), d);
        let close = |a: &[f64], b: &[f64], what: &str| {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let ok = (x == y) || (x - y).abs() <= 1e-12 * (1.0 + x.abs());
                assert!(ok, "{what}[{i}]: reference {x} vs tiled {y} ({d:?}, mask {with_mask})");
            }
        };
        close(&o1, &o2, "o");
        close(&l1, &l2, "lse");
        let (mut a1, mut b1, mut c1) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let (mut a2, mut b2, mut c2) = (vec![7.0; q.len()], vec![7.0; k.len()], vec![7.0; v.len()]);
        cpu::attention_bwd(&mut a1, &mut b1, &mut c1, &g, &q, &k, &v, &o1, &l1, mask.as_deref(), d);
        attention_bwd(&mut a2, &mut b2, &mut c2, &g, &q, &k, &v, &o1, &l1, mask.as_deref(), d);
        close(&a1, &a2, "dq");
        close(&b1, &b2, "dk");
        close(&c1, &c2, "dv");
    }

    #[test]
    fn tiled_attention_matches_the_reference() {
        let mut seed = 1;
        for &(b, t, s, nh, nkv, hd) in
            &[(1, 1, 1, 1, 1, 2), (2, 5, 5, 2, 1, 4), (2, 70, 70, 3, 1, 8), (1, 130, 130, 4, 2, 6), (2, 3, 9, 2, 2, 4), (1, 65, 80, 2, 1, 2)]
        {
            for causal in [true, false] {
                for mask in [false, true] {
                    for softcap in [None, Some(0.7)] {
                        // Sliding windows (causal only): 1 (each query sees itself), narrower and
                        // wider than a 64-row block, and wider than the keys.
                        let windows: &[Option<usize>] = if causal { &[None, Some(1), Some(3), Some(37), Some(100)] } else { &[None] };
                        for &window in windows {
                            let d = AttnDims { b, t, s, nh, nkv, hd, causal, scale: 1.0 / (hd as f64).sqrt(), softcap, window };
                            check(d, mask, seed);
                            seed += 1;
                        }
                    }
                }
            }
        }
    }
}
