//! `spectune compare`: several adapter methods trained on the same data with the same settings
//! and a matched trainable-parameter budget, evaluated on the same held-out tokens; plus the
//! seed's "approximation fidelity" check of SpecLoRA's positional form against its SVD form.
//!
//! - Methods are names the `train` parser knows (`--method`), so every method it accepts can be
//!   compared without changes here.
//! - Budget: the reference is LoRA at `rank` on the same targets. For every other method the rank
//!   whose trainable count is closest to that budget is chosen (binary search over ranks; counts
//!   are taken on a one-layer copy of the model, since every decoder layer has the same shapes).
//!   Methods whose count does not depend on the rank keep `rank` and show their real ratio.
//! - Fidelity: the positional form rescales rows 1..k of W by d; the SVD form rescales σ_1..σ_k
//!   by d. Their d vectors are shown side by side for a few layers, with the singular-value
//!   ratios σ_i(Γ⊙W)/σ_i(W) that the positional mask actually induces (the quantity the SVD
//!   form's d_i controls directly).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::config::{TrainArgs, TrainSettings};
use super::data::DataFile;
use super::demo::{demo_data, write_synthetic};
use super::evaluate;
use super::run::{prepare, run};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::nn::layer_of;
use crate::ops::SpecRows;
use crate::peft::speclora::SpecLora;
use crate::peft::speclora_svd::SpecLoraSvd;

/// The methods compared when none are named: the ones this build has.
pub const DEFAULT_METHODS: [&str; 3] = ["lora", "speclora", "speclora-svd"];

/// `compare` knobs (the CLI exposes them; `None` = the default of the real or synthetic task).
#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    pub methods: Vec<String>,
    /// LoRA rank of the budget reference (default 16; synthetic 8).
    pub rank: Option<usize>,
    /// SpecLoRA's k (default 200; synthetic 32).
    pub k: Option<usize>,
    pub steps: u64,
    pub batch: Option<usize>,
    pub seq_len: Option<usize>,
    /// One learning rate for every method (a one-point grid); overrides the default grids.
    pub lr: Option<f64>,
    /// The learning-rate grid of every method (overrides the per-method defaults, see
    /// [`default_lr_grid`]).
    pub lrs: Option<Vec<f64>>,
    /// Per-method grids, `(method, lrs)`; win over `lrs` and `lr` for that method.
    pub lr_grid: Vec<(String, Vec<f64>)>,
    /// Seeds per (method, learning rate): `seed, seed + 1, …` (default 3).
    pub seeds: Option<usize>,
    /// Held-out tokens evaluated (the first ones of the held-out data), split in two halves: the
    /// first chooses the learning rate, the second is reported.
    pub eval_tokens: usize,
    /// Score multiple-choice accuracy on a fixed sample of this many held-out questions (the
    /// same for every run; [`sample_questions`]) instead of all of them: for large validation
    /// sets. `None`: every question.
    pub eval_questions: Option<usize>,
    pub seed: u64,
    pub out: PathBuf,
    /// The offline task of `demo --synthetic` instead of SmolLM2 + Shakespeare.
    pub synthetic: bool,
    /// Another task: a model, training data and held-out data (all three, or none). When every
    /// held-out line is multiple choice, the accuracy reported is `eval --task mc`'s acc.
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub eval_data: Option<PathBuf>,
    /// Train every method at `rank` instead of matching LoRA's trainable count.
    pub no_budget_match: bool,
    /// Layers whose d vectors are shown (default: first, middle, last).
    pub fidelity_layers: Option<Vec<usize>>,
    /// Show an indicatif progress bar while training.
    pub progress: bool,
    /// Skip `compare.png`.
    pub no_plot: bool,
    /// Reuse finished runs: a run folder whose `result.json` was written with the same settings
    /// is not trained again (its stored numbers are used), and neither is the base model's
    /// evaluation (`<out>/base.json`). An interrupted comparison restarted with the same options
    /// continues where it stopped.
    pub resume: bool,
}

/// The default learning-rate grid of a method: half-decade steps around the usual adapter rates
/// (full fine-tuning of whole matrices one decade lower); the synthetic task's tiny model trains
/// with larger rates.
pub fn default_lr_grid(method: &str, synthetic: bool) -> Vec<f64> {
    match (method, synthetic) {
        ("full", true) => vec![1e-3, 3e-3],
        (_, true) => vec![3e-3, 1e-2],
        ("full", false) => vec![1e-5, 3e-5, 1e-4],
        (_, false) => vec![3e-4, 1e-3, 3e-3],
    }
}

/// The held-out questions that `--eval-questions n` scores: `n` of `total` indices drawn without
/// replacement by a partial Fisher–Yates shuffle with a fixed seed (so every run and every
/// process scores the same ones), returned in file order. `n ≥ total` keeps them all. A sample
/// rather than the first `n`, since validation files are often grouped by source.
pub fn sample_questions(total: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..total).collect();
    if n < total {
        let mut rng = crate::gradcheck::SplitMix::new(0x5eed);
        for i in 0..n {
            let j = i + (rng.next_u64() % (total - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(n);
        idx.sort_unstable();
    }
    idx
}

/// Mean and sample standard deviation (n − 1; 0 for one value).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (m, 0.0);
    }
    (m, (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)).sqrt())
}

/// One seed's run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedRun {
    pub seed: u64,
    /// Held-out loss on the selection half and on the reported half.
    pub val_loss: f64,
    pub eval_loss: f64,
    pub accuracy: f64,
    pub last_train_loss: f64,
    pub seconds: f64,
}

/// A finished run as `result.json` in its run folder (written as soon as the run ends): the
/// numbers, and the settings they were obtained with (`key`): [`CompareOptions::resume`] reuses
/// the file only when the key matches.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub key: String,
    pub run: SeedRun,
}

/// The base model's held-out numbers as `<out>/base.json` (reused under the same `key`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BaseRecord {
    pub key: String,
    pub loss: f64,
    pub accuracy: f64,
}

/// The stored record at `path` if it exists, parses and carries `key`; anything else (absent,
/// half-written, other settings) means "run it again".
fn read_record<T: serde::de::DeserializeOwned>(path: &std::path::Path, key: &str, key_of: impl Fn(&T) -> &str) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    let r: T = serde_json::from_str(&text).ok()?;
    (key_of(&r) == key).then_some(r)
}

/// Writes `value` as pretty JSON to `path` atomically (a stopped process leaves no half file).
fn write_record<T: Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::invalid("compare", e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    }
    crate::peft::io::write_atomic(path, text.as_bytes())
}

/// One point of a method's learning-rate sweep.
#[derive(Clone, Debug, Serialize)]
pub struct GridPoint {
    pub lr: f64,
    /// Mean and spread over seeds of the selection-half loss (the choice criterion).
    pub val_loss: f64,
    pub val_loss_std: f64,
    pub runs: Vec<SeedRun>,
}

/// One method, at its chosen learning rate (means and spreads over seeds).
#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub method: String,
    pub rank: usize,
    pub trainable: usize,
    /// trainable / the LoRA budget.
    pub budget_ratio: f64,
    /// The learning rate with the lowest mean selection-half loss.
    pub lr: f64,
    pub grid: Vec<GridPoint>,
    /// Reported-half loss: mean and sample std over seeds; perplexity = exp(mean loss).
    pub eval_loss: f64,
    pub eval_loss_std: f64,
    pub eval_ppl: f64,
    /// Held-out accuracy (see [`CompareReport::accuracy`]): mean and std over seeds.
    pub accuracy: f64,
    pub accuracy_std: f64,
    pub last_train_loss: f64,
    /// Mean wall time of one run at the chosen rate.
    pub seconds: f64,
    /// The largest resident set seen while this method trained (bytes; None where the OS
    /// cannot reset the high-water mark between methods).
    pub peak_rss: Option<u64>,
    /// The first seed's adapter at the chosen rate.
    pub adapter_dir: PathBuf,
}

/// The learned spectral scales of one linear under both SpecLoRA forms.
#[derive(Clone, Debug, Serialize)]
pub struct FidelityRow {
    pub layer: usize,
    pub module: String,
    /// Positional d (row scales), in row order.
    pub d_rows: Vec<f64>,
    /// SVD-form d (σ scales), in singular-direction order.
    pub d_svd: Vec<f64>,
    /// σ_i(Γ⊙W)/σ_i(W), i = 1..n: the spectral effect of the positional mask alone.
    pub induced_ratio: Vec<f64>,
}

/// Means over every adapted linear of a module type.
#[derive(Clone, Debug, Serialize)]
pub struct FidelitySummary {
    pub module: String,
    pub matrices: usize,
    /// mean |d − 1| of the positional and of the SVD form.
    pub rows_mean_abs_dev: f64,
    pub svd_mean_abs_dev: f64,
    /// Fraction of d > 1 (amplified) in each form.
    pub rows_amplified: f64,
    pub svd_amplified: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub model: String,
    pub task: String,
    pub steps: u64,
    pub tokens_per_step: usize,
    pub eval_counted: usize,
    /// LoRA's trainable count at the reference rank.
    pub budget: usize,
    pub reference_rank: usize,
    pub base_loss: f64,
    pub base_ppl: f64,
    pub base_accuracy: f64,
    /// What "accuracy" is: next-token top-1 accuracy, or multiple-choice acc.
    pub accuracy: String,
    /// Seeds per (method, learning rate).
    pub seeds: usize,
    /// Held-out tokens of the selection half (chooses each method's rate).
    pub val_counted: usize,
    /// True when the held-out data was one batch, so the rate was chosen on the reported data.
    pub selected_on_reported: bool,
    pub results: Vec<MethodResult>,
    pub fidelity: Vec<FidelityRow>,
    pub fidelity_summary: Vec<FidelitySummary>,
}

/// Trainable values of the settings' method on its targets of every layer of `model`, counted on
/// a one-layer copy (adapters are built there, SVDs included) times the layer count.
pub fn trainable_count(model: &dyn Model, s: &TrainSettings) -> Result<usize> {
    let mut one = model.clone_model();
    for l in one.linears_mut() {
        l.adapter = None;
    }
    one.attach_where(&|p| Ok(layer_of(p) == Some(0) && s.targets.selects(p)?), &s.lora, &s.method, s.seed)?;
    Ok(one.trainable_params().iter().map(|p| p.numel()).sum::<usize>() * model.num_layers())
}

/// The rank in 1..=max_rank whose count is closest to `budget` (ties: the smaller rank; `max_rank`
/// if even that is below the budget), by binary search over a count that does not decrease with
/// the rank.
pub fn closest_rank(budget: usize, max_rank: usize, count: &mut dyn FnMut(usize) -> Result<usize>) -> Result<usize> {
    let (mut lo, mut hi) = (1, max_rank.max(1));
    if count(hi)? < budget {
        return Ok(hi);
    }
    // smallest r with count(r) ≥ budget
    while lo < hi {
        let mid = (lo + hi) / 2;
        if count(mid)? >= budget {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    if lo > 1 && budget - count(lo - 1)? <= count(lo)? - budget {
        return Ok(lo - 1);
    }
    Ok(lo)
}

/// The model and data every method trains on.
struct Task {
    model: PathBuf,
    train: PathBuf,
    eval: Option<PathBuf>,
    /// (train, held-out) files when they are not simply `train` / `eval` folders.
    split: Option<(Vec<DataFile>, Vec<DataFile>)>,
    name: String,
}

/// SpecLoRA's learned row scales (and the rows they scale) per (layer, linear).
type DRows = HashMap<String, (Vec<f64>, SpecRows)>;
/// SpecLoRA-SVD's learned σ scales per (layer, linear).
type DSvd = HashMap<String, Vec<f64>>;
/// A plot panel: title, the base model's value, (mean, std) per method.
type Panel<'a> = (&'a str, f64, Vec<(f64, f64)>);

/// Resets the process's resident-set high-water mark (Linux ≥ 4.0: `clear_refs` 5); false where
/// that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs the comparison; `log` receives progress lines. For every method (at its matched rank),
/// every learning rate of its grid and every seed, trains from the same frozen model on the same
/// data (the batch order shuffled by the seed) and evaluates on the held-out batches: their
/// first half picks the rate (lowest mean loss over seeds), the second half is reported. Writes
/// `compare.json`, `compare.png` and one run folder per run
/// (`<out>/<method>/lr<lr>/seed<seed>/adapter`, metrics, checkpoint) under `o.out`.
pub fn compare(o: &CompareOptions, log: &mut dyn FnMut(String)) -> Result<CompareReport> {
    const OP: &str = "compare";
    if o.methods.is_empty() {
        return Err(Error::invalid(OP, "--methods: name at least one method"));
    }
    if o.steps == 0 {
        return Err(Error::invalid(OP, "--steps must be at least 1"));
    }
    let seeds = o.seeds.unwrap_or(3);
    if seeds == 0 {
        return Err(Error::invalid(OP, "--seeds must be at least 1"));
    }
    let syn = o.synthetic;
    let rank = o.rank.unwrap_or(if syn { 8 } else { 16 });
    let k = o.k.unwrap_or(if syn { 32 } else { 200 });
    let batch = o.batch.unwrap_or(if syn { 4 } else { 2 });
    let seq_len = o.seq_len.unwrap_or(if syn { 64 } else { 128 });
    let grid_of = |m: &str| -> Vec<f64> {
        if let Some((_, g)) = o.lr_grid.iter().find(|(n, _)| n == m) {
            return g.clone();
        }
        match (&o.lrs, o.lr) {
            (Some(g), _) => g.clone(),
            (None, Some(lr)) => vec![lr],
            (None, None) => default_lr_grid(m, syn),
        }
    };
    for (m, g) in &o.lr_grid {
        if !o.methods.contains(m) {
            return Err(Error::invalid(OP, format!("--lr-grid names {m}, which is not among --methods {:?}", o.methods)));
        }
        if g.is_empty() {
            return Err(Error::invalid(OP, format!("--lr-grid {m}: no learning rate")));
        }
    }
    for m in &o.methods {
        if let Some(bad) = grid_of(m).iter().find(|&&lr| !(lr.is_finite() && lr > 0.0)) {
            return Err(Error::invalid(OP, format!("{m}: learning rate {bad} is not a positive number")));
        }
    }
    let task = match (&o.model, &o.data, &o.eval_data) {
        (Some(model), Some(data), Some(eval)) => Task {
            model: model.clone(),
            train: data.clone(),
            eval: Some(eval.clone()),
            split: None,
            name: format!("{} (held out: {})", data.display(), eval.display()),
        },
        (None, None, None) if syn => {
            let (model, data) = write_synthetic(&o.out, o.seed)?;
            Task { model, train: data.join("train"), eval: Some(data.join("eval")), split: None, name: "synthetic counting stories (demo --synthetic)".into() }
        }
        (None, None, None) => {
            let d = demo_data()?;
            Task {
                model: d.gguf,
                train: d.texts,
                eval: None,
                split: Some((d.train, d.eval)),
                name: "Shakespeare (6 plays; held out: Hamlet, The Tempest)".into(),
            }
        }
        _ => return Err(Error::invalid(OP, "--model, --data and --eval-data go together (give all three, or none for the built-in tasks)")),
    };
    // Multiple-choice held-out data: accuracy is eval --task mc's acc.
    // With --eval-questions, a file that is not valid multiple choice is an error naming its line.
    let mc = match &task.eval {
        Some(p) if p.is_file() && o.eval_questions.is_some() => Some((p.clone(), super::eval::read_mc(p)?)),
        Some(p) if p.is_file() => super::eval::read_mc(p).ok().map(|items| (p.clone(), items)),
        _ => None,
    };
    let mc = match (mc, o.eval_questions) {
        (Some((p, items)), Some(n)) => {
            let keep = sample_questions(items.len(), n);
            log(format!("accuracy on {} of the {} held-out questions (a fixed sample)", keep.len(), items.len()));
            Some((p, keep.into_iter().map(|i| items[i].clone()).collect::<Vec<_>>()))
        }
        (None, Some(_)) => {
            return Err(Error::invalid(OP, "--eval-questions needs multiple-choice held-out data (every --eval-data line {\"query\", \"choices\", \"gold\"})"))
        }
        (mc, None) => mc,
    };
    let settings_for = |method: &str, r: usize, lr: f64, seed: u64| -> Result<TrainSettings> {
        let args = TrainArgs {
            model: Some(task.model.clone()),
            data: Some(task.train.clone()),
            eval_data: task.eval.clone(),
            method: Some(method.to_string()),
            rank: Some(r),
            k: Some(k),
            lr: Some(lr),
            warmup: Some((o.steps / 10).max(1)),
            steps: Some(o.steps),
            batch: Some(batch),
            seq_len: Some(seq_len),
            seed: Some(seed),
            out: Some(o.out.join(method).join(format!("lr{lr:e}")).join(format!("seed{seed}"))),
            ..TrainArgs::default()
        };
        args.resolve().map_err(|e| Error::invalid(OP, format!("--methods {method}: {e}")))
    };
    // Every name must parse before any training starts.
    for m in &o.methods {
        settings_for(m, rank, 1e-3, o.seed)?;
    }
    let lora = settings_for("lora", rank, 1e-3, o.seed)?;
    let mut prepared = prepare(&lora, task.split.clone(), log)?;
    let per_batch = batch * seq_len;
    let keep = o.eval_tokens.div_ceil(per_batch).max(2);
    prepared.eval.truncate(keep);
    if prepared.eval.is_empty() {
        return Err(Error::invalid(OP, "no held-out data to evaluate on"));
    }
    // Selection half and reported half of the held-out batches.
    let all_eval = prepared.eval.clone();
    let selected_on_reported = all_eval.len() < 2;
    let (val, test) = if selected_on_reported {
        log("note: the held-out data is one batch, so the learning rate is chosen on the reported data (give more --eval-tokens)".into());
        (all_eval.clone(), all_eval.clone())
    } else {
        let half = all_eval.len() / 2;
        (all_eval[..half].to_vec(), all_eval[half..].to_vec())
    };
    let eval_counted: usize = test.iter().map(|b| b.counted).sum();
    let val_counted: usize = val.iter().map(|b| b.counted).sum();
    let tok = prepared.tokenizer.clone();
    let accuracy_of = |m: &dyn Model| -> Result<f64> {
        match &mc {
            Some((p, items)) => {
                let opts = super::eval::McOptions { max_len: 2048, batch: 16, progress: false };
                Ok(super::eval::mc_eval(m, &tok, items, p, &opts)?.acc)
            }
            None => super::eval::token_accuracy(m, &test),
        }
    };
    // Everything a run's numbers depend on besides method, rank, rate and seed.
    let mut task_key =
        format!("model={} task={} steps={} batch={batch} seq_len={seq_len} k={k} eval_tokens={}", task.model.display(), task.name, o.steps, o.eval_tokens);
    if let Some(n) = o.eval_questions {
        task_key.push_str(&format!(" eval_questions={n}"));
    }
    // Products with frozen weights below f32 change the numbers (they apply only where AMX runs them).
    let precision = crate::backend::amx::effective_precision();
    if precision != crate::backend::amx::MatmulPrecision::Highest {
        task_key.push_str(&format!(" matmul_precision={precision}"));
    }
    let base_path = o.out.join("base.json");
    let (base_loss, base_accuracy) = match o.resume.then(|| read_record(&base_path, &task_key, |r: &BaseRecord| &r.key)).flatten() {
        Some(b) => {
            log(format!("reusing the base model's evaluation from {}", base_path.display()));
            (b.loss, b.accuracy)
        }
        None => {
            let (loss, _) = evaluate(&*prepared.model, &test)?;
            let accuracy = accuracy_of(&*prepared.model)?;
            write_record(&base_path, &BaseRecord { key: task_key.clone(), loss, accuracy })?;
            (loss, accuracy)
        }
    };
    let base_ppl = base_loss.exp();
    let accuracy = if mc.is_some() { "multiple-choice acc (eval --task mc)" } else { "next-token top-1 accuracy" }.to_string();
    log(format!("base model: held-out loss {base_loss:.4}, perplexity {base_ppl:.2}, accuracy {base_accuracy:.4} on {eval_counted} tokens (rates chosen on another {val_counted})"));
    let proxy = prepared.model.clone_model();
    let budget = trainable_count(&*proxy, &lora)?;
    // Ranks: matched to LoRA's budget.
    let mut plan: Vec<(String, usize, usize)> = Vec::new();
    for m in &o.methods {
        let mut cache: HashMap<usize, usize> = HashMap::new();
        let mut count = |r: usize| -> Result<usize> {
            if let Some(&c) = cache.get(&r) {
                return Ok(c);
            }
            let c = trainable_count(&*proxy, &settings_for(m, r, 1e-3, o.seed)?)?;
            cache.insert(r, c);
            Ok(c)
        };
        let r = if o.no_budget_match || count(1)? == count(4 * rank)? { rank } else { closest_rank(budget, 4 * rank, &mut count)? };
        let c = count(r)?;
        log(format!(
            "{m}: rank {r}, {c} trainable values ({:.1}% of LoRA r={rank}'s {budget}); learning rates {:?} × {seeds} seeds",
            100.0 * c as f64 / budget as f64,
            grid_of(m)
        ));
        plan.push((m.clone(), r, c));
    }
    let mut results = Vec::new();
    let mut d_rows: HashMap<String, (Vec<f64>, SpecRows)> = HashMap::new();
    let mut d_svd: HashMap<String, Vec<f64>> = HashMap::new();
    // Every run starts from the same frozen model and the same held-out batches; the batch order
    // is the prepared one reshuffled by the run's seed.
    let start = prepared.train.state();
    for (m, r, c) in &plan {
        let mut grid = Vec::new();
        let mut peak: Option<u64> = None;
        // The first seed's learned d vectors and adapter folder at each rate (kept for the chosen one).
        let mut firsts: Vec<(PathBuf, DRows, DSvd)> = Vec::new();
        for lr in grid_of(m) {
            let mut runs = Vec::new();
            for si in 0..seeds {
                let seed = o.seed + si as u64;
                let s = settings_for(m, *r, lr, seed)?;
                let p = &mut prepared;
                for l in p.model.linears_mut() {
                    l.adapter = None;
                }
                let record_path = s.out.join("result.json");
                let key = format!("{task_key} method={m} rank={r} lr={lr:e} seed={seed}");
                let adapter_dir = s.out.join("adapter");
                // The first seed's saved adapter is needed too (its d vectors).
                let reusable = o.resume && (si > 0 || adapter_dir.join("adapter_config.json").exists());
                if let Some(rec) = reusable.then(|| read_record(&record_path, &key, |r: &RunRecord| &r.key)).flatten() {
                    log(format!("{m} lr {lr:e} seed {seed}: finished earlier ({}), reused", record_path.display()));
                    if si == 0 {
                        // The d vectors for the fidelity check, from the saved adapter.
                        crate::peft::io::load_adapter(&mut *p.model, &adapter_dir)?;
                        let (a, b) = learned_d(&*p.model);
                        firsts.push((adapter_dir, a, b));
                    }
                    runs.push(rec.run);
                    continue;
                }
                log(format!("\n== {m} (rank {r}), lr {lr:e}, seed {seed} =="));
                let mut st = start.clone();
                st.seed = seed;
                p.train.restore(&st)?;
                p.eval.clone_from(&val);
                let resettable = reset_peak_rss();
                let report = run(&s, p, o.progress, log)?;
                if resettable {
                    peak = peak.max(crate::bench::peak_rss_bytes());
                }
                let (val_loss, _) = report.eval.ok_or_else(|| Error::invalid(OP, "no held-out evaluation"))?;
                let (eval_loss, _) = evaluate(&*p.model, &test)?;
                let acc = accuracy_of(&*p.model)?;
                log(format!(
                    "{m} lr {lr:e} seed {seed}: held-out loss {eval_loss:.4} (selection half {val_loss:.4}), accuracy {acc:.4}; {:.0} s",
                    report.seconds
                ));
                if si == 0 {
                    let (a, b) = learned_d(&*p.model);
                    firsts.push((report.adapter_dir.clone(), a, b));
                }
                let run = SeedRun { seed, val_loss, eval_loss, accuracy: acc, last_train_loss: report.last_loss, seconds: report.seconds };
                write_record(&record_path, &RunRecord { key, run: run.clone() })?;
                runs.push(run);
            }
            let (vm, vs) = mean_std(&runs.iter().map(|x| x.val_loss).collect::<Vec<_>>());
            grid.push(GridPoint { lr, val_loss: vm, val_loss_std: vs, runs });
        }
        // The rate with the lowest mean selection-half loss (a non-finite mean never wins).
        let key = |g: &GridPoint| if g.val_loss.is_finite() { g.val_loss } else { f64::INFINITY };
        let best = (0..grid.len()).fold(0, |a, i| if key(&grid[i]) < key(&grid[a]) { i } else { a });
        let g = &grid[best];
        let (el, es) = mean_std(&g.runs.iter().map(|x| x.eval_loss).collect::<Vec<_>>());
        let (am, asd) = mean_std(&g.runs.iter().map(|x| x.accuracy).collect::<Vec<_>>());
        let (tl, _) = mean_std(&g.runs.iter().map(|x| x.last_train_loss).collect::<Vec<_>>());
        let (secs, _) = mean_std(&g.runs.iter().map(|x| x.seconds).collect::<Vec<_>>());
        let (adapter_dir, a, b) = firsts.swap_remove(best);
        d_rows.extend(a);
        d_svd.extend(b);
        log(format!("{m}: chose lr {:e}; held-out loss {el:.4} ± {es:.4}, accuracy {am:.4} ± {asd:.4} over {seeds} seeds", g.lr));
        results.push(MethodResult {
            method: m.clone(),
            rank: *r,
            trainable: *c,
            budget_ratio: *c as f64 / budget as f64,
            lr: g.lr,
            eval_loss: el,
            eval_loss_std: es,
            eval_ppl: el.exp(),
            accuracy: am,
            accuracy_std: asd,
            last_train_loss: tl,
            seconds: secs,
            peak_rss: peak,
            adapter_dir,
            grid,
        });
    }
    let (fidelity, fidelity_summary) = fidelity(&proxy, &d_rows, &d_svd, o.fidelity_layers.as_deref())?;
    let report = CompareReport {
        model: task.model.display().to_string(),
        task: task.name.clone(),
        steps: o.steps,
        tokens_per_step: per_batch,
        eval_counted,
        budget,
        reference_rank: rank,
        base_loss,
        base_ppl,
        base_accuracy,
        accuracy,
        seeds,
        val_counted,
        selected_on_reported,
        results,
        fidelity,
        fidelity_summary,
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::invalid(OP, e.to_string()))?;
    std::fs::create_dir_all(&o.out).map_err(|e| Error::Io { path: o.out.clone(), source: e })?;
    crate::peft::io::write_atomic(&o.out.join("compare.json"), text.as_bytes())?;
    if !o.no_plot {
        plot(&report, &o.out.join("compare.png"))?;
    }
    Ok(report)
}

/// The learned d vectors of the model's SpecLoRA (positional) and SpecLoRA-SVD adapters.
fn learned_d(model: &dyn Model) -> (DRows, DSvd) {
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    for lin in model.linears() {
        let Some(ad) = lin.adapter.as_deref() else { continue };
        if let Some(SpecLora { d, rows, .. }) = ad.downcast_ref() {
            a.insert(lin.path.clone(), (d.to_vec_f64(), rows.clone()));
        } else if let Some(SpecLoraSvd { d, .. }) = ad.downcast_ref() {
            b.insert(lin.path.clone(), d.to_vec_f64());
        }
    }
    (a, b)
}

/// Positional vs SVD-form d per (layer, module) for the chosen layers, and means per module type.
fn fidelity(
    base: &dyn Model,
    d_rows: &HashMap<String, (Vec<f64>, SpecRows)>,
    d_svd: &HashMap<String, Vec<f64>>,
    layers: Option<&[usize]>,
) -> Result<(Vec<FidelityRow>, Vec<FidelitySummary>)> {
    let n_layers = base.num_layers();
    let default = [0, n_layers / 2, n_layers.saturating_sub(1)];
    let mut chosen: Vec<usize> = layers.map(<[usize]>::to_vec).unwrap_or_else(|| default.to_vec());
    chosen.sort_unstable();
    chosen.dedup();
    if let Some(&bad) = chosen.iter().find(|&&l| l >= n_layers) {
        return Err(Error::invalid("compare", format!("--fidelity-layers: layer {bad} does not exist (the model has {n_layers})")));
    }
    let mut rows = Vec::new();
    for lin in base.linears() {
        let Some(li) = lin.layer().filter(|l| chosen.contains(l)) else { continue };
        {
            let (Some((dr, sel)), Some(ds)) = (d_rows.get(&lin.path), d_svd.get(&lin.path)) else { continue };
            let (m, n) = (lin.out_features(), lin.in_features());
            let w0 = lin.weight.to_vec_f64();
            let mut w1 = w0.clone();
            let idx: Vec<usize> = match sel {
                SpecRows::Top(k) => (0..*k).collect(),
                SpecRows::Indices(ix) => ix.iter().map(|&i| i as usize).collect(),
            };
            for (&i, &s) in idx.iter().zip(dr) {
                w1[i * n..(i + 1) * n].iter_mut().for_each(|v| *v *= s);
            }
            let shown = ds.len().min(8).min(m.min(n));
            let sp = crate::spectrum::compare_matrices(&w0, &w1, m, n, shown)?;
            rows.push(FidelityRow { layer: li, module: lin.module().to_string(), d_rows: dr.clone(), d_svd: ds.clone(), induced_ratio: sp.ratio.top });
        }
    }
    let mut summary = Vec::new();
    let mut modules: Vec<&str> = Vec::new();
    for lin in base.linears() {
        if !modules.contains(&lin.module()) {
            modules.push(lin.module());
        }
    }
    for t in modules {
        let module_of = |p: &str| p.rsplit('.').next().unwrap_or(p).to_string();
        let keys: Vec<&String> = d_rows.keys().filter(|p| module_of(p) == t && layer_of(p).is_some()).filter(|key| d_svd.contains_key(*key)).collect();
        if keys.is_empty() {
            continue;
        }
        let (mut a, mut b, mut amp_a, mut amp_b, mut na, mut nb) = (0.0, 0.0, 0usize, 0usize, 0usize, 0usize);
        for key in &keys {
            for &x in &d_rows[*key].0 {
                a += (x - 1.0).abs();
                amp_a += usize::from(x > 1.0);
                na += 1;
            }
            for &x in &d_svd[*key] {
                b += (x - 1.0).abs();
                amp_b += usize::from(x > 1.0);
                nb += 1;
            }
        }
        summary.push(FidelitySummary {
            module: t.to_string(),
            matrices: keys.len(),
            rows_mean_abs_dev: a / na.max(1) as f64,
            svd_mean_abs_dev: b / nb.max(1) as f64,
            rows_amplified: amp_a as f64 / na.max(1) as f64,
            svd_amplified: amp_b as f64 / nb.max(1) as f64,
        });
    }
    Ok((rows, summary))
}

/// Bytes as MiB, or "-".
fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64)).unwrap_or_else(|| "-".into())
}

/// The comparison as text: the method table, the learning-rate sweeps, then the fidelity tables.
pub fn render(r: &CompareReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\ncompare on {} — {}", r.model, r.task);
    let _ = writeln!(
        out,
        "{} steps of {} tokens each; {} seeds per learning rate; budget: LoRA r={} = {} trainable values",
        r.steps, r.tokens_per_step, r.seeds, r.reference_rank, r.budget
    );
    let _ = writeln!(
        out,
        "held-out: rate chosen on {} tokens, reported on another {}{}; accuracy = {}; ± = sample std over seeds",
        r.val_counted,
        r.eval_counted,
        if r.selected_on_reported { " (the same batch: too little held-out data)" } else { "" },
        r.accuracy
    );
    let _ = writeln!(
        out,
        "\n{:<14} {:>4} {:>10} {:>7} {:>8}  {:>17} {:>9}  {:>17}  {:>8} {:>9}",
        "method", "rank", "trainable", "budget", "lr", "held-out loss", "ppl", "accuracy", "time/run", "peak mem"
    );
    let _ = writeln!(out, "{}", "-".repeat(118));
    let _ = writeln!(
        out,
        "{:<14} {:>4} {:>10} {:>7} {:>8}  {:>17.4} {:>9.3}  {:>17.4}  {:>8} {:>9}",
        "base (none)", "-", 0, "-", "-", r.base_loss, r.base_ppl, r.base_accuracy, "-", "-"
    );
    for m in &r.results {
        let _ = writeln!(
            out,
            "{:<14} {:>4} {:>10} {:>6.1}% {:>8.0e}  {:>8.4} ± {:<6.4} {:>9.3}  {:>8.4} ± {:<6.4}  {:>7.1}s {:>9}",
            m.method,
            m.rank,
            m.trainable,
            100.0 * m.budget_ratio,
            m.lr,
            m.eval_loss,
            m.eval_loss_std,
            m.eval_ppl,
            m.accuracy,
            m.accuracy_std,
            m.seconds,
            mib(m.peak_rss)
        );
    }
    let _ = writeln!(out, "\nlearning-rate sweeps (selection-half loss, mean ± std over seeds; * = chosen)");
    for m in &r.results {
        let cells: Vec<String> =
            m.grid.iter().map(|g| format!("{:.0e}: {:.4} ± {:.4}{}", g.lr, g.val_loss, g.val_loss_std, if g.lr == m.lr { "*" } else { "" })).collect();
        let _ = writeln!(out, "{:<14} {}", m.method, cells.join("   "));
    }
    if r.fidelity.is_empty() {
        let _ = writeln!(out, "\n(no fidelity check: it needs both speclora and speclora-svd among --methods)");
        return out;
    }
    let _ = writeln!(
        out,
        "\napproximation fidelity: SpecLoRA's positional d (scales rows 1..k of W) vs the SVD form's d (scales σ_1..σ_k),\n\
         and σ_i(Γ⊙W)/σ_i(W), the singular-value change the positional mask induces (what the SVD form's d_i sets directly)"
    );
    let fmt = |v: &[f64], n: usize| v.iter().take(n).map(|x| format!("{x:.5}")).collect::<Vec<_>>().join(" ");
    let stats = |v: &[f64]| {
        let dev: Vec<f64> = v.iter().map(|x| (x - 1.0).abs()).collect();
        (dev.iter().sum::<f64>() / dev.len().max(1) as f64, dev.iter().copied().fold(0.0, f64::max))
    };
    let _ = writeln!(out, "{:<5} {:<10} {:<22} {:<55} {:>10} {:>10}", "layer", "module", "", "first 6 values", "mean|d−1|", "max|d−1|");
    for f in &r.fidelity {
        let (ma, xa) = stats(&f.d_rows);
        let (mb, xb) = stats(&f.d_svd);
        let (mc, xc) = stats(&f.induced_ratio);
        let _ = writeln!(out, "{:<5} {:<10} {:<22} {:<55} {:>10.2e} {:>10.2e}", f.layer, f.module, "d, positional (rows)", fmt(&f.d_rows, 6), ma, xa);
        let _ = writeln!(out, "{:<5} {:<10} {:<22} {:<55} {:>10.2e} {:>10.2e}", "", "", "σ(Γ⊙W)/σ(W), top", fmt(&f.induced_ratio, 6), mc, xc);
        let _ = writeln!(out, "{:<5} {:<10} {:<22} {:<55} {:>10.2e} {:>10.2e}", "", "", "d, SVD form (σ_i)", fmt(&f.d_svd, 6), mb, xb);
    }
    let _ = writeln!(out, "\nover all layers: mean |d − 1| and the share of d > 1 (amplified), positional vs SVD form");
    let _ = writeln!(out, "{:<10} {:>8}  {:>12} {:>12}  {:>10} {:>10}", "module", "matrices", "rows |d−1|", "svd |d−1|", "rows d>1", "svd d>1");
    for s in &r.fidelity_summary {
        let _ = writeln!(
            out,
            "{:<10} {:>8}  {:>12.3e} {:>12.3e}  {:>9.1}% {:>9.1}%",
            s.module,
            s.matrices,
            s.rows_mean_abs_dev,
            s.svd_mean_abs_dev,
            100.0 * s.rows_amplified,
            100.0 * s.svd_amplified
        );
    }
    out
}

/// `compare.png`: held-out loss and accuracy per method (mean, with ± one std over seeds as error
/// bars), the base model as a dashed line.
pub fn plot(r: &CompareReport, path: &std::path::Path) -> Result<()> {
    use crate::spectrum::plot::{register, render_png, FONT};
    use plotters::prelude::*;
    register()?;
    let n = r.results.len();
    let names: Vec<String> = r.results.iter().map(|m| m.method.clone()).collect();
    let panels: [Panel<'_>; 2] = [
        ("held-out loss (lower is better)", r.base_loss, r.results.iter().map(|m| (m.eval_loss, m.eval_loss_std)).collect()),
        (r.accuracy.as_str(), r.base_accuracy, r.results.iter().map(|m| (m.accuracy, m.accuracy_std)).collect()),
    ];
    let title = format!("{} steps, {} seeds, matched budget (LoRA r={}): mean ± std at each method's chosen lr", r.steps, r.seeds, r.reference_rank);
    render_png(path, |root| {
        root.fill(&WHITE)?;
        let root = root.titled(&title, (FONT, 22))?;
        let areas = root.split_evenly((1, 2));
        for (area, (label, base, vals)) in areas.iter().zip(&panels) {
            let (mut lo, mut hi) = (*base, *base);
            for &(m, s) in vals {
                if m.is_finite() {
                    lo = lo.min(m - s);
                    hi = hi.max(m + s);
                }
            }
            let pad = ((hi - lo) * 0.15).max(1e-3);
            let mut chart = ChartBuilder::on(area)
                .caption(*label, (FONT, 18))
                .margin(16)
                .x_label_area_size(70)
                .y_label_area_size(70)
                .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo - pad)..(hi + pad))?;
            let fmt = |x: &f64| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                    names[i as usize].clone()
                } else {
                    String::new()
                }
            };
            chart.configure_mesh().x_labels(n.max(1) * 4 + 1).x_label_formatter(&fmt).disable_x_mesh().label_style((FONT, 15)).draw()?;
            chart
                .draw_series(DashedLineSeries::new(vec![(-0.5, *base), (n as f64 - 0.5, *base)], 8, 5, ShapeStyle::from(&BLACK).stroke_width(1)))?
                .label("base model")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
            let color = RGBColor(31, 119, 180);
            // Error bars: a vertical line from mean − std to mean + std with short caps.
            for (i, &(m, s)) in vals.iter().enumerate() {
                let x = i as f64;
                let style = ShapeStyle::from(&color).stroke_width(2);
                chart.draw_series(std::iter::once(PathElement::new(vec![(x, m - s), (x, m + s)], style)))?;
                for y in [m - s, m + s] {
                    chart.draw_series(std::iter::once(PathElement::new(vec![(x - 0.08, y), (x + 0.08, y)], style)))?;
                }
            }
            chart.draw_series(vals.iter().enumerate().map(|(i, &(m, _))| Circle::new((i as f64, m), 5, color.filled())))?;
            chart.configure_series_labels().background_style(WHITE).border_style(BLACK).label_font((FONT, 14)).draw()?;
        }
        Ok(())
    })
    .map_err(|e| Error::invalid("compare plot", format!("{}: {e}", path.display())))
}
