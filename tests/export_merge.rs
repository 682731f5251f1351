//! Exporting SpecLoRA as plain PEFT LoRA (rank r + k) and merging adapters into an HF folder:
//! both must reproduce the adapted model's logits.

use std::collections::HashMap;
use std::path::Path;

use spectune::gradcheck::SplitMix;
use spectune::io::Checkpoint;
use spectune::model::config::parse_config;
use spectune::model::{Decoder, DecoderConfig, RopeConfig};
use spectune::peft::export::{
    export_adapter_dir, export_peft_lora, merge_checkpoint, merge_report, merge_to_hf, write_tokenizer, ExportFormat, MERGED_CONFIG_FILE, MERGED_WEIGHTS_FILE,
};
use spectune::peft::io::{load_adapter, save_adapter, CONFIG_FILE, WEIGHTS_FILE};
use spectune::peft::lora::Lora;
use spectune::peft::{LoraConfig, Method};
use spectune::storage::HostData;
use spectune::tokenizer::{byte_to_unicode, ChatMessage, GgufVocab, Tokenizer};
use spectune::{DType, Tensor};

/// kv heads × head_dim = 8 rows on k_proj / v_proj, so k = 12 is clamped there (and only there).
/// With `bias`, a Qwen2 config (q/k/v biased, o not); else a Llama one.
fn cfg(vocab: usize, tied: bool, bias: bool) -> DecoderConfig {
    DecoderConfig {
        family: if bias { "qwen2" } else { "llama" }.into(),
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope: RopeConfig { theta: 50000.0, ..Default::default() },
        tie_word_embeddings: tied,
        qkv_bias: bias,
        max_position_embeddings: 64,
        ..DecoderConfig::default()
    }
}

/// A random model whose frozen weights are stored as bf16 (computed in f32).
fn bf16_model(c: DecoderConfig, seed: u64) -> Decoder {
    let mut rng = SplitMix::new(seed);
    let mut w: HashMap<String, Tensor> = HashMap::new();
    for (name, dims) in c.expected_weights() {
        let n: usize = dims.iter().product();
        let v = if name.ends_with("norm.weight") { rng.vec(n, 0.9, 1.1) } else { rng.vec(n, -0.3, 0.3) };
        let data = HostData::BF16(v.into_iter().map(half::bf16::from_f64).collect());
        w.insert(name, Tensor::from_host(data, dims).unwrap());
    }
    Decoder::from_weights(c, DType::F32, |n| Ok(w[n].clone())).unwrap()
}

/// Trained-looking adapter values: d away from 1, B nonzero.
fn perturb(m: &Decoder, seed: u64) {
    let mut rng = SplitMix::new(seed);
    for p in m.trainable_params() {
        let n = p.numel();
        let v: Vec<f32> = if n > 0 && p.dims().len() == 1 { rng.vec(n, 0.5, 1.6) } else { rng.vec(n, -0.4, 0.4) }.into_iter().map(|x| x as f32).collect();
        p.set_values(&v).unwrap();
    }
}

fn ids(vocab: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + 3) % vocab) as u32).collect()
}

/// max |a − b| / max |a|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

/// The keys PEFT's LoraConfig knows (since 0.7); an exported config must use no others.
const PEFT_LORA_KEYS: [&str; 15] = [
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "bias",
    "target_modules",
    "fan_in_fan_out",
    "inference_mode",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
];

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Exports `m` (adapters attached and perturbed), loads the export onto `fresh` and checks
/// that the logits agree and that the export is a plain, uniform-rank LoRA.
fn check_export(m: &Decoder, fresh: &mut Decoder, lora: &LoraConfig, expect_rank: usize, what: &str) {
    let probe = ids(m.cfg.vocab_size, 12);
    let want = m.logits(&probe, 2, 6, None).unwrap().to_vec_f32();
    let dir = tempfile::tempdir().unwrap();
    let summary = export_peft_lora(m, dir.path(), lora, "random-tiny").unwrap();
    assert_eq!(summary.rank, expect_rank, "{what}: {summary:?}");
    let c = read_json(&dir.path().join(CONFIG_FILE));
    for k in c.as_object().unwrap().keys() {
        assert!(PEFT_LORA_KEYS.contains(&k.as_str()), "{what}: key {k} is not a PEFT LoraConfig field");
    }
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["r"], expect_rank as u64);
    assert_eq!(c["use_rslora"], false);
    assert!(c["rank_pattern"].as_object().unwrap().is_empty());
    // The common scale α'/R is the adapters' own scale (1 for the Spectral methods, which have none).
    let want_s = m.linears().into_iter().filter_map(|l| l.adapter.as_ref()).next().unwrap().scale().map_or(1.0, |_| lora.scale());
    let s = c["lora_alpha"].as_f64().unwrap() / expect_rank as f64;
    assert!((s - want_s).abs() < 1e-12 * want_s, "{what}: scale {s} vs {want_s}");
    // Only lora_A / lora_B tensors, all [R, in] / [out, R].
    let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, t) in st.tensors() {
        assert!(name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight"), "{what}: extra tensor {name}");
        assert!(name.starts_with("base_model.model.model.layers."), "{name}");
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let r_axis = if name.ends_with("lora_A.weight") { 0 } else { 1 };
        assert_eq!(t.shape()[r_axis], expect_rank, "{what}: {name} {:?}", t.shape());
    }
    let read = load_adapter(fresh, dir.path()).unwrap();
    assert_eq!(read.rank, expect_rank);
    for lin in fresh.linears() {
        if let Some(ad) = &lin.adapter {
            assert!(ad.downcast_ref::<Lora>().is_some(), "{what}: the export must load as plain LoRA");
        }
    }
    let got = fresh.logits(&probe, 2, 6, None).unwrap().to_vec_f32();
    let err = rel_err(&want, &got);
    eprintln!("export {what}: rank {expect_rank}, relative logit error {err:.2e}");
    assert!(err < 1e-5, "{what}: relative logit error {err:e}");
    // The export must actually change the model (the test is not vacuous).
    let plain = {
        let mut p = fresh.clone();
        p.linears_mut().into_iter().for_each(|l| l.adapter = None);
        p.logits(&probe, 2, 6, None).unwrap().to_vec_f32()
    };
    assert!(rel_err(&want, &plain) > 1e-2, "{what}: the adapters barely change the logits");
}

#[test]
fn export_every_method_to_plain_lora_f32() {
    let c = cfg(50, false, false);
    let r = 3;
    for (method, k_max) in [
        (Method::lora(), 0),
        // k = 12 is clamped to 8 on k_proj/v_proj: those modules are zero-padded to r + 12.
        (Method::speclora(12), 12),
        (Method::speclora_by_norm(6), 6),
        // SVD: k clamped to min(out, in) = 8 on k/v.
        (Method::speclora_svd(12), 12),
    ] {
        for rslora in [false, true] {
            let lora = LoraConfig { rank: r, alpha: 6.0, rslora, dropout: 0.05 };
            let base = Decoder::random(c.clone(), DType::F32, 11).unwrap();
            let mut m = base.clone();
            m.attach_adapters(|_| Ok(true), &lora, &method, 12).unwrap();
            perturb(&m, 13);
            let mut fresh = base.clone();
            check_export(&m, &mut fresh, &lora, r + k_max, &format!("{method:?} rslora={rslora}"));
        }
    }
}

#[test]
fn export_on_a_bf16_base_and_a_subset_of_targets() {
    let c = cfg(40, true, true);
    let lora = LoraConfig { rank: 4, alpha: 16.0, rslora: false, dropout: 0.0 };
    for method in [Method::speclora_by_norm(5), Method::speclora(7), Method::speclora_svd(6), Method::pissa(), Method::spectral_a(0), Method::spectral_r(1)] {
        let base = bf16_model(c.clone(), 21);
        assert_eq!(base.layers[0].linear("q_proj").unwrap().weight.dtype(), DType::BF16);
        let mut m = base.clone();
        m.attach_adapters(spectune::nn::modules(&["q_proj", "v_proj", "down_proj"]), &lora, &method, 22).unwrap();
        perturb(&m, 23);
        let mut fresh = base.clone();
        // r + k for SpecLoRA; 2r for PiSSA ([A | A0]) and Spectral^A ([ΔU | U]); r for Spectral^R.
        let rank = match method.name() {
            "speclora" | "speclora-svd" => 4 + method.k,
            "pissa" | "spectral-a" => 8,
            "spectral-r" => 4,
            _ => unreachable!("not in the list above"),
        };
        check_export(&m, &mut fresh, &lora, rank, &format!("bf16 {method:?}"));
    }
}

#[test]
fn export_without_adapters_is_an_error() {
    let m = Decoder::random(cfg(30, true, false), DType::F32, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = export_peft_lora(&m, dir.path(), &LoraConfig::default(), "x").unwrap_err().to_string();
    assert!(e.contains("no adapters"), "{e}");
}

/// Merges `m`, reloads the folder and checks logits, config and dtypes.
fn check_merge(m: &Decoder, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    merge_to_hf(m, dir.path()).unwrap();
    let back = parse_config(&dir.path().join(MERGED_CONFIG_FILE)).unwrap();
    // The parsed config keeps the file it came from; the model's own (random) config has none.
    assert!(back.source_json.is_some());
    assert_eq!(DecoderConfig { source_json: None, ..back }, m.cfg, "{what}: config.json must parse back to the same config");
    let c = read_json(&dir.path().join(MERGED_CONFIG_FILE));
    let arch = if m.cfg.qkv_bias { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" };
    assert_eq!(c["architectures"][0], arch);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let listing = ck.listing();
    assert_eq!(listing.len(), m.cfg.expected_weights().len());
    assert!(listing.iter().all(|t| t.dtype == "F32"), "{what}: every merged weight is f32");
    let probe = ids(m.cfg.vocab_size, 16);
    let diff = merge_report(m, dir.path(), &probe).unwrap();
    eprintln!("merge {what}: max |dlogit| {diff:.2e}");
    assert!(diff < 1e-4, "{what}: merged vs adapted logits differ by {diff:e}");
    // The merge is not vacuous: the merged model differs from the base.
    let mut plain = m.clone();
    plain.linears_mut().into_iter().for_each(|l| l.adapter = None);
    let a = plain.logits(&probe, 1, 16, None).unwrap().to_vec_f32();
    let b = m.logits(&probe, 1, 16, None).unwrap().to_vec_f32();
    assert!(rel_err(&a, &b) > 1e-2, "{what}: adapters barely change the logits");
    // Only the two files, no temporaries.
    let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, [MERGED_CONFIG_FILE, MERGED_WEIGHTS_FILE]);
}

#[test]
fn merge_reproduces_the_adapted_model() {
    let lora = LoraConfig { rank: 3, alpha: 6.0, rslora: false, dropout: 0.0 };
    for (c, bf16) in [(cfg(50, true, false), false), (cfg(50, false, true), false), (cfg(50, false, false), true)] {
        for method in [Method::speclora(6), Method::speclora_by_norm(5), Method::speclora_svd(4), Method::lora()] {
            let mut m = if bf16 { bf16_model(c.clone(), 31) } else { Decoder::random(c.clone(), DType::F32, 31).unwrap() };
            m.attach_adapters(|_| Ok(true), &lora, &method, 32).unwrap();
            perturb(&m, 33);
            check_merge(&m, &format!("{method:?} tied={} bias={} bf16={bf16}", c.tie_word_embeddings, c.qkv_bias));
        }
    }
}

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 4] = [("h", "i"), ("Ġ", "hi"), ("t", "h"), ("th", "e")];

/// A byte-level BPE vocabulary as a GGUF file carries it (267 tokens).
fn gguf_vocab() -> GgufVocab {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut token_types = vec![3; SPECIALS.len()];
    for b in 0u8..=255 {
        tokens.push(byte_to_unicode(b).to_string());
        token_types.push(1);
    }
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
        token_types.push(1);
    }
    GgufVocab {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        merges: MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect(),
        token_types,
        bos_id: Some(1),
        eos_id: Some(2),
        pad_id: None,
        unk_id: None,
        add_bos: Some(true),
        chat_template: Some(spectune::tokenizer::CHATML_TEMPLATE.to_string()),
        ..GgufVocab::default()
    }
}

#[test]
fn gguf_tokenizer_is_written_as_tokenizer_json() {
    let tok = Tokenizer::from_gguf(&gguf_vocab()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = write_tokenizer(Path::new("model.gguf"), &tok, dir.path()).unwrap();
    assert_eq!(files, ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]);
    let back = Tokenizer::from_file(dir.path()).unwrap();
    for text in ["hi there, the thing", "<|im_start|>user\nhi<|im_end|>", "12 345 ünïcode"] {
        assert_eq!(back.encode(text, true).unwrap(), tok.encode(text, true).unwrap(), "{text:?}");
        assert_eq!(back.encode(text, false).unwrap(), tok.encode(text, false).unwrap(), "{text:?}");
    }
    assert_eq!(tok.encode("hi", true).unwrap()[0], 1, "BOS is prepended");
    assert_eq!((back.bos_id(), back.eos_id()), (tok.bos_id(), tok.eos_id()));
    assert_eq!(back.eos_token(), Some("<|im_end|>"));
    assert_eq!(back.chat_template(), tok.chat_template());
    let msgs = [ChatMessage::user("hi")];
    assert_eq!(back.apply_chat_template(&msgs, true).unwrap(), tok.apply_chat_template(&msgs, true).unwrap());
    let gen = read_json(&dir.path().join("generation_config.json"));
    assert_eq!((gen["bos_token_id"].as_u64(), gen["eos_token_id"].as_u64()), (Some(1), Some(2)));
}

/// The CLI paths: an HF base folder (with a tokenizer) + a saved SpecLoRA adapter → merge and
/// export, both reproducing the adapted model.
#[test]
fn merge_and_export_from_folders() {
    let tok = Tokenizer::from_gguf(&gguf_vocab()).unwrap();
    let c = cfg(272, true, false);
    let base_dir = tempfile::tempdir().unwrap();
    let base = bf16_model(c.clone(), 41);
    merge_to_hf(&base, base_dir.path()).unwrap(); // no adapters: writes the base model in f32
    write_tokenizer(Path::new("base.gguf"), &tok, base_dir.path()).unwrap();

    let lora = LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 };
    let mut m = spectune::model::load(&Checkpoint::open(base_dir.path()).unwrap(), DType::F32).unwrap();
    m.attach_adapters(|_| Ok(true), &lora, &Method::speclora_by_norm(9), 42).unwrap();
    perturb(&m, 43);
    let adapter_dir = tempfile::tempdir().unwrap();
    save_adapter(&m, adapter_dir.path(), &lora, &base_dir.path().display().to_string()).unwrap();

    // merge
    let out = tempfile::tempdir().unwrap();
    let s = merge_checkpoint(base_dir.path(), adapter_dir.path(), out.path()).unwrap();
    assert!(s.max_abs_diff < 1e-4, "{s:?}");
    assert!(s.tokenizer_error.is_none(), "{s:?}");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(s.tokenizer_files.iter().any(|n| n == f), "{f} not copied: {s:?}");
    }
    let merged_tok = Tokenizer::from_file(out.path()).unwrap();
    assert_eq!(merged_tok.encode("hi the", true).unwrap(), tok.encode("hi the", true).unwrap());
    assert!(s.probe_len > 3);

    // export (the base model is found through base_model_name_or_path)
    let exp = tempfile::tempdir().unwrap();
    let sum = export_adapter_dir(adapter_dir.path(), None, exp.path(), ExportFormat::PeftLora).unwrap();
    assert_eq!((sum.rank, sum.lora_rank, sum.method), (2 + 9, 2, "speclora"));
    assert_eq!(sum.padded_modules, 2 * 2, "k_proj and v_proj (8 rows) of both layers are padded");
    let mut fresh = spectune::model::load(&Checkpoint::open(base_dir.path()).unwrap(), DType::F32).unwrap();
    load_adapter(&mut fresh, exp.path()).unwrap();
    let probe = ids(272, 10);
    let err = rel_err(&m.logits(&probe, 1, 10, None).unwrap().to_vec_f32(), &fresh.logits(&probe, 1, 10, None).unwrap().to_vec_f32());
    assert!(err < 1e-5, "export from folders: {err:e}");

    // No base model to be found: a clear error asking for --model.
    let lone = tempfile::tempdir().unwrap();
    save_adapter(&m, lone.path(), &lora, "HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
    let e = export_adapter_dir(lone.path(), None, exp.path(), ExportFormat::PeftLora).unwrap_err().to_string();
    assert!(e.contains("--model"), "{e}");
}
