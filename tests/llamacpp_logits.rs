//! Logits at every position of the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, spectune vs
//! llama.cpp. Optional (a 491 MB download and a llama.cpp build), so `#[ignore]`d and env-gated;
//! `tests/llamacpp/logits.sh` builds the C++ side (`tests/llamacpp/logits.cpp`) and runs it:
//!
//! ```text
//! SPECTUNE_LLAMACPP=/path/to/llama.cpp tests/llamacpp/logits.sh
//! ```
//!
//! Both sides get the same token ids (spectune's tokenizer, checked equal to `llama-tokenize`'s)
//! decoded as one causal sequence at positions 0..n-1. Per position it reports, over the
//! vocabulary, the max and median |Δlogit|, the relative L2 error ‖Δ‖/‖llama.cpp‖, whether the
//! argmax agrees, and KL(p_llama.cpp ‖ p_spectune) of the softmax. llama.cpp runs twice: with
//! its default f16 KV cache and with an f32 one.
//!
//! Why they are not equal: in this file most matrices are Q5_0 or Q8_0 (rows of 896 are not
//! whole 256-blocks), only ffn_down is Q4_K/Q6_K. For Q5_0/Q8_0 weights llama.cpp's CPU kernels
//! quantize the activation row to Q8_0 (per 32 values: an f16 scale, i8 values), for Q4_K/Q6_K
//! to Q8_K (per 256 values: an f32 scale, i8 values), then take integer dot products; spectune
//! dequantizes the weight tile to f32 and multiplies with f32 activations. Rounding to i8 on a
//! block of max |x| = m errs by up to m/254 per value. An F16 copy of the same dequantized
//! weights (llama.cpp then rounds activations to f16 instead) is the control.

use spectune::io::gguf_write::GgmlType;
use spectune::io::Checkpoint;
use spectune::peft::export::merge_to_gguf;
use spectune::DType;
use std::path::{Path, PathBuf};

/// The probe text: code and prose, ~80 tokens.
const PROBE: &str = "fn fibonacci(n: u64) -> u64 {
    match n {
        0 => 0,
        1 => 1,
        _ => fibonacci(n - 1) + fibonacci(n - 2),
    }
}

The quick brown fox jumps over the lazy dog. A memory map lets a program read a file as if it were an array in memory.
";

struct Row {
    max_abs: f64,
    median_abs: f64,
    rel_l2: f64,
    argmax_ours: usize,
    argmax_theirs: usize,
    /// Our logit gap between our top token and theirs (0 when they agree).
    margin: f64,
    kl: f64,
}

fn argmax(r: &[f64]) -> usize {
    (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b })
}

fn log_softmax(r: &[f64]) -> Vec<f64> {
    let mx = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = mx + r.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
    r.iter().map(|x| x - lse).collect()
}

fn compare_row(ours: &[f64], theirs: &[f64]) -> Row {
    let mut d: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).collect();
    let rel_l2 = (d.iter().map(|x| x * x).sum::<f64>() / theirs.iter().map(|x| x * x).sum::<f64>()).sqrt();
    d.sort_by(f64::total_cmp);
    let (lo, lt) = (log_softmax(ours), log_softmax(theirs));
    // KL(p_theirs ‖ p_ours) = Σ p_t (log p_t − log p_o)
    let kl = lt.iter().zip(&lo).map(|(t, o)| t.exp() * (t - o)).sum::<f64>();
    let (ao, at) = (argmax(ours), argmax(theirs));
    Row { max_abs: d[d.len() - 1], median_abs: d[d.len() / 2], rel_l2, argmax_ours: ao, argmax_theirs: at, margin: ours[ao] - ours[at], kl }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn llamacpp_logits(bin: &Path, model: &Path, ids: &[u32], attention: &str, dir: &Path) -> Vec<f32> {
    let ids_file = dir.join("ids.txt");
    std::fs::write(&ids_file, ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" ")).unwrap();
    let out = dir.join("logits.f32");
    let o = std::process::Command::new(bin).arg(model).arg(&ids_file).arg(&out).arg(attention).output().unwrap();
    assert!(o.status.success(), "{}: {}", bin.display(), String::from_utf8_lossy(&o.stderr));
    std::fs::read(&out).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
#[ignore = "needs llama.cpp (SPECTUNE_LLAMACPP, SPECTUNE_LLAMACPP_LOGITS) and a 491 MB GGUF; run via tests/llamacpp/logits.sh"]
fn qwen2_q4km_logits_match_llamacpp() {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let src = env("SPECTUNE_LLAMACPP").expect("set SPECTUNE_LLAMACPP to the llama.cpp source folder (tests/llamacpp/build.sh)");
    let tool = env("SPECTUNE_LLAMACPP_LOGITS").expect("set SPECTUNE_LLAMACPP_LOGITS to the binary tests/llamacpp/logits.sh builds");
    let model = env("SPECTUNE_LLAMACPP_MODEL").unwrap_or_else(|| spectune::fetch::qwen2_5_coder_0_5b_q4km().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let text = match env("SPECTUNE_LLAMACPP_TEXT") {
        Some(p) => std::fs::read_to_string(p).unwrap(),
        None => PROBE.to_string(),
    };

    let ck = Checkpoint::open(&model).unwrap();
    let tok = ck.tokenizer().unwrap();
    // llama-tokenize adds special tokens the way the GGUF says (Qwen2: no BOS).
    let ids = tok.encode(&text, true).unwrap();
    let text_file = dir.path().join("probe.txt");
    std::fs::write(&text_file, &text).unwrap();
    let o = std::process::Command::new(src.join("build/bin/llama-tokenize"))
        .arg("-m")
        .arg(&model)
        .arg("-f")
        .arg(&text_file)
        .args(["--ids", "--log-disable"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let list = out.lines().rev().find(|l| l.trim_start().starts_with('[')).expect("llama-tokenize --ids prints a list");
    let theirs: Vec<u32> =
        list.trim().trim_matches(|c| c == '[' || c == ']').split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    assert_eq!(ids, theirs, "spectune and llama.cpp tokenize the probe differently");
    let n = ids.len();

    let m = spectune::model::load(&ck, DType::F32).unwrap();
    let t0 = std::time::Instant::now();
    let ours = spectune::no_grad(|| m.logits(&ids, 1, n, None)).unwrap().to_vec_f64();
    eprintln!("spectune: {n} positions in {:.1} s", t0.elapsed().as_secs_f64());
    let v = ours.len() / n;
    assert_eq!(v, m.cfg.vocab_size);

    // 1. The Q4_K_M file itself, with llama.cpp's default (f16) attention and with f32 attention.
    let theirs_default = llamacpp_logits(&tool, &model, &ids, "f16", dir.path());
    let theirs_f32 = llamacpp_logits(&tool, &model, &ids, "f32", dir.path());
    let default = summarize("Q4_K_M, llama.cpp defaults (f16 KV, flash attention)", &ours, &theirs_default, n, v);
    let q4 = summarize("Q4_K_M, f32 attention", &ours, &theirs_f32, n, v);
    // llama.cpp against itself (defaults vs f32 attention): how far its own rounding moves it.
    let own = summarize("llama.cpp defaults vs llama.cpp f32 attention", &theirs_default.iter().map(|&x| x as f64).collect::<Vec<_>>(), &theirs_f32, n, v);
    // 2. Control: the same weights dequantized by spectune and written as F16. llama.cpp's F16
    //    matmul rounds activations to f16 (11-bit significand) instead of 8-bit blocks, so if
    //    the Q4_K_M gap is the Q8_K/Q8_0 activation rounding, it shrinks here.
    let Checkpoint::Gguf(g) = &ck else { panic!("{} is not a GGUF", model.display()) };
    let f16 = dir.path().join("dequantized-f16.gguf");
    merge_to_gguf(&m, g, &f16, GgmlType::F16).unwrap();
    let control = summarize("dequantized to F16, f32 attention", &ours, &llamacpp_logits(&tool, &f16, &ids, "f32", dir.path()), n, v);
    eprintln!("\n{}\n{}\n{}\n{}", default.line, q4.line, own.line, control.line);

    // The tolerance (see docs/ARCHITECTURE.md, GGUF): what 8-bit activation blocks explain.
    let mut failures = Vec::new();
    for s in [&default, &q4] {
        if s.agree * 10 < n * 9 {
            failures.push(format!("{}: argmax agrees at only {}/{n} positions", s.name, s.agree));
        }
        if s.worst_margin > 0.5 {
            failures.push(format!("{}: an argmax disagreement where our top logit leads theirs by {:.3} (> 0.5, not a near-tie)", s.name, s.worst_margin));
        }
        if s.kl.1 > 1e-3 || s.kl.0 > 2e-2 {
            failures.push(format!("{}: KL median {:.2e} (≤ 1e-3) max {:.2e} (≤ 2e-2)", s.name, s.kl.1, s.kl.0));
        }
        if s.rel.0 > 0.1 {
            failures.push(format!("{}: relative L2 error up to {:.2e} (≤ 0.1)", s.name, s.rel.0));
        }
        if s.halves.1 > 2.0 * s.halves.0 {
            failures.push(format!("{}: error grows with position: mean rel L2 {:.2e} → {:.2e}", s.name, s.halves.0, s.halves.1));
        }
    }
    if control.rel.1 * 3.0 > q4.rel.1 {
        failures.push(format!(
            "the F16 control is not much closer (median rel L2 {:.2e} vs {:.2e}): the Q4_K_M gap is not the activation rounding",
            control.rel.1, q4.rel.1
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

struct Summary {
    name: String,
    line: String,
    /// (max, median) over positions.
    rel: (f64, f64),
    kl: (f64, f64),
    agree: usize,
    /// The largest of our top-logit leads at positions where the argmaxes differ.
    worst_margin: f64,
    /// Mean rel L2 over the first and the second half of the positions.
    halves: (f64, f64),
}

fn summarize(name: &str, ours: &[f64], theirs: &[f32], n: usize, v: usize) -> Summary {
    assert_eq!(theirs.len(), n * v, "{name}: llama.cpp wrote {} logits, expected {n}×{v}", theirs.len());
    let rows: Vec<Row> = (0..n)
        .map(|p| {
            let t: Vec<f64> = theirs[p * v..(p + 1) * v].iter().map(|&x| x as f64).collect();
            compare_row(&ours[p * v..(p + 1) * v], &t)
        })
        .collect();
    eprintln!("== {name}: {n} positions of {v} logits");
    eprintln!("pos   max|Δ|   med|Δ|   rel L2     KL        argmax (ours/theirs, our lead)");
    for (p, r) in rows.iter().enumerate() {
        let mark = if r.argmax_ours == r.argmax_theirs { String::new() } else { format!("{}/{} {:.3}", r.argmax_ours, r.argmax_theirs, r.margin) };
        eprintln!("{p:3}  {:7.4}  {:7.4}  {:8.2e}  {:8.2e}  {mark}", r.max_abs, r.median_abs, r.rel_l2, r.kl);
    }
    let col = |f: fn(&Row) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let stat = |x: Vec<f64>| (x.iter().cloned().fold(0.0, f64::max), median(x));
    let abs = stat(col(|r| r.max_abs));
    let med = stat(col(|r| r.median_abs));
    let rel = stat(col(|r| r.rel_l2));
    let kl = stat(col(|r| r.kl));
    let agree = rows.iter().filter(|r| r.argmax_ours == r.argmax_theirs).count();
    let worst_margin = rows.iter().map(|r| r.margin).fold(0.0, f64::max);
    let mean = |a: usize, b: usize| rows[a..b].iter().map(|r| r.rel_l2).sum::<f64>() / (b - a) as f64;
    let halves = (mean(0, n / 2), mean(n / 2, n));
    let line = format!(
        "{name}: max|Δ| max {:.4} median {:.4}; median|Δ| median {:.4}; rel L2 max {:.2e} median {:.2e}; KL max {:.2e} median {:.2e}; \
         argmax {agree}/{n} (worst lead {worst_margin:.3}); mean rel L2 halves {:.2e} / {:.2e}",
        abs.0, abs.1, med.1, rel.0, rel.1, kl.0, kl.1, halves.0, halves.1
    );
    Summary { name: name.to_string(), line, rel, kl, agree, worst_margin, halves }
}
