//! Export to plain PEFT LoRA or a llama.cpp LoRA GGUF, and merging adapters into an HF
//! checkpoint or a GGUF.
//!
//! ## SpecLoRA as a plain LoRA ([`export_peft_lora`])
//!
//! Every SpecLoRA update is exactly a low-rank update of the frozen weight, so it can be written
//! as a LoRA that stock PEFT loads:
//!
//! - positional / row-norm SpecLoRA: (Γ⊙W) − W = Σ_j (d_j − 1)·e_{i_j}·W[i_j, :] is rank k, with
//!   E = [e_{i_1} … e_{i_k}] the one-hot columns of the selected rows;
//! - SpecLoRA-SVD: U·diag((d − 1)⊙σ)·Vᵀ is rank k.
//!
//! With the adapter's own LoRA (scale s, A [r, in], B [out, r]) and the common scale s' of the
//! export, the module becomes a LoRA of rank r + k:
//!
//! ```text
//!   A' = [ A ; (d−1)⊙W[idx, :] / s' ]        (rows; SVD: diag((d−1)⊙σ)·Vᵀ / s')
//!   B' = [ B·(s/s') | E ]                      (columns; SVD: U)
//!   s'·B'A' = s·BA + ΔW                        exactly (in f64, then stored as f32)
//! ```
//!
//! The export keeps s' = s (so `lora_alpha' = s·r'`, `use_rslora = false`): A and B are written
//! unchanged, only the k new rows/columns are added. The W rows are read from the frozen weight
//! in whatever dtype it is stored (f32, bf16, f16, GGUF-quantized), converted exactly to f64.
//!
//! **Uniform rank.** PEFT's `r` is one number per adapter unless `rank_pattern` overrides it per
//! module. k differs between modules only where it was clamped (to the row count, or to
//! min(out, in) for the SVD form), e.g. k = 64 on a k_proj with 32 rows. Instead of a
//! `rank_pattern`, every module is zero-padded to the largest rank R = r + max k: the padding
//! adds zero rows to A' and zero columns to B', which changes nothing in the output, loads in
//! every PEFT version (and in tools that ignore `rank_pattern`, e.g. vLLM), and in spectune's own
//! [`load_adapter`](crate::peft::io::load_adapter), which rejects `rank_pattern`. The cost is
//! (R − r − k_m)·(in + out) stored zeros on the clamped modules only. (If the exported LoRA is
//! trained further, those padded directions stay at zero: both factors are zero there.)
//! `rank_pattern` and `alpha_pattern` are written as empty objects.
//!
//! Only keys that PEFT's `LoraConfig` has had since 0.7 are written (older PEFT versions refuse
//! unknown keys). Provenance (method, original rank, k per module) goes into the safetensors
//! metadata instead, which PEFT ignores. LoRA dropout is copied; note that in PEFT it would
//! also apply to the k exported directions when training further (not at inference).
//!
//! ## PiSSA, MiLoRA and the Spectral methods
//!
//! Their updates are exact low-rank products ([`LinearAdapter::delta_factors`]), exported at the common
//! scale s' (the LoRA scale; 1 for the Spectral methods, which have none):
//!
//! ```text
//!   PiSSA / MiLoRA:  s·B·A − s·B0·A0  = s·[B | −B0]·[A ; A0]                 rank 2r
//!   Spectral^A:      ΔU·Σ·(V+ΔV)ᵀ + U·Σ·ΔVᵀ = [ΔU | U]·[Σ(V+ΔV)ᵀ ; Σ·ΔVᵀ]  rank 2r
//!   Spectral^R:      U·(R_U·diag(c⊙σ)·R_Vᵀ − Σ)·Vᵀ = U·(M·Vᵀ)                  rank r
//! ```
//!
//! so they load on the unmodified base. DoRA (a row rescaling of W + s·B·A) and full
//! fine-tuning are not low-rank: the export refuses them (DoRA's own folder is a stock PEFT DoRA
//! adapter; both merge).
//!
//! ## Merging ([`merge_to_hf`], [`write_tokenizer`], [`merge_report`], [`merge_checkpoint`])
//!
//! [`merge_to_hf`] writes an HF folder: `config.json` (LlamaForCausalLM, or Qwen2ForCausalLM when
//! q/k/v carry a bias) and `model.safetensors` with every weight in f32: adapted linears replaced
//! by [`LinearAdapter::merged_weight`], bf16/f16/quantized weights dequantized. The safetensors file is
//! streamed one tensor at a time into a temporary file (fsync, rename), so peak memory is one
//! weight, not the model. [`write_tokenizer`] copies an HF folder's tokenizer files, or, for a
//! GGUF source, writes the tokenizer rebuilt from the GGUF vocabulary as `tokenizer.json` plus a
//! `tokenizer_config.json` with the chat template and BOS/EOS tokens. [`merge_report`] reloads
//! the folder and returns the largest |Δlogit| against the adapted model on a probe batch.
//!
//! ## Out to llama.cpp ([`export_gguf_lora`], [`merge_to_gguf`])
//!
//! The same plain-LoRA factors, written as llama.cpp's LoRA adapter GGUF (`.lora_a` [R, in],
//! `.lora_b` [out, R] per base tensor, `adapter.lora.alpha` = s'·R); and a merged model written as
//! a GGUF carrying its GGUF source's metadata and tokenizer. For llama/mistral GGUFs the q/k rows
//! (of `lora_b`, of the merged weight) are put in llama.cpp's RoPE row order.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::{DecoderConfig, Model, NamedTensor};
use crate::nn::Linear;
use crate::peft::io::{write_atomic, CONFIG_FILE, WEIGHTS_FILE};
use crate::peft::{LinearAdapter, LoraConfig, LoraFactors};
use crate::tokenizer::Tokenizer;

/// The formats `spectune export --format` produces: [`export_peft_lora`], [`export_gguf_lora`].
pub const EXPORT_FORMATS: [&str; 2] = ["peft-lora", "gguf-lora"];

/// What [`export_adapter_dir`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// An HF PEFT LoRA folder ([`export_peft_lora`]).
    PeftLora,
    /// A llama.cpp LoRA adapter GGUF file ([`export_gguf_lora`]).
    GgufLora,
}

/// What [`export_peft_lora`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSummary {
    /// The original LoRA rank r (for PiSSA/MiLoRA and the Spectral methods: the rank of the
    /// first module's exact update factors, 2r or r).
    pub lora_rank: usize,
    /// The exported uniform rank R = r + max k (= r for plain LoRA).
    pub rank: usize,
    /// `lora_alpha` of the exported config (R · s, so that α/R is the original scale).
    pub lora_alpha: f64,
    /// Modules (layer × target) written.
    pub modules: usize,
    /// Modules whose rank r + k is below R and were zero-padded.
    pub padded_modules: usize,
    /// The method's name ([`Method::name`](crate::peft::Method::name)).
    pub method: &'static str,
}

/// Writes the adapters of `model_with_adapters` into `out` as a plain HF PEFT LoRA (rank
/// r + max k, zero-padded where k was clamped; see the module docs) that stock PEFT and
/// [`load_adapter`](crate::peft::io::load_adapter) load as LoRA, reproducing the adapted model's
/// outputs. `lora` supplies the dropout recorded in the config; `base` is recorded as
/// `base_model_name_or_path`.
pub fn export_peft_lora(model_with_adapters: &dyn Model, out: &Path, lora: &LoraConfig, base: &str) -> Result<ExportSummary> {
    const OP: &str = "export_peft_lora";
    let p = plain_lora(model_with_adapters, OP)?;
    let le = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect() };
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for m in &p.mods {
        tensors.insert(format!("{}.lora_A.weight", m.prefix), (vec![p.rank, m.in_f], le(&m.a)));
        tensors.insert(format!("{}.lora_B.weight", m.prefix), (vec![m.out_f, p.rank], le(&m.b)));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes))| TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (k.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::invalid(OP, format!("{e}")))?;
    let metadata: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string()), ("spectune_export".to_string(), p.provenance().to_string())].into_iter().collect();
    let bytes = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| Error::invalid(OP, format!("{e}")))?;
    let lora_alpha = p.lora_alpha();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": p.rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": false,
        "bias": "none",
        "target_modules": p.targets,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.to_path_buf(), source: e })?;
    write_atomic(&out.join(WEIGHTS_FILE), &bytes)?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::invalid(OP, e.to_string()))?;
    write_atomic(&out.join(CONFIG_FILE), text.as_bytes())?;
    Ok(p.summary())
}

/// One module of a [`PlainLora`]: A' [R, in] and B' [out, R], row-major, zero-padded to R.
struct PlainModule {
    /// The module path (`model.layers.3.self_attn.q_proj`).
    path: String,
    /// The PEFT module name (`base_model.model.model.layers.3.self_attn.q_proj`).
    prefix: String,
    out_f: usize,
    in_f: usize,
    a: Vec<f64>,
    b: Vec<f64>,
}

/// The adapted model's update as one plain LoRA of uniform rank R at scale s' (module docs):
/// W' = W + s'·B'·A' on every module.
struct PlainLora {
    mods: Vec<PlainModule>,
    rank: usize,
    lora_rank: usize,
    s_common: f64,
    first_scale: f64,
    method: &'static str,
    padded_modules: usize,
    targets: Vec<String>,
    ks: BTreeMap<String, usize>,
}

impl PlainLora {
    /// α' = s'·R, so that α'/R = s'.
    fn lora_alpha(&self) -> f64 {
        self.s_common * self.rank as f64
    }
    fn provenance(&self) -> Value {
        json!({
            "method": self.method,
            "lora_rank": self.lora_rank,
            "lora_scale": self.first_scale,
            "k": self.ks,
            "version": env!("CARGO_PKG_VERSION"),
        })
    }
    fn summary(&self) -> ExportSummary {
        ExportSummary {
            lora_rank: self.lora_rank,
            rank: self.rank,
            lora_alpha: self.lora_alpha(),
            modules: self.mods.len(),
            padded_modules: self.padded_modules,
            method: self.method,
        }
    }
}

/// Collects every adapted linear of `model` as a [`PlainLora`].
fn plain_lora(model: &dyn Model, op: &'static str) -> Result<PlainLora> {
    let adapted: Vec<(&Linear, &dyn LinearAdapter)> = model.linears().into_iter().filter_map(|l| l.adapter.as_deref().map(|ad| (l, ad))).collect();
    let Some(&(_, first)) = adapted.first() else {
        return Err(Error::invalid(op, "the model has no adapters attached"));
    };
    // The Spectral methods have no LoRA scale: their factors are exported at scale 1.
    let first_scale = first.scale().unwrap_or(1.0);
    // s' = the adapters' own scale (A and B unchanged); 1 if that is 0 (the LoRA part is zero).
    let s_common = if first_scale.is_finite() && first_scale != 0.0 { first_scale } else { 1.0 };
    let mut method = "lora";
    let mut mods: Vec<(String, String, usize, usize, LoraFactors)> = Vec::with_capacity(adapted.len());
    let mut targets: Vec<String> = Vec::new();
    let mut ks: BTreeMap<String, usize> = BTreeMap::new();
    for &(lin, ad) in &adapted {
        let name = ad.method().name();
        if name != "lora" {
            method = name;
        }
        if !targets.iter().any(|t| t == lin.module()) {
            targets.push(lin.module().to_string());
        }
        let f = ad.lora_factors(&lin.weight, s_common)?;
        let p = crate::peft::io::module_prefix(lin);
        ks.insert(p.clone(), f.rk - f.r);
        mods.push((lin.path.clone(), p, lin.out_features(), lin.in_features(), f));
    }
    let lora_rank = mods[0].4.r;
    // One LoRA rank per adapter for the methods with a LoRA part (their k directions may vary);
    // the update-factor methods (PiSSA, Spectral) may have per-module ranks (clamped r), padded.
    let has_lora_part = mods.iter().all(|m| m.4.uniform_r);
    if let Some(m) = mods.iter().filter(|_| has_lora_part).find(|m| m.4.r != lora_rank) {
        return Err(Error::invalid(op, format!("{}: LoRA rank {} differs from {} (one rank per adapter)", m.1, m.4.r, lora_rank)));
    }
    let rank = mods.iter().map(|m| m.4.rk).max().unwrap_or(lora_rank);
    let mut padded_modules = 0;
    let mut out_mods = Vec::with_capacity(mods.len());
    for (path, prefix, out_f, in_f, f) in mods {
        if f.rk < rank {
            padded_modules += 1;
        }
        // A' [R, in]: the rk rows, then zero rows.
        let mut a = f.a.clone();
        a.resize(rank * in_f, 0.0);
        // B' [out, R]: the rk columns of each row, then zeros.
        let mut b = vec![0.0f64; out_f * rank];
        for i in 0..out_f {
            b[i * rank..i * rank + f.rk].copy_from_slice(&f.b[i * f.rk..(i + 1) * f.rk]);
        }
        out_mods.push(PlainModule { path, prefix, out_f, in_f, a, b });
    }
    Ok(PlainLora { mods: out_mods, rank, lora_rank, s_common, first_scale, method, padded_modules, targets, ks })
}

/// The llama.cpp tensor name of the linear at module `path` in `cfg`'s family layout
/// (`blk.3.attn_q.weight`; Phi-3's `qkv_proj` → `blk.3.attn_qkv.weight`).
fn gguf_weight_name(cfg: &DecoderConfig, path: &str, op: &'static str) -> Result<String> {
    let family = crate::model::gguf::family_of(cfg);
    crate::model::gguf::hf_to_gguf_name(family, &format!("{path}.weight"))
        .ok_or_else(|| Error::invalid(op, format!("module {path} has no llama.cpp tensor name in the {} layout", family.name)))
}

/// The llama.cpp row order of a q/k projection's output rows for `heads` heads: `perm[hf_row]`
/// = the GGUF row (see [`crate::io::gguf::unpermute_qk_rows`]); `None` when the converter of
/// architecture `arch` does not permute (see [`crate::model::gguf::arch_permutes_qk`]) or the
/// module is not q/k.
fn qk_permutation(arch: &str, cfg: &DecoderConfig, path: &str, rows: usize, op: &'static str) -> Result<Option<Vec<u32>>> {
    if !crate::model::gguf::arch_permutes_qk(arch) {
        return Ok(None);
    }
    let heads = match path.rsplit('.').next() {
        Some("q_proj") => cfg.num_attention_heads,
        Some("k_proj") => cfg.num_key_value_heads,
        _ => return Ok(None),
    };
    crate::io::gguf::unpermute_qk_rows(rows, heads)
        .map(Some)
        .ok_or_else(|| Error::invalid(op, format!("{} rows of {path} do not split into {heads} heads of an even size", rows)))
}

/// Writes the adapters of `model_with_adapters` as a llama.cpp LoRA adapter GGUF at `out`, the
/// layout of llama.cpp's own LoRA-to-GGUF converter, which `llama-cli`/`llama-perplexity --lora`
/// load on the base GGUF:
///
/// - metadata `general.architecture = arch` (the base model's llama.cpp architecture, which
///   llama.cpp checks), `general.type = "adapter"`, `adapter.type = "lora"`,
///   `adapter.lora.alpha` (f32) = s'·R, so llama.cpp's scale α/R is the adapter's scale s';
/// - per adapted linear, `blk.N.<name>.weight.lora_a` (shape [R, in], GGUF ne = [in, R]) and
///   `….lora_b` ([out, R]), f32: the same exact rank-R factors as [`export_peft_lora`] (SpecLoRA
///   as rank r + k, PiSSA/MiLoRA/Spectral^A as 2r, …);
/// - for architectures whose GGUF weights have llama.cpp's q/k row permutation (llama, mistral),
///   the rows of q's and k's `lora_b` are permuted the same way, since ΔW's rows are B's rows.
pub fn export_gguf_lora(model_with_adapters: &dyn Model, out: &Path, arch: &str, base: &str) -> Result<ExportSummary> {
    const OP: &str = "export_gguf_lora";
    use crate::io::gguf::GgufValue as V;
    use crate::io::gguf_write::{write_gguf, GgmlType, TensorSpec};
    let p = plain_lora(model_with_adapters, OP)?;
    let cfg = &model_with_adapters.config();
    let mut specs = Vec::with_capacity(2 * p.mods.len());
    let mut perms = Vec::with_capacity(p.mods.len());
    for m in &p.mods {
        let name = gguf_weight_name(cfg, &m.path, OP)?;
        specs.push(TensorSpec { name: format!("{name}.lora_a"), dims: vec![p.rank, m.in_f], ty: GgmlType::F32 });
        specs.push(TensorSpec { name: format!("{name}.lora_b"), dims: vec![m.out_f, p.rank], ty: GgmlType::F32 });
        perms.push(qk_permutation(arch, cfg, &m.path, m.out_f, OP)?);
    }
    let metadata: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.to_string())),
        ("general.type".into(), V::String("adapter".into())),
        ("general.name".into(), V::String(format!("{} adapter exported by spectune {}", p.method, env!("CARGO_PKG_VERSION")))),
        ("general.base_model.0.name".into(), V::String(base.to_string())),
        ("adapter.type".into(), V::String("lora".into())),
        ("adapter.lora.alpha".into(), V::F32(p.lora_alpha() as f32)),
        ("spectune.export".into(), V::String(p.provenance().to_string())),
    ];
    write_gguf(out, &metadata, &specs, |i| {
        let m = &p.mods[i / 2];
        let vals: Vec<f32> = if i % 2 == 0 {
            m.a.iter().map(|&x| x as f32).collect()
        } else {
            match &perms[i / 2] {
                None => m.b.iter().map(|&x| x as f32).collect(),
                Some(perm) => {
                    let mut v = vec![0.0f32; m.b.len()];
                    for (hf_row, &g) in perm.iter().enumerate() {
                        let (src, dst) = (hf_row * p.rank, g as usize * p.rank);
                        for q in 0..p.rank {
                            v[dst + q] = m.b[src + q] as f32;
                        }
                    }
                    v
                }
            }
        };
        if let Some(j) = vals.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { op: OP, what: format!("{} element {j}", specs[i].name) });
        }
        GgmlType::F32.encode(&vals, *specs[i].dims.last().unwrap_or(&1))
    })?;
    Ok(p.summary())
}

/// The llama.cpp architecture of a checkpoint: a GGUF's `general.architecture`, else the one
/// llama.cpp's converter writes for the config's family (`llama` for Llama and Mistral, `qwen2`,
/// `qwen3`, `gemma2`, `gemma3`, `phi3`).
pub fn llama_cpp_arch(ck: &Checkpoint, cfg: &DecoderConfig) -> Result<String> {
    if let Checkpoint::Gguf(g) = ck {
        return Ok(g.architecture()?.to_string());
    }
    Ok(crate::model::gguf::family_of(cfg).gguf_arch.unwrap_or("llama").to_string())
}

/// Reads `base_model_name_or_path` from an adapter folder's config (None when absent or empty).
pub fn adapter_base_model(adapter_dir: &Path) -> Result<Option<String>> {
    let p = adapter_dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::Io { path: p.clone(), source: e })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Format { path: p.clone(), msg: format!("not valid JSON: {e}") })?;
    Ok(v.get("base_model_name_or_path").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string))
}

/// `spectune export`: loads `model_path` (or, when None, the adapter's recorded
/// `base_model_name_or_path` if that is a local path), applies the adapter in `adapter_dir` and
/// exports it with [`export_peft_lora`]. The base model is needed because positional SpecLoRA's
/// exported rows are rows of the frozen weight.
///
/// [`ExportFormat::GgufLora`] writes the file `out` with [`export_gguf_lora`] instead, for the
/// base's llama.cpp architecture ([`llama_cpp_arch`]).
pub fn export_adapter_dir(adapter_dir: &Path, model_path: Option<&Path>, out: &Path, format: ExportFormat) -> Result<ExportSummary> {
    let recorded = adapter_base_model(adapter_dir)?;
    let path: PathBuf = match (model_path, &recorded) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(r)) if Path::new(r).exists() => PathBuf::from(r),
        (None, r) => {
            return Err(Error::invalid(
                "spectune export",
                format!(
                    "the base model is needed (SpecLoRA's rows come from its weights); the adapter records {} which is not a local path: pass --model PATH",
                    r.as_deref().map(|s| format!("{s:?}")).unwrap_or_else(|| "no base model".into())
                ),
            ))
        }
    };
    let ck = Checkpoint::open(&path)?;
    let mut model = crate::model::load(&ck, DType::F32)?;
    let lora = crate::peft::io::load_adapter(&mut model, adapter_dir)?;
    let base = recorded.unwrap_or_else(|| path.display().to_string());
    match format {
        ExportFormat::PeftLora => export_peft_lora(&model, out, &lora, &base),
        ExportFormat::GgufLora => {
            let arch = llama_cpp_arch(&ck, model.config())?;
            export_gguf_lora(&model, out, &arch, &base)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Merging
// ---------------------------------------------------------------------------------------------

/// File name of the merged weights.
pub const MERGED_WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the merged model's config.
pub const MERGED_CONFIG_FILE: &str = "config.json";

/// The HF `config.json` of `cfg`: the source's own when it came from an HF folder (every key
/// kept, the dtype set to the f32 a merge writes), else its family's writer
/// ([`crate::model::families`]). Parses back to `cfg`'s switches.
pub fn hf_config_json(cfg: &DecoderConfig) -> Value {
    crate::model::families::config_json(cfg)
}

/// Where one merged tensor's values come from.
type Source<'a> = NamedTensor<'a>;

fn source_dims(src: &Source<'_>) -> Vec<usize> {
    match src {
        Source::Plain(t) => t.dims().to_vec(),
        Source::Linear(l) => l.weight.dims().to_vec(),
    }
}

fn source_values(src: &Source<'_>) -> Result<Vec<f32>> {
    match src {
        Source::Plain(t) => Ok(t.to_vec_f32()),
        Source::Linear(l) => match &l.adapter {
            Some(ad) => Ok(ad.merged_weight(&l.weight)?.into_iter().map(|x| x as f32).collect()),
            None => Ok(l.weight.to_vec_f32()),
        },
    }
}

/// Every tensor of the merged checkpoint, with its HF name, in file order.
fn merged_tensors(model: &dyn Model) -> Vec<(String, Source<'_>)> {
    model.named_tensors()
}

/// Streams a safetensors file (all F32) to `path` atomically: temp file, fsync, rename.
fn write_safetensors_streamed(path: &Path, tensors: &[(String, Source<'_>)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!(metadata));
    let mut offset = 0usize;
    for (name, src) in tensors {
        let dims = source_dims(src);
        let n = dims.iter().product::<usize>() * 4;
        header.insert(name.clone(), json!({ "dtype": "F32", "shape": dims, "data_offsets": [offset, offset + n] }));
        offset += n;
    }
    let mut hbytes = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::invalid("merge_to_hf", e.to_string()))?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    crate::io::write_atomically(path, |w, tio| {
        w.write_all(&(hbytes.len() as u64).to_le_bytes()).map_err(tio)?;
        w.write_all(&hbytes).map_err(tio)?;
        for (name, src) in tensors {
            let vals = source_values(src)?;
            if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFinite { op: "merge_to_hf", what: format!("{name} element {i}") });
            }
            let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_all(&bytes).map_err(tio)?;
        }
        Ok(())
    })
}

/// Writes `model` (adapters merged in, every weight in f32) as an HF folder `out` (created if
/// needed): `model.safetensors` and `config.json`, both written atomically. Tokenizer files are
/// written separately by [`write_tokenizer`].
pub fn merge_to_hf(model: &dyn Model, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.to_path_buf(), source: e })?;
    let tensors = merged_tensors(model);
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("spectune".to_string(), format!("merged by spectune {}", env!("CARGO_PKG_VERSION")));
    write_safetensors_streamed(&out.join(MERGED_WEIGHTS_FILE), &tensors, &meta)?;
    let text = serde_json::to_string_pretty(&hf_config_json(model.config())).map_err(|e| Error::invalid("merge_to_hf", e.to_string()))?;
    write_atomic(&out.join(MERGED_CONFIG_FILE), text.as_bytes())
}

/// Tokenizer-related files copied from an HF model folder when present.
pub const TOKENIZER_FILES: [&str; 10] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
];

/// Writes the tokenizer of the model at `source` into `out`; returns the file names written.
///
/// - `source` an HF folder or a `.safetensors` file in one: the [`TOKENIZER_FILES`] present
///   there are copied (atomically).
/// - `source` a `.gguf` file: `tok` (the tokenizer rebuilt from its vocabulary) is written as
///   `tokenizer.json`, with a `tokenizer_config.json` (`tokenizer_class`
///   PreTrainedTokenizerFast, `bos_token`, `eos_token`, `chat_template`) and a
///   `generation_config.json` (`bos_token_id`, `eos_token_id`).
pub fn write_tokenizer(source: &Path, tok: &Tokenizer, out: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.to_path_buf(), source: e })?;
    let mut written = Vec::new();
    if source.extension().is_some_and(|e| e == "gguf") {
        let json = tok.inner().to_string(true).map_err(|e| Error::invalid("write_tokenizer", format!("cannot serialize the tokenizer: {e}")))?;
        write_atomic(&out.join("tokenizer.json"), json.as_bytes())?;
        written.push("tokenizer.json".to_string());
        let mut cfg = serde_json::Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(b) = tok.bos_token() {
            cfg.insert("bos_token".into(), json!(b));
        }
        if let Some(e) = tok.eos_token() {
            cfg.insert("eos_token".into(), json!(e));
        }
        if let Some(t) = tok.chat_template() {
            cfg.insert("chat_template".into(), json!(t));
        }
        let text = serde_json::to_string_pretty(&Value::Object(cfg)).map_err(|e| Error::invalid("write_tokenizer", e.to_string()))?;
        write_atomic(&out.join("tokenizer_config.json"), text.as_bytes())?;
        written.push("tokenizer_config.json".to_string());
        let mut gen = serde_json::Map::new();
        if let Some(b) = tok.bos_id() {
            gen.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = tok.eos_id() {
            gen.insert("eos_token_id".into(), json!(e));
        }
        if !gen.is_empty() {
            let text = serde_json::to_string_pretty(&Value::Object(gen)).map_err(|e| Error::invalid("write_tokenizer", e.to_string()))?;
            write_atomic(&out.join("generation_config.json"), text.as_bytes())?;
            written.push("generation_config.json".to_string());
        }
    } else {
        let dir = if source.is_dir() { source.to_path_buf() } else { source.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")) };
        for name in TOKENIZER_FILES {
            let p = dir.join(name);
            if p.is_file() {
                let bytes = std::fs::read(&p).map_err(|e| Error::Io { path: p.clone(), source: e })?;
                write_atomic(&out.join(name), &bytes)?;
                written.push(name.to_string());
            }
        }
    }
    Ok(written)
}

/// A probe sequence for [`merge_report`]: `text` tokenized when a tokenizer is given, else (or
/// when that is empty) `len` deterministic pseudo-random ids below `vocab_size`. At most `len` ids.
pub fn probe_ids(tok: Option<&Tokenizer>, text: &str, vocab_size: usize, len: usize) -> Result<Vec<u32>> {
    let len = len.max(1);
    if let Some(t) = tok {
        let mut ids = t.encode(text, true)?;
        ids.truncate(len);
        if !ids.is_empty() && ids.iter().all(|&i| (i as usize) < vocab_size) {
            return Ok(ids);
        }
    }
    let mut rng = crate::gradcheck::SplitMix::new(0x5eed);
    Ok((0..len).map(|_| (rng.next_u64() % vocab_size.max(1) as u64) as u32).collect())
}

/// The largest |Δlogit| between `original` (with its adapters) and the merged folder
/// `merged_dir` (loaded with [`crate::model::open`] in f32) on `probe_ids` (one sequence). The
/// two must describe the same model (every switch of the config; the config files may differ in
/// keys that do not change the math).
pub fn merge_report(original: &dyn Model, merged_dir: &Path, probe_ids: &[u32]) -> Result<f64> {
    if probe_ids.is_empty() {
        return Err(Error::invalid("merge_report", "the probe batch is empty"));
    }
    let merged = crate::model::open(merged_dir, DType::F32)?;
    if !merged.cfg.same_model(original.config()) {
        let (a, b) = (DecoderConfig { source_json: None, ..merged.cfg.clone() }, DecoderConfig { source_json: None, ..original.config().clone() });
        return Err(Error::invalid("merge_report", format!("the merged config {a:?} differs from the original {b:?}")));
    }
    let t = probe_ids.len();
    crate::autograd::no_grad(|| {
        let a = original.logits(probe_ids, 1, t, None)?.to_vec_f64();
        let b = merged.logits(probe_ids, 1, t, None)?.to_vec_f64();
        Ok(a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f64, |m, d| if m.is_nan() || d.is_nan() { f64::NAN } else { m.max(d) }))
    })
}

/// What [`merge_checkpoint`] did.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    /// The tokenizer files written (empty when the source had none).
    pub tokenizer_files: Vec<String>,
    /// Why no tokenizer was written, if none was.
    pub tokenizer_error: Option<String>,
    /// Largest |Δlogit| between merged and un-merged model on the probe.
    pub max_abs_diff: f64,
    /// Probe length in tokens.
    pub probe_len: usize,
    /// Bytes of model.safetensors.
    pub weights_bytes: u64,
}

/// The probe text [`merge_checkpoint`] tokenizes.
pub const PROBE_TEXT: &str = "The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question.";

/// `spectune merge`: loads the model at `model_path` (HF folder, .safetensors or .gguf), applies
/// the adapter in `adapter_dir`, writes the merged HF folder `out` ([`merge_to_hf`] +
/// [`write_tokenizer`]) and measures it with [`merge_report`].
pub fn merge_checkpoint(model_path: &Path, adapter_dir: &Path, out: &Path) -> Result<MergeSummary> {
    let ck = Checkpoint::open(model_path)?;
    let mut model = crate::model::load(&ck, DType::F32)?;
    crate::peft::io::load_adapter(&mut model, adapter_dir)?;
    merge_to_hf(&model, out)?;
    let (tok, tokenizer_files, tokenizer_error) = match ck.tokenizer() {
        Ok(t) => {
            let files = write_tokenizer(model_path, &t, out)?;
            (Some(t), files, None)
        }
        Err(e) => (None, Vec::new(), Some(e.to_string())),
    };
    let probe = probe_ids(tok.as_ref(), PROBE_TEXT, model.config().vocab_size, 32.min(model.config().max_position_embeddings))?;
    let max_abs_diff = merge_report(&model, out, &probe)?;
    let wpath = out.join(MERGED_WEIGHTS_FILE);
    let weights_bytes = std::fs::metadata(&wpath).map_err(|e| Error::Io { path: wpath, source: e })?.len();
    Ok(MergeSummary { tokenizer_files, tokenizer_error, max_abs_diff, probe_len: probe.len(), weights_bytes })
}

/// Writes `model` (adapters merged in) as a GGUF at `out` that llama.cpp runs, on the layout of
/// its GGUF source `src`: every metadata entry of `src` (architecture, hyper-parameters,
/// tokenizer, chat template) with `general.file_type` set for `ty`, and every tensor of `src`
/// under its own name and in its order. Adapted linears hold W' = merged weight, put in llama.cpp's
/// q/k row order where `src`'s architecture has it; the other tensors are `src`'s, converted.
/// Matrices are stored as `ty` (F16, BF16 or Q8_0; Q8_0 falls back to F16 for a row length that is
/// not a multiple of 32, as llama-quantize does), 1-D tensors (norms, biases) as F32. One tensor
/// is in memory at a time. Returns the file size.
pub fn merge_to_gguf(model: &dyn Model, src: &crate::io::gguf::GgufFile, out: &Path, ty: crate::io::gguf_write::GgmlType) -> Result<u64> {
    const OP: &str = "merge_to_gguf";
    use crate::io::gguf::GgufValue as V;
    use crate::io::gguf_write::{write_gguf, GgmlType, TensorSpec};
    let arch = src.architecture()?.to_string();
    let mut adapted: BTreeMap<String, &Linear> = BTreeMap::new();
    for lin in model.linears() {
        if lin.adapter.is_some() {
            adapted.insert(gguf_weight_name(model.config(), &lin.path, OP)?, lin);
        }
    }
    let mut specs = Vec::with_capacity(src.tensor_infos().len());
    for info in src.tensor_infos() {
        let dims = info.dims.clone();
        let t = match dims.len() {
            1 => GgmlType::F32,
            _ if ty == GgmlType::Q8_0 && dims.last().is_some_and(|c| c % 32 != 0) => GgmlType::F16,
            _ => ty,
        };
        specs.push(TensorSpec { name: info.name.clone(), dims, ty: t });
    }
    for name in adapted.keys() {
        if !specs.iter().any(|s| &s.name == name) {
            return Err(Error::invalid(OP, format!("{}: the adapted tensor `{name}` is not in the source", src.path().display())));
        }
    }
    let mut metadata: Vec<(String, V)> =
        src.metadata().iter().filter(|(k, _)| k.as_str() != "general.file_type").map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.push(("general.file_type".into(), V::U32(ty.file_type())));
    write_gguf(out, &metadata, &specs, |i| {
        let spec = &specs[i];
        let vals: Vec<f32> = match adapted.get(&spec.name) {
            None => src.tensor(&spec.name)?.to_vec_f32(),
            Some(&lin) => {
                let merged: Vec<f32> = match &lin.adapter {
                    Some(ad) => ad.merged_weight(&lin.weight)?.into_iter().map(|x| x as f32).collect(),
                    None => lin.weight.to_vec_f32(),
                };
                let (rows, cols) = (lin.out_features(), lin.in_features());
                if spec.dims != [rows, cols] {
                    return Err(Error::shape(OP, "merged weight", format!("{:?} (`{}` in the source)", spec.dims, spec.name), format!("[{rows}, {cols}]")));
                }
                match qk_permutation(&arch, model.config(), &lin.path, rows, OP)? {
                    None => merged,
                    Some(perm) => {
                        let mut v = vec![0.0f32; merged.len()];
                        for (hf_row, &g) in perm.iter().enumerate() {
                            v[g as usize * cols..(g as usize + 1) * cols].copy_from_slice(&merged[hf_row * cols..(hf_row + 1) * cols]);
                        }
                        v
                    }
                }
            }
        };
        if let Some(j) = vals.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { op: OP, what: format!("{} element {j}", spec.name) });
        }
        spec.ty.encode(&vals, *spec.dims.last().unwrap_or(&1))
    })?;
    Ok(std::fs::metadata(out).map_err(|e| Error::Io { path: out.to_path_buf(), source: e })?.len())
}

/// `spectune merge --format gguf`: loads the GGUF at `model_path`, applies the adapter in
/// `adapter_dir`, writes the merged GGUF `out` with [`merge_to_gguf`], and measures it with
/// [`merge_report`] (reloading `out`; with F16/BF16/Q8_0 weights the difference is that
/// rounding, not an error). The summary's `tokenizer_files` is `["(GGUF metadata)"]`.
pub fn merge_checkpoint_gguf(model_path: &Path, adapter_dir: &Path, out: &Path, ty: crate::io::gguf_write::GgmlType) -> Result<MergeSummary> {
    if !out.extension().is_some_and(|e| e == "gguf") {
        return Err(Error::invalid("spectune merge", format!("--format gguf writes one file: --out {} must end in .gguf", out.display())));
    }
    let ck = Checkpoint::open(model_path)?;
    let Checkpoint::Gguf(src) = &ck else {
        return Err(Error::invalid(
            "spectune merge",
            format!(
                "--format gguf needs a GGUF base model (its metadata and tokenizer are copied into the merged file); {} is not one: merge to an HF folder (--format hf) and convert that with llama.cpp's HF-to-GGUF converter",
                model_path.display()
            ),
        ));
    };
    let mut model = crate::model::load(&ck, DType::F32)?;
    crate::peft::io::load_adapter(&mut model, adapter_dir)?;
    let weights_bytes = merge_to_gguf(&model, src, out, ty)?;
    let tok = ck.tokenizer().ok();
    let probe = probe_ids(tok.as_ref(), PROBE_TEXT, model.config().vocab_size, 32.min(model.config().max_position_embeddings))?;
    let max_abs_diff = merge_report(&model, out, &probe)?;
    Ok(MergeSummary { tokenizer_files: vec!["(GGUF metadata)".into()], tokenizer_error: None, max_abs_diff, probe_len: probe.len(), weights_bytes })
}
