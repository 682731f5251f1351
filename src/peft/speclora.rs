//! SpecLoRA, positional form: W' = Γ ⊙ W + s·B·A, Γ[i, :] = d_j on the selected rows.

use crate::device::with_float;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::SpecRows;
use crate::tensor::Tensor;

/// d = 1 (identity at init).
pub(crate) fn init_d(rows: &SpecRows, dtype: DType) -> Result<Tensor> {
    let k = match rows {
        SpecRows::Top(k) => *k,
        SpecRows::Indices(ix) => ix.len(),
    };
    with_float!(dtype, "speclora init", |T| { Tensor::full(T::ONE, [k]).param() })
}

/// W [out, in] rows scaled by d (the dense Γ ⊙ W, for merging only).
pub(crate) fn scale_rows(w: &mut [f64], out_f: usize, in_f: usize, rows: &SpecRows, d: &[f64]) -> Result<()> {
    let idx: Vec<usize> = match rows {
        SpecRows::Top(k) => (0..*k).collect(),
        SpecRows::Indices(ix) => ix.iter().map(|&i| i as usize).collect(),
    };
    if idx.len() != d.len() || idx.iter().any(|&i| i >= out_f) {
        return Err(Error::invalid("speclora merge", format!("{} rows / {} scales for a weight with {out_f} rows", idx.len(), d.len())));
    }
    for (&i, &s) in idx.iter().zip(d) {
        w[i * in_f..(i + 1) * in_f].iter_mut().for_each(|v| *v *= s);
    }
    Ok(())
}

/// The k rows of W with the largest L2 norms, in descending norm order (the optional row choice).
pub fn top_rows_by_norm(w: &Tensor, k: usize) -> Result<SpecRows> {
    if w.dims().len() != 2 {
        return Err(Error::shape("top_rows_by_norm", "w", "[out, in]", w.shape()));
    }
    let (m, n) = (w.dims()[0], w.dims()[1]);
    let mut row = vec![0.0f64; n];
    let mut norms: Vec<(f64, u32)> = (0..m)
        .map(|i| {
            w.read().read_into(i * n, &mut row);
            (row.iter().map(|v| v * v).sum::<f64>(), i as u32)
        })
        .collect();
    norms.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(SpecRows::Indices(norms.into_iter().take(k.min(m)).map(|(_, i)| i).collect()))
}
