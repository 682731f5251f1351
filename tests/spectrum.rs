//! `spectune spectrum`: the analysis on synthetic matrices with known answers, bad input, and the
//! CLI end to end on the tiny model with an adapter trained for a few steps (and the same adapter
//! merged into a checkpoint, analysed with --tuned).

mod common;

use std::path::Path;
use std::process::Command;

use spectune::gradcheck::SplitMix;
use spectune::io::Checkpoint;
use spectune::model::Decoder;
use spectune::ops::CeOptions;
use spectune::peft::export::merge_to_hf;
use spectune::peft::io::save_adapter;
use spectune::peft::{LoraConfig, Method};
use spectune::spectrum::{analyze, block_size, compare_matrices, random_change, SpectrumOptions, TunedSource, INTRUDER_THRESHOLD};
use spectune::svd::thin_svd;
use spectune::{backward, AdamW, AdamWConfig, DType};

/// A random orthonormal basis of R^d, row-major [d, d] (columns are the basis vectors).
fn orthonormal(d: usize, rng: &mut SplitMix) -> Vec<f64> {
    let (q, _, _) = thin_svd(&rng.vec(d * d, -1.0, 1.0), d, d).unwrap();
    q
}

/// W = Σ_j s_j · a_j · b_jᵀ for columns a_j of A [m, ·] (row stride `ra`) and b_j of B [n, ·].
fn compose(a: &[f64], ra: usize, b: &[f64], rb: usize, s: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut w = vec![0.0; m * n];
    for (j, &sj) in s.iter().enumerate() {
        for i in 0..m {
            for c in 0..n {
                w[i * n + c] += a[i * ra + j] * sj * b[c * rb + j];
            }
        }
    }
    w
}

fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut t = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

fn assert_all_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w} (all: {got:?})");
    }
}

fn ones(k: usize) -> Vec<f64> {
    vec![1.0; k]
}

/// Distinct, decaying singular values.
fn spectrum(r: usize) -> Vec<f64> {
    (0..r).map(|i| 5.0 * 0.8f64.powi(i as i32) + 0.1).collect()
}

#[test]
fn doubling_the_top_singular_value_gives_ratio_2_then_1_and_perfect_alignment() {
    let (m, n, k) = (12, 9, 3);
    let mut rng = SplitMix::new(1);
    let (u, v) = (orthonormal(m, &mut rng), orthonormal(n, &mut rng));
    let s = spectrum(n);
    let w0 = compose(&u, m, &v, n, &s, m, n);
    let mut s2 = s.clone();
    s2[0] *= 2.0;
    let w1 = compose(&u, m, &v, n, &s2, m, n);
    let r = compare_matrices(&w0, &w1, m, n, k).unwrap();
    assert_eq!(r.shape, [12, 9]);
    assert_eq!((r.block_start.top, r.block_start.mid, r.block_start.bottom), (0, 3, 6));
    assert_all_close(&r.ratio.top, &[2.0, 1.0, 1.0], 1e-9, "ratio top");
    for (b, what) in [(&r.ratio.mid, "ratio mid"), (&r.ratio.bottom, "ratio bottom")] {
        assert_all_close(b, &ones(k), 1e-9, what);
    }
    for (b, what) in [(&r.align_u, "align u"), (&r.align_v, "align v"), (&r.cos_u, "cos u"), (&r.cos_v, "cos v")] {
        assert_all_close(&b.top, &ones(k), 1e-9, what);
        assert_all_close(&b.mid, &ones(k), 1e-9, what);
        assert_all_close(&b.bottom, &ones(k), 1e-9, what);
    }
    assert_all_close(&r.sigma_base, &s[..k], 1e-9, "σ(W0)");
    assert_all_close(&r.sigma_tuned, &s2[..k], 1e-9, "σ(W')");
    // ΔW = σ_1·u_1·v_1ᵀ: norm σ_1, all of it inside the top block.
    let norm0 = s.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((r.norm_delta - s[0]).abs() < 1e-9 && (r.norm_base - norm0).abs() < 1e-9);
    assert!((r.rel_delta - s[0] / norm0).abs() < 1e-12);
    assert!((r.delta_top_share - 1.0).abs() < 1e-9, "{}", r.delta_top_share);
    assert_all_close(&r.intruder_cos, &ones(k), 1e-9, "intruder cos");
    assert_eq!(r.intruders, 0);
}

/// u_1, u_2 turned by φ towards directions outside the column space of W0 (m > n): σ unchanged,
/// the top block's U subspace rotates by exactly φ twice, everything else stays. Transposed, the
/// same change is a rotation of v_1, v_2.
#[test]
fn rotating_the_top_two_singular_vectors_out_of_the_subspace_moves_only_the_top_block() {
    let (m, n, k) = (14, 9, 3);
    let mut rng = SplitMix::new(2);
    let (q, v) = (orthonormal(m, &mut rng), orthonormal(n, &mut rng));
    let s = spectrum(n);
    let phi = 70f64.to_radians();
    let w0 = compose(&q, m, &v, n, &s, m, n);
    let mut q1 = q.clone();
    for j in 0..2 {
        // u'_j = cos φ·u_j + sin φ·q_{n+j}  (q_{n+j} ⟂ every column of W0)
        for i in 0..m {
            q1[i * m + j] = phi.cos() * q[i * m + j] + phi.sin() * q[i * m + n + j];
        }
    }
    let w1 = compose(&q1, m, &v, n, &s, m, n);
    let c = phi.cos();
    let r = compare_matrices(&w0, &w1, m, n, k).unwrap();
    assert_all_close(&r.ratio.top, &ones(k), 1e-9, "ratio top");
    assert_all_close(&r.align_u.top, &[c, c, 1.0], 1e-9, "align u top");
    assert_all_close(&r.align_v.top, &ones(k), 1e-9, "align v top");
    assert_all_close(&r.cos_u.top, &[1.0, c, c], 1e-9, "principal cosines U top");
    assert_all_close(&r.cos_u.mid, &ones(k), 1e-9, "principal cosines U mid");
    assert_all_close(&r.cos_u.bottom, &ones(k), 1e-9, "principal cosines U bottom");
    for b in [&r.cos_v.top, &r.cos_v.mid, &r.cos_v.bottom] {
        assert_all_close(b, &ones(k), 1e-9, "principal cosines V");
    }
    // u'_1, u'_2 are intruders at φ = 70° (best |cos| = cos φ ≈ 0.34 < 0.5).
    assert!(c < INTRUDER_THRESHOLD);
    assert_all_close(&r.intruder_cos, &[c, c, 1.0], 1e-9, "intruder cos");
    assert_eq!(r.intruders, 2);
    // ‖ΔW‖² = Σ_{j<2} σ_j²·‖u'_j − u_j‖² = Σ σ_j²·2(1 − cos φ)
    let want = ((s[0] * s[0] + s[1] * s[1]) * 2.0 * (1.0 - c)).sqrt();
    assert!((r.norm_delta - want).abs() < 1e-9, "{} vs {want}", r.norm_delta);

    // Transposed: the right singular vectors rotate instead.
    let t = compare_matrices(&transpose(&w0, m, n), &transpose(&w1, m, n), n, m, k).unwrap();
    assert_all_close(&t.align_v.top, &[c, c, 1.0], 1e-9, "transposed: align v top");
    assert_all_close(&t.align_u.top, &ones(k), 1e-9, "transposed: align u top");
    assert_all_close(&t.cos_v.top, &[1.0, c, c], 1e-9, "transposed: principal cosines V top");
    assert_all_close(&t.cos_u.top, &ones(k), 1e-9, "transposed: principal cosines U top");
    assert_all_close(&t.cos_v.bottom, &ones(k), 1e-9, "transposed: principal cosines V bottom");
}

/// W' = (U_2·R)·Σ_2·V_2ᵀ + rest with a rotation R inside span(u_1, u_2): the singular values and
/// the top-2 subspace are unchanged (principal cosines 1), but the matched vectors are not
/// (|⟨u_1, u'_1⟩| = |cos φ|): the two measures differ exactly as the docs say.
#[test]
fn a_rotation_inside_the_top_block_keeps_the_subspace_but_not_the_matched_vectors() {
    let (m, n, k) = (10, 10, 2);
    let mut rng = SplitMix::new(3);
    let (u, v) = (orthonormal(m, &mut rng), orthonormal(n, &mut rng));
    let s = spectrum(n);
    let phi = 0.6f64;
    let mut u1 = u.clone();
    for i in 0..m {
        let (a, b) = (u[i * m], u[i * m + 1]);
        u1[i * m] = phi.cos() * a - phi.sin() * b;
        u1[i * m + 1] = phi.sin() * a + phi.cos() * b;
    }
    let (w0, w1) = (compose(&u, m, &v, n, &s, m, n), compose(&u1, m, &v, n, &s, m, n));
    let r = compare_matrices(&w0, &w1, m, n, k).unwrap();
    assert_all_close(&r.ratio.top, &ones(k), 1e-9, "ratio");
    assert_all_close(&r.cos_u.top, &ones(k), 1e-9, "principal cosines U top");
    assert_all_close(&r.align_u.top, &[phi.cos(), phi.cos()], 1e-9, "matched alignment u");
    assert_all_close(&r.align_v.top, &ones(k), 1e-9, "matched alignment v");
}

#[test]
fn an_unchanged_matrix_is_all_ones_and_zero_change() {
    let (m, n) = (7, 11);
    let w = SplitMix::new(4).vec(m * n, -1.0, 1.0);
    let r = compare_matrices(&w, &w, m, n, 2).unwrap();
    for b in [&r.ratio, &r.align_u, &r.align_v, &r.cos_u, &r.cos_v] {
        for blk in [&b.top, &b.mid, &b.bottom] {
            assert_all_close(blk, &ones(2), 1e-12, "identity");
        }
    }
    assert_eq!((r.norm_delta, r.rel_delta), (0.0, 0.0));
    assert!(r.delta_top_share.is_nan(), "no change has no share");
    // k = min(m, n): the three blocks are the whole spectrum.
    let full = compare_matrices(&w, &w, m, n, 7).unwrap();
    assert_eq!((full.block_start.top, full.block_start.mid, full.block_start.bottom), (0, 0, 0));
}

#[test]
fn bad_input_is_a_clear_error() {
    let w = vec![1.0; 12];
    let msg = |e: spectune::Error| e.to_string();
    assert!(msg(compare_matrices(&w, &w[..11], 3, 4, 1).unwrap_err()).contains("tuned matrix"));
    assert!(msg(compare_matrices(&w[..11], &w, 3, 4, 1).unwrap_err()).contains("base matrix"));
    let e = msg(compare_matrices(&w, &w, 3, 4, 4).unwrap_err());
    assert!(e.contains("k = 4") && e.contains("1..=3"), "{e}");
    assert!(compare_matrices(&w, &w, 3, 4, 0).is_err());
    let mut nan = w.clone();
    nan[5] = f64::NAN;
    assert!(compare_matrices(&w, &nan, 3, 4, 1).is_err());
    let e = msg(block_size(Some(300), 192, 576, "model.layers.0.self_attn.k_proj.weight").unwrap_err());
    assert!(e.contains("--k 300") && e.contains("k_proj") && e.contains("192"), "{e}");
    assert_eq!(block_size(None, 192, 576, "x").unwrap(), 32);
    assert_eq!(block_size(None, 8, 16, "x").unwrap(), 2);
    assert_eq!(block_size(None, 2, 16, "x").unwrap(), 1);
    assert_eq!(block_size(Some(8), 8, 16, "x").unwrap(), 8);
}

// --- end to end ---------------------------------------------------------------------------

fn spectune(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spectune")).args(args).output().expect("run spectune");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The tiny model as an HF folder, and a SpecLoRA adapter on all seven linears trained for a few
/// steps on a repeating token pattern.
fn tiny_model_and_adapter(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cfg = common::tiny_config(64, true);
    let base = dir.join("base");
    merge_to_hf(&Decoder::random(cfg, DType::F32, 11).unwrap(), &base).unwrap();
    let mut model = spectune::model::load(&Checkpoint::open(&base).unwrap(), DType::F32).unwrap();
    let lora = LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 };
    model.attach_adapters(|_| Ok(true), &lora, &Method::speclora(3), 5).unwrap();
    let mut opt = AdamW::new(&model.trainable_params(), AdamWConfig { lr: 3e-2, weight_decay: 0.0, ..AdamWConfig::default() }).unwrap();
    let ids: Vec<u32> = (0..32).map(|i| (i * 5 % 64) as u32).collect();
    let targets: Vec<i64> = (0..32).map(|i| if i % 16 == 15 { -100 } else { ids[i + 1] as i64 }).collect();
    for _ in 0..6 {
        let loss = model.loss(&ids, &targets, 2, 16, None, &CeOptions::default()).unwrap();
        opt.step(&backward(&loss).unwrap(), 3e-2).unwrap();
    }
    let adapter = dir.join("adapter");
    save_adapter(&model, &adapter, &lora, base.to_str().unwrap()).unwrap();
    (base, adapter)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn cli_on_a_trained_adapter_and_on_the_merged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = tiny_model_and_adapter(dir.path());
    let (b, a) = (base.to_str().unwrap(), adapter.to_str().unwrap());
    let (j1, plots) = (dir.path().join("a.json"), dir.path().join("plots"));
    let (ok, out, err) =
        spectune(&["spectrum", "--base", b, "--adapter", a, "--k", "2", "--json", j1.to_str().unwrap(), "--plot", plots.to_str().unwrap(), "--control"]);
    assert!(ok, "{out}{err}");
    for needle in ["singular values", "singular vectors", "q_proj", "down_proj", "mean/2", "(speclora)", "noise"] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let r = json(&j1);
    assert_eq!(r["method"], "speclora");
    let ms = r["matrices"].as_array().unwrap();
    assert_eq!(ms.len(), 14, "2 layers × 7 linears");
    assert_eq!(r["summary"].as_array().unwrap().len(), 7);
    // Independent check of a few numbers against the merged weights.
    let mut model = spectune::model::load(&Checkpoint::open(&base).unwrap(), DType::F32).unwrap();
    spectune::peft::io::load_adapter(&mut model, &adapter).unwrap();
    for m in ms {
        let layer = m["layer"].as_u64().unwrap() as usize;
        let lin = model.layers[layer].linear(m["module"].as_str().unwrap()).unwrap();
        let (w0, w1) = (lin.weight.to_vec_f64(), lin.adapter.as_ref().unwrap().merged_weight(&lin.weight).unwrap());
        let (rows, cols) = (lin.out_features(), lin.in_features());
        assert_eq!(m["shape"], serde_json::json!([rows, cols]));
        let (_, s0, _) = thin_svd(&w0, rows, cols).unwrap();
        let (_, s1, _) = thin_svd(&w1, rows, cols).unwrap();
        let rho: Vec<f64> = m["ratio"]["top"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_all_close(&rho, &[s1[0] / s0[0], s1[1] / s0[1]], 1e-9, "ρ from the CLI");
        let d: f64 = w0.iter().zip(&w1).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        assert!(d > 0.0 && (m["norm_delta"].as_f64().unwrap() - d).abs() < 1e-9 * d.max(1.0), "{} vs {d}", m["norm_delta"]);
    }
    // One PNG per module type and layers.png.
    let mut pngs: Vec<String> = std::fs::read_dir(&plots).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    pngs.sort();
    assert_eq!(pngs, ["down_proj.png", "gate_proj.png", "k_proj.png", "layers.png", "o_proj.png", "q_proj.png", "up_proj.png", "v_proj.png"]);
    for p in &pngs {
        let bytes = std::fs::read(plots.join(p)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5000, "{p}: {} bytes", bytes.len());
    }

    // The same adapter merged into a checkpoint (f32), analysed with --tuned: the same numbers.
    let merged = dir.path().join("merged");
    let (ok, out, err) = spectune(&["merge", "--model", b, "--adapter", a, "--out", merged.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let j2 = dir.path().join("t.json");
    let (ok, out, err) = spectune(&["spectrum", "--base", b, "--tuned", merged.to_str().unwrap(), "--k", "2", "--json", j2.to_str().unwrap(), "--brief"]);
    assert!(ok, "{out}{err}");
    let t = json(&j2);
    assert_eq!(t["method"], "checkpoint");
    let tm = t["matrices"].as_array().unwrap();
    assert_eq!(tm.len(), 14);
    for (x, y) in ms.iter().zip(tm) {
        assert_eq!(x["name"], y["name"]);
        for key in ["ratio", "align_u", "cos_u", "cos_v"] {
            for blk in ["top", "mid", "bottom"] {
                let (p, q) = (x[key][blk].as_array().unwrap(), y[key][blk].as_array().unwrap());
                for (p, q) in p.iter().zip(q) {
                    assert!((p.as_f64().unwrap() - q.as_f64().unwrap()).abs() < 1e-4, "{} {key}.{blk}: {p} vs {q}", x["name"]);
                }
            }
        }
    }
    // Comparing the base with itself finds nothing to analyse.
    let (ok, _, err) = spectune(&["spectrum", "--base", b, "--tuned", b, "--k", "2"]);
    assert!(!ok && err.contains("no analysed linear differs"), "{err}");
}

#[test]
fn cli_bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = tiny_model_and_adapter(dir.path());
    let (b, a) = (base.to_str().unwrap(), adapter.to_str().unwrap());
    // k larger than the smallest analysed matrix (k_proj: 8 × 16).
    let (ok, _, err) = spectune(&["spectrum", "--base", b, "--adapter", a, "--k", "9"]);
    assert!(!ok && err.contains("--k 9") && err.contains("k_proj") && err.contains("min(m, n) = 8"), "{err}");
    // …but fine once k_proj/v_proj are left out (q is 16 × 16).
    let (ok, out, err) = spectune(&["spectrum", "--base", b, "--adapter", a, "--k", "9", "--targets", "q,o", "--brief"]);
    assert!(ok && out.contains("q_proj") && !out.contains("k_proj"), "{out}{err}");
    let (ok, _, err) = spectune(&["spectrum", "--base", b, "--adapter", a, "--targets", "q,zz"]);
    assert!(!ok && err.contains("unknown module `zz`"), "{err}");
    // Exactly one of --tuned / --adapter.
    let (ok, _, err) = spectune(&["spectrum", "--base", b]);
    assert!(!ok && err.contains("--adapter"), "{err}");
    let (ok, _, err) = spectune(&["spectrum", "--base", b, "--adapter", a, "--tuned", b]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    // A tuned checkpoint of another shape.
    let mut wide = common::tiny_config(64, true);
    wide.intermediate_size = 32;
    let other = dir.path().join("other");
    merge_to_hf(&Decoder::random(wide, DType::F32, 1).unwrap(), &other).unwrap();
    let (ok, _, err) = spectune(&["spectrum", "--base", b, "--tuned", other.to_str().unwrap()]);
    assert!(!ok && err.contains("shape mismatch") && err.contains("gate_proj"), "{err}");
    // A deeper model's checkpoint, and its adapter on the 2-layer base.
    let mut deep = common::tiny_config(64, true);
    deep.num_hidden_layers = 3;
    let deep_dir = dir.path().join("deep");
    let mut dm = Decoder::random(deep, DType::F32, 2).unwrap();
    merge_to_hf(&dm, &deep_dir).unwrap();
    let (ok, _, err) = spectune(&["spectrum", "--base", b, "--tuned", deep_dir.to_str().unwrap()]);
    assert!(!ok && err.contains("3 layers") && err.contains("has 2"), "{err}");
    let lora = LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 };
    dm.attach_adapters(spectune::nn::modules(&["q_proj"]), &lora, &Method::lora(), 0).unwrap();
    let deep_adapter = dir.path().join("deep-adapter");
    save_adapter(&dm, &deep_adapter, &lora, "deep").unwrap();
    let (ok, _, err) = spectune(&["spectrum", "--base", b, "--adapter", deep_adapter.to_str().unwrap()]);
    assert!(!ok && err.contains("layer 2") && err.contains("another model"), "{err}");
    // A missing base weight names the tensor.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(base.join("config.json"), broken.join("config.json")).unwrap();
    let st = std::fs::read(base.join("model.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        parsed.tensors().into_iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").collect();
    std::fs::write(broken.join("model.safetensors"), safetensors::tensor::serialize(kept, None).unwrap()).unwrap();
    let (ok, _, err) = spectune(&["spectrum", "--base", broken.to_str().unwrap(), "--adapter", a]);
    assert!(!ok && err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    // A missing adapter folder.
    let (ok, _, err) = spectune(&["spectrum", "--base", b, "--adapter", dir.path().join("nope").to_str().unwrap()]);
    assert!(!ok && err.contains("nope"), "{err}");
}

#[test]
fn library_analysis_of_an_adapter_agrees_with_the_default_k_rule() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = tiny_model_and_adapter(dir.path());
    let r = analyze(&base, &TunedSource::Adapter(adapter), &SpectrumOptions::default()).unwrap();
    // Default k = min(32, min(m, n)/3): 16×16 → 5, 8×16 → 2, 24×16 → 5.
    for m in &r.matrices {
        let want = if m.module == "k_proj" || m.module == "v_proj" { 2 } else { 5 };
        assert_eq!(m.stats.k, want, "{}", m.name);
    }
    assert!(r.unchanged.is_empty());
    assert_eq!(r.summary.iter().map(|s| s.count).sum::<usize>(), 14);
    assert!(r.summary_control.is_empty() && r.matrices.iter().all(|m| m.control.is_none()));
}

#[test]
fn the_noise_control_is_a_random_change_of_the_same_norm() {
    let w0 = SplitMix::new(9).vec(40 * 30, -1.0, 1.0);
    let wc = random_change(&w0, 0.25, 3);
    let d: f64 = w0.iter().zip(&wc).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    assert!((d - 0.25).abs() < 1e-12, "{d}");
    assert_eq!(wc, random_change(&w0, 0.25, 3), "seeded");
    assert_ne!(wc, random_change(&w0, 0.25, 4));
    // A random change spreads over the whole spectrum: its top-block share is near k²/(m·n).
    let r = compare_matrices(&w0, &wc, 40, 30, 5).unwrap();
    assert!(r.delta_top_share < 10.0 * r.delta_top_share_random, "{} vs {}", r.delta_top_share, r.delta_top_share_random);
    assert!((r.delta_top_share_random - 25.0 / 1200.0).abs() < 1e-15);

    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = tiny_model_and_adapter(dir.path());
    let opts = SpectrumOptions { control: true, ..SpectrumOptions::default() };
    let r = analyze(&base, &TunedSource::Adapter(adapter), &opts).unwrap();
    for m in &r.matrices {
        let c = m.control.as_ref().expect("control");
        assert!((c.norm_delta - m.stats.norm_delta).abs() <= 1e-9 * m.stats.norm_delta, "{}", m.name);
        assert_eq!(c.k, m.stats.k);
    }
    assert_eq!(r.summary_control.len(), 7);
    let text = spectune::spectrum::render_table(&r, true);
    assert!(text.contains("noise") && text.lines().filter(|l| l.contains(" noise ")).count() == 14, "{text}");
}
