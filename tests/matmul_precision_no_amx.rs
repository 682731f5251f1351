//! With AMX turned off (`SPECTUNE_AMX=0`, as on a CPU without it), every matmul precision
//! computes the f32 products exactly: the setting is a permission, not a demand. Its own process
//! (the environment is read once).

use spectune::backend::amx::{self, MatmulPrecision};
use spectune::gradcheck::SplitMix;
use spectune::{ops, Tensor};

#[test]
fn without_amx_every_level_is_f32() {
    std::env::set_var("SPECTUNE_AMX", "0");
    assert!(!amx::available());
    let mut rng = SplitMix::new(4);
    let v = |n: usize, rng: &mut SplitMix| rng.vec(n, -1.0, 1.0).iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let w = Tensor::from_vec(v(70 * 100, &mut rng), [70, 100]).unwrap();
    let x = v(40 * 100, &mut rng);
    let dy = Tensor::from_vec(v(40 * 70, &mut rng), [40, 70]).unwrap();
    let run = || {
        let xt = Tensor::from_vec(x.clone(), [40, 100]).unwrap().param().unwrap();
        let y = ops::linear(&xt, &w).unwrap();
        let g = spectune::autograd::backward_with_seed(&y, dy.clone()).unwrap();
        (y.to_vec_f32(), g.get(&xt).unwrap().to_vec_f32())
    };
    amx::set_matmul_precision(MatmulPrecision::Highest);
    let want = run();
    for p in [MatmulPrecision::High, MatmulPrecision::Medium] {
        amx::set_matmul_precision(p);
        assert_eq!(amx::effective_precision(), MatmulPrecision::Highest);
        assert_eq!(run(), want, "{p} without AMX");
    }
}
