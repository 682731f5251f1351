//! End-to-end checks on a 2-layer Llama-style model built from random weights: adapters are the
//! identity at init, the loss falls under AdamW, whole-model adapter gradients match finite
//! differences in f64, and activation checkpointing changes nothing but memory.
mod common;

use spectune::gradcheck::{gradcheck, GradcheckOptions, SplitMix};
use spectune::model::{Decoder, DecoderConfig};
use spectune::ops::CeOptions;
use spectune::peft::lora::Lora;
use spectune::peft::speclora::SpecLora;
use spectune::peft::speclora_svd::SpecLoraSvd;
use spectune::peft::{LoraConfig, Method};
use spectune::{backward, AdamW, AdamWConfig, DType};

fn tiny(tie: bool) -> DecoderConfig {
    common::tiny_config(37, tie)
}

fn batch(seed: u64, b: usize, t: usize, vocab: usize) -> (Vec<u32>, Vec<i64>) {
    let mut rng = SplitMix::new(seed);
    let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
    // Next-token targets within each row; the last position of a row is ignored.
    let targets = (0..b * t).map(|i| if i % t == t - 1 { -100 } else { ids[i + 1] as i64 }).collect();
    (ids, targets)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn adapters_are_identity_at_init_bit_exact() {
    for tie in [true, false] {
        let base = Decoder::random(tiny(tie), DType::F32, 1).unwrap();
        let (ids, _) = batch(2, 2, 5, 37);
        let y0 = base.logits(&ids, 2, 5, None).unwrap().to_vec_f32();
        for spec in [Method::lora(), Method::speclora(3), Method::speclora_by_norm(5), Method::speclora_svd(4)] {
            let mut m = base.clone();
            m.attach_adapters(|_| Ok(true), &LoraConfig { rank: 4, alpha: 8.0, rslora: false, dropout: 0.0 }, &spec, 7).unwrap();
            let y = m.logits(&ids, 2, 5, None).unwrap().to_vec_f32();
            assert_eq!(bits(&y0), bits(&y), "tie={tie} spec={spec:?}: adapted model differs from the base at init");
        }
    }
}

fn train_losses(spec: Method, checkpointing: bool, steps: usize) -> Vec<f64> {
    train_losses_keep(spec, checkpointing, 1, steps)
}

fn train_losses_keep(spec: Method, checkpointing: bool, keep: usize, steps: usize) -> Vec<f64> {
    let mut m = Decoder::random(tiny(false), DType::F32, 3).unwrap();
    m.checkpointing = checkpointing;
    m.checkpoint_keep = keep;
    m.attach_adapters(|_| Ok(true), &LoraConfig { rank: 4, alpha: 8.0, rslora: false, dropout: 0.0 }, &spec, 11).unwrap();
    let params = m.trainable_params();
    let mut opt = AdamW::new(&params, AdamWConfig { lr: 1e-2, ..AdamWConfig::default() }).unwrap();
    let (ids, targets) = batch(5, 2, 8, 37);
    let opts = CeOptions::default();
    (0..steps)
        .map(|_| {
            let loss = m.loss(&ids, &targets, 2, 8, None, &opts).unwrap();
            let v = loss.item().unwrap();
            let g = backward(&loss).unwrap();
            opt.step(&g, 1e-2).unwrap();
            v
        })
        .collect()
}

#[test]
fn loss_falls_over_50_adamw_steps() {
    for spec in [Method::lora(), Method::speclora(5), Method::speclora_svd(5)] {
        let l = train_losses(spec, false, 50);
        assert!(l.iter().all(|v| v.is_finite()));
        assert!(l[49] < 0.5 * l[0], "spec={spec:?}: loss went from {} to {} in 50 steps", l[0], l[49]);
    }
}

#[test]
fn checkpointing_gives_identical_training() {
    let a = train_losses(Method::speclora(5), false, 6);
    let b = train_losses(Method::speclora(5), true, 6);
    assert_eq!(a, b, "activation checkpointing changed the losses");
    // Any number of un-checkpointed final layers (0 = every layer re-run, more than the model
    // has = none) trains identically too.
    let layers = tiny(false).num_hidden_layers;
    for keep in [0, 2, layers, layers + 3] {
        let c = train_losses_keep(Method::speclora(5), true, keep, 6);
        assert_eq!(a, c, "checkpoint_keep = {keep} changed the losses");
    }
}

#[test]
fn whole_model_adapter_gradients_match_finite_differences() {
    // DoRA is left out: its backward treats the row norm as a constant (by design), so it is not
    // the exact gradient of the whole model (its op is gradchecked with ν as an input).
    for (spec, tie, bias) in [
        (Method::lora(), true, false),
        (Method::speclora(3), false, true),
        (Method::speclora_svd(3), false, false),
        (Method::spectral_a(1), true, false),
        (Method::spectral_r(0), false, true),
        (Method::pissa(), true, false),
        (Method::milora(), false, false),
        (Method::full(), true, false),
    ] {
        let cfg = DecoderConfig { qkv_bias: bias, ..tiny(tie) };
        let mut m = Decoder::random(cfg, DType::F64, 21).unwrap();
        m.attach_adapters(|_| Ok(true), &LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 }, &spec, 23).unwrap();
        // Move B and d away from their init so every adapter gradient is non-trivial.
        let mut rng = SplitMix::new(99);
        for layer in &m.layers {
            for lin in layer.linears() {
                let ad = lin.adapter.as_deref().unwrap();
                let spec_db = ad.downcast_ref::<SpecLora>().map(|s| (&s.d, &s.b)).or_else(|| ad.downcast_ref::<SpecLoraSvd>().map(|s| (&s.d, &s.b)));
                if let Some(Lora { b, .. }) = ad.downcast_ref() {
                    b.set_values(&rng.vec(b.numel(), -0.3, 0.3)).unwrap();
                } else if let Some((d, b)) = spec_db {
                    b.set_values(&rng.vec(b.numel(), -0.3, 0.3)).unwrap();
                    d.set_values(&rng.vec(d.numel(), 0.7, 1.3)).unwrap();
                } else {
                    for p in ad.params() {
                        p.set_values(&p.to_vec_f64().iter().map(|x| x + rng.uniform(-0.2, 0.2)).collect::<Vec<f64>>()).unwrap();
                    }
                }
            }
        }
        let params = m.trainable_params();
        let (ids, targets) = batch(8, 2, 6, 37);
        let mask: Vec<bool> = (0..12).map(|i| i != 11).collect();
        let opts = CeOptions::default();
        let bad =
            gradcheck("tiny_llama", &params, |_| m.loss(&ids, &targets, 2, 6, Some(&mask), &opts), &GradcheckOptions { max_checks: 12, ..Default::default() })
                .unwrap();
        assert!(bad.is_empty(), "spec={spec:?}: {} mismatches, first: {}", bad.len(), bad[0]);
    }
}

#[test]
fn only_adapter_parameters_are_trainable() {
    let mut m = Decoder::random(tiny(true), DType::F32, 4).unwrap();
    m.attach_adapters(spectune::nn::modules(&["q_proj", "v_proj"]), &LoraConfig { rank: 2, alpha: 4.0, rslora: false, dropout: 0.0 }, &Method::speclora(3), 5)
        .unwrap();
    let params = m.trainable_params();
    // 2 layers × 2 targets × (d, A, B)
    assert_eq!(params.len(), 12);
    let (ids, targets) = batch(1, 1, 4, 37);
    let g = backward(&m.loss(&ids, &targets, 1, 4, None, &CeOptions::default()).unwrap()).unwrap();
    assert_eq!(g.len(), params.len(), "gradients exist exactly for the adapter parameters");
    for p in &params {
        assert!(g.contains(p));
    }
    assert!(!g.contains(&m.embed));
    for l in &m.layers {
        for lin in l.linears() {
            assert!(!g.contains(&lin.weight));
        }
    }
}

#[test]
fn kv_cache_decoding_matches_the_full_forward() {
    use spectune::model::KvCache;
    let m = Decoder::random(tiny(false), DType::F64, 31).unwrap();
    let (ids, _) = batch(3, 1, 9, 37);
    let full = m.hidden_states(&ids, 1, 9, None).unwrap().to_vec_f64();
    let mut cache = KvCache::new();
    let mut inc = m.forward_cached(&ids[..4], 1, 4, &mut cache).unwrap().to_vec_f64();
    for i in 4..9 {
        inc.extend(m.forward_cached(&ids[i..i + 1], 1, 1, &mut cache).unwrap().to_vec_f64());
    }
    assert_eq!(cache.len, 9);
    for (a, b) in full.iter().zip(&inc) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}

#[test]
fn greedy_generation_is_deterministic_and_stops() {
    use spectune::model::{generate, GenerateOptions};
    let m = Decoder::random(tiny(true), DType::F32, 32).unwrap();
    let opts = GenerateOptions { max_new_tokens: 6, ..Default::default() };
    let a = generate(&m, &[1, 2, 3], &opts, |_| Ok(())).unwrap();
    let b = generate(&m, &[1, 2, 3], &opts, |_| Ok(())).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 6);
    // Stopping on the first generated token.
    let stop = GenerateOptions { stop_ids: vec![a[0]], ..opts.clone() };
    assert_eq!(generate(&m, &[1, 2, 3], &stop, |_| Ok(())).unwrap(), vec![a[0]]);
    // Sampling with a seed is reproducible; bad options are errors.
    let s = GenerateOptions { greedy: false, temperature: 0.8, top_p: 0.9, seed: 5, ..opts.clone() };
    assert_eq!(generate(&m, &[1, 2, 3], &s, |_| Ok(())).unwrap(), generate(&m, &[1, 2, 3], &s, |_| Ok(())).unwrap());
    assert!(generate(&m, &[1], &GenerateOptions { greedy: false, temperature: 0.0, ..opts.clone() }, |_| Ok(())).is_err());
    assert!(generate(&m, &[], &opts, |_| Ok(())).is_err());
}

#[test]
fn adapter_dropout_is_reproduced_exactly_by_checkpoint_recompute() {
    let grads = |ckpt: bool, training: bool| {
        let mut m = Decoder::random(tiny(false), DType::F32, 41).unwrap();
        m.attach_adapters(|_| Ok(true), &LoraConfig { rank: 4, alpha: 8.0, rslora: false, dropout: 0.3 }, &Method::speclora(3), 42).unwrap();
        for p in m.trainable_params() {
            let n = p.numel();
            p.set_values(&SplitMix::new(n as u64).vec(n, -0.2, 0.2).into_iter().map(|v| v as f32 + 1.0).collect::<Vec<_>>()).unwrap();
        }
        m.checkpointing = ckpt;
        m.training = training;
        m.dropout_seed = 1234;
        let (ids, targets) = batch(6, 2, 5, 37);
        let loss = m.loss(&ids, &targets, 2, 5, None, &CeOptions::default()).unwrap();
        let l = loss.item().unwrap();
        let g = backward(&loss).unwrap();
        let gv: Vec<Vec<f32>> = m.trainable_params().iter().map(|p| g.get(p).unwrap().to_vec_f32()).collect();
        (l, gv)
    };
    let (l0, g0) = grads(false, true);
    let (l1, g1) = grads(true, true);
    assert_eq!(l0, l1);
    assert_eq!(g0, g1, "checkpoint recompute must see the same dropout masks");
    let (le, _) = grads(false, false);
    assert_ne!(l0, le, "dropout is active only in training mode");
}

#[test]
fn merged_weights_reproduce_the_adapted_forward() {
    // docs/ops.md §22 case 9: for every method, x·W_mergedᵀ equals the un-merged forward.
    let base = Decoder::random(tiny(false), DType::F64, 51).unwrap();
    let mut rng = SplitMix::new(52);
    for method in [Method::lora(), Method::speclora(5), Method::speclora_by_norm(7), Method::speclora_svd(4)] {
        let mut m = base.clone();
        m.attach_adapters(|_| Ok(true), &LoraConfig { rank: 3, alpha: 6.0, rslora: true, dropout: 0.0 }, &method, 53).unwrap();
        for p in m.trainable_params() {
            let n = p.numel();
            p.set_values(&rng.vec(n, 0.5, 1.5)).unwrap();
        }
        for lin in m.layers[1].linears() {
            let t = lin.module();
            let (o, i) = (lin.out_features(), lin.in_features());
            let x = spectune::Tensor::from_vec(rng.vec(3 * i, -1.0, 1.0), [3, i]).unwrap();
            let y = lin.forward(&x, None).unwrap().to_vec_f64();
            let wm = spectune::Tensor::from_vec(lin.adapter.as_ref().unwrap().merged_weight(&lin.weight).unwrap(), [o, i]).unwrap();
            let ym = spectune::ops::linear(&x, &wm).unwrap().to_vec_f64();
            let scale = ym.iter().fold(1.0f64, |a, v| a.max(v.abs()));
            for (a, b) in y.iter().zip(&ym) {
                assert!((a - b).abs() <= 1e-12 * scale, "{method:?} {t}: {a} vs {b}");
            }
        }
    }
}
