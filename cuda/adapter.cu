// The pieces of the fused adapter linears that are not matrix products (those go through
// matmul.cu): LoRA dropout, SpecLoRA's row rescaling of Z = X·Wᵀ, and the column dot products
// of the d gradients.
#include "common.cuh"

// The dropout multiplier of element i, bit-identical to the CPU's `Dropout::factor` (SplitMix64
// finalizer of seed ^ i·φ, 53-bit uniform u): 0 if u < p else 1/(1 − p).
__device__ __forceinline__ float dropout_factor(unsigned long long seed, long i, double p) {
    unsigned long long z = seed ^ ((unsigned long long)i * 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    double u = (double)(z >> 11) / 9007199254740992.0;
    return u < p ? 0.f : (float)(1.0 / (1.0 - p));
}
// y = x ⊙ mask/(1 − p)   (accumulate = 1: y += x ⊙ mask/(1 − p))
extern "C" __global__ void dropout_apply(float* y, const float* x, long n, unsigned long long seed, double p, int accumulate) {
    FOR_EACH(i, n) {
        float v = x[i] * dropout_factor(seed, i, p);
        y[i] = accumulate ? y[i] + v : v;
    }
}
// SpecLoRA forward on Z [rows, m]: zk[r, j] = Z[r, idx[j]] (saved for dd), then Z[r, idx[j]] *= d[j].
// With zk null only the scaling is done (the backward's dY ⊙ Γ).
extern "C" __global__ void gather_scale_cols(float* z, float* zk, const float* d, const unsigned* idx, long rows, long m, long k) {
    FOR_EACH(e, rows * k) {
        long r = e / k, j = e % k;
        float* p = &z[r * m + idx[j]];
        if (zk) zk[e] = *p;
        *p *= d[j];
    }
}
// out[r, j] = p[r, j]·c[j]  (SpecLoRA-SVD: (X·V) ⊙ (d − 1) ⊙ σ)
extern "C" __global__ void scale_cols(float* out, const float* p, const float* c, long rows, long k) {
    FOR_EACH(e, rows * k) out[e] = p[e] * c[e % k];
}
// c[j] = (d[j] − 1)·σ[j]
extern "C" __global__ void svd_coef(float* c, const float* d, const float* sigma, long k) {
    FOR_EACH(j, k) c[j] = (d[j] - 1.f) * sigma[j];
}
// dd[j] = w[j]·Σ_r a[r·lda + ia(j)]·b[r·k + j], with ia(j) = idx[j] (or j when idx is null) and
// w = null meaning 1. One block per j.
extern "C" __global__ void col_dot(float* dd, const float* a, long lda, const unsigned* idx, const float* b, const float* w,
                                   long rows, long k) {
    __shared__ float scratch[32];
    const long j = blockIdx.x;
    const long ia = idx ? (long)idx[j] : j;
    float s = 0.f;
    for (long r = threadIdx.x; r < rows; r += blockDim.x) s += a[r * lda + ia] * b[r * k + j];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) dd[j] = w ? s * w[j] : s;
}
