//! Scaled dot-product attention with grouped KV heads (GQA), causal masking, an optional
//! sliding window and a key padding mask. Memory is linear in sequence length: the forward saves
//! the output and one logsumexp per (query, head), and the backward recomputes the probabilities
//! (FlashAttention's trade).
//!
//! Layouts follow the projections directly, so no transposes are needed:
//! q [b, t, nh, hd], k and v [b, s, nkv, hd], output [b, t, nh, hd]; nh must be a multiple of nkv.

use super::{check_dtype, compute_dtype};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::AttnDims;
use crate::error::{Error, Result};
use crate::tensor::kernels_for;
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
    /// Soft cap c of the scores (Gemma 2): S = c·tanh(scale·q·k / c) before the masks and the
    /// softmax; `None` leaves the scores uncapped.
    pub softcap: Option<f64>,
    /// Sliding window w ≥ 1 (Mistral, Gemma 2/3, Qwen2's local layers; needs `causal`): the query
    /// at absolute position p = s − t + i sees key j only if p − j < w (transformers' mask
    /// kv_idx > q_idx − sliding_window). `None`: no window.
    pub window: Option<usize>,
}

/// softmax(scale·QKᵀ + masks)·V per head (the scores soft-capped first when `opts.softcap`);
/// query heads h use kv head h / (nh/nkv). The masks are causal, the sliding window and the key
/// padding mask. A query that can see no key (all padding) outputs zeros.
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
    if let Some(c) = opts.softcap {
        if !(c > 0.0 && c.is_finite()) {
            return Err(Error::invalid("attention", format!("softcap must be finite and > 0, got {c}")));
        }
    }
    if let Some(w) = opts.window {
        if w == 0 {
            return Err(Error::invalid("attention", "window must be ≥ 1 (a query always sees its own position), got 0"));
        }
        if !opts.causal {
            return Err(Error::invalid(
                "attention",
                format!("window = {w} needs causal attention (a sliding window bounds how far back a causal query looks)"),
            ));
        }
    }
    let d = AttnDims { b, t, s, nh, nkv, hd, causal: opts.causal, scale, softcap: opts.softcap, window: opts.window };
    let kr = kernels_for("attention", &[("q", q), ("k", k), ("v", v)])?;
    let (mut o, mut lse) = (kr.zeros(dt, q.numel(), "attention")?, kr.zeros(dt, b * t * nh, "attention")?);
    kr.attn_fwd(&mut o, &mut lse, &q.read(), &k.read(), &v.read(), opts.key_mask.as_deref(), &d)?;
    let (o, lse) = (Tensor::from_storage(o, q.shape().clone()), Tensor::from_storage(lse, [b, t, nh].into()));
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
    /// under a soft cap S = c·tanh(z/c) of z = scale·QKᵀ, so dz = dS ⊙ (1 − tanh²(z/c));
    /// dQ = scale·dz K; dK = scale·dzᵀ Q (GQA: summed over the query heads sharing a kv head).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "attention.backward";
        let k = kernels_for(OP, &[("dy", dy), ("q", &self.q)])?;
        let dt = dy.dtype();
        let mut dq = needs[0].then(|| k.zeros(dt, self.q.numel(), OP)).transpose()?;
        let mut dk = needs[1].then(|| k.zeros(dt, self.k.numel(), OP)).transpose()?;
        let mut dv = needs[2].then(|| k.zeros(dt, self.v.numel(), OP)).transpose()?;
        k.attn_bwd(
            dq.as_mut(),
            dk.as_mut(),
            dv.as_mut(),
            &dy.read(),
            &self.q.read(),
            &self.k.read(),
            &self.v.read(),
            &self.o.read(),
            &self.lse.read(),
            self.mask.as_deref(),
            &self.d,
        )?;
        Ok(vec![
            dq.map(|s| Tensor::from_storage(s, self.q.shape().clone())),
            dk.map(|s| Tensor::from_storage(s, self.k.shape().clone())),
            dv.map(|s| Tensor::from_storage(s, self.v.shape().clone())),
        ])
    }
}
