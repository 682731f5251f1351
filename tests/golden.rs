//! Golden test against the reference implementation (HF transformers + PEFT, PyTorch f32).
//!
//! `tests/data/golden/make_golden.py` wrote, for a tiny random LlamaForCausalLM in two variants
//! (tied and untied embeddings), the HF checkpoint (`config.json`, `model.safetensors`) and the
//! reference numbers (`expected.safetensors`): logits and mean cross-entropy on a padded 2 × 7
//! batch, then, with PEFT LoRA (r = 4, α = 8) on all seven linears and random B, the loss
//! and every lora_A / lora_B gradient. See tests/data/golden/README.md.
//!
//! The model is loaded through the real loader (`model::load_safetensors`: config.json
//! parsing, memory-mapped weights), computed in f32 and again in f64, and compared on two
//! batches (the second row right-padded, and the same row left-padded) with:
//!
//! - logits, at non-padded positions only: |a − b| ≤ 1e-4 · max(1, |b|) per element;
//! - losses (base and LoRA): |a − b| ≤ 1e-5 · |b|;
//! - each LoRA gradient tensor: max |a − b| ≤ 1e-4 · max |b| over that tensor.
//!
//! The reference itself is f32 (its own rounding, measured against an f64 run of the same HF
//! code, is ~4e-7 of the largest logit), so the f64 run uses the same tolerances.

use std::collections::BTreeMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use spectune::model::load_safetensors;
use spectune::model::Decoder;
use spectune::ops::CeOptions;
use spectune::peft::lora::Lora;
use spectune::peft::{LoraConfig, Method};
use spectune::{backward, DType, Tensor};

const LOGIT_TOL: f64 = 1e-4;
const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

fn golden_dir(variant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden").join(variant)
}

/// A fixture tensor: shape and values widened to f64 (F32 and I64 are exact in f64 here).
struct Fixture {
    shape: Vec<usize>,
    values: Vec<f64>,
}

/// Every tensor of `expected.safetensors`, read with the `safetensors` crate (independently of
/// the crate's own loader).
fn read_expected(variant: &str) -> BTreeMap<String, Fixture> {
    let path = golden_dir(variant).join("expected.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            d => panic!("{}: tensor {name} has unexpected dtype {d:?}", path.display()),
        };
        assert_eq!(values.len(), view.shape().iter().product::<usize>(), "{name}");
        out.insert(name, Fixture { shape: view.shape().to_vec(), values });
    }
    out
}

fn get<'a>(fx: &'a BTreeMap<String, Fixture>, name: &str) -> &'a Fixture {
    fx.get(name).unwrap_or_else(|| panic!("expected.safetensors has no tensor {name}"))
}

/// PEFT's name of a LoRA tensor (`which` = "lora_A" / "lora_B"), as in adapter_model.safetensors.
fn peft_name(layer: usize, module: &str, which: &str) -> String {
    let block = match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn",
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        m => panic!("layer {layer}: unexpected module {m}"),
    };
    format!("base_model.model.model.layers.{layer}.{block}.{module}.{which}.weight")
}

fn set_values(t: &Tensor, v: &[f64]) {
    match t.dtype() {
        DType::F32 => t.set_values(&v.iter().map(|&x| x as f32).collect::<Vec<f32>>()),
        DType::F64 => t.set_values(v),
        d => panic!("adapter tensor of dtype {d}"),
    }
    .unwrap()
}

/// The two fixed batches: the names without a prefix hold the right-padded one; with right
/// padding and causal attention no real query sees a padded key, so the left-padded batch is the
/// one that exercises the key mask (and fully masked query rows).
const BATCHES: [(&str, &str); 2] = [("", "right-padded"), ("left_padded.", "left-padded")];

struct Batch {
    prefix: &'static str,
    label: &'static str,
    ids: Vec<u32>,
    mask: Vec<bool>,
    targets: Vec<i64>,
}

fn batches(fx: &BTreeMap<String, Fixture>, b: usize, t: usize) -> Vec<Batch> {
    BATCHES
        .iter()
        .map(|&(prefix, label)| {
            let ids_fx = get(fx, &format!("{prefix}input_ids"));
            assert_eq!(ids_fx.shape, [b, t], "{label}: input_ids shape");
            let ids: Vec<u32> = ids_fx.values.iter().map(|&x| x as u32).collect();
            let mask: Vec<bool> = get(fx, &format!("{prefix}attention_mask")).values.iter().map(|&x| x != 0.0).collect();
            let targets: Vec<i64> = get(fx, &format!("{prefix}targets")).values.iter().map(|&x| x as i64).collect();
            assert_eq!(mask.iter().filter(|&&m| !m).count(), 2, "{label}: the fixture pads the second row by 2");
            assert_eq!(targets.iter().filter(|&&x| x != -100).count(), 10, "{label}: counted targets");
            Batch { prefix, label, ids, mask, targets }
        })
        .collect()
}

/// Largest errors seen for one (variant, dtype, batch).
#[derive(Debug, Default)]
struct Errors {
    /// max over compared logits of |a − b| / max(1, |b|)
    logits: f64,
    /// |a − b| / |b|
    loss: f64,
    lora_loss: f64,
    /// max over tensors of max |a − b| / max |b|
    grad: f64,
    grad_worst: String,
}

fn run(variant: &str, tie: bool, dtype: DType) -> Vec<(String, Errors)> {
    let fx = read_expected(variant);
    let (mut model, ckpt): (Decoder, _) = load_safetensors(&golden_dir(variant), dtype).unwrap_or_else(|e| panic!("load_safetensors({variant}, {dtype}): {e}"));
    assert_eq!(model.cfg.tie_word_embeddings, tie, "{variant}: config.json tie_word_embeddings");
    assert_eq!(model.lm_head.is_none(), tie, "{variant}: lm_head presence");
    assert!(ckpt.contains("model.embed_tokens.weight"));
    let (v, b, t) = (model.cfg.vocab_size, 2usize, 7usize);
    assert_eq!((v, model.cfg.num_hidden_layers, model.cfg.head_dim), (97, 2, 8), "{variant}: config");
    let batches = batches(&fx, b, t);
    let mut errs: Vec<(String, Errors)> = batches.iter().map(|bt| (format!("{variant} {dtype} {}", bt.label), Errors::default())).collect();
    let opts = CeOptions::default();

    // Base model: logits at non-padded positions, and the loss.
    for (bt, (name, err)) in batches.iter().zip(&mut errs) {
        let logits = model.logits(&bt.ids, b, t, Some(&bt.mask)).unwrap().to_vec_f64();
        let want = get(&fx, &format!("{}logits", bt.prefix));
        assert_eq!(want.shape, [b, t, v]);
        assert_eq!(logits.len(), want.values.len());
        let mut compared = 0;
        for (row, _) in bt.mask.iter().enumerate().filter(|(_, &m)| m) {
            for j in 0..v {
                let (a, e) = (logits[row * v + j], want.values[row * v + j]);
                assert!(a.is_finite(), "{name}: logit [{row}, {j}] = {a}");
                err.logits = err.logits.max((a - e).abs() / e.abs().max(1.0));
                compared += 1;
            }
        }
        assert_eq!(compared, 12 * v);
        let loss = model.loss(&bt.ids, &bt.targets, b, t, Some(&bt.mask), &opts).unwrap().item().unwrap();
        let want_loss = get(&fx, &format!("{}loss", bt.prefix)).values[0];
        err.loss = (loss - want_loss).abs() / want_loss.abs();
    }

    // LoRA with the reference's adapter values.
    // PEFT's lora_dropout = 0: the branch is deterministic, as in the reference.
    let lora = LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() };
    assert!(!lora.rslora && lora.dropout == 0.0, "the reference uses plain LoRA scaling and no dropout: {lora:?}");
    model.attach_adapters(|_| Ok(true), &lora, &Method::lora(), 7).unwrap();
    let mut pairs = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for lin in layer.linears() {
            let tg = lin.module();
            let Some(Lora { a, b: bm, scale, .. }) = lin.adapter.as_deref().and_then(|ad| ad.downcast_ref()) else {
                panic!("layer {l} {tg}: no LoRA adapter attached");
            };
            assert_eq!(*scale, 2.0, "LoRA scale α/r");
            for (tensor, which) in [(a, "lora_A"), (bm, "lora_B")] {
                let name = peft_name(l, tg, which);
                let f = get(&fx, &name);
                assert_eq!(tensor.dims(), &f.shape[..], "{name}: shape");
                set_values(tensor, &f.values);
                pairs.push((name, tensor.clone()));
            }
        }
    }
    // The fixture holds exactly these LoRA tensors (and a gradient for each, per batch).
    let lora_keys = fx.keys().filter(|k| k.starts_with("base_model.") && !k.ends_with(".grad")).count();
    assert_eq!(lora_keys, pairs.len(), "{variant}: LoRA tensors in the fixture");
    assert_eq!(fx.keys().filter(|k| k.ends_with(".grad")).count(), pairs.len() * BATCHES.len(), "{variant}: LoRA gradients in the fixture");

    for (bt, (label, err)) in batches.iter().zip(&mut errs) {
        let loss = model.loss(&bt.ids, &bt.targets, b, t, Some(&bt.mask), &opts).unwrap();
        let want_lora_loss = get(&fx, &format!("{}lora_loss", bt.prefix)).values[0];
        err.lora_loss = (loss.item().unwrap() - want_lora_loss).abs() / want_lora_loss.abs();
        let grads = backward(&loss).unwrap();
        assert_eq!(grads.len(), pairs.len(), "{label}: a gradient for every adapter tensor and nothing else");
        for (name, tensor) in &pairs {
            let g = grads.get(tensor).unwrap_or_else(|| panic!("{label}: no gradient for {name}")).to_vec_f64();
            let want = get(&fx, &format!("{}{name}.grad", bt.prefix));
            assert_eq!(g.len(), want.values.len(), "{name}.grad");
            let scale = want.values.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: the reference gradient is all zeros");
            let diff = g.iter().zip(&want.values).fold(0.0f64, |m, (a, e)| {
                assert!(a.is_finite(), "{label}: {name} gradient {a}");
                m.max((a - e).abs())
            });
            if diff / scale > err.grad {
                err.grad = diff / scale;
                err.grad_worst = name.clone();
            }
        }
    }
    for (label, err) in &errs {
        eprintln!("golden {label}: {err:?}");
    }
    errs
}

fn check(variant: &str, tie: bool) {
    for dtype in [DType::F32, DType::F64] {
        for (label, e) in run(variant, tie, dtype) {
            assert!(e.logits <= LOGIT_TOL, "{label}: logits differ from HF by {:.3e} (scaled), tolerance {LOGIT_TOL:e}", e.logits);
            assert!(e.loss <= LOSS_TOL, "{label}: loss differs from HF by {:.3e} (relative), tolerance {LOSS_TOL:e}", e.loss);
            assert!(e.lora_loss <= LOSS_TOL, "{label}: LoRA loss differs from HF+PEFT by {:.3e} (relative), tolerance {LOSS_TOL:e}", e.lora_loss);
            assert!(
                e.grad <= GRAD_TOL,
                "{label}: LoRA gradient {} differs from PEFT by {:.3e} of its largest entry, tolerance {GRAD_TOL:e}",
                e.grad_worst,
                e.grad
            );
        }
    }
}

#[test]
fn golden_tied_embeddings_match_hf_and_peft() {
    check("tied", true);
}

#[test]
fn golden_untied_embeddings_match_hf_and_peft() {
    check("untied", false);
}
