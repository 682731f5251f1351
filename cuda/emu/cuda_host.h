// The CUDA dialect for g++: what cuda/*.cu need to compile as host C++ inside the emulated
// driver (cuda/emu). Included ahead of each kernel source (-include), never by nvcc.
//
// A launch runs each block's threads as fibers on one OS thread (runtime.cpp), so:
//   threadIdx            the running fiber's index (read from thread-local state);
//   blockIdx/Dim, gridDim the block being run;
//   __shared__           `static thread_local`: one copy per OS thread, i.e. per running block;
//   __syncthreads()      a rendezvous of every thread of the block;
//   __shfl_*_sync()      a rendezvous of the lanes of the warp, values exchanged in lockstep;
//   mma (common.cuh)     a rendezvous of the 32 lanes, computed from their fragments.
// Every rendezvous is an opaque call followed by a compiler memory barrier, so values in shared
// or global memory are re-read after it.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned x, y, z;
};

// Per OS thread: the running fiber's thread index and its block's coordinates.
struct EmuCoords {
    uint3 tid, bid, bdim, gdim;
};
extern thread_local EmuCoords emu_coords;

#define threadIdx (static_cast<const uint3&>(emu_coords.tid))
#define blockIdx (static_cast<const uint3&>(emu_coords.bid))
#define blockDim (static_cast<const uint3&>(emu_coords.bdim))
#define gridDim (static_cast<const uint3&>(emu_coords.gdim))

// Rendezvous points (runtime.cpp).
void emu_syncthreads();
unsigned emu_shfl(int mode, unsigned mask, unsigned bits, int arg, int width);
void emu_mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]);

#define EMU_FENCE() __asm__ __volatile__("" ::: "memory")
inline void __syncthreads() {
    EMU_FENCE();
    emu_syncthreads();
    EMU_FENCE();
}

// Shuffles: mode 0 = xor, 1 = down, 2 = up, 3 = idx (PTX shfl.sync.bfly/down/up/idx).
inline unsigned emu_shfl_fenced(int mode, unsigned mask, unsigned bits, int arg, int width) {
    EMU_FENCE();
    unsigned r = emu_shfl(mode, mask, bits, arg, width);
    EMU_FENCE();
    return r;
}
inline float emu_bits_f(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned emu_f_bits(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width = 32) {
    return emu_bits_f(emu_shfl_fenced(0, mask, emu_f_bits(v), lane_mask, width));
}
inline float __shfl_down_sync(unsigned mask, float v, unsigned delta, int width = 32) {
    return emu_bits_f(emu_shfl_fenced(1, mask, emu_f_bits(v), (int)delta, width));
}
inline float __shfl_up_sync(unsigned mask, float v, unsigned delta, int width = 32) {
    return emu_bits_f(emu_shfl_fenced(2, mask, emu_f_bits(v), (int)delta, width));
}
inline float __shfl_sync(unsigned mask, float v, int src, int width = 32) {
    return emu_bits_f(emu_shfl_fenced(3, mask, emu_f_bits(v), src, width));
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask, int width = 32) {
    return (int)emu_shfl_fenced(0, mask, (unsigned)v, lane_mask, width);
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask, int width = 32) {
    return emu_shfl_fenced(0, mask, v, lane_mask, width);
}

// Bit casts and the math the kernels use. rsqrtf is exact here (the GPU's is within 2 ulp).
inline float __uint_as_float(unsigned u) { return emu_bits_f(u); }
inline unsigned __float_as_uint(float f) { return emu_f_bits(f); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

// Atomics: the blocks of one launch run one after another on one OS thread, but launches from
// different host threads run at the same time, so these are real atomics.
inline float atomicAdd(float* p, float v) {
    unsigned old = __atomic_load_n((unsigned*)p, __ATOMIC_RELAXED), upd;
    do {
        upd = emu_f_bits(emu_bits_f(old) + v);
    } while (!__atomic_compare_exchange_n((unsigned*)p, &old, upd, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return emu_bits_f(old);
}
inline double atomicAdd(double* p, double v) {
    unsigned long long old = __atomic_load_n((unsigned long long*)p, __ATOMIC_RELAXED), upd;
    double d;
    do {
        memcpy(&d, &old, 8);
        d += v;
        memcpy(&upd, &d, 8);
    } while (!__atomic_compare_exchange_n((unsigned long long*)p, &old, upd, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    memcpy(&d, &old, 8);
    return d;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

// Registration of each host-compiled kernel with its parameter list (driver.cpp reads it), so a
// launch can check the caller's kernelParams against both this signature and the PTX `.entry`.
#include <type_traits>
#include <utility>
namespace emu {
struct KernelInfo {
    const char* file;
    const char* name;
    void (*invoke)(void* fn, void** params);
    void* fn;
    int nparams;
    const unsigned char* sizes;
    const char* classes; // per parameter: P pointer, I integer, F floating point, A aggregate
};
void register_kernel(const KernelInfo& k);

template <class T> constexpr char param_class() {
    return std::is_pointer<T>::value ? 'P' : std::is_floating_point<T>::value ? 'F' : std::is_integral<T>::value ? 'I' : 'A';
}
template <class... A> struct Signature {
    static constexpr unsigned char sizes[sizeof...(A) + 1] = {(unsigned char)sizeof(A)..., 0};
    static constexpr char classes[sizeof...(A) + 1] = {param_class<A>()..., 0};
    template <size_t... I> static void call(void (*f)(A...), void** p, std::index_sequence<I...>) {
        f(*static_cast<A*>(p[I])...);
    }
    static void invoke(void* fn, void** params) { call(reinterpret_cast<void (*)(A...)>(fn), params, std::index_sequence_for<A...>{}); }
};
template <class... A> struct Registrar {
    Registrar(const char* file, const char* name, void (*f)(A...)) {
        register_kernel({file, name, &Signature<A...>::invoke, reinterpret_cast<void*>(f), (int)sizeof...(A), Signature<A...>::sizes,
                         Signature<A...>::classes});
    }
};
} // namespace emu
#define EMU_REGISTER(file, name) static emu::Registrar emu_reg_##name(file, #name, &name);
