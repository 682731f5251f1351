//! Multi-adapter fusion on disjoint singular-vector blocks (docs/ops.md §17–19, §22): two Spectral
//! adapters trained on two different tiny tasks, on blocks 0 and 1 of the same base, fused into
//! one model; each task keeps most of its gain. Plus the file path (`spectune fuse`) and errors.

mod common;

use spectune::gradcheck::SplitMix;
use spectune::io::Checkpoint;
use spectune::model::{Decoder, DecoderConfig, Model};
use spectune::ops::CeOptions;
use spectune::peft::export::merge_to_hf;
use spectune::peft::fuse::{fuse_checkpoint, fuse_models};
use spectune::peft::io::save_adapter;
use spectune::peft::{LoraConfig, Method};
use spectune::{backward, no_grad, AdamW, AdamWConfig, DType, Tensor};

const T: usize = 12;

/// `n` sequences of a task: a start token, then each next token is `next(previous)`.
fn task(n: usize, seed: u64, next: fn(u32) -> u32, range: (u32, u32)) -> (Vec<u32>, Vec<i64>) {
    let mut rng = SplitMix::new(seed);
    let mut ids = Vec::with_capacity(n * T);
    for _ in 0..n {
        let mut t = range.0 + (rng.next_u64() % (range.1 - range.0) as u64) as u32;
        for _ in 0..T {
            ids.push(t);
            t = next(t);
        }
    }
    // Targets: the next token within each sequence (the last position is ignored).
    let targets = (0..n * T).map(|i| if (i + 1) % T == 0 { -100 } else { ids[i + 1] as i64 }).collect();
    (ids, targets)
}

/// Task A on tokens 0..20: t → 7t + 3 (mod 20). Task B on tokens 20..40: a different bijection.
fn next_a(t: u32) -> u32 {
    (7 * t + 3) % 20
}
fn next_b(t: u32) -> u32 {
    20 + (3 * (t - 20) + 11) % 20
}

fn loss(m: &dyn Model, data: &(Vec<u32>, Vec<i64>)) -> f64 {
    let n = data.0.len() / T;
    no_grad(|| m.loss(&data.0, &data.1, n, T, None, &CeOptions::default()).unwrap().item().unwrap())
}

fn train(m: &mut Decoder, data: &(Vec<u32>, Vec<i64>), steps: usize) {
    let mut opt = AdamW::new(&m.trainable_params(), AdamWConfig { lr: 5e-3, ..AdamWConfig::default() }).unwrap();
    let n = data.0.len() / T;
    for _ in 0..steps {
        let l = m.loss(&data.0, &data.1, n, T, None, &CeOptions::default()).unwrap();
        opt.step(&backward(&l).unwrap(), 5e-3).unwrap();
    }
}

fn lora(rank: usize) -> LoraConfig {
    LoraConfig { rank, alpha: rank as f64, rslora: false, dropout: 0.0 }
}

/// The naive alternative for comparison: the two adapters' updates W' − W summed into W.
fn sum_of_updates(base: &Decoder, ms: &[&Decoder]) -> Decoder {
    let mut f = base.clone();
    for lin in f.linears_mut() {
        let w0 = lin.weight.to_vec_f64();
        let mut w = w0.clone();
        let ads: Vec<_> = ms.iter().filter_map(|m| m.linear(&lin.path).unwrap().adapter.as_ref()).collect();
        for ad in &ads {
            let wm = ad.merged_weight(&lin.weight).unwrap();
            w.iter_mut().zip(wm.iter().zip(&w0)).for_each(|(x, (a, b))| *x += a - b);
        }
        if !ads.is_empty() {
            lin.weight = Tensor::from_vec(w.iter().map(|&x| x as f32).collect::<Vec<f32>>(), lin.weight.dims().to_vec()).unwrap();
            lin.adapter = None;
        }
    }
    f
}

#[test]
fn two_tasks_on_disjoint_blocks_fuse_and_keep_their_gains() {
    // Hidden 64 (k/v: 32 rows), adapters on q_proj and v_proj, r = 4: block 0 = triplets 0..3,
    // block 1 = triplets 4..7.
    let cfg = DecoderConfig { hidden_size: 64, intermediate_size: 96, head_dim: 16, ..common::tiny_config(41, true) };
    let base = Decoder::random(cfg, DType::F32, 3).unwrap();
    let (train_a, eval_a) = (task(16, 1, next_a, (0, 20)), task(16, 2, next_a, (0, 20)));
    let (train_b, eval_b) = (task(16, 3, next_b, (20, 40)), task(16, 4, next_b, (20, 40)));
    let run = |m0: Method, m1: Method, fuse: &dyn Fn(&Decoder, &Decoder) -> Box<dyn Model>| {
        let alpha = if m0 == Method::lora() { 8.0 } else { 4.0 };
        let cfg = LoraConfig { rank: 4, alpha, rslora: false, dropout: 0.0 };
        let mut ma = base.clone();
        ma.attach_adapters(spectune::nn::modules(&["q_proj", "v_proj"]), &cfg, &m0, 10).unwrap();
        train(&mut ma, &train_a, 60);
        let mut mb = base.clone();
        mb.attach_adapters(spectune::nn::modules(&["q_proj", "v_proj"]), &cfg, &m1, 11).unwrap();
        train(&mut mb, &train_b, 60);
        let fused = fuse(&ma, &mb);
        let (b_a, a_a, f_a) = (loss(&base, &eval_a), loss(&ma, &eval_a), loss(&*fused, &eval_a));
        let (b_b, a_b, f_b) = (loss(&base, &eval_b), loss(&mb, &eval_b), loss(&*fused, &eval_b));
        let (keep_a, keep_b) = ((b_a - f_a) / (b_a - a_a), (b_b - f_b) / (b_b - a_b));
        let what = format!("{} + {}", m0.label(), m1.label());
        eprintln!("{what}: task A held-out loss: base {b_a:.4}, adapter alone {a_a:.4}, fused {f_a:.4} (keeps {:.0} % of the gain)", 100.0 * keep_a);
        eprintln!("{what}: task B held-out loss: base {b_b:.4}, adapter alone {a_b:.4}, fused {f_b:.4} (keeps {:.0} % of the gain)", 100.0 * keep_b);
        (b_a - a_a, b_b - a_b, keep_a, keep_b)
    };
    let fuse = |a: &Decoder, b: &Decoder| fuse_models(&base, &[a, b]).unwrap();
    for (m0, m1) in [(Method::spectral_a(0), Method::spectral_a(1)), (Method::spectral_r(0), Method::spectral_r(1))] {
        let (gain_a, gain_b, keep_a, keep_b) = run(m0, m1, &fuse);
        // Each adapter learned its task …
        assert!(gain_a > 0.1 && gain_b > 0.1, "{m0:?}: the adapters must learn their tasks ({gain_a:.3}, {gain_b:.3})");
        // … and the fused model keeps most of each gain.
        assert!(keep_a > 0.5 && keep_b > 0.5, "{m0:?}: fusion lost the gains: {keep_a:.2}, {keep_b:.2}");
    }
    // For comparison only (printed, not asserted): the same-block Spectral^A pair and two LoRAs,
    // fused by summing their updates. Disjoint blocks keep the adapters' parameters apart; the
    // tasks still share the inputs, so some interference remains either way.
    let sum = |a: &Decoder, b: &Decoder| Box::new(sum_of_updates(&base, &[a, b])) as Box<dyn Model>;
    run(Method::spectral_a(0), Method::spectral_a(0), &sum);
    run(Method::lora(), Method::lora(), &sum);
}

#[test]
fn fuse_through_files_and_its_errors() {
    let base = Decoder::random(common::tiny_config(41, true), DType::F32, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("base");
    merge_to_hf(&base, &base_dir).unwrap();
    let base = spectune::model::load(&Checkpoint::open(&base_dir).unwrap(), DType::F32).unwrap();
    let make = |method: Method, seed: u64, name: &str| {
        let mut m = base.clone();
        m.attach_adapters(spectune::nn::modules(&["q_proj", "up_proj"]), &lora(2), &method, seed).unwrap();
        let mut rng = SplitMix::new(seed);
        for p in m.trainable_params() {
            let v: Vec<f32> = p.to_vec_f32().iter().map(|x| x + rng.uniform(-0.2, 0.2) as f32).collect();
            p.set_values(&v).unwrap();
        }
        let d = dir.path().join(name);
        save_adapter(&m, &d, &lora(2), "base").unwrap();
        (m, d)
    };
    let (ma, da) = make(Method::spectral_a(0), 1, "a");
    let (mb, db) = make(Method::spectral_r(1), 2, "b");
    let out = dir.path().join("fused");
    let s = fuse_checkpoint(&base_dir, &[&da, &db], &out).unwrap();
    eprintln!("{s:?}");
    assert_eq!((s.adapters, s.modules, s.blocks.clone()), (2, 4, vec![0, 1]));
    assert!(s.max_abs_diff < 1e-4, "{}", s.max_abs_diff);
    // The folder equals the in-memory fusion.
    let reloaded = spectune::model::load(&Checkpoint::open(&out).unwrap(), DType::F32).unwrap();
    let fused = fuse_models(&base, &[&ma, &mb]).unwrap();
    assert_eq!(reloaded.layers[1].linear("up_proj").unwrap().weight.to_vec_f32(), fused.linear("model.layers.1.mlp.up_proj").unwrap().weight.to_vec_f32());
    // Fusing one adapter is its merge.
    let one = fuse_models(&base, &[&ma]).unwrap();
    let want: Vec<f32> = ma.layers[0]
        .linear("q_proj")
        .unwrap()
        .adapter
        .as_ref()
        .unwrap()
        .merged_weight(&base.layers[0].linear("q_proj").unwrap().weight)
        .unwrap()
        .iter()
        .map(|&v| v as f32)
        .collect();
    assert_eq!(one.linear("model.layers.0.self_attn.q_proj").unwrap().weight.to_vec_f32(), want);
    // Errors: overlapping blocks, a non-spectral adapter, factors from another base.
    let (_, da2) = make(Method::spectral_r(0), 3, "a2");
    let e = fuse_checkpoint(&base_dir, &[&da, &da2], &dir.path().join("x")).unwrap_err().to_string();
    assert!(e.contains("overlap"), "{e}");
    let (_, dl) = make(Method::pissa(), 4, "p");
    let e = fuse_checkpoint(&base_dir, &[&da, &dl], &dir.path().join("y")).unwrap_err().to_string();
    assert!(e.contains("Spectral"), "{e}");
    let other = Decoder::random(common::tiny_config(41, true), DType::F32, 77).unwrap();
    let e = fuse_models(&other, &[&mb]).err().expect("fusing onto another base must fail").to_string();
    assert!(e.contains("another base model"), "{e}");
}
