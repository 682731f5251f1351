// Causal GQA attention with a key padding mask, memory linear in sequence length: the forward
// keeps an online softmax (running max m, running sum l) per query and saves only the output and
// lse = m + log l; the backward recomputes P = exp(S − lse). With a soft cap c > 0 the score is
// S = c·tanh(z/c) of z = scale·q·k (c = 0: S = z), and the backward multiplies dS by
// dS/dz = 1 − tanh²(z/c).
//
// Layouts: q, o, dO [b, t, nh, hd]; k, v [b, s, nkv, hd]; lse, D [b, t, nh]; mask [b, s] (1 = real
// key) or null. Query i sees keys first(i) ≤ j < vis(i) = (causal ? s − t + i + 1 : s) that are
// not masked; first(i) = max(0, s − t + i + 1 − window) under a sliding window (window > 0, causal
// only: the query at p = s − t + i sees j when p − j < window), else 0.
// One warp per query row (forward, dQ) or per key row (dK, dV); each lane holds hd/32 elements
// (hd ≤ 32·MAXV), dot products are warp reductions. No atomics: results are deterministic.
#include "common.cuh"

#define MAXV 8  // head_dim ≤ 256
#define WARPS 4

struct Dims {
    int b, t, s, nh, nkv, hd, causal;
    float scale;
};

__device__ __forceinline__ int visible(const Dims& d, int i) { return d.causal ? d.s - d.t + i + 1 : d.s; }
__device__ __forceinline__ int first_key(const Dims& d, int i, int window) { return window > 0 ? max(0, d.s - d.t + i + 1 - window) : 0; }

// The score S of z = scale·q·k under soft cap c (0 = none), and dS/dz in *dz.
__device__ __forceinline__ float capped(float z, float cap, float* dz) {
    if (cap <= 0.f) {
        *dz = 1.f;
        return z;
    }
    float t = tanhf(z / cap);
    *dz = 1.f - t * t;
    return cap * t;
}

__device__ __forceinline__ void load_row(float (&r)[MAXV], const float* p, int hd, int lane, float mul) {
#pragma unroll
    for (int u = 0; u < MAXV; ++u) {
        int e = lane + 32 * u;
        r[u] = e < hd ? p[e] * mul : 0.f;
    }
}
__device__ __forceinline__ float dot_row(const float (&r)[MAXV], const float* p, int hd, int lane) {
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < MAXV; ++u) {
        int e = lane + 32 * u;
        if (e < hd) s += r[u] * p[e];
    }
    return warp_sum(s);
}

// grid (ceil(t / WARPS), nh, b), block 32·WARPS.
extern "C" __global__ void attn_fwd(float* __restrict__ o, float* __restrict__ lse, const float* __restrict__ q,
                                    const float* __restrict__ k, const float* __restrict__ v, const unsigned char* __restrict__ mask, Dims d, float cap,
                                    int window) {
    const int lane = threadIdx.x & 31;
    const int i = blockIdx.x * WARPS + (threadIdx.x >> 5), h = blockIdx.y, bi = blockIdx.z;
    if (i >= d.t) return;
    const int kh = h / (d.nh / d.nkv);
    const long qrow = (((long)bi * d.t + i) * d.nh + h) * d.hd;
    float qr[MAXV], acc[MAXV];
    load_row(qr, q + qrow, d.hd, lane, d.scale);
#pragma unroll
    for (int u = 0; u < MAXV; ++u) acc[u] = 0.f;
    float m = -INFINITY, l = 0.f;
    const int vis = visible(d, i);
    for (int j = first_key(d, i, window); j < vis; ++j) {
        if (mask && !mask[(long)bi * d.s + j]) continue;
        const long krow = (((long)bi * d.s + j) * d.nkv + kh) * d.hd;
        float dz;
        float sc = capped(dot_row(qr, k + krow, d.hd, lane), cap, &dz);
        float mn = fmaxf(m, sc);
        float corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
#pragma unroll
        for (int u = 0; u < MAXV; ++u) {
            int e = lane + 32 * u;
            acc[u] = acc[u] * corr + (e < d.hd ? p * v[krow + e] : 0.f);
        }
        m = mn;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int u = 0; u < MAXV; ++u) {
        int e = lane + 32 * u;
        if (e < d.hd) o[qrow + e] = acc[u] * inv;
    }
    if (lane == 0) lse[((long)bi * d.t + i) * d.nh + h] = l > 0.f ? m + logf(l) : -INFINITY;
}

// D[b, i, h] = dO_i · O_i.  One warp per (b, i, h): grid (ceil(b·t·nh / WARPS)).
extern "C" __global__ void attn_bwd_prep(float* __restrict__ D, const float* __restrict__ dout, const float* __restrict__ o, long rows, int hd) {
    const long row = (long)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float s = 0.f;
    for (int e = lane; e < hd; e += 32) s += dout[row * hd + e] * o[row * hd + e];
    s = warp_sum(s);
    if (lane == 0) D[row] = s;
}

// dQ_i = scale Σ_j dS_ij k_j with dS_ij = P_ij (dO_i·v_j − D_i)·dS/dz. grid as attn_fwd.
extern "C" __global__ void attn_bwd_dq(float* __restrict__ dq, const float* __restrict__ dout, const float* __restrict__ q,
                                       const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ lse,
                                       const float* __restrict__ D, const unsigned char* __restrict__ mask, Dims d, float cap, int window) {
    const int lane = threadIdx.x & 31;
    const int i = blockIdx.x * WARPS + (threadIdx.x >> 5), h = blockIdx.y, bi = blockIdx.z;
    if (i >= d.t) return;
    const int kh = h / (d.nh / d.nkv);
    const long qi = ((long)bi * d.t + i) * d.nh + h;
    const long qrow = qi * d.hd;
    float qr[MAXV], gr[MAXV], acc[MAXV];
    load_row(qr, q + qrow, d.hd, lane, d.scale);
    load_row(gr, dout + qrow, d.hd, lane, 1.f);
#pragma unroll
    for (int u = 0; u < MAXV; ++u) acc[u] = 0.f;
    const float L = lse[qi], Di = D[qi];
    const int vis = L == -INFINITY ? 0 : visible(d, i);
    for (int j = first_key(d, i, window); j < vis; ++j) {
        if (mask && !mask[(long)bi * d.s + j]) continue;
        const long krow = (((long)bi * d.s + j) * d.nkv + kh) * d.hd;
        float dz;
        float p = expf(capped(dot_row(qr, k + krow, d.hd, lane), cap, &dz) - L);
        float ds = p * (dot_row(gr, v + krow, d.hd, lane) - Di) * dz;
#pragma unroll
        for (int u = 0; u < MAXV; ++u) {
            int e = lane + 32 * u;
            if (e < d.hd) acc[u] += ds * k[krow + e];
        }
    }
#pragma unroll
    for (int u = 0; u < MAXV; ++u) {
        int e = lane + 32 * u;
        if (e < d.hd) dq[qrow + e] = acc[u] * d.scale;
    }
}

// dV_j = Σ_{h in group, i} P_ij dO_i;  dK_j = scale Σ dS_ij q_i. One warp per (b, j, kv head):
// grid (ceil(s / WARPS), nkv, b).
extern "C" __global__ void attn_bwd_dkv(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ dout,
                                        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                        const float* __restrict__ lse, const float* __restrict__ D, const unsigned char* __restrict__ mask,
                                        Dims d, float cap, int window) {
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * WARPS + (threadIdx.x >> 5), kh = blockIdx.y, bi = blockIdx.z;
    if (j >= d.s) return;
    const long krow = (((long)bi * d.s + j) * d.nkv + kh) * d.hd;
    float kr[MAXV], vr[MAXV], ak[MAXV], av[MAXV];
    load_row(kr, k + krow, d.hd, lane, 1.f);
    load_row(vr, v + krow, d.hd, lane, 1.f);
#pragma unroll
    for (int u = 0; u < MAXV; ++u) ak[u] = av[u] = 0.f;
    const bool real = !mask || mask[(long)bi * d.s + j];
    const int group = d.nh / d.nkv;
    // Query i sees key j when j < vis(i), i.e. i ≥ j − (s − t) under the causal mask, and when
    // j ≥ first(i), i.e. i < j − (s − t) + window under a sliding window.
    const int i0 = d.causal ? max(0, j - (d.s - d.t)) : 0;
    const int i1 = window > 0 ? min(d.t, j - (d.s - d.t) + window) : d.t;
    for (int hh = 0; real && hh < group; ++hh) {
        const int h = kh * group + hh;
        for (int i = i0; i < i1; ++i) {
            const long qi = ((long)bi * d.t + i) * d.nh + h;
            const float L = lse[qi];
            if (L == -INFINITY) continue;
            const float* qp = q + qi * d.hd;
            const float* gp = dout + qi * d.hd;
            float dz;
            float p = expf(capped(dot_row(kr, qp, d.hd, lane) * d.scale, cap, &dz) - L);
            float ds = p * (dot_row(vr, gp, d.hd, lane) - D[qi]) * dz;
#pragma unroll
            for (int u = 0; u < MAXV; ++u) {
                int e = lane + 32 * u;
                if (e < d.hd) {
                    av[u] += p * gp[e];
                    ak[u] += ds * qp[e];
                }
            }
        }
    }
#pragma unroll
    for (int u = 0; u < MAXV; ++u) {
        int e = lane + 32 * u;
        if (e < d.hd) {
            dk[krow + e] = ak[u] * d.scale;
            dv[krow + e] = av[u];
        }
    }
}
