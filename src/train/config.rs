//! `spectune train` settings: command-line flags and an optional TOML run file whose keys mirror
//! the flags (`--grad-accum 4` ⇔ `grad-accum = 4`). A flag given on the command line wins over
//! the file; unknown keys in the file are an error naming the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::optim::LrSchedule;
use crate::peft::targets::TargetSpec;
use crate::peft::{LoraConfig, Method, MethodOptions};

/// Every setting of a training run, each optional so the file and the flags can be merged. The
/// keys of the TOML file are these names in kebab case; the CLI's `train` flags convert into it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainArgs {
    /// A TOML run file whose keys mirror these flags.
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HF folder or .gguf file.
    pub model: Option<PathBuf>,
    /// Training data: .jsonl ({"text"}, {"prompt","completion"} or {"messages"}), .txt, or a folder of .txt.
    pub data: Option<PathBuf>,
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training examples for evaluation (when no --eval-data).
    pub eval_fraction: Option<f64>,
    /// lora | speclora | speclora-svd | spectral-a | spectral-r | pissa | milora | dora | full
    /// (full: dense fine-tuning of the --targets matrices).
    pub method: Option<String>,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    /// SpecLoRA: rows (or singular directions) per weight, clamped to the weight's size.
    pub k: Option<usize>,
    /// Spectral^A/R: the block of singular triplets to tune (block j = triplets j·r … (j+1)·r − 1);
    /// adapters on different blocks can be fused with `spectune fuse`.
    pub block: Option<usize>,
    /// SpecLoRA: pick the k rows of largest norm instead of the first k.
    pub rows_by_norm: Option<bool>,
    /// Which linears get an adapter, as PEFT's `target_modules`: `all-linear` (default: every
    /// linear of the decoder layers), a comma-separated list of module names matched as whole
    /// names or dotted suffixes (`q_proj,v_proj`, `self_attn.qkv_proj`; `q,k,v,o,gate,up,down`
    /// are short for `q_proj`…`down_proj`), or `re:<regex>` matching the whole module path.
    pub targets: Option<String>,
    /// Linears never adapted (PEFT's `exclude_modules`; the same forms as `targets`).
    pub exclude_modules: Option<String>,
    /// Only these decoder layers get adapters (PEFT's `layers_to_transform`): `0,1,5` or `0-3`.
    pub layers: Option<String>,
    pub dropout: Option<f64>,
    pub rslora: Option<bool>,
    pub lr: Option<f64>,
    /// constant | cosine | linear (with --warmup steps of linear warmup).
    pub schedule: Option<String>,
    pub warmup: Option<u64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    /// Optimizer steps (takes precedence over --epochs).
    pub steps: Option<u64>,
    pub epochs: Option<f64>,
    /// Sequences per micro-batch.
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step.
    pub grad_accum: Option<usize>,
    pub seq_len: Option<usize>,
    pub seed: Option<u64>,
    /// Evaluate every N steps (0 = only at the end).
    pub eval_every: Option<u64>,
    /// Save a resumable checkpoint every N steps (0 = only at the end).
    pub save_every: Option<u64>,
    /// Output folder: adapter, checkpoint/, metrics.jsonl.
    pub out: Option<PathBuf>,
    /// Resume from a checkpoint folder written by an earlier run.
    pub resume: Option<PathBuf>,
    /// Activation checkpointing (recompute each layer in backward).
    pub checkpointing: Option<bool>,
    /// With checkpointing: the last N layers keep their activations (default 1; more memory,
    /// less recomputation).
    pub checkpoint_keep: Option<usize>,
    /// Worker threads (on the command line this is spectune's global `--threads`).
    pub threads: Option<usize>,
    /// cpu | cuda
    pub device: Option<String>,
}

macro_rules! merge_fields {
    ($cli:expr, $file:expr, $($f:ident),*) => {
        TrainArgs { config: $cli.config.clone(), $($f: $cli.$f.clone().or_else(|| $file.$f.clone())),* }
    };
}

impl TrainArgs {
    /// Reads a TOML run file.
    pub fn from_toml_file(path: &Path) -> Result<TrainArgs> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        toml::from_str(&text).map_err(|e| Error::Format { path: path.to_path_buf(), msg: e.to_string() })
    }

    /// Flags given on the command line win over the run file.
    pub fn merged_over(&self, file: &TrainArgs) -> TrainArgs {
        merge_fields!(
            self,
            file,
            model,
            data,
            eval_data,
            eval_fraction,
            method,
            rank,
            alpha,
            k,
            block,
            rows_by_norm,
            targets,
            exclude_modules,
            layers,
            dropout,
            rslora,
            lr,
            schedule,
            warmup,
            weight_decay,
            max_grad_norm,
            steps,
            epochs,
            batch,
            grad_accum,
            seq_len,
            seed,
            eval_every,
            save_every,
            out,
            resume,
            checkpointing,
            checkpoint_keep,
            threads,
            device
        )
    }

    /// The run file (if `--config` was given) merged under the flags, then resolved.
    pub fn resolve(&self) -> Result<TrainSettings> {
        let merged = match &self.config {
            Some(p) => self.merged_over(&TrainArgs::from_toml_file(p)?),
            None => self.clone(),
        };
        merged.settings()
    }

    fn settings(&self) -> Result<TrainSettings> {
        let bad = |key: &str, msg: String| Error::invalid("train", format!("--{key}: {msg}"));
        let model = self.model.clone().ok_or_else(|| bad("model", "required (an HF folder or a .gguf file)".into()))?;
        let data = self.data.clone().ok_or_else(|| bad("data", "required (.jsonl, .txt or a folder of .txt)".into()))?;
        let rank = self.rank.unwrap_or(16);
        let k = self.k.unwrap_or(200);
        let method = Method::parse(
            self.method.as_deref().unwrap_or("speclora"),
            MethodOptions { k, by_norm: self.rows_by_norm.unwrap_or(false), block: self.block },
            "train",
        )?;
        let targets = target_spec(self.targets.as_deref(), self.exclude_modules.as_deref(), self.layers.as_deref())?;
        let dropout = self.dropout.unwrap_or(0.0);
        if !(0.0..1.0).contains(&dropout) {
            return Err(bad("dropout", format!("must be in [0, 1), got {dropout}")));
        }
        let lr = self.lr.unwrap_or(2e-4);
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(bad("lr", format!("must be finite and > 0, got {lr}")));
        }
        let steps = self.steps;
        let warmup = self.warmup.unwrap_or(0);
        let batch = self.batch.unwrap_or(4).max(1);
        let grad_accum = self.grad_accum.unwrap_or(1).max(1);
        let seq_len = self.seq_len.unwrap_or(256);
        if seq_len < 2 {
            return Err(bad("seq-len", format!("must be at least 2, got {seq_len}")));
        }
        let device = crate::device::Device::parse(self.device.as_deref().unwrap_or("cpu")).map_err(|e| bad("device", e.to_string()))?;
        device.ensure_available().map_err(|e| bad("device", e.to_string()))?;
        if let Some(f) = self.eval_fraction {
            if !(0.0..1.0).contains(&f) {
                return Err(bad("eval-fraction", format!("must be in [0, 1), got {f}")));
            }
        }
        Ok(TrainSettings {
            model,
            data,
            eval_data: self.eval_data.clone(),
            eval_fraction: self.eval_fraction,
            method,
            lora: LoraConfig { rank, alpha: self.alpha.unwrap_or(2.0 * rank as f64), rslora: self.rslora.unwrap_or(false), dropout },
            targets,
            lr,
            schedule_name: self.schedule.clone().unwrap_or_else(|| "cosine".into()),
            warmup,
            weight_decay: self.weight_decay.unwrap_or(0.0),
            max_grad_norm: self.max_grad_norm.or(Some(1.0)).filter(|m| *m > 0.0),
            steps,
            epochs: self.epochs.unwrap_or(1.0),
            batch,
            grad_accum,
            seq_len,
            seed: self.seed.unwrap_or(0),
            eval_every: self.eval_every.unwrap_or(0),
            save_every: self.save_every.unwrap_or(0),
            out: self.out.clone().unwrap_or_else(|| PathBuf::from("spectune-out")),
            resume: self.resume.clone(),
            checkpointing: self.checkpointing.unwrap_or(false),
            checkpoint_keep: self.checkpoint_keep.unwrap_or(1),
            device,
            threads: self.threads,
        })
    }
}

/// The adapter targets of `--targets`, `--exclude-modules` and `--layers` (see [`TrainArgs`]).
pub fn target_spec(targets: Option<&str>, exclude: Option<&str>, layers: Option<&str>) -> Result<TargetSpec> {
    let base = match targets {
        Some(s) => TargetSpec::parse(s)?,
        None => TargetSpec::parse("all-linear")?,
    };
    let exclude = exclude.map(|e| TargetSpec::parse(e).map(|s| s.modules)).transpose()?;
    let layers = layers.map(parse_layers).transpose()?;
    let pattern = layers.as_ref().map(|_| "layers".to_string());
    TargetSpec::new(base.modules, exclude, layers, pattern)
}

/// `0,1,5` or `0-3` (ranges inclusive, combinable: `0-3,8`).
fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let bad = || Error::invalid("train", format!("--layers `{s}`: expected layer indices like 0,1,5 or 0-3"));
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                v.extend(a..=b);
            }
            None => v.push(part.parse().map_err(|_| bad())?),
        }
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Resolved settings with defaults filled in.
#[derive(Clone, Debug)]
pub struct TrainSettings {
    pub model: PathBuf,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub eval_fraction: Option<f64>,
    pub method: Method,
    pub lora: LoraConfig,
    pub targets: TargetSpec,
    pub lr: f64,
    pub schedule_name: String,
    pub warmup: u64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub steps: Option<u64>,
    pub epochs: f64,
    pub batch: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub eval_every: u64,
    pub save_every: u64,
    pub out: PathBuf,
    pub resume: Option<PathBuf>,
    pub checkpointing: bool,
    /// Final layers that keep their activations under checkpointing.
    pub checkpoint_keep: usize,
    /// Where the step runs; on `cuda` frozen matrices are uploaded once as bf16.
    pub device: crate::device::Device,
    pub threads: Option<usize>,
}

impl TrainSettings {
    /// The settings `spectune train --model model --data data` resolves to (all defaults).
    pub fn defaults(model: PathBuf, data: PathBuf) -> TrainSettings {
        TrainArgs { model: Some(model), data: Some(data), ..TrainArgs::default() }.settings().expect("the defaults are valid")
    }

    /// The LR schedule over `total` steps.
    pub fn schedule(&self, total: u64) -> Result<LrSchedule> {
        match self.schedule_name.as_str() {
            "constant" if self.warmup == 0 => Ok(LrSchedule::Constant),
            "constant" => Ok(LrSchedule::WarmupLinear { warmup: self.warmup, total: u64::MAX, min_ratio: 1.0 }),
            "cosine" => Ok(LrSchedule::WarmupCosine { warmup: self.warmup, total, min_ratio: 0.0 }),
            "linear" => Ok(LrSchedule::WarmupLinear { warmup: self.warmup, total, min_ratio: 0.0 }),
            other => Err(Error::invalid("train", format!("--schedule: unknown schedule `{other}` (constant, cosine, linear)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<TrainArgs> {
        toml::from_str(text).map_err(|e| Error::Format { path: PathBuf::from("run.toml"), msg: e.to_string() })
    }

    #[test]
    fn checkpoint_keep_comes_from_the_file_or_the_flag_and_defaults_to_one() {
        let base = TrainArgs { model: Some("m".into()), data: Some("d".into()), ..TrainArgs::default() };
        assert_eq!(base.settings().unwrap().checkpoint_keep, 1);
        let f = file("checkpointing = true\ncheckpoint-keep = 3\n").unwrap();
        let s = base.merged_over(&f).settings().unwrap();
        assert!(s.checkpointing);
        assert_eq!(s.checkpoint_keep, 3);
        let cli = TrainArgs { checkpoint_keep: Some(5), ..base.clone() };
        assert_eq!(cli.merged_over(&f).settings().unwrap().checkpoint_keep, 5, "the flag wins over the file");
        let err = file("checkpoint-kept = 3\n").unwrap_err().to_string();
        assert!(err.contains("checkpoint-kept"), "{err}");
    }
}
