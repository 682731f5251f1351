//! Property-based gradient checks: every differentiable op, random shapes (1 and odd sizes
//! included) and values, analytic gradients vs central finite differences in f64.

use proptest::prelude::*;
use spectune::gradcheck::{gradcheck, GradcheckOptions, SplitMix};
use spectune::ops::{self, AttnOptions, CeOptions, Rope, SpecRows};
use spectune::storage::HostData;
use spectune::{checkpoint, Result, Tensor};

fn param(rng: &mut SplitMix, dims: &[usize], lo: f64, hi: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.vec(n, lo, hi), dims.to_vec()).unwrap().param().unwrap()
}

fn constant(rng: &mut SplitMix, dims: &[usize], lo: f64, hi: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.vec(n, lo, hi), dims.to_vec()).unwrap()
}

fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> std::result::Result<(), TestCaseError> {
    check_opts(name, inputs, f, &GradcheckOptions::default())
}

fn check_opts(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>, opts: &GradcheckOptions) -> std::result::Result<(), TestCaseError> {
    let bad = gradcheck(name, inputs, f, opts).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
    if let Some(first) = bad.first() {
        let shapes: Vec<String> = inputs.iter().map(|t| t.shape().to_string()).collect();
        return Err(TestCaseError::fail(format!("{first} ({} mismatches; input shapes {shapes:?})", bad.len())));
    }
    Ok(())
}

/// The fused down projection with the SwiGLU gate (`swiglu_adapter_linear`, the Llama path) or
/// the GeGLU one (`gated_adapter_linear`), values-computing or graph-only.
#[allow(clippy::too_many_arguments)]
fn fused_gate_op(
    geglu: bool,
    graph_only: bool,
    g: &Tensor,
    u: &Tensor,
    w: &Tensor,
    sp: ops::Spectral<'_>,
    a: &Tensor,
    b: &Tensor,
    dr: Option<ops::Dropout>,
) -> Result<Tensor> {
    let act = ops::GatedAct::GeluTanh;
    match (geglu, graph_only) {
        (false, false) => ops::swiglu_adapter_linear(g, u, w, sp, a, b, 1.5, dr),
        (false, true) => ops::swiglu_adapter_linear_graph_only(g, u, w, sp, a, b, 1.5, dr),
        (true, false) => ops::gated_adapter_linear(g, u, act, w, sp, a, b, 1.5, dr),
        (true, true) => ops::gated_adapter_linear_graph_only(g, u, act, w, sp, a, b, 1.5, dr),
    }
}

fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(1usize), 6 => 2usize..6, 2 => Just(7usize), 1 => Just(17usize)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn matmul_2d_and_batched(m in dim(), k in dim(), n in dim(), batch in 0usize..3, ta: bool, tb: bool, shared: bool, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let bdims: Vec<usize> = (0..batch).map(|i| i + 2).collect();
        let mut ad = bdims.clone();
        ad.extend(if ta { [k, m] } else { [m, k] });
        let mut bd = if shared || batch == 0 { vec![] } else { bdims.clone() };
        bd.extend(if tb { [n, k] } else { [k, n] });
        let a = param(&mut rng, &ad, -1.0, 1.0);
        let b = param(&mut rng, &bd, -1.0, 1.0);
        check("matmul", &[a, b], |x| ops::matmul(&x[0], &x[1], ta, tb))?;
    }

    #[test]
    fn matmul_frozen_stored_rhs(m in dim(), k in dim(), n in dim(), batch in 0usize..2, ta: bool, tb: bool, half: bool, seed: u64) {
        // A frozen right-hand side stored as f32 or bf16, converted per tile for an f64 GEMM,
        // shared by every batch.
        let mut rng = SplitMix::new(seed);
        let mut ad: Vec<usize> = (0..batch).map(|i| i + 2).collect();
        ad.extend(if ta { [k, m] } else { [m, k] });
        let a = param(&mut rng, &ad, -1.0, 1.0);
        let bdims = if tb { [n, k] } else { [k, n] };
        let vals: Vec<f32> = rng.vec(k * n, -1.0, 1.0).into_iter().map(|v| v as f32).collect();
        let b = if half {
            Tensor::from_host(HostData::BF16(vals.iter().map(|&v| half::bf16::from_f32(v)).collect()), bdims).unwrap()
        } else {
            Tensor::from_host(HostData::F32(vals), bdims).unwrap()
        };
        check("matmul(frozen rhs)", &[a, b], |x| ops::matmul(&x[0], &x[1], ta, tb))?;
    }

    #[test]
    fn linear_op(rows in dim(), i in dim(), o in dim(), seed: u64) {
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[2, rows, i], -1.0, 1.0);
        let w = param(&mut rng, &[o, i], -1.0, 1.0);
        check("linear", &[x, w], |x| ops::linear(&x[0], &x[1]))?;
    }

    #[test]
    fn add_mul_broadcast(r in dim(), c in dim(), broadcast: bool, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let a = param(&mut rng, &[r, c], -2.0, 2.0);
        let b = if broadcast { param(&mut rng, &[c], -2.0, 2.0) } else { param(&mut rng, &[r, c], -2.0, 2.0) };
        check("add", &[a.clone(), b.clone()], |x| ops::add(&x[0], &x[1]))?;
        check("mul", &[a, b], |x| ops::mul(&x[0], &x[1]))?;
    }

    #[test]
    fn unary_ops(r in dim(), c in dim(), s in -3.0f64..3.0, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[r, c], -4.0, 4.0);
        check("scale", std::slice::from_ref(&x), |x| ops::scale(&x[0], s))?;
        check("silu", std::slice::from_ref(&x), |x| ops::silu(&x[0]))?;
        check("gelu_tanh", std::slice::from_ref(&x), |x| ops::gelu_tanh(&x[0]))?;
        // Caps from below to above the input range: saturated and nearly linear regions.
        let cap = 0.5 + s.abs();
        check("softcap", std::slice::from_ref(&x), |x| ops::softcap(&x[0], cap))?;
        check("sum", std::slice::from_ref(&x), |x| ops::sum(&x[0]))?;
        check("mean", std::slice::from_ref(&x), |x| ops::mean(&x[0]))?;
        check("reshape", std::slice::from_ref(&x), |x| ops::reshape(&x[0], [c, r]))?;
    }

    #[test]
    fn swiglu_op(r in dim(), c in dim(), seed: u64) {
        let mut rng = SplitMix::new(seed);
        let g = param(&mut rng, &[r, c], -4.0, 4.0);
        let u = param(&mut rng, &[r, c], -2.0, 2.0);
        check("swiglu", &[g, u], |x| ops::swiglu(&x[0], &x[1]))?;
    }

    #[test]
    fn geglu_op(r in dim(), c in dim(), seed: u64) {
        let mut rng = SplitMix::new(seed);
        let g = param(&mut rng, &[r, c], -4.0, 4.0);
        let u = param(&mut rng, &[r, c], -2.0, 2.0);
        check("geglu", &[g, u], |x| ops::geglu(&x[0], &x[1]))?;
    }

    #[test]
    fn rms_norm_op(r in dim(), c in dim(), seed: u64) {
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[r, c], -2.0, 2.0);
        let w = param(&mut rng, &[c], 0.5, 1.5);
        check("rms_norm", &[x, w], |x| ops::rms_norm(&x[0], &x[1], 1e-5))?;
    }

    #[test]
    fn rms_norm_frozen_weight_op(r in dim(), c in dim(), zero_at in proptest::option::of(0usize..8), seed: u64) {
        // A frozen w without zeros: the backward works from y (x̂ = y / w); with a zero entry it
        // falls back to keeping x. Both must match finite differences.
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[r, c], -2.0, 2.0);
        let mut wv = rng.vec(c, -1.5, 1.5);
        if let Some(z) = zero_at {
            wv[z % c] = 0.0;
        }
        let w = Tensor::from_vec(wv, [c]).unwrap();
        check("rms_norm (frozen w)", &[x, w], |x| ops::rms_norm(&x[0], &x[1], 1e-5))?;
    }

    #[test]
    fn rope_op(b in 1usize..3, t in dim(), h in 1usize..4, half in 1usize..5, per_row: bool, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let hd = 2 * half;
        let x = param(&mut rng, &[b, t, h, hd], -1.0, 1.0);
        let table = Rope::new(hd, 10000.0).unwrap();
        let n = if per_row { b * t } else { t };
        let pos: Vec<usize> = (0..n).map(|_| (rng.next_u64() % 4096) as usize).collect();
        check("rope", &[x], |x| ops::rope(&x[0], &table, &pos))?;
    }

    #[test]
    fn rope_partial_scaled_op(b in 1usize..3, t in dim(), h in 1usize..3, half in 1usize..5, rot_half in 1usize..5, scale in 0.3f64..2.5,
                              per_row: bool, seed: u64) {
        // Partial rotary (rot = 2·rot_half ≤ hd, the rest passed through) with cos/sin scaled.
        let mut rng = SplitMix::new(seed);
        let hd = 2 * half + (seed % 2) as usize; // odd head_dim too: only the rotary dims pair up
        let rot_half = rot_half.min(half);
        let inv_freq = rng.vec(rot_half, 0.01, 1.0);
        let table = Rope::with_table(hd, inv_freq, scale).unwrap();
        let x = param(&mut rng, &[b, t, h, hd], -1.0, 1.0);
        let n = if per_row { b * t } else { t };
        let pos: Vec<usize> = (0..n).map(|_| (rng.next_u64() % 4096) as usize).collect();
        check("rope (partial, scaled)", &[x], |x| ops::rope(&x[0], &table, &pos))?;
    }

    #[test]
    fn split_last_op(lead in proptest::collection::vec(1usize..4, 0..3), sizes in proptest::collection::vec(1usize..4, 1..4), unused in 0usize..4, seed: u64) {
        // Rank 1–3; each used part enters the loss with its own weight, and one part (when there
        // are several) gets no gradient at all: its columns of dx must be zero.
        let mut rng = SplitMix::new(seed);
        let mut dims = lead.clone();
        dims.push(sizes.iter().sum());
        let x = param(&mut rng, &dims, -1.0, 1.0);
        let skip = if sizes.len() > 1 { Some(unused % sizes.len()) } else { None };
        check("split_last", &[x], |x| {
            let parts = ops::split_last(&x[0], &sizes)?;
            let mut loss: Option<Tensor> = None;
            for (i, p) in parts.iter().enumerate() {
                if Some(i) == skip {
                    continue;
                }
                let term = ops::scale(&ops::sum(&ops::mul(p, p)?)?, (i + 1) as f64)?;
                loss = Some(match loss {
                    None => term,
                    Some(l) => ops::add(&l, &term)?,
                });
            }
            Ok(loss.expect("at least one part is used"))
        })?;
    }

    #[test]
    fn attention_op(b in 1usize..3, t in dim(), extra in 0usize..3, nkv in 1usize..3, group in 1usize..4, hd in 1usize..5,
                    causal: bool, masked: bool, softcap in proptest::option::of(0.3f64..4.0), window in proptest::option::of(1usize..5), seed: u64) {
        let mut rng = SplitMix::new(seed);
        let s = t + extra;
        let nh = nkv * group;
        let q = param(&mut rng, &[b, t, nh, hd], -1.5, 1.5);
        let k = param(&mut rng, &[b, s, nkv, hd], -1.5, 1.5);
        let v = param(&mut rng, &[b, s, nkv, hd], -1.5, 1.5);
        let key_mask = masked.then(|| (0..b * s).map(|_| rng.next_u64() % 4 != 0).collect());
        // A sliding window needs causal attention; with t up to 17 a window of 1–4 cuts rows.
        let window = window.filter(|_| causal);
        let opts = AttnOptions { causal, key_mask, scale: None, softcap, window };
        check("attention", &[q, k, v], |x| ops::attention(&x[0], &x[1], &x[2], &opts))?;
    }

    #[test]
    fn attention_sliding_window_op(b in 1usize..3, t in 2usize..9, extra in 0usize..4, nkv in 1usize..3, group in 1usize..4, hd in 1usize..4,
                                   window in 1usize..5, masked: bool, seed: u64) {
        // Always windowed and narrower than the keys (window < t + extra where t ≥ 2 allows),
        // with GQA and, half the time, a key mask.
        let mut rng = SplitMix::new(seed);
        let s = t + extra;
        let nh = nkv * group;
        let q = param(&mut rng, &[b, t, nh, hd], -1.5, 1.5);
        let k = param(&mut rng, &[b, s, nkv, hd], -1.5, 1.5);
        let v = param(&mut rng, &[b, s, nkv, hd], -1.5, 1.5);
        let key_mask = masked.then(|| (0..b * s).map(|_| rng.next_u64() % 4 != 0).collect());
        let opts = AttnOptions { causal: true, key_mask, window: Some(window.min(t - 1)), ..AttnOptions::default() };
        check("attention (sliding window)", &[q, k, v], |x| ops::attention(&x[0], &x[1], &x[2], &opts))?;
    }

    #[test]
    fn embedding_op(vocab in dim(), d in dim(), n in dim(), seed: u64) {
        let mut rng = SplitMix::new(seed);
        let table = param(&mut rng, &[vocab, d], -1.0, 1.0);
        let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
        check("embedding", &[table], |x| ops::embedding(&x[0], &ids, spectune::DType::F64))?;
    }

    #[test]
    fn cross_entropy_op(rows in dim(), vocab in 2usize..9, softcap in proptest::option::of(0.5f64..4.0), seed: u64) {
        let mut rng = SplitMix::new(seed);
        let logits = param(&mut rng, &[rows, vocab], -3.0, 3.0);
        let targets: Vec<i64> = (0..rows).map(|i| if i % 3 == 2 { -100 } else { (rng.next_u64() % vocab as u64) as i64 }).collect();
        let opts = CeOptions { softcap, ..CeOptions::default() };
        check("cross_entropy", &[logits], |x| ops::cross_entropy(&x[0], &targets, &opts))?;
    }

    #[test]
    fn linear_cross_entropy_op(rows in dim(), d in dim(), vocab in 2usize..9, chunk in 1usize..4, cols in 1usize..5,
                               softcap in proptest::option::of(0.3f64..3.0), seed: u64) {
        // Inputs up to ±2 so that the logits (up to ±4·d) reach the cap's curved region.
        let mut rng = SplitMix::new(seed);
        let h = param(&mut rng, &[rows, d], -2.0, 2.0);
        let w = param(&mut rng, &[vocab, d], -1.0, 1.0);
        let targets: Vec<i64> = (0..rows).map(|i| if i % 4 == 3 { -100 } else { (rng.next_u64() % vocab as u64) as i64 }).collect();
        // Trainable head: the forward's vocabulary blocks (online softmax) feed the lse that the
        // row-chunked backward uses.
        let opts = CeOptions { chunk_rows: Some(chunk), chunk_cols: Some(cols), denominator: Some(3.0), softcap, ..CeOptions::default() };
        check("linear_cross_entropy", &[h, w], |x| ops::linear_cross_entropy(&x[0], &x[1], &targets, &opts))?;
    }

    #[test]
    fn linear_cross_entropy_frozen_head_op(rows in dim(), d in dim(), vocab in 2usize..9, chunk in 1usize..4, cols in 1usize..5,
                                           softcap in proptest::option::of(0.3f64..3.0), seed: u64) {
        // A frozen head takes the fused path (dh computed in the forward, scaled in the backward).
        let mut rng = SplitMix::new(seed);
        let h = param(&mut rng, &[rows, d], -2.0, 2.0);
        let w = constant(&mut rng, &[vocab, d], -1.0, 1.0);
        let targets: Vec<i64> = (0..rows).map(|i| if i % 4 == 3 { -100 } else { (rng.next_u64() % vocab as u64) as i64 }).collect();
        // Vocabulary blocks of `cols` columns: the online softmax rescales across blocks.
        let opts = CeOptions { chunk_rows: Some(chunk), chunk_cols: Some(cols), denominator: Some(3.0), softcap, ..CeOptions::default() };
        check("linear_cross_entropy (frozen head)", &[h, w], |x| ops::scale(&ops::linear_cross_entropy(&x[0], &x[1], &targets, &opts)?, 1.7))?;
    }

    #[test]
    fn lora_linear_op(rows in dim(), n in dim(), m in dim(), r in 1usize..4, s in 0.1f64..3.0, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let a = param(&mut rng, &[r, n], -1.0, 1.0);
        // B non-zero so dA is exercised (at init B = 0 makes dA vanish).
        let b = param(&mut rng, &[m, r], -1.0, 1.0);
        check("lora_linear", &[x, w, a, b], |x| ops::lora_linear(&x[0], &x[1], &x[2], &x[3], s))?;
    }

    #[test]
    fn adapter_linear_with_dropout(rows in dim(), n in dim(), m in dim(), r in 1usize..4, p in 0.0f64..0.7, spec: bool, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let d = param(&mut rng, &[1], 0.5, 1.5);
        let a = param(&mut rng, &[r, n], -1.0, 1.0);
        let b = param(&mut rng, &[m, r], -1.0, 1.0);
        let dr = Some(ops::Dropout { p, seed });
        let rows_sel = SpecRows::Top(1);
        check("adapter_linear(dropout)", &[x, w, d, a, b], |x| {
            let sp = if spec { ops::Spectral::Rows { d: &x[2], rows: &rows_sel } } else { ops::Spectral::None };
            ops::adapter_linear(&x[0], &x[1], sp, &x[3], &x[4], 1.5, dr)
        })?;
    }

    #[test]
    fn swiglu_adapter_linear_op(rows in dim(), n in dim(), m in dim(), r in 1usize..4, p in proptest::option::of(0.0f64..0.7), spec: bool,
                                geglu: bool, seed: u64) {
        // The fused down projection (SwiGLU through swiglu_adapter_linear, or GeGLU through
        // gated_adapter_linear): gradients for gate, up, d, A and B, with and without dropout,
        // and the same values as the unfused composition.
        let mut rng = SplitMix::new(seed);
        let g = param(&mut rng, &[rows, n], -2.0, 2.0);
        let u = param(&mut rng, &[rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let d = param(&mut rng, &[1], 0.5, 1.5);
        let a = param(&mut rng, &[r, n], -1.0, 1.0);
        let b = param(&mut rng, &[m, r], -1.0, 1.0);
        let dr = p.map(|p| ops::Dropout { p, seed });
        let rows_sel = SpecRows::Top(1);
        let f = |x: &[Tensor], fused: bool| {
            let sp = if spec { ops::Spectral::Rows { d: &x[3], rows: &rows_sel } } else { ops::Spectral::None };
            if fused {
                fused_gate_op(geglu, false, &x[0], &x[1], &x[2], sp, &x[4], &x[5], dr)
            } else {
                let gated = if geglu { ops::geglu(&x[0], &x[1])? } else { ops::swiglu(&x[0], &x[1])? };
                ops::adapter_linear(&gated, &x[2], sp, &x[4], &x[5], 1.5, dr)
            }
        };
        let inputs = [g, u, w, d, a, b];
        let (y1, y2) = spectune::no_grad(|| (f(&inputs, true).unwrap().to_vec_f64(), f(&inputs, false).unwrap().to_vec_f64()));
        prop_assert_eq!(y1, y2);
        check("swiglu_adapter_linear", &inputs, |x| f(x, true))?;
        // The graph-only variant records the same backward: same gradients for every input.
        let sp = if spec { ops::Spectral::Rows { d: &inputs[3], rows: &rows_sel } } else { ops::Spectral::None };
        let go = fused_gate_op(geglu, true, &inputs[0], &inputs[1], &inputs[2], sp, &inputs[4], &inputs[5], dr).unwrap();
        let full = f(&inputs, true).unwrap();
        let seed_t = Tensor::from_vec(rng.vec(full.numel(), -1.0, 1.0), full.shape().clone()).unwrap();
        let g1 = spectune::autograd::backward_with_seed(&go, seed_t.clone()).unwrap();
        let g2 = spectune::autograd::backward_with_seed(&full, seed_t).unwrap();
        for t in [&inputs[0], &inputs[1], &inputs[3], &inputs[4], &inputs[5]] {
            prop_assert_eq!(g1.get(t).map(|g| g.to_vec_f64()), g2.get(t).map(|g| g.to_vec_f64()));
        }
        // With A frozen (only B trained) the graph-only call must still keep H = x·Aᵀ for dB.
        let a_frozen = inputs[4].detach();
        let go = fused_gate_op(geglu, true, &inputs[0], &inputs[1], &inputs[2], sp, &a_frozen, &inputs[5], dr).unwrap();
        let full = fused_gate_op(geglu, false, &inputs[0], &inputs[1], &inputs[2], sp, &a_frozen, &inputs[5], dr).unwrap();
        let seed_t = Tensor::from_vec(rng.vec(full.numel(), -1.0, 1.0), full.shape().clone()).unwrap();
        let g1 = spectune::autograd::backward_with_seed(&go, seed_t.clone()).unwrap();
        let g2 = spectune::autograd::backward_with_seed(&full, seed_t).unwrap();
        prop_assert!(g1.get(&inputs[5]).is_some());
        for t in [&inputs[0], &inputs[1], &inputs[3], &inputs[5]] {
            prop_assert_eq!(g1.get(t).map(|g| g.to_vec_f64()), g2.get(t).map(|g| g.to_vec_f64()));
        }
    }

    #[test]
    fn speclora_svd_linear_op(rows in dim(), n in dim(), m in dim(), r in 1usize..4, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let k = 1 + (rng.next_u64() as usize) % m.min(n);
        let x = param(&mut rng, &[rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let u = constant(&mut rng, &[m, k], -1.0, 1.0);
        let sigma = constant(&mut rng, &[k], 0.5, 3.0);
        let v = constant(&mut rng, &[n, k], -1.0, 1.0);
        let d = param(&mut rng, &[k], 0.5, 1.5);
        let a = param(&mut rng, &[r, n], -1.0, 1.0);
        let b = param(&mut rng, &[m, r], -1.0, 1.0);
        check("speclora_svd_linear", &[x, w, u, sigma, v, d, a, b], |x| ops::speclora_svd_linear(&x[0], &x[1], &x[5], &x[2], &x[3], &x[4], &x[6], &x[7], 0.7))?;
    }

    #[test]
    fn speclora_linear_op(rows in dim(), n in dim(), m in dim(), r in 1usize..4, by_index: bool, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let k = 1 + (rng.next_u64() as usize) % m;
        let rows_sel = if by_index {
            // k distinct rows in a scrambled order.
            let mut ix: Vec<u32> = (0..m as u32).collect();
            for i in (1..ix.len()).rev() { ix.swap(i, (rng.next_u64() as usize) % (i + 1)); }
            SpecRows::Indices(ix[..k].to_vec())
        } else {
            SpecRows::Top(k)
        };
        let x = param(&mut rng, &[1, rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let d = param(&mut rng, &[k], 0.5, 1.5);
        let a = param(&mut rng, &[r, n], -1.0, 1.0);
        let b = param(&mut rng, &[m, r], -1.0, 1.0);
        check("speclora_linear", &[x, w, d, a, b], |x| ops::speclora_linear(&x[0], &x[1], &x[2], &rows_sel, &x[3], &x[4], 0.5))?;
    }

    #[test]
    fn checkpointed_block(rows in dim(), c in dim(), seed: u64) {
        // A residual block with a parameter inside, run under activation checkpointing: the
        // gradients of both the block input and the captured parameter must be exact.
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[rows, c], -1.0, 1.0);
        let w = param(&mut rng, &[c, c], -1.0, 1.0);
        let g = param(&mut rng, &[c], 0.5, 1.5);
        check("checkpoint", &[x, w, g], |t| {
            let (w, g) = (t[1].clone(), t[2].clone());
            let h = checkpoint(&t[0], move |x| {
                let n = ops::rms_norm(x, &g, 1e-6)?;
                let y = ops::silu(&ops::matmul(&n, &w, false, true)?)?;
                ops::add(x, &y)
            })?;
            ops::mul(&h, &h)
        })?;
    }
}
