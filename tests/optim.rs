//! AdamW, gradient clipping and learning-rate schedules.

use spectune::optim::AdamWState;
use spectune::{backward, clip_grad_norm, ops, AdamW, AdamWConfig, Error, GradStore, LrSchedule, Tensor};

fn param(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape.to_vec()).unwrap().param().unwrap()
}

fn grads_for(pairs: &[(&Tensor, Vec<f64>)]) -> GradStore {
    let mut g = GradStore::new();
    for (p, v) in pairs {
        g.accumulate(p.id(), Tensor::from_vec(v.clone(), p.shape().clone()).unwrap()).unwrap();
    }
    g
}

/// Independent reference in PyTorch's form: p ← p·(1 − lr·λ); Adam step with bias correction.
#[allow(clippy::too_many_arguments)]
fn reference_step(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64, t: i32) {
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let mhat = m[i] / (1.0 - b1.powi(t));
        let vhat = v[i] / (1.0 - b2.powi(t));
        p[i] -= lr * mhat / (vhat.sqrt() + eps);
    }
}

#[test]
fn adamw_two_steps_match_reference_f64() {
    let p0 = vec![0.5, -1.2, 2.0, 0.0];
    let p = param(p0.clone(), &[2, 2]);
    let cfg = AdamWConfig { lr: 0.01, beta1: 0.8, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(std::slice::from_ref(&p), cfg).unwrap();
    let g1 = vec![0.3, -2.0, 0.01, 1.5];
    let g2 = vec![-0.1, -1.0, 0.5, 0.25];
    let lrs = [0.01, 0.007];

    let (mut rp, mut rm, mut rv) = (p0.clone(), vec![0.0; 4], vec![0.0; 4]);
    reference_step(&mut rp, &mut rm, &mut rv, &g1, lrs[0], 0.8, 0.95, 1e-8, 0.1, 1);
    // First step in closed form: m̂ = g and v̂ = g², so the Adam direction is g / (|g| + ε).
    for i in 0..4 {
        let closed = p0[i] - lrs[0] * (g1[i] / (g1[i].abs() + 1e-8) + 0.1 * p0[i]);
        assert!((closed - rp[i]).abs() < 1e-15, "closed form {closed} vs reference {}", rp[i]);
    }
    opt.step(&grads_for(&[(&p, g1.clone())]), lrs[0]).unwrap();
    for (a, b) in p.to_vec_f64().iter().zip(&rp) {
        assert!((a - b).abs() <= 1e-14 * b.abs().max(1.0), "step 1: {a} vs {b}");
    }
    reference_step(&mut rp, &mut rm, &mut rv, &g2, lrs[1], 0.8, 0.95, 1e-8, 0.1, 2);
    opt.step(&grads_for(&[(&p, g2.clone())]), lrs[1]).unwrap();
    for (a, b) in p.to_vec_f64().iter().zip(&rp) {
        assert!((a - b).abs() <= 1e-14 * b.abs().max(1.0), "step 2: {a} vs {b}");
    }
    assert_eq!(opt.step_count(), 2);
    let st = opt.state().unwrap();
    assert_eq!(st.step, 2);
    assert_eq!(st.params[0].step, 2);
    for i in 0..4 {
        assert!((st.params[0].m[i] - rm[i]).abs() < 1e-15);
        assert!((st.params[0].v[i] - rv[i]).abs() < 1e-15);
    }
}

#[test]
fn adamw_f32_param_tracks_f64_reference() {
    let p0 = vec![0.25f32, -0.75, 1.5];
    let p = Tensor::from_vec(p0.clone(), [3]).unwrap().param().unwrap();
    let cfg = AdamWConfig { lr: 0.05, weight_decay: 0.01, ..Default::default() };
    let mut opt = AdamW::new(std::slice::from_ref(&p), cfg).unwrap();
    let (mut rp, mut rm, mut rv): (Vec<f64>, _, _) = (p0.iter().map(|&x| x as f64).collect(), vec![0.0; 3], vec![0.0; 3]);
    for t in 1..=3 {
        let g: Vec<f32> = vec![0.5 * t as f32, -0.2, 0.1 / t as f32];
        let mut gs = GradStore::new();
        gs.accumulate(p.id(), Tensor::from_vec(g.clone(), [3]).unwrap()).unwrap();
        opt.step(&gs, 0.05).unwrap();
        let g64: Vec<f64> = g.iter().map(|&x| x as f64).collect();
        reference_step(&mut rp, &mut rm, &mut rv, &g64, 0.05, 0.9, 0.999, 1e-8, 0.01, t);
    }
    assert_eq!(p.dtype(), spectune::DType::F32);
    for (a, b) in p.to_vec_f64().iter().zip(&rp) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn state_numel_is_twice_the_trainable_values() {
    let a = Tensor::zeros::<f32>([4, 16]).param().unwrap();
    let b = Tensor::zeros::<f32>([8, 4]).param().unwrap();
    let d = Tensor::full(1.0f64, [3]).param().unwrap();
    let params = [a, b, d];
    let opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
    let trainable: usize = params.iter().map(|t| t.numel()).sum();
    assert_eq!(trainable, 64 + 32 + 3);
    assert_eq!(opt.state_numel(), 2 * trainable);
    assert_eq!(opt.step_count(), 0);
    let st = opt.state().unwrap();
    assert_eq!(st.params.iter().map(|p| p.m.len() + p.v.len()).sum::<usize>(), 2 * trainable);
}

#[test]
fn frozen_or_repeated_tensors_are_rejected() {
    let frozen = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]).unwrap();
    let trainable = Tensor::zeros::<f32>([2]).param().unwrap();
    let err = AdamW::new(&[trainable.clone(), frozen], AdamWConfig::default()).err().expect("a frozen tensor must be refused");
    match &err {
        Error::Invalid { msg, .. } => {
            assert!(msg.contains("[2, 3]"), "message should name the shape: {msg}");
            assert!(msg.contains("#1"), "message should name the position: {msg}");
        }
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
    // A computed (non-leaf) tensor is not a parameter either.
    let y = ops::scale(&trainable, 2.0).unwrap();
    assert!(y.requires_grad());
    assert!(AdamW::new(&[y], AdamWConfig::default()).is_err());
    // The same parameter twice would be stepped twice.
    assert!(matches!(AdamW::new(&[trainable.clone(), trainable.clone()], AdamWConfig::default()), Err(Error::Invalid { .. })));
    // Bad hyperparameters.
    assert!(AdamW::new(std::slice::from_ref(&trainable), AdamWConfig { beta1: 1.0, ..Default::default() }).is_err());
    assert!(AdamW::new(&[trainable], AdamWConfig { eps: 0.0, ..Default::default() }).is_err());
}

#[test]
fn frozen_weight_is_bit_identical_after_five_steps() {
    let (m, n, r) = (6usize, 8usize, 4usize);
    let wv: Vec<f32> = (0..m * n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.05).collect();
    let w = Tensor::from_vec(wv, [m, n]).unwrap();
    let xv: Vec<f32> = (0..2 * n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.1).collect();
    let x = Tensor::from_vec(xv, [2, n]).unwrap();
    let a = Tensor::from_vec((0..r * n).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect::<Vec<f32>>(), [r, n]).unwrap().param().unwrap();
    let b = Tensor::from_vec((0..m * r).map(|i| ((i % 3) as f32 - 1.0) * 0.02).collect::<Vec<f32>>(), [m, r]).unwrap().param().unwrap();
    let w_bits: Vec<u32> = w.to_vec_f32().iter().map(|v| v.to_bits()).collect();
    let (a0, b0) = (a.to_vec_f32(), b.to_vec_f32());

    let mut opt = AdamW::new(&[a.clone(), b.clone()], AdamWConfig { lr: 0.01, weight_decay: 0.05, ..Default::default() }).unwrap();
    assert!(AdamW::new(&[a.clone(), w.clone()], AdamWConfig::default()).is_err());
    for _ in 0..5 {
        let y = ops::lora_linear(&x, &w, &a, &b, 2.0).unwrap();
        let loss = ops::sum(&ops::mul(&y, &y).unwrap()).unwrap();
        let grads = backward(&loss).unwrap();
        assert!(grads.get(&w).is_none(), "the frozen weight must get no gradient");
        assert!(grads.get(&a).is_some() && grads.get(&b).is_some());
        assert_eq!(grads.len(), 2);
        opt.step(&grads, 0.01).unwrap();
    }
    let after: Vec<u32> = w.to_vec_f32().iter().map(|v| v.to_bits()).collect();
    assert_eq!(w_bits, after, "frozen weight changed");
    assert_ne!(a.to_vec_f32(), a0, "A was not trained");
    assert_ne!(b.to_vec_f32(), b0, "B was not trained");
    assert_eq!(opt.state_numel(), 2 * (r * n + m * r));
    assert_eq!(opt.step_count(), 5);
}

#[test]
fn non_finite_gradient_fails_and_changes_nothing() {
    let p = param(vec![1.0, 2.0], &[2]);
    let q = param(vec![-1.0, 0.5, 3.0], &[3]);
    let mut opt = AdamW::new(&[p.clone(), q.clone()], AdamWConfig { lr: 0.1, weight_decay: 0.1, ..Default::default() }).unwrap();
    opt.step(&grads_for(&[(&p, vec![0.1, 0.2]), (&q, vec![0.3, 0.4, 0.5])]), 0.1).unwrap();
    let (pv, qv, st) = (p.to_vec_f64(), q.to_vec_f64(), opt.state().unwrap());

    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let g = grads_for(&[(&p, vec![0.1, 0.2]), (&q, vec![0.3, bad, 0.5])]);
        match opt.step(&g, 0.1) {
            Err(Error::NonFinite { op, what }) => {
                assert_eq!(op, "AdamW::step");
                assert!(what.contains("#1") && what.contains("[3]"), "should name the param: {what}");
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert_eq!(p.to_vec_f64(), pv, "a finite param must not be updated either");
        assert_eq!(q.to_vec_f64(), qv);
        assert_eq!(opt.state().unwrap(), st);
        assert_eq!(opt.step_count(), 1);
    }
    // Negative or non-finite learning rates are refused.
    let g = grads_for(&[(&p, vec![0.1, 0.2])]);
    assert!(opt.step(&g, -1.0).is_err());
    assert!(opt.step(&g, f64::NAN).is_err());
    assert_eq!(p.to_vec_f64(), pv);
}

#[test]
fn gradient_of_wrong_shape_is_refused() {
    let p = param(vec![1.0, 2.0], &[2]);
    let mut opt = AdamW::new(std::slice::from_ref(&p), AdamWConfig::default()).unwrap();
    let mut g = GradStore::new();
    g.accumulate(p.id(), Tensor::from_vec(vec![1.0f64, 2.0, 3.0], [3]).unwrap()).unwrap();
    assert!(matches!(opt.step(&g, 0.1), Err(Error::Shape { .. })));
    let mut g = GradStore::new();
    g.accumulate(p.id(), Tensor::from_vec(vec![1.0f32, 2.0], [2]).unwrap()).unwrap();
    assert!(matches!(opt.step(&g, 0.1), Err(Error::DType { .. })));
    assert_eq!(p.to_vec_f64(), vec![1.0, 2.0]);
}

#[test]
fn params_without_gradient_are_skipped() {
    let p = param(vec![1.0, 2.0], &[2]);
    let q = param(vec![3.0], &[1]);
    let mut opt = AdamW::new(&[p.clone(), q.clone()], AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() }).unwrap();
    opt.step(&grads_for(&[(&p, vec![1.0, -1.0])]), 0.1).unwrap();
    assert_eq!(q.to_vec_f64(), vec![3.0], "no gradient: no update, not even weight decay");
    let st = opt.state().unwrap();
    assert_eq!((st.params[0].step, st.params[1].step), (1, 0));
    assert_eq!(st.params[1].m, vec![0.0]);
    assert_eq!(st.params[1].v, vec![0.0]);
    // q's first update uses bias correction t = 1: its Adam direction is exactly sign(g).
    opt.step(&grads_for(&[(&q, vec![2.0])]), 0.1).unwrap();
    let expected = 3.0 - 0.1 * (2.0 / (2.0 + 1e-8) + 0.5 * 3.0);
    assert!((q.to_vec_f64()[0] - expected).abs() < 1e-14);
    assert_eq!(opt.step_count(), 2);
    assert_eq!(opt.state().unwrap().params[1].step, 1);
}

#[test]
fn state_round_trips_bit_identically() {
    let init: Vec<f32> = vec![0.1, -0.2, 0.3, 0.7, -1.1, 0.05];
    let mk = || Tensor::from_vec(init.clone(), [2, 3]).unwrap().param().unwrap();
    let cfg = AdamWConfig { lr: 0.03, weight_decay: 0.02, ..Default::default() };
    let p1 = mk();
    let mut o1 = AdamW::new(std::slice::from_ref(&p1), cfg).unwrap();
    let grad = |t: usize| {
        let v: Vec<f32> = (0..6).map(|i| ((i * 7 + t * 3) % 11) as f32 * 0.13 - 0.6).collect();
        Tensor::from_vec(v, [2, 3]).unwrap()
    };
    for t in 0..3 {
        let mut g = GradStore::new();
        g.accumulate(p1.id(), grad(t)).unwrap();
        o1.step(&g, 0.03).unwrap();
    }
    let saved: AdamWState = o1.state().unwrap();
    let p2 = mk();
    p2.set_values(&p1.to_vec_f32()).unwrap();
    let mut o2 = AdamW::new(std::slice::from_ref(&p2), cfg).unwrap();
    o2.load_state(&saved).unwrap();
    assert_eq!(o2.state().unwrap(), saved);
    assert_eq!(o2.step_count(), 3);
    for t in 3..6 {
        for (p, o) in [(&p1, &mut o1), (&p2, &mut o2)] {
            let mut g = GradStore::new();
            g.accumulate(p.id(), grad(t)).unwrap();
            o.step(&g, 0.03).unwrap();
        }
    }
    let bits = |t: &Tensor| t.to_vec_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&p1), bits(&p2));

    // Mismatched states are refused without changing anything.
    let mut bad = saved.clone();
    bad.params[0].m.pop();
    assert!(o2.load_state(&bad).is_err());
    let mut bad = saved.clone();
    bad.params[0].v[0] = f64::NAN;
    assert!(matches!(o2.load_state(&bad), Err(Error::NonFinite { .. })));
    let bad = AdamWState { step: 1, params: vec![] };
    assert!(o2.load_state(&bad).is_err());
    assert_eq!(o2.step_count(), 6);
}

#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let p = param(vec![0.0, 0.0], &[2]);
    let mut g = grads_for(&[(&p, vec![3.0, 4.0])]);
    let norm = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    let v = g.get(&p).unwrap().to_vec_f64();
    assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6, "{v:?}");
    // Already below the limit: unchanged.
    let norm = clip_grad_norm(&mut g, 10.0).unwrap();
    assert!((norm - 1.0).abs() < 1e-6);
    assert_eq!(g.get(&p).unwrap().to_vec_f64(), v);
    // Empty store.
    assert_eq!(clip_grad_norm(&mut GradStore::new(), 1.0).unwrap(), 0.0);
    assert!(clip_grad_norm(&mut g, 0.0).is_err());
}

#[test]
fn clip_grad_norm_is_global_and_never_scales_a_shared_buffer_twice() {
    let p = param(vec![0.0; 2], &[2]);
    let q = Tensor::zeros::<f32>([1]).param().unwrap();
    let r = param(vec![0.0; 2], &[2]);
    // p and r receive the same gradient handle; the caller keeps one too.
    let shared = Tensor::from_vec(vec![1.0f64, 2.0], [2]).unwrap();
    let mut g = GradStore::new();
    g.accumulate(p.id(), shared.clone()).unwrap();
    g.accumulate(r.id(), shared.clone()).unwrap();
    g.accumulate(q.id(), Tensor::from_vec(vec![-3.0f32], [1]).unwrap()).unwrap();
    let norm = clip_grad_norm(&mut g, 2.0).unwrap();
    let expected = (1.0f64 + 4.0 + 1.0 + 4.0 + 9.0).sqrt();
    assert!((norm - expected).abs() < 1e-12);
    let c = 2.0 / (expected + 1e-6);
    for t in [&p, &r] {
        let v = g.get(t).unwrap().to_vec_f64();
        assert!((v[0] - c).abs() < 1e-12 && (v[1] - 2.0 * c).abs() < 1e-12, "{v:?}");
    }
    let vq = g.get(&q).unwrap().to_vec_f32()[0] as f64;
    assert!((vq + 3.0 * c).abs() < 1e-6);
    assert_eq!(shared.to_vec_f64(), vec![1.0, 2.0], "a tensor held outside the store must not change");
    let total: f64 = g.iter().map(|(_, t)| t.to_vec_f64().iter().map(|x| x * x).sum::<f64>()).sum();
    assert!((total.sqrt() - 2.0).abs() < 1e-5);
}

#[test]
fn clip_grad_norm_rejects_non_finite() {
    let p = param(vec![0.0; 3], &[3]);
    let mut g = grads_for(&[(&p, vec![1.0, f64::NAN, 2.0])]);
    assert!(matches!(clip_grad_norm(&mut g, 1.0), Err(Error::NonFinite { .. })));
    let mut g = grads_for(&[(&p, vec![1.0, f64::INFINITY, 2.0])]);
    assert!(matches!(clip_grad_norm(&mut g, 1.0), Err(Error::NonFinite { .. })));
    let v = g.get(&p).unwrap().to_vec_f64();
    assert_eq!(v[0], 1.0);
    assert_eq!(v[2], 2.0);
}

#[test]
fn lr_schedules() {
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    let base = 2.0;
    close(LrSchedule::Constant.lr_at(base, 0), 2.0);
    close(LrSchedule::Constant.lr_at(base, 12345), 2.0);

    let cos = LrSchedule::WarmupCosine { warmup: 10, total: 110, min_ratio: 0.1 };
    close(cos.lr_at(base, 0), 0.0);
    close(cos.lr_at(base, 5), 1.0);
    close(cos.lr_at(base, 10), 2.0);
    // q = 0.25: 0.1 + 0.9·½·(1 + cos(π/4)) = 0.1 + 0.45·1.7071067811865475
    close(cos.lr_at(base, 35), 2.0 * (0.1 + 0.45 * 1.707_106_781_186_547_5));
    close(cos.lr_at(base, 60), 2.0 * 0.55);
    close(cos.lr_at(base, 110), 0.2);
    close(cos.lr_at(base, 500), 0.2);

    let lin = LrSchedule::WarmupLinear { warmup: 10, total: 110, min_ratio: 0.1 };
    close(lin.lr_at(base, 0), 0.0);
    close(lin.lr_at(base, 5), 1.0);
    close(lin.lr_at(base, 10), 2.0);
    close(lin.lr_at(base, 35), 2.0 * 0.775);
    close(lin.lr_at(base, 60), 2.0 * 0.55);
    close(lin.lr_at(base, 110), 0.2);
    close(lin.lr_at(base, 500), 0.2);

    // No warmup: step 0 is at full rate; decay to zero.
    let nw = LrSchedule::WarmupLinear { warmup: 0, total: 4, min_ratio: 0.0 };
    close(nw.lr_at(1.0, 0), 1.0);
    close(nw.lr_at(1.0, 1), 0.75);
    close(nw.lr_at(1.0, 4), 0.0);
    // Monotone decay after warmup.
    for s in 10..110 {
        assert!(cos.lr_at(base, s + 1) <= cos.lr_at(base, s));
        assert!(lin.lr_at(base, s + 1) <= lin.lr_at(base, s));
    }
}

#[test]
fn adamw_converges_on_a_quadratic() {
    let target = vec![1.0, -2.0, 0.5, 3.0, -0.7];
    let t = Tensor::from_vec(target.clone(), [5]).unwrap();
    let neg_t = ops::scale(&t, -1.0).unwrap();
    let p = Tensor::zeros::<f64>([5]).param().unwrap();
    let mut opt = AdamW::new(std::slice::from_ref(&p), AdamWConfig { lr: 0.05, ..Default::default() }).unwrap();
    let loss_of = || {
        let d = ops::add(&p, &neg_t).unwrap();
        ops::sum(&ops::mul(&d, &d).unwrap()).unwrap()
    };
    let first = loss_of().item().unwrap();
    for _ in 0..200 {
        let grads = backward(&loss_of()).unwrap();
        opt.step(&grads, 0.05).unwrap();
    }
    let last = loss_of().item().unwrap();
    assert!(last < 1e-3 * first, "loss {first} -> {last}");
    for (a, b) in p.to_vec_f64().iter().zip(&target) {
        assert!((a - b).abs() < 0.05, "{a} vs target {b}");
    }
}

#[test]
fn weight_decay_can_be_turned_off_per_parameter() {
    // With a zero gradient, AdamW's update is pure decay: p ← p − lr·wd·p.
    let a = spectune::Tensor::from_vec(vec![1.0f64, 2.0], [2]).unwrap().param().unwrap();
    let d = spectune::Tensor::from_vec(vec![1.0f64, 1.0], [2]).unwrap().param().unwrap();
    let mut opt = spectune::AdamW::new(&[a.clone(), d.clone()], spectune::AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() }).unwrap();
    opt.set_weight_decay(&d, false).unwrap();
    let loss = spectune::ops::sum(&spectune::ops::add(&spectune::ops::scale(&a, 0.0).unwrap(), &spectune::ops::scale(&d, 0.0).unwrap()).unwrap()).unwrap();
    let g = spectune::backward(&loss).unwrap();
    opt.step(&g, 0.1).unwrap();
    assert_eq!(a.to_vec_f64(), vec![1.0 - 0.05, 2.0 - 0.1]);
    assert_eq!(d.to_vec_f64(), vec![1.0, 1.0], "excluded parameter must not decay");
    let frozen = spectune::Tensor::from_vec(vec![1.0f64], [1]).unwrap();
    assert!(opt.set_weight_decay(&frozen, false).is_err());
}
