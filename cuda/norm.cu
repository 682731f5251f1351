// Fused RMSNorm over rows of c elements: y = x·r ⊙ w, r = (mean(x²) + eps)^(−½). One block per row.
#include "common.cuh"

extern "C" __global__ void rms_norm_fwd(float* __restrict__ y, float* __restrict__ rstd, const float* __restrict__ x,
                                        const float* __restrict__ w, int c, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * c;
    float ss = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) ss += xr[i] * xr[i];
    float r = rsqrtf(block_sum(ss, scratch) / c + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < c; i += blockDim.x) y[row * c + i] = xr[i] * r * w[i];
}

// dx = r·(g − x̂·mean(g ⊙ x̂)) with g = dy ⊙ w, x̂ = x·r;  dw += Σ_rows dy ⊙ x̂ (atomics; dw zeroed
// by the caller). dx or dw may be null.
extern "C" __global__ void rms_norm_bwd(float* __restrict__ dx, float* __restrict__ dw, const float* __restrict__ dy,
                                        const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd, int c) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * c;
    const float* gr = dy + row * c;
    const float r = rstd[row];
    if (dx) {
        float s = 0.f;
        for (int i = threadIdx.x; i < c; i += blockDim.x) s += gr[i] * w[i] * xr[i] * r;
        float mean = block_sum(s, scratch) / c;
        for (int i = threadIdx.x; i < c; i += blockDim.x) dx[row * c + i] = r * (gr[i] * w[i] - xr[i] * r * mean);
    }
    if (dw)
        for (int i = threadIdx.x; i < c; i += blockDim.x) atomicAdd(&dw[i], gr[i] * xr[i] * r);
}

// dx from the output y = x̂ ⊙ w instead of x (w frozen, no zero entry): x̂ = y / w and
// g ⊙ x̂ = dy ⊙ y, so dx = r·(dy ⊙ w − (y / w)·mean(dy ⊙ y)).
extern "C" __global__ void rms_norm_bwd_from_y(float* __restrict__ dx, const float* __restrict__ dy, const float* __restrict__ y,
                                               const float* __restrict__ w, const float* __restrict__ rstd, int c) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* yr = y + row * c;
    const float* gr = dy + row * c;
    const float r = rstd[row];
    float s = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += gr[i] * yr[i];
    float mean = block_sum(s, scratch) / c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) dx[row * c + i] = r * (gr[i] * w[i] - yr[i] / w[i] * mean);
}
