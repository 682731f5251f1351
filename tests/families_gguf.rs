//! Every decoder family from a GGUF file written by llama.cpp's own converter
//! (`tests/data/families/<family>/model.f32.gguf`, made by `make_gguf.py` from the same tiny
//! checkpoints as the HF golden tests) against transformers' logits at every position, loaded
//! through `spectune::model::open` like any user file.
//!
//! Three fixtures switch on an HF setting the converter does not write, so the file means
//! something else to llama.cpp (and to this reader, which reads files as llama.cpp does):
//!
//! - mistral: the sliding window (5) is dropped (the file says `llama`, which has none): the
//!   GGUF equals transformers where the window does not bind (positions t < 5);
//! - gemma2: `query_pre_attn_scalar` (24) is dropped: llama.cpp scales scores by head_dim^−½;
//! - gemma3: `layer_types` [sliding, full] is dropped: llama.cpp makes five layers of every six
//!   sliding, here both (with the local RoPE base).
//!
//! For those three the GGUF is compared at every position with the HF checkpoint loaded with
//! that one setting replaced by llama.cpp's reading, and the test checks that the setting does
//! change the logits (so the comparison is not vacuous). Gemma 3 is also checked against
//! transformers directly, with the per-layer `sliding_window_pattern` array llama.cpp reads set
//! to the checkpoint's layer types. Every other converter transform (q/k
//! permutation, Gemma's 1 + w norms, names, fused Phi-3 tensors, rope factor tables) is covered
//! by all nine.
//!
//! Tolerance as in tests/families.rs: |a − b| ≤ 1e-4·max(1, |b|).

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use spectune::io::gguf::{GgufFile, GgufValue};
use spectune::io::gguf_write::{write_gguf, GgmlType, TensorSpec};
use spectune::io::safetensors::SafetensorsCheckpoint;
use spectune::model::{Decoder, DecoderConfig};
use spectune::nn::RopeScaling;
use spectune::DType;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/families").join(name)
}

fn gguf_path(name: &str) -> PathBuf {
    dir(name).join("model.f32.gguf")
}

/// The golden probe and logits, read with the `safetensors` crate: (ids, b, t, logits).
fn golden(name: &str) -> (Vec<u32>, usize, usize, Vec<f64>) {
    let path = dir(name).join("golden.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |n: &str| -> (Vec<usize>, Vec<f64>) {
        let t = st.tensor(n).unwrap();
        let v = match t.dtype() {
            Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::I64 => t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            d => panic!("{name}: {n}: dtype {d:?}"),
        };
        (t.shape().to_vec(), v)
    };
    let (shape, ids) = get("input_ids");
    (ids.iter().map(|&x| x as u32).collect(), shape[0], shape[1], get("logits").1)
}

fn logits(model: &Decoder, ids: &[u32], b: usize, t: usize) -> Vec<f64> {
    model.logits(ids, b, t, None).unwrap().to_vec_f64()
}

fn close(g: f64, w: f64) -> bool {
    (g - w).abs() <= 1e-4 * w.abs().max(1.0)
}

/// Asserts `got` ≈ `want` at every position t < `upto` of every sequence.
fn assert_close(name: &str, what: &str, got: &[f64], want: &[f64], b: usize, t: usize, upto: usize) {
    assert_eq!(got.len(), want.len(), "{name}: logits shape");
    let v = want.len() / (b * t);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let pos = (i / v) % t;
        if pos < upto {
            assert!(close(*g, *w), "{name}: sequence {} position {pos} vocab {}: GGUF {g} vs {what} {w}", i / (t * v), i % v);
        }
    }
}

fn open_gguf(name: &str) -> Decoder {
    spectune::model::open(&gguf_path(name), DType::F32).unwrap_or_else(|e| panic!("{name}: expected the GGUF to load, got: {e}"))
}

/// The HF checkpoint with its config changed by `edit` (what the GGUF cannot carry).
fn hf_with(name: &str, edit: impl FnOnce(&mut DecoderConfig)) -> Decoder {
    let mut cfg = spectune::model::config::parse_config(&dir(name).join("config.json")).unwrap();
    edit(&mut cfg);
    let ck = SafetensorsCheckpoint::open(dir(name)).unwrap();
    Decoder::from_weights(cfg, DType::F32, |n| ck.tensor(n)).unwrap()
}

fn matches_golden(name: &str) {
    let model = open_gguf(name);
    let (ids, b, t, want) = golden(name);
    assert_close(name, "transformers", &logits(&model, &ids, b, t), &want, b, t, t);
}

#[test]
fn llama_gguf_matches_transformers() {
    matches_golden("llama");
}

#[test]
fn llama3_gguf_matches_transformers() {
    // Llama 3 RoPE scaling arrives as the `rope_freqs.weight` divisor table.
    matches_golden("llama3");
}

#[test]
fn llama_bias_gguf_matches_transformers() {
    matches_golden("llama_bias");
}

#[test]
fn qwen2_gguf_matches_transformers() {
    matches_golden("qwen2");
}

#[test]
fn qwen3_gguf_matches_transformers() {
    matches_golden("qwen3");
}

#[test]
fn phi3_gguf_matches_transformers() {
    matches_golden("phi3");
}

/// A fixture whose GGUF lost `dropped`: equal to transformers at positions < `upto`, equal to the
/// HF checkpoint read as llama.cpp reads the file everywhere, and that reading differs from
/// transformers somewhere.
fn matches_llama_cpp_reading(name: &str, upto: usize, edit: impl FnOnce(&mut DecoderConfig)) {
    let model = open_gguf(name);
    let (ids, b, t, want) = golden(name);
    let got = logits(&model, &ids, b, t);
    assert_close(name, "transformers", &got, &want, b, t, upto);
    let reference = logits(&hf_with(name, edit), &ids, b, t);
    assert_close(name, "the HF checkpoint read as llama.cpp reads the file", &got, &reference, b, t, t);
    assert!(reference.iter().zip(&want).any(|(r, w)| !close(*r, *w)), "{name}: the dropped setting changes nothing; the test would be vacuous");
}

#[test]
fn mistral_gguf_is_llama_without_the_window() {
    let model = open_gguf("mistral");
    assert!(model.cfg.layer_windows.is_empty() && model.cfg.family == "llama");
    matches_llama_cpp_reading("mistral", 5, |c| c.layer_windows.clear());
}

#[test]
fn gemma2_gguf_scales_scores_by_head_dim() {
    let model = open_gguf("gemma2");
    assert_eq!(model.cfg.attn_scale, Some(16f64.powf(-0.5)));
    assert_eq!((model.cfg.attn_softcap, model.cfg.final_softcap), (Some(2.0), Some(3.0)));
    assert_eq!(model.cfg.layer_windows, vec![Some(5), None]);
    matches_llama_cpp_reading("gemma2", 0, |c| c.attn_scale = Some(16f64.powf(-0.5)));
}

#[test]
fn gemma3_gguf_slides_five_layers_of_six() {
    let model = open_gguf("gemma3");
    assert_eq!(model.cfg.layer_windows, vec![Some(5), Some(5)]);
    assert_eq!(model.cfg.rope_local.as_ref().map(|r| r.theta), Some(10000.0));
    matches_llama_cpp_reading("gemma3", 0, |c| c.layer_windows = vec![Some(5), Some(5)]);
}

#[test]
fn gemma3_gguf_with_a_layer_pattern_matches_transformers() {
    // The per-layer array llama.cpp reads from `gemma3.attention.sliding_window_pattern`, set
    // to the checkpoint's layer_types [sliding, full]: then the file is the HF model, and the
    // global layer's RoPE (θ = 10⁶, linear ×8, from `rope.freq_base` / `rope.scaling.*`) and the
    // local one (`rope.freq_base_swa`) are both exercised against transformers.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("gemma3-pattern.gguf");
    let pattern = GgufValue::Array(vec![GgufValue::Bool(true), GgufValue::Bool(false)]);
    rewrite("gemma3", &p, |m| set(m, "gemma3.attention.sliding_window_pattern", pattern.clone()), |_| true);
    let model = spectune::model::open(&p, DType::F32).unwrap();
    assert_eq!(model.cfg.layer_windows, vec![Some(5), None]);
    assert_eq!(model.cfg.rope.scaling, RopeScaling::Linear { factor: 8.0 });
    let (ids, b, t, want) = golden("gemma3");
    assert_close("gemma3 (pattern)", "transformers", &logits(&model, &ids, b, t), &want, b, t, t);
    // A pattern of the wrong length is an error naming the key.
    let p = tmp.path().join("gemma3-bad-pattern.gguf");
    rewrite("gemma3", &p, |m| set(m, "gemma3.attention.sliding_window_pattern", GgufValue::Array(vec![GgufValue::Bool(true)])), |_| true);
    let e = open_err(&p);
    assert!(e.contains("gemma3.attention.sliding_window_pattern") && e.contains("1 entries for 2 layers"), "{e}");
}

#[test]
fn gguf_configs_equal_the_hf_configs() {
    // Apart from the settings the converter drops (above) and the RoPE spelling of Llama 3, the
    // config read from the GGUF is the one read from config.json.
    for name in ["llama", "llama_bias", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mistral"] {
        let g = open_gguf(name).cfg;
        let mut h = spectune::model::config::parse_config(&dir(name).join("config.json")).unwrap();
        h.source_json = None;
        match name {
            "mistral" => {
                h.family = "llama".into();
                h.layer_windows.clear();
            }
            "gemma2" => h.attn_scale = g.attn_scale,
            "gemma3" => {
                h.layer_windows = g.layer_windows.clone();
                h.rope_local = g.rope_local.clone();
            }
            "phi3" => {
                // The converter writes the LongRoPE attention factor transformers computes.
                let max = Some(h.max_position_embeddings as f64);
                assert_eq!(g.rope.scaling.attention_factor(max), h.rope.scaling.attention_factor(max));
                if let RopeScaling::LongRope { attention_factor, .. } = &mut h.rope.scaling {
                    *attention_factor = Some(1.0);
                }
            }
            _ => {}
        }
        assert_eq!(g, h, "{name}");
    }
}

#[test]
fn gguf_lora_export_uses_the_converters_names() {
    // An adapter on every linear of each family, exported as a llama.cpp LoRA GGUF: every
    // `<name>.lora_a` / `.lora_b` pair names a tensor of the converter's own file, with B's rows
    // and A's columns those of that tensor (Phi-3's fused `attn_qkv` / `ffn_up` included).
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let base = GgufFile::open(gguf_path(name)).unwrap();
        let mut m = open_gguf(name);
        let lora = spectune::peft::LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 };
        let n = m.attach_adapters(|_| Ok(true), &lora, &spectune::peft::Method::lora(), 1).unwrap();
        let out = tmp.path().join(format!("{name}-lora.gguf"));
        spectune::peft::export::export_gguf_lora(&m, &out, base.architecture().unwrap(), name).unwrap();
        let g = GgufFile::open(&out).unwrap();
        assert_eq!(g.tensor_infos().len(), 2 * n, "{name}");
        for t in g.tensor_infos() {
            let (w, part) = t.name.rsplit_once('.').unwrap();
            let info = base.tensor_info(w).unwrap_or_else(|| panic!("{name}: `{}` names no tensor of the converter's file", t.name));
            match part {
                "lora_a" => assert_eq!(t.dims, vec![2, info.dims[1]], "{name} {}", t.name),
                "lora_b" => assert_eq!(t.dims, vec![info.dims[0], 2], "{name} {}", t.name),
                p => panic!("{name}: unexpected suffix {p}"),
            }
        }
        if name == "phi3" {
            assert!(g.tensor_info("blk.0.attn_qkv.weight.lora_b").is_some_and(|i| i.dims == [64, 2]));
            assert!(g.tensor_info("blk.1.ffn_up.weight.lora_b").is_some_and(|i| i.dims == [96, 2]));
        }
    }
}

#[test]
fn merged_gguf_of_each_family_reloads_to_the_adapted_model() {
    // merge --format gguf on the converter's files: adapted linears written under the family's
    // names (and in llama.cpp's q/k row order for `llama`), the rest copied (Gemma's stored
    // 1 + w norms included); the reloaded file gives the adapted model's logits.
    let tmp = tempfile::tempdir().unwrap();
    let (ids, b, t, _) = golden("llama");
    for name in ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"] {
        let src = GgufFile::open(gguf_path(name)).unwrap();
        let mut m = open_gguf(name);
        let lora = spectune::peft::LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 };
        m.attach_adapters(|_| Ok(true), &lora, &spectune::peft::Method::lora(), 1).unwrap();
        let mut rng = spectune::gradcheck::SplitMix::new(5);
        for p in m.trainable_params() {
            let v: Vec<f32> = rng.vec(p.numel(), -0.2, 0.2).into_iter().map(|x| x as f32).collect();
            p.set_values(&v).unwrap();
        }
        let want = logits(&m, &ids, b, t);
        let base = logits(&open_gguf(name), &ids, b, t);
        assert!(want.iter().zip(&base).any(|(w, b)| !close(*w, *b)), "{name}: the adapter changes nothing; the test would be vacuous");
        let out = tmp.path().join(format!("{name}-merged.gguf"));
        spectune::peft::export::merge_to_gguf(&m, &src, &out, GgmlType::F32).unwrap();
        let got = logits(&spectune::model::open(&out, DType::F32).unwrap(), &ids, b, t);
        assert_close(name, "the adapted model", &got, &want, b, t, t);
    }
}

// ---- bad input ----------------------------------------------------------------------------

/// Copies fixture `name` to `out` with metadata changed by `meta` and tensors filtered by
/// `keep`, written by the crate's GGUF writer.
fn rewrite(name: &str, out: &Path, meta: impl Fn(&mut Vec<(String, GgufValue)>), keep: impl Fn(&str) -> bool) {
    let src = GgufFile::open(gguf_path(name)).unwrap();
    let mut metadata: Vec<(String, GgufValue)> = src.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta(&mut metadata);
    let specs: Vec<TensorSpec> =
        src.tensor_infos().iter().filter(|i| keep(&i.name)).map(|i| TensorSpec { name: i.name.clone(), dims: i.dims.clone(), ty: GgmlType::F32 }).collect();
    write_gguf(out, &metadata, &specs, |i| {
        let s = &specs[i];
        GgmlType::F32.encode(&src.tensor(&s.name)?.to_vec_f32(), *s.dims.last().unwrap())
    })
    .unwrap();
}

fn set(m: &mut Vec<(String, GgufValue)>, key: &str, v: GgufValue) {
    m.retain(|(k, _)| k != key);
    m.push((key.into(), v));
}

fn open_err(path: &Path) -> String {
    match spectune::model::open(path, DType::F32) {
        Ok(_) => panic!("{}: expected an error", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("gpt2.gguf");
    rewrite("llama", &p, |m| set(m, "general.architecture", GgufValue::String("gpt2".into())), |_| true);
    let e = open_err(&p);
    assert!(e.contains("\"gpt2\"") && e.contains("general.architecture") && e.contains("gemma3"), "{e}");
}

#[test]
fn metadata_contradicting_tensors_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    // Four k/v heads where the file's attn_k holds two.
    let p = tmp.path().join("kv.gguf");
    rewrite("qwen2", &p, |m| set(m, "qwen2.attention.head_count_kv", GgufValue::U32(4)), |_| true);
    let e = open_err(&p);
    assert!(e.contains("`blk.0.attn_k.weight`") && e.contains("[16, 32]") && e.contains("[32, 32]"), "{e}");
    // A feed-forward size that is not the tensors'.
    let p = tmp.path().join("ffn.gguf");
    rewrite("phi3", &p, |m| set(m, "phi3.feed_forward_length", GgufValue::U32(40)), |_| true);
    let e = open_err(&p);
    assert!(e.contains("`blk.0.ffn_up.weight`") && e.contains("[96, 32]") && e.contains("[80, 32]"), "{e}");
    // An embedding length the token table does not have.
    let p = tmp.path().join("embd.gguf");
    rewrite("gemma2", &p, |m| set(m, "gemma2.embedding_length", GgufValue::U32(64)), |_| true);
    let e = open_err(&p);
    assert!(e.contains("`token_embd.weight`") && e.contains("[128, 32]"), "{e}");
    // A missing tensor (Qwen3's k norm of layer 1).
    let p = tmp.path().join("missing.gguf");
    rewrite("qwen3", &p, |_| {}, |n| n != "blk.1.attn_k_norm.weight");
    let e = open_err(&p);
    assert!(e.contains("`blk.1.attn_k_norm.weight`") && e.contains("missing"), "{e}");
    // A rope-factor table of the wrong length.
    let p = tmp.path().join("freqs.gguf");
    rewrite("llama3", &p, |m| set(m, "llama.rope.dimension_count", GgufValue::U32(4)), |_| true);
    let e = open_err(&p);
    assert!(e.contains("`rope_freqs.weight`") && e.contains("[2]"), "{e}");
    // LongRoPE with one of its two factor tables.
    let p = tmp.path().join("longrope.gguf");
    rewrite("phi3", &p, |_| {}, |n| n != "rope_factors_long.weight");
    let e = open_err(&p);
    assert!(e.contains("`rope_factors_long.weight`") && e.contains("LongRoPE"), "{e}");
    // A mixture-of-experts Llama (Mixtral is written as `llama`).
    let p = tmp.path().join("moe.gguf");
    rewrite("llama", &p, |m| set(m, "llama.expert_count", GgufValue::U32(8)), |_| true);
    let e = open_err(&p);
    assert!(e.contains("llama.expert_count") && e.contains("mixture-of-experts"), "{e}");
}

#[test]
fn unsupported_rope_scaling_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("yarn.gguf");
    rewrite("qwen3", &p, |m| set(m, "qwen3.rope.scaling.type", GgufValue::String("yarn".into())), |_| true);
    let e = open_err(&p);
    assert!(e.contains("qwen3.rope.scaling.type") && e.contains("yarn"), "{e}");
}
