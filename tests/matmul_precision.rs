//! `--matmul-precision high|medium`: the frozen-weight products on AMX bf16 tiles.
//!
//! The precision is process-wide, so this file is one test (its own process): every level is
//! compared with the f32 products (`highest`) on the same weights, for every stored type, the
//! linear's forward and dX, the fused LM-head loss and its gradient, shapes that leave partial
//! tiles on every side, a trainable weight (which must stay f32), and `compare --resume` keying
//! runs by the level. Where the CPU has no
//! AMX-BF16, every level must compute exactly the f32 products.

use spectune::backend::amx::{self, MatmulPrecision};
use spectune::gradcheck::SplitMix;
use spectune::io::gguf::GgufFile;
use spectune::ops::{self, CeOptions};
use spectune::storage::HostData;
use spectune::train::compare::{compare, CompareOptions};
use spectune::Tensor;

const TYPES: [&str; 12] = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"];

fn fixture() -> GgufFile {
    GgufFile::open(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/quant_blocks.gguf")).expect("the committed fixture opens")
}

/// max |got − want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs() as f64)).max(1e-30);
    got.iter().zip(want).fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs())) / scale
}

fn rand(rng: &mut SplitMix, n: usize) -> Vec<f32> {
    rng.vec(n, -1.0, 1.0).iter().map(|&v| v as f32).collect()
}

/// y = x·Wᵀ and dX = dY·W for a frozen W, at the current precision.
fn linear_fwd_dx(w: &Tensor, x: &[f32], dy: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
    let (n, k) = (w.dims()[0], w.dims()[1]);
    let xt = Tensor::from_vec(x.to_vec(), [m, k]).unwrap().param().unwrap();
    let y = ops::linear(&xt, w).unwrap();
    let g = spectune::autograd::backward_with_seed(&y, Tensor::from_vec(dy.to_vec(), [m, n]).unwrap()).unwrap();
    assert!(g.get(w).is_none(), "a frozen weight gets no gradient");
    (y.to_vec_f32(), g.get(&xt).unwrap().to_vec_f32())
}

/// The fused head loss and dh at the current precision.
fn head(w: &Tensor, h: &[f32], targets: &[i64]) -> (f32, Vec<f32>) {
    let d = w.dims()[1];
    let ht = Tensor::from_vec(h.to_vec(), [targets.len(), d]).unwrap().param().unwrap();
    let opts = CeOptions { chunk_cols: Some(96), ..CeOptions::default() };
    let loss = ops::linear_cross_entropy(&ht, w, targets, &opts).unwrap();
    let g = spectune::autograd::backward(&loss).unwrap();
    (loss.to_vec_f32()[0], g.get(&ht).unwrap().to_vec_f32())
}

#[test]
fn lower_precisions_track_f32_on_every_stored_type_and_shape() {
    let amx_ok = amx::available();
    println!("AMX-BF16 usable: {amx_ok}");
    let g = fixture();
    let mut rng = SplitMix::new(11);
    // (name, W [n × k]): the fixture's block types ([3 × 512]), and f32/bf16 matrices whose
    // sides are not multiples of the tiles (n = 70, k = 100) or span several tasks (n = 200).
    let mut weights: Vec<(String, Tensor)> = TYPES.iter().map(|&t| (t.to_string(), g.tensor(t).unwrap())).collect();
    let w70 = Tensor::from_vec(rand(&mut rng, 70 * 100), [70, 100]).unwrap();
    weights.push(("f32 70x100".into(), w70));
    let w200: Vec<half::bf16> = rand(&mut rng, 200 * 300).into_iter().map(half::bf16::from_f32).collect();
    weights.push(("bf16 200x300".into(), Tensor::from_host(HostData::BF16(w200), [200, 300]).unwrap()));
    let mut worst = [(0f64, String::new()), (0f64, String::new())];
    for (name, w) in &weights {
        let (n, k) = (w.dims()[0], w.dims()[1]);
        for m in [16usize, 37] {
            let x = rand(&mut rng, m * k);
            let dy = rand(&mut rng, m * n);
            amx::set_matmul_precision(MatmulPrecision::Highest);
            let (y0, dx0) = linear_fwd_dx(w, &x, &dy, m);
            for (i, p) in [MatmulPrecision::High, MatmulPrecision::Medium].into_iter().enumerate() {
                amx::set_matmul_precision(p);
                let (y, dx) = linear_fwd_dx(w, &x, &dy, m);
                let e = rel_err(&y, &y0).max(rel_err(&dx, &dx0));
                if !amx_ok {
                    assert_eq!((y, dx), (y0.clone(), dx0.clone()), "{name}: without AMX every level is f32");
                    continue;
                }
                // bf16x3 keeps ~16 bits per operand; bf16 keeps 8 (relative rounding 2⁻⁹ per operand).
                let bound = if p == MatmulPrecision::High { 2e-5 } else { 1.5e-2 };
                assert!(e < bound, "{name} m={m} {p}: relative error {e:.2e} ≥ {bound:.0e}");
                if e > worst[i].0 {
                    worst[i] = (e, format!("{name} m={m}"));
                }
            }
        }
    }
    amx::set_matmul_precision(MatmulPrecision::Highest);
    if amx_ok {
        println!("worst relative error: high {:.2e} ({}), medium {:.2e} ({})", worst[0].0, worst[0].1, worst[1].0, worst[1].1);
        // The levels really differ: medium's rounding is visible, high's is ~2⁸ smaller.
        assert!(worst[1].0 > 1e-4, "medium looks exact ({:.2e}): is it running in f32?", worst[1].0);
        assert!(worst[0].0 < worst[1].0 / 30.0, "high ({:.2e}) is not much closer than medium ({:.2e})", worst[0].0, worst[1].0);
    }

    // The fused LM-head loss: vocabulary 300 in blocks of 96 columns, 40 rows.
    let (v, d, rows) = (300usize, 64usize, 40usize);
    let wh = Tensor::from_vec(rand(&mut rng, v * d), [v, d]).unwrap();
    let h: Vec<f32> = rand(&mut rng, rows * d).iter().map(|x| 3.0 * x).collect();
    let targets: Vec<i64> = (0..rows).map(|i| ((i * 37) % v) as i64).collect();
    amx::set_matmul_precision(MatmulPrecision::Highest);
    let (l0, dh0) = head(&wh, &h, &targets);
    for p in [MatmulPrecision::High, MatmulPrecision::Medium] {
        amx::set_matmul_precision(p);
        let (l, dh) = head(&wh, &h, &targets);
        let (el, eg) = (((l - l0) / l0).abs() as f64, rel_err(&dh, &dh0));
        println!("head {p}: loss {l} vs {l0} (relative {el:.2e}), dh relative {eg:.2e}");
        // dh = Σ p·W − W[target] cancels, so its relative error exceeds the products'.
        let bound = if p == MatmulPrecision::High { 1e-4 } else { 3e-2 };
        assert!(el < bound && eg < bound, "head at {p}: loss {el:.2e}, dh {eg:.2e} (bound {bound:.0e})");
        if !amx_ok {
            assert_eq!((l, dh), (l0, dh0.clone()), "without AMX every level is f32");
        }
    }

    // A NaN in the input stays NaN in its own output row only (bf16 rounding keeps NaNs NaN).
    let wn = Tensor::from_vec(rand(&mut rng, 40 * 64), [40, 64]).unwrap();
    let mut xn = rand(&mut rng, 32 * 64);
    xn[3 * 64 + 5] = f32::from_bits(0x7f80_0001); // a NaN whose payload is below bf16's bits
    for p in [MatmulPrecision::High, MatmulPrecision::Medium] {
        amx::set_matmul_precision(p);
        let y = ops::linear(&Tensor::from_vec(xn.clone(), [32, 64]).unwrap(), &wn).unwrap().to_vec_f32();
        for (r, row) in y.chunks(40).enumerate() {
            assert_eq!(row.iter().all(|v| v.is_nan()), r == 3, "{p}: row {r} {:?}", &row[..4]);
            assert!(r == 3 || row.iter().all(|v| v.is_finite()), "{p}: row {r}");
        }
    }

    // A trainable weight (full fine-tuning) is not frozen: its products stay f32 at any level.
    let wt = Tensor::from_vec(rand(&mut rng, 70 * 100), [70, 100]).unwrap().param().unwrap();
    let x = Tensor::from_vec(rand(&mut rng, 20 * 100), [20, 100]).unwrap();
    amx::set_matmul_precision(MatmulPrecision::Highest);
    let y0 = ops::linear(&x, &wt).unwrap().to_vec_f32();
    amx::set_matmul_precision(MatmulPrecision::Medium);
    let y1 = ops::linear(&x, &wt).unwrap().to_vec_f32();
    amx::set_matmul_precision(MatmulPrecision::Highest);
    assert_eq!(y0, y1, "a trainable weight's product stays f32 under medium");

    // `compare --resume` does not reuse a run made at another precision where the level takes
    // effect (AMX), and reuses it where it does not (every level is f32 there).
    let dir = tempfile::tempdir().unwrap();
    let o = CompareOptions {
        methods: vec!["lora".into()],
        steps: 2,
        seeds: Some(1),
        lr: Some(1e-2),
        eval_tokens: 256,
        out: dir.path().into(),
        synthetic: true,
        no_plot: true,
        resume: true,
        ..Default::default()
    };
    compare(&o, &mut |_| {}).unwrap();
    amx::set_matmul_precision(MatmulPrecision::High);
    let mut lines = Vec::new();
    compare(&o, &mut |l| lines.push(l)).unwrap();
    amx::set_matmul_precision(MatmulPrecision::Highest);
    let trained = lines.iter().any(|l| l.starts_with("\n== "));
    assert_eq!(trained, amx_ok, "trained again at high: {trained} (AMX usable: {amx_ok})");
}
