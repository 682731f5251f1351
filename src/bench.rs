//! `spectune bench`: timed training steps on a named model shape (random frozen weights) or a
//! real checkpoint, reporting what a user compares engines by.
//!
//! One step is exactly what `train` does per optimizer step without gradient accumulation:
//! forward through the fused LM-head loss, backward, global gradient norm, AdamW. Reported:
//! - the median step time over `--steps` timed steps (after `--warmup` untimed ones), tokens/s;
//! - useful FLOP/s: the FLOPs a step must do (below) divided by the median step time;
//! - peak RSS (VmHWM from /proc/self/status), over the steps only when the kernel lets us reset
//!   the high-water mark after setup (`/proc/self/clear_refs` ← 5), else over the whole process;
//! - the adapter gradient norm (an error when it is 0 or not finite: such a run trains nothing),
//!   and the loss of every step.
//!
//! Useful FLOPs per step, with N = batch × seq_len tokens (docs/performance.md):
//!
//! | term | what |
//! |---|---|
//! | 4·P·N | frozen matmuls, P = weights of the seven linears of every layer + the LM head: 2 forward + 2 for dX (a frozen weight has no dW) |
//! | 6·R·N | adapter matmuls, R = Σ r·(in + out) over the adapted linears: 2 forward, 2 dX, 2 dW |
//! | 12·hd·nh·b·t(t+1)/2 per layer | causal attention: QKᵀ and PV forward (4·hd per visible pair), dV, dP, dQ, dK backward (8·hd) |
//!
//! Recomputing P in the attention backward earns no credit, and neither does activation
//! checkpointing's second forward.
//!
//! `--save-init DIR` writes the exact starting point (HF config.json + model.safetensors, the
//! adapter in PEFT layout, the batch, the settings) for the PyTorch twin in benches/peers/, so
//! both engines train the same weights on the same tokens.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::bf16;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::json;

use crate::autograd::backward;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gradcheck::SplitMix;
use crate::io::Checkpoint;

use crate::model::{Decoder, DecoderConfig, Model, RopeConfig};
use crate::ops::CeOptions;
use crate::optim::{AdamW, AdamWConfig};
use crate::peft::{LoraConfig, Method, MethodOptions};
use crate::storage::HostData;
use crate::tensor::Tensor;

/// `spectune bench` settings (the CLI's `bench` flags convert into them; [`Default`] gives the
/// flags' defaults with `shape = "tiny"`).
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// A named model shape with random frozen weights: smollm2-135m, llama-3.2-1b, llama-3.2-3b,
    /// llama-3.1-8b (or `tiny`, 2 small layers, for tests).
    pub shape: Option<String>,
    /// A real checkpoint instead (.gguf file or HF folder).
    pub model: Option<PathBuf>,
    /// lora | speclora | speclora-svd
    pub method: String,
    pub rank: usize,
    pub alpha: f64,
    /// SpecLoRA: rows (or singular directions) per weight.
    pub k: usize,
    /// Sequences per step.
    pub batch: usize,
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Storage dtype of the random frozen weights of a named shape: f32 | bf16 (compute is f32).
    pub dtype: String,
    /// Recompute each decoder layer in the backward instead of keeping its activations.
    pub checkpointing: bool,
    /// With --checkpointing: the last N layers keep their activations (more memory, less
    /// recomputation).
    pub checkpoint_keep: usize,
    /// cpu | cuda
    pub device: String,
    /// Print one JSON object as the last line of stdout.
    pub json: bool,
    /// Time every op (forward and backward, by op name) and print the breakdown.
    pub profile: bool,
    pub lr: f64,
    pub seed: u64,
    /// Write the starting point (weights, adapter, batch, settings) for benches/peers/ to DIR and
    /// exit without training.
    pub save_init: Option<PathBuf>,
    /// Instead of training: time a SIZE³ f32 GEMM and the same GEMM with a bf16-stored right
    /// operand (the frozen-weight path), the ceilings the training figures are fractions of.
    pub gemm_ceiling: Option<usize>,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            shape: Some("tiny".into()),
            model: None,
            method: "lora".into(),
            rank: 16,
            alpha: 32.0,
            k: 32,
            batch: 4,
            seq_len: 256,
            steps: 5,
            warmup: 1,
            dtype: "f32".into(),
            checkpointing: false,
            checkpoint_keep: 1,
            device: "cpu".into(),
            json: false,
            profile: false,
            lr: 1e-3,
            seed: 0,
            save_init: None,
            gemm_ceiling: None,
        }
    }
}

/// One op's share of the profiled steps.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    pub phase: &'static str,
    pub op: &'static str,
    pub calls_per_step: f64,
    pub ms_per_step: f64,
    pub percent: f64,
    /// Process CPU time / wall time during the op: how many cores it kept busy.
    pub cores: f64,
}

/// What a bench run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub engine: &'static str,
    /// The shape name or the checkpoint path.
    pub model: String,
    pub method: String,
    pub rank: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub tokens_per_step: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Storage dtype of the frozen weights (the largest tensor's, for a checkpoint).
    pub weights_dtype: String,
    pub checkpointing: bool,
    /// Layers that kept their activations under checkpointing (0 without it).
    pub checkpoint_keep: usize,
    pub device: String,
    pub threads: usize,
    /// The precision frozen-weight products ran at (`highest` unless set and AMX is usable).
    pub matmul_precision: String,
    pub frozen_params: usize,
    pub trainable_params: usize,
    pub step_time_median_s: f64,
    pub step_times_s: Vec<f64>,
    pub tokens_per_s: f64,
    pub useful_flops_per_step: f64,
    pub useful_flops_per_s: f64,
    /// VmHWM at the end; covers only the steps when `peak_rss_reset` is true.
    pub peak_rss_bytes: u64,
    pub peak_rss_reset: bool,
    /// Peak bytes held by device tensors during the steps (0 on the CPU).
    pub peak_device_bytes: u64,
    /// VmHWM after building the model, before the reset.
    pub setup_peak_rss_bytes: u64,
    /// Global L2 norm of the adapter gradients at the last step (> 0).
    pub grad_norm: f64,
    /// Loss of every step, warmup included (before that step's update).
    pub losses: Vec<f64>,
    pub final_loss: f64,
    pub profile: Option<Vec<ProfileRow>>,
}

/// The shape of a named model (the real models' configs; weights random).
pub fn named_shape(name: &str) -> Result<DecoderConfig> {
    let c = |vocab, hidden, inter, layers, heads, kv, hd, theta, tied| DecoderConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hd,
        rms_norm_eps: 1e-5,
        rope: RopeConfig { theta, ..Default::default() },
        tie_word_embeddings: tied,
        max_position_embeddings: 8192,
        ..DecoderConfig::default()
    };
    Ok(match name {
        "smollm2-135m" => c(49152, 576, 1536, 30, 9, 3, 64, 100000.0, true),
        "llama-3.2-1b" => c(128256, 2048, 8192, 16, 32, 8, 64, 500000.0, true),
        "llama-3.2-3b" => c(128256, 3072, 8192, 28, 24, 8, 128, 500000.0, true),
        "llama-3.1-8b" => c(128256, 4096, 14336, 32, 32, 8, 128, 500000.0, false),
        "tiny" => c(256, 64, 160, 2, 4, 2, 16, 10000.0, true),
        other => {
            return Err(Error::invalid("bench", format!("unknown --shape {other:?}; expected smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b or tiny")))
        }
    })
}

/// The methods the bench times (the FLOP formula and the PyTorch twin cover these).
const BENCH_METHODS: [&str; 3] = ["lora", "speclora", "speclora-svd"];

fn parse_method(s: &str, k: usize) -> Result<Method> {
    if !BENCH_METHODS.contains(&s) {
        return Err(Error::invalid("bench", format!("unknown --method {s:?}; expected lora, speclora or speclora-svd")));
    }
    Method::parse(s, MethodOptions { k, ..MethodOptions::default() }, "bench")
}

fn parse_storage(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::invalid("bench", format!("unknown --dtype {other:?}; expected f32 or bf16"))),
    }
}

/// Elements generated per independently seeded chunk (so generation is parallel and the values
/// do not depend on the thread count).
const GEN_CHUNK: usize = 1 << 16;

/// `n` values ~ U(lo, hi) for tensor number `index` of a model seeded with `seed`.
fn random_values<E: Send>(seed: u64, index: usize, n: usize, lo: f64, hi: f64, conv: impl Fn(f64) -> E + Sync + Send) -> Vec<E> {
    let mut v: Vec<E> = Vec::with_capacity(n);
    (0..n.div_ceil(GEN_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut rng = SplitMix::new(seed ^ ((index as u64) << 32 | c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let len = GEN_CHUNK.min(n - c * GEN_CHUNK);
            (0..len).map(|_| conv(rng.uniform(lo, hi))).collect::<Vec<E>>()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .for_each(|chunk| v.extend(chunk));
    v
}

/// A model of shape `cfg` with random frozen weights stored as `storage` (f32 or bf16; compute
/// f32): linears and the embedding ~ U(−1/√in, 1/√in), norm weights ~ U(0.9, 1.1). No f64 or
/// f32 copy of a bf16 weight is ever made.
pub fn random_model(cfg: &DecoderConfig, storage: DType, seed: u64) -> Result<Decoder> {
    let mut weights = std::collections::HashMap::new();
    for (index, (name, dims)) in cfg.expected_weights().into_iter().enumerate() {
        let n: usize = dims.iter().product();
        let (lo, hi) = if name.ends_with("norm.weight") {
            (0.9, 1.1)
        } else {
            let b = 1.0 / (dims[1] as f64).sqrt();
            (-b, b)
        };
        let data = match storage {
            DType::F32 => HostData::F32(random_values(seed, index, n, lo, hi, |x| x as f32)),
            DType::BF16 => HostData::BF16(random_values(seed, index, n, lo, hi, bf16::from_f64)),
            other => return Err(Error::dtype("bench", "weights", "f32 or bf16", other)),
        };
        weights.insert(name, Tensor::from_host(data, dims)?);
    }
    Decoder::from_weights(cfg.clone(), DType::F32, |name| weights.remove(name).ok_or_else(|| Error::invalid("bench", format!("no weight {name}"))))
}

/// The benchmark batch: `b` rows of `t` tokens cycling through a seeded motif of 31 tokens (each
/// row from its own offset), so a few steps of training visibly lower the loss. Targets are the
/// next tokens; the last position of each row is ignored (−100).
pub fn bench_batch(vocab: usize, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<i64>) {
    let mut rng = SplitMix::new(seed ^ 0xba7c_4ba7_c4ba_7c4b);
    let motif: Vec<u32> = (0..31).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
    let ids: Vec<u32> = (0..b * t).map(|i| motif[(i % t + 7 * (i / t)) % motif.len()]).collect();
    let targets = (0..b * t).map(|i| if (i + 1) % t == 0 { -100 } else { ids[i + 1] as i64 }).collect();
    (ids, targets)
}

/// Useful FLOPs of one training step (see the module docs).
pub fn useful_flops(model: &dyn Model, b: usize, t: usize) -> f64 {
    let cfg = model.config();
    let n = (b * t) as f64;
    let mut frozen = (cfg.vocab_size * cfg.hidden_size) as f64; // LM head
    let mut adapter = 0.0;
    for lin in model.linears() {
        let (o, i) = (lin.out_features() as f64, lin.in_features() as f64);
        frozen += o * i;
        if let Some(ad) = &lin.adapter {
            let r = ad.params().iter().find(|p| p.dims().len() == 2).map(|a| a.dims()[0]).unwrap_or(0) as f64;
            adapter += r * (o + i);
        }
    }
    let pairs = (b * cfg.num_attention_heads) as f64 * (t * (t + 1) / 2) as f64;
    let attention = 12.0 * cfg.head_dim as f64 * pairs * cfg.num_hidden_layers as f64;
    4.0 * frozen * n + 6.0 * adapter * n + attention
}

/// VmHWM of this process in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn current_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0). Returns whether it worked.
fn reset_peak_rss() -> bool {
    let before = current_rss_bytes();
    let ok = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    // The reset worked if the high-water mark now sits near the current RSS.
    ok && matches!((peak_rss_bytes(), before), (Some(h), Some(r)) if h <= r + (64 << 20))
}

/// Builds the model of `args` (named shape or checkpoint) with adapters attached.
pub fn build_model(args: &BenchArgs) -> Result<(Box<dyn Model>, String, String, LoraConfig)> {
    let method = parse_method(&args.method, args.k)?;
    let (mut model, name, wdtype) = match (&args.shape, &args.model) {
        (Some(shape), None) => {
            let st = parse_storage(&args.dtype)?;
            let cfg = named_shape(shape)?;
            (random_model(&cfg, st, args.seed)?, shape.clone(), st.name().to_string())
        }
        (None, Some(path)) => {
            let ck = Checkpoint::open(path)?;
            let m = crate::model::load(&ck, DType::F32)?;
            let dt = m.layers.first().map(|l| l.down.weight.dtype()).unwrap_or(m.embed.dtype());
            (m, path.display().to_string(), dt.name().to_string())
        }
        _ => return Err(Error::invalid("bench", "give exactly one of --shape NAME or --model PATH")),
    };
    let lora = LoraConfig { rank: args.rank, alpha: args.alpha, rslora: false, dropout: 0.0 };
    model.attach_adapters(|_| Ok(true), &lora, &method, args.seed.wrapping_add(1))?;
    model.checkpointing = args.checkpointing;
    model.checkpoint_keep = args.checkpoint_keep;
    Ok((Box::new(model), name, wdtype, lora))
}

fn check_args(args: &BenchArgs) -> Result<()> {
    if args.batch == 0 || args.seq_len < 2 {
        return Err(Error::invalid("bench", format!("--batch must be ≥ 1 and --seq-len ≥ 2 (got {} and {})", args.batch, args.seq_len)));
    }
    if args.steps == 0 {
        return Err(Error::invalid("bench", "--steps must be ≥ 1 (the timed steps)"));
    }
    if !(args.lr.is_finite() && args.lr >= 0.0) {
        return Err(Error::invalid("bench", format!("--lr must be finite and ≥ 0, got {}", args.lr)));
    }
    Ok(())
}

/// Runs the benchmark of `args` on its device.
pub fn run(args: &BenchArgs) -> Result<BenchReport> {
    check_args(args)?;
    match args.device.as_str() {
        "cpu" | "cuda" => run_steps(args),
        other => Err(Error::invalid("bench", format!("unknown --device {other:?}; expected cpu or cuda"))),
    }
}

fn run_steps(args: &BenchArgs) -> Result<BenchReport> {
    let device = crate::device::Device::parse(&args.device)?;
    device.ensure_available()?;
    let (mut model, name, weights_dtype, lora) = build_model(args)?;
    if device != crate::device::Device::Cpu {
        // Frozen matrices go up once, as bf16 unless --dtype f32 asked for f32.
        let wdt = if args.dtype == "f32" { DType::F32 } else { DType::BF16 };
        model = model.to_device(device, wdt)?;
        crate::backend::cuda_reset_peak();
    }
    let cfg = model.config().clone();
    let (b, t) = (args.batch, args.seq_len);
    if t > cfg.max_position_embeddings {
        return Err(Error::invalid("bench", format!("--seq-len {t} exceeds the model's max_position_embeddings {}", cfg.max_position_embeddings)));
    }
    let (ids, targets) = bench_batch(cfg.vocab_size, b, t, args.seed);
    let params = model.trainable_params();
    let trainable: usize = params.iter().map(|p| p.numel()).sum();
    let frozen: usize = cfg.expected_weights().iter().map(|(_, d)| d.iter().product::<usize>()).sum();
    let mut opt = AdamW::new(&params, AdamWConfig { lr: args.lr, weight_decay: 0.0, ..AdamWConfig::default() })?;
    let ce = CeOptions::default();
    let setup_peak = peak_rss_bytes().unwrap_or(0);
    crate::memory::release_free_memory();
    let reset = reset_peak_rss();
    let (mut losses, mut times) = (Vec::new(), Vec::new());
    let mut grad_norm = 0.0;
    model.set_training(true, 0);
    for step in 0..args.warmup + args.steps {
        let timed = step >= args.warmup;
        if timed && args.profile && step == args.warmup {
            crate::profile::reset();
            crate::profile::enable(true);
        }
        let t0 = Instant::now();
        model.set_training(true, step as u64);
        let loss = model.loss(&ids, &targets, b, t, None, &ce)?;
        let l = loss.item()?;
        if !l.is_finite() {
            return Err(Error::NonFinite { op: "bench", what: format!("the loss at step {step}") });
        }
        let grads = backward(&loss)?;
        drop(loss);
        {
            let _s = crate::profile::scope("step", "grad_norm");
            grad_norm = grads.iter().map(|(_, g)| g.to_vec_f64().iter().map(|v| v * v).sum::<f64>()).sum::<f64>().sqrt();
        }
        {
            let _s = crate::profile::scope("step", "adamw");
            opt.step(&grads, args.lr)?;
        }
        drop(grads);
        crate::backend::device_synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        losses.push(l);
        if timed {
            times.push(dt);
        }
    }
    crate::profile::enable(false);
    if !(grad_norm.is_finite() && grad_norm > 0.0) {
        return Err(Error::invalid("bench", format!("the adapter gradient norm is {grad_norm}: this run does not train, its timing means nothing")));
    }
    let peak = peak_rss_bytes().unwrap_or(0);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = if sorted.len() % 2 == 1 { sorted[sorted.len() / 2] } else { 0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) };
    let flops = useful_flops(&*model, b, t);
    let profile = args.profile.then(|| {
        let rows = crate::profile::rows();
        let total: f64 = rows.iter().map(|r| r.seconds).sum::<f64>().max(1e-12);
        let n = args.steps as f64;
        rows.iter()
            .map(|r| ProfileRow {
                phase: r.phase,
                op: r.name,
                calls_per_step: r.calls as f64 / n,
                ms_per_step: r.seconds * 1e3 / n,
                percent: 100.0 * r.seconds / total,
                cores: r.cpu_seconds / r.seconds.max(1e-12),
            })
            .collect()
    });
    Ok(BenchReport {
        engine: "spectune",
        model: name,
        method: args.method.clone(),
        rank: lora.rank,
        batch: b,
        seq_len: t,
        tokens_per_step: b * t,
        steps: args.steps,
        warmup: args.warmup,
        weights_dtype,
        checkpointing: args.checkpointing,
        checkpoint_keep: if args.checkpointing { args.checkpoint_keep.min(model.num_layers()) } else { 0 },
        device: args.device.clone(),
        threads: rayon::current_num_threads(),
        matmul_precision: crate::backend::amx::effective_precision().name().to_string(),
        frozen_params: frozen,
        trainable_params: trainable,
        step_time_median_s: median,
        step_times_s: times,
        tokens_per_s: (b * t) as f64 / median,
        useful_flops_per_step: flops,
        useful_flops_per_s: flops / median,
        peak_rss_bytes: peak,
        peak_rss_reset: reset,
        setup_peak_rss_bytes: setup_peak,
        peak_device_bytes: crate::backend::cuda_peak_bytes() as u64,
        grad_norm,
        final_loss: *losses.last().unwrap_or(&f64::NAN),
        losses,
        profile,
    })
}

/// Human-readable report (the JSON object follows on the last line with `--json`).
pub fn print_report(r: &BenchReport, json: bool) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{} {} r{} | {}×{} tokens | weights {} | checkpointing {}{} | {} threads | matmul precision {}",
        r.model,
        r.method,
        r.rank,
        r.batch,
        r.seq_len,
        r.weights_dtype,
        r.checkpointing,
        if r.checkpointing { format!(" (last {} layers kept)", r.checkpoint_keep) } else { String::new() },
        r.threads,
        r.matmul_precision
    );
    println!(
        "median step {:.3} s over {} steps ({} warmup) | {:.0} tokens/s | {:.2} GFLOP/s useful ({:.1} GFLOP/step)",
        r.step_time_median_s,
        r.steps,
        r.warmup,
        r.tokens_per_s,
        r.useful_flops_per_s / 1e9,
        r.useful_flops_per_step / 1e9
    );
    println!(
        "peak RSS {:.0} MiB ({}; setup peak {:.0} MiB) | grad norm {:.4e} | loss {:.4} -> {:.4}",
        mib(r.peak_rss_bytes),
        if r.peak_rss_reset { "during the steps" } else { "whole process" },
        mib(r.setup_peak_rss_bytes),
        r.grad_norm,
        r.losses.first().copied().unwrap_or(f64::NAN),
        r.final_loss
    );
    if r.peak_device_bytes > 0 {
        let blocks = if crate::backend::cuda_emulated() { "exact block sizes: CUDA (emulated)" } else { "rounded allocator blocks" };
        println!("peak device memory {:.0} MiB (spectune's tensors, {blocks})", mib(r.peak_device_bytes));
    }
    if let Some(p) = &r.profile {
        println!("{:<5} {:<22} {:>8} {:>10} {:>6} {:>6}", "phase", "op", "calls", "ms/step", "%", "cores");
        for row in p {
            println!("{:<5} {:<22} {:>8.1} {:>10.1} {:>6.1} {:>6.2}", row.phase, row.op, row.calls_per_step, row.ms_per_step, row.percent, row.cores);
        }
    }
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")));
    }
}

/// Writes the starting point of a bench run into `dir` for the PyTorch twin (benches/peers/):
/// `config.json` + `model.safetensors` (frozen weights, f32 or bf16 as stored; other stored
/// dtypes written as f32), `adapter/` (PEFT layout: lora_A random, lora_B zero), `batch.safetensors`
/// (`input_ids` [b, t] and HF-style `labels` = input_ids, which HF shifts itself; the same
/// targets as spectune's) and `bench.json` (the settings).
pub fn save_init(args: &BenchArgs, dir: &Path) -> Result<()> {
    check_args(args)?;
    if args.method != "lora" {
        return Err(Error::invalid("bench", "--save-init: the PyTorch twin runs PEFT LoRA only (use --method lora)"));
    }
    let (model, name, weights_dtype, lora) = build_model(args)?;
    let io = |e| Error::Io { path: dir.to_path_buf(), source: e };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut cfg_json = crate::peft::export::hf_config_json(model.config());
    cfg_json["torch_dtype"] = json!(if weights_dtype == "bf16" { "bfloat16" } else { "float32" });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg_json).unwrap_or_default()).map_err(io)?;
    // The frozen weights as stored (bf16 stays bf16): the base model the twin loads.
    let tensors: Vec<(String, &Tensor)> = model
        .named_tensors()
        .into_iter()
        .map(|(name, t)| match t {
            crate::model::NamedTensor::Plain(t) => (name, t),
            crate::model::NamedTensor::Linear(l) => (name, &l.weight),
        })
        .collect();
    write_weights(&dir.join("model.safetensors"), &tensors)?;
    crate::peft::io::save_adapter(&*model, &dir.join("adapter"), &lora, &dir.display().to_string())?;
    let (b, t) = (args.batch, args.seq_len);
    let (ids, _) = bench_batch(model.config().vocab_size, b, t, args.seed);
    let ids64: Vec<u8> = ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    let views = vec![
        ("input_ids".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![b, t], &ids64)),
        ("labels".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![b, t], &ids64)),
    ];
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        views.into_iter().map(|(k, v)| v.map(|v| (k, v))).collect::<std::result::Result<_, _>>().map_err(|e| Error::invalid("bench", e.to_string()))?;
    safetensors::tensor::serialize_to_file(views, None, &dir.join("batch.safetensors")).map_err(|e| Error::invalid("bench", e.to_string()))?;
    let settings = json!({
        "model": name, "weights_dtype": weights_dtype, "method": "lora", "rank": lora.rank, "alpha": lora.alpha,
        "batch": b, "seq_len": t, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
        "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "seed": args.seed,
        "targets": model.linears().iter().filter(|l| l.layer() == Some(0)).map(|l| l.module().to_string()).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(&settings).unwrap_or_default()).map_err(io)
}

/// Streams `tensors` into a safetensors file: bf16 tensors as BF16, everything else as F32.
fn write_weights(path: &Path, tensors: &[(String, &Tensor)]) -> Result<()> {
    let io = |e| Error::Io { path: path.to_path_buf(), source: e };
    // Data in name order, the order of the (sorted) header.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].0.cmp(&tensors[b].0));
    let kinds: Vec<bool> = tensors.iter().map(|(_, t)| t.dtype() == DType::BF16).collect();
    let mut header = BTreeMap::new();
    let mut offset = 0usize;
    for &i in &order {
        let (name, t) = &tensors[i];
        let n = t.numel() * if kinds[i] { 2 } else { 4 };
        header.insert(name.clone(), json!({ "dtype": if kinds[i] { "BF16" } else { "F32" }, "shape": t.dims(), "data_offsets": [offset, offset + n] }));
        offset += n;
    }
    let mut hbytes = serde_json::to_vec(&header).map_err(|e| Error::invalid("bench", e.to_string()))?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(hbytes.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&hbytes).map_err(io)?;
    const CHUNK: usize = 1 << 20;
    for i in order {
        let t = tensors[i].1;
        let mut start = 0;
        while start < t.numel() {
            let n = CHUNK.min(t.numel() - start);
            let bytes: Vec<u8> = if kinds[i] {
                let g = t.read();
                match &*g {
                    crate::storage::Storage::Host(HostData::BF16(v)) => v[start..start + n].iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                    _ => {
                        let mut f = vec![0f32; n];
                        g.read_into(start, &mut f);
                        f.iter().flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes()).collect()
                    }
                }
            } else {
                let mut f = vec![0f32; n];
                t.read().read_into(start, &mut f);
                f.iter().flat_map(|x| x.to_le_bytes()).collect()
            };
            w.write_all(&bytes).map_err(io)?;
            start += n;
        }
    }
    w.flush().map_err(io)
}

/// GFLOP/s of an n³ GEMM C = A·Bᵀ (the linear layers' form): f32 B, then B stored as bf16 and
/// converted per tile; both as a frozen weight, so at the process's matmul precision. Median of
/// `reps` runs each.
pub fn gemm_ceiling(n: usize, reps: usize) -> Result<(f64, f64)> {
    if n == 0 {
        return Err(Error::invalid("bench", "--gemm-ceiling needs a size > 0"));
    }
    let a = random_values(1, 0, n * n, -1.0, 1.0, |x| x as f32);
    let b = random_values(1, 1, n * n, -1.0, 1.0, |x| x as f32);
    let b16 = crate::storage::Storage::Host(HostData::BF16(b.iter().map(|&x| bf16::from_f32(x)).collect()));
    let b32 = crate::storage::Storage::Host(HostData::F32(b));
    let mut c = vec![0f32; n * n];
    let flops = 2.0 * (n as f64).powi(3);
    let mut time = |st: &crate::storage::Storage| {
        let mut v: Vec<f64> = (0..reps.max(1))
            .map(|_| {
                let t0 = Instant::now();
                crate::backend::cpu::gemm_frozen(&mut c, &a, st, 0, n, n, n, false, true, 0.0);
                t0.elapsed().as_secs_f64()
            })
            .collect();
        v.sort_by(f64::total_cmp);
        flops / v[v.len() / 2] / 1e9
    };
    Ok((time(&b32), time(&b16)))
}
