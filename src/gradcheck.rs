//! Gradient checking: analytic gradients from [`backward_with_seed`] against central finite
//! differences, in f64 on the CPU reference kernels.
//!
//! The scalar probed is L = Σ f(x) ⊙ R for a fixed random R (a plain sum would hide errors that
//! sum to zero, as in softmax). For each checked element i of each trainable input:
//!   numeric_i = (L(x + ε e_i) − L(x − ε e_i)) / 2ε,
//! and the check passes when |analytic − numeric| ≤ atol·scale + rtol·max(|analytic|, |numeric|),
//! with `scale` = 1 + the largest |numeric| seen for that input, so the tolerance follows the
//! gradient's magnitude. A failure names the op, input, shape, index and both values.

use crate::autograd::{backward_with_seed, no_grad};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Tolerances and budget of a gradient check.
#[derive(Clone, Debug)]
pub struct GradcheckOptions {
    /// Finite-difference step.
    pub eps: f64,
    pub rtol: f64,
    pub atol: f64,
    /// Elements checked per input at most (chosen spread over the tensor).
    pub max_checks: usize,
    /// Seed of the projection R.
    pub seed: u64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions { eps: 1e-6, rtol: 1e-6, atol: 1e-7, max_checks: 48, seed: 0x5eed }
    }
}

/// A gradient mismatch.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub op: String,
    pub input: usize,
    pub shape: String,
    pub index: usize,
    pub analytic: f64,
    pub numeric: f64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gradcheck {}: input {} (shape {}) index {}: analytic {:.10e} vs numeric {:.10e} (diff {:.3e})",
            self.op,
            self.input,
            self.shape,
            self.index,
            self.analytic,
            self.numeric,
            (self.analytic - self.numeric).abs()
        )
    }
}

/// A tiny deterministic generator (SplitMix64) for test data and projections.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// Checks the gradients of `f` with respect to every trainable (`.param()`) f64 tensor in
/// `inputs`. Returns the mismatches (empty = pass). `name` labels the report.
pub fn gradcheck<F>(name: &str, inputs: &[Tensor], f: F, opts: &GradcheckOptions) -> Result<Vec<Mismatch>>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    for (i, t) in inputs.iter().enumerate() {
        if t.is_param() && t.dtype() != crate::DType::F64 {
            return Err(Error::dtype("gradcheck", "input", "f64 for trainable inputs", format!("{} (input {i})", t.dtype())));
        }
    }
    let y = f(inputs)?;
    let mut rng = SplitMix::new(opts.seed);
    let r = rng.vec(y.numel(), -1.0, 1.0);
    let seed = Tensor::from_vec(r.clone(), y.shape().clone())?;
    let grads = if y.requires_grad() { Some(backward_with_seed(&y, seed)?) } else { None };
    drop(y);
    let probe = |xs: &[Tensor]| -> Result<f64> {
        let y = no_grad(|| f(xs))?;
        Ok(y.to_vec_f64().iter().zip(&r).map(|(a, b)| a * b).sum())
    };
    let mut bad = Vec::new();
    for (ii, t) in inputs.iter().enumerate() {
        if !t.is_param() {
            continue;
        }
        let analytic = grads.as_ref().and_then(|g| g.get(t)).map(|g| g.to_vec_f64()).unwrap_or_else(|| vec![0.0; t.numel()]);
        let base = t.to_vec_f64();
        let n = base.len();
        let checks: Vec<usize> = if n <= opts.max_checks { (0..n).collect() } else { (0..opts.max_checks).map(|j| j * n / opts.max_checks).collect() };
        let mut numeric = Vec::with_capacity(checks.len());
        let mut x = base.clone();
        for &i in &checks {
            x[i] = base[i] + opts.eps;
            t.set_values(&x)?;
            let lp = probe(inputs)?;
            x[i] = base[i] - opts.eps;
            t.set_values(&x)?;
            let lm = probe(inputs)?;
            x[i] = base[i];
            numeric.push((lp - lm) / (2.0 * opts.eps));
        }
        t.set_values(&base)?;
        let scale = 1.0 + numeric.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (&i, &num) in checks.iter().zip(&numeric) {
            let a = analytic[i];
            // Written so that a NaN on either side counts as a mismatch.
            let within = (a - num).abs() <= opts.atol * scale + opts.rtol * a.abs().max(num.abs());
            if !within {
                bad.push(Mismatch { op: name.to_string(), input: ii, shape: t.shape().to_string(), index: i, analytic: a, numeric: num });
            }
        }
    }
    Ok(bad)
}
