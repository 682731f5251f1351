//! Fused RMSNorm over the last dim: y = x / √(mean(x²) + eps) ⊙ w (Llama's norm; no mean
//! subtraction, no bias). Saves x and the per-row 1/rms; w may be a frozen weight in any dtype.

use super::{check_dtype, compute_dtype};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::Kernels;
use crate::error::{Error, Result};
use crate::tensor::{kernels_for, Tensor};

/// x: [.., c], w: `[c]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = compute_dtype("rms_norm", "x", x)?;
    check_dtype("rms_norm", "w", w, dt, false)?;
    let c = x.shape().last();
    if x.dims().is_empty() || w.dims() != [c] {
        return Err(Error::shape("rms_norm", "w", format!("[{c}]"), w.shape()));
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid("rms_norm", format!("eps must be finite and ≥ 0, got {eps}")));
    }
    let k = kernels_for("rms_norm", &[("x", x), ("w", w)])?;
    let rows = x.shape().rows();
    let (mut y, mut rstd) = (k.zeros(dt, x.numel(), "rms_norm")?, k.zeros(dt, rows, "rms_norm")?);
    k.rms_norm_fwd(&mut y, &mut rstd, &x.read(), &w.read(), c, eps)?;
    let (y, rstd) = (Tensor::from_storage(y, x.shape().clone()), Tensor::from_storage(rstd, [rows].into()));
    // A frozen w with no zero entry lets the backward recover x̂ = y / w from the output, which
    // the next op (an adapter linear) keeps anyway: then x itself (the residual stream) is not
    // kept alive by this op. (w is [c], a few KiB: checking it is cheap on either device.)
    let from_y = !w.requires_grad() && w.try_to_vec::<f64>()?.iter().all(|v| *v != 0.0 && v.is_finite());
    let y_saved = y.detach();
    Ok(record(y, &[x, w], |needs| Box::new(RmsNormBwd { x: if from_y { y_saved } else { x.detach() }, from_y, w: w.detach(), rstd, need_w: needs[1] })))
}

struct RmsNormBwd {
    /// x, or y when `from_y`.
    x: Tensor,
    from_y: bool,
    w: Tensor,
    rstd: Tensor,
    need_w: bool,
}
impl Backward for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms_norm"
    }
    /// With x̂ = x·r, r = (mean(x²)+eps)^(−½), g = dy ⊙ w:
    ///   dx = r·(g − x̂·mean(g ⊙ x̂)),   dw = Σ_rows dy ⊙ x̂.
    /// From y (w frozen, no zero entry): x̂ = y / w and g ⊙ x̂ = dy ⊙ y exactly, so
    ///   dx = r·(dy ⊙ w − (y / w)·mean(dy ⊙ y)).
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "rms_norm.backward";
        let k: &dyn Kernels = kernels_for(OP, &[("dy", dy), ("x", &self.x)])?;
        let (c, n, dt) = (self.x.shape().last(), self.x.numel(), dy.dtype());
        let (dyg, xg, wg, rg) = (dy.read(), self.x.read(), self.w.read(), self.rstd.read());
        if self.from_y {
            let mut dx = k.zeros(dt, n, OP)?;
            k.rms_norm_bwd_from_y(&mut dx, &dyg, &xg, &wg, &rg, c)?;
            return Ok(vec![needs[0].then(|| Tensor::from_storage(dx, self.x.shape().clone())), None]);
        }
        let mut dx = needs[0].then(|| k.zeros(dt, n, OP)).transpose()?;
        let mut dw = self.need_w.then(|| k.zeros(dt, c, OP)).transpose()?;
        k.rms_norm_bwd(dx.as_mut(), dw.as_mut(), &dyg, &xg, &wg, &rg, c)?;
        Ok(vec![dx.map(|s| Tensor::from_storage(s, self.x.shape().clone())), dw.map(|s| Tensor::from_storage(s, [c].into()))])
    }
}
