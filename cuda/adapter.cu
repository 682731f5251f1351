// The adapter helpers: the pieces of the adapter linears (LoRA, SpecLoRA, PiSSA, DoRA, Spectral)
// that are not matrix products (those go through matmul.cu): LoRA dropout, SpecLoRA's column
// gathers and row rescaling of Z = X·Wᵀ, the column dot products of the d gradients, DoRA's row
// norms and the fused down projection's SwiGLU gradient. Each has the CPU twin of the same name in
// src/backend/host.rs.
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
// out[r, j] = z[r, idx[j]]·(d[j] − shift)  (SpecLoRA backward: dY[:, idx] ⊙ (d − 1))
extern "C" __global__ void gather_cols(float* out, const float* z, const float* d, const unsigned* idx, long rows, long m, long k,
                                       float shift) {
    FOR_EACH(e, rows * k) {
        long r = e / k, j = e % k;
        out[e] = z[r * m + idx[j]] * (d[j] - shift);
    }
}
// out[j, :] = w[idx[j], :] as f32 (the selected rows of a frozen f32 or bf16 matrix [.., n]).
extern "C" __global__ void gather_rows_f32(float* out, const float* w, const unsigned* idx, long k, long n) {
    FOR_EACH(e, k * n) out[e] = w[(long)idx[e / n] * n + e % n];
}
extern "C" __global__ void gather_rows_bf16(float* out, const bf16_t* w, const unsigned* idx, long k, long n) {
    FOR_EACH(e, k * n) out[e] = bf2f(w[(long)idx[e / n] * n + e % n]);
}
// dd[j] = (Σ_r a[r·lda + ia(j)]·b[r·k + j]) ∘ w[j], with ia(j) = idx[j] (or j when idx is null),
// ∘ = · (or / when divide), w = null meaning 1. One block per j.
extern "C" __global__ void col_dot(float* dd, const float* a, long lda, const unsigned* idx, const float* b, const float* w,
                                   int divide, long rows, long k) {
    __shared__ float scratch[32];
    const long j = blockIdx.x;
    const long ia = idx ? (long)idx[j] : j;
    float s = 0.f;
    for (long r = threadIdx.x; r < rows; r += blockDim.x) s += a[r * lda + ia] * b[r * k + j];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) dd[j] = w ? (divide ? s / w[j] : s * w[j]) : s;
}
// y += s·x
extern "C" __global__ void add_scaled(float* y, const float* x, float s, long n) {
    FOR_EACH(i, n) y[i] += s * x[i];
}
// M[i, i] −= v[i] for M [r, r]
extern "C" __global__ void sub_diag(float* mm, const float* v, long r) {
    FOR_EACH(i, r) mm[i * r + i] -= v[i];
}
__device__ __forceinline__ float adapter_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
// The fused down projection's SwiGLU gradient, dg written over the upstream δ = dx:
// dg = δ·u·silu'(g), du = δ·silu(g), silu'(g) = σ(g)(1 + g(1 − σ(g))).
extern "C" __global__ void swiglu_bwd_in_place(float* dx_dg, float* du, const float* g, const float* u, long n) {
    FOR_EACH(i, n) {
        float d = dx_dg[i], s = adapter_sigmoid(g[i]);
        du[i] = d * g[i] * s;
        dx_dg[i] = d * u[i] * s * (1.f + g[i] * (1.f - s));
    }
}
// DoRA row norms: nu[i] = √max(0, wn2[i] + 2s·Σ_q b[i,q]·awt[q,i] + s²·Σ_p b[i,p]·Σ_q aat[p,q]·b[i,q]),
// b [m, r], awt = A·Wᵀ [r, m], aat = A·Aᵀ [r, r]. One thread per row (r is small).
extern "C" __global__ void dora_norms(float* nu, const float* wn2, const float* b, const float* awt, const float* aat, long m, long r,
                                      float s) {
    FOR_EACH(i, m) {
        const float* bi = b + i * r;
        float cross = 0.f, quad = 0.f;
        for (long q = 0; q < r; ++q) cross += bi[q] * awt[q * m + i];
        for (long p = 0; p < r; ++p) {
            float t = 0.f;
            for (long q = 0; q < r; ++q) t += aat[p * r + q] * bi[q];
            quad += bi[p] * t;
        }
        float v = wn2[i] + 2.f * s * cross + s * s * quad;
        nu[i] = v > 0.f ? sqrtf(v) : 0.f;
    }
}
// DoRA row scale: nu_hat[i] = max(nu[i], floor), g[i] = mag[i] / nu_hat[i].
extern "C" __global__ void dora_scale(float* g, float* nu_hat, const float* nu, const float* mag, float floor_, long m) {
    FOR_EACH(i, m) {
        float h = nu[i] > floor_ ? nu[i] : floor_;
        nu_hat[i] = h;
        g[i] = mag[i] / h;
    }
}
