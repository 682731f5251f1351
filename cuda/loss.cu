// Softmax cross-entropy over rows of `vocab` logits. One block per row.
#include "common.cuh"

// lse[r] = logsumexp(x[r, :]);  loss[r] = lse[r] − x[r, target[r]] (0 where target = ignore).
extern "C" __global__ void ce_fwd(float* __restrict__ lse, float* __restrict__ loss, const float* __restrict__ x,
                                  const long* __restrict__ targets, long ignore, int vocab) {
    __shared__ float scratch[32];
    const long r = blockIdx.x;
    const float* xr = x + r * vocab;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, xr[j]);
    m = block_max(m, scratch);
    float s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(xr[j] - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        float l = m + logf(s);
        lse[r] = l;
        long t = targets[r];
        loss[r] = t == ignore ? 0.f : l - xr[t];
    }
}

// In place: x[r, j] ← g·(exp(x[r, j] − lse[r]) − [j = target[r]]); rows with target = ignore → 0.
extern "C" __global__ void ce_bwd(float* __restrict__ x, const float* __restrict__ lse, const long* __restrict__ targets,
                                  long ignore, int vocab, float g) {
    const long r = blockIdx.x;
    float* xr = x + r * vocab;
    const long t = targets[r];
    const float l = lse[r];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x)
        xr[j] = t == ignore ? 0.f : g * (expf(xr[j] - l) - (j == t ? 1.f : 0.f));
}
