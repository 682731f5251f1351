//! The clap flag structs of `train` and `bench`, converted into the library's plain settings
//! structs ([`TrainArgs`], [`BenchArgs`]), so the library does not depend on clap.

use std::path::PathBuf;

use spectune::bench::BenchArgs;
use spectune::peft::registry;
use spectune::train::config::TrainArgs;

/// `--method` values: the names of the method registry (for clap's possible values).
pub fn method_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(registry::METHODS.iter().map(|m| m.name))
}

/// `train --method` help: the registry's names.
fn method_help() -> String {
    format!("{} (default speclora; full: dense fine-tuning of the --targets matrices)", registry::names().replace(", ", " | "))
}

/// `train --help`: one line per method from the registry.
fn method_long_help() -> String {
    format!("The adapter method (default speclora):\n{}", registry::help())
}

/// `spectune train` flags: the fields of [`TrainArgs`] (which the TOML run file also fills).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TrainFlags {
    /// A TOML run file whose keys mirror these flags.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// HF folder or .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training data: .jsonl ({"text"}, {"prompt","completion"} or {"messages"}), .txt, or a folder of .txt.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training examples for evaluation (when no --eval-data).
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// The adapter method (default speclora; full: dense fine-tuning of the --targets matrices).
    #[arg(long, help = method_help(), long_help = method_long_help())]
    pub method: Option<String>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f64>,
    /// SpecLoRA: rows (or singular directions) per weight, clamped to the weight's size.
    #[arg(long)]
    pub k: Option<usize>,
    /// Spectral^A/R: the block of singular triplets to tune (block j = triplets j·r … (j+1)·r − 1);
    /// adapters on different blocks can be fused with `spectune fuse`.
    #[arg(long)]
    pub block: Option<usize>,
    /// SpecLoRA: pick the k rows of largest norm instead of the first k.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub rows_by_norm: Option<bool>,
    /// Which linears get an adapter, as PEFT's `target_modules`: `all-linear` (default: every
    /// linear of the decoder layers), a comma-separated list of module names matched as whole
    /// names or dotted suffixes (`q_proj,v_proj`, `self_attn.qkv_proj`; `q,k,v,o,gate,up,down`
    /// are short for `q_proj`…`down_proj`), or `re:<regex>` matching the whole module path.
    #[arg(long)]
    pub targets: Option<String>,
    /// Linears never adapted (PEFT's `exclude_modules`; the same forms as --targets).
    #[arg(long)]
    pub exclude_modules: Option<String>,
    /// Only these decoder layers get adapters (PEFT's `layers_to_transform`): `0,1,5` or `0-3,8`.
    #[arg(long)]
    pub layers: Option<String>,
    #[arg(long)]
    pub dropout: Option<f64>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub rslora: Option<bool>,
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant | cosine | linear (with --warmup steps of linear warmup).
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Optimizer steps (takes precedence over --epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate every N steps (0 = only at the end).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Save a resumable checkpoint every N steps (0 = only at the end).
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Output folder: adapter, checkpoint/, metrics.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Resume from a checkpoint folder written by an earlier run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Activation checkpointing (recompute each layer in backward).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub checkpointing: Option<bool>,
    /// With checkpointing: the last N layers keep their activations (default 1; more memory,
    /// less recomputation).
    #[arg(long)]
    pub checkpoint_keep: Option<usize>,
    /// cpu | cuda
    #[arg(long)]
    pub device: Option<String>,
}

impl From<TrainFlags> for TrainArgs {
    fn from(f: TrainFlags) -> TrainArgs {
        TrainArgs {
            config: f.config,
            model: f.model,
            data: f.data,
            eval_data: f.eval_data,
            eval_fraction: f.eval_fraction,
            method: f.method,
            rank: f.rank,
            alpha: f.alpha,
            k: f.k,
            block: f.block,
            rows_by_norm: f.rows_by_norm,
            targets: f.targets,
            exclude_modules: f.exclude_modules,
            layers: f.layers,
            dropout: f.dropout,
            rslora: f.rslora,
            lr: f.lr,
            schedule: f.schedule,
            warmup: f.warmup,
            weight_decay: f.weight_decay,
            max_grad_norm: f.max_grad_norm,
            steps: f.steps,
            epochs: f.epochs,
            batch: f.batch,
            grad_accum: f.grad_accum,
            seq_len: f.seq_len,
            seed: f.seed,
            eval_every: f.eval_every,
            save_every: f.save_every,
            out: f.out,
            resume: f.resume,
            checkpointing: f.checkpointing,
            checkpoint_keep: f.checkpoint_keep,
            device: f.device,
            threads: None,
        }
    }
}

/// `spectune bench` flags, converted into [`BenchArgs`].
#[derive(Clone, Debug, clap::Args)]
pub struct BenchFlags {
    /// A named model shape with random frozen weights: smollm2-135m, llama-3.2-1b, llama-3.2-3b,
    /// llama-3.1-8b (or `tiny`, 2 small layers, for tests).
    #[arg(long, conflicts_with = "model")]
    pub shape: Option<String>,
    /// A real checkpoint instead (.gguf file or HF folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// lora | speclora | speclora-svd (the methods the FLOP count and the PyTorch twin cover).
    #[arg(long, default_value = "lora")]
    pub method: String,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// SpecLoRA: rows (or singular directions) per weight.
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Storage dtype of the random frozen weights of a named shape: f32 | bf16 (compute is f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Recompute each decoder layer in the backward instead of keeping its activations.
    #[arg(long)]
    pub checkpointing: bool,
    /// With --checkpointing: the last N layers keep their activations (more memory, less
    /// recomputation).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_keep: usize,
    /// cpu | cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Time every op (forward and backward, by op name) and print the breakdown.
    #[arg(long)]
    pub profile: bool,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the starting point (weights, adapter, batch, settings) for benches/peers/ to DIR and
    /// exit without training.
    #[arg(long)]
    pub save_init: Option<PathBuf>,
    /// Instead of training: time a SIZE³ f32 GEMM and the same GEMM with a bf16-stored right
    /// operand (the frozen-weight path), the ceilings the training figures are fractions of.
    #[arg(long, value_name = "SIZE")]
    pub gemm_ceiling: Option<usize>,
}

impl From<BenchFlags> for BenchArgs {
    fn from(f: BenchFlags) -> BenchArgs {
        BenchArgs {
            shape: f.shape,
            model: f.model,
            method: f.method,
            rank: f.rank,
            alpha: f.alpha,
            k: f.k,
            batch: f.batch,
            seq_len: f.seq_len,
            steps: f.steps,
            warmup: f.warmup,
            dtype: f.dtype,
            checkpointing: f.checkpointing,
            checkpoint_keep: f.checkpoint_keep,
            device: f.device,
            json: f.json,
            profile: f.profile,
            lr: f.lr,
            seed: f.seed,
            save_init: f.save_init,
            gemm_ceiling: f.gemm_ceiling,
        }
    }
}
