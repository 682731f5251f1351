//! Timing (not a check; ignored): the frozen-weight GEMM's forward y = x·Wᵀ and dX = dY·W per
//! matmul precision, for the stored types and shapes of Qwen2.5-0.5B's Q4_K_M layers, 128 rows.
//! `cargo test --release --test matmul_precision_rate -- --ignored --nocapture`

mod common;

use std::time::Instant;

use spectune::backend::amx::{self, MatmulPrecision};
use spectune::gradcheck::SplitMix;
use spectune::{ops, DType, Tensor};

#[test]
#[ignore = "timing only: run with --ignored --nocapture"]
fn frozen_gemm_rate_per_precision() {
    let m = 128usize;
    let mut rng = SplitMix::new(3);
    // (type, out, in): q/o projection, gate/up, down.
    for (dtype, out_f, in_f) in [(DType::Q5_0, 896usize, 896usize), (DType::Q5_0, 4864, 896), (DType::Q4K, 896, 4864), (DType::Q8_0, 896, 4864)] {
        let w = common::random_blocks(&mut rng, dtype, out_f, in_f, "w");
        let x = Tensor::from_vec(rng.vec(m * in_f, -1.0, 1.0).iter().map(|&v| v as f32).collect::<Vec<f32>>(), [m, in_f]).unwrap();
        let dy = Tensor::from_vec(rng.vec(m * out_f, -1.0, 1.0).iter().map(|&v| v as f32).collect::<Vec<f32>>(), [m, out_f]).unwrap();
        let flops = 2.0 * (m * out_f * in_f) as f64;
        for p in [MatmulPrecision::Highest, MatmulPrecision::High, MatmulPrecision::Medium] {
            amx::set_matmul_precision(p);
            // dX through the linear's backward (the frozen path): time of forward + backward
            // minus the forward's.
            let time = |bwd: bool| {
                let mut v: Vec<f64> = (0..15)
                    .map(|_| {
                        let xp = x.detach().param().unwrap();
                        let t0 = Instant::now();
                        let y = ops::linear(&xp, &w).unwrap();
                        if bwd {
                            std::hint::black_box(spectune::autograd::backward_with_seed(&y, dy.clone()).unwrap());
                        }
                        std::hint::black_box(y);
                        t0.elapsed().as_secs_f64()
                    })
                    .collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let f = time(false);
            let d = time(true) - f;
            println!(
                "{dtype} {out_f}x{in_f} {p:8}: fwd {:6.2} ms ({:5.0} GFLOP/s), dX {:6.2} ms ({:5.0} GFLOP/s)",
                f * 1e3,
                flops / f / 1e9,
                d * 1e3,
                flops / d / 1e9
            );
        }
    }
    amx::set_matmul_precision(MatmulPrecision::Highest);
}
