//! The kernel interface: [`Kernels`], implemented once per device, and [`kernels`], the one place
//! that decides CPU or CUDA (ops ask through `tensor::kernels_for`, which checks that every
//! input lives on one device).
//!
//! A kernel works on [`Storage`] buffers with explicit dimensions, in llm.c's argument order:
//! outputs first (`&mut Storage`), then saved buffers, then inputs, then dims. It never records
//! anything for autograd (the op layer in [`crate::ops`] does, once, for every device), never
//! allocates its outputs (the op layer calls [`Kernels::zeros`]), never checks user input (the op
//! layer has validated shapes and dtypes; kernels only return an error for what a device cannot
//! do, e.g. a bf16 left GEMM operand on CUDA), and writes its outputs with `=` unless its doc says
//! it accumulates.
//!
//! - [`host::Cpu`]: the readable reference, generic over [`Float`](crate::Float) (f32 and f64, so
//!   gradient checks run in f64), on the kernels of [`cpu`] and [`cpu_attn`]. Frozen inputs may be
//!   stored in any dtype (bf16, f16, GGUF blocks, mapped files) and are converted per use.
//! - `cuda::Cuda` (feature `cuda`): the launchers of the kernels in `cuda/<family>.cu`, f32
//!   activations and trainables, frozen matrices f32 or bf16.
//!
//! Why a trait object rather than a generic or an enum: the set of kernels is what must be
//! complete on every device, and a trait makes the compiler check exactly that (a kernel
//! missing on one device does not build), while the op layer stays one non-generic function per
//! op. A kernel call is a few microseconds of work at the least, so the virtual call is noise.

pub mod amx;
pub mod cpu;
pub mod cpu_attn;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod vmath;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::storage::Storage;

/// A device buffer (feature `cuda`), held by [`Storage::Cuda`].
#[cfg(feature = "cuda")]
pub use cuda::DeviceBuf;
/// Without the `cuda` feature no device buffer can exist: this type has no values, so
/// [`Storage::Cuda`] is never constructed and its match arms are dead code the compiler drops.
#[cfg(not(feature = "cuda"))]
pub use nodevice::DeviceBuf;

#[cfg(not(feature = "cuda"))]
mod nodevice {
    use crate::dtype::DType;
    use crate::error::Result;

    enum Never {}
    /// A device buffer that cannot exist (built without the `cuda` feature).
    pub struct DeviceBuf(Never);
    impl DeviceBuf {
        pub fn dtype(&self) -> DType {
            match self.0 {}
        }
        pub fn numel(&self) -> usize {
            match self.0 {}
        }
        pub fn ptr(&self) -> u64 {
            match self.0 {}
        }
        pub fn to_f32(&self) -> Result<Vec<f32>> {
            match self.0 {}
        }
    }
    impl std::fmt::Debug for DeviceBuf {
        fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.0 {}
        }
    }
}

/// One GEMM call: C = alpha·op(A)·op(B) + beta·C for every batch, row-major and contiguous.
///
/// op(A) is [m, k] (A stored [m, k], or [k, m] when `ta`); op(B) is [k, n] (B stored [k, n], or
/// [n, k] when `tb`); C is [m, n]. Batch i reads A at `a_off + i·m·k`, B at `b_off + i·k·n` when
/// `b_batched` (else every batch shares B at `b_off`) and writes C at `c_off + i·m·n` (offsets in
/// elements). A and C have the compute dtype; B may be a frozen matrix in any stored dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub ta: bool,
    pub tb: bool,
    pub alpha: f64,
    pub beta: f64,
    pub batch: usize,
    pub b_batched: bool,
    pub a_off: usize,
    pub b_off: usize,
    pub c_off: usize,
    /// B is a frozen weight: the product may run at the process's matmul precision
    /// ([`amx::set_matmul_precision`]); every other product is f32.
    pub frozen: bool,
}

impl Gemm {
    /// C [m, n] = A [m, k] · B [k, n] (alpha 1, beta 0, one batch, no offsets).
    pub fn new(m: usize, k: usize, n: usize) -> Gemm {
        Gemm { m, k, n, ta: false, tb: false, alpha: 1.0, beta: 0.0, batch: 1, b_batched: false, a_off: 0, b_off: 0, c_off: 0, frozen: false }
    }
    /// Sets the transpose flags.
    pub fn trans(self, ta: bool, tb: bool) -> Gemm {
        Gemm { ta, tb, ..self }
    }
    /// Sets alpha and beta.
    pub fn scaled(self, alpha: f64, beta: f64) -> Gemm {
        Gemm { alpha, beta, ..self }
    }
    /// `batch` batches; B batched or shared.
    pub fn batched(self, batch: usize, b_batched: bool) -> Gemm {
        Gemm { batch, b_batched, ..self }
    }
    /// Marks B as a frozen weight (the `frozen` field).
    pub fn frozen(self) -> Gemm {
        Gemm { frozen: true, ..self }
    }
    /// Element offsets of the first A, B and C.
    pub fn offsets(self, a_off: usize, b_off: usize, c_off: usize) -> Gemm {
        Gemm { a_off, b_off, c_off, ..self }
    }
}

pub use cpu::AttnDims;

/// The blocking of [`Kernels::linear_ce_fwd`]: hidden size `d`, `vocab`, the ignored target,
/// and the block sizes each device uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CeBlocks {
    pub d: usize,
    pub vocab: usize,
    pub ignore: i64,
    /// CPU: rows × `cols` logits per online-softmax block.
    pub rows_blk: usize,
    pub cols: usize,
    /// CUDA: rows per chunk of full-vocabulary logits.
    pub chunk: usize,
    /// Soft cap c of the logits (Gemma 2's final_logit_softcapping): z = c·tanh(l/c).
    pub softcap: Option<f64>,
}

/// The activation of a gated MLP, y = act(gate) ⊙ up: SwiGLU (Llama, Mistral, Qwen, Phi-3) or
/// GeGLU with the tanh GELU (Gemma).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatedAct {
    /// silu(g) = g·σ(g).
    Silu,
    /// gelu_tanh(g) = ½g(1 + tanh(√(2/π)(g + 0.044715g³))).
    GeluTanh,
}

impl GatedAct {
    /// The gate's name as the ops use it: "swiglu" or "geglu".
    pub fn gate_name(self) -> &'static str {
        match self {
            GatedAct::Silu => "swiglu",
            GatedAct::GeluTanh => "geglu",
        }
    }
}

/// AdamW's hyper-parameters for one update (decoupled weight decay; `step` = t ≥ 1 of the
/// parameter's bias corrections).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

/// Every kernel the op layer, autograd and the optimizer need, for one device.
///
/// Sections follow the kernel families of `cuda/<family>.cu`. Arguments are storages with
/// explicit dimensions (the op layer's validated shapes); `op` names the calling op in errors.
pub trait Kernels: Sync {
    /// The device whose buffers this implementation reads and writes.
    fn device(&self) -> Device;

    // --- memory -------------------------------------------------------------------------------

    /// A buffer of `n` zeros of compute dtype `dtype` on this device.
    fn zeros(&self, dtype: DType, n: usize, op: &'static str) -> Result<Storage>;
    /// A copy of `src` (any storage on any device) on this device, converted to `dtype`. Mapped
    /// and block-quantized sources are converted a tile at a time, never copied whole first.
    fn upload(&self, src: &Storage, dtype: DType, op: &'static str) -> Result<Storage>;

    // --- elementwise --------------------------------------------------------------------------

    /// y = a + b, where b repeats over a's leading elements (`a.len()` is a multiple of
    /// `b.len()`: a bias row, or a gradient of the same shape).
    fn add(&self, y: &mut Storage, a: &Storage, b: &Storage, op: &'static str) -> Result<()>;
    /// acc += g (same length), accumulating in place.
    fn add_assign(&self, acc: &mut Storage, g: &Storage, op: &'static str) -> Result<()>;
    /// x ← s·x in place.
    fn scale_assign(&self, x: &mut Storage, s: f64, op: &'static str) -> Result<()>;
    /// y = a ⊙ b, b repeating over a's leading elements as in [`Kernels::add`].
    fn mul(&self, y: &mut Storage, a: &Storage, b: &Storage, op: &'static str) -> Result<()>;
    /// db = Σ_r dy[r, :] (⊙ a[r, :] when `a` is given) over the rows of dy viewed as
    /// [dy.len() / db.len(), db.len()]: the gradient of an operand broadcast by add or mul.
    fn sum_leading(&self, db: &mut Storage, dy: &Storage, a: Option<&Storage>, op: &'static str) -> Result<()>;
    /// y = s·x.
    fn scale(&self, y: &mut Storage, x: &Storage, s: f64, op: &'static str) -> Result<()>;
    /// `y[i] = v` for every i (v rounded to y's dtype).
    fn fill(&self, y: &mut Storage, v: f64, op: &'static str) -> Result<()>;
    /// y [batch, cols, rows] = xᵀ per batch, x [batch, rows, cols].
    fn transpose(&self, y: &mut Storage, x: &Storage, batch: usize, rows: usize, cols: usize, op: &'static str) -> Result<()>;
    /// y = silu(x) = x·σ(x).
    fn silu_fwd(&self, y: &mut Storage, x: &Storage) -> Result<()>;
    /// dx = dy·silu'(x) = dy·σ(x)·(1 + x·(1 − σ(x))).
    fn silu_bwd(&self, dx: &mut Storage, dy: &Storage, x: &Storage) -> Result<()>;
    /// y = silu(g) ⊙ u.
    fn swiglu_fwd(&self, y: &mut Storage, g: &Storage, u: &Storage) -> Result<()>;
    /// dg = dy ⊙ u ⊙ silu'(g);  du = dy ⊙ silu(g). Either output may be absent.
    fn swiglu_bwd(&self, dg: Option<&mut Storage>, du: Option<&mut Storage>, dy: &Storage, g: &Storage, u: &Storage) -> Result<()>;
    /// y = gelu_tanh(x) = ½x(1 + tanh(c(x + 0.044715x³))), c = √(2/π).
    fn gelu_tanh_fwd(&self, y: &mut Storage, x: &Storage) -> Result<()>;
    /// dx = dy·gelu_tanh'(x), with τ = tanh(c(x + 0.044715x³)):
    ///   gelu_tanh'(x) = ½(1 + τ) + ½x(1 − τ²)·c(1 + 3·0.044715x²).
    fn gelu_tanh_bwd(&self, dx: &mut Storage, dy: &Storage, x: &Storage) -> Result<()>;
    /// y = gelu_tanh(g) ⊙ u (GeGLU, Gemma's MLP gate).
    fn geglu_fwd(&self, y: &mut Storage, g: &Storage, u: &Storage) -> Result<()>;
    /// Strided column copy: `dst[r·dst_ld + dst_off + c] = src[r·src_ld + src_off + c]` for
    /// r < rows, c < cols; other elements of dst are left as they are. The forward of
    /// `split_last` (a column range of x into a part) and its backward (a part's gradient into
    /// its column range of dx).
    #[allow(clippy::too_many_arguments)]
    fn copy_cols(
        &self,
        dst: &mut Storage,
        dst_ld: usize,
        dst_off: usize,
        src: &Storage,
        src_ld: usize,
        src_off: usize,
        rows: usize,
        cols: usize,
        op: &'static str,
    ) -> Result<()>;
    /// y = cap·tanh(x/cap) (soft-capping).
    fn softcap_fwd(&self, y: &mut Storage, x: &Storage, cap: f64) -> Result<()>;
    /// dx = dy ⊙ (1 − (y/cap)²) from the output y = cap·tanh(x/cap): d/dx = 1 − tanh²(x/cap).
    fn softcap_bwd(&self, dx: &mut Storage, dy: &Storage, y: &Storage, cap: f64) -> Result<()>;
    /// dg = dy ⊙ u ⊙ gelu_tanh'(g);  du = dy ⊙ gelu_tanh(g). Either output may be absent.
    fn geglu_bwd(&self, dg: Option<&mut Storage>, du: Option<&mut Storage>, dy: &Storage, g: &Storage, u: &Storage) -> Result<()>;

    // --- reductions ---------------------------------------------------------------------------

    /// Σ x² accumulated in f64.
    fn sum_squares(&self, x: &Storage, op: &'static str) -> Result<f64>;
    /// True when no element is NaN or ±∞.
    fn all_finite(&self, x: &Storage, op: &'static str) -> Result<bool>;
    /// `y[0] = factor·Σ x` (accumulated in f64; y holds one element).
    fn sum(&self, y: &mut Storage, x: &Storage, factor: f64, op: &'static str) -> Result<()>;

    // --- matmul -------------------------------------------------------------------------------

    /// C = alpha·op(A)·op(B) + beta·C as described by `g` (see [`Gemm`]).
    fn gemm(&self, c: &mut Storage, a: &Storage, b: &Storage, g: &Gemm, op: &'static str) -> Result<()>;

    // --- norm ---------------------------------------------------------------------------------

    /// RMSNorm over rows of `c`: y = x·r ⊙ w, rstd = r = (mean(x²) + eps)^(−½) per row.
    fn rms_norm_fwd(&self, y: &mut Storage, rstd: &mut Storage, x: &Storage, w: &Storage, c: usize, eps: f64) -> Result<()>;
    /// With g = dy ⊙ w, x̂ = x·r: dx = r·(g − x̂·mean(g ⊙ x̂)); dw = Σ_rows dy ⊙ x̂ (written, not
    /// accumulated). Either output may be absent.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_bwd(&self, dx: Option<&mut Storage>, dw: Option<&mut Storage>, dy: &Storage, x: &Storage, w: &Storage, rstd: &Storage, c: usize) -> Result<()>;
    /// dx as [`Kernels::rms_norm_bwd`] from the output y instead of x (x̂ = y / w, so g ⊙ x̂ =
    /// dy ⊙ y): used when w is frozen with no zero entry, so x itself need not be kept.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_bwd_from_y(&self, dx: &mut Storage, dy: &Storage, y: &Storage, w: &Storage, rstd: &Storage, c: usize) -> Result<()>;

    // --- rope ---------------------------------------------------------------------------------

    /// Rotate-half RoPE of x [rows, h, hd] (rows = b·t, one position each in `pos`) over the
    /// first rot = 2·inv_freq.len() ≤ hd dims of each head, angle θ = `pos·inv_freq[i]` for the
    /// pair (i, i + rot/2), cos and sin scaled by s = `scale`:
    ///   `y[i] = s·(x[i]·cos θ − x[i+rot/2]·sin θ)`;  `y[i+rot/2] = s·(x[i+rot/2]·cos θ + x[i]·sin θ)`;
    ///   `y[j] = x[j]` for rot ≤ j < hd (partial rotary: passed through, unscaled).
    /// `inverse` applies s·R(−θ) instead: the backward, dx = (s·R(θ))ᵀ·dy = s·R(−θ)·dy.
    #[allow(clippy::too_many_arguments)]
    fn rope(&self, y: &mut Storage, x: &Storage, pos: &[usize], inv_freq: &[f64], h: usize, hd: usize, scale: f64, inverse: bool) -> Result<()>;

    // --- attention ----------------------------------------------------------------------------

    /// o [b, t, nh, hd] = softmax(S + masks)·V per head, S = cap·tanh(scale·QKᵀ / cap) with a
    /// soft cap (else S = scale·QKᵀ); lse [b, t, nh] = logsumexp of the masked row of S (−∞, and
    /// o = 0, for a query that sees no key). `mask` [b·s]: true = real key. See [`AttnDims`].
    #[allow(clippy::too_many_arguments)]
    fn attn_fwd(&self, o: &mut Storage, lse: &mut Storage, q: &Storage, k: &Storage, v: &Storage, mask: Option<&[bool]>, d: &AttnDims) -> Result<()>;
    /// Recomputes P = exp(S − lse); D = rowsum(dO ⊙ O); dV = Pᵀ·dO; dS = P ⊙ (dO·Vᵀ − D), times
    /// 1 − (S/cap)² under a soft cap (d/dz cap·tanh(z/cap) = 1 − tanh²(z/cap)); dQ = scale·dS·K;
    /// dK = scale·dSᵀ·Q (summed over the query heads of a kv head). Absent outputs are skipped.
    #[allow(clippy::too_many_arguments)]
    fn attn_bwd(
        &self,
        dq: Option<&mut Storage>,
        dk: Option<&mut Storage>,
        dv: Option<&mut Storage>,
        dout: &Storage,
        q: &Storage,
        k: &Storage,
        v: &Storage,
        o: &Storage,
        lse: &Storage,
        mask: Option<&[bool]>,
        d: &AttnDims,
    ) -> Result<()>;

    // --- loss ---------------------------------------------------------------------------------

    /// Per row r of x [targets.len(), vocab]: lse_r = log Σ_j exp(x_rj) (written); returns
    /// Σ_r (lse_r − x_r,target_r) over rows whose target is not `ignore`.
    fn ce_fwd(&self, lse: &mut Storage, x: &Storage, targets: &[i64], ignore: i64, vocab: usize) -> Result<f64>;
    /// In place over the first targets.len() rows of x [.., vocab]:
    ///   x_rj ← g·(exp(x_rj − lse_(lse_off + r)) − [j = target_r]), 0 on ignored rows
    /// (the softmax cross-entropy gradient, g = dy / denominator). With a soft cap c, x holds the
    /// raw logits, the softmax is of z = c·tanh(x/c) (lse of z) and the gradient reaches x
    /// through dz/dx = 1 − (z/c)²: x_rj ← g·(exp(z_rj − lse) − [j = target_r])·(1 − (z_rj/c)²).
    #[allow(clippy::too_many_arguments)]
    fn ce_bwd(&self, x: &mut Storage, lse: &Storage, lse_off: usize, targets: &[i64], ignore: i64, vocab: usize, g: f64, softcap: Option<f64>) -> Result<()>;
    /// The loss of logits h·Wᵀ without storing them (h [N, d], W [vocab, d] in any stored dtype),
    /// each logit soft-capped first (z = c·tanh(l/c)) when `c.softcap` is set:
    /// writes lse `[N]`, returns Σ over counted rows of lse_r − logit_r,target. With `dh`, also
    /// writes dh = g·(softmax − onehot)·W, the gradient for dy = 1 (0 on ignored rows). The CPU
    /// walks `c.rows_blk` rows × `c.cols` columns of logits at a time with an online softmax; CUDA
    /// takes `c.chunk` rows against the whole vocabulary at a time.
    #[allow(clippy::too_many_arguments)]
    fn linear_ce_fwd(&self, lse: &mut Storage, dh: Option<&mut Storage>, h: &Storage, w: &Storage, targets: &[i64], c: &CeBlocks, g: f64) -> Result<f64>;

    // --- embedding ----------------------------------------------------------------------------

    /// `y[i, :] = table[ids[i], :]` (y `[ids.len(), dim]`); the table may be stored in any dtype and
    /// is read a row at a time.
    fn embedding_fwd(&self, y: &mut Storage, table: &Storage, ids: &[u32], dim: usize) -> Result<()>;
    /// `dtable[ids[i], :] += dy[i, :]` (accumulates; dtable zeroed by the caller).
    fn embedding_bwd(&self, dtable: &mut Storage, dy: &Storage, ids: &[u32], dim: usize) -> Result<()>;

    // --- optimizer ----------------------------------------------------------------------------

    /// One AdamW update of p with moments m, v (all of p's dtype) and gradient g:
    ///   m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;
    ///   p −= lr·( m/(1−β1^t) / (√(v/(1−β2^t)) + eps) + wd·p ).
    fn adamw_step(&self, p: &mut Storage, m: &mut Storage, v: &mut Storage, g: &Storage, h: &AdamWStep) -> Result<()>;

    // --- adapter helpers ----------------------------------------------------------------------
    //
    // The pieces of the adapter linears (src/ops/adapter.rs, dora.rs, spectral.rs) that are not
    // GEMMs. Row-major matrices; `rows` is implied by the buffer lengths. Index lists are host
    // slices (k entries; the CUDA side uploads them per call).

    /// LoRA dropout: y = x ⊙ f, f_i = [`dropout_factor`]`(seed, p, i)` ∈ {0, 1/(1 − p)};
    /// with `accumulate`, y += x ⊙ f instead. The same mask on every device (a pure function of
    /// seed and i), so the backward reapplies it: d(x ⊙ f)/dx = f.
    fn dropout_apply(&self, y: &mut Storage, x: &Storage, p: f64, seed: u64, accumulate: bool) -> Result<()>;
    /// SpecLoRA forward on Z [rows, m]: zk[t, j] = Z[t, idx_j] (kept for dd), then
    /// Z[t, idx_j] ← Z[t, idx_j]·d_j (Z·Γᵀ without forming Γ). zk [rows, k], d `[k]`.
    fn gather_scale_cols(&self, z: &mut Storage, zk: &mut Storage, d: &Storage, idx: &[u32], m: usize) -> Result<()>;
    /// out[t, j] = z[t, idx_j]·(d_j − shift), z [rows, m], out [rows, k] (SpecLoRA's backward
    /// takes dY[:, idx] ⊙ (d − 1) for the rank-k correction of dX).
    fn gather_cols(&self, out: &mut Storage, z: &Storage, d: &Storage, idx: &[u32], m: usize, shift: f64) -> Result<()>;
    /// out[j, :] = w[idx_j, :] converted to out's dtype; w [.., n] a frozen matrix in any stored
    /// dtype (read one row at a time), out [k, n].
    fn gather_rows(&self, out: &mut Storage, w: &Storage, idx: &[u32], n: usize) -> Result<()>;
    /// out[t, j] = p[t, j]·c_j, p and out [rows, k], c `[k]` (a right product with diag(c)).
    fn scale_cols(&self, out: &mut Storage, p: &Storage, c: &Storage) -> Result<()>;
    /// SpecLoRA-SVD's coefficient c_j = (d_j − 1)·σ_j, all `[k]`.
    fn svd_coef(&self, c: &mut Storage, d: &Storage, sigma: &Storage) -> Result<()>;
    /// Column dot products: dd_j = (Σ_t a[t·lda + ia_j]·b[t·k + j]) ∘ w_j with ia_j = idx_j (or j
    /// when `idx` is None), ∘ = · (or / when `divide`), w = 1 when None; b [rows, k], dd `[k]`.
    /// The gradient of a per-column scale: d(Σ_t dY[t, j]·c_j·Z[t, j])/dc_j.
    #[allow(clippy::too_many_arguments)]
    fn col_dot(&self, dd: &mut Storage, a: &Storage, lda: usize, idx: Option<&[u32]>, b: &Storage, w: Option<&Storage>, divide: bool) -> Result<()>;
    /// y += s·x (same length).
    fn add_scaled(&self, y: &mut Storage, x: &Storage, s: f64) -> Result<()>;
    /// M[i, i] −= v_i for a square M [r, r], v `[r]`.
    fn sub_diag(&self, mm: &mut Storage, v: &Storage) -> Result<()>;
    /// The fused down projection's input, recomputed: x = act(g) ⊙ u (same length); the same
    /// arithmetic as the swiglu / geglu forward kernels.
    fn gated_recompute(&self, x: &mut Storage, g: &Storage, u: &Storage, act: GatedAct) -> Result<()>;
    /// The gate's gradient written over its upstream gradient: with δ = `dx_dg` on entry,
    /// dg = δ ⊙ u ⊙ act'(g) (into `dx_dg`), du = δ ⊙ act(g); silu'(g) = σ(g)(1 + g(1 − σ(g))),
    /// gelu_tanh'(g) = ½(1 + τ) + ½g(1 − τ²)·√(2/π)(1 + 3·0.044715g²), τ = tanh(√(2/π)(g + 0.044715g³)).
    fn gated_bwd_in_place(&self, dx_dg: &mut Storage, du: &mut Storage, g: &Storage, u: &Storage, act: GatedAct) -> Result<()>;
    /// DoRA's row norms ν_i = ‖W_i + s·B_i·A‖ from the small products, never from W + s·B·A:
    /// ν_i = √max(0, ‖W_i‖² + 2s·Σ_q B[i, q]·(A·Wᵀ)[q, i] + s²·Σ_p B[i, p]·Σ_q (A·Aᵀ)[p, q]·B[i, q]).
    /// nu, wnorm2 `[m]`, b [m, r], awt [r, m], aat [r, r].
    #[allow(clippy::too_many_arguments)]
    fn dora_norms(&self, nu: &mut Storage, wnorm2: &Storage, b: &Storage, awt: &Storage, aat: &Storage, r: usize, s: f64) -> Result<()>;
    /// DoRA's row scale: ν̂_i = max(ν_i, floor) in the output dtype, g_i = mag_i / ν̂_i; all `[m]`.
    fn dora_scale(&self, g: &mut Storage, nu_hat: &mut Storage, nu: &Storage, mag: &Storage, floor: f64) -> Result<()>;
}

/// The LoRA dropout multiplier of element i: 0 (dropped, probability p) or 1/(1 − p), from the
/// SplitMix64 finalizer of seed ⊕ i·φ as a 53-bit uniform u (dropped when u < p). Every device
/// computes the same mask (cuda/adapter.cu has the same function).
#[inline]
pub fn dropout_factor(seed: u64, p: f64, i: usize) -> f64 {
    let mut z = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// The kernels of `device`: the one place that decides CPU or CUDA. CUDA needs the `cuda`
/// feature and a device that initializes; otherwise this is the error saying so.
pub fn kernels(device: Device) -> Result<&'static dyn Kernels> {
    match device {
        Device::Cpu => Ok(&host::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            cuda::gpu()?;
            Ok(&cuda::Cuda)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(crate::error::Error::Cuda {
            op: "device".into(),
            msg: "spectune was built without the `cuda` feature (cargo build --release --features cuda)".into(),
        }),
    }
}

impl Device {
    /// Checks that the device can be used: always for the CPU; for CUDA, that spectune was built
    /// with `--features cuda` and a device initializes.
    pub fn ensure_available(self) -> Result<()> {
        kernels(self).map(|_| ())
    }
}

/// Starts a new peak-device-memory measurement (no-op without the `cuda` feature).
pub fn cuda_reset_peak() {
    #[cfg(feature = "cuda")]
    cuda::reset_peak();
}

/// Peak bytes held by device tensors since start or [`cuda_reset_peak`] (0 without `cuda`).
pub fn cuda_peak_bytes() -> usize {
    #[cfg(feature = "cuda")]
    return cuda::memory_stats().peak;
    #[cfg(not(feature = "cuda"))]
    0
}

/// True when the CUDA device is spectune's emulated driver (cuda/emu): results there are "CUDA
/// (emulated)", and its allocator hands out blocks of exactly the size asked (false without the
/// `cuda` feature or a device).
pub fn cuda_emulated() -> bool {
    #[cfg(feature = "cuda")]
    return cuda::available() && cuda::gpu().is_ok_and(|g| g.emulated);
    #[cfg(not(feature = "cuda"))]
    false
}

/// Waits for queued device work (no-op on the CPU or without the `cuda` feature), so a timed
/// step includes its kernels.
pub fn device_synchronize() -> Result<()> {
    #[cfg(feature = "cuda")]
    if cuda::available() {
        return cuda::synchronize(|| "device_synchronize".into());
    }
    Ok(())
}
