// Shared helpers for spectune's kernels. Every kernel is `extern "C"` so the Rust side finds it
// by name in the PTX module; bf16 is carried as raw `unsigned short` bits (no cuda_bf16.h), so
// the PTX builds with any nvcc that targets compute_80.
//
// The same sources are also compiled for the host by g++ (cuda/emu: the emulated driver), with
// cuda/emu/cuda_host.h supplying threadIdx, __syncthreads, the warp intrinsics and the tensor-core
// helper below; `__CUDA_ARCH__` is defined only in nvcc's device pass.
#pragma once

typedef unsigned short bf16_t;

// f32 -> bf16, round to nearest even (NaN stays NaN).
__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of at most 1024 threads; every thread gets the total. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// One warp-wide tensor-core product D = A·B + D on an m16n8k16 tile: A 16×16 and B 16×8 in bf16,
// D 16×8 in f32 (sm_80+). Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit A/B), g = lane/4,
// t = lane%4, each 32-bit register holding two bf16 (lower k in the low half):
//   a[0..4]: (row g, k 2t..2t+1), (g+8, 2t..2t+1), (g, 2t+8..2t+9), (g+8, 2t+8..2t+9)
//   b[0..2]: (k 2t..2t+1, col g), (k 2t+8..2t+9, col g)
//   d[0..4]: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
// The emulation's warp-wide implementation (a rendezvous of the 32 lanes), cuda/emu/runtime.cpp.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu_mma_m16n8k16_bf16(d, a, b);
}
#endif

// Grid-stride loop over n elements.
#define FOR_EACH(i, n) for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (long)(n); i += (long)gridDim.x * blockDim.x)
