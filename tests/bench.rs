//! `spectune bench` on the tiny shape: it trains (gradient norm > 0, loss falls), reports
//! consistent figures, writes a loadable starting point, and refuses bad settings by name.

use spectune::bench::{self, BenchArgs};

fn tiny() -> BenchArgs {
    BenchArgs { shape: Some("tiny".into()), batch: 2, seq_len: 32, steps: 3, warmup: 1, lr: 1e-2, ..BenchArgs::default() }
}

#[test]
fn tiny_bench_trains_and_reports() {
    let r = bench::run(&tiny()).unwrap();
    assert_eq!(r.losses.len(), 4);
    assert_eq!(r.step_times_s.len(), 3);
    assert!(r.grad_norm > 0.0 && r.grad_norm.is_finite());
    assert!(r.final_loss < r.losses[0], "loss did not fall: {:?}", r.losses);
    assert_eq!(r.tokens_per_step, 64);
    assert!((r.tokens_per_s * r.step_time_median_s - 64.0).abs() < 1e-6);
    assert!(r.step_times_s.contains(&r.step_time_median_s));
    assert!(r.peak_rss_bytes > 0);
    // The LoRA parameters of 7 linears × 2 layers at r = 16.
    let (h, f, kv) = (64, 160, 2 * 16);
    let per_layer = 16 * ((h + h) + (h + kv) * 2 + (h + h) + (h + f) * 2 + (f + h));
    assert_eq!(r.trainable_params, 2 * per_layer);
}

#[test]
fn same_seed_same_losses_and_checkpointing_changes_nothing_but_memory() {
    let a = bench::run(&tiny()).unwrap();
    let b = bench::run(&BenchArgs { checkpointing: true, ..tiny() }).unwrap();
    assert_eq!(a.losses, b.losses);
}

#[test]
fn bf16_weights_train_close_to_f32() {
    let a = bench::run(&tiny()).unwrap();
    let b = bench::run(&BenchArgs { dtype: "bf16".into(), ..tiny() }).unwrap();
    assert_eq!(b.weights_dtype, "bf16");
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert!((x - y).abs() < 0.02 * x.abs(), "{x} vs {y}");
    }
}

#[test]
fn useful_flops_follow_the_documented_formula() {
    let args = tiny();
    let (model, ..) = bench::build_model(&args).unwrap();
    let (b, t) = (2usize, 32usize);
    let (h, f, v, hd, nh, kv) = (64.0, 160.0, 256.0, 16.0, 4.0, 32.0);
    let n = (b * t) as f64;
    let frozen = 2.0 * (h * h + 2.0 * h * kv + h * h + 3.0 * h * f) + v * h;
    let adapter = 2.0 * 16.0 * ((h + h) + 2.0 * (h + kv) + (h + h) + 2.0 * (h + f) + (f + h));
    let attn = 2.0 * 12.0 * hd * nh * b as f64 * (t * (t + 1) / 2) as f64;
    let want = 4.0 * frozen * n + 6.0 * adapter * n + attn;
    assert_eq!(bench::useful_flops(&model, b, t), want);
}

#[test]
fn bad_settings_are_named_errors() {
    let e = bench::run(&BenchArgs { device: "cuda".into(), ..tiny() }).unwrap_err().to_string();
    assert!(e.contains("cuda"), "{e}");
    let e = bench::run(&BenchArgs { shape: Some("gpt-9".into()), ..tiny() }).unwrap_err().to_string();
    assert!(e.contains("--shape"), "{e}");
    let e = bench::run(&BenchArgs { dtype: "f8".into(), ..tiny() }).unwrap_err().to_string();
    assert!(e.contains("--dtype"), "{e}");
    let e = bench::run(&BenchArgs { method: "dora".into(), ..tiny() }).unwrap_err().to_string();
    assert!(e.contains("--method"), "{e}");
    let e = bench::run(&BenchArgs { steps: 0, ..tiny() }).unwrap_err().to_string();
    assert!(e.contains("--steps"), "{e}");
    // lr = 0 leaves the adapter untouched but still computes gradients: that is a valid run.
    assert!(bench::run(&BenchArgs { lr: 0.0, ..tiny() }).unwrap().grad_norm > 0.0);
}

#[test]
fn save_init_writes_a_checkpoint_that_bench_reloads_to_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    bench::save_init(&tiny(), &init).unwrap();
    for f in ["config.json", "model.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "batch.safetensors", "bench.json"] {
        assert!(init.join(f).exists(), "{f} missing");
    }
    // The saved weights, loaded as a checkpoint, give the same run as the in-memory shape.
    let a = bench::run(&tiny()).unwrap();
    let b = bench::run(&BenchArgs { shape: None, model: Some(init.clone()), ..tiny() }).unwrap();
    assert_eq!(a.losses, b.losses);
    let e = bench::save_init(&BenchArgs { method: "speclora".into(), ..tiny() }, &init).unwrap_err().to_string();
    assert!(e.contains("lora"), "{e}");
}
