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

use serde::Serialize;

use super::config::{TrainArgs, TrainSettings};
use super::data::DataFile;
use super::demo::{demo_data, write_synthetic};
use super::evaluate;
use super::run::{prepare, run};
use crate::error::{Error, Result};
use crate::model::{Llama, Target};
use crate::ops::SpecRows;
use crate::peft::Adapter;

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
    pub lr: Option<f64>,
    /// Held-out tokens evaluated (the first ones of the held-out data).
    pub eval_tokens: usize,
    pub seed: u64,
    pub out: PathBuf,
    /// The offline task of `demo --synthetic` instead of SmolLM2 + Shakespeare.
    pub synthetic: bool,
    /// Train every method at `rank` instead of matching LoRA's trainable count.
    pub no_budget_match: bool,
    /// Layers whose d vectors are shown (default: first, middle, last).
    pub fidelity_layers: Option<Vec<usize>>,
    /// Show an indicatif progress bar while training.
    pub progress: bool,
}

/// One trained method.
#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub method: String,
    pub rank: usize,
    pub trainable: usize,
    /// trainable / the LoRA budget.
    pub budget_ratio: f64,
    pub eval_loss: f64,
    pub eval_ppl: f64,
    pub last_train_loss: f64,
    pub seconds: f64,
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
    pub results: Vec<MethodResult>,
    pub fidelity: Vec<FidelityRow>,
    pub fidelity_summary: Vec<FidelitySummary>,
}

/// Trainable values of the settings' method on its targets of every layer of `model`, counted on
/// a one-layer copy (adapters are built there, SVDs included) times the layer count.
pub fn trainable_count(model: &Llama, s: &TrainSettings) -> Result<usize> {
    let mut one = model.clone();
    one.layers.truncate(1);
    for l in &mut one.layers {
        for t in Target::ALL {
            l.linear_mut(t).adapter = None;
        }
    }
    one.attach_adapters(&s.targets, &s.lora, &s.method, s.seed)?;
    Ok(one.trainable_params().iter().map(|p| p.numel()).sum::<usize>() * model.layers.len())
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

/// Runs the comparison; `log` receives progress lines. Writes `compare.json` and one run folder
/// per method (`<out>/<method>/adapter`, metrics, checkpoint) under `o.out`.
pub fn compare(o: &CompareOptions, log: &mut dyn FnMut(String)) -> Result<CompareReport> {
    const OP: &str = "compare";
    if o.methods.is_empty() {
        return Err(Error::invalid(OP, "--methods: name at least one method"));
    }
    if o.steps == 0 {
        return Err(Error::invalid(OP, "--steps must be at least 1"));
    }
    let syn = o.synthetic;
    let rank = o.rank.unwrap_or(if syn { 8 } else { 16 });
    let k = o.k.unwrap_or(if syn { 32 } else { 200 });
    let batch = o.batch.unwrap_or(if syn { 4 } else { 2 });
    let seq_len = o.seq_len.unwrap_or(if syn { 64 } else { 128 });
    let lr = o.lr.unwrap_or(if syn { 1e-2 } else { 1e-3 });
    let task = if syn {
        let (model, data) = write_synthetic(&o.out, o.seed)?;
        Task { model, train: data.join("train"), eval: Some(data.join("eval")), split: None, name: "synthetic counting stories (demo --synthetic)".into() }
    } else {
        let d = demo_data()?;
        Task { model: d.gguf, train: d.texts, eval: None, split: Some((d.train, d.eval)), name: "Shakespeare (6 plays; held out: Hamlet, The Tempest)".into() }
    };
    let settings_for = |method: &str, r: usize| -> Result<TrainSettings> {
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
            seed: Some(o.seed),
            out: Some(o.out.join(method)),
            ..TrainArgs::default()
        };
        args.resolve().map_err(|e| Error::invalid(OP, format!("--methods {method}: {e}")))
    };
    // Every name must parse before any training starts.
    for m in &o.methods {
        settings_for(m, rank)?;
    }
    let lora = settings_for("lora", rank)?;
    let mut prepared = prepare(&lora, task.split.clone(), log)?;
    let per_batch = batch * seq_len;
    let keep = o.eval_tokens.div_ceil(per_batch).max(1);
    prepared.eval.truncate(keep);
    if prepared.eval.is_empty() {
        return Err(Error::invalid(OP, "no held-out data to evaluate on"));
    }
    let eval = prepared.eval.clone();
    let eval_counted: usize = eval.iter().map(|b| b.counted).sum();
    let (base_loss, base_ppl) = evaluate(&prepared.model, &eval)?;
    log(format!("base model: held-out loss {base_loss:.4}, perplexity {base_ppl:.2} on {eval_counted} tokens"));
    let proxy = prepared.model.clone();
    let budget = trainable_count(&proxy, &lora)?;
    // Ranks: matched to LoRA's budget.
    let mut plan: Vec<(String, usize, usize)> = Vec::new();
    for m in &o.methods {
        let mut cache: HashMap<usize, usize> = HashMap::new();
        let mut count = |r: usize| -> Result<usize> {
            if let Some(&c) = cache.get(&r) {
                return Ok(c);
            }
            let c = trainable_count(&proxy, &settings_for(m, r)?)?;
            cache.insert(r, c);
            Ok(c)
        };
        let r = if o.no_budget_match || count(1)? == count(4 * rank)? { rank } else { closest_rank(budget, 4 * rank, &mut count)? };
        let c = count(r)?;
        log(format!("{m}: rank {r}, {c} trainable values ({:.1}% of LoRA r={rank}'s {budget})", 100.0 * c as f64 / budget as f64));
        plan.push((m.clone(), r, c));
    }
    let mut results = Vec::new();
    let mut d_rows: HashMap<(usize, Target), (Vec<f64>, SpecRows)> = HashMap::new();
    let mut d_svd: HashMap<(usize, Target), Vec<f64>> = HashMap::new();
    // Every method starts from the same frozen model, the same batch order and the same
    // held-out batches: the one prepared run is reset between methods.
    let start = prepared.train.state();
    for (m, r, c) in &plan {
        let s = settings_for(m, *r)?;
        log(format!("\n== {m} (rank {r}) =="));
        let p = &mut prepared;
        for l in &mut p.model.layers {
            for t in Target::ALL {
                l.linear_mut(t).adapter = None;
            }
        }
        p.train.restore(&start)?;
        p.eval.clone_from(&eval);
        let report = run(&s, p, o.progress, log)?;
        let (loss, ppl) = report.eval.ok_or_else(|| Error::invalid(OP, "no held-out evaluation"))?;
        log(format!("{m}: held-out loss {loss:.4}, perplexity {ppl:.2} (base {base_ppl:.2}); {} steps in {:.0} s", report.steps, report.seconds));
        for (li, layer) in p.model.layers.iter().enumerate() {
            for t in Target::ALL {
                match &layer.linear(t).adapter {
                    Some(Adapter::SpecLora { d, rows, .. }) => {
                        d_rows.insert((li, t), (d.to_vec_f64(), rows.clone()));
                    }
                    Some(Adapter::SpecLoraSvd { d, .. }) => {
                        d_svd.insert((li, t), d.to_vec_f64());
                    }
                    _ => {}
                }
            }
        }
        results.push(MethodResult {
            method: m.clone(),
            rank: *r,
            trainable: *c,
            budget_ratio: *c as f64 / budget as f64,
            eval_loss: loss,
            eval_ppl: ppl,
            last_train_loss: report.last_loss,
            seconds: report.seconds,
            adapter_dir: report.adapter_dir,
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
        results,
        fidelity,
        fidelity_summary,
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::invalid(OP, e.to_string()))?;
    std::fs::create_dir_all(&o.out).map_err(|e| Error::Io { path: o.out.clone(), source: e })?;
    crate::peft::io::write_atomic(&o.out.join("compare.json"), text.as_bytes())?;
    Ok(report)
}

/// Positional vs SVD-form d per (layer, module) for the chosen layers, and means per module type.
fn fidelity(
    base: &Llama,
    d_rows: &HashMap<(usize, Target), (Vec<f64>, SpecRows)>,
    d_svd: &HashMap<(usize, Target), Vec<f64>>,
    layers: Option<&[usize]>,
) -> Result<(Vec<FidelityRow>, Vec<FidelitySummary>)> {
    let n_layers = base.layers.len();
    let default = [0, n_layers / 2, n_layers.saturating_sub(1)];
    let mut chosen: Vec<usize> = layers.map(<[usize]>::to_vec).unwrap_or_else(|| default.to_vec());
    chosen.sort_unstable();
    chosen.dedup();
    if let Some(&bad) = chosen.iter().find(|&&l| l >= n_layers) {
        return Err(Error::invalid("compare", format!("--fidelity-layers: layer {bad} does not exist (the model has {n_layers})")));
    }
    let mut rows = Vec::new();
    for &li in &chosen {
        for t in Target::ALL {
            let (Some((dr, sel)), Some(ds)) = (d_rows.get(&(li, t)), d_svd.get(&(li, t))) else { continue };
            let lin = base.layers[li].linear(t);
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
            rows.push(FidelityRow { layer: li, module: t.hf_name().to_string(), d_rows: dr.clone(), d_svd: ds.clone(), induced_ratio: sp.ratio.top });
        }
    }
    let mut summary = Vec::new();
    for t in Target::ALL {
        let keys: Vec<&(usize, Target)> = d_rows.keys().filter(|(_, tt)| *tt == t).filter(|key| d_svd.contains_key(key)).collect();
        if keys.is_empty() {
            continue;
        }
        let (mut a, mut b, mut amp_a, mut amp_b, mut na, mut nb) = (0.0, 0.0, 0usize, 0usize, 0usize, 0usize);
        for key in &keys {
            for &x in &d_rows[key].0 {
                a += (x - 1.0).abs();
                amp_a += usize::from(x > 1.0);
                na += 1;
            }
            for &x in &d_svd[key] {
                b += (x - 1.0).abs();
                amp_b += usize::from(x > 1.0);
                nb += 1;
            }
        }
        summary.push(FidelitySummary {
            module: t.hf_name().to_string(),
            matrices: keys.len(),
            rows_mean_abs_dev: a / na.max(1) as f64,
            svd_mean_abs_dev: b / nb.max(1) as f64,
            rows_amplified: amp_a as f64 / na.max(1) as f64,
            svd_amplified: amp_b as f64 / nb.max(1) as f64,
        });
    }
    Ok((rows, summary))
}

/// The comparison as text: the method table, then the fidelity tables.
pub fn render(r: &CompareReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\ncompare on {} — {}", r.model, r.task);
    let _ = writeln!(
        out,
        "{} steps of {} tokens each; held-out: {} tokens; budget: LoRA r={} = {} trainable values",
        r.steps, r.tokens_per_step, r.eval_counted, r.reference_rank, r.budget
    );
    let _ = writeln!(
        out,
        "\n{:<16} {:>5} {:>12} {:>8}  {:>9} {:>10} {:>9}  {:>9}",
        "method", "rank", "trainable", "budget", "eval loss", "perplexity", "Δ ppl", "time"
    );
    let _ = writeln!(out, "{}", "-".repeat(88));
    let _ = writeln!(out, "{:<16} {:>5} {:>12} {:>8}  {:>9.4} {:>10.3} {:>9}  {:>9}", "base (none)", "-", 0, "-", r.base_loss, r.base_ppl, "-", "-");
    for m in &r.results {
        let _ = writeln!(
            out,
            "{:<16} {:>5} {:>12} {:>7.1}%  {:>9.4} {:>10.3} {:>+9.3}  {:>8.0}s",
            m.method,
            m.rank,
            m.trainable,
            100.0 * m.budget_ratio,
            m.eval_loss,
            m.eval_ppl,
            m.eval_ppl - r.base_ppl,
            m.seconds
        );
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
