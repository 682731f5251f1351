// Elementwise ops, broadcasts over a suffix (b has bn elements, repeated), casts, embedding
// gather/scatter and reductions. All grid-stride loops.
#include "common.cuh"

extern "C" __global__ void add_bcast(float* y, const float* a, const float* b, long n, long bn) {
    FOR_EACH(i, n) y[i] = a[i] + b[i % bn];
}
extern "C" __global__ void mul_bcast(float* y, const float* a, const float* b, long n, long bn) {
    FOR_EACH(i, n) y[i] = a[i] * b[i % bn];
}
// acc += g (gradient accumulation).
extern "C" __global__ void add_inplace(float* acc, const float* g, long n) {
    FOR_EACH(i, n) acc[i] += g[i];
}
extern "C" __global__ void scale_f32(float* y, const float* x, float s, long n) {
    FOR_EACH(i, n) y[i] = x[i] * s;
}
extern "C" __global__ void fill_f32(float* y, float v, long n) {
    FOR_EACH(i, n) y[i] = v;
}
__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }
// silu(x) = x·σ(x);  silu'(x) = σ(x)·(1 + x·(1 − σ(x))).
extern "C" __global__ void silu_fwd(float* y, const float* x, long n) {
    FOR_EACH(i, n) y[i] = x[i] * sigmoidf(x[i]);
}
extern "C" __global__ void silu_bwd(float* dx, const float* dy, const float* x, long n) {
    FOR_EACH(i, n) {
        float s = sigmoidf(x[i]);
        dx[i] = dy[i] * s * (1.f + x[i] * (1.f - s));
    }
}
// y = silu(g)·u;  dg = dy·u·silu'(g), du = dy·silu(g). dg or du may be null.
extern "C" __global__ void swiglu_fwd(float* y, const float* g, const float* u, long n) {
    FOR_EACH(i, n) y[i] = g[i] * sigmoidf(g[i]) * u[i];
}
extern "C" __global__ void swiglu_bwd(float* dg, float* du, const float* dy, const float* g, const float* u, long n) {
    FOR_EACH(i, n) {
        float s = sigmoidf(g[i]);
        if (dg) dg[i] = dy[i] * u[i] * s * (1.f + g[i] * (1.f - s));
        if (du) du[i] = dy[i] * g[i] * s;
    }
}
// gelu_tanh(x) = ½x(1 + τ), τ = tanh(c(x + a·x³)), c = √(2/π), a = 0.044715;
// gelu_tanh'(x) = ½(1 + τ) + ½x(1 − τ²)·c(1 + 3a·x²).
#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f
__device__ __forceinline__ float gelu_tanhf(float x) { return 0.5f * x * (1.f + tanhf(GELU_C * (x + GELU_A * x * x * x))); }
__device__ __forceinline__ float gelu_tanh_gradf(float x) {
    float t = tanhf(GELU_C * (x + GELU_A * x * x * x));
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * GELU_C * (1.f + 3.f * GELU_A * x * x);
}
extern "C" __global__ void gelu_tanh_fwd(float* y, const float* x, long n) {
    FOR_EACH(i, n) y[i] = gelu_tanhf(x[i]);
}
extern "C" __global__ void gelu_tanh_bwd(float* dx, const float* dy, const float* x, long n) {
    FOR_EACH(i, n) dx[i] = dy[i] * gelu_tanh_gradf(x[i]);
}
// y = gelu_tanh(g)·u;  dg = dy·u·gelu_tanh'(g), du = dy·gelu_tanh(g). dg or du may be null.
extern "C" __global__ void geglu_fwd(float* y, const float* g, const float* u, long n) {
    FOR_EACH(i, n) y[i] = gelu_tanhf(g[i]) * u[i];
}
extern "C" __global__ void geglu_bwd(float* dg, float* du, const float* dy, const float* g, const float* u, long n) {
    FOR_EACH(i, n) {
        if (dg) dg[i] = dy[i] * u[i] * gelu_tanh_gradf(g[i]);
        if (du) du[i] = dy[i] * gelu_tanhf(g[i]);
    }
}
// The fused down projection's GeGLU gradient, dg written over the upstream δ = dx:
// dg = δ·u·gelu_tanh'(g), du = δ·gelu_tanh(g) (δ read before it is overwritten).
extern "C" __global__ void geglu_bwd_in_place(float* dx_dg, float* du, const float* g, const float* u, long n) {
    FOR_EACH(i, n) {
        float d = dx_dg[i];
        du[i] = d * gelu_tanhf(g[i]);
        dx_dg[i] = d * u[i] * gelu_tanh_gradf(g[i]);
    }
}
// y[b, j, i] = x[b, i, j] for x [batch, rows, cols].
extern "C" __global__ void transpose_f32(float* y, const float* x, long batch, long rows, long cols) {
    FOR_EACH(e, batch * rows * cols) {
        long b = e / (rows * cols), r = e % (rows * cols);
        long i = r / cols, j = r % cols;
        y[b * rows * cols + j * rows + i] = x[e];
    }
}
// db[j] = Σ_r dy[r·bn + j] (·a[r·bn + j] when a is given): the gradient of a broadcast operand.
extern "C" __global__ void sum_leading(float* db, const float* dy, const float* a, long rows, long bn) {
    FOR_EACH(j, bn) {
        float s = 0.f;
        for (long r = 0; r < rows; ++r) s += a ? dy[r * bn + j] * a[r * bn + j] : dy[r * bn + j];
        db[j] = s;
    }
}
extern "C" __global__ void cast_f32_bf16(bf16_t* y, const float* x, long n) {
    FOR_EACH(i, n) y[i] = f2bf(x[i]);
}
extern "C" __global__ void cast_bf16_f32(float* y, const bf16_t* x, long n) {
    FOR_EACH(i, n) y[i] = bf2f(x[i]);
}
// y[i, :] = table[ids[i], :] for a bf16 or f32 table.
extern "C" __global__ void embedding_fwd_bf16(float* y, const bf16_t* table, const unsigned* ids, long n, long dim) {
    FOR_EACH(e, n * dim) y[e] = bf2f(table[(long)ids[e / dim] * dim + e % dim]);
}
extern "C" __global__ void embedding_fwd_f32(float* y, const float* table, const unsigned* ids, long n, long dim) {
    FOR_EACH(e, n * dim) y[e] = table[(long)ids[e / dim] * dim + e % dim];
}
// dtable[ids[i], :] += dy[i, :] (dtable zeroed by the caller).
extern "C" __global__ void embedding_bwd(float* dtable, const float* dy, const unsigned* ids, long n, long dim) {
    FOR_EACH(e, n * dim) atomicAdd(&dtable[(long)ids[e / dim] * dim + e % dim], dy[e]);
}
// out[0] += Σ x (f64 accumulation; out zeroed by the caller). squares = 1 sums x² instead.
extern "C" __global__ void reduce_sum(double* out, const float* x, long n, int squares) {
    __shared__ float scratch[32];
    float s = 0.f;
    FOR_EACH(i, n) s += squares ? x[i] * x[i] : x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(out, (double)s);
}

// Strided column copy: dst[r·dst_ld + dst_off + c] = src[r·src_ld + src_off + c], r < rows, c < cols
// (split_last's forward and backward).
extern "C" __global__ void copy_cols(float* __restrict__ dst, long dst_ld, long dst_off, const float* __restrict__ src, long src_ld, long src_off,
                                     long rows, long cols) {
    FOR_EACH(e, rows * cols) {
        long r = e / cols, c = e % cols;
        dst[r * dst_ld + dst_off + c] = src[r * src_ld + src_off + c];
    }
}
// Soft cap: y = c·tanh(x/c);  dx = dy·(1 − (y/c)²) from the output (d/dx = 1 − tanh²(x/c)).
extern "C" __global__ void softcap_fwd(float* y, const float* x, float c, long n) {
    FOR_EACH(i, n) y[i] = c * tanhf(x[i] / c);
}
extern "C" __global__ void softcap_bwd(float* dx, const float* dy, const float* y, float c, long n) {
    FOR_EACH(i, n) {
        float t = y[i] / c;
        dx[i] = dy[i] * (1.f - t * t);
    }
}
