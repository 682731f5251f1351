//! Adapter files in HF PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`, with
//! PEFT's key names (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in],
//! `…lora_B.weight` [out, r]), so a LoRA saved here loads in stock PEFT, and so does a DoRA
//! (`use_dora = true`, `…lora_magnitude_vector` `[out]`, as PEFT writes it). The other methods'
//! tensors ride along under the same module prefix, described under a `spectune` key of the
//! config (`method`, and `rows` / `block`):
//!
//! - SpecLoRA: `…speclora_d` `[k]`, `…speclora_rows` `[k]` (I64 row indices), and for the SVD form
//!   `…speclora_u/sigma/v`;
//! - Spectral^A: `…spectral_du` [out, r], `…spectral_dv` [in, r]; Spectral^R: `…spectral_qu`,
//!   `…spectral_qv` [r, r], `…spectral_c` `[r]`; both: the frozen `…spectral_u/sigma/v` and
//!   `…spectral_block` (I64 `[1]`);
//! - PiSSA / MiLoRA: `lora_A/lora_B` plus the frozen `…pissa_A0` [r, in], `…pissa_B0` [out, r];
//! - full fine-tuning: no PEFT config keys (`spectune.method = "full"`), and the tuned matrices
//!   under their HF names (`model.layers.{i}.self_attn.q_proj.weight` [out, in]).
//!
//! Stock PEFT cannot run those; `spectune export` turns the low-rank ones into a plain LoRA.
//!
//! Files are written atomically: a temporary file in the same folder, fsync, rename.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::nn::Linear;
use crate::peft::full::Full;
use crate::peft::registry::{file_suffixes, LOAD_ORDER};
use crate::peft::{Adapter, LoraConfig, ModuleFile, ModuleNames, TensorMap};
use crate::tensor::Tensor;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The HF name of a linear's weight (`model.layers.{i}.self_attn.q_proj.weight`): full
/// fine-tuning saves its tuned matrices under these names.
pub fn hf_weight_name(lin: &Linear) -> String {
    format!("{}.weight", lin.path)
}

/// The PEFT key prefix of a linear's adapter tensors (`base_model.model.{module path}`).
pub fn module_prefix(lin: &Linear) -> String {
    format!("base_model.model.{}", lin.path)
}

/// The model's linears as a pattern for error messages (`model.layers.<0..N>.self_attn.q_proj | …`).
fn module_list(model: &dyn Model) -> String {
    let mut mods: Vec<String> = Vec::new();
    let last = model.num_layers().saturating_sub(1);
    for l in model.linears().into_iter().filter(|l| l.layer() == Some(0)) {
        mods.push(l.path.replacen("layers.0.", &format!("layers.<0..{last}>."), 1));
    }
    mods.join(" | ")
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename; the temp file
/// is removed on failure): [`crate::io::write_atomically`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::io::write_atomically(path, |w, tio| w.write_all(bytes).map_err(tio))
}

/// Saves every adapter of `model` into `dir` (created if needed). `lora` is the config the
/// adapters were created with; `base_model` is recorded for PEFT.
pub fn save_adapter(model: &dyn Model, dir: &Path, lora: &LoraConfig, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let mut tensors = TensorMap::new();
    let mut targets: Vec<String> = Vec::new();
    let mut method: &'static str = "lora";
    let mut sp = serde_json::Map::new();
    let mut layer_methods: Vec<&'static str> = Vec::new();
    for lin in model.linears() {
        {
            let Some(ad) = &lin.adapter else { continue };
            if !targets.iter().any(|t| t == lin.module()) {
                targets.push(lin.module().to_string());
            }
            // The LoRA-layout methods are told apart per module at load; DoRA (use_dora applies
            // to every module) and full fine-tuning (another format) cannot share a folder.
            let name = ad.method().name();
            let first = layer_methods.first().copied().unwrap_or(name);
            if first != name && [first, name].iter().any(|m| matches!(*m, "dora" | "full")) {
                return Err(Error::invalid("save_adapter", format!("{first} and {name} adapters cannot be saved in one folder")));
            }
            layer_methods.push(name);
            if name != "lora" {
                method = name;
            }
            ad.save(&ModuleNames { prefix: module_prefix(lin), weight: hf_weight_name(lin) }, &mut tensors)?;
            ad.save_config(&mut sp);
        }
    }
    if tensors.is_empty() {
        return Err(Error::invalid("save_adapter", "the model has no adapters attached"));
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes, dt))| TensorView::new(*dt, shape.clone(), bytes).map(|v| (k.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::invalid("save_adapter", format!("{e}")))?;
    let bytes = safetensors::tensor::serialize(views, None).map_err(|e| Error::invalid("save_adapter", format!("{e}")))?;
    let mut config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.rslora,
        "bias": "none",
        "target_modules": targets,
        "fan_in_fan_out": false,
        "inference_mode": true,
    });
    // Plain LoRA stays a config every PEFT version accepts, and DoRA is stock PEFT DoRA
    // (`use_dora`, `…lora_magnitude_vector`). The other methods, which stock PEFT cannot run
    // (export them with `spectune export`, or merge them), say what they are. Full fine-tuning
    // is not a PEFT adapter at all: no peft_type, the tuned matrices under their HF names.
    match method {
        "lora" => {}
        "dora" => config["use_dora"] = json!(true),
        _ => {
            let mut obj = serde_json::Map::new();
            obj.insert("method".into(), json!(method));
            obj.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
            if method == "speclora" {
                obj.insert("rows".into(), sp.get("rows").cloned().unwrap_or(json!("top")));
            }
            if let Some(b) = sp.get("block") {
                obj.insert("block".into(), b.clone());
            }
            config["spectune"] = Value::Object(obj);
            if method == "full" {
                if let Some(o) = config.as_object_mut() {
                    for k in ["peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "fan_in_fan_out"] {
                        o.remove(k);
                    }
                }
            }
        }
    }
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::invalid("save_adapter", e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Loads an adapter folder saved by [`save_adapter`] (or a plain PEFT LoRA) onto `model`,
/// replacing any adapters it had. Returns the LoRA config read from the folder.
pub fn load_adapter(model: &mut dyn Model, dir: &Path) -> Result<LoraConfig> {
    let cfg_path = dir.join(CONFIG_FILE);
    let fmt = |msg: String| Error::Format { path: cfg_path.clone(), msg };
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Io { path: cfg_path.clone(), source: e })?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| fmt(format!("not valid JSON: {e}")))?;
    let sp_method = cfg.get("spectune").and_then(|v| v.get("method")).and_then(Value::as_str).map(str::to_string);
    if sp_method.as_deref() == Some("full") {
        return load_full(model, dir);
    }
    if cfg.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(fmt(format!("peft_type must be \"LORA\", got {}", cfg.get("peft_type").unwrap_or(&Value::Null))));
    }
    let rank = cfg.get("r").and_then(Value::as_u64).ok_or_else(|| fmt("missing integer key `r`".into()))? as usize;
    let alpha = cfg.get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| fmt("missing number `lora_alpha`".into()))?;
    let rslora = cfg.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    let dropout = cfg.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    if cfg.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(fmt("fan_in_fan_out = true (Conv1D layouts) is not supported".into()));
    }
    if let Some(b) = cfg.get("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        return Err(fmt(format!("bias = \"{b}\" is not supported (only \"none\")")));
    }
    if cfg.get("layers_to_transform").is_some_and(|v| !v.is_null()) || cfg.get("rank_pattern").and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
        return Err(fmt("layers_to_transform / rank_pattern are not supported".into()));
    }
    let lora = LoraConfig { rank, alpha, rslora, dropout };
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).map_err(|e| Error::Io { path: wpath.clone(), source: e })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format { path: wpath.clone(), msg: e.to_string() })?;
    let wfmt = |msg: String| Error::Format { path: wpath.clone(), msg };
    let names: HashMap<String, ()> = st.names().into_iter().map(|n| (n.to_string(), ())).collect();
    let use_dora = cfg.get("use_dora").and_then(Value::as_bool).unwrap_or(false);
    let mut found = 0;
    let mut loaded: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Attached only once the whole file has been read and checked: an error leaves the model as
    // it was.
    let mut staged: Vec<(String, Adapter)> = Vec::new();
    for lin in model.linears() {
        {
            let f = ModuleFile {
                st: &st,
                path: &wpath,
                names: ModuleNames { prefix: module_prefix(lin), weight: hf_weight_name(lin) },
                weight: &lin.weight,
                dtype: model.dtype(),
                lora: &lora,
                use_dora,
                spectune_method: sp_method.as_deref(),
            };
            // The first method whose layout the module's tensors match.
            let mut adapter = None;
            for load in LOAD_ORDER {
                if let Some(ad) = load(&f)? {
                    adapter = Some(ad);
                    break;
                }
            }
            let Some(adapter) = adapter else { continue };
            staged.push((lin.path.clone(), adapter));
            found += 1;
            loaded.insert(f.names.prefix);
        }
    }
    if found == 0 {
        return Err(wfmt("no adapter tensors (lora_A/lora_B or spectral_*) for this model's layers".into()));
    }
    // Every tensor must belong to a module just loaded: one for layer 40 of a 30-layer model, for
    // a module spectune does not adapt (embeddings, lm_head) or with an unknown suffix would
    // otherwise be dropped without a word, and the model would not be the one that was saved.
    let mut names: Vec<&str> = names.keys().map(String::as_str).collect();
    names.sort_unstable();
    let suffixes: Vec<String> = file_suffixes().iter().map(|s| format!(".{s}")).collect();
    for name in names {
        let module = suffixes.iter().find_map(|suf| name.strip_suffix(suf.as_str()));
        if !module.is_some_and(|m| loaded.contains(m)) {
            return Err(wfmt(format!(
                "tensor {name} belongs to no module of this model ({} layers): expected \
                 base_model.model.{{{}}}, then one of {}",
                model.num_layers(),
                module_list(model),
                suffixes.join(" ")
            )));
        }
    }
    attach_staged(model, staged);
    Ok(lora)
}

/// Loads a full fine-tuning folder (`spectune.method = "full"`): the tuned matrices under their
/// HF names (`model.layers.{i}.self_attn.q_proj.weight` [out, in]) become trainable
/// [`Full`] copies on the matching linears. Returns the default [`LoraConfig`] (full
/// fine-tuning has no LoRA settings).
fn load_full(model: &mut dyn Model, dir: &Path) -> Result<LoraConfig> {
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).map_err(|e| Error::Io { path: wpath.clone(), source: e })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Format { path: wpath.clone(), msg: e.to_string() })?;
    let wfmt = |msg: String| Error::Format { path: wpath.clone(), msg };
    let mut found = 0;
    let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
    // Attached only after the whole file is checked: an error leaves the model as it was.
    let mut staged: Vec<(String, Adapter)> = Vec::new();
    for lin in model.linears() {
        {
            let name = hf_weight_name(lin);
            let Ok(tv) = st.tensor(&name) else { continue };
            let dims = [lin.out_features(), lin.in_features()];
            if tv.shape() != dims {
                return Err(wfmt(format!("{name}: expected shape {dims:?}, got {:?}", tv.shape())));
            }
            let vals: Vec<f64> = match tv.dtype() {
                Dtype::F32 => tv.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
                Dtype::BF16 => tv.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
                Dtype::F16 => tv.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
                other => return Err(wfmt(format!("{name}: unsupported dtype {other:?}"))),
            };
            let w = crate::device::with_float!(model.dtype(), "load_adapter", |T| {
                Tensor::from_vec(vals.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>(), dims.to_vec())
            })?
            .param()?;
            staged.push((lin.path.clone(), Box::new(Full { w })));
            used.insert(name);
            found += 1;
        }
    }
    if found == 0 {
        return Err(wfmt("no tuned matrices (model.layers.{i}.….weight) for this model's layers".into()));
    }
    // A matrix for a layer or module this model does not have would otherwise be dropped silently.
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    if let Some(name) = names.into_iter().find(|n| !used.contains(*n)) {
        return Err(wfmt(format!(
            "tensor {name} is no linear of this model ({} layers): expected one of {{{}}} followed by .weight",
            model.num_layers(),
            module_list(model)
        )));
    }
    attach_staged(model, staged);
    Ok(LoraConfig::default())
}

/// Attaches adapters staged by module path (every path came from `model.linears()`).
fn attach_staged(model: &mut dyn Model, staged: Vec<(String, Adapter)>) {
    let mut staged: HashMap<String, Adapter> = staged.into_iter().collect();
    for lin in model.linears_mut() {
        if let Some(ad) = staged.remove(&lin.path) {
            lin.adapter = Some(ad);
        }
    }
}
