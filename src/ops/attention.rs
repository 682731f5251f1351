//! Scaled dot-product attention with grouped KV heads (GQA), causal masking and a key padding
//! mask. Memory is linear in sequence length: the forward saves the output and one logsumexp per
//! (query, head), and the backward recomputes the probabilities (FlashAttention's trade).
//!
//! Layouts follow the projections directly, so no transposes are needed:
//! q [b, t, nh, hd], k and v [b, s, nkv, hd], output [b, t, nh, hd]; nh must be a multiple of nkv.

use super::{check_dtype, compute_dtype, out, vals};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::cpu::AttnDims;
use crate::backend::cpu_attn;
use crate::device::with_float;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Options for [`attention`].
#[derive(Clone, Debug, Default)]
pub struct AttnOptions {
    /// Query i (absolute position s − t + i) sees only keys j ≤ s − t + i.
    pub causal: bool,
    /// [b·s] flags, true = real key, false = padding (never attended to).
    pub key_mask: Option<Vec<bool>>,
    /// Score scale; default 1/√hd.
    pub scale: Option<f64>,
}

/// softmax(scale·QKᵀ + masks)·V per head; query heads h use kv head h / (nh/nkv).
/// A query that can see no key (all padding) outputs zeros.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<Tensor> {
    let dt = compute_dtype("attention", "q", q)?;
    check_dtype("attention", "k", k, dt, true)?;
    check_dtype("attention", "v", v, dt, true)?;
    let (qd, kd) = (q.dims(), k.dims());
    if qd.len() != 4 {
        return Err(Error::shape("attention", "q", "[b, t, heads, head_dim]", q.shape()));
    }
    let (b, t, nh, hd) = (qd[0], qd[1], qd[2], qd[3]);
    if kd.len() != 4 || kd[0] != b || kd[3] != hd || kd[2] == 0 || nh % kd[2] != 0 {
        return Err(Error::shape("attention", "k", format!("[{b}, s, kv_heads dividing {nh}, {hd}]"), k.shape()));
    }
    if v.dims() != kd {
        return Err(Error::shape("attention", "v", k.shape(), v.shape()));
    }
    let (s, nkv) = (kd[1], kd[2]);
    if opts.causal && t > s {
        return Err(Error::invalid("attention", format!("causal attention needs at least as many keys ({s}) as queries ({t})")));
    }
    if let Some(m) = &opts.key_mask {
        if m.len() != b * s {
            return Err(Error::shape("attention", "key_mask", format!("{} flags ([b, s])", b * s), m.len()));
        }
    }
    let scale = opts.scale.unwrap_or(1.0 / (hd as f64).sqrt());
    let d = AttnDims { b, t, s, nh, nkv, hd, causal: opts.causal, scale };
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[q, k, v]) {
        return crate::backend::cuda::ops::attention(q, k, v, opts.key_mask.as_deref(), [b, t, s, nh, nkv, hd], opts.causal, scale);
    }
    let (o, lse) = with_float!(dt, "attention", |T| {
        let mut o = crate::backend::cpu::zeros::<T>(q.numel());
        let mut lse = crate::backend::cpu::zeros::<T>(b * t * nh);
        cpu_attn::attention_fwd(&mut o, &mut lse, &vals::<T>(&q.read()), &vals::<T>(&k.read()), &vals::<T>(&v.read()), opts.key_mask.as_deref(), d);
        Ok((out(o, q.shape().clone()), out(lse, [b, t, nh])))
    })?;
    let saved_o = o.detach();
    Ok(record(o, &[q, k, v], |_| Box::new(AttentionBwd { q: q.detach(), k: k.detach(), v: v.detach(), o: saved_o, lse, mask: opts.key_mask.clone(), d })))
}

struct AttentionBwd {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    mask: Option<Vec<bool>>,
    d: AttnDims,
}
impl Backward for AttentionBwd {
    fn name(&self) -> &'static str {
        "attention"
    }
    /// P = exp(S − lse) recomputed; D = rowsum(dO ⊙ O); dV = Pᵀ dO; dS = P ⊙ (dO Vᵀ − D);
    /// dQ = scale·dS K; dK = scale·dSᵀ Q (GQA: summed over the query heads sharing a kv head).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "attention.backward", |T| {
            let (mut dq, mut dk, mut dv) = (
                crate::backend::cpu::zeros::<T>(self.q.numel()),
                crate::backend::cpu::zeros::<T>(self.k.numel()),
                crate::backend::cpu::zeros::<T>(self.v.numel()),
            );
            cpu_attn::attention_bwd(
                &mut dq,
                &mut dk,
                &mut dv,
                &vals::<T>(&dy.read()),
                &vals::<T>(&self.q.read()),
                &vals::<T>(&self.k.read()),
                &vals::<T>(&self.v.read()),
                &vals::<T>(&self.o.read()),
                &vals::<T>(&self.lse.read()),
                self.mask.as_deref(),
                self.d,
            );
            Ok(vec![
                needs[0].then(|| out(dq, self.q.shape().clone())),
                needs[1].then(|| out(dk, self.k.shape().clone())),
                needs[2].then(|| out(dv, self.v.shape().clone())),
            ])
        })
    }
}
