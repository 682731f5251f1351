//! Training: data loading and batching ([`data`]), the training loop with gradient
//! accumulation, evaluation, and atomic checkpoints that resume bit-identically.

pub mod compare;
pub mod config;
pub mod data;
pub mod demo;
pub mod eval;
pub mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::autograd::{backward, no_grad, GradStore};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::ops::CeOptions;
use crate::optim::{clip_grad_norm, AdamW, AdamWState, ParamState};
use crate::peft::io::{load_adapter, save_adapter, write_atomic};
use crate::peft::LoraConfig;
use data::Batch;

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepStats {
    /// Mean loss over every counted target of the accumulated batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed (padding included) and targets counted.
    pub tokens: usize,
    pub counted: usize,
}

/// Forward and backward over the micro-batches of one optimizer step, accumulating gradients.
/// Each micro-batch's summed loss is divided by the number of counted targets of the WHOLE
/// accumulated batch, so the accumulated gradient equals that of one big batch over the same
/// tokens (no per-micro-batch mean, the gradient-accumulation bug).
pub fn accumulate(model: &dyn Model, micro: &[Batch]) -> Result<(f64, GradStore, usize, usize)> {
    let counted: usize = micro.iter().map(|b| b.counted).sum();
    if counted == 0 {
        return Err(Error::invalid("train", "the batch has no counted target tokens (all are -100)"));
    }
    let opts = CeOptions { denominator: Some(counted as f64), ..CeOptions::default() };
    let mut grads = GradStore::new();
    let (mut loss, mut tokens) = (0.0, 0);
    for b in micro {
        let l = model.loss(&b.ids, &b.targets, b.b, b.t, b.key_mask.as_deref(), &opts)?;
        loss += l.item()?;
        tokens += b.ids.len();
        grads.merge(backward(&l)?)?;
    }
    Ok((loss, grads, tokens, counted))
}

/// One training step: accumulate over `micro`, stop on a non-finite loss or gradient (nothing is
/// updated then), clip to `max_grad_norm`, and apply AdamW at `lr`. `dropout_seed` seeds the
/// adapter dropout masks of this step.
pub fn train_step(model: &mut dyn Model, opt: &mut AdamW, micro: &[Batch], lr: f64, max_grad_norm: Option<f64>, dropout_seed: u64) -> Result<StepStats> {
    model.set_training(true, dropout_seed);
    let res = accumulate(model, micro);
    model.set_training(false, 0);
    let (loss, mut grads, tokens, counted) = res?;
    if !loss.is_finite() {
        return Err(Error::NonFinite { op: "train", what: format!("the loss ({loss})") });
    }
    let grad_norm = match max_grad_norm {
        Some(m) => clip_grad_norm(&mut grads, m)?,
        None => {
            let n = grads.iter().map(|(_, g)| g.to_vec_f64().iter().map(|v| v * v).sum::<f64>()).sum::<f64>().sqrt();
            if !n.is_finite() {
                return Err(Error::NonFinite { op: "train", what: "the gradient norm".into() });
            }
            n
        }
    };
    opt.step(&grads, lr)?;
    Ok(StepStats { loss, grad_norm, tokens, counted })
}

/// Held-out loss and perplexity: mean cross-entropy over every counted target of `batches`
/// (no dropout, no graph).
pub fn evaluate(model: &dyn Model, batches: &[Batch]) -> Result<(f64, f64)> {
    let opts = CeOptions { denominator: Some(1.0), ..CeOptions::default() };
    let (mut total, mut counted) = (0.0, 0usize);
    no_grad(|| -> Result<()> {
        for b in batches {
            total += model.loss(&b.ids, &b.targets, b.b, b.t, b.key_mask.as_deref(), &opts)?.item()?;
            counted += b.counted;
        }
        Ok(())
    })?;
    if counted == 0 {
        return Err(Error::invalid("evaluate", "no counted targets in the evaluation data"));
    }
    let loss = total / counted as f64;
    Ok((loss, loss.exp()))
}

/// Everything besides the adapter and the optimizer moments that a resumed run needs.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The run's seed (dropout seeds derive from it and the step).
    pub seed: u64,
    /// The data order's position and RNG state (opaque JSON from the batcher).
    pub data: Value,
}

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// Writes a resumable checkpoint into `dir`: the adapter (PEFT layout), the AdamW moments
/// (f64, exact), and the trainer state. The files are written into `dir.partial`, fsynced, and the
/// folder is then swapped in by rename, so a crash at any point leaves the previous checkpoint
/// (at `dir`, or `dir.old` during the swap) intact.
pub fn save_checkpoint(dir: &Path, model: &dyn Model, opt: &AdamW, lora: &LoraConfig, state: &TrainerState, base_model: &str) -> Result<()> {
    let io = |p: &Path, e| Error::Io { path: p.to_path_buf(), source: e };
    let partial = with_suffix(dir, "partial");
    let old = with_suffix(dir, "old");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| io(&partial, e))?;
    }
    save_adapter(model, &partial, lora, base_model)?;
    let st = opt.state()?;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>, Dtype)> = BTreeMap::new();
    for (i, p) in st.params.iter().enumerate() {
        let f64s = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        tensors.insert(format!("param.{i:05}.m"), (vec![p.m.len()], f64s(&p.m), Dtype::F64));
        tensors.insert(format!("param.{i:05}.v"), (vec![p.v.len()], f64s(&p.v), Dtype::F64));
        tensors.insert(format!("param.{i:05}.step"), (vec![1], (p.step as i64).to_le_bytes().to_vec(), Dtype::I64));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes, dt))| TensorView::new(*dt, shape.clone(), bytes).map(|v| (k.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::invalid("save_checkpoint", e.to_string()))?;
    let bytes = safetensors::tensor::serialize(views, None).map_err(|e| Error::invalid("save_checkpoint", e.to_string()))?;
    write_atomic(&partial.join(OPTIMIZER_FILE), &bytes)?;
    let meta = json!({ "step": state.step, "seed": state.seed, "optimizer_step": st.step, "params": st.params.len(), "data": state.data });
    write_atomic(&partial.join(STATE_FILE), serde_json::to_string_pretty(&meta).map_err(|e| Error::invalid("save_checkpoint", e.to_string()))?.as_bytes())?;
    // Swap: dir → dir.old, partial → dir, remove dir.old. A stale `old` is deleted only while
    // `dir` exists: without `dir`, `old` is the one complete checkpoint (an interrupted swap) and
    // must stay until `partial` is in place.
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(&partial, dir).map_err(|e| io(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    }
    Ok(())
}

fn with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_os_string();
    s.push(format!(".{suffix}"));
    PathBuf::from(s)
}

/// Restores a checkpoint written by [`save_checkpoint`]: loads the adapter onto `model`
/// (replacing its adapters), builds an AdamW over the loaded parameters with `opt_config` and
/// restores its moments. If `dir` is missing but an interrupted swap left `dir.old`, that one
/// is used.
pub fn load_checkpoint(dir: &Path, model: &mut dyn Model, opt_config: crate::optim::AdamWConfig) -> Result<(AdamW, LoraConfig, TrainerState)> {
    let dir = if !dir.exists() && with_suffix(dir, "old").exists() { with_suffix(dir, "old") } else { dir.to_path_buf() };
    let lora = load_adapter(model, &dir)?;
    let params = model.trainable_params();
    let mut opt = optimizer_for(model, opt_config)?;
    let spath = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&spath).map_err(|e| Error::Io { path: spath.clone(), source: e })?;
    let meta: Value = serde_json::from_str(&text).map_err(|e| Error::Format { path: spath.clone(), msg: format!("not valid JSON: {e}") })?;
    let field = |k: &str| meta.get(k).and_then(Value::as_u64).ok_or_else(|| Error::Format { path: spath.clone(), msg: format!("missing integer `{k}`") });
    let (step, seed, opt_step) = (field("step")?, field("seed")?, field("optimizer_step")?);
    let opath = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&opath).map_err(|e| Error::Io { path: opath.clone(), source: e })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format { path: opath.clone(), msg: e.to_string() })?;
    let fmt = |msg: String| Error::Format { path: opath.clone(), msg };
    let read = |name: String, dt: Dtype| -> Result<Vec<u8>> {
        let t = st.tensor(&name).map_err(|_| fmt(format!("missing tensor {name}")))?;
        if t.dtype() != dt {
            return Err(fmt(format!("{name}: expected {dt:?}, got {:?}", t.dtype())));
        }
        Ok(t.data().to_vec())
    };
    let f64v = |b: Vec<u8>| b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect::<Vec<f64>>();
    let mut ps = Vec::with_capacity(params.len());
    for i in 0..params.len() {
        let m = f64v(read(format!("param.{i:05}.m"), Dtype::F64)?);
        let v = f64v(read(format!("param.{i:05}.v"), Dtype::F64)?);
        let s = read(format!("param.{i:05}.step"), Dtype::I64)?;
        let step = i64::from_le_bytes(s.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| fmt(format!("param.{i:05}.step is not one i64")))?);
        ps.push(ParamState { step: step.max(0) as u64, m, v });
    }
    opt.load_state(&AdamWState { step: opt_step, params: ps })?;
    Ok((opt, lora, TrainerState { step, seed, data: meta.get("data").cloned().unwrap_or(Value::Null) }))
}

/// AdamW over the model's adapter parameters, with weight decay off for the multiplicative
/// scales (SpecLoRA's d), as every training run sets it up.
pub fn optimizer_for(model: &dyn Model, cfg: crate::optim::AdamWConfig) -> Result<AdamW> {
    let mut opt = AdamW::new(&model.trainable_params(), cfg)?;
    for d in model.no_decay_params() {
        opt.set_weight_decay(&d, false)?;
    }
    Ok(opt)
}

/// The dropout seed of optimizer step `step` in a run seeded with `seed`.
pub fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 27)
}
