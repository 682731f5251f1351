//! Every decoder family through the CLI as a user runs it: `train` (LoRA on all linears, a few
//! steps) lowers the loss, `generate` runs with the trained adapter, `merge` writes an HF folder
//! whose config keeps the family's keys and which reloads to the same logits; activation
//! checkpointing gives identical losses. The tiny checkpoints of tests/data/families get a
//! character-level tokenizer (128 symbols, one per id) so the commands have text to work on.

use std::path::{Path, PathBuf};
use std::process::Command;

const FAMILIES: [&str; 9] = ["llama", "llama3", "llama_bias", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"];

fn spectune(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spectune")).args(args).output().expect("run spectune");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The symbol of id i: printable ASCII as itself, the rest as `<i>`.
fn symbol(i: u32) -> String {
    match char::from_u32(i) {
        Some(c) if (' '..='~').contains(&c) => c.to_string(),
        _ => format!("<{i}>"),
    }
}

/// A copy of the family's checkpoint with a character-level BPE tokenizer (no merges; id 2 is
/// the end-of-text token, as the fixtures' configs say).
fn model_dir(name: &str, tmp: &Path) -> PathBuf {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/families").join(name);
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..128u32).map(|i| (symbol(i), i.into())).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 2, "content": symbol(2), "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), format!(r#"{{"eos_token": "{}", "add_bos_token": false}}"#, symbol(2))).unwrap();
    dir
}

fn losses(out: &Path) -> Vec<f64> {
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    metrics.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64()).collect()
}

fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<f64> {
    let mut args = vec!["train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(["--method", "lora", "--rank", "4", "--steps", "6", "--lr", "2e-2", "--batch", "2", "--seq-len", "24", "--threads", "2"]);
    args.extend(extra);
    let (ok, log) = spectune(&args);
    assert!(ok, "{}: train failed:\n{log}", model.display());
    losses(out)
}

#[test]
fn every_family_trains_generates_and_merges_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, "the cat sat on the mat. the dog sat on the log. ".repeat(8)).unwrap();
    for name in FAMILIES {
        let model = model_dir(name, tmp.path());
        let out = tmp.path().join(format!("{name}-run"));
        let l = train(&model, &data, &out, &[]);
        assert_eq!(l.len(), 6, "{name}: {l:?}");
        assert!(l[5] < l[0], "{name}: training should lower the loss: {l:?}");
        let adapter = out.join("adapter");
        let (ok, log) = spectune(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            "the cat",
            "--max-tokens",
            "8",
            "--greedy",
        ]);
        assert!(ok, "{name}: generate failed:\n{log}");
        let merged = tmp.path().join(format!("{name}-merged"));
        let (ok, log) = spectune(&["merge", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
        assert!(ok, "{name}: merge failed:\n{log}");
        // The merged config keeps every key of the source (rope scaling, soft caps, windows, …).
        let read = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap() };
        let (src, dst) = (read(&model), read(&merged));
        for (k, v) in src.as_object().unwrap() {
            if k != "dtype" && k != "torch_dtype" {
                assert_eq!(&dst[k], v, "{name}: merged config.json changed `{k}`");
            }
        }
        let reloaded = spectune::model::open(&merged, spectune::DType::F32).unwrap_or_else(|e| panic!("{name}: merged folder: {e}"));
        let base = spectune::model::open(&model, spectune::DType::F32).unwrap();
        assert!(reloaded.cfg.same_model(&base.cfg), "{name}: merged config parses to another model");
    }
}

#[test]
fn checkpointing_gives_identical_losses_on_non_llama_families() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.txt");
    std::fs::write(&data, "a quick brown fox jumps over the lazy dog. ".repeat(8)).unwrap();
    for name in ["gemma2", "phi3", "qwen3"] {
        let model = model_dir(name, tmp.path());
        let plain = train(&model, &data, &tmp.path().join(format!("{name}-plain")), &[]);
        let ckpt = train(&model, &data, &tmp.path().join(format!("{name}-ckpt")), &["--checkpointing", "--checkpoint-keep", "0"]);
        assert_eq!(plain, ckpt, "{name}: losses with and without activation checkpointing");
    }
}
