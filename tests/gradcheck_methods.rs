//! Property-based f64 gradient checks of the spectral / baseline method ops: the
//! Cayley transform, Spectral^A, Spectral^R (alone and through the Cayley chain), DoRA and the
//! PiSSA/MiLoRA residual linear. Random shapes (1 and odd sizes included) and values, analytic
//! gradients vs central finite differences (src/gradcheck.rs).

use proptest::prelude::*;
use spectune::gradcheck::{gradcheck, GradcheckOptions, SplitMix};
use spectune::ops;
use spectune::{Result, Tensor};

fn param(rng: &mut SplitMix, dims: &[usize], lo: f64, hi: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.vec(n, lo, hi), dims.to_vec()).unwrap().param().unwrap()
}

fn constant(rng: &mut SplitMix, dims: &[usize], lo: f64, hi: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.vec(n, lo, hi), dims.to_vec()).unwrap()
}

fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> std::result::Result<(), TestCaseError> {
    let bad = gradcheck(name, inputs, f, &GradcheckOptions::default()).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
    if let Some(first) = bad.first() {
        let shapes: Vec<String> = inputs.iter().map(|t| t.shape().to_string()).collect();
        return Err(TestCaseError::fail(format!("{first} ({} mismatches; input shapes {shapes:?})", bad.len())));
    }
    Ok(())
}

fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(1usize), 6 => 2usize..6, 2 => Just(7usize), 1 => Just(11usize)]
}

/// Frozen factors u [m, r], sigma [r], v [n, r] (not orthonormal: the gradients hold for any).
fn factors(rng: &mut SplitMix, m: usize, n: usize, r: usize) -> (Tensor, Tensor, Tensor) {
    (constant(rng, &[m, r], -1.0, 1.0), constant(rng, &[r], 0.3, 3.0), constant(rng, &[n, r], -1.0, 1.0))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cayley_op(r in 1usize..7, scale in 0.1f64..3.0, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let q = param(&mut rng, &[r, r], -scale, scale);
        check("cayley", &[q], |x| ops::cayley(&x[0]))?;
    }

    #[test]
    fn spectral_a_linear_op(rows in dim(), n in dim(), m in dim(), seed: u64) {
        let mut rng = SplitMix::new(seed);
        let r = 1 + (rng.next_u64() as usize) % m.min(n);
        let x = param(&mut rng, &[rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let (u, sigma, v) = factors(&mut rng, m, n, r);
        // Non-zero ΔU, ΔV so every cross term is exercised (at init both are 0).
        let du = param(&mut rng, &[m, r], -0.5, 0.5);
        let dv = param(&mut rng, &[n, r], -0.5, 0.5);
        check("spectral_a_linear", &[x, w, u, sigma, v, du, dv], |t| ops::spectral_a_linear(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6]))?;
    }

    #[test]
    fn spectral_r_linear_op(rows in dim(), n in dim(), m in dim(), seed: u64) {
        // The layer alone, with R_U, R_V as free (not necessarily orthogonal) inputs.
        let mut rng = SplitMix::new(seed);
        let r = 1 + (rng.next_u64() as usize) % m.min(n);
        let x = param(&mut rng, &[2, rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let (u, sigma, v) = factors(&mut rng, m, n, r);
        let ru = param(&mut rng, &[r, r], -1.0, 1.0);
        let rv = param(&mut rng, &[r, r], -1.0, 1.0);
        let c = param(&mut rng, &[r], 0.5, 1.5);
        check("spectral_r_linear", &[x, w, u, sigma, v, ru, rv, c], |t| ops::spectral_r_linear(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7]))?;
    }

    #[test]
    fn spectral_r_through_cayley(rows in dim(), n in dim(), m in dim(), qs in 0.05f64..2.0, seed: u64) {
        // The whole rotational layer as trained: Q_U, Q_V → Cayley → layer, plus the σ scale c.
        let mut rng = SplitMix::new(seed);
        let r = 1 + (rng.next_u64() as usize) % m.min(n);
        let x = param(&mut rng, &[rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let (u, sigma, v) = factors(&mut rng, m, n, r);
        let qu = param(&mut rng, &[r, r], -qs, qs);
        let qv = param(&mut rng, &[r, r], -qs, qs);
        let c = param(&mut rng, &[r], 0.5, 1.5);
        check("spectral_r(cayley)", &[x, w, u, sigma, v, qu, qv, c], |t| {
            let (ru, rv) = (ops::cayley(&t[5])?, ops::cayley(&t[6])?);
            ops::spectral_r_linear(&t[0], &t[1], &t[2], &t[3], &t[4], &ru, &rv, &t[7])
        })?;
    }

    #[test]
    fn dora_linear_op(rows in dim(), n in dim(), m in dim(), r in 1usize..4, p in 0.0f64..0.6, s in 0.2f64..2.5, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let a = param(&mut rng, &[r, n], -1.0, 1.0);
        let b = param(&mut rng, &[m, r], -1.0, 1.0);
        let mag = param(&mut rng, &[m], 0.5, 2.0);
        // ν is a constant of the op (computed outside the graph, as the adapter does).
        let nu = Tensor::from_vec(rng.vec(m, 0.5, 2.0), [m]).unwrap();
        let dr = Some(ops::Dropout { p, seed });
        check("dora_linear", &[x, w, nu, a, b, mag], |t| ops::dora_linear(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], s, dr))?;
    }

    #[test]
    fn pissa_linear_op(rows in dim(), n in dim(), m in dim(), r in 1usize..4, r0 in 1usize..4, p in 0.0f64..0.6, seed: u64) {
        let mut rng = SplitMix::new(seed);
        let x = param(&mut rng, &[rows, n], -1.0, 1.0);
        let w = constant(&mut rng, &[m, n], -1.0, 1.0);
        let a = param(&mut rng, &[r, n], -1.0, 1.0);
        let b = param(&mut rng, &[m, r], -1.0, 1.0);
        let a0 = constant(&mut rng, &[r0, n], -1.0, 1.0);
        let b0 = constant(&mut rng, &[m, r0], -1.0, 1.0);
        let dr = Some(ops::Dropout { p, seed });
        check("pissa_linear", &[x, w, a, b, a0, b0], |t| {
            ops::adapter_linear(&t[0], &t[1], ops::Spectral::Residual { a0: &t[4], b0: &t[5] }, &t[2], &t[3], 0.8, dr)
        })?;
    }
}
