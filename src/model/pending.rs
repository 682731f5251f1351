//! Stand-ins for ops that are being added (removed when they land).
use crate::error::{Error, Result};
use crate::ops::{AttnOptions, CeOptions, Rope};
use crate::tensor::Tensor;

pub fn split_last(_x: &Tensor, _sizes: &[usize]) -> Result<Vec<Tensor>> {
    Err(Error::invalid("split_last", "fused projections are not implemented yet"))
}
pub fn softcap(_x: &Tensor, _c: f64) -> Result<Tensor> {
    Err(Error::invalid("softcap", "final_logit_softcapping is not implemented yet"))
}
pub fn rope_with_table(head_dim: usize, inv_freq: Vec<f64>, scale: f64) -> Result<Rope> {
    if scale != 1.0 || inv_freq.len() * 2 != head_dim {
        return Err(Error::invalid("rope", "partial rotary / rope attention factor not implemented yet"));
    }
    Ok(Rope { head_dim, inv_freq })
}
pub fn attn_options(key_mask: Option<Vec<bool>>, scale: Option<f64>, softcap: Option<f64>, window: Option<usize>) -> Result<AttnOptions> {
    if window.is_some() {
        return Err(Error::invalid("attention", "sliding_window is not implemented yet"));
    }
    Ok(AttnOptions { causal: true, key_mask, scale, softcap })
}
pub fn ce_options(o: &CeOptions, softcap: Option<f64>) -> Result<CeOptions> {
    if softcap.is_some() {
        return Err(Error::invalid("linear_cross_entropy", "final_logit_softcapping is not implemented yet"));
    }
    Ok(o.clone())
}
