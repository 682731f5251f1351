//! The adapter ops never allocate an m×n gradient (or any m×n buffer) for the frozen weight.
//! A counting global allocator records the largest single allocation and the peak of live
//! bytes (above the starting point) during backward. One test in this
//! binary, so no other test's allocations interfere.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};

use half::bf16;
use spectune::gradcheck::SplitMix;
use spectune::ops::{self, SpecRows};
use spectune::storage::HostData;
use spectune::{backward, Tensor};

struct Counting;
static ON: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
            let live = LIVE.fetch_add(l.size() as isize, Ordering::Relaxed) + l.size() as isize;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if ON.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        }
        System.dealloc(p, l)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// (largest single allocation, peak live bytes above the start) while `f` runs.
fn measure(f: impl FnOnce()) -> (usize, isize) {
    LARGEST.store(0, Ordering::SeqCst);
    LIVE.store(0, Ordering::SeqCst);
    PEAK.store(0, Ordering::SeqCst);
    ON.store(true, Ordering::SeqCst);
    f();
    ON.store(false, Ordering::SeqCst);
    (LARGEST.load(Ordering::SeqCst), PEAK.load(Ordering::SeqCst))
}

#[test]
fn adapter_backward_allocates_no_dense_weight_gradient() {
    // 8 Mi weights: a bf16 W is converted one tile (1 Mi elements) at a time, 1/8 of dense.
    let (m, n, r, rows) = (4096usize, 2048usize, 8usize, 4usize);
    let mut rng = SplitMix::new(1);
    let wv: Vec<f32> = rng.vec(m * n, -0.05, 0.05).into_iter().map(|v| v as f32).collect();
    let w32 = Tensor::from_vec(wv.clone(), [m, n]).unwrap();
    let w16 = Tensor::from_host(HostData::BF16(wv.iter().map(|&v| bf16::from_f32(v)).collect()), [m, n]).unwrap();
    let dense_bytes = m * n * 4;
    for (name, w) in [("f32", &w32), ("bf16", &w16)] {
        for spec in [false, true] {
            let x = Tensor::from_vec(rng.vec(rows * n, -1.0, 1.0).into_iter().map(|v| v as f32).collect::<Vec<_>>(), [rows, n]).unwrap().param().unwrap();
            let a = Tensor::from_vec(rng.vec(r * n, -0.1, 0.1).into_iter().map(|v| v as f32).collect::<Vec<_>>(), [r, n]).unwrap().param().unwrap();
            let b = Tensor::from_vec(rng.vec(m * r, -0.1, 0.1).into_iter().map(|v| v as f32).collect::<Vec<_>>(), [m, r]).unwrap().param().unwrap();
            let d = Tensor::full(1.5f32, [200]).param().unwrap();
            let y = if spec { ops::speclora_linear(&x, w, &d, &SpecRows::Top(200), &a, &b, 2.0) } else { ops::lora_linear(&x, w, &a, &b, 2.0) }.unwrap();
            let loss = ops::sum(&y).unwrap();
            let mut grads = None;
            let (largest, peak) = measure(|| grads = Some(backward(&loss).unwrap()));
            let g = grads.unwrap();
            eprintln!("{name} spec={spec}: largest allocation {largest} B, peak live {peak} B during backward (dense W: {dense_bytes} B)");
            assert!(largest < dense_bytes / 4, "{name} spec={spec}: backward allocated a {largest}-byte buffer (dense W is {dense_bytes})");
            assert!(peak < dense_bytes as isize / 4, "{name} spec={spec}: backward held {peak} bytes at its peak (dense W is {dense_bytes})");
            assert!(g.get(w).is_none(), "the frozen weight must have no gradient entry");
            assert!(g.get(&x).is_some() && g.get(&a).is_some() && g.get(&b).is_some());
            assert_eq!(g.get(&d).is_some(), spec);
        }
        // The spectral and baseline method ops: Spectral^A, Spectral^R (through Cayley), DoRA, the PiSSA residual.
        let f32t = |rng: &mut SplitMix, dims: &[usize], lo: f64, hi: f64| {
            Tensor::from_vec(rng.vec(dims.iter().product(), lo, hi).into_iter().map(|v| v as f32).collect::<Vec<_>>(), dims.to_vec()).unwrap()
        };
        let x = f32t(&mut rng, &[rows, n], -1.0, 1.0).param().unwrap();
        let (u, sigma, v) = (f32t(&mut rng, &[m, r], -0.1, 0.1), f32t(&mut rng, &[r], 1.0, 2.0), f32t(&mut rng, &[n, r], -0.1, 0.1));
        let (du, dv) = (f32t(&mut rng, &[m, r], -0.1, 0.1).param().unwrap(), f32t(&mut rng, &[n, r], -0.1, 0.1).param().unwrap());
        let (qu, qv, c) = (
            f32t(&mut rng, &[r, r], -0.1, 0.1).param().unwrap(),
            f32t(&mut rng, &[r, r], -0.1, 0.1).param().unwrap(),
            f32t(&mut rng, &[r], 0.9, 1.1).param().unwrap(),
        );
        let (a, b) = (f32t(&mut rng, &[r, n], -0.1, 0.1).param().unwrap(), f32t(&mut rng, &[m, r], -0.1, 0.1).param().unwrap());
        let (a0, b0) = (f32t(&mut rng, &[r, n], -0.1, 0.1), f32t(&mut rng, &[m, r], -0.1, 0.1));
        let (mag, nu) = (f32t(&mut rng, &[m], 0.5, 1.5).param().unwrap(), f32t(&mut rng, &[m], 0.5, 1.5));
        let ys: [(&str, Tensor); 4] = [
            ("spectral_a", ops::spectral_a_linear(&x, w, &u, &sigma, &v, &du, &dv).unwrap()),
            ("spectral_r", ops::spectral_r_linear(&x, w, &u, &sigma, &v, &ops::cayley(&qu).unwrap(), &ops::cayley(&qv).unwrap(), &c).unwrap()),
            ("dora", ops::dora_linear(&x, w, &nu, &a, &b, &mag, 2.0, None).unwrap()),
            ("pissa", ops::pissa_linear(&x, w, &a, &b, &a0, &b0, 2.0).unwrap()),
        ];
        for (op, y) in ys {
            let loss = ops::sum(&y).unwrap();
            drop(y);
            let mut grads = None;
            let (largest, peak) = measure(|| grads = Some(backward(&loss).unwrap()));
            eprintln!("{name} {op}: largest allocation {largest} B, peak live {peak} B during backward (dense W: {dense_bytes} B)");
            assert!(largest < dense_bytes / 4 && peak < dense_bytes as isize / 4, "{name} {op}: {largest} / {peak} bytes");
            let g = grads.unwrap();
            assert!(g.get(w).is_none() && g.get(&x).is_some());
        }
    }
}
