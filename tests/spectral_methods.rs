//! The spectral and baseline methods (Spectral^A, Spectral^R, PiSSA, MiLoRA, DoRA, full fine-tuning):
//! docs/ops.md §22 cases 1 and 6–10 (the gradient checks of case 11 are in
//! tests/gradcheck_methods.rs), save/load, merge and export, frozen weights, `--method` parsing.

mod common;

use spectune::gradcheck::SplitMix;
use spectune::io::Checkpoint;
use spectune::model::Decoder;
use spectune::ops;
use spectune::peft::export::{export_peft_lora, merge_to_hf};
use spectune::peft::full::Full;
use spectune::peft::io::{load_adapter, save_adapter, CONFIG_FILE, WEIGHTS_FILE};
use spectune::peft::lora::Lora;
use spectune::peft::spectral::SpectralR;
use spectune::peft::{Adapter, AdapterCtx, LoraConfig, Method};
use spectune::svd::{thin_svd, top_k_svd};
use spectune::train::config::TrainArgs;
use spectune::{backward, AdamW, AdamWConfig, DType, Tensor};

const NEW_METHODS: [Method; 8] = [
    Method::spectral_a(0),
    Method::spectral_a(1),
    Method::spectral_r(0),
    Method::spectral_r(1),
    Method::pissa(),
    Method::milora(),
    Method::dora(),
    Method::full(),
];

fn t64(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims.to_vec()).unwrap()
}

fn lora_cfg() -> LoraConfig {
    LoraConfig { rank: 3, alpha: 6.0, rslora: false, dropout: 0.0 }
}

/// Moves every trainable tensor away from its init (as training would).
fn perturb(params: &[Tensor], seed: u64) {
    let mut rng = SplitMix::new(seed);
    for p in params {
        let v: Vec<f64> = p.to_vec_f64().iter().map(|x| x + rng.uniform(-0.3, 0.3)).collect();
        match p.dtype() {
            DType::F32 => p.set_values(&v.iter().map(|&x| x as f32).collect::<Vec<f32>>()).unwrap(),
            _ => p.set_values(&v).unwrap(),
        }
    }
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn tiny() -> Decoder {
    Decoder::random(common::tiny_config(41, true), DType::F32, 1).unwrap()
}

fn ids() -> Vec<u32> {
    (0..12).map(|i| (i * 7 % 41) as u32).collect()
}

// ---------------------------------------------------------------------------------------------
// docs/ops.md §22 cases
// ---------------------------------------------------------------------------------------------

#[test]
fn case_1_every_new_method_is_the_identity_at_init() {
    let base = tiny();
    let want = base.logits(&ids(), 2, 6, None).unwrap().to_vec_f32();
    for method in NEW_METHODS {
        let mut m = base.clone();
        m.attach_adapters(|_| Ok(true), &lora_cfg(), &method, 7).unwrap();
        let got = m.logits(&ids(), 2, 6, None).unwrap().to_vec_f32();
        // Bit-exact for all of them: the delta terms are exact zeros (see peft/mod.rs).
        assert_eq!(got, want, "{method:?}: the adapted model must equal the base model at init");
    }
}

#[test]
fn case_6_cayley_of_a_known_q() {
    let q = t64(&[0.0, 1.0, 0.0, 0.0], &[2, 2]);
    let r = ops::cayley(&q).unwrap().to_vec_f64();
    let want = [0.6, -0.8, 0.8, 0.6];
    for (a, b) in r.iter().zip(want) {
        assert!((a - b).abs() < 1e-15, "R = {r:?}");
    }
    // RᵀR = I and det R = 1.
    let rtr = [r[0] * r[0] + r[2] * r[2], r[0] * r[1] + r[2] * r[3], r[1] * r[0] + r[3] * r[2], r[1] * r[1] + r[3] * r[3]];
    for (a, b) in rtr.iter().zip([1.0, 0.0, 0.0, 1.0]) {
        assert!((a - b).abs() < 1e-15);
    }
    assert!((r[0] * r[3] - r[1] * r[2] - 1.0).abs() < 1e-15);
    // Q = 0 gives R = I exactly; a random Q gives an orthogonal R with det 1.
    assert_eq!(ops::cayley(&Tensor::zeros::<f64>([3, 3])).unwrap().to_vec_f64(), vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    let rr = ops::cayley(&t64(&SplitMix::new(3).vec(16, -2.0, 2.0), &[4, 4])).unwrap().to_vec_f64();
    for i in 0..4 {
        for j in 0..4 {
            let dot: f64 = (0..4).map(|k| rr[k * 4 + i] * rr[k * 4 + j]).sum();
            assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-13);
        }
    }
    assert!(ops::cayley(&t64(&[1.0, 2.0], &[1, 2])).is_err());
}

#[test]
fn case_7_spectral_r_with_unit_scale_keeps_the_singular_values() {
    // W = [[2,1],[1,2]] (σ = 3, 1), r = 2, R_U from case 6, R_V = I, c = 1.
    let w = t64(&[2.0, 1.0, 1.0, 2.0], &[2, 2]);
    let top = top_k_svd(&w, 2, 2, 0).unwrap();
    let (u, sigma, v) = (t64(&top.u, &[2, 2]), t64(&top.s, &[2]), t64(&top.v, &[2, 2]));
    let ru = ops::cayley(&t64(&[0.0, 1.0, 0.0, 0.0], &[2, 2])).unwrap();
    let rv = t64(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
    let c = Tensor::full(1.0f64, [2]);
    // x = I: the output rows are the columns of W'ᵀ, so y = W'ᵀ.
    let y = ops::spectral_r_linear(&t64(&[1.0, 0.0, 0.0, 1.0], &[2, 2]), &w, &u, &sigma, &v, &ru, &rv, &c).unwrap().to_vec_f64();
    let (_, s, _) = thin_svd(&y, 2, 2).unwrap();
    eprintln!("case 7: W' = {y:?} (transposed), singular values {s:?}");
    assert!((s[0] - 3.0).abs() < 1e-12 && (s[1] - 1.0).abs() < 1e-12, "{s:?}");
    // W' really changed (the rotation is not a no-op).
    assert!(rel_err(&y, &[2.0, 1.0, 1.0, 2.0]) > 0.1);
    // c ≠ 1 scales them: c = (2, 1) → (6, 1).
    let y = ops::spectral_r_linear(&t64(&[1.0, 0.0, 0.0, 1.0], &[2, 2]), &w, &u, &sigma, &v, &ru, &rv, &t64(&[2.0, 1.0], &[2])).unwrap().to_vec_f64();
    let (_, s, _) = thin_svd(&y, 2, 2).unwrap();
    assert!((s[0] - 6.0).abs() < 1e-12 && (s[1] - 1.0).abs() < 1e-12, "{s:?}");
}

fn numerical_rank(a: &[f64], m: usize, n: usize) -> usize {
    let (_, s, _) = thin_svd(a, m, n).unwrap();
    s.iter().filter(|&&x| x > 1e-9 * s[0]).count()
}

#[test]
fn case_8_spectral_a_reaches_rank_2r_where_lora_reaches_r() {
    let (m, n, r) = (64, 64, 4);
    let mut rng = SplitMix::new(8);
    let w = t64(&rng.vec(m * n, -1.0, 1.0), &[m, n]);
    let cfg = LoraConfig { rank: r, alpha: r as f64, rslora: false, dropout: 0.0 };
    let sa = Method::spectral_a(0).build(&w, &cfg, DType::F64, &mut rng).unwrap();
    perturb(&sa.params(), 9);
    let wm = sa.merged_weight(&w).unwrap();
    let delta: Vec<f64> = wm.iter().zip(w.to_vec_f64()).map(|(a, b)| a - b).collect();
    let lora = Method::lora().build(&w, &cfg, DType::F64, &mut rng).unwrap();
    perturb(&lora.params(), 10);
    let ld: Vec<f64> = lora.merged_weight(&w).unwrap().iter().zip(w.to_vec_f64()).map(|(a, b)| a - b).collect();
    let count = |a: &Adapter| a.params().iter().map(|p| p.numel()).sum::<usize>();
    let (rank_a, rank_l) = (numerical_rank(&delta, m, n), numerical_rank(&ld, m, n));
    eprintln!("case 8: Spectral^A {} params → rank(W' − W) = {rank_a}; LoRA {} params → rank {rank_l}", count(&sa), count(&lora));
    assert_eq!(count(&sa), 512);
    assert_eq!(count(&lora), 512);
    assert_eq!(rank_a, 2 * r);
    assert_eq!(rank_l, r);
}

#[test]
fn case_9_merge_equivalence_for_every_method() {
    // Un-merged forward (f32) vs X·W_mergedᵀ (W_merged from merged_weight, f64): ≤ 1e-5 relative.
    let (m, n) = (12, 10);
    let mut rng = SplitMix::new(12);
    let w = Tensor::from_vec(rng.vec(m * n, -1.0, 1.0).into_iter().map(|v| v as f32).collect::<Vec<f32>>(), [m, n]).unwrap();
    let x = Tensor::from_vec(rng.vec(5 * n, -1.0, 1.0).into_iter().map(|v| v as f32).collect::<Vec<f32>>(), [5, n]).unwrap();
    let xv = x.to_vec_f64();
    let cfg = LoraConfig { rank: 3, alpha: 5.0, rslora: false, dropout: 0.0 };
    let older = [Method::lora(), Method::speclora(4), Method::speclora_by_norm(4), Method::speclora_svd(4)];
    for method in older.into_iter().chain(NEW_METHODS) {
        let ad = method.build(&w, &cfg, DType::F32, &mut rng).unwrap();
        perturb(&ad.params(), 13);
        let y = ad.forward(&x, &w, &AdapterCtx::default()).unwrap().to_vec_f64();
        let wm = ad.merged_weight(&w).unwrap();
        let want: Vec<f64> = (0..5 * m).map(|idx| (0..n).map(|j| xv[(idx / m) * n + j] * wm[(idx % m) * n + j]).sum()).collect();
        let err = rel_err(&y, &want);
        let moved = rel_err(&ad.forward(&x, &w, &AdapterCtx::default()).unwrap().to_vec_f64(), &ops::linear(&x, &w).unwrap().to_vec_f64());
        eprintln!("case 9 {method:?}: relative error {err:.1e} (the adapter moved the output by {moved:.2})");
        assert!(err < 1e-5, "{method:?}: merged vs un-merged relative error {err:e}");
        assert!(moved > 1e-2, "{method:?}: the perturbed adapter must change the output");
    }
}

#[test]
fn case_10_parameter_counts() {
    // The count formula agrees with the tensors Adapter::new creates (clamping included) …
    let mut rng = SplitMix::new(1);
    for (m, n) in [(12, 10), (8, 16), (16, 8)] {
        let w = t64(&rng.vec(m * n, -1.0, 1.0), &[m, n]);
        for method in NEW_METHODS.iter().filter(|x| x.block != 1).chain(&[Method::lora()]) {
            let ad = method.build(&w, &lora_cfg(), DType::F64, &mut rng).unwrap();
            let actual: usize = ad.params().iter().map(|p| p.numel()).sum();
            assert_eq!(method.trainable_count(m, n, 3), actual, "{method:?} on [{m}, {n}]");
        }
    }
    // … Spectral^A on DeBERTaV3-base q/k/v (12 layers × 3 modules of 768×768), r = 24: the paper's 1,327,104.
    let sa = Method::spectral_a(0);
    assert_eq!(36 * sa.trainable_count(768, 768, 24), 1_327_104);
    // … and the Llama-3-8B table (32 layers; q/o 4096×4096, k/v 1024×4096, gate/up 14336×4096,
    // down 4096×14336), printed for docs/ARCHITECTURE.md.
    let shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)];
    let total_dense: usize = 32 * shapes.iter().map(|(o, i)| o * i).sum::<usize>();
    eprintln!("Llama-3-8B, all seven linears × 32 layers ({total_dense} dense values):");
    for r in [8usize, 16] {
        for method in [Method::lora(), Method::spectral_a(0), Method::spectral_r(0), Method::pissa(), Method::dora(), Method::full()] {
            let n: usize = 32 * shapes.iter().map(|&(o, i)| method.trainable_count(o, i, r)).sum::<usize>();
            eprintln!("  r = {r:>2}  {:<22} {n:>13}  ({:.3} % of the linears)", method.label(), 100.0 * n as f64 / total_dense as f64);
        }
    }
    assert_eq!(32 * shapes.iter().map(|&(o, i)| sa.trainable_count(o, i, 8)).sum::<usize>(), 32 * 8 * (8192 + 5120 + 5120 + 8192 + 18432 * 3));
}

// ---------------------------------------------------------------------------------------------
// Training-side invariants, files, export, CLI
// ---------------------------------------------------------------------------------------------

#[test]
fn frozen_weights_get_no_gradient_and_no_optimizer_state() {
    let base = tiny();
    let ids = ids();
    let targets: Vec<i64> = ids.iter().skip(1).map(|&t| t as i64).chain([-100]).collect();
    for method in NEW_METHODS {
        let mut m = base.clone();
        let tg: &[&str] =
            if method == Method::full() { &["q_proj", "v_proj"] } else { &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] };
        m.attach_adapters(spectune::nn::modules(tg), &lora_cfg(), &method, 3).unwrap();
        if method != Method::full() {
            perturb(&m.trainable_params(), 4);
        }
        let params = m.trainable_params();
        let loss = m.loss(&ids, &targets, 1, 12, None, &Default::default()).unwrap();
        let g = backward(&loss).unwrap();
        assert_eq!(g.len(), params.len(), "{method:?}: exactly the trainable tensors get gradients");
        assert!(params.iter().all(|p| g.contains(p)));
        let mut frozen = vec![m.embed.clone(), m.norm.weight.clone()];
        for l in &m.layers {
            frozen.extend([l.attn_norm.weight.clone(), l.mlp_norm.weight.clone()]);
            frozen.extend(l.linears().iter().map(|lin| lin.weight.clone()));
        }
        assert!(frozen.iter().all(|w| !g.contains(w) && !w.requires_grad()), "{method:?}: a frozen weight got a gradient");
        let opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        let n: usize = params.iter().map(|p| p.numel()).sum();
        assert_eq!(opt.state_numel(), 2 * n, "{method:?}");
        if method == Method::full() {
            // Dense state for q_proj and v_proj only: 2 layers × (16×16 + 8×16).
            assert_eq!(n, 2 * (16 * 16 + 8 * 16));
        }
    }
}

#[test]
fn save_and_load_round_trip_exactly_for_every_new_method() {
    let base = tiny();
    for method in NEW_METHODS {
        let mut m = base.clone();
        let tg = ["q_proj", "k_proj", "down_proj"];
        m.attach_adapters(spectune::nn::modules(&tg), &lora_cfg(), &method, 2).unwrap();
        perturb(&m.trainable_params(), 5);
        let want = m.logits(&ids(), 1, 12, None).unwrap().to_vec_f32();
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&m, dir.path(), &lora_cfg(), "random-tiny").unwrap();
        let mut fresh = base.clone();
        load_adapter(&mut fresh, dir.path()).unwrap();
        assert_eq!(fresh.logits(&ids(), 1, 12, None).unwrap().to_vec_f32(), want, "{method:?}: the loaded adapter must reproduce the saved model");
        assert_eq!(fresh.trainable_params().len(), m.trainable_params().len());
        for l in &fresh.layers {
            for t in tg {
                assert_eq!(l.linear(t).unwrap().adapter.as_ref().unwrap().method(), method);
            }
        }
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        match method.name() {
            "dora" => {
                // Stock PEFT DoRA: use_dora and …lora_magnitude_vector, nothing spectune-specific.
                assert_eq!(cfg["use_dora"], true);
                assert!(cfg.get("spectune").is_none());
                assert_eq!(st.tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector").unwrap().shape(), &[16]);
            }
            "full" => {
                assert_eq!(cfg["spectune"]["method"], "full");
                assert!(cfg.get("peft_type").is_none());
                assert_eq!(st.tensor("model.layers.1.mlp.down_proj.weight").unwrap().shape(), &[16, 24]);
                assert_eq!(st.names().len(), 6);
            }
            _ => assert_eq!(cfg["spectune"]["method"], method.name()),
        }
    }
}

#[test]
fn svd_factors_are_stored_not_recomputed() {
    // Corrupting W after init must not change the stored factors (they are never recomputed).
    let base = tiny();
    let mut m = base.clone();
    m.attach_adapters(spectune::nn::modules(&["q_proj"]), &lora_cfg(), &Method::spectral_r(0), 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, dir.path(), &lora_cfg(), "x").unwrap();
    let mut other = Decoder::random(common::tiny_config(41, true), DType::F32, 99).unwrap();
    load_adapter(&mut other, dir.path()).unwrap();
    let sr = |l: &spectune::nn::Linear| l.adapter.as_deref().and_then(|a| a.downcast_ref::<SpectralR>()).cloned();
    let (Some(SpectralR { u: u1, .. }), Some(SpectralR { u: u2, .. })) =
        (sr(m.layers[0].linear("q_proj").unwrap()), sr(other.layers[0].linear("q_proj").unwrap()))
    else {
        panic!()
    };
    assert_eq!(u1.to_vec_f32(), u2.to_vec_f32());
}

#[test]
fn export_to_plain_lora_for_the_low_rank_methods() {
    let base = tiny();
    let probe = ids();
    for (method, rank) in [(Method::pissa(), 6), (Method::milora(), 6), (Method::spectral_a(0), 6), (Method::spectral_a(1), 6), (Method::spectral_r(0), 3)] {
        let mut m = base.clone();
        m.attach_adapters(|_| Ok(true), &lora_cfg(), &method, 4).unwrap();
        perturb(&m.trainable_params(), 6);
        let want = m.logits(&probe, 2, 6, None).unwrap().to_vec_f64();
        let dir = tempfile::tempdir().unwrap();
        let s = export_peft_lora(&m, dir.path(), &lora_cfg(), "random-tiny").unwrap();
        assert_eq!(s.rank, rank, "{method:?}: {s:?}");
        assert_eq!(s.padded_modules, 0);
        let mut fresh = base.clone();
        load_adapter(&mut fresh, dir.path()).unwrap();
        assert!(fresh.layers.iter().all(|l| l.linears().iter().all(|lin| lin.adapter.as_ref().is_some_and(|a| a.downcast_ref::<Lora>().is_some()))));
        let got = fresh.logits(&probe, 2, 6, None).unwrap().to_vec_f64();
        let err = rel_err(&got, &want);
        let moved = rel_err(&base.logits(&probe, 2, 6, None).unwrap().to_vec_f64(), &want);
        eprintln!("export {method:?}: rank {rank}, relative logit error {err:.1e} (adapter effect {moved:.2})");
        assert!(err < 1e-5, "{method:?}: {err:e}");
        assert!(moved > 1e-2);
    }
    for method in [Method::dora(), Method::full()] {
        let mut m = base.clone();
        m.attach_adapters(spectune::nn::modules(&["q_proj"]), &lora_cfg(), &method, 4).unwrap();
        let e = export_peft_lora(&m, tempfile::tempdir().unwrap().path(), &lora_cfg(), "x").unwrap_err().to_string();
        assert!(e.contains("not low-rank"), "{e}");
    }
}

#[test]
fn full_fine_tuning_trains_only_the_chosen_matrices_and_merges_to_a_checkpoint() {
    let base = tiny();
    let mut m = base.clone();
    m.attach_adapters(spectune::nn::modules(&["q_proj", "v_proj"]), &lora_cfg(), &Method::full(), 0).unwrap();
    let ids = ids();
    let targets: Vec<i64> = ids.iter().skip(1).map(|&t| t as i64).chain([-100]).collect();
    let mut opt = AdamW::new(&m.trainable_params(), AdamWConfig { lr: 1e-2, ..AdamWConfig::default() }).unwrap();
    let l0 = m.loss(&ids, &targets, 1, 12, None, &Default::default()).unwrap();
    let first = l0.item().unwrap();
    opt.step(&backward(&l0).unwrap(), 1e-2).unwrap();
    for _ in 0..4 {
        let l = m.loss(&ids, &targets, 1, 12, None, &Default::default()).unwrap();
        opt.step(&backward(&l).unwrap(), 1e-2).unwrap();
    }
    let last = m.loss(&ids, &targets, 1, 12, None, &Default::default()).unwrap().item().unwrap();
    eprintln!("full FT of q, v: loss {first:.4} → {last:.4} in 5 steps");
    assert!(last < first);
    // The frozen originals are untouched; only the tuned copies moved.
    for (lb, lm) in base.layers.iter().zip(&m.layers) {
        assert_eq!(lb.linears().len(), lm.linears().len());
        for (wb, wm) in lb.linears().iter().zip(lm.linears()) {
            assert_eq!(wb.weight.to_vec_f32(), wm.weight.to_vec_f32());
        }
        let Some(Full { w }) = lm.linear("q_proj").unwrap().adapter.as_deref().and_then(|a| a.downcast_ref()) else { panic!() };
        assert_ne!(w.to_vec_f32(), lb.linear("q_proj").unwrap().weight.to_vec_f32());
        assert!(lm.linear("k_proj").unwrap().adapter.is_none());
    }
    // merge → an HF folder whose q/v are the tuned matrices: the analysis's `--tuned` input.
    let dir = tempfile::tempdir().unwrap();
    merge_to_hf(&m, dir.path()).unwrap();
    let merged = spectune::model::load(&Checkpoint::open(dir.path()).unwrap(), DType::F32).unwrap();
    let (a, b) = (m.logits(&ids, 1, 12, None).unwrap().to_vec_f64(), merged.logits(&ids, 1, 12, None).unwrap().to_vec_f64());
    assert!(rel_err(&a, &b) < 1e-6);
    let Some(Full { w }) = m.layers[1].linear("v_proj").unwrap().adapter.as_deref().and_then(|a| a.downcast_ref()) else { panic!() };
    assert_eq!(merged.layers[1].linear("v_proj").unwrap().weight.to_vec_f32(), w.to_vec_f32());
}

#[test]
fn train_method_names_parse() {
    let args = |method: &str, block: Option<usize>| TrainArgs {
        model: Some("m".into()),
        data: Some("d".into()),
        method: Some(method.into()),
        block,
        ..TrainArgs::default()
    };
    let cases = [
        ("spectral-a", Some(1), Method::spectral_a(1)),
        ("spectral-r", None, Method::spectral_r(0)),
        ("pissa", None, Method::pissa()),
        ("milora", None, Method::milora()),
        ("dora", None, Method::dora()),
        ("full", None, Method::full()),
    ];
    for (name, block, want) in cases {
        let s = args(name, block).resolve().unwrap();
        assert_eq!(s.method, want);
        assert_eq!(s.method.name(), name);
    }
    let e = args("pissa", Some(1)).resolve().unwrap_err().to_string();
    assert!(e.contains("--block"), "{e}");
    let e = args("spectral", None).resolve().unwrap_err().to_string();
    assert!(e.contains("spectral-a") && e.contains("full"), "{e}");
    // A block that does not fit the weight is an error naming the sizes, not a panic.
    let mut m = tiny();
    let e = m.attach_adapters(spectune::nn::modules(&["k_proj"]), &lora_cfg(), &Method::spectral_a(2), 0).unwrap_err().to_string();
    assert!(e.contains("block 2") && e.contains("[8, 16]"), "{e}");
}

#[test]
fn dora_or_full_cannot_share_a_folder_with_another_method() {
    for (a, b) in [(Method::dora(), Method::lora()), (Method::pissa(), Method::full())] {
        let mut m = tiny();
        m.attach_adapters(spectune::nn::modules(&["q_proj"]), &lora_cfg(), &a, 1).unwrap();
        m.attach_adapters(spectune::nn::modules(&["v_proj"]), &lora_cfg(), &b, 2).unwrap();
        let e = save_adapter(&m, tempfile::tempdir().unwrap().path(), &lora_cfg(), "x").unwrap_err().to_string();
        assert!(e.contains("cannot be saved in one folder"), "{e}");
    }
    // LoRA-layout methods may share one (told apart per module at load).
    let mut m = tiny();
    m.attach_adapters(spectune::nn::modules(&["q_proj"]), &lora_cfg(), &Method::lora(), 1).unwrap();
    m.attach_adapters(spectune::nn::modules(&["v_proj"]), &lora_cfg(), &Method::spectral_a(0), 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&m, dir.path(), &lora_cfg(), "x").unwrap();
    let mut fresh = tiny();
    load_adapter(&mut fresh, dir.path()).unwrap();
    assert_eq!(fresh.logits(&ids(), 1, 12, None).unwrap().to_vec_f32(), m.logits(&ids(), 1, 12, None).unwrap().to_vec_f32());
}
