//! Text generation for trying a model: KV cache, greedy or temperature/top-p sampling, stop on
//! end-of-sequence ids or the token budget.

use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::model::decoder::KvCache;
use crate::model::Model;
use crate::tensor::Tensor;

/// How to pick each next token.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Always take the most likely token (ignores temperature and top_p).
    pub greedy: bool,
    pub temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p.
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after emitting any of these.
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 64, greedy: true, temperature: 0.7, top_p: 0.9, seed: 0, stop_ids: Vec::new() }
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each new id as it is
/// produced. Returns the new ids (a stop id, when hit, is included).
pub fn generate(model: &dyn Model, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32) -> Result<()>) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::invalid("generate", "the prompt has no tokens"));
    }
    let sampling_ok = opts.temperature > 0.0 && opts.temperature.is_finite() && opts.top_p > 0.0 && opts.top_p <= 1.0;
    if !opts.greedy && !sampling_ok {
        return Err(Error::invalid("generate", format!("need temperature > 0 and 0 < top_p ≤ 1, got {} and {}", opts.temperature, opts.top_p)));
    }
    let mut rng = SplitMix::new(opts.seed);
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    let mut h = model.forward_cached(prompt, 1, prompt.len(), &mut cache)?;
    while out.len() < opts.max_new_tokens {
        let logits = next_logits(model, &h)?;
        let tok = if opts.greedy { argmax(&logits) } else { sample(&logits, opts.temperature, opts.top_p, &mut rng) };
        out.push(tok);
        on_token(tok)?;
        if opts.stop_ids.contains(&tok) || cache.len + 1 > model.config().max_position_embeddings {
            break;
        }
        h = model.forward_cached(&[tok], 1, 1, &mut cache)?;
    }
    Ok(out)
}

/// Logits of the last row of the hidden states [n, hidden].
fn next_logits(model: &dyn Model, h: &Tensor) -> Result<Vec<f64>> {
    let (n, d) = (h.dims()[0], h.dims()[1]);
    let last: Vec<f64> = h.to_vec_f64()[(n - 1) * d..].to_vec();
    let x = crate::device::with_float!(model.dtype(), "generate", |T| { Tensor::from_vec(last.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>(), [1, d]) })?;
    Ok(model.head_logits(&x)?.to_vec_f64())
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f64]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from softmax(logits / temperature) restricted to the top-p nucleus.
pub fn sample(logits: &[f64], temperature: f64, top_p: f64, rng: &mut SplitMix) -> u32 {
    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(f64, u32)> = logits.iter().enumerate().map(|(i, &l)| (((l - m) / temperature).exp(), i as u32)).collect();
    let z: f64 = probs.iter().map(|p| p.0).sum();
    probs.iter_mut().for_each(|p| p.0 /= z);
    probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut cum = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        cum += p.0;
        if cum >= top_p {
            cut = i + 1;
            break;
        }
    }
    let kept = &probs[..cut];
    let total: f64 = kept.iter().map(|p| p.0).sum();
    let mut r = rng.uniform(0.0, total);
    for p in kept {
        r -= p.0;
        if r <= 0.0 {
            return p.1;
        }
    }
    kept[kept.len() - 1].1
}
