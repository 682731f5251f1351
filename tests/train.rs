//! The training loop: gradient accumulation equals one big batch, checkpoints resume
//! bit-identically, non-finite losses stop without touching the adapter.

mod common;

use spectune::gradcheck::SplitMix;
use spectune::model::{Decoder, DecoderConfig};
use spectune::optim::{AdamW, AdamWConfig};
use spectune::peft::{LoraConfig, Method};
use spectune::train::data::Batch;
use spectune::train::{accumulate, load_checkpoint, optimizer_for, save_checkpoint, step_seed, train_step, TrainerState};
use spectune::DType;

fn cfg() -> DecoderConfig {
    common::tiny_config(53, false)
}

fn row(seed: u64, t: usize, pad: usize) -> (Vec<u32>, Vec<i64>, Vec<bool>) {
    let mut rng = SplitMix::new(seed);
    let ids: Vec<u32> = (0..t).map(|_| (rng.next_u64() % 53) as u32).collect();
    let real = t - pad;
    let targets = (0..t).map(|i| if i + 1 < real { ids[i + 1] as i64 } else { -100 }).collect();
    let mask = (0..t).map(|i| i < real).collect();
    (ids, targets, mask)
}

fn batch_of(rows: &[(Vec<u32>, Vec<i64>, Vec<bool>)]) -> Batch {
    let t = rows[0].0.len();
    let ids = rows.iter().flat_map(|r| r.0.clone()).collect();
    let targets: Vec<i64> = rows.iter().flat_map(|r| r.1.clone()).collect();
    let key_mask = Some(rows.iter().flat_map(|r| r.2.clone()).collect());
    let counted = targets.iter().filter(|&&x| x != -100).count();
    Batch { ids, targets, key_mask, b: rows.len(), t, counted }
}

fn model(method: &Method) -> Decoder {
    let mut m = Decoder::random(cfg(), DType::F64, 1).unwrap();
    m.attach_adapters(|_| Ok(true), &LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 }, method, 2).unwrap();
    let mut rng = SplitMix::new(3);
    for p in m.trainable_params() {
        p.set_values(&rng.vec(p.numel(), 0.6, 1.4)).unwrap();
    }
    m
}

#[test]
fn grad_accumulation_of_4x1_equals_one_batch_of_4() {
    // Rows with different numbers of counted tokens (padding), where a per-micro-batch mean
    // would weight tokens unequally.
    let rows: Vec<_> = (0..4).map(|i| row(10 + i, 9, [0, 3, 6, 1][i as usize])).collect();
    let m = model(&Method::speclora(3));
    let (l_big, g_big, _, n_big) = accumulate(&m, &[batch_of(&rows)]).unwrap();
    let micro: Vec<Batch> = rows.iter().map(|r| batch_of(std::slice::from_ref(r))).collect();
    let (l_acc, g_acc, _, n_acc) = accumulate(&m, &micro).unwrap();
    assert_eq!(n_big, n_acc);
    assert!((l_big - l_acc).abs() < 1e-12 * l_big.abs(), "{l_big} vs {l_acc}");
    for p in m.trainable_params() {
        let (a, b) = (g_big.get(&p).unwrap().to_vec_f64(), g_acc.get(&p).unwrap().to_vec_f64());
        let scale = a.iter().fold(1e-12f64, |s, v| s.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-10 * scale, "{x} vs {y}");
        }
    }
}

fn run(m: &mut Decoder, opt: &mut AdamW, from: u64, to: u64, seed: u64) -> Vec<f64> {
    (from..to)
        .map(|s| {
            let b = batch_of(&[row(100 + s, 8, (s % 3) as usize), row(200 + s, 8, 0)]);
            train_step(m, opt, &[b], 1e-2, Some(1.0), step_seed(seed, s)).unwrap().loss
        })
        .collect()
}

#[test]
fn resume_continues_bit_identically() {
    let lora = LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.2 };
    let fresh = |m: &Method| {
        let mut x = Decoder::random(cfg(), DType::F32, 1).unwrap();
        x.attach_adapters(|_| Ok(true), &lora, m, 2).unwrap();
        x
    };
    for method in [
        Method::lora(),
        Method::speclora_by_norm(4),
        Method::speclora_svd(3),
        Method::spectral_a(1),
        Method::spectral_r(0),
        Method::pissa(),
        Method::milora(),
        Method::dora(),
        Method::full(),
    ] {
        let ocfg = AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..AdamWConfig::default() };
        // 10 steps straight.
        let mut a = fresh(&method);
        let mut oa = optimizer_for(&a, ocfg).unwrap();
        let la = run(&mut a, &mut oa, 0, 10, 7);
        // 5 steps, checkpoint, a fresh process-like restart, 5 more.
        let mut b = fresh(&method);
        let mut ob = optimizer_for(&b, ocfg).unwrap();
        let mut lb = run(&mut b, &mut ob, 0, 5, 7);
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoint");
        save_checkpoint(&ck, &b, &ob, &lora, &TrainerState { step: 5, seed: 7, data: serde_json::json!({"pos": 5}) }, "tiny").unwrap();
        let mut c = Decoder::random(cfg(), DType::F32, 1).unwrap();
        let (mut oc, _, st) = load_checkpoint(&ck, &mut c, ocfg).unwrap();
        assert_eq!(st, TrainerState { step: 5, seed: 7, data: serde_json::json!({"pos": 5}) });
        lb.extend(run(&mut c, &mut oc, st.step, 10, st.seed));
        assert_eq!(la, lb, "{method:?}: losses differ after resume");
        let bits = |m: &Decoder| m.trainable_params().iter().flat_map(|p| p.to_vec_f32()).map(f32::to_bits).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&c), "{method:?}: adapters differ after resume");
        // Saving again over an existing checkpoint leaves one complete folder.
        save_checkpoint(&ck, &c, &oc, &lora, &TrainerState { step: 10, seed: 7, data: serde_json::Value::Null }, "tiny").unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["checkpoint".to_string()]);
    }
}

#[test]
fn a_non_finite_loss_stops_without_changing_the_adapter() {
    let mut m = model(&Method::lora());
    let mut opt = AdamW::new(&m.trainable_params(), AdamWConfig::default()).unwrap();
    let before: Vec<Vec<f64>> = m.trainable_params().iter().map(|p| p.to_vec_f64()).collect();
    // Poison one adapter value: the loss becomes NaN.
    let p0 = m.trainable_params()[0].clone();
    let mut v = p0.to_vec_f64();
    v[0] = f64::NAN;
    p0.set_values(&v).unwrap();
    let e = train_step(&mut m, &mut opt, &[batch_of(&[row(1, 8, 0)])], 1e-2, Some(1.0), 0).unwrap_err();
    assert!(matches!(e, spectune::Error::NonFinite { .. }), "{e}");
    assert_eq!(opt.step_count(), 0);
    let after: Vec<Vec<f64>> = m.trainable_params().iter().map(|p| p.to_vec_f64()).collect();
    assert_eq!(before[1..], after[1..]);
}
