//! SVD accuracy and the SpecLoRA-SVD numeric cases of docs/ops.md §22.

use spectune::gradcheck::SplitMix;
use spectune::ops;
use spectune::svd::{bottom_k_svd, svd_block, thin_svd, top_k_svd, TopSvd};
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

/// Largest principal-angle sine between the column spans of a [rows, k] and b [rows, k]
/// (orthonormal columns): the spectral norm of (I − b·bᵀ)·a. (Computed from the residual, not
/// as √(1 − cos²), which cannot resolve angles below ~1e-8.)
fn max_sin_angle(a: &[f64], b: &[f64], rows: usize, k: usize) -> f64 {
    let mut bta = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            bta[i * k + j] = (0..rows).map(|t| b[t * k + i] * a[t * k + j]).sum();
        }
    }
    let res: Vec<f64> = (0..rows * k).map(|idx| a[idx] - (0..k).map(|q| b[(idx / k) * k + q] * bta[q * k + idx % k]).sum::<f64>()).collect();
    let (_, s, _) = thin_svd(&res, rows, k).unwrap();
    s[0]
}

/// Columns lo..hi of a [rows, r].
fn cols(a: &[f64], rows: usize, r: usize, lo: usize, hi: usize) -> Vec<f64> {
    (0..rows).flat_map(|i| a[i * r + lo..i * r + hi].iter().copied()).collect()
}

/// max over triplets of ‖W·v_j − σ_j·u_j‖ and ‖Wᵀ·u_j − σ_j·v_j‖, and of |U_kᵀU_k − I|, |V_kᵀV_k − I|.
fn triplet_residuals(w: &[f64], m: usize, n: usize, t: &TopSvd) -> (f64, f64) {
    let k = t.k;
    let mut res: f64 = 0.0;
    for j in 0..k {
        let r1: f64 = (0..m).map(|i| ((0..n).map(|c| w[i * n + c] * t.v[c * k + j]).sum::<f64>() - t.s[j] * t.u[i * k + j]).powi(2)).sum();
        let r2: f64 = (0..n).map(|c| ((0..m).map(|i| w[i * n + c] * t.u[i * k + j]).sum::<f64>() - t.s[j] * t.v[c * k + j]).powi(2)).sum();
        res = res.max(r1.sqrt()).max(r2.sqrt());
    }
    let mut orth: f64 = 0.0;
    for a in 0..k {
        for b in 0..k {
            let e = if a == b { 1.0 } else { 0.0 };
            orth = orth.max(((0..m).map(|i| t.u[i * k + a] * t.u[i * k + b]).sum::<f64>() - e).abs());
            orth = orth.max(((0..n).map(|i| t.v[i * k + a] * t.v[i * k + b]).sum::<f64>() - e).abs());
        }
    }
    (res, orth)
}

/// Ground-truth factors of [`with_spectrum`] (the same random orthonormal U, V).
fn spectrum_factors(m: usize, n: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = SplitMix::new(seed);
    let (qu, _, _) = thin_svd(&rng.vec(m * m, -1.0, 1.0), m, m).unwrap();
    let (qv, _, _) = thin_svd(&rng.vec(n * n, -1.0, 1.0), n, n).unwrap();
    (qu, qv)
}

#[test]
fn bottom_k_on_a_random_matrix_are_true_singular_triplets() {
    let (m, n, k) = (70, 50, 6);
    let w = SplitMix::new(11).vec(m * n, -1.0, 1.0);
    let (_, s_all, _) = thin_svd(&w, m, n).unwrap();
    let bot = bottom_k_svd(&t64(&w, &[m, n]), k).unwrap();
    // The smallest k singular values, in descending order.
    assert_eq!(bot.s, s_all[n - k..].to_vec());
    let (res, orth) = triplet_residuals(&w, m, n, &bot);
    eprintln!("bottom-{k} of a random {m}×{n}: σ {:?}, residual {res:.1e}, orthonormality {orth:.1e}", bot.s);
    assert!(res < 1e-12 * s_all[0], "residual {res}");
    assert!(orth < 1e-12, "orthonormality {orth}");
    // Sign convention: the largest-|.| entry of each u column is positive.
    for j in 0..k {
        let col: Vec<f64> = (0..m).map(|i| bot.u[i * k + j]).collect();
        let best = col.iter().cloned().fold(0.0f64, |a, b| if b.abs() > a.abs() { b } else { a });
        assert!(best > 0.0);
    }
    assert!(bottom_k_svd(&t64(&w, &[m, n]), 0).is_err());
    assert!(bottom_k_svd(&t64(&w, &[m, n]), 51).is_err());
}

#[test]
fn bottom_k_on_an_ill_conditioned_matrix() {
    // Condition number 1e10: the bottom block (k = 4) sits at 1e-10..4e-10, separated from the
    // rest (≥ 1e-4) by a gap of ~1e-4. A backward-stable SVD gets σ to ~ε·σ1 absolutely and the
    // block's subspaces to ~ε·σ1/gap (Wedin), individual vectors inside the block are not
    // determined that well (their gaps are 1e-10). For V the gap is 1e-4 → sin θ ≲ 1e-12. For
    // U (m > n) the block also neighbours the m − n left directions of singular value 0, so its
    // gap is the block's own 1e-10 → sin θ ≲ ε/1e-10 ≈ 2e-6.
    let (m, n, k) = (60, 40, 4);
    let mut s: Vec<f64> = (0..n - k).map(|i| 10f64.powf(-4.0 * i as f64 / (n - k - 1) as f64)).collect();
    s.extend([4e-10, 3e-10, 2e-10, 1e-10]);
    let w = with_spectrum(m, n, &s, 5);
    let (qu, qv) = spectrum_factors(m, n, 5);
    let bot = bottom_k_svd(&t64(&w, &[m, n]), k).unwrap();
    let err = bot.s.iter().zip(&s[n - k..]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let su = max_sin_angle(&bot.u, &cols(&qu, m, m, n - k, n), m, k);
    let sv = max_sin_angle(&bot.v, &cols(&qv, n, n, n - k, n), n, k);
    eprintln!("ill-conditioned bottom-{k}: max |Δσ| {err:.1e}, subspace sin θ u {su:.1e} v {sv:.1e}");
    assert!(err < 1e-14, "σ error {err}");
    assert!(su < 1e-5 && sv < 1e-10, "subspace sines {su} {sv}");
}

#[test]
fn randomized_top_k_on_ill_conditioned_and_random_matrices() {
    // (a) Ill-conditioned (1e12), gap after k: the randomized path (l = k + 10 < min(m, n)) gets
    //     σ and the top-k subspaces to near machine precision.
    let (m, n, k) = (150, 100, 6);
    let mut s = vec![50.0, 30.0, 20.0, 12.0, 8.0, 5.0];
    s.extend((0..n - k).map(|i| 0.5 * 10f64.powf(-12.0 * i as f64 / (n - k - 1) as f64)));
    let w = with_spectrum(m, n, &s, 9);
    let (qu, qv) = spectrum_factors(m, n, 9);
    let top = top_k_svd(&t64(&w, &[m, n]), k, 2, 1).unwrap();
    let rel = top.s.iter().zip(&s).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f64::max);
    let su = max_sin_angle(&top.u, &cols(&qu, m, m, 0, k), m, k);
    let sv = max_sin_angle(&top.v, &cols(&qv, n, n, 0, k), n, k);
    eprintln!("ill-conditioned top-{k} (randomized): max rel Δσ {rel:.1e}, sin θ u {su:.1e} v {sv:.1e}");
    assert!(rel < 1e-12 && su < 1e-10 && sv < 1e-10, "rel {rel} su {su} sv {sv}");
    // (b) A random (uniform entries) matrix — a flat spectrum, the hardest case for a range
    //     finder: compare with the full SVD. Randomized estimates never exceed the true values
    //     (σ_i(Qᵀ·W) ≤ σ_i(W)); with 4 power iterations they are within 2 % here, and the
    //     returned triplets are still exact in the sense W·v ≈ σ·u up to the missed energy.
    let (m, n, k) = (120, 90, 5);
    let w = SplitMix::new(21).vec(m * n, -1.0, 1.0);
    let (_, s_full, _) = thin_svd(&w, m, n).unwrap();
    let top = top_k_svd(&t64(&w, &[m, n]), k, 4, 3).unwrap();
    let rel = top.s.iter().zip(&s_full).map(|(a, b)| ((a - b) / b).abs()).fold(0.0, f64::max);
    eprintln!("random {m}×{n} top-{k} (randomized, 4 power iterations): σ {:?} vs {:?}, max rel {rel:.1e}", top.s, &s_full[..k]);
    for (a, b) in top.s.iter().zip(&s_full) {
        assert!(*a <= b * (1.0 + 1e-12), "randomized σ {a} above the true {b}");
    }
    assert!(rel < 0.02, "max relative σ error {rel}");
    // (c) The block of triplets k..2k (Spectral block 1) equals the corresponding columns of the
    //     top-2k triplets, and on the matrix of (a) matches the true singular values.
    let w = with_spectrum(150, 100, &s, 9);
    let blk = svd_block(&t64(&w, &[150, 100]), 3, 3, 2, 1).unwrap();
    assert_eq!(blk.k, 3);
    for (a, b) in blk.s.iter().zip(&s[3..6]) {
        assert!(((a - b) / b).abs() < 1e-12);
    }
}

#[test]
fn svds_are_deterministic_across_runs_and_thread_counts() {
    let (m, n) = (160, 120);
    let w = SplitMix::new(4).vec(m * n, -1.0, 1.0);
    let wt = t64(&w, &[m, n]);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| (top_k_svd(&wt, 8, 2, 42).unwrap(), bottom_k_svd(&wt, 5).unwrap()))
    };
    let (t1, b1) = run(1);
    let (t2, b2) = run(2);
    let (t3, b3) = run(2);
    for (a, b) in [(&t1, &t2), (&t2, &t3), (&b1, &b2), (&b2, &b3)] {
        assert_eq!(a.s, b.s);
        assert_eq!(a.u, b.u);
        assert_eq!(a.v, b.v);
    }
    // A different seed gives a (slightly) different randomized result; the exact path ignores it.
    let other = top_k_svd(&wt, 8, 2, 43).unwrap();
    assert_ne!(other.u, t1.u);
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
