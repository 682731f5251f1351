//! Fused RMSNorm over the last dim: y = x / √(mean(x²) + eps) ⊙ w (Llama's norm; no mean
//! subtraction, no bias). Saves x and the per-row 1/rms; w may be a frozen weight in any dtype.

use super::{check_dtype, compute_dtype, out, vals};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::cpu;
use crate::device::with_float;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

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
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[x, w]) {
        return crate::backend::cuda::ops::rms_norm(x, w, eps);
    }
    let rows = x.shape().rows();
    let (y, rstd) = with_float!(dt, "rms_norm", |T| {
        let mut y = crate::backend::cpu::zeros::<T>(x.numel());
        let mut rstd = crate::backend::cpu::zeros::<T>(rows);
        cpu::rms_norm_fwd(&mut y, &mut rstd, &vals::<T>(&x.read()), &vals::<T>(&w.read()), c, T::from_f64(eps));
        Ok((out(y, x.shape().clone()), out(rstd, [rows])))
    })?;
    // A frozen w with no zero entry lets the backward recover x̂ = y / w from the output, which
    // the next op (an adapter linear) keeps anyway: then x itself (the residual stream) is not
    // kept alive by this op.
    let from_y = !w.requires_grad() && with_float!(dt, "rms_norm", |T| { Ok(vals::<T>(&w.read()).iter().all(|v| *v != T::ZERO && v.is_finite())) })?;
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
    fn backward(&self, dy: &Tensor, needs: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "rms_norm.backward", |T| {
            let c = self.x.shape().last();
            let (xg, wg, rg, gg) = (self.x.read(), self.w.read(), self.rstd.read(), dy.read());
            if self.from_y {
                // dx = r·(dy ⊙ w − x̂·mean(dy ⊙ y)) with x̂ = y / w (g ⊙ x̂ = dy ⊙ y exactly).
                let mut dx = crate::backend::cpu::zeros::<T>(self.x.numel());
                cpu::rms_norm_bwd_from_y(&mut dx, &vals::<T>(&gg), &vals::<T>(&xg), &vals::<T>(&wg), &vals::<T>(&rg), c);
                return Ok(vec![needs[0].then(|| out(dx, self.x.shape().clone())), None]);
            }
            let mut dx = needs[0].then(|| crate::backend::cpu::zeros::<T>(self.x.numel()));
            let mut dw = self.need_w.then(|| crate::backend::cpu::zeros::<T>(c));
            cpu::rms_norm_bwd(dx.as_deref_mut(), dw.as_deref_mut(), &vals::<T>(&gg), &vals::<T>(&xg), &vals::<T>(&wg), &vals::<T>(&rg), c);
            Ok(vec![dx.map(|v| out(v, self.x.shape().clone())), dw.map(|v| out(v, [c]))])
        })
    }
}
