//! Engine invariants: the tape, gradient accumulation, no_grad, frozen weights (mapped, never
//! given a gradient, bit-identical after training), identity at init, and clear errors on bad
//! input.

use std::io::Write;
use std::sync::Arc;

use half::bf16;
use spectune::gradcheck::SplitMix;
use spectune::ops::{self, AttnOptions, CeOptions, Rope, SpecRows};
use spectune::storage::HostData;
use spectune::{backward, no_grad, AdamW, AdamWConfig, DType, Error, Tensor};

fn t32(v: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims.to_vec()).unwrap()
}

#[test]
fn gradients_accumulate_when_a_tensor_is_used_twice() {
    // L = Σ (x ⊙ x) + Σ 3x  →  dL/dx = 2x + 3
    let x = t32(&[1.0, -2.0, 0.5], &[3]).param().unwrap();
    let l = ops::add(&ops::sum(&ops::mul(&x, &x).unwrap()).unwrap(), &ops::sum(&ops::scale(&x, 3.0).unwrap()).unwrap()).unwrap();
    let g = backward(&l).unwrap();
    assert_eq!(g.get(&x).unwrap().to_vec_f32(), vec![5.0, -1.0, 4.0]);
}

#[test]
fn no_graph_without_trainable_inputs_or_under_no_grad() {
    let w = t32(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let x = t32(&[1.0, 1.0], &[1, 2]);
    let y = ops::linear(&x, &w).unwrap();
    assert!(!y.requires_grad() && y.op_name().is_none(), "frozen-only computation recorded a graph");
    assert!(matches!(backward(&ops::sum(&y).unwrap()), Err(Error::Autograd(_))));
    let p = x.param().unwrap();
    let y = no_grad(|| ops::linear(&p, &w)).unwrap();
    assert!(!y.requires_grad(), "no_grad recorded a graph");
    let y = ops::linear(&p, &w).unwrap();
    assert!(y.requires_grad());
}

#[test]
fn a_graph_is_played_once_and_backward_needs_a_scalar() {
    let x = t32(&[1.0, 2.0], &[2]).param().unwrap();
    let y = ops::scale(&x, 2.0).unwrap();
    assert!(matches!(backward(&y), Err(Error::Autograd(_))), "non-scalar loss must be rejected");
    let l = ops::sum(&y).unwrap();
    backward(&l).unwrap();
    let again = backward(&l);
    assert!(matches!(again, Err(Error::Autograd(ref m)) if m.contains("already used")), "{again:?}");
}

#[test]
fn frozen_weight_has_no_gradient_and_is_bit_identical_after_optimizer_steps() {
    let mut rng = SplitMix::new(3);
    let (m, n, r) = (6, 5, 2);
    let wv: Vec<f32> = rng.vec(m * n, -1.0, 1.0).into_iter().map(|v| v as f32).collect();
    let w = t32(&wv, &[m, n]);
    let x = t32(&rng.vec(4 * n, -1.0, 1.0).into_iter().map(|v| v as f32).collect::<Vec<_>>(), &[4, n]);
    let a = t32(&rng.vec(r * n, -0.5, 0.5).into_iter().map(|v| v as f32).collect::<Vec<_>>(), &[r, n]).param().unwrap();
    let b = Tensor::zeros::<f32>([m, r]).param().unwrap();
    let d = Tensor::full(1.0f32, [3]).param().unwrap();
    let mut opt = AdamW::new(&[a.clone(), b.clone(), d.clone()], AdamWConfig { lr: 0.05, weight_decay: 0.01, ..Default::default() }).unwrap();
    assert_eq!(opt.state_numel(), 2 * (a.numel() + b.numel() + d.numel()));
    for _ in 0..5 {
        let y = ops::speclora_linear(&x, &w, &d, &SpecRows::Top(3), &a, &b, 2.0).unwrap();
        let g = backward(&ops::mean(&ops::mul(&y, &y).unwrap()).unwrap()).unwrap();
        assert!(g.get(&w).is_none(), "frozen weight received a gradient");
        assert_eq!(g.len(), 3);
        opt.step(&g, 0.05).unwrap();
    }
    let after: Vec<u32> = w.to_vec_f32().iter().map(|v| v.to_bits()).collect();
    let before: Vec<u32> = wv.iter().map(|v| v.to_bits()).collect();
    assert_eq!(before, after);
    assert!(b.to_vec_f32().iter().any(|&v| v != 0.0), "the adapter did train");
    assert!(AdamW::new(std::slice::from_ref(&w), AdamWConfig::default()).is_err(), "optimizer state for a frozen weight");
}

#[test]
fn adapter_ops_refuse_a_trainable_base_weight() {
    let w = t32(&[1.0; 4], &[2, 2]).param().unwrap();
    let x = t32(&[1.0; 2], &[1, 2]);
    let a = t32(&[0.1; 2], &[1, 2]).param().unwrap();
    let b = Tensor::zeros::<f32>([2, 1]).param().unwrap();
    let e = ops::lora_linear(&x, &w, &a, &b, 1.0).unwrap_err();
    assert!(e.to_string().contains("lora_linear") && e.to_string().contains("frozen"), "{e}");
}

#[test]
fn identity_at_init_is_bit_exact_for_lora_and_speclora() {
    let mut rng = SplitMix::new(9);
    let (m, n, r) = (7, 5, 3);
    let w = t32(&rng.vec(m * n, -1.0, 1.0).into_iter().map(|v| v as f32).collect::<Vec<_>>(), &[m, n]);
    let x = t32(&rng.vec(3 * n, -1.0, 1.0).into_iter().map(|v| v as f32).collect::<Vec<_>>(), &[3, n]);
    let a = t32(&rng.vec(r * n, -0.4, 0.4).into_iter().map(|v| v as f32).collect::<Vec<_>>(), &[r, n]).param().unwrap();
    let b = Tensor::zeros::<f32>([m, r]).param().unwrap();
    let d = Tensor::full(1.0f32, [4]).param().unwrap();
    let base: Vec<u32> = ops::linear(&x, &w).unwrap().to_vec_f32().iter().map(|v| v.to_bits()).collect();
    let lora: Vec<u32> = ops::lora_linear(&x, &w, &a, &b, 2.0).unwrap().to_vec_f32().iter().map(|v| v.to_bits()).collect();
    let spec: Vec<u32> = ops::speclora_linear(&x, &w, &d, &SpecRows::Top(4), &a, &b, 2.0).unwrap().to_vec_f32().iter().map(|v| v.to_bits()).collect();
    assert_eq!(base, lora);
    assert_eq!(base, spec);
}

#[test]
fn speclora_positional_case_2() {
    // W = [[1,2],[3,4]], k = 1, d = (3): Γ ⊙ W = [[3,6],[3,4]]; with x = I the output rows are
    // the columns of (Γ⊙W)ᵀ.
    let w = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], [2, 2]).unwrap();
    let x = Tensor::from_vec(vec![1.0f64, 0.0, 0.0, 1.0], [2, 2]).unwrap();
    let d = Tensor::from_vec(vec![3.0f64], [1]).unwrap().param().unwrap();
    let a = Tensor::from_vec(vec![0.3f64, -0.2], [1, 2]).unwrap().param().unwrap();
    let b = Tensor::zeros::<f64>([2, 1]).param().unwrap();
    let y = ops::speclora_linear(&x, &w, &d, &SpecRows::Top(1), &a, &b, 1.0).unwrap();
    // y = x·(Γ⊙W)ᵀ = (Γ⊙W)ᵀ for x = I
    assert_eq!(y.to_vec_f64(), vec![3.0, 3.0, 6.0, 4.0]);
    // Row-norm selection: row 1 ([3,4]) has the larger norm.
    let rows = spectune::peft::top_rows_by_norm(&w, 1).unwrap();
    assert_eq!(rows, SpecRows::Indices(vec![1]));
}

#[test]
fn mapped_f32_weights_are_used_in_place_and_bf16_converted_per_use() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    // 16 bytes of header, then f32 data, then bf16 data.
    f.write_all(&[0u8; 16]).unwrap();
    for v in &w {
        f.write_all(&v.to_le_bytes()).unwrap();
    }
    for v in &w {
        f.write_all(&bf16::from_f32(*v).to_bits().to_le_bytes()).unwrap();
    }
    f.flush().unwrap();
    let map = Arc::new(unsafe { memmap2::Mmap::map(f.as_file()).unwrap() });
    let wm = Tensor::from_mmap(map.clone(), 16, DType::F32, [4, 3], "w.f32").unwrap();
    let wb = Tensor::from_mmap(map.clone(), 16 + 48, DType::BF16, [4, 3], "w.bf16").unwrap();
    // Zero copy: the tensor's data pointer is inside the map.
    {
        let s = wm.read();
        assert!(s.is_mapped());
        assert_eq!(s.data_ptr(), unsafe { map.as_ptr().add(16) });
        assert_eq!(s.slice::<f32>().map(|x| x.as_ptr() as *const u8), Some(unsafe { map.as_ptr().add(16) }));
    }
    let x = t32(&[1.0, 2.0, -1.0], &[1, 3]).param().unwrap();
    let y_map = ops::linear(&x, &wm).unwrap().to_vec_f32();
    let y_ref = ops::linear(&x, &t32(&w, &[4, 3])).unwrap().to_vec_f32();
    assert_eq!(y_map, y_ref);
    let y_b = ops::linear(&x, &wb).unwrap().to_vec_f32();
    assert_eq!(y_b, y_ref, "these values are exact in bf16");
    // Out of range is an error naming the tensor, not a panic.
    let e = Tensor::from_mmap(map, 100, DType::F32, [4, 3], "w.bad").unwrap_err();
    assert!(e.to_string().contains("w.bad"), "{e}");
}

#[test]
fn bad_inputs_return_errors_naming_the_op() {
    let x = t32(&[1.0; 6], &[2, 3]);
    let w = t32(&[1.0; 8], &[2, 4]);
    let check = |r: spectune::Result<Tensor>, op: &str| {
        let e = r.expect_err("bad input must fail");
        assert!(e.to_string().contains(op), "error '{e}' does not name {op}");
    };
    check(ops::matmul(&x, &w, false, false), "matmul");
    check(ops::linear(&x, &w), "linear");
    check(ops::add(&x, &w), "add");
    check(ops::mul(&x, &t32(&[1.0; 2], &[2])), "mul");
    check(ops::swiglu(&x, &w), "swiglu");
    check(ops::geglu(&x, &w), "geglu");
    check(ops::gelu_tanh(&Tensor::from_host(spectune::storage::HostData::BF16(vec![half::bf16::ONE; 2]), vec![2]).unwrap()), "gelu_tanh");
    check(ops::rms_norm(&x, &t32(&[1.0; 2], &[2]), 1e-5), "rms_norm");
    check(ops::rope(&t32(&[1.0; 6], &[1, 1, 2, 3]), &Rope::new(4, 1e4).unwrap(), &[0]), "rope");
    assert!(Rope::new(3, 1e4).is_err());
    let q = t32(&[1.0; 8], &[1, 2, 2, 2]);
    let k3 = t32(&[1.0; 12], &[1, 2, 3, 2]);
    check(ops::attention(&q, &k3, &k3, &AttnOptions::default()), "attention");
    let k = t32(&[1.0; 4], &[1, 1, 2, 2]);
    check(ops::attention(&q, &k, &k, &AttnOptions { causal: true, ..Default::default() }), "attention");
    check(ops::attention(&q, &q, &q, &AttnOptions { key_mask: Some(vec![true]), ..Default::default() }), "attention");
    for cap in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        check(ops::attention(&q, &q, &q, &AttnOptions { softcap: Some(cap), ..Default::default() }), "softcap");
    }
    // Sliding window: 0, or without the causal mask it bounds.
    check(ops::attention(&q, &q, &q, &AttnOptions { causal: true, window: Some(0), ..Default::default() }), "attention");
    check(ops::attention(&q, &q, &q, &AttnOptions { window: Some(2), ..Default::default() }), "attention");
    for cap in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        check(ops::softcap(&x, cap), "softcap");
        let opts = CeOptions { softcap: Some(cap), ..Default::default() };
        check(ops::cross_entropy(&x, &[0, 1], &opts), "cross_entropy");
        check(ops::linear_cross_entropy(&x, &t32(&[1.0; 9], &[3, 3]), &[0, 1], &opts), "linear_cross_entropy");
    }
    for sizes in [&[2, 2][..], &[3, 0], &[]] {
        check(ops::split_last(&x, sizes).map(|p| p[0].clone()), "split_last");
    }
    for (table, what) in [
        (Rope::with_table(4, vec![], 1.0), "no frequencies"),
        (Rope::with_table(4, vec![1.0; 3], 1.0), "rotary dim 6 > head_dim 4"),
        (Rope::with_table(4, vec![f64::NAN], 1.0), "NaN frequency"),
        (Rope::with_table(4, vec![1.0], 0.0), "scale 0"),
    ] {
        assert!(table.as_ref().is_err_and(|e| e.to_string().contains("rope")), "Rope::with_table, {what}: {table:?}");
    }
    check(ops::embedding(&w, &[0, 2], DType::F32), "embedding");
    check(ops::cross_entropy(&x, &[0, 3], &CeOptions::default()), "cross_entropy");
    check(ops::cross_entropy(&x, &[0], &CeOptions::default()), "cross_entropy");
    check(ops::linear_cross_entropy(&x, &w, &[0, 1], &CeOptions::default()), "linear_cross_entropy");
    let a = t32(&[0.1; 3], &[1, 3]).param().unwrap();
    let b = Tensor::zeros::<f32>([4, 1]).param().unwrap();
    let w43 = t32(&[1.0; 12], &[4, 3]);
    check(ops::lora_linear(&x, &w43, &a, &t32(&[0.0; 3], &[3, 1]), 1.0), "lora_linear");
    let d = Tensor::full(1.0f32, [5]).param().unwrap();
    check(ops::speclora_linear(&x, &w43, &d, &SpecRows::Top(5), &a, &b, 1.0), "speclora_linear");
    check(ops::speclora_linear(&x, &w43, &d, &SpecRows::Indices(vec![0, 0]), &a, &b, 1.0), "speclora_linear");
    check(ops::speclora_linear(&x, &w43, &Tensor::full(1.0f32, [1]).param().unwrap(), &SpecRows::Indices(vec![9]), &a, &b, 1.0), "speclora_linear");
    // The fused down projection checks gate against up in both variants, also when the
    // graph-only one does not form swiglu(gate, up) (plain LoRA, A trained, no dropout).
    let gate = t32(&[1.0; 6], &[2, 3]);
    for (up, what) in [(t32(&[1.0; 4], &[2, 2]), "shape"), (Tensor::from_vec(vec![1.0f64; 6], [2, 3]).unwrap(), "dtype")] {
        for graph_only in [false, true] {
            let f = if graph_only { ops::swiglu_adapter_linear_graph_only } else { ops::swiglu_adapter_linear };
            let r = f(&gate, &up, &w43, ops::Spectral::None, &a, &b, 1.0, None);
            assert!(
                r.as_ref().is_err_and(|e| e.to_string().contains("swiglu")),
                "up of another {what}, graph_only {graph_only}: {:?}",
                r.map(|t| t.dims().to_vec())
            );
        }
    }
    // Mixed compute dtypes for trainable inputs are rejected.
    let x64 = Tensor::from_vec(vec![1.0f64; 3], [1, 3]).unwrap();
    check(ops::lora_linear(&x64, &w43, &a, &b, 1.0), "lora_linear");
    // bf16 activations are not a compute type.
    let xb = Tensor::from_host(HostData::BF16(vec![bf16::ONE; 3]), [1, 3]).unwrap();
    check(ops::silu(&xb), "silu");
    assert!(Tensor::from_vec(vec![1.0f32; 5], [2, 3]).is_err());
    assert!(xb.param().is_err(), "bf16 tensors cannot be trained");
}

#[test]
fn zero_sized_and_mismatched_shapes_never_panic() {
    // Every op over small shape combinations, zeros included: each call returns Ok or Err.
    let sizes = [0usize, 1, 2, 3];
    let mk = |dims: &[usize]| Tensor::from_vec(vec![0.5f32; dims.iter().product()], dims.to_vec()).unwrap();
    let table = Rope::new(2, 1e4).unwrap();
    for &a in &sizes {
        for &b in &sizes {
            for &c in &sizes {
                let x = mk(&[a, b]);
                let y = mk(&[b, c]);
                let v = mk(&[c]);
                let q = mk(&[1, a, b, 2]);
                let k = mk(&[1, c, 1, 2]);
                let _ = ops::matmul(&x, &y, false, false);
                let _ = ops::matmul(&x, &y, true, true);
                let _ = ops::linear(&x, &y);
                let _ = ops::add(&x, &v);
                let _ = ops::mul(&x, &v);
                let _ = ops::swiglu(&x, &y);
                let _ = ops::silu(&x);
                let _ = ops::sum(&x);
                let _ = ops::rms_norm(&x, &v, 1e-5);
                let _ = ops::rope(&q, &table, &vec![0; a]);
                let _ = ops::attention(&q, &k, &k, &AttnOptions { causal: true, ..Default::default() });
                let _ = ops::embedding(&x, &[0, 1, 2], DType::F32);
                let _ = ops::cross_entropy(&x, &vec![0; a], &CeOptions::default());
                let _ = ops::linear_cross_entropy(&x, &y, &vec![1; a], &CeOptions::default());
                let _ = ops::lora_linear(&x, &y, &mk(&[1, b]), &mk(&[c, 1]), 1.0);
                let _ = ops::speclora_linear(&x, &y, &mk(&[1]), &SpecRows::Top(1), &mk(&[1, b]), &mk(&[c, 1]), 1.0);
                let _ = ops::reshape(&x, [b, a]);
            }
        }
    }
}

/// Writes `bytes` to a temp file and maps it.
fn map_bytes(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<memmap2::Mmap>) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    let map = Arc::new(unsafe { memmap2::Mmap::map(f.as_file()).unwrap() });
    (f, map)
}

#[test]
fn ggml_block_quantized_weights_dequantize_per_use() {
    // Two rows of 64 values = 4 blocks of 32, per dtype. Expected values from the GGML formulas.
    let h = |x: f32| half::f16::from_f32(x).to_bits().to_le_bytes();
    let mut q8 = Vec::new();
    let mut q40 = Vec::new();
    let mut q41 = Vec::new();
    let (mut e8, mut e40, mut e41) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..4 {
        let d = 0.5 + b as f32 * 0.25;
        let m = -1.0 + b as f32 * 0.5;
        q8.extend(h(d));
        let qs: Vec<i8> = (0..32).map(|i| (i as i8 - 16) * (b as i8 + 1)).collect();
        q8.extend(qs.iter().map(|&q| q as u8));
        e8.extend(qs.iter().map(|&q| d * q as f32));
        q40.extend(h(d));
        q41.extend(h(d));
        q41.extend(h(m));
        let nib: Vec<u8> = (0..32).map(|i| ((i * 7 + b) % 16) as u8).collect();
        let packed: Vec<u8> = (0..16).map(|j| nib[j] | (nib[j + 16] << 4)).collect();
        q40.extend(&packed);
        q41.extend(&packed);
        e40.extend(nib.iter().map(|&q| d * (q as i32 - 8) as f32));
        e41.extend(nib.iter().map(|&q| d * q as f32 + m));
    }
    for (dtype, bytes, want) in [(DType::Q8_0, q8, e8), (DType::Q4_0, q40, e40), (DType::Q4_1, q41, e41)] {
        let (_f, map) = map_bytes(&bytes);
        let t = Tensor::from_mmap(map.clone(), 0, dtype, [2, 64], "q").unwrap();
        assert_eq!(t.to_vec_f32(), want, "{dtype}");
        // A read that starts and ends inside blocks.
        let mut part = vec![0.0f32; 40];
        t.read().read_into(5, &mut part);
        assert_eq!(part, want[5..45].to_vec(), "{dtype} partial read");
        // The same values through a GEMM (converted per tile): x = e_0 picks row 0 of W.
        let x = Tensor::from_vec(vec![1.0f32, 0.0], [1, 2]).unwrap();
        let y = ops::matmul(&x, &t, false, false).unwrap().to_vec_f32();
        assert_eq!(y, want[..64].to_vec());
        // Row permutation without a copy: logical row 0 = physical row 1.
        let p = t.permute_rows(&[1, 0]).unwrap();
        assert!(p.read().is_mapped());
        let pv = p.to_vec_f32();
        assert_eq!(&pv[..64], &want[64..]);
        assert_eq!(&pv[64..], &want[..64]);
        // Size that is not a whole number of blocks, and a range beyond the file.
        assert!(Tensor::from_mmap(map.clone(), 0, dtype, [2, 60], "q").is_err());
        assert!(Tensor::from_mmap(map, 1, dtype, [2, 64], "q.trunc").is_err());
        assert!(p.param().is_err(), "quantized weights cannot be trained");
    }
}

#[test]
fn permute_rows_validates_and_reorders_host_tensors() {
    let t = t32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
    assert_eq!(t.permute_rows(&[2, 0, 1]).unwrap().to_vec_f32(), vec![5.0, 6.0, 1.0, 2.0, 3.0, 4.0]);
    assert!(t.permute_rows(&[0, 0, 1]).is_err());
    assert!(t.permute_rows(&[0, 1]).is_err());
    assert!(t.permute_rows(&[0, 1, 3]).is_err());
}

#[test]
fn lora_dropout_masks_the_branch_input_reproducibly() {
    // With B = I-like and A = I, the LoRA branch returns s·dropout(x): entries are 0 or x/(1-p).
    let n = 64;
    let x = t32(&vec![1.0; n], &[1, n]);
    let w = Tensor::zeros::<f32>([n, n]);
    let eye: Vec<f32> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
    let a = t32(&eye, &[n, n]).param().unwrap();
    let b = t32(&eye, &[n, n]).param().unwrap();
    let dr = Some(ops::Dropout { p: 0.25, seed: 7 });
    let y1 = ops::adapter_linear(&x, &w, ops::Spectral::None, &a, &b, 1.0, dr).unwrap().to_vec_f32();
    let y2 = ops::adapter_linear(&x, &w, ops::Spectral::None, &a, &b, 1.0, dr).unwrap().to_vec_f32();
    assert_eq!(y1, y2, "same seed, same mask");
    assert!(y1.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    let dropped = y1.iter().filter(|&&v| v == 0.0).count();
    assert!((4..=32).contains(&dropped), "{dropped} of {n} dropped at p = 0.25");
    let y3 = ops::adapter_linear(&x, &w, ops::Spectral::None, &a, &b, 1.0, Some(ops::Dropout { p: 0.25, seed: 8 })).unwrap().to_vec_f32();
    assert_ne!(y1, y3, "another seed, another mask");
    assert!(ops::adapter_linear(&x, &w, ops::Spectral::None, &a, &b, 1.0, Some(ops::Dropout { p: 1.0, seed: 0 })).is_err());
}

/// The f32 fast paths (vectorized exp, vocabulary-blocked head loss) keep NaN and ∞ visible: a
/// poisoned hidden state gives a NaN loss and NaN gradients, never a finite number a trainer
/// would step on.
#[test]
fn non_finite_values_propagate_through_the_f32_loss() {
    let (rows, d, vocab) = (5, 8, 300);
    let mut rng = SplitMix::new(3);
    let w = t32(&rng.vec(vocab * d, -1.0, 1.0).iter().map(|v| *v as f32).collect::<Vec<_>>(), &[vocab, d]);
    let targets: Vec<i64> = (0..rows as i64).map(|i| i * 7).collect();
    let opts = CeOptions { chunk_cols: Some(64), ..CeOptions::default() };
    for bad in [f32::NAN, f32::INFINITY] {
        let mut hv: Vec<f32> = rng.vec(rows * d, -1.0, 1.0).iter().map(|v| *v as f32).collect();
        hv[2 * d + 3] = bad;
        let h = t32(&hv, &[rows, d]).param().unwrap();
        let loss = ops::linear_cross_entropy(&h, &w, &targets, &opts).unwrap();
        assert!(!loss.item().unwrap().is_finite(), "{bad}: the loss must not be finite");
        let g = backward(&loss).unwrap().get(&h).unwrap().to_vec_f32();
        assert!(g[2 * d..3 * d].iter().any(|v| !v.is_finite()), "{bad}: the poisoned row's gradient must not be finite");
        // Plain cross-entropy on logits, too.
        let mut lv: Vec<f32> = rng.vec(rows * vocab, -3.0, 3.0).iter().map(|v| *v as f32).collect();
        lv[vocab + 11] = bad;
        let l = ops::cross_entropy(&t32(&lv, &[rows, vocab]).param().unwrap(), &targets, &CeOptions::default()).unwrap();
        assert!(!l.item().unwrap().is_finite(), "{bad}: cross_entropy must not be finite");
    }
}
