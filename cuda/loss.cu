// Softmax cross-entropy over rows of `vocab` logits. One block per row. With a soft cap c > 0 the
// softmax is of z = c·tanh(x/c) (x stays the raw logits; c = 0: z = x).
#include "common.cuh"

__device__ __forceinline__ float capped_logit(float x, float cap) { return cap > 0.f ? cap * tanhf(x / cap) : x; }

// lse[r] = logsumexp(z[r, :]);  loss[r] = lse[r] − z[r, target[r]] (0 where target = ignore).
extern "C" __global__ void ce_fwd(float* __restrict__ lse, float* __restrict__ loss, const float* __restrict__ x,
                                  const long* __restrict__ targets, long ignore, int vocab, float cap) {
    __shared__ float scratch[32];
    const long r = blockIdx.x;
    const float* xr = x + r * vocab;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, capped_logit(xr[j], cap));
    m = block_max(m, scratch);
    float s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(capped_logit(xr[j], cap) - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        float l = m + logf(s);
        lse[r] = l;
        long t = targets[r];
        loss[r] = t == ignore ? 0.f : l - capped_logit(xr[t], cap);
    }
}

// In place: x[r, j] ← g·(exp(z[r, j] − lse[r]) − [j = target[r]])·dz/dx, dz/dx = 1 − (z/c)² under a
// cap (else 1); rows with target = ignore → 0.
extern "C" __global__ void ce_bwd(float* __restrict__ x, const float* __restrict__ lse, const long* __restrict__ targets,
                                  long ignore, int vocab, float g, float cap) {
    const long r = blockIdx.x;
    float* xr = x + r * vocab;
    const long t = targets[r];
    const float l = lse[r];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        if (t == ignore) {
            xr[j] = 0.f;
            continue;
        }
        float z = capped_logit(xr[j], cap), dz = 1.f;
        if (cap > 0.f) {
            float u = z / cap;
            dz = 1.f - u * u;
        }
        xr[j] = g * (expf(z - l) - (j == t ? 1.f : 0.f)) * dz;
    }
}
