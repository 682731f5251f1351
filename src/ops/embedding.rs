//! Embedding lookup: y[i] = table[ids[i]]. A frozen table (any stored dtype, mapped) gets no
//! gradient and is read one row per token; a trainable table (full fine-tuning) gets a dense
//! scatter-added gradient.

use super::{check_dtype, out};
use crate::autograd::{record, Backward, GradStore};
use crate::backend::cpu;
use crate::device::with_float;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// table: [vocab, dim]; ids: any length n → [n, dim] in `dtype` (f32 or f64).
pub fn embedding(table: &Tensor, ids: &[u32], dtype: DType) -> Result<Tensor> {
    if table.dims().len() != 2 {
        return Err(Error::shape("embedding", "table", "[vocab, dim]", table.shape()));
    }
    check_dtype("embedding", "table", table, dtype, false)?;
    let (vocab, dim) = (table.dims()[0], table.dims()[1]);
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::OutOfRange { op: "embedding", what: "token id", index: bad as i64, size: vocab });
    }
    #[cfg(feature = "cuda")]
    if crate::device::on_cuda(&[table]) {
        return crate::backend::cuda::ops::embedding(table, ids);
    }
    let y = with_float!(dtype, "embedding", |T| {
        let mut y = crate::backend::cpu::zeros::<T>(ids.len() * dim);
        cpu::embedding_fwd(&mut y, &table.read(), ids, dim);
        Ok(out(y, [ids.len(), dim]))
    })?;
    Ok(record(y, &[table], |_| Box::new(EmbeddingBwd { ids: ids.to_vec(), vocab, dim })))
}

struct EmbeddingBwd {
    ids: Vec<u32>,
    vocab: usize,
    dim: usize,
}
impl Backward for EmbeddingBwd {
    fn name(&self) -> &'static str {
        "embedding"
    }
    /// dtable[id] += dy[i] for each position i with ids[i] = id.
    fn backward(&self, dy: &Tensor, _: &[bool], _: &mut GradStore) -> Result<Vec<Option<Tensor>>> {
        with_float!(dy.dtype(), "embedding.backward", |T| {
            let mut dt = crate::backend::cpu::zeros::<T>(self.vocab * self.dim);
            cpu::embedding_bwd(&mut dt, &super::vals::<T>(&dy.read()), &self.ids, self.dim);
            Ok(vec![Some(out(dt, [self.vocab, self.dim]))])
        })
    }
}
