//! Optimization: AdamW over the trainable leaves, global gradient-norm clipping and learning-rate
//! schedules.
//!
//! AdamW (Loshchilov & Hutter, decoupled weight decay) keeps, per trainable value, a first moment
//! m and a second moment v in the parameter's own dtype. For a parameter p with gradient g at its
//! t-th update (t counts from 1):
//!
//! ```text
//! m ← β₁·m + (1 − β₁)·g
//! v ← β₂·v + (1 − β₂)·g²
//! m̂ = m / (1 − β₁ᵗ)          v̂ = v / (1 − β₂ᵗ)
//! p ← p − lr·( m̂ / (√v̂ + ε) + λ·p )
//! ```
//!
//! where λ is the weight decay. The decay term uses p before the update and is not scaled by the
//! adaptive denominator ("decoupled"); this equals PyTorch's `AdamW` (p ← p·(1 − lr·λ) followed by
//! the Adam step). State exists only for tensors passed to [`AdamW::new`], which must all be
//! trainable leaves: frozen weights are refused, so they never get moments.

use crate::autograd::GradStore;
use crate::backend::AdamWStep;
use crate::device::with_float;
use crate::error::{Error, Result};
use crate::storage::{host_from_vec, Storage};
use crate::tensor::Tensor;

/// Hyperparameters of [`AdamW`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Base learning rate (a schedule scales it; [`AdamW::step`] takes the rate to use).
    pub lr: f64,
    /// Decay rate β₁ of the first moment.
    pub beta1: f64,
    /// Decay rate β₂ of the second moment.
    pub beta2: f64,
    /// ε added to √v̂ in the denominator.
    pub eps: f64,
    /// Decoupled weight decay λ (0 disables it).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite();
        if !(ok(self.lr) && self.lr >= 0.0) {
            return Err(Error::invalid("AdamW::new", format!("lr must be finite and >= 0, got {}", self.lr)));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid("AdamW::new", format!("{name} must lie in [0, 1), got {b}")));
            }
        }
        if !(ok(self.eps) && self.eps > 0.0) {
            return Err(Error::invalid("AdamW::new", format!("eps must be finite and > 0, got {}", self.eps)));
        }
        if !(ok(self.weight_decay) && self.weight_decay >= 0.0) {
            return Err(Error::invalid("AdamW::new", format!("weight_decay must be finite and >= 0, got {}", self.weight_decay)));
        }
        Ok(())
    }
}

/// Moments of one parameter, stored in the parameter's dtype.
struct Slot {
    param: Tensor,
    /// Number of updates this parameter has received (its t in the bias corrections).
    step: u64,
    m: Storage,
    v: Storage,
    /// Whether decoupled weight decay applies to this parameter.
    decay: bool,
}

impl Slot {
    fn zeros(param: Tensor) -> Result<Slot> {
        let (n, k) = (param.numel(), crate::backend::kernels(param.device())?);
        let (m, v) = (k.zeros(param.dtype(), n, "AdamW::new")?, k.zeros(param.dtype(), n, "AdamW::new")?);
        Ok(Slot { param, step: 0, m, v, decay: true })
    }

    fn describe(&self, index: usize) -> String {
        describe(index, &self.param)
    }
}

fn describe(index: usize, t: &Tensor) -> String {
    format!("param #{index} ({} {})", t.shape(), t.dtype())
}

/// A snapshot of one parameter's optimizer state (see [`AdamW::state`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamState {
    /// Updates this parameter has received (t in its bias corrections).
    pub step: u64,
    /// First moment m, converted exactly to f64.
    pub m: Vec<f64>,
    /// Second moment v, converted exactly to f64.
    pub v: Vec<f64>,
}

/// A snapshot of the whole optimizer state, in parameter order.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    /// Number of successful [`AdamW::step`] calls.
    pub step: u64,
    pub params: Vec<ParamState>,
}

/// AdamW over a fixed list of trainable tensors. See the module docs for the update.
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    /// Creates zero moments for each tensor in `params`. Every tensor must be a trainable leaf
    /// ([`Tensor::is_param`]) and appear once; a frozen tensor or a repeated one is an
    /// [`Error::Invalid`] naming its position and shape.
    pub fn new(params: &[Tensor], config: AdamWConfig) -> Result<AdamW> {
        config.validate()?;
        let mut slots: Vec<Slot> = Vec::with_capacity(params.len());
        for (i, p) in params.iter().enumerate() {
            if !p.is_param() {
                return Err(Error::invalid(
                    "AdamW::new",
                    format!("{} is not trainable (frozen weights get no optimizer state; create trainable tensors with Tensor::param)", describe(i, p)),
                ));
            }
            if let Some(j) = slots.iter().position(|s| s.param.id() == p.id() || s.param.same_storage(p)) {
                return Err(Error::invalid("AdamW::new", format!("{} is the same tensor as param #{j}; list each parameter once", describe(i, p))));
            }
            slots.push(Slot::zeros(p.clone())?);
        }
        Ok(AdamW { config, slots, step: 0 })
    }

    /// Turns weight decay on or off for one parameter (on by default). Decay pulls a parameter
    /// toward 0, which suits LoRA's A and B but not a multiplicative scale such as SpecLoRA's d,
    /// whose identity value is 1: exclude those (see `Decoder::no_decay_params`).
    pub fn set_weight_decay(&mut self, param: &Tensor, on: bool) -> Result<()> {
        match self.slots.iter_mut().find(|s| s.param.id() == param.id()) {
            Some(s) => {
                s.decay = on;
                Ok(())
            }
            None => {
                Err(Error::invalid("AdamW::set_weight_decay", format!("tensor {} {} is not one of this optimizer's parameters", param.shape(), param.dtype())))
            }
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The parameters, in the order given to [`AdamW::new`].
    pub fn params(&self) -> impl Iterator<Item = &Tensor> {
        self.slots.iter().map(|s| &s.param)
    }

    /// Number of successful [`AdamW::step`] calls.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Total number of optimizer-state values: m and v for every trainable value, i.e. exactly
    /// 2 × the number of trainable values.
    pub fn state_numel(&self) -> usize {
        self.slots.iter().map(|s| s.m.len() + s.v.len()).sum()
    }

    /// One AdamW update with learning rate `lr` (typically `schedule.lr_at(config.lr, step)`).
    ///
    /// Parameters with no gradient in `grads` are skipped: their values, moments and per-parameter
    /// step count are left unchanged, so their bias corrections continue from where they were
    /// when they next receive a gradient (as in PyTorch).
    ///
    /// Everything is checked before anything is written: a gradient of the wrong shape or dtype
    /// is an error, and a gradient holding NaN or ±∞ is [`Error::NonFinite`] naming the
    /// parameter. On any error no parameter, moment or counter has changed.
    ///
    /// Parameters are updated in place; call this after `backward` has consumed the graph.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        const OP: &str = "AdamW::step";
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid(OP, format!("lr must be finite and >= 0, got {lr}")));
        }
        // Validation pass: nothing is modified until every gradient is known to be usable.
        for (i, s) in self.slots.iter().enumerate() {
            let Some(g) = grads.get(&s.param) else {
                continue;
            };
            if g.shape() != s.param.shape() {
                return Err(Error::shape(OP, "gradient", format!("{} for {}", s.param.shape(), s.describe(i)), g.shape()));
            }
            if g.dtype() != s.param.dtype() {
                return Err(Error::dtype(OP, "gradient", format!("{} for {}", s.param.dtype(), s.describe(i)), g.dtype()));
            }
            let finite = crate::backend::kernels(g.device())?.all_finite(&g.read(), OP)?;
            if !finite {
                return Err(Error::NonFinite { op: OP, what: format!("the gradient of {}", s.describe(i)) });
            }
        }
        let AdamWConfig { beta1, beta2, eps, weight_decay, .. } = self.config;
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(&s.param) else {
                continue;
            };
            let t = s.step + 1;
            let h = AdamWStep { lr, beta1, beta2, eps, weight_decay: if s.decay { weight_decay } else { 0.0 }, step: t };
            let k = crate::tensor::kernels_for(OP, &[("param", &s.param), ("gradient", g)])?;
            // A gradient sharing the parameter's storage cannot be read while the parameter is
            // locked for writing: update from a copy then.
            let g = if g.same_storage(&s.param) { Tensor::from_storage(k.upload(&g.read(), g.dtype(), OP)?, g.shape().clone()) } else { g.clone() };
            k.adamw_step(&mut s.param.write(), &mut s.m, &mut s.v, &g.read(), &h)?;
            s.step = t;
        }
        self.step += 1;
        Ok(())
    }

    /// A copy of the optimizer state with every moment converted to f64. Moments of f32
    /// parameters convert exactly (f32 → f64 → f32 is the identity), so
    /// [`AdamW::load_state`] restores them bit for bit.
    pub fn state(&self) -> Result<AdamWState> {
        let params = self
            .slots
            .iter()
            .map(|s| {
                let mut m = vec![0.0f64; s.m.len()];
                let mut v = vec![0.0f64; s.v.len()];
                // Moments on the device are copied back; a failed copy is an error, not a panic.
                s.m.try_read_into(0, &mut m)?;
                s.v.try_read_into(0, &mut v)?;
                Ok(ParamState { step: s.step, m, v })
            })
            .collect::<Result<_>>()?;
        Ok(AdamWState { step: self.step, params })
    }

    /// Replaces the optimizer state with `state` (as returned by [`AdamW::state`] for the same
    /// parameter list). Each moment is converted to its parameter's dtype. The parameter count and
    /// every moment length must match; moments must be finite and v ≥ 0. On error nothing changes.
    pub fn load_state(&mut self, state: &AdamWState) -> Result<()> {
        const OP: &str = "AdamW::load_state";
        if state.params.len() != self.slots.len() {
            return Err(Error::invalid(OP, format!("the state holds {} parameters, the optimizer has {}", state.params.len(), self.slots.len())));
        }
        let mut fresh = Vec::with_capacity(self.slots.len());
        for (i, (s, ps)) in self.slots.iter().zip(&state.params).enumerate() {
            let n = s.param.numel();
            if ps.m.len() != n || ps.v.len() != n {
                return Err(Error::shape(OP, "moments", format!("{n} values for {}", s.describe(i)), format!("m: {}, v: {}", ps.m.len(), ps.v.len())));
            }
            if !ps.m.iter().chain(&ps.v).all(|x| x.is_finite()) {
                return Err(Error::NonFinite { op: OP, what: format!("the moments of {}", s.describe(i)) });
            }
            if ps.v.iter().any(|&x| x < 0.0) {
                return Err(Error::invalid(OP, format!("the second moment of {} has negative values", s.describe(i))));
            }
            let (m, v) = with_float!(s.param.dtype(), OP, |T| {
                let conv = |x: &[f64]| host_from_vec(x.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>());
                Ok((conv(&ps.m), conv(&ps.v)))
            })?;
            let k = crate::backend::kernels(s.param.device())?;
            let (m, v) = (k.upload(&Storage::Host(m), s.param.dtype(), OP)?, k.upload(&Storage::Host(v), s.param.dtype(), OP)?);
            fresh.push((m, v, ps.step));
        }
        for (s, (m, v, step)) in self.slots.iter_mut().zip(fresh) {
            s.m = m;
            s.v = v;
            s.step = step;
        }
        self.step = state.step;
        Ok(())
    }
}

/// Clips the gradients by their global L2 norm.
///
/// With N = √(Σ g²) over every value of every gradient in `grads` (accumulated in f64), if
/// N > `max_norm` each gradient is multiplied by c = max_norm / (N + 10⁻⁶), as in PyTorch's
/// `clip_grad_norm_`. Returns N, the norm before clipping (0 for an empty store).
///
/// `max_norm` must be finite and > 0. A non-finite norm (a NaN or ±∞ gradient, or an overflow)
/// is [`Error::NonFinite`], naming the offending gradient when there is one; the gradients are
/// then left unchanged.
pub fn clip_grad_norm(grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    const OP: &str = "clip_grad_norm";
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::invalid(OP, format!("max_norm must be finite and > 0, got {max_norm}")));
    }
    let mut total = 0.0f64;
    for (_, g) in grads.iter() {
        let ss = grad_sum_sq(g)?;
        if !ss.is_finite() {
            let finite = crate::backend::kernels(g.device())?.all_finite(&g.read(), OP)?;
            let what = if finite { format!("the norm of a {} gradient (overflow)", g.shape()) } else { format!("a {} {} gradient", g.shape(), g.dtype()) };
            return Err(Error::NonFinite { op: OP, what });
        }
        total += ss;
    }
    let norm = total.sqrt();
    if !norm.is_finite() {
        return Err(Error::NonFinite { op: OP, what: format!("the global gradient norm ({} gradients)", grads.len()) });
    }
    if norm <= max_norm {
        return Ok(norm);
    }
    let c = max_norm / (norm + 1e-6);
    // Rebuild the store: a gradient whose handle and storage are ours alone is scaled in place;
    // one shared with another entry or another handle is replaced by a scaled copy, so nothing
    // outside the store changes and a shared buffer is never scaled twice.
    let old = std::mem::take(grads);
    let mut new = GradStore::new();
    for (id, g) in old.iter() {
        let scaled = scale_grad(g, c)?;
        new.accumulate(*id, scaled)?;
    }
    drop(old);
    *grads = new;
    Ok(norm)
}

/// Σ g² in f64, on the gradient's device.
fn grad_sum_sq(g: &Tensor) -> Result<f64> {
    crate::backend::kernels(g.device())?.sum_squares(&g.read(), "clip_grad_norm")
}

/// `c·g`: in place when the store holds the only handle on `g`'s storage, otherwise a new tensor.
fn scale_grad(g: &Tensor, c: f64) -> Result<Tensor> {
    let k = crate::backend::kernels(g.device())?;
    if g.is_exclusive() {
        k.scale_assign(&mut g.write(), c, "clip_grad_norm")?;
        return Ok(g.clone());
    }
    let mut copy = k.upload(&g.read(), g.dtype(), "clip_grad_norm")?;
    k.scale_assign(&mut copy, c, "clip_grad_norm")?;
    Ok(Tensor::from_storage(copy, g.shape().clone()))
}

/// A learning-rate schedule: the rate for optimizer step `step` (counting from 0) given the base
/// rate. Conventions follow Hugging Face `transformers`
/// (`get_cosine_schedule_with_warmup`, `get_linear_schedule_with_warmup`), with a floor.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum LrSchedule {
    /// lr = base for every step.
    #[default]
    Constant,
    /// Linear warmup, then cosine decay to `min_ratio`·base:
    ///
    /// ```text
    /// step < warmup:  lr = base · step / max(1, warmup)
    /// otherwise:      q  = min(1, (step − warmup) / max(1, total − warmup))
    ///                 lr = base · (min_ratio + (1 − min_ratio) · ½ · (1 + cos(π·q)))
    /// ```
    ///
    /// Step 0 of a warmup therefore has lr = 0 (as in `transformers`). Steps past `total` stay
    /// at `min_ratio`·base.
    WarmupCosine { warmup: u64, total: u64, min_ratio: f64 },
    /// Linear warmup, then linear decay to `min_ratio`·base:
    ///
    /// ```text
    /// step < warmup:  lr = base · step / max(1, warmup)
    /// otherwise:      q  = min(1, (step − warmup) / max(1, total − warmup))
    ///                 lr = base · (min_ratio + (1 − min_ratio) · (1 − q))
    /// ```
    WarmupLinear { warmup: u64, total: u64, min_ratio: f64 },
}

impl LrSchedule {
    /// The learning rate at optimizer step `step` (0-based) for base rate `base_lr`.
    pub fn lr_at(&self, base_lr: f64, step: u64) -> f64 {
        let (warmup, total, min_ratio, cosine) = match *self {
            LrSchedule::Constant => return base_lr,
            LrSchedule::WarmupCosine { warmup, total, min_ratio } => (warmup, total, min_ratio, true),
            LrSchedule::WarmupLinear { warmup, total, min_ratio } => (warmup, total, min_ratio, false),
        };
        if step < warmup {
            return base_lr * step as f64 / warmup.max(1) as f64;
        }
        let q = ((step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64).min(1.0);
        let shape = if cosine { 0.5 * (1.0 + (std::f64::consts::PI * q).cos()) } else { 1.0 - q };
        base_lr * (min_ratio + (1.0 - min_ratio) * shape)
    }
}
