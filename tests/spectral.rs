//! SVD accuracy and the SpecLoRA-SVD numeric cases of reference/methods.md §6.

use spectune::gradcheck::SplitMix;
use spectune::ops;
use spectune::svd::{thin_svd, top_k_svd};
use spectune::{backward, Tensor};

fn t64(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims.to_vec()).unwrap()
}

/// A matrix with a known, decaying spectrum: U·diag(s)·Vᵀ with random orthonormal U, V.
fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Vec<f64> {
    let mut rng = SplitMix::new(seed);
    let (qu, _, _) = thin_svd(&rng.vec(m * m, -1.0, 1.0), m, m).unwrap();
    let (qv, _, _) = thin_svd(&rng.vec(n * n, -1.0, 1.0), n, n).unwrap();
    let mut w = vec![0.0; m * n];
    for (j, &sj) in s.iter().enumerate() {
        for i in 0..m {
            for c in 0..n {
                w[i * n + c] += qu[i * m + j] * sj * qv[c * n + j];
            }
        }
    }
    w
}

#[test]
fn randomized_top_k_matches_the_full_svd() {
    let (m, n, k) = (120, 90, 8);
    let s: Vec<f64> = (0..90).map(|i| 10.0 * 0.8f64.powi(i)).collect();
    let w = with_spectrum(m, n, &s, 1);
    let (_, s_full, _) = thin_svd(&w, m, n).unwrap();
    for (a, b) in s_full.iter().zip(&s) {
        assert!((a - b).abs() < 1e-9 * s[0], "thin SVD: {a} vs {b}");
    }
    let wt = t64(&w, &[m, n]);
    let top = top_k_svd(&wt, k, 3, 7).unwrap();
    for i in 0..k {
        assert!((top.s[i] - s[i]).abs() < 1e-6 * s[0], "σ_{i}: {} vs {}", top.s[i], s[i]);
    }
    // Reconstruction of the rank-k part: ‖W − U_k Σ_k V_kᵀ‖ ≈ σ_{k+1} (spectral), check Frobenius.
    let mut err = 0.0;
    for i in 0..m {
        for c in 0..n {
            let mut acc = 0.0;
            for j in 0..k {
                acc += top.u[i * k + j] * top.s[j] * top.v[c * k + j];
            }
            err += (w[i * n + c] - acc).powi(2);
        }
    }
    let tail: f64 = s[k..].iter().map(|x| x * x).sum();
    assert!((err - tail).abs() < 1e-6 * tail.max(1e-12) + 1e-9, "residual {err} vs tail energy {tail}");
    // Deterministic given the seed.
    let again = top_k_svd(&wt, k, 3, 7).unwrap();
    assert_eq!(top.s, again.s);
    assert_eq!(top.u, again.u);
    assert!(top_k_svd(&wt, 0, 1, 0).is_err());
    assert!(top_k_svd(&wt, 91, 1, 0).is_err());
}

/// W' for SpecLoRA-SVD with B = 0, read out through the op with x = I (rows of the output are
/// the columns of W'ᵀ, i.e. y = W'ᵀ).
fn svd_form_weight(w: &[f64], dim: usize, k: usize, d: &[f64]) -> Vec<f64> {
    let wt = t64(w, &[dim, dim]);
    let top = top_k_svd(&wt, k, 2, 3).unwrap();
    let eye: Vec<f64> = (0..dim * dim).map(|i| if i / dim == i % dim { 1.0 } else { 0.0 }).collect();
    let y = ops::speclora_svd_linear(
        &t64(&eye, &[dim, dim]),
        &wt,
        &t64(d, &[k]),
        &t64(&top.u, &[dim, k]),
        &t64(&top.s, &[k]),
        &t64(&top.v, &[dim, k]),
        &t64(&vec![0.1; dim], &[1, dim]),
        &Tensor::zeros::<f64>([dim, 1]),
        1.0,
    )
    .unwrap()
    .to_vec_f64();
    // y[i][j] = W'[j][i]
    (0..dim * dim).map(|idx| y[(idx % dim) * dim + idx / dim]).collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-9, "{what}: {a:?} vs {b:?}");
    }
}

#[test]
fn methods_md_case_3_diagonal() {
    let w = [3.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0];
    assert_close(&svd_form_weight(&w, 3, 1, &[2.0]), &[6.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0], "k=1 d=(2)");
    assert_close(&svd_form_weight(&w, 3, 2, &[2.0, 0.5]), &[6.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], "k=2 d=(2,0.5)");
}

#[test]
fn methods_md_case_4_symmetric() {
    let wp = svd_form_weight(&[2.0, 1.0, 1.0, 2.0], 2, 1, &[2.0]);
    assert_close(&wp, &[3.5, 2.5, 2.5, 3.5], "W'");
    let (_, s, _) = thin_svd(&wp, 2, 2).unwrap();
    assert_close(&s, &[6.0, 1.0], "singular values of W'");
}

#[test]
fn methods_md_case_5_gradient_of_d() {
    // W = diag(3,2,1), k = 3, B = 0, L = Σ_j (W'x)_j with x = (1,1,1) → ∂L/∂d = (3,2,1).
    let w = t64(&[3.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0], &[3, 3]);
    let top = top_k_svd(&w, 3, 2, 0).unwrap();
    let d = Tensor::full(1.0f64, [3]).param().unwrap();
    let a = t64(&[0.3, -0.2, 0.1], &[1, 3]).param().unwrap();
    let b = Tensor::zeros::<f64>([3, 1]).param().unwrap();
    let y = ops::speclora_svd_linear(&t64(&[1.0, 1.0, 1.0], &[1, 3]), &w, &d, &t64(&top.u, &[3, 3]), &t64(&top.s, &[3]), &t64(&top.v, &[3, 3]), &a, &b, 1.0)
        .unwrap();
    // Identity at init, bit-exactly: W'x = Wx.
    assert_eq!(y.to_vec_f64(), vec![3.0, 2.0, 1.0]);
    let g = backward(&ops::sum(&y).unwrap()).unwrap();
    let mut dd = g.get(&d).unwrap().to_vec_f64();
    // Singular values come in descending order: directions e1, e2, e3 with σ = 3, 2, 1.
    dd.iter_mut().for_each(|v| *v = (*v * 1e9).round() / 1e9);
    assert_eq!(dd, vec![3.0, 2.0, 1.0]);
}
