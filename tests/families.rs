//! Every decoder family against transformers at every position: the tiny checkpoints of
//! tests/data/families (written by make_families.py with transformers and PEFT; random weights,
//! each family's distinguishing features switched on, a 12-token probe longer than the sliding
//! windows and LongRoPE's original context) loaded through the real loader. Per family:
//!
//! - logits at all 2 × 12 positions of the unpadded batch;
//! - logits at every real position of a right-padded batch (padding keys masked);
//! - transformers' causal-LM loss on the padded batch;
//! - a stock PEFT LoRA (all-linear, nonzero A and B) loaded from its `save_pretrained` folder:
//!   the loss and the gradient of every lora_A / lora_B against PyTorch autograd.
//!
//! Tolerance: |a − b| ≤ 1e-4·max(1, |b|) for logits and losses (f32 on both sides), and
//! ≤ 1e-4·max(1e-2, max|g|) per gradient tensor.

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use spectune::autograd::backward;
use spectune::model::Decoder;
use spectune::ops::CeOptions;
use spectune::DType;

const FAMILIES: [&str; 9] = ["llama", "llama3", "llama_bias", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/families").join(name)
}

/// A safetensors file read with the `safetensors` crate (independently of the crate's loader):
/// name → (shape, values as f64).
fn read(path: &PathBuf) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f64> = match t.dtype() {
                Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                Dtype::I64 => t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                other => panic!("{}: {name}: unexpected dtype {other:?}", path.display()),
            };
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

fn close(g: f64, w: f64, scale: f64) -> bool {
    (g - w).abs() <= 1e-4 * scale.max(w.abs())
}

fn load(name: &str) -> Decoder {
    spectune::model::open(&dir(name), DType::F32).unwrap_or_else(|e| panic!("{name}: expected to load, got: {e}"))
}

/// (ids, key mask, targets) of the padded batch: targets[t] = labels[t + 1] (the shift
/// transformers' loss applies), −100 at each row's last position.
fn padded_batch(g: &HashMap<String, (Vec<usize>, Vec<f64>)>) -> (Vec<u32>, Vec<bool>, Vec<i64>, usize, usize) {
    let (shape, ids) = &g["input_ids_padded"];
    let (b, t) = (shape[0], shape[1]);
    let mask: Vec<bool> = g["attention_mask"].1.iter().map(|&m| m != 0.0).collect();
    let labels = &g["labels"].1;
    let targets = (0..b * t).map(|i| if (i + 1) % t == 0 { -100 } else { labels[i + 1] as i64 }).collect();
    (ids.iter().map(|&x| x as u32).collect(), mask, targets, b, t)
}

fn check_logits(name: &str) {
    let model = load(name);
    let g = read(&dir(name).join("golden.safetensors"));
    let (shape, ids) = &g["input_ids"];
    let (b, t) = (shape[0], shape[1]);
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let want = &g["logits"].1;
    let v = want.len() / (b * t);
    let got = model.logits(&ids, b, t, None).unwrap_or_else(|e| panic!("{name}: forward: {e}")).to_vec_f64();
    assert_eq!(got.len(), want.len(), "{name}: logits shape");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(close(*g, *w, 1.0), "{name}: sequence {} position {} vocab {}: {g} vs transformers {w}", i / (t * v), (i / v) % t, i % v);
    }
    // The padded batch: every real position (padding keys masked).
    let (ids, mask, targets, b, t) = padded_batch(&g);
    let got = model.logits(&ids, b, t, Some(&mask)).unwrap_or_else(|e| panic!("{name}: padded forward: {e}")).to_vec_f64();
    let want = &g["logits_padded"].1;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if mask[i / v] {
            assert!(close(*g, *w, 1.0), "{name}: padded sequence {} position {} vocab {}: {g} vs transformers {w}", i / (t * v), (i / v) % t, i % v);
        }
    }
    let loss = model.loss(&ids, &targets, b, t, Some(&mask), &CeOptions::default()).unwrap().item().unwrap();
    let want = g["loss"].1[0];
    assert!(close(loss, want, 1.0), "{name}: loss {loss} vs transformers {want}");
}

fn check_lora_grads(name: &str) {
    let mut model = load(name);
    spectune::peft::io::load_adapter(&mut model, &dir(name).join("lora")).unwrap_or_else(|e| panic!("{name}: PEFT adapter: {e}"));
    let g = read(&dir(name).join("golden.safetensors"));
    let (ids, mask, targets, b, t) = padded_batch(&g);
    let loss = model.loss(&ids, &targets, b, t, Some(&mask), &CeOptions::default()).unwrap();
    let want = read(&dir(name).join("lora_grads.safetensors"));
    let l = loss.item().unwrap();
    assert!(close(l, want["lora_loss"].1[0], 1.0), "{name}: LoRA loss {l} vs PEFT {}", want["lora_loss"].1[0]);
    let grads = backward(&loss).unwrap();
    let mut checked = 0;
    for lin in model.linears() {
        let ad = lin.adapter.as_deref().unwrap_or_else(|| panic!("{name}: {} has no adapter (PEFT's all-linear adapts it)", lin.path));
        let params = ad.params();
        for (which, p) in [("lora_A", &params[0]), ("lora_B", &params[1])] {
            let key = format!("base_model.model.{}.{which}.weight", lin.path);
            let (shape, w) = want.get(&key).unwrap_or_else(|| panic!("{name}: no PEFT gradient {key}"));
            assert_eq!(p.dims(), &shape[..], "{name}: {key} shape");
            let got = grads.get(p).unwrap_or_else(|| panic!("{name}: no gradient for {key}")).to_vec_f64();
            let scale = w.iter().fold(1e-2f64, |m, x| m.max(x.abs()));
            for (i, (g, w)) in got.iter().zip(w).enumerate() {
                assert!(close(*g, *w, scale), "{name}: d loss / d {key}[{i}] = {g} vs PyTorch {w}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, want.len() - 1, "{name}: every PEFT gradient is compared");
    // Frozen weights get no gradient: the store holds exactly the adapter parameters.
    assert_eq!(grads.len(), checked, "{name}: gradients besides the adapters'");
    for w in model.norm_weights().into_iter().chain(model.linears().iter().map(|l| &l.weight)).chain([&model.embed]) {
        assert!(grads.get(w).is_none(), "{name}: a frozen weight got a gradient");
    }
}

fn run_all(check: fn(&str)) {
    let mut failures = Vec::new();
    for name in FAMILIES {
        if let Err(e) = std::panic::catch_unwind(|| check(name)) {
            failures.push(e.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{name}: failed")));
        }
    }
    assert!(failures.is_empty(), "{} of {} families failed:\n{}", failures.len(), FAMILIES.len(), failures.join("\n"));
}

#[test]
fn every_family_matches_transformers_logits_and_loss_at_every_position() {
    run_all(check_logits);
}

#[test]
fn every_family_matches_peft_lora_gradients() {
    run_all(check_lora_grads);
}

/// The family's config.json with `edit` applied, parsed.
fn parse_edited(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> spectune::Result<spectune::model::DecoderConfig> {
    let text = std::fs::read_to_string(dir(name).join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(v.as_object_mut().unwrap());
    spectune::model::config::parse_config_str(&v.to_string(), &format!("{name}/config.json"))
}

fn refused(r: spectune::Result<spectune::model::DecoderConfig>, words: &[&str]) {
    let msg = r.expect_err("should be refused").to_string();
    for w in words {
        assert!(msg.contains(w), "the error should name `{w}`: {msg}");
    }
}

#[test]
fn unimplemented_architectures_and_math_changing_keys_are_refused_by_name() {
    use serde_json::json;
    refused(
        parse_edited("llama", |m| drop(m.insert("architectures".into(), json!(["FalconForCausalLM"])))),
        &["FalconForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM"],
    );
    refused(parse_edited("llama", |m| drop(m.insert("hidden_act".into(), json!("gelu")))), &["hidden_act", "gelu"]);
    refused(parse_edited("gemma2", |m| drop(m.insert("hidden_activation".into(), json!("relu")))), &["hidden_activation", "relu"]);
    refused(
        parse_edited("llama3", |m| drop(m.insert("rope_parameters".into(), json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})))),
        &["dynamic", "longrope"],
    );
    refused(parse_edited("gemma3", |m| drop(m.insert("use_bidirectional_attention".into(), json!(true)))), &["use_bidirectional_attention"]);
    refused(parse_edited("gemma3", |m| drop(m.insert("layer_types".into(), json!(["sliding_attention"])))), &["layer_types", "2 layers"]);
    refused(parse_edited("mistral", |m| drop(m.insert("layer_types".into(), json!(["chunked_attention", "full_attention"])))), &["chunked_attention"]);
    refused(parse_edited("qwen2", |m| drop(m.insert("quantization_config".into(), json!({"quant_method": "gptq"})))), &["quantization_config"]);
    refused(parse_edited("llama", |m| drop(m.insert("pretraining_tp".into(), json!(2)))), &["pretraining_tp"]);
    refused(parse_edited("phi3", |m| drop(m.insert("partial_rotary_factor".into(), json!(0.3)))), &["partial_rotary_factor"]);
    refused(parse_edited("qwen3", |m| drop(m.insert("architectures".into(), json!(["Qwen2ForCausalLM"])))), &["architectures", "model_type"]);
}

#[test]
fn a_checkpoint_that_contradicts_its_config_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir("qwen3").join(f), tmp.path().join(f)).unwrap();
    }
    // Qwen3 without q/k norms in the config is Qwen2-shaped: the norm tensors are then unused.
    let text =
        std::fs::read_to_string(tmp.path().join("config.json")).unwrap().replace("Qwen3ForCausalLM", "Qwen2ForCausalLM").replace("\"qwen3\"", "\"qwen2\"");
    std::fs::write(tmp.path().join("config.json"), text).unwrap();
    let msg = spectune::model::open(tmp.path(), DType::F32).map(|_| ()).expect_err("should be refused").to_string();
    assert!(msg.contains("q_norm.weight") && msg.contains("q_proj.bias"), "{msg}");
}
