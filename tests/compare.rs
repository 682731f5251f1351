//! `spectune compare` on the offline synthetic task: every method lowers the held-out loss,
//! budgets are matched to LoRA's, the fidelity check pairs the two SpecLoRA forms, and bad method
//! names fail before any training.

use std::process::Command;

use spectune::train::compare::{closest_rank, compare, render, CompareOptions};

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
        .args(["compare", "--synthetic", "--steps", "8", "--methods", "lora,speclora", "--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("perplexity") && stdout.contains("lora") && stdout.contains("speclora"), "{stdout}");
    let bad = Command::new(env!("CARGO_BIN_EXE_spectune"))
        .args(["compare", "--synthetic", "--methods", "lora,bogus", "--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("bogus"));
}
