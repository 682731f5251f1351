//! `spectune compare` on the offline synthetic task: every method lowers the held-out loss,
//! budgets are matched to LoRA's, the fidelity check pairs the two SpecLoRA forms, and bad method
//! names fail before any training.

use std::process::Command;

use spectune::train::compare::{closest_rank, compare, default_lr_grid, mean_std, render, sample_questions, CompareOptions};

fn opts(dir: &std::path::Path, methods: &[&str], steps: u64) -> CompareOptions {
    CompareOptions {
        methods: methods.iter().map(|m| m.to_string()).collect(),
        steps,
        eval_tokens: 1024,
        out: dir.to_path_buf(),
        synthetic: true,
        ..Default::default()
    }
}

#[test]
fn closest_rank_picks_the_nearest_count() {
    // count(r) = 100·r + 60: budget 800 lies between r = 7 (760, 40 below) and r = 8 (860).
    let mut calls = 0;
    let mut count = |r: usize| -> spectune::Result<usize> {
        calls += 1;
        Ok(100 * r + 60)
    };
    assert_eq!(closest_rank(800, 64, &mut count).unwrap(), 7);
    assert!(calls < 20, "binary search, not a scan ({calls} calls)");
    assert_eq!(closest_rank(830, 64, &mut |r| Ok(100 * r + 60)).unwrap(), 8);
    // A tie goes to the smaller rank; below the smallest count → 1; above the largest → max.
    assert_eq!(closest_rank(810, 64, &mut |r| Ok(100 * r + 60)).unwrap(), 7);
    assert_eq!(closest_rank(10, 64, &mut |r| Ok(100 * r + 60)).unwrap(), 1);
    assert_eq!(closest_rank(1_000_000, 64, &mut |r| Ok(100 * r + 60)).unwrap(), 64);
    // Quadratic counts (e.g. r×r rotations) work too.
    assert_eq!(closest_rank(2 * 24 * 24, 64, &mut |r| Ok(2 * r * r)).unwrap(), 24);
}

#[test]
fn the_question_sample_is_fixed_unique_in_order_and_spread() {
    let s = sample_questions(10_042, 500);
    assert_eq!(s.len(), 500);
    assert!(s.windows(2).all(|w| w[0] < w[1]), "sorted and without repeats");
    assert!(*s.last().unwrap() < 10_042);
    assert_eq!(s, sample_questions(10_042, 500), "the same sample every time");
    // Spread over the file (not its first 500): about half the sample in each half of the file.
    let first_half = s.iter().filter(|&&i| i < 5_021).count();
    assert!((200..300).contains(&first_half), "{first_half} of 500 in the first half");
    assert_eq!(sample_questions(7, 7), (0..7).collect::<Vec<_>>());
    assert_eq!(sample_questions(7, 100), (0..7).collect::<Vec<_>>());
    assert!(sample_questions(7, 0).is_empty());
    // Without multiple-choice held-out data there is nothing to sample: refused before training.
    let dir = tempfile::tempdir().unwrap();
    let e = compare(&CompareOptions { eval_questions: Some(10), ..opts(dir.path(), &["lora"], 1) }, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--eval-questions") && e.contains("multiple-choice"), "{e}");
    // A held-out file with a bad multiple-choice line: the error names the file and the line.
    let bad = dir.path().join("held.jsonl");
    std::fs::write(&bad, "{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 0}\n{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 3}\n").unwrap();
    let (model, _) = spectune::train::demo::write_synthetic(dir.path(), 0).unwrap();
    let good = dir.path().join("train.jsonl");
    std::fs::write(&good, "{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 0}\n").unwrap();
    let o = CompareOptions { model: Some(model), data: Some(good), eval_data: Some(bad), eval_questions: Some(1), ..opts(dir.path(), &["lora"], 1) };
    let e = compare(&CompareOptions { synthetic: false, ..o }, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("held.jsonl") && e.contains("line 2") && e.contains("out of range"), "{e}");
}

#[test]
fn every_method_learns_the_synthetic_task_with_a_matched_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    let r = compare(&opts(dir.path(), &["lora", "speclora", "speclora-svd"], 40), &mut |l| lines.push(l)).unwrap();
    assert_eq!(r.results.len(), 3);
    assert_eq!(r.reference_rank, 8);
    // LoRA r = 8 on 7 linears × 2 layers of hidden 64, FFN 128, kv 32: 8·(128+96+96+128+192+192+192)·2.
    assert_eq!(r.budget, 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 2);
    for m in &r.results {
        assert!(m.eval_loss < r.base_loss - 1.0, "{}: {} vs base {}", m.method, m.eval_loss, r.base_loss);
        assert!((0.9..1.1).contains(&m.budget_ratio), "{}: {}", m.method, m.budget_ratio);
        assert!(m.adapter_dir.join("adapter_model.safetensors").exists());
    }
    assert_eq!((r.results[0].rank, r.results[0].trainable), (8, r.budget));
    // SpecLoRA adds k = 32 scales per linear (14 linears): r = 8 is +3.5 %, r = 7 would be −9 %.
    assert_eq!(r.results[1].trainable, r.budget + 14 * 32);
    assert_eq!(r.results[1].rank, 8);
    // Fidelity: both layers × 7 linears, d vectors of length k; the induced ratios are those of
    // the positional mask alone, so they moved away from 1 once d did.
    assert_eq!(r.fidelity.len(), 14);
    for f in &r.fidelity {
        assert_eq!((f.d_rows.len(), f.d_svd.len(), f.induced_ratio.len()), (32, 32, 8), "{} {}", f.layer, f.module);
        assert!(f.d_rows.iter().any(|d| (d - 1.0).abs() > 1e-3) && f.d_svd.iter().any(|d| (d - 1.0).abs() > 1e-3));
        assert!(f.induced_ratio.iter().any(|x| (x - 1.0).abs() > 1e-6));
    }
    assert_eq!(r.fidelity_summary.len(), 7);
    let text = render(&r);
    for needle in ["base (none)", "speclora-svd", "approximation fidelity", "d, SVD form", "σ(Γ⊙W)/σ(W)"] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("compare.json")).unwrap()).unwrap();
    assert_eq!(json["results"].as_array().unwrap().len(), 3);
    assert!(lines.iter().any(|l| l.contains("held-out loss")));
    // The fair part: 3 seeds × the default grid per method, the chosen rate the one with the
    // lowest mean selection-half loss, spreads over seeds, accuracy, time and memory.
    assert_eq!((r.seeds, r.val_counted > 0, r.selected_on_reported), (3, true, false));
    for m in &r.results {
        assert_eq!(m.grid.len(), 2, "{}", m.method);
        let best = m.grid.iter().map(|g| g.val_loss).fold(f64::INFINITY, f64::min);
        assert_eq!(m.grid.iter().find(|g| g.lr == m.lr).unwrap().val_loss, best, "{}", m.method);
        for g in &m.grid {
            assert_eq!(g.runs.iter().map(|x| x.seed).collect::<Vec<_>>(), vec![0, 1, 2]);
        }
        // Different seeds give different runs, so the spread is real.
        assert!(m.eval_loss_std > 0.0 && m.accuracy_std >= 0.0, "{}: {} {}", m.method, m.eval_loss_std, m.accuracy_std);
        let chosen = &m.grid.iter().find(|g| g.lr == m.lr).unwrap().runs;
        let mean = chosen.iter().map(|x| x.eval_loss).sum::<f64>() / 3.0;
        assert!((mean - m.eval_loss).abs() < 1e-12);
        assert!(m.accuracy > r.base_accuracy + 0.1, "{}: accuracy {} vs base {}", m.method, m.accuracy, r.base_accuracy);
        assert!(m.seconds > 0.0);
        assert!(m.adapter_dir.starts_with(dir.path().join(&m.method)));
    }
    for needle in ["3 seeds per learning rate", "budget: LoRA r=8 = 16384", "learning-rate sweeps", "accuracy", "peak mem", " ± "] {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
    let png = std::fs::read(dir.path().join("compare.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn mean_std_is_the_sample_spread() {
    let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
    assert_eq!((m, s), (2.0, 1.0));
    assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
    assert_eq!(default_lr_grid("full", false).len(), 3);
    assert!(default_lr_grid("full", false)[2] < default_lr_grid("lora", false)[0]);
}

#[test]
fn multiple_choice_data_trains_and_reports_mc_accuracy() {
    // The synthetic model (byte-level tokenizer) on a custom multiple-choice task: the answer is
    // the query's last letter repeated; training on the gold answers must lift acc above chance.
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = spectune::train::demo::write_synthetic(dir.path(), 0).unwrap();
    let letters = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let line = |i: usize| {
        let x = letters[i % 8];
        let gold = i % 3;
        let mut choices: Vec<String> = (0..3).map(|j| letters[(i + 3 + j) % 8].repeat(3)).collect();
        choices[gold] = x.repeat(3);
        serde_json::json!({"query": format!("say {x}:"), "choices": choices, "gold": gold}).to_string()
    };
    let train: Vec<String> = (0..64).map(line).collect();
    let eval: Vec<String> = (64..88).map(line).collect();
    std::fs::write(dir.path().join("train.jsonl"), train.join("\n")).unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), eval.join("\n")).unwrap();
    let o = CompareOptions {
        methods: vec!["lora".into()],
        steps: 30,
        seeds: Some(2),
        lrs: Some(vec![1e-2]),
        batch: Some(8),
        seq_len: Some(16),
        eval_tokens: 64,
        model: Some(model),
        data: Some(dir.path().join("train.jsonl")),
        eval_data: Some(dir.path().join("eval.jsonl")),
        out: dir.path().join("out"),
        no_plot: true,
        ..Default::default()
    };
    let r = compare(&o, &mut |_| {}).unwrap();
    assert!(r.accuracy.contains("multiple-choice"), "{}", r.accuracy);
    let m = &r.results[0];
    assert_eq!((m.grid.len(), m.grid[0].runs.len()), (1, 2));
    assert!(m.eval_loss < r.base_loss, "{} vs {}", m.eval_loss, r.base_loss);
    assert!(m.accuracy > 0.6, "acc {} (base {})", m.accuracy, r.base_accuracy);
    // Half-given custom tasks are refused.
    let e = compare(&CompareOptions { eval_data: None, ..o.clone() }, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--eval-data"), "{e}");
    let e = compare(&CompareOptions { lr_grid: vec![("dora".into(), vec![1e-3])], ..o }, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("dora"), "{e}");
}

#[test]
fn without_both_speclora_forms_there_is_no_fidelity_table_and_bad_names_fail_early() {
    let dir = tempfile::tempdir().unwrap();
    let r = compare(&CompareOptions { no_budget_match: true, rank: Some(4), ..opts(dir.path(), &["speclora", "lora"], 5) }, &mut |_| {}).unwrap();
    assert!(r.fidelity.is_empty());
    assert!(r.results.iter().all(|m| m.rank == 4));
    assert!(render(&r).contains("no fidelity check"));
    let e = compare(&opts(dir.path(), &["lora", "nonsense"], 5), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("nonsense") && e.contains("unknown method"), "{e}");
    let e = compare(&opts(dir.path(), &[], 5), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--methods"), "{e}");
    let e =
        compare(&CompareOptions { fidelity_layers: Some(vec![7]), ..opts(dir.path(), &["speclora", "speclora-svd"], 2) }, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("layer 7"), "{e}");
}

#[test]
fn cli_prints_the_side_by_side_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spectune"))
        .args([
            "compare",
            "--synthetic",
            "--steps",
            "8",
            "--methods",
            "lora,speclora",
            "--seeds",
            "2",
            "--lr-grid",
            "speclora=1e-2",
            "--out",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("held-out loss") && stdout.contains("lora") && stdout.contains("speclora"), "{stdout}");
    // speclora swept its own one-point grid, lora the default two.
    assert!(stdout.contains("speclora       1e-2: ") && !stdout.contains("speclora       3e-3"), "{stdout}");
    assert!(dir.path().join("compare.png").exists());
    let bad = Command::new(env!("CARGO_BIN_EXE_spectune"))
        .args(["compare", "--synthetic", "--lr-grid", "lora:1e-3", "--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("method=lr"));
    let bad = Command::new(env!("CARGO_BIN_EXE_spectune"))
        .args(["compare", "--synthetic", "--methods", "lora,bogus", "--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("bogus"));
}

#[test]
fn resume_reuses_finished_runs_and_reruns_only_what_is_missing_or_different() {
    let dir = tempfile::tempdir().unwrap();
    let o = CompareOptions { seeds: Some(2), lrs: Some(vec![1e-2]), no_plot: true, ..opts(dir.path(), &["speclora", "speclora-svd"], 6) };
    let first = compare(&o, &mut |_| {}).unwrap();
    // Every run left its result.json, and the base evaluation its base.json.
    let run_dir = |m: &str, seed: u64| dir.path().join(m).join("lr1e-2").join(format!("seed{seed}"));
    for m in ["speclora", "speclora-svd"] {
        for seed in [0, 1] {
            let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir(m, seed).join("result.json")).unwrap()).unwrap();
            assert_eq!(rec["run"]["seed"], seed);
            assert!(rec["key"].as_str().unwrap().contains(&format!("method={m} ")));
        }
    }
    assert!(dir.path().join("base.json").exists());
    // Resumed with the same options: nothing trains, the numbers and the fidelity table are the same.
    let resume = CompareOptions { resume: true, ..o.clone() };
    let mut lines = Vec::new();
    let again = compare(&resume, &mut |l| lines.push(l)).unwrap();
    assert_eq!(lines.iter().filter(|l| l.contains("reused")).count(), 4, "{lines:#?}");
    assert!(!lines.iter().any(|l| l.starts_with("\n== ")), "a run trained again: {lines:#?}");
    assert!(lines.iter().any(|l| l.contains("reusing the base model's evaluation")));
    assert_eq!(again.base_loss, first.base_loss);
    for (a, b) in first.results.iter().zip(&again.results) {
        assert_eq!((a.eval_loss, a.accuracy, a.seconds), (b.eval_loss, b.accuracy, b.seconds), "{}", a.method);
    }
    assert_eq!(first.fidelity.len(), again.fidelity.len());
    for (a, b) in first.fidelity.iter().zip(&again.fidelity) {
        let close = |x: &[f64], y: &[f64]| x.len() == y.len() && x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-6);
        assert!(close(&a.d_rows, &b.d_rows) && close(&a.d_svd, &b.d_svd), "layer {} {}", a.layer, a.module);
    }
    // A missing result (an interrupted run) is trained again, and only it.
    std::fs::remove_file(run_dir("speclora-svd", 1).join("result.json")).unwrap();
    let mut lines = Vec::new();
    let third = compare(&resume, &mut |l| lines.push(l)).unwrap();
    let trained: Vec<&String> = lines.iter().filter(|l| l.starts_with("\n== ")).collect();
    assert_eq!(trained.len(), 1, "{trained:?}");
    assert!(trained[0].contains("speclora-svd") && trained[0].contains("seed 1"), "{trained:?}");
    assert!(run_dir("speclora-svd", 1).join("result.json").exists());
    // Same seed, same data order, same initialization: the rerun reproduces the first numbers.
    assert_eq!(third.results[1].grid[0].runs[1].eval_loss, first.results[1].grid[0].runs[1].eval_loss);
    // Other settings (more steps) do not reuse the stored runs; without --resume nothing is reused.
    let mut lines = Vec::new();
    compare(&CompareOptions { steps: 7, methods: vec!["speclora".into()], seeds: Some(1), ..resume.clone() }, &mut |l| lines.push(l)).unwrap();
    assert!(!lines.iter().any(|l| l.contains("reused") || l.contains("reusing")), "{lines:#?}");
    let mut lines = Vec::new();
    compare(&CompareOptions { methods: vec!["speclora".into()], seeds: Some(1), ..o }, &mut |l| lines.push(l)).unwrap();
    assert!(!lines.iter().any(|l| l.contains("reused")), "{lines:#?}");
}
