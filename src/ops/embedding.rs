//! Embedding lookup: y[i] = table[ids[i]]. A frozen table (any stored dtype, mapped) gets no
//! gradient and is read one row per token; a trainable table (full fine-tuning) gets a dense
//! scatter-added gradient.

use super::check_dtype;
use crate::autograd::{record, Backward, GradStore};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::kernels_for;
use crate::tensor::Tensor;

/// table: [vocab, dim]; ids: any length n → [n, dim] in `dtype` (f32 or f64), on the table's
/// device.
pub fn embedding(table: &Tensor, ids: &[u32], dtype: DType) -> Result<Tensor> {
    if table.dims().len() != 2 {
        return Err(Error::shape("embedding", "table", "[vocab, dim]", table.shape()));
    }
    check_dtype("embedding", "table", table, dtype, false)?;
    let (vocab, dim) = (table.dims()[0], table.dims()[1]);
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::OutOfRange { op: "embedding", what: "token id", index: bad as i64, size: vocab });
    }
    if !dtype.is_compute() {
        return Err(Error::dtype("embedding", "dtype", "f32 or f64", dtype));
    }
    let k = kernels_for("embedding", &[("table", table)])?;
    let mut y = k.zeros(dtype, ids.len() * dim, "embedding")?;
    k.embedding_fwd(&mut y, &table.read(), ids, dim)?;
    let y = Tensor::from_storage(y, [ids.len(), dim].into());
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
        const OP: &str = "embedding.backward";
        let k = kernels_for(OP, &[("dy", dy)])?;
        let mut dt = k.zeros(dy.dtype(), self.vocab * self.dim, OP)?;
        k.embedding_bwd(&mut dt, &dy.read(), &self.ids, self.dim)?;
        Ok(vec![Some(Tensor::from_storage(dt, [self.vocab, self.dim].into()))])
    }
}
