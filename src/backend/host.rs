//! [`Kernels`] on the CPU: each method picks the compute type (f32 or f64) from its output buffer
//! with `with_float!` and runs the generic reference kernel of [`super::cpu`]. Inputs that are
//! not host memory of that type (bf16/f16/GGUF-block weights, mapped files) are converted per use
//! ([`vals`]; the GEMM's right operand a tile at a time inside [`cpu::gemm_stored`]).

use std::borrow::Cow;

use rayon::prelude::*;

use super::{cpu, cpu_attn, dropout_factor, AdamWStep, AttnDims, CeBlocks, GatedAct, Gemm, Kernels};
use crate::device::{with_float, Device};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::storage::{host_from_vec, HostData, Storage};

/// The CPU device.
pub struct Cpu;

/// Elements of `g` as `[T]`: borrowed when stored as T (host, or aligned map), else converted.
pub fn vals<T: Float>(g: &Storage) -> Cow<'_, [T]> {
    match g.slice::<T>() {
        Some(s) => Cow::Borrowed(s),
        None => {
            let mut v = cpu::zeros::<T>(g.len());
            g.read_into(0, &mut v);
            Cow::Owned(v)
        }
    }
}

/// `s` as mutable host `[T]`, or an error naming the op (an output buffer of the wrong kind is a
/// bug in the op layer, reported rather than panicking).
pub fn out_mut<'a, T: Float>(s: &'a mut Storage, op: &'static str, arg: &str) -> Result<&'a mut [T]> {
    let dt = s.dtype();
    s.slice_mut::<T>().ok_or_else(|| Error::invalid(op, format!("{arg} must be host {} memory, got {dt}", T::DTYPE)))
}

impl Kernels for Cpu {
    fn device(&self) -> Device {
        Device::Cpu
    }

    // --- memory -------------------------------------------------------------------------------

    fn zeros(&self, dtype: DType, n: usize, op: &'static str) -> Result<Storage> {
        with_float!(dtype, op, |T| { Ok(Storage::Host(host_from_vec(cpu::zeros::<T>(n)))) })
    }

    fn upload(&self, src: &Storage, dtype: DType, op: &'static str) -> Result<Storage> {
        let n = src.len();
        let data = match dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                src.try_read_into(0, &mut v)?;
                HostData::F32(v)
            }
            DType::F64 => {
                let mut v = vec![0f64; n];
                src.try_read_into(0, &mut v)?;
                HostData::F64(v)
            }
            DType::BF16 => {
                let mut v = vec![0f32; n];
                src.try_read_into(0, &mut v)?;
                HostData::BF16(v.into_iter().map(half::bf16::from_f32).collect())
            }
            other => return Err(Error::dtype(op, "dtype", "f32, f64 or bf16 on the CPU", other)),
        };
        Ok(Storage::Host(data))
    }

    // --- elementwise --------------------------------------------------------------------------

    fn add(&self, y: &mut Storage, a: &Storage, b: &Storage, op: &'static str) -> Result<()> {
        with_float!(y.dtype(), op, |T| {
            cpu::add_fwd(out_mut::<T>(y, op, "y")?, &vals::<T>(a), &vals::<T>(b));
            Ok(())
        })
    }

    fn add_assign(&self, acc: &mut Storage, g: &Storage, op: &'static str) -> Result<()> {
        with_float!(acc.dtype(), op, |T| {
            let gv = vals::<T>(g);
            // Chunked over the pool: gradients of activations are megabytes.
            out_mut::<T>(acc, op, "acc")?
                .par_chunks_mut(1 << 16)
                .zip(gv.par_chunks(1 << 16))
                .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, b)| *a += *b));
            Ok(())
        })
    }

    fn scale_assign(&self, x: &mut Storage, s: f64, op: &'static str) -> Result<()> {
        with_float!(x.dtype(), op, |T| {
            out_mut::<T>(x, op, "x")?.iter_mut().for_each(|v| *v = T::from_f64(v.to_f64() * s));
            Ok(())
        })
    }

    fn mul(&self, y: &mut Storage, a: &Storage, b: &Storage, op: &'static str) -> Result<()> {
        with_float!(y.dtype(), op, |T| {
            cpu::mul_fwd(out_mut::<T>(y, op, "y")?, &vals::<T>(a), &vals::<T>(b));
            Ok(())
        })
    }

    fn sum_leading(&self, db: &mut Storage, dy: &Storage, a: Option<&Storage>, op: &'static str) -> Result<()> {
        with_float!(db.dtype(), op, |T| {
            let out = out_mut::<T>(db, op, "db")?;
            match a {
                Some(a) => cpu::sum_leading_mul(out, &vals::<T>(dy), &vals::<T>(a)),
                None => cpu::sum_leading(out, &vals::<T>(dy)),
            }
            Ok(())
        })
    }

    fn scale(&self, y: &mut Storage, x: &Storage, s: f64, op: &'static str) -> Result<()> {
        with_float!(y.dtype(), op, |T| {
            cpu::scale(out_mut::<T>(y, op, "y")?, &vals::<T>(x), T::from_f64(s));
            Ok(())
        })
    }

    fn fill(&self, y: &mut Storage, v: f64, op: &'static str) -> Result<()> {
        with_float!(y.dtype(), op, |T| {
            out_mut::<T>(y, op, "y")?.iter_mut().for_each(|y| *y = T::from_f64(v));
            Ok(())
        })
    }

    fn transpose(&self, y: &mut Storage, x: &Storage, batch: usize, rows: usize, cols: usize, op: &'static str) -> Result<()> {
        with_float!(y.dtype(), op, |T| {
            let (ys, xs) = (out_mut::<T>(y, op, "y")?, vals::<T>(x));
            for bi in 0..batch {
                let (yb, xb) = (&mut ys[bi * rows * cols..][..rows * cols], &xs[bi * rows * cols..][..rows * cols]);
                for i in 0..rows {
                    for j in 0..cols {
                        yb[j * rows + i] = xb[i * cols + j];
                    }
                }
            }
            Ok(())
        })
    }

    fn silu_fwd(&self, y: &mut Storage, x: &Storage) -> Result<()> {
        const OP: &str = "silu";
        with_float!(y.dtype(), OP, |T| {
            cpu::silu_fwd(out_mut::<T>(y, OP, "y")?, &vals::<T>(x));
            Ok(())
        })
    }

    fn silu_bwd(&self, dx: &mut Storage, dy: &Storage, x: &Storage) -> Result<()> {
        const OP: &str = "silu.backward";
        with_float!(dx.dtype(), OP, |T| {
            cpu::silu_bwd(out_mut::<T>(dx, OP, "dx")?, &vals::<T>(dy), &vals::<T>(x));
            Ok(())
        })
    }

    fn swiglu_fwd(&self, y: &mut Storage, g: &Storage, u: &Storage) -> Result<()> {
        const OP: &str = "swiglu";
        with_float!(y.dtype(), OP, |T| {
            cpu::swiglu_fwd(out_mut::<T>(y, OP, "y")?, &vals::<T>(g), &vals::<T>(u));
            Ok(())
        })
    }

    fn swiglu_bwd(&self, dg: Option<&mut Storage>, du: Option<&mut Storage>, dy: &Storage, g: &Storage, u: &Storage) -> Result<()> {
        const OP: &str = "swiglu.backward";
        with_float!(dy.dtype(), OP, |T| { gated_bwd::<T>(dg, du, dy, g, u, OP, cpu::swiglu_bwd::<T>) })
    }

    fn gelu_tanh_fwd(&self, y: &mut Storage, x: &Storage) -> Result<()> {
        const OP: &str = "gelu_tanh";
        with_float!(y.dtype(), OP, |T| {
            cpu::gelu_tanh_fwd(out_mut::<T>(y, OP, "y")?, &vals::<T>(x));
            Ok(())
        })
    }

    fn gelu_tanh_bwd(&self, dx: &mut Storage, dy: &Storage, x: &Storage) -> Result<()> {
        const OP: &str = "gelu_tanh.backward";
        with_float!(dx.dtype(), OP, |T| {
            cpu::gelu_tanh_bwd(out_mut::<T>(dx, OP, "dx")?, &vals::<T>(dy), &vals::<T>(x));
            Ok(())
        })
    }

    fn geglu_fwd(&self, y: &mut Storage, g: &Storage, u: &Storage) -> Result<()> {
        const OP: &str = "geglu";
        with_float!(y.dtype(), OP, |T| {
            cpu::geglu_fwd(out_mut::<T>(y, OP, "y")?, &vals::<T>(g), &vals::<T>(u));
            Ok(())
        })
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
        with_float!(dst.dtype(), op, |T| {
            cpu::copy_cols(out_mut::<T>(dst, op, "dst")?, dst_ld, dst_off, &vals::<T>(src), src_ld, src_off, rows, cols);
            Ok(())
        })
    }

    fn softcap_fwd(&self, y: &mut Storage, x: &Storage, cap: f64) -> Result<()> {
        const OP: &str = "softcap";
        with_float!(y.dtype(), OP, |T| {
            cpu::softcap_fwd(out_mut::<T>(y, OP, "y")?, &vals::<T>(x), cap);
            Ok(())
        })
    }

    fn softcap_bwd(&self, dx: &mut Storage, dy: &Storage, y: &Storage, cap: f64) -> Result<()> {
        const OP: &str = "softcap.backward";
        with_float!(dx.dtype(), OP, |T| {
            cpu::softcap_bwd(out_mut::<T>(dx, OP, "dx")?, &vals::<T>(dy), &vals::<T>(y), cap);
            Ok(())
        })
    }

    fn geglu_bwd(&self, dg: Option<&mut Storage>, du: Option<&mut Storage>, dy: &Storage, g: &Storage, u: &Storage) -> Result<()> {
        const OP: &str = "geglu.backward";
        with_float!(dy.dtype(), OP, |T| { gated_bwd::<T>(dg, du, dy, g, u, OP, cpu::geglu_bwd::<T>) })
    }

    // --- reductions ---------------------------------------------------------------------------

    fn sum_squares(&self, x: &Storage, op: &'static str) -> Result<f64> {
        with_float!(x.dtype(), op, |T| { Ok(vals::<T>(x).iter().map(|v| v.to_f64() * v.to_f64()).sum()) })
    }

    fn all_finite(&self, x: &Storage, op: &'static str) -> Result<bool> {
        with_float!(x.dtype(), op, |T| { Ok(vals::<T>(x).iter().all(|v| v.is_finite())) })
    }

    fn sum(&self, y: &mut Storage, x: &Storage, factor: f64, op: &'static str) -> Result<()> {
        with_float!(y.dtype(), op, |T| {
            let s: f64 = vals::<T>(x).iter().map(|v| v.to_f64()).sum();
            out_mut::<T>(y, op, "y")?[0] = T::from_f64(s * factor);
            Ok(())
        })
    }

    // --- matmul -------------------------------------------------------------------------------

    fn gemm(&self, c: &mut Storage, a: &Storage, b: &Storage, g: &Gemm, op: &'static str) -> Result<()> {
        with_float!(c.dtype(), op, |T| {
            let cs = out_mut::<T>(c, op, "c")?;
            let av = vals::<T>(a);
            let (m, k, n) = (g.m, g.k, g.n);
            // One GEMM over batch·m rows when B is shared and A is not transposed.
            let folded = !g.b_batched && !g.ta;
            let (batches, rows) = if folded { (1, g.batch * m) } else { (g.batch, m) };
            for i in 0..batches {
                let cb = &mut cs[g.c_off + i * rows * n..][..rows * n];
                let ab = &av[g.a_off + i * rows * k..][..rows * k];
                let b0 = g.b_off + if g.b_batched { i * k * n } else { 0 };
                gemm_one::<T>(cb, ab, b, b0, rows, k, n, g.ta, g.tb, T::from_f64(g.alpha), T::from_f64(g.beta), g.frozen);
            }
            b.release_read_pages();
            Ok(())
        })
    }

    // --- norm ---------------------------------------------------------------------------------

    fn rms_norm_fwd(&self, y: &mut Storage, rstd: &mut Storage, x: &Storage, w: &Storage, c: usize, eps: f64) -> Result<()> {
        const OP: &str = "rms_norm";
        with_float!(y.dtype(), OP, |T| {
            cpu::rms_norm_fwd(out_mut::<T>(y, OP, "y")?, out_mut::<T>(rstd, OP, "rstd")?, &vals::<T>(x), &vals::<T>(w), c, T::from_f64(eps));
            Ok(())
        })
    }

    fn rms_norm_bwd(&self, dx: Option<&mut Storage>, dw: Option<&mut Storage>, dy: &Storage, x: &Storage, w: &Storage, rstd: &Storage, c: usize) -> Result<()> {
        const OP: &str = "rms_norm.backward";
        with_float!(dy.dtype(), OP, |T| {
            let dx = dx.map(|s| out_mut::<T>(s, OP, "dx")).transpose()?;
            let dw = dw.map(|s| out_mut::<T>(s, OP, "dw")).transpose()?;
            cpu::rms_norm_bwd(dx, dw, &vals::<T>(dy), &vals::<T>(x), &vals::<T>(w), &vals::<T>(rstd), c);
            Ok(())
        })
    }

    fn rms_norm_bwd_from_y(&self, dx: &mut Storage, dy: &Storage, y: &Storage, w: &Storage, rstd: &Storage, c: usize) -> Result<()> {
        const OP: &str = "rms_norm.backward";
        with_float!(dy.dtype(), OP, |T| {
            cpu::rms_norm_bwd_from_y(out_mut::<T>(dx, OP, "dx")?, &vals::<T>(dy), &vals::<T>(y), &vals::<T>(w), &vals::<T>(rstd), c);
            Ok(())
        })
    }

    // --- rope ---------------------------------------------------------------------------------

    fn rope(&self, y: &mut Storage, x: &Storage, pos: &[usize], inv_freq: &[f64], h: usize, hd: usize, scale: f64, inverse: bool) -> Result<()> {
        const OP: &str = "rope";
        with_float!(y.dtype(), OP, |T| {
            cpu::rope(out_mut::<T>(y, OP, "y")?, &vals::<T>(x), pos, inv_freq, h, hd, scale, inverse);
            Ok(())
        })
    }

    // --- attention ----------------------------------------------------------------------------

    fn attn_fwd(&self, o: &mut Storage, lse: &mut Storage, q: &Storage, k: &Storage, v: &Storage, mask: Option<&[bool]>, d: &AttnDims) -> Result<()> {
        const OP: &str = "attention";
        with_float!(o.dtype(), OP, |T| {
            cpu_attn::attention_fwd(out_mut::<T>(o, OP, "o")?, out_mut::<T>(lse, OP, "lse")?, &vals::<T>(q), &vals::<T>(k), &vals::<T>(v), mask, *d);
            Ok(())
        })
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
        with_float!(dout.dtype(), OP, |T| {
            // The tiled kernel writes all three; absent outputs go to scratch.
            let (mut sq, mut sk, mut sv) = (Vec::new(), Vec::new(), Vec::new());
            let dq = out_or_scratch::<T>(dq, &mut sq, q.len(), OP)?;
            let dk = out_or_scratch::<T>(dk, &mut sk, k.len(), OP)?;
            let dv = out_or_scratch::<T>(dv, &mut sv, v.len(), OP)?;
            cpu_attn::attention_bwd(dq, dk, dv, &vals::<T>(dout), &vals::<T>(q), &vals::<T>(k), &vals::<T>(v), &vals::<T>(o), &vals::<T>(lse), mask, *d);
            Ok(())
        })
    }

    // --- loss ---------------------------------------------------------------------------------

    fn ce_fwd(&self, lse: &mut Storage, x: &Storage, targets: &[i64], ignore: i64, vocab: usize) -> Result<f64> {
        const OP: &str = "cross_entropy";
        with_float!(lse.dtype(), OP, |T| { Ok(cpu::cross_entropy_fwd(out_mut::<T>(lse, OP, "lse")?, &vals::<T>(x), targets, ignore, vocab)) })
    }

    fn ce_bwd(&self, x: &mut Storage, lse: &Storage, lse_off: usize, targets: &[i64], ignore: i64, vocab: usize, g: f64, softcap: Option<f64>) -> Result<()> {
        const OP: &str = "cross_entropy.backward";
        with_float!(x.dtype(), OP, |T| {
            let rows = targets.len();
            let xs = &mut out_mut::<T>(x, OP, "x")?[..rows * vocab];
            cpu::cross_entropy_bwd_inplace(xs, &vals::<T>(lse)[lse_off..lse_off + rows], targets, ignore, vocab, T::from_f64(g), softcap);
            Ok(())
        })
    }

    fn linear_ce_fwd(&self, lse: &mut Storage, dh: Option<&mut Storage>, h: &Storage, w: &Storage, targets: &[i64], c: &CeBlocks, g: f64) -> Result<f64> {
        const OP: &str = "linear_cross_entropy";
        with_float!(lse.dtype(), OP, |T| {
            let dh = dh.map(|s| out_mut::<T>(s, OP, "dh")).transpose()?;
            let l = out_mut::<T>(lse, OP, "lse")?;
            let loss = cpu::linear_cross_entropy_fwd(l, dh, &vals::<T>(h), w, targets, c.ignore, c.d, c.vocab, c.rows_blk, c.cols, T::from_f64(g), c.softcap);
            w.release_read_pages();
            Ok(loss)
        })
    }

    // --- embedding ----------------------------------------------------------------------------

    fn embedding_fwd(&self, y: &mut Storage, table: &Storage, ids: &[u32], dim: usize) -> Result<()> {
        const OP: &str = "embedding";
        with_float!(y.dtype(), OP, |T| {
            cpu::embedding_fwd(out_mut::<T>(y, OP, "y")?, table, ids, dim);
            Ok(())
        })
    }

    fn embedding_bwd(&self, dtable: &mut Storage, dy: &Storage, ids: &[u32], dim: usize) -> Result<()> {
        const OP: &str = "embedding.backward";
        with_float!(dtable.dtype(), OP, |T| {
            cpu::embedding_bwd(out_mut::<T>(dtable, OP, "dtable")?, &vals::<T>(dy), ids, dim);
            Ok(())
        })
    }

    // --- optimizer ----------------------------------------------------------------------------

    fn adamw_step(&self, p: &mut Storage, m: &mut Storage, v: &mut Storage, g: &Storage, h: &AdamWStep) -> Result<()> {
        const OP: &str = "AdamW::step";
        with_float!(p.dtype(), OP, |T| {
            let gv = vals::<T>(g);
            cpu::adamw_step(
                out_mut::<T>(p, OP, "param")?,
                out_mut::<T>(m, OP, "m")?,
                out_mut::<T>(v, OP, "v")?,
                &gv,
                h.lr,
                h.beta1,
                h.beta2,
                h.eps,
                h.weight_decay,
                h.step,
            );
            Ok(())
        })
    }

    // --- adapter helpers ----------------------------------------------------------------------

    fn dropout_apply(&self, y: &mut Storage, x: &Storage, p: f64, seed: u64, accumulate: bool) -> Result<()> {
        const OP: &str = "dropout";
        with_float!(y.dtype(), OP, |T| {
            let (ys, xv) = (out_mut::<T>(y, OP, "y")?, vals::<T>(x));
            let f = |i: usize| T::from_f64(dropout_factor(seed, p, i));
            if accumulate {
                ys.iter_mut().zip(xv.iter()).enumerate().for_each(|(i, (y, x))| *y += *x * f(i));
            } else {
                ys.iter_mut().zip(xv.iter()).enumerate().for_each(|(i, (y, x))| *y = *x * f(i));
            }
            Ok(())
        })
    }

    fn gather_scale_cols(&self, z: &mut Storage, zk: &mut Storage, d: &Storage, idx: &[u32], m: usize) -> Result<()> {
        const OP: &str = "speclora_linear";
        with_float!(z.dtype(), OP, |T| {
            let (zs, zks, dv) = (out_mut::<T>(z, OP, "z")?, out_mut::<T>(zk, OP, "zk")?, vals::<T>(d));
            let k = idx.len();
            for (zr, kr) in zs.chunks_mut(m).zip(zks.chunks_mut(k.max(1))) {
                for (j, &i) in idx.iter().enumerate() {
                    kr[j] = zr[i as usize];
                    zr[i as usize] *= dv[j];
                }
            }
            Ok(())
        })
    }

    fn gather_cols(&self, out: &mut Storage, z: &Storage, d: &Storage, idx: &[u32], m: usize, shift: f64) -> Result<()> {
        const OP: &str = "speclora_linear.backward";
        with_float!(out.dtype(), OP, |T| {
            let (os, zv, dv) = (out_mut::<T>(out, OP, "out")?, vals::<T>(z), vals::<T>(d));
            let (k, sh) = (idx.len(), T::from_f64(shift));
            for (zr, or) in zv.chunks(m).zip(os.chunks_mut(k.max(1))) {
                for (j, &i) in idx.iter().enumerate() {
                    or[j] = zr[i as usize] * (dv[j] - sh);
                }
            }
            Ok(())
        })
    }

    fn gather_rows(&self, out: &mut Storage, w: &Storage, idx: &[u32], n: usize) -> Result<()> {
        const OP: &str = "speclora_linear.backward";
        with_float!(out.dtype(), OP, |T| {
            for (r, &i) in out_mut::<T>(out, OP, "out")?.chunks_mut(n).zip(idx) {
                w.try_read_into(i as usize * n, r)?;
            }
            Ok(())
        })
    }

    fn scale_cols(&self, out: &mut Storage, p: &Storage, c: &Storage) -> Result<()> {
        const OP: &str = "scale_cols";
        with_float!(out.dtype(), OP, |T| {
            let (os, pv, cv) = (out_mut::<T>(out, OP, "out")?, vals::<T>(p), vals::<T>(c));
            for (o, pr) in os.chunks_mut(cv.len()).zip(pv.chunks(cv.len())) {
                o.iter_mut().zip(pr.iter().zip(cv.iter())).for_each(|(o, (p, c))| *o = *p * *c);
            }
            Ok(())
        })
    }

    fn svd_coef(&self, c: &mut Storage, d: &Storage, sigma: &Storage) -> Result<()> {
        const OP: &str = "speclora_svd_linear";
        with_float!(c.dtype(), OP, |T| {
            let (cs, dv, sv) = (out_mut::<T>(c, OP, "c")?, vals::<T>(d), vals::<T>(sigma));
            cs.iter_mut().zip(dv.iter().zip(sv.iter())).for_each(|(c, (d, s))| *c = (*d - T::ONE) * *s);
            Ok(())
        })
    }

    fn col_dot(&self, dd: &mut Storage, a: &Storage, lda: usize, idx: Option<&[u32]>, b: &Storage, w: Option<&Storage>, divide: bool) -> Result<()> {
        const OP: &str = "col_dot";
        with_float!(dd.dtype(), OP, |T| {
            let (ds, av, bv) = (out_mut::<T>(dd, OP, "dd")?, vals::<T>(a), vals::<T>(b));
            let k = ds.len();
            ds.iter_mut().for_each(|v| *v = T::ZERO);
            // Row by row (the sums run over t in order, as the reference loops always did).
            for (ar, br) in av.chunks(lda).zip(bv.chunks(k.max(1))) {
                match idx {
                    Some(ix) => ds.iter_mut().zip(ix.iter().zip(br)).for_each(|(d, (&i, b))| *d += ar[i as usize] * *b),
                    None => ds.iter_mut().zip(ar.iter().zip(br)).for_each(|(d, (a, b))| *d += *a * *b),
                }
            }
            if let Some(w) = w {
                let wv = vals::<T>(w);
                if divide {
                    ds.iter_mut().zip(wv.iter()).for_each(|(d, w)| *d /= *w);
                } else {
                    ds.iter_mut().zip(wv.iter()).for_each(|(d, w)| *d *= *w);
                }
            }
            Ok(())
        })
    }

    fn add_scaled(&self, y: &mut Storage, x: &Storage, s: f64) -> Result<()> {
        const OP: &str = "add_scaled";
        with_float!(y.dtype(), OP, |T| {
            let (ys, xv, st) = (out_mut::<T>(y, OP, "y")?, vals::<T>(x), T::from_f64(s));
            ys.iter_mut().zip(xv.iter()).for_each(|(y, x)| *y += st * *x);
            Ok(())
        })
    }

    fn sub_diag(&self, mm: &mut Storage, v: &Storage) -> Result<()> {
        const OP: &str = "sub_diag";
        with_float!(mm.dtype(), OP, |T| {
            let (ms, vv) = (out_mut::<T>(mm, OP, "m")?, vals::<T>(v));
            let r = vv.len();
            (0..r).for_each(|i| ms[i * r + i] -= vv[i]);
            Ok(())
        })
    }

    fn gated_recompute(&self, x: &mut Storage, g: &Storage, u: &Storage, act: GatedAct) -> Result<()> {
        const OP: &str = "gated_adapter_linear";
        with_float!(x.dtype(), OP, |T| {
            let (x, g, u) = (out_mut::<T>(x, OP, "x")?, vals::<T>(g), vals::<T>(u));
            match act {
                GatedAct::Silu => cpu::swiglu_fwd(x, &g, &u),
                GatedAct::GeluTanh => cpu::geglu_fwd(x, &g, &u),
            }
            Ok(())
        })
    }

    fn gated_bwd_in_place(&self, dx_dg: &mut Storage, du: &mut Storage, g: &Storage, u: &Storage, act: GatedAct) -> Result<()> {
        const OP: &str = "gated_adapter_linear.backward";
        with_float!(dx_dg.dtype(), OP, |T| {
            let (dx_dg, du, g, u) = (out_mut::<T>(dx_dg, OP, "dx")?, out_mut::<T>(du, OP, "du")?, vals::<T>(g), vals::<T>(u));
            match act {
                GatedAct::Silu => cpu::swiglu_bwd_in_place(dx_dg, du, &g, &u),
                GatedAct::GeluTanh => cpu::geglu_bwd_in_place(dx_dg, du, &g, &u),
            }
            Ok(())
        })
    }

    fn dora_norms(&self, nu: &mut Storage, wnorm2: &Storage, b: &Storage, awt: &Storage, aat: &Storage, r: usize, s: f64) -> Result<()> {
        const OP: &str = "dora_row_norms";
        with_float!(nu.dtype(), OP, |T| {
            let ns = out_mut::<T>(nu, OP, "nu")?;
            let (wn, bv, awt, aat) = (vals::<T>(wnorm2), vals::<T>(b), vals::<T>(awt), vals::<T>(aat));
            let (m, st, two) = (ns.len(), T::from_f64(s), T::from_f64(2.0));
            for (i, nu) in ns.iter_mut().enumerate() {
                let bi = &bv[i * r..(i + 1) * r];
                let cross: T = (0..r).map(|q| bi[q] * awt[q * m + i]).sum();
                let quad: T = (0..r).map(|p| bi[p] * (0..r).map(|q| aat[p * r + q] * bi[q]).sum::<T>()).sum();
                let v = wn[i] + two * st * cross + st * st * quad;
                *nu = if v > T::ZERO { v.sqrt() } else { T::ZERO };
            }
            Ok(())
        })
    }

    fn dora_scale(&self, g: &mut Storage, nu_hat: &mut Storage, nu: &Storage, mag: &Storage, floor: f64) -> Result<()> {
        const OP: &str = "dora_linear";
        with_float!(g.dtype(), OP, |T| {
            let (gs, hs) = (out_mut::<T>(g, OP, "g")?, out_mut::<T>(nu_hat, OP, "nu_hat")?);
            let (nv, mv, fl) = (vals::<T>(nu), vals::<T>(mag), T::from_f64(floor));
            for (i, (g, h)) in gs.iter_mut().zip(hs.iter_mut()).enumerate() {
                *h = if nv[i] > fl { nv[i] } else { fl };
                *g = mv[i] / *h;
            }
            Ok(())
        })
    }
}

/// C [m, n] = alpha·op(A)·op(B) + beta·C with B read from `b` at element `b0`: in place when B
/// is host `[T]`, else through the tiled converting GEMM (alpha applied to a scratch product).
/// A `frozen` B goes through [`cpu::gemm_frozen`] (the process's matmul precision).
#[allow(clippy::too_many_arguments)]
fn gemm_one<T: Float>(c: &mut [T], a: &[T], b: &Storage, b0: usize, m: usize, k: usize, n: usize, ta: bool, tb: bool, alpha: T, beta: T, frozen: bool) {
    let stored =
        |c: &mut [T], beta: T| if frozen { cpu::gemm_frozen(c, a, b, b0, m, k, n, ta, tb, beta) } else { cpu::gemm_stored(c, a, b, b0, m, k, n, ta, tb, beta) };
    if let (Some(bs), false) = (b.slice::<T>(), frozen) {
        return cpu::gemm(c, a, &bs[b0..b0 + k * n], m, k, n, ta, tb, alpha, beta);
    }
    if alpha == T::ONE {
        return stored(c, beta);
    }
    let mut t = cpu::zeros::<T>(m * n);
    stored(&mut t, T::ZERO);
    c.iter_mut().zip(&t).for_each(|(c, t)| *c = alpha * *t + beta * *c);
}

/// `s` as a mutable output, or `scratch` resized to `n` when the caller wants no such output.
fn out_or_scratch<'a, T: Float>(s: Option<&'a mut Storage>, scratch: &'a mut Vec<T>, n: usize, op: &'static str) -> Result<&'a mut [T]> {
    match s {
        Some(s) => out_mut::<T>(s, op, "gradient"),
        None => {
            *scratch = cpu::zeros::<T>(n);
            Ok(&mut scratch[..])
        }
    }
}

/// A gated product's backward kernel: (dg, du, dy, g, u).
type GatedGrad<T> = fn(&mut [T], &mut [T], &[T], &[T], &[T]);

/// The backward of a gated product y = f(g) ⊙ u through `kernel(dg, du, dy, g, u)`, which writes
/// both gradients: an absent one goes to scratch.
fn gated_bwd<T: Float>(
    dg: Option<&mut Storage>,
    du: Option<&mut Storage>,
    dy: &Storage,
    g: &Storage,
    u: &Storage,
    op: &'static str,
    kernel: GatedGrad<T>,
) -> Result<()> {
    let n = dy.len();
    let (mut sg, mut su) = (Vec::new(), Vec::new());
    let dg = out_or_scratch::<T>(dg, &mut sg, n, op)?;
    let du = out_or_scratch::<T>(du, &mut su, n, op)?;
    kernel(dg, du, &vals::<T>(dy), &vals::<T>(g), &vals::<T>(u));
    Ok(())
}
