//! Criterion benchmarks of the CPU kernels and differentiable ops, at the shapes of one
//! SmolLM2-135M-like layer: hidden 576, FFN 1536, 9 query heads / 3 kv heads of head_dim 64,
//! vocabulary 49152, N = 256 tokens (batch 1 × 256) unless a benchmark says otherwise.
//!
//! Run with `cargo bench --bench ops` (the whole file takes a few minutes on 2 cores), or a
//! subset with a filter, e.g. `cargo bench --bench ops -- adapter/`.
//!
//! Naming: `<group>/<op>/fwd` times the forward alone (graph recorded where an input is a
//! param, as in training); `<group>/<op>/fwd_bwd` times the forward plus the backward pass
//! through it. The backward is seeded with a precomputed all-ones ∂L/∂y
//! ([`backward_with_seed`]), which equals `backward(&sum(&y))` without timing the reduction and
//! its seed broadcast: the figures are the op's own cost plus the tape engine.
//!
//! Groups with a `Throughput::Elements` report "elem/s" where one element is one FLOP (see
//! [`flops`]), so criterion's `Melem/s` / `Gelem/s` read as MFLOP/s / GFLOP/s.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput};
use half::bf16;
use spectune::autograd::backward_with_seed;
use spectune::backend::cpu;
use spectune::ops::{self, AttnOptions, CeOptions, Rope, SpecRows};
use spectune::storage::HostData;
use spectune::{DType, Tensor};

// SmolLM2-135M-like dimensions.
const HIDDEN: usize = 576;
const FFN: usize = 1536;
const N_HEADS: usize = 9;
const N_KV: usize = 3;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 49152;
const TOKENS: usize = 256;
const RANK: usize = 16;
const SPEC_K: usize = 200;
const ROPE_THETA: f64 = 100_000.0;

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// A deterministic xorshift64* generator: benchmark data must not depend on an extra crate.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A constant f32 tensor of uniform values in [-scale, scale).
fn rand_tensor(rng: &mut Rng, dims: &[usize], scale: f32) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.vec(n, scale), dims).expect("shape matches data")
}

/// As [`rand_tensor`], as a trainable leaf (so the ops record a graph).
fn rand_param(rng: &mut Rng, dims: &[usize], scale: f32) -> Tensor {
    rand_tensor(rng, dims, scale).param().expect("f32 host tensor is trainable")
}

/// The same values as `t`, stored as bf16 (a frozen weight as found in a checkpoint).
fn to_bf16(t: &Tensor) -> Tensor {
    let data = t.to_vec_f32().into_iter().map(bf16::from_f32).collect();
    Tensor::from_host(HostData::BF16(data), t.dims()).expect("shape matches data")
}

/// ∂L/∂y = 1 for an output of `y`'s shape and dtype (f32).
fn ones_like(y: &Tensor) -> Tensor {
    Tensor::full(1.0f32, y.dims())
}

/// Runs the backward pass from `y` seeded with `seed` (∂L/∂y) and keeps the gradients alive
/// until measured.
fn run_backward(y: &Tensor, seed: &Tensor) {
    let grads = backward_with_seed(y, seed.clone()).expect("backward");
    assert!(!grads.is_empty(), "no gradient reached a param");
    black_box(grads);
}

/// Floating-point operations of an [m×k]·[k×n] product. Reported through
/// `Throughput::Elements`, where one "element" stands for one FLOP.
fn flops(m: usize, k: usize, n: usize) -> Throughput {
    Throughput::Elements(2 * (m * k * n) as u64)
}

/// The shared settings: short runs so the whole file finishes in a few minutes.
fn config() -> Criterion {
    Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2))
}

/// Benchmarks `f` as `<group>/<name>/fwd` and `f` followed by its backward as `.../fwd_bwd`.
/// `f` must return an output that depends on a param; the seed is built once, outside the timing.
fn fwd_and_bwd(g: &mut Group<'_>, name: &str, f: impl Fn() -> Tensor) {
    let seed = ones_like(&f());
    g.bench_function(format!("{name}/fwd"), |b| b.iter(|| black_box(f())));
    g.bench_function(format!("{name}/fwd_bwd"), |b| {
        b.iter(|| {
            let y = f();
            run_backward(&y, &seed);
        })
    });
}

// ---------------------------------------------------------------------------------------------
// matmul
// ---------------------------------------------------------------------------------------------

fn bench_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    let mut rng = Rng::new(1);

    // Raw kernel: C = A·B, square.
    for &s in &[512usize, 1024] {
        let (a, b) = (rng.vec(s * s, 1.0), rng.vec(s * s, 1.0));
        let mut out = vec![0.0f32; s * s];
        g.throughput(flops(s, s, s));
        g.bench_function(format!("gemm_f32/{s}x{s}x{s}"), |bch| {
            bch.iter(|| {
                cpu::gemm(&mut out, black_box(&a), black_box(&b), s, s, s, false, false, 1.0, 0.0);
                black_box(&out);
            })
        });
    }

    // The linear shape: y[N, FFN] = x[N, HIDDEN] · W[FFN, HIDDEN]ᵀ.
    let (m, k, n) = (TOKENS, HIDDEN, FFN);
    let x = rand_tensor(&mut rng, &[m, k], 1.0);
    let w = rand_tensor(&mut rng, &[n, k], 0.05);
    let w_bf16 = to_bf16(&w);
    g.throughput(flops(m, k, n));
    {
        let (xv, wv) = (x.to_vec_f32(), w.to_vec_f32());
        let mut out = vec![0.0f32; m * n];
        g.bench_function(format!("gemm_f32/linear_{m}x{k}x{n}"), |bch| {
            bch.iter(|| {
                cpu::gemm(&mut out, black_box(&xv), black_box(&wv), m, k, n, false, true, 1.0, 0.0);
                black_box(&out);
            })
        });
    }
    // The op (allocates C; W used in place when f32, converted a tile at a time when bf16).
    g.bench_function(format!("op_f32_weight/linear_{m}x{k}x{n}"), |bch| bch.iter(|| black_box(ops::matmul(&x, &w, false, true).unwrap())));
    g.bench_function(format!("op_bf16_weight/linear_{m}x{k}x{n}"), |bch| bch.iter(|| black_box(ops::matmul(&x, &w_bf16, false, true).unwrap())));
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// stored weights: the frozen-weight GEMM with each storage dtype as the right operand
// ---------------------------------------------------------------------------------------------

/// Storage dtypes of the `stored_weight` group (f32 first: the baseline the others are
/// fractions of).
const STORED: [DType; 15] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q2K,
    DType::Q3K,
    DType::Q4K,
    DType::Q5K,
    DType::Q6K,
    DType::IQ4NL,
    DType::IQ4XS,
];

/// A mapped (anonymous memory map) frozen matrix [rows, cols] of `dtype`: random values for
/// the float dtypes; for the block dtypes random bytes with every f16 scale set to a typical
/// weight scale, so each block is valid.
fn stored_matrix(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> Tensor {
    let n = rows * cols;
    let bytes: Vec<u8> = match dtype {
        DType::F32 => rng.vec(n, 0.05).iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => rng.vec(n, 0.05).iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        DType::F16 => rng.vec(n, 0.05).iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        _ => {
            let size = dtype.storage_bytes(n).expect("whole blocks");
            let mut b: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
            for blk in b.chunks_exact_mut(dtype.size()) {
                for &o in dtype.scale_offsets() {
                    blk[o..o + 2].copy_from_slice(&half::f16::from_f32(0.004).to_le_bytes());
                }
            }
            b
        }
    };
    let mut map = memmap2::MmapOptions::new().len(bytes.len()).map_anon().expect("anonymous map");
    map.copy_from_slice(&bytes);
    let map = std::sync::Arc::new(map.make_read_only().expect("read-only map"));
    Tensor::from_mmap(map, 0, dtype, [rows, cols], dtype.name()).expect("valid stored matrix")
}

/// Qwen2.5-0.5B's down projection (the K-quant matrices of a Q4_K_M file): W [896, 4864],
/// N = 256 tokens. `fwd`: y[N, 896] = x[N, 4864]·Wᵀ; `dx`: dX[N, 4864] = dY[N, 896]·W (the
/// backward's product through the frozen weight). W is converted a tile at a time.
fn bench_stored_weight(c: &mut Criterion) {
    let mut g = c.benchmark_group("stored_weight");
    let mut rng = Rng::new(7);
    let (m, out_f, in_f) = (TOKENS, 896, 4864);
    let x = rand_tensor(&mut rng, &[m, in_f], 1.0);
    let dy = rand_tensor(&mut rng, &[m, out_f], 1.0);
    g.throughput(flops(m, in_f, out_f));
    for dtype in STORED {
        let w = stored_matrix(&mut rng, dtype, out_f, in_f);
        g.bench_function(format!("{dtype}/fwd_{m}x{in_f}x{out_f}"), |b| b.iter(|| black_box(ops::matmul(&x, &w, false, true).unwrap())));
        g.bench_function(format!("{dtype}/dx_{m}x{out_f}x{in_f}"), |b| b.iter(|| black_box(ops::matmul(&dy, &w, false, false).unwrap())));
    }
    g.finish();
    // The conversion alone: the whole matrix decoded to f32 on one thread (elem/s = weights/s).
    let mut g = c.benchmark_group("stored_decode");
    g.throughput(Throughput::Elements((out_f * in_f) as u64));
    let mut buf = vec![0f32; out_f * in_f];
    for dtype in STORED {
        let w = stored_matrix(&mut rng, dtype, out_f, in_f);
        g.bench_function(format!("{dtype}/{out_f}x{in_f}"), |b| {
            b.iter(|| {
                w.read().read_into(0, &mut buf);
                black_box(&buf);
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// elementwise
// ---------------------------------------------------------------------------------------------

fn bench_elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    let mut rng = Rng::new(2);

    // Residual add on [N, HIDDEN]; both operands trainable-path activations.
    let (a, b) = (rand_param(&mut rng, &[TOKENS, HIDDEN], 1.0), rand_param(&mut rng, &[TOKENS, HIDDEN], 1.0));
    fwd_and_bwd(&mut g, &format!("add/{TOKENS}x{HIDDEN}"), || ops::add(&a, &b).unwrap());

    // The MLP's gate/up shapes [N, FFN].
    let (gate, up) = (rand_param(&mut rng, &[TOKENS, FFN], 2.0), rand_param(&mut rng, &[TOKENS, FFN], 2.0));
    fwd_and_bwd(&mut g, &format!("mul/{TOKENS}x{FFN}"), || ops::mul(&gate, &up).unwrap());
    fwd_and_bwd(&mut g, &format!("silu/{TOKENS}x{FFN}"), || ops::silu(&gate).unwrap());
    fwd_and_bwd(&mut g, &format!("swiglu/{TOKENS}x{FFN}"), || ops::swiglu(&gate, &up).unwrap());
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// norm
// ---------------------------------------------------------------------------------------------

fn bench_norm(c: &mut Criterion) {
    let mut g = c.benchmark_group("norm");
    let mut rng = Rng::new(3);
    let x = rand_param(&mut rng, &[TOKENS, HIDDEN], 1.0);
    // The norm weight is frozen, as in LoRA fine-tuning.
    let w = Tensor::from_vec(rng.vec(HIDDEN, 0.1).into_iter().map(|v| 1.0 + v).collect::<Vec<_>>(), [HIDDEN]).unwrap();
    fwd_and_bwd(&mut g, &format!("rms_norm/{TOKENS}x{HIDDEN}"), || ops::rms_norm(&x, &w, 1e-5).unwrap());
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// rope
// ---------------------------------------------------------------------------------------------

fn bench_rope(c: &mut Criterion) {
    let mut g = c.benchmark_group("rope");
    let mut rng = Rng::new(4);
    let table = Rope::new(HEAD_DIM, ROPE_THETA).unwrap();
    let pos: Vec<usize> = (0..TOKENS).collect();
    // The query projection: [b=1, t, N_HEADS, HEAD_DIM].
    let q = rand_param(&mut rng, &[1, TOKENS, N_HEADS, HEAD_DIM], 1.0);
    fwd_and_bwd(&mut g, &format!("q/1x{TOKENS}x{N_HEADS}x{HEAD_DIM}"), || ops::rope(&q, &table, &pos).unwrap());
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sampling_mode(SamplingMode::Flat);
    let mut rng = Rng::new(5);
    let q = rand_param(&mut rng, &[1, TOKENS, N_HEADS, HEAD_DIM], 1.0);
    let k = rand_param(&mut rng, &[1, TOKENS, N_KV, HEAD_DIM], 1.0);
    let v = rand_param(&mut rng, &[1, TOKENS, N_KV, HEAD_DIM], 1.0);
    let opts = AttnOptions { causal: true, ..Default::default() };
    fwd_and_bwd(&mut g, &format!("causal_gqa/b1_t{TOKENS}_h{N_HEADS}_kv{N_KV}_d{HEAD_DIM}"), || ops::attention(&q, &k, &v, &opts).unwrap());
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// loss
// ---------------------------------------------------------------------------------------------

fn bench_loss(c: &mut Criterion) {
    let mut g = c.benchmark_group("loss");
    g.sampling_mode(SamplingMode::Flat);
    let mut rng = Rng::new(6);
    let targets: Vec<i64> = (0..TOKENS).map(|_| rng.below(VOCAB) as i64).collect();
    let opts = CeOptions::default();

    // Materialized logits [N, VOCAB].
    let logits = rand_param(&mut rng, &[TOKENS, VOCAB], 4.0);
    fwd_and_bwd(&mut g, &format!("cross_entropy/{TOKENS}x{VOCAB}"), || ops::cross_entropy(&logits, &targets, &opts).unwrap());
    drop(logits);

    // Fused LM head + CE: h [N, HIDDEN] trainable path, W [VOCAB, HIDDEN] frozen (tied embedding).
    let h = rand_param(&mut rng, &[TOKENS, HIDDEN], 1.0);
    let w = rand_tensor(&mut rng, &[VOCAB, HIDDEN], 0.05);
    // (No Throughput here: the backward recomputes the logits, so fwd_bwd is ~3× the fwd FLOPs
    // of 2·N·HIDDEN·VOCAB; a throughput set on the group would apply to both.) One iteration
    // takes ~0.2–1 s on 2 cores, so 10 flat samples need more than the default 2 s.
    g.measurement_time(Duration::from_secs(10));
    fwd_and_bwd(&mut g, &format!("linear_cross_entropy/{TOKENS}x{HIDDEN}_w{VOCAB}"), || ops::linear_cross_entropy(&h, &w, &targets, &opts).unwrap());
    // The same head stored as bf16 (forward only: the conversion cost per chunk).
    let w_bf16 = to_bf16(&w);
    drop(w);
    g.bench_function(format!("linear_cross_entropy_bf16_weight/{TOKENS}x{HIDDEN}_w{VOCAB}/fwd"), |b| {
        b.iter(|| black_box(ops::linear_cross_entropy(&h, &w_bf16, &targets, &opts).unwrap()))
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// embedding
// ---------------------------------------------------------------------------------------------

fn bench_embedding(c: &mut Criterion) {
    let mut g = c.benchmark_group("embedding");
    let mut rng = Rng::new(7);
    let ids: Vec<u32> = (0..TOKENS).map(|_| rng.below(VOCAB) as u32).collect();
    let table = rand_tensor(&mut rng, &[VOCAB, HIDDEN], 0.05);
    let table_bf16 = to_bf16(&table);

    // Frozen tables: no graph, forward only.
    g.bench_function(format!("frozen_f32/{TOKENS}_of_{VOCAB}x{HIDDEN}/fwd"), |b| b.iter(|| black_box(ops::embedding(&table, &ids, DType::F32).unwrap())));
    g.bench_function(format!("frozen_bf16/{TOKENS}_of_{VOCAB}x{HIDDEN}/fwd"), |b| b.iter(|| black_box(ops::embedding(&table_bf16, &ids, DType::F32).unwrap())));

    // A trainable table (full fine-tuning): the backward builds a dense [VOCAB, HIDDEN] gradient.
    let table = table.param().unwrap();
    g.sampling_mode(SamplingMode::Flat);
    fwd_and_bwd(&mut g, &format!("trainable_f32/{TOKENS}_of_{VOCAB}x{HIDDEN}"), || ops::embedding(&table, &ids, DType::F32).unwrap());
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// adapter
// ---------------------------------------------------------------------------------------------

fn bench_adapter(c: &mut Criterion) {
    let mut g = c.benchmark_group("adapter");
    let mut rng = Rng::new(8);
    let (n, m) = (HIDDEN, FFN);
    // x is a param in all three variants, so every backward computes dX (as in any layer but the
    // first); W [FFN, HIDDEN] is frozen f32.
    let x = rand_param(&mut rng, &[TOKENS, n], 1.0);
    let w = rand_tensor(&mut rng, &[m, n], 0.05);
    let a = rand_param(&mut rng, &[RANK, n], 0.05);
    let b = rand_param(&mut rng, &[m, RANK], 0.05);
    let d = Tensor::from_vec(rng.vec(SPEC_K, 0.1).into_iter().map(|v| 1.0 + v).collect::<Vec<_>>(), [SPEC_K]).unwrap().param().unwrap();
    let rows = SpecRows::Top(SPEC_K);
    let scale = 2.0;

    let shape = format!("{TOKENS}x{n}_w{m}x{n}");
    fwd_and_bwd(&mut g, &format!("frozen_linear/{shape}"), || ops::linear(&x, &w).unwrap());
    fwd_and_bwd(&mut g, &format!("lora_linear/{shape}_r{RANK}"), || ops::lora_linear(&x, &w, &a, &b, scale).unwrap());
    fwd_and_bwd(&mut g, &format!("speclora_linear/{shape}_r{RANK}_k{SPEC_K}"), || ops::speclora_linear(&x, &w, &d, &rows, &a, &b, scale).unwrap());
    g.finish();
}

/// The frozen-weight GEMM at each `--matmul-precision` (AMX bf16 tiles below `highest`, where
/// the CPU has them; elsewhere every level is the f32 path): the same W [896, 4864] and N as
/// `stored_weight`, for f32 and the types of a Q4_K_M file. `fwd` is `ops::linear` (a weight
/// without gradient is frozen); `fwd_dx` adds the backward's dX = dY·W.
fn bench_matmul_precision(c: &mut Criterion) {
    use spectune::backend::amx::{self, MatmulPrecision};
    let mut g = c.benchmark_group("matmul_precision");
    let mut rng = Rng::new(9);
    let (m, out_f, in_f) = (TOKENS, 896, 4864);
    let x = rand_tensor(&mut rng, &[m, in_f], 1.0);
    let dy = rand_tensor(&mut rng, &[m, out_f], 1.0);
    g.throughput(flops(m, in_f, out_f));
    for dtype in [DType::F32, DType::Q8_0, DType::Q5_0, DType::Q4K, DType::Q6K] {
        let w = stored_matrix(&mut rng, dtype, out_f, in_f);
        for p in [MatmulPrecision::Highest, MatmulPrecision::High, MatmulPrecision::Medium] {
            amx::set_matmul_precision(p);
            g.bench_function(format!("{dtype}/{p}/fwd_{m}x{in_f}x{out_f}"), |b| b.iter(|| black_box(ops::linear(&x, &w).unwrap())));
            g.bench_function(format!("{dtype}/{p}/fwd_dx_{m}x{in_f}x{out_f}"), |b| {
                b.iter(|| {
                    let xp = x.detach().param().unwrap();
                    let y = ops::linear(&xp, &w).unwrap();
                    black_box(backward_with_seed(&y, dy.clone()).unwrap())
                })
            });
        }
    }
    amx::set_matmul_precision(MatmulPrecision::Highest);
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_matmul, bench_stored_weight, bench_matmul_precision, bench_elementwise, bench_norm, bench_rope, bench_attention, bench_loss, bench_embedding, bench_adapter
}
criterion_main!(benches);
