//! `spectune train` end to end: model, data, adapters, the loop with progress and metrics,
//! evaluation, checkpoints and resume. The library entry point is [`run`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::config::TrainSettings;
use super::data::{self, Batch, BatchConfig, Batcher, BatcherState, DataFile, Layout, TokenizeOptions};
use super::{evaluate, load_checkpoint, optimizer_for, save_checkpoint, step_seed, train_step, TrainerState};
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::Model;
use crate::optim::AdamWConfig;
use crate::peft::io::save_adapter;
use crate::tokenizer::Tokenizer;
use crate::DType;

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub steps: u64,
    pub last_loss: f64,
    pub eval: Option<(f64, f64)>,
    pub tokens: usize,
    pub seconds: f64,
    /// The final adapter (PEFT layout) and its size in bytes.
    pub adapter_dir: PathBuf,
    pub adapter_bytes: u64,
    pub trainable: usize,
}

/// Model, tokenizer and data of a run, prepared once (the demo evaluates before training too).
pub struct Prepared {
    pub model: Box<dyn Model>,
    pub tokenizer: Tokenizer,
    pub train: Batcher,
    pub eval: Vec<Batch>,
    pub base_name: String,
}

/// Loads the model and tokenizer, reads and tokenizes the data, splits off evaluation data and
/// builds the batcher. `split`, when given, is the (train, eval) files to use instead of the
/// settings' data sources.
pub fn prepare(s: &TrainSettings, split: Option<(Vec<DataFile>, Vec<DataFile>)>, log: &mut dyn FnMut(String)) -> Result<Prepared> {
    let ck = Checkpoint::open(&s.model)?;
    let tokenizer = ck.tokenizer()?;
    let mut model: Box<dyn Model> = Box::new(crate::model::load(&ck, DType::F32)?);
    model.set_checkpointing(s.checkpointing, s.checkpoint_keep);
    let (files, eval_files) = match split {
        Some((tr, ev)) => (tr, Some(ev)),
        None => (data::read_files(&s.data)?, None),
    };
    let (train_files, eval_files) = match (eval_files, &s.eval_data, s.eval_fraction) {
        (Some(ev), _, _) => (files, ev),
        (None, Some(p), _) => (files, data::read_files(p)?),
        (None, None, Some(f)) if f > 0.0 && files.len() > 1 => data::split_eval(files, f, s.seed)?,
        (None, None, Some(f)) if f > 0.0 => {
            let file = files.into_iter().next().expect("read_files returns at least one file");
            let (tr, ev) = data::split_file_eval(file, f, s.seed)?;
            (vec![tr], vec![ev])
        }
        (None, None, _) => (files, Vec::new()),
    };
    let topts = TokenizeOptions::new(s.seq_len);
    let tr = data::tokenize_files(&tokenizer, &train_files, &topts)?;
    log(format!("train data: {}", tr.stats));
    let pad_id = tokenizer.eos_id().unwrap_or(0);
    let cfg = BatchConfig { batch_size: s.batch, seq_len: s.seq_len, layout: Layout::Packed, pad_id, shuffle: true, drop_last: false, seed: s.seed };
    let train = Batcher::new(tr.sequences, cfg)?;
    let eval = if eval_files.is_empty() {
        Vec::new()
    } else {
        let ev = data::tokenize_files(&tokenizer, &eval_files, &topts)?;
        log(format!("eval data: {}", ev.stats));
        data::eval_batches(ev.sequences, s.batch, s.seq_len, Layout::Packed, pad_id)?
    };
    // Recorded as PEFT's base_model_name_or_path: the absolute path, so `export` and PEFT users
    // can find the base again.
    let base_name = std::fs::canonicalize(&s.model).unwrap_or_else(|_| s.model.clone()).to_string_lossy().into_owned();
    Ok(Prepared { model, tokenizer, train, eval, base_name })
}

/// Peak resident memory of this process so far, as text.
pub fn peak_rss() -> String {
    crate::bench::peak_rss_bytes().map(|b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64)).unwrap_or_else(|| "unknown".into())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// Trains adapters as `s` says, on prepared model and data. Writes into `s.out`: `adapter/`
/// (PEFT layout), `checkpoint/` (resumable), `metrics.jsonl`. `progress` shows an indicatif bar.
pub fn run(s: &TrainSettings, p: &mut Prepared, progress: bool, log: &mut dyn FnMut(String)) -> Result<RunReport> {
    let out = &s.out;
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.clone(), source: e })?;
    let ckpt_dir = out.join("checkpoint");
    let ocfg = AdamWConfig { lr: s.lr, weight_decay: s.weight_decay, ..AdamWConfig::default() };
    let (mut opt, start) = match &s.resume {
        Some(dir) => {
            let (opt, lora, st) = load_checkpoint(dir, &mut *p.model, ocfg)?;
            if lora.rank != s.lora.rank {
                log(format!("note: resuming with the checkpoint's rank {} (not --rank {})", lora.rank, s.lora.rank));
            }
            p.train.restore(&BatcherState::from_json(&st.data)?)?;
            log(format!("resumed from {} at step {}", dir.display(), st.step));
            (opt, st.step)
        }
        None => {
            s.targets.check_names(&p.model.linears().iter().map(|l| l.path.as_str()).collect::<Vec<_>>())?;
            let m = s.targets.matcher()?;
            p.model.attach_where(&|p| Ok(m.selects(p)), &s.lora, &s.method, s.seed)?;
            (optimizer_for(&*p.model, ocfg)?, 0)
        }
    };
    if s.device != crate::device::Device::Cpu {
        // Upload once: frozen matrices as bf16, adapters (and the optimizer state) as f32.
        let state = opt.state()?;
        p.model = p.model.to_device(s.device, DType::BF16)?;
        opt = optimizer_for(&*p.model, ocfg)?;
        opt.load_state(&state)?;
    }
    let model = &mut *p.model;
    // Loading and attaching leave freed temporaries behind; under memory::retain_freed_memory
    // they would stay resident through training.
    crate::memory::release_free_memory();
    let trainable: usize = model.trainable_params().iter().map(|t| t.numel()).sum();
    let per_epoch = p.train.batches_per_epoch().div_ceil(s.grad_accum) as u64;
    let total = s.steps.unwrap_or(((s.epochs * per_epoch as f64).ceil() as u64).max(1));
    let schedule = s.schedule(total)?;
    log(format!(
        "training {} on {} linears ({} layers): {trainable} trainable values, optimizer state {} values; {total} steps of {} × {} × {} tokens",
        s.method.label(),
        model.linears().iter().filter(|l| l.adapter.is_some()).count(),
        model.num_layers(),
        opt.state_numel(),
        s.grad_accum,
        s.batch,
        s.seq_len
    ));
    let mpath = out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new().create(true).append(true).open(&mpath).map_err(|e| Error::Io { path: mpath.clone(), source: e })?;
    let mut write_metric = |v: serde_json::Value| -> Result<()> {
        writeln!(metrics, "{v}").and_then(|_| metrics.flush()).map_err(|e| Error::Io { path: mpath.clone(), source: e })
    };
    let bar = if progress {
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(start);
        Some(pb)
    } else {
        None
    };
    let t0 = Instant::now();
    let (mut tokens, mut last_loss, mut eval) = (0usize, f64::NAN, None);
    let state = |step: u64, b: &Batcher| TrainerState { step, seed: s.seed, data: b.state().to_json() };
    for step in start..total {
        let micro: Vec<Batch> = (0..s.grad_accum).map(|_| p.train.next_batch()).collect();
        let lr = schedule.lr_at(s.lr, step);
        let st = match train_step(model, &mut opt, &micro, lr, s.max_grad_norm, step_seed(s.seed, step)) {
            Ok(st) => st,
            Err(e @ Error::NonFinite { .. }) => {
                // Nothing was updated by the failed step: the current adapter is the last good one.
                save_checkpoint(&ckpt_dir, model, &opt, &s.lora, &state(step, &p.train), &p.base_name)?;
                if let Some(b) = &bar {
                    b.abandon();
                }
                return Err(Error::NonFinite {
                    op: "train",
                    what: format!("{} at step {step}: stopped; the last good state is saved in {} (resume with --resume)", e, ckpt_dir.display()),
                });
            }
            Err(e) => return Err(e),
        };
        tokens += st.tokens;
        last_loss = st.loss;
        let secs = t0.elapsed().as_secs_f64();
        let tps = tokens as f64 / secs.max(1e-9);
        write_metric(
            json!({"step": step + 1, "loss": st.loss, "lr": lr, "grad_norm": st.grad_norm, "tokens": st.tokens, "counted": st.counted, "tokens_per_s": tps}),
        )?;
        if let Some(b) = &bar {
            b.set_message(format!("loss {:.4}  {:.0} tok/s", st.loss, tps));
            b.inc(1);
        } else if step % 10 == 0 || step + 1 == total {
            log(format!("step {:>5}/{total}  loss {:.4}  grad-norm {:.3}  lr {:.2e}  {:.0} tok/s", step + 1, st.loss, st.grad_norm, lr, tps));
        }
        let done = step + 1;
        if s.eval_every > 0 && done % s.eval_every == 0 && done < total && !p.eval.is_empty() {
            let (l, ppl) = evaluate(model, &p.eval)?;
            write_metric(json!({"step": done, "eval_loss": l, "eval_ppl": ppl}))?;
            log(format!("step {done}: eval loss {l:.4}, perplexity {ppl:.2}"));
        }
        if s.save_every > 0 && done % s.save_every == 0 && done < total {
            save_checkpoint(&ckpt_dir, model, &opt, &s.lora, &state(done, &p.train), &p.base_name)?;
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    save_checkpoint(&ckpt_dir, model, &opt, &s.lora, &state(total, &p.train), &p.base_name)?;
    let adapter_dir = out.join("adapter");
    save_adapter(model, &adapter_dir, &s.lora, &p.base_name)?;
    if !p.eval.is_empty() {
        let (l, ppl) = evaluate(model, &p.eval)?;
        write_metric(json!({"step": total, "eval_loss": l, "eval_ppl": ppl}))?;
        eval = Some((l, ppl));
    }
    Ok(RunReport {
        steps: total - start,
        last_loss,
        eval,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        adapter_bytes: dir_bytes(&adapter_dir),
        adapter_dir,
        trainable,
    })
}
