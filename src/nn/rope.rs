//! RoPE frequency tables with the scaling variants of HF configs: the inverse frequencies the
//! rotary op turns by (angle = position · inv_freq(i)) and the attention factor that multiplies
//! cos and sin (so q·k logits by its square).
//!
//! With d the rotary dimension (head_dim × `partial_rotary_factor`, even), base θ and
//! i < d/2, the unscaled table is inv_freq(i) = θ^(−2i/d). The variants:
//!
//! - `linear` (factor s): inv_freq(i) / s — positions interpolated s-fold.
//! - `llama3` (factor s, low/high frequency factors l, h, original context L): with wavelength
//!   λ_i = 2π / inv_freq(i), long wavelengths λ > L/l are divided by s, short ones λ < L/h are
//!   kept, and in between the two are blended with weight γ = (L/λ − l)/(h − l):
//!   (1 − γ)·inv/s + γ·inv.
//! - `yarn` (factor s, β_fast, β_slow, original context L): the dimension at which a frequency
//!   makes r full turns over L is c(r) = d·ln(L/(2πr)) / (2 ln θ); with lo = ⌊c(β_fast)⌋ and
//!   hi = ⌈c(β_slow)⌉ (clamped to [0, d−1]; not rounded when `truncate` is false) and the ramp
//!   ρ_i = clamp((i − lo)/(hi − lo), 0, 1), the extrapolation weight is e_i = 1 − ρ_i and
//!   inv_freq(i) = (inv(i)/s)·(1 − e_i) + inv(i)·e_i. Attention factor: `attention_factor` if
//!   given, else m(s, mscale)/m(s, mscale_all_dim) when both are given, else m(s, 1), with
//!   m(s, k) = 0.1·k·ln s + 1 for s > 1 (1 otherwise).
//! - `longrope` (Phi-3; per-dimension factors f_i, `short_factor` up to the original context L,
//!   `long_factor` beyond it): inv_freq(i) = 1 / (f_i · θ^(2i/d)); attention factor
//!   `attention_factor` if given, else √(1 + ln s / ln L) with s = max_position_embeddings / L
//!   (1 when s ≤ 1).
//!
//! These follow transformers' `modeling_rope_utils` (which computes the tables in f32; here in
//! f64). `tests/rope_scaling.rs` compares every variant with tables transformers computed.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

const OP: &str = "rope scaling";

/// A RoPE scaling variant and its parameters (HF `rope_scaling` / `rope_parameters`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// No scaling (`rope_type` "default", or absent).
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        factor: Option<f64>,
        attention_factor: Option<f64>,
    },
}

/// The rope types [`RopeScaling::from_params`] accepts.
pub const SUPPORTED_ROPE_TYPES: [&str; 5] = ["default", "linear", "llama3", "yarn", "longrope"];

fn num(m: &Map<String, Value>, key: &str, ty: &str) -> Result<Option<f64>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(Error::invalid(OP, format!("rope_type {ty}: `{key}` must be a finite number, got {v}"))),
        },
    }
}

fn req(m: &Map<String, Value>, key: &str, ty: &str) -> Result<f64> {
    num(m, key, ty)?.ok_or_else(|| Error::invalid(OP, format!("rope_type {ty} needs `{key}`")))
}

fn positive(x: f64, key: &str, ty: &str) -> Result<f64> {
    if x > 0.0 {
        Ok(x)
    } else {
        Err(Error::invalid(OP, format!("rope_type {ty}: `{key}` must be > 0, got {x}")))
    }
}

fn factors(m: &Map<String, Value>, key: &str, ty: &str) -> Result<Vec<f64>> {
    let bad = || Error::invalid(OP, format!("rope_type {ty} needs `{key}`: a list of positive numbers"));
    let v = m.get(key).and_then(|v| v.as_array()).ok_or_else(bad)?;
    v.iter().map(|x| x.as_f64().filter(|x| *x > 0.0 && x.is_finite()).ok_or_else(bad)).collect()
}

impl RopeScaling {
    /// Parses an HF `rope_scaling` object (or transformers' newer `rope_parameters`, whose
    /// `rope_theta` and `partial_rotary_factor` keys are ignored here). The type is `rope_type`
    /// or the older `type`; `max_position_embeddings` is the config's top-level value (for
    /// YaRN without a factor). An unknown type is an error listing the supported ones.
    pub fn from_params(m: &Map<String, Value>, max_position_embeddings: Option<f64>) -> Result<RopeScaling> {
        let ty = match m.get("rope_type").or_else(|| m.get("type")) {
            None | Some(Value::Null) => "default",
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(Error::invalid(OP, format!("rope_type must be a string, got {v}"))),
        };
        Ok(match ty {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: positive(req(m, "factor", ty)?, "factor", ty)? },
            "llama3" => {
                let (l, h) =
                    (positive(req(m, "low_freq_factor", ty)?, "low_freq_factor", ty)?, positive(req(m, "high_freq_factor", ty)?, "high_freq_factor", ty)?);
                if h <= l {
                    return Err(Error::invalid(OP, format!("rope_type llama3: high_freq_factor ({h}) must exceed low_freq_factor ({l})")));
                }
                RopeScaling::Llama3 {
                    factor: positive(req(m, "factor", ty)?, "factor", ty)?,
                    low_freq_factor: l,
                    high_freq_factor: h,
                    original_max_position_embeddings: positive(req(m, "original_max_position_embeddings", ty)?, "original_max_position_embeddings", ty)?,
                }
            }
            "yarn" => {
                let orig = positive(req(m, "original_max_position_embeddings", ty)?, "original_max_position_embeddings", ty)?;
                let factor = match (num(m, "factor", ty)?, max_position_embeddings) {
                    (Some(f), _) => f,
                    (None, Some(mx)) => mx / orig,
                    (None, None) => return Err(Error::invalid(OP, "rope_type yarn needs `factor` (or max_position_embeddings)")),
                };
                RopeScaling::Yarn {
                    factor: positive(factor, "factor", ty)?,
                    original_max_position_embeddings: orig,
                    // transformers treats 0 like absent for the two betas.
                    beta_fast: num(m, "beta_fast", ty)?.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: num(m, "beta_slow", ty)?.filter(|b| *b != 0.0).unwrap_or(1.0),
                    mscale: num(m, "mscale", ty)?,
                    mscale_all_dim: num(m, "mscale_all_dim", ty)?,
                    attention_factor: num(m, "attention_factor", ty)?,
                    truncate: m.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
                }
            }
            "longrope" | "su" => RopeScaling::LongRope {
                short_factor: factors(m, "short_factor", ty)?,
                long_factor: factors(m, "long_factor", ty)?,
                original_max_position_embeddings: positive(req(m, "original_max_position_embeddings", ty)?, "original_max_position_embeddings", ty)?,
                factor: num(m, "factor", ty)?,
                attention_factor: num(m, "attention_factor", ty)?,
            },
            other => {
                return Err(Error::invalid(OP, format!("rope_type `{other}` is not supported (supported: {})", SUPPORTED_ROPE_TYPES.join(", "))));
            }
        })
    }

    /// The HF `rope_scaling` object of this variant (`null` for no scaling); parses back to the
    /// same value with [`RopeScaling::from_params`].
    pub fn to_json(&self) -> Value {
        use serde_json::json;
        match self {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => json!({ "rope_type": "linear", "factor": factor }),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::Yarn { factor, original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate } => json!({
                "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original_max_position_embeddings,
                "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": mscale, "mscale_all_dim": mscale_all_dim,
                "attention_factor": attention_factor, "truncate": truncate,
            }),
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, factor, attention_factor } => json!({
                "rope_type": "longrope", "short_factor": short_factor, "long_factor": long_factor,
                "original_max_position_embeddings": original_max_position_embeddings, "factor": factor, "attention_factor": attention_factor,
            }),
        }
    }

    /// The inverse frequencies (dim/2 of them) for rotary dimension `dim` (even) and base
    /// `theta`; `seq_len` picks LongRoPE's short or long factors (long beyond the original
    /// context). Errors on an odd or zero dim, a bad θ, or LongRoPE factors of the wrong length.
    pub fn inv_freq(&self, dim: usize, theta: f64, seq_len: usize) -> Result<Vec<f64>> {
        if dim == 0 || dim % 2 != 0 {
            return Err(Error::invalid(OP, format!("the rotary dimension must be even and > 0, got {dim}")));
        }
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(Error::invalid(OP, format!("rope theta must be finite and > 0, got {theta}")));
        }
        let half = dim / 2;
        let base: Vec<f64> = (0..half).map(|i| theta.powf(-((2 * i) as f64) / dim as f64)).collect();
        Ok(match self {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor: l, high_freq_factor: h, original_max_position_embeddings: ctx } => base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > ctx / l {
                        f / factor
                    } else if wavelen < ctx / h {
                        f
                    } else {
                        let g = (ctx / wavelen - l) / (h - l);
                        (1.0 - g) * f / factor + g * f
                    }
                })
                .collect(),
            RopeScaling::Yarn { factor, original_max_position_embeddings: ctx, beta_fast, beta_slow, truncate, .. } => {
                let corr = |r: f64| dim as f64 * (ctx / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
                let (mut lo, mut hi) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    (lo, hi) = (lo.floor(), hi.ceil());
                }
                let (lo, mut hi) = (lo.max(0.0), hi.min(dim as f64 - 1.0));
                if lo == hi {
                    hi += 0.001;
                }
                base.iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                        let e = 1.0 - ramp;
                        (f / factor) * (1.0 - e) + f * e
                    })
                    .collect()
            }
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings: ctx, .. } => {
                let ext = if seq_len as f64 > *ctx { long_factor } else { short_factor };
                if ext.len() != half {
                    return Err(Error::invalid(OP, format!("longrope factors hold {} values for a rotary dimension of {dim} (expected {half})", ext.len())));
                }
                base.iter().zip(ext).map(|(f, e)| f / e).collect()
            }
        })
    }

    /// The factor cos and sin are multiplied by (1 except for YaRN and LongRoPE).
    pub fn attention_factor(&self, max_position_embeddings: Option<f64>) -> f64 {
        let m = |s: f64, k: f64| if s <= 1.0 { 1.0 } else { 0.1 * k * s.ln() + 1.0 };
        match self {
            RopeScaling::Yarn { attention_factor: Some(a), .. } | RopeScaling::LongRope { attention_factor: Some(a), .. } => *a,
            RopeScaling::Yarn { factor, mscale: Some(ms), mscale_all_dim: Some(ma), .. } if *ms != 0.0 && *ma != 0.0 => m(*factor, *ms) / m(*factor, *ma),
            RopeScaling::Yarn { factor, .. } => m(*factor, 1.0),
            RopeScaling::LongRope { factor, original_max_position_embeddings: ctx, .. } => {
                let s = factor.or_else(|| max_position_embeddings.map(|mx| mx / ctx)).unwrap_or(1.0);
                if s <= 1.0 {
                    1.0
                } else {
                    (1.0 + s.ln() / ctx.ln()).sqrt()
                }
            }
            _ => 1.0,
        }
    }
}
