//! SpecLoRA, positional form: W' = Γ ⊙ W + s·B·A, Γ[i, :] = d_j on the k selected rows i = i_j
//! (the first k rows, or the k rows of largest L2 norm) and 1 elsewhere; d `[k]` (init 1), A and
//! B trainable.

use std::any::Any;

use super::adapter::{f32_entry, i64_entry, Adapter, AdapterCtx, LinearAdapter, LoraFactors, ModuleFile, ModuleNames, TensorMap};
use super::lora::{self, add_delta, gated_op, lora_part, save_ab};
use super::registry::{Method, MethodKind};
use super::LoraConfig;
use crate::device::{with_float, Device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::ops::{self, SpecRows};
use crate::tensor::Tensor;

/// Tensor suffixes of the layout: `speclora_d` `[k]`, `speclora_rows` `[k]` (I64 row indices),
/// plus LoRA's A and B.
pub(crate) const SUFFIXES: &[&str] = &["speclora_d", "speclora_rows"];

pub(crate) static KIND: MethodKind = MethodKind {
    name: "speclora",
    help: "SpecLoRA: k rows of W scaled by trainable d, plus LoRA (--k, --rows-by-norm)",
    takes_k: true,
    takes_by_norm: true,
    takes_block: false,
    label: |m| format!("SpecLoRA (k={}{})", m.k, if m.by_norm { ", rows by norm" } else { "" }),
    trainable_count: |m, o, i, r| r * (o + i) + m.k.min(o),
    build: |m, w, cfg, dtype, rng| {
        let o = w.dims()[0];
        let rows = if m.by_norm { top_rows_by_norm(w, m.k)? } else { SpecRows::Top(m.k.min(o)) };
        Ok(Box::new(SpecLora::new(o, w.dims()[1], cfg, rows, dtype, rng)?))
    },
};

impl Method {
    /// SpecLoRA on the first k rows (k clamped to the row count).
    pub const fn speclora(k: usize) -> Method {
        Method::with("speclora", k, false, 0)
    }
    /// SpecLoRA on the k rows of largest L2 norm.
    pub const fn speclora_by_norm(k: usize) -> Method {
        Method::with("speclora", k, true, 0)
    }
}

/// y = x·(Γ⊙W)ᵀ + s·(dropout(x)·Aᵀ)·Bᵀ with d `[k]` on the selected rows.
#[derive(Clone, Debug)]
pub struct SpecLora {
    pub d: Tensor,
    pub rows: SpecRows,
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl SpecLora {
    /// LoRA plus d = 1 on `rows` (k clamped to the row count by the caller).
    pub fn new(out_features: usize, in_features: usize, cfg: &LoraConfig, rows: SpecRows, dtype: DType, rng: &mut SplitMix) -> Result<SpecLora> {
        let (a, b) = lora::init(out_features, in_features, cfg, dtype, rng)?;
        let d = init_d(&rows, dtype)?;
        Ok(SpecLora { d, rows, a, b, scale: cfg.scale(), dropout: cfg.dropout })
    }
}

/// d = 1 (identity at init).
pub(crate) fn init_d(rows: &SpecRows, dtype: DType) -> Result<Tensor> {
    let k = match rows {
        SpecRows::Top(k) => *k,
        SpecRows::Indices(ix) => ix.len(),
    };
    with_float!(dtype, "speclora init", |T| { Tensor::full(T::ONE, [k]).param() })
}

fn row_indices(rows: &SpecRows) -> Vec<usize> {
    match rows {
        SpecRows::Top(k) => (0..*k).collect(),
        SpecRows::Indices(ix) => ix.iter().map(|&i| i as usize).collect(),
    }
}

/// W [out, in] rows scaled by d (the dense Γ ⊙ W, for merging only).
pub(crate) fn scale_rows(w: &mut [f64], out_f: usize, in_f: usize, rows: &SpecRows, d: &[f64]) -> Result<()> {
    let idx = row_indices(rows);
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

/// A module with `speclora_d` but no SVD factors.
pub(crate) fn load(f: &ModuleFile) -> Result<Option<Adapter>> {
    if !f.has("lora_A.weight") || !f.has("speclora_d") {
        return Ok(None);
    }
    let (a, b) = f.lora_ab(false)?;
    let o = f.dims().0;
    let idx = f.i64s("speclora_rows", None, "[k]")?;
    let k = idx.len();
    if idx.iter().any(|&r| r < 0 || r as usize >= o) {
        return Err(f.err(format!("{}: row index out of range 0..{o}", f.name("speclora_rows"))));
    }
    let rows = if idx.iter().enumerate().all(|(j, &r)| r == j as i64) { SpecRows::Top(k) } else { SpecRows::Indices(idx.iter().map(|&r| r as u32).collect()) };
    let d = f.tensor("speclora_d", &[k], true)?;
    Ok(Some(Box::new(SpecLora { d, rows, a, b, scale: f.lora.scale(), dropout: f.lora.dropout })))
}

impl LinearAdapter for SpecLora {
    fn method(&self) -> Method {
        Method::with("speclora", self.d.numel(), matches!(self.rows, SpecRows::Indices(_)), 0)
    }
    fn forward(&self, x: &Tensor, w: &Tensor, ctx: &AdapterCtx) -> Result<Tensor> {
        ops::adapter_linear(x, w, ops::Spectral::Rows { d: &self.d, rows: &self.rows }, &self.a, &self.b, self.scale, ctx.dropout(self.dropout))
    }
    fn forward_gated(&self, gate: &Tensor, up: &Tensor, act: ops::GatedAct, w: &Tensor, ctx: &AdapterCtx, graph_only: bool) -> Result<Tensor> {
        gated_op(graph_only)(gate, up, act, w, ops::Spectral::Rows { d: &self.d, rows: &self.rows }, &self.a, &self.b, self.scale, ctx.dropout(self.dropout))
    }
    fn params(&self) -> Vec<Tensor> {
        vec![self.d.clone(), self.a.clone(), self.b.clone()]
    }
    fn no_decay_params(&self) -> Vec<Tensor> {
        vec![self.d.clone()]
    }
    fn scale(&self) -> Option<f64> {
        Some(self.scale)
    }
    fn merged_weight(&self, w: &Tensor) -> Result<Vec<f64>> {
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let mut wm = w.to_vec_f64();
        scale_rows(&mut wm, out_f, in_f, &self.rows, &self.d.to_vec_f64())?;
        add_delta(&mut wm, out_f, in_f, &self.a.to_vec_f64(), &self.b.to_vec_f64(), self.a.dims()[0], self.scale);
        Ok(wm)
    }
    /// (Γ⊙W) − W = Σ_j (d_j − 1)·e_{i_j}·W[i_j, :]: k extra rows (d_j − 1)·W[i_j, :]/s' of A'
    /// and the one-hot columns e_{i_j} of B'.
    fn lora_factors(&self, w: &Tensor, s_common: f64) -> Result<LoraFactors> {
        const OP: &str = "export_peft_lora";
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let (a, b, r) = lora_part(&self.a, &self.b, self.scale, out_f, in_f, s_common)?;
        let idx = row_indices(&self.rows);
        if let Some(&bad) = idx.iter().find(|&&i| i >= out_f) {
            return Err(Error::OutOfRange { op: OP, what: "speclora row", index: bad as i64, size: out_f });
        }
        let dv = self.d.to_vec_f64();
        if dv.len() != idx.len() {
            return Err(Error::invalid(OP, format!("{} speclora scales for {} rows", dv.len(), idx.len())));
        }
        let k = idx.len();
        let wr = w.read();
        let mut row = vec![0.0f64; in_f];
        let mut ea = Vec::with_capacity(k * in_f);
        for (&i, &dj) in idx.iter().zip(&dv) {
            wr.read_into(i * in_f, &mut row);
            let f = (dj - 1.0) / s_common;
            ea.extend(row.iter().map(|&x| x * f));
        }
        let mut eb = vec![0.0f64; out_f * k];
        for (j, &i) in idx.iter().enumerate() {
            eb[i * k + j] = 1.0;
        }
        Ok(lora::extend_factors(a, b, r, ea, &eb, k, out_f))
    }
    fn save(&self, names: &ModuleNames, out: &mut TensorMap) -> Result<()> {
        let p = &names.prefix;
        out.insert(format!("{p}.speclora_d"), f32_entry(&self.d)?);
        let idx: Vec<i64> = row_indices(&self.rows).into_iter().map(|i| i as i64).collect();
        out.insert(format!("{p}.speclora_rows"), i64_entry(&idx));
        save_ab(&self.a, &self.b, names, out)
    }
    /// `rows`: "indices" if any module's rows are not the first k, else "top".
    fn save_config(&self, spectune: &mut serde_json::Map<String, serde_json::Value>) {
        if matches!(self.rows, SpecRows::Indices(_)) {
            spectune.insert("rows".into(), "indices".into());
        } else {
            spectune.entry("rows").or_insert_with(|| "top".into());
        }
    }
    fn to_device(&self, device: Device) -> Result<Adapter> {
        Ok(Box::new(SpecLora { d: self.d.to_device(device)?, a: self.a.to_device(device)?, b: self.b.to_device(device)?, ..self.clone() }))
    }
    fn clone_box(&self) -> Adapter {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
