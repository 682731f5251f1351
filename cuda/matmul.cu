// Matrix products. C[b] = alpha·op(A[b])·op(B[b]) + beta·C[b] for b < gridDim.z, with every operand
// addressed by element strides, so the transpose variants (X·Wᵀ, dY·W, Xᵀ·dY) and batched forms
// are the same kernel: A(i, k) = A[b·sab + i·sam + k·sak], B(k, j) = B[b·sbb + k·sbk + j·sbn],
// C(i, j) = C[b·scb + i·scm + j·scn] (so a transposed gradient is written in its operand's layout). When beta == 0, C is written without being read.
#include "common.cuh"

#define BM 64
#define BN 64
#define BK 16

// f32 × f32 (adapter math, gradients of trainable matrices): 16×16 threads, 4×4 outputs each.
extern "C" __global__ void gemm_f32(int M, int N, int K, const float* __restrict__ A, long sam, long sak, long sab,
                                    const float* __restrict__ B, long sbk, long sbn, long sbb, float* __restrict__ C, long scm, long scn,
                                    long scb, float alpha, float beta) {
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const long bz = blockIdx.z;
    A += bz * sab;
    B += bz * sbb;
    C += bz * scb;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16, tid = threadIdx.x;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
        for (int e = tid; e < BM * BK; e += 256) {
            int i = e / BK, kk = e % BK;
            int gi = m0 + i, gk = k0 + kk;
            As[kk][i] = (gi < M && gk < K) ? A[gi * sam + gk * sak] : 0.f;
            int j = e % BN, kb = e / BN;
            int gj = n0 + j, gkb = k0 + kb;
            Bs[kb][j] = (gj < N && gkb < K) ? B[gkb * sbk + gj * sbn] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                a[u] = As[kk][ty + 16 * u];
                b[u] = Bs[kk][tx + 16 * u];
            }
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(a[u], b[v], acc[u][v]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        int i = m0 + ty + 16 * u;
        if (i >= M) continue;
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            int j = n0 + tx + 16 * v;
            if (j >= N) continue;
            float* c = &C[(long)i * scm + (long)j * scn];
            *c = beta == 0.f ? alpha * acc[u][v] : alpha * acc[u][v] + beta * *c;
        }
    }
}

__device__ __forceinline__ unsigned pack2(bf16_t lo, bf16_t hi) { return (unsigned)lo | ((unsigned)hi << 16); }

// f32 activations × bf16 frozen weight on the tensor cores: A is rounded to bf16 as it is staged
// in shared memory, products accumulate in f32 (mma.sync.m16n8k16, sm_80+). 128 threads = 4 warps
// in a 2×2 grid, each warp a 32×32 sub-tile = 2 (m16) × 4 (n8) mma tiles (fragment layouts: see
// mma_m16n8k16_bf16 in common.cuh).
// Shared tiles are kept as As[m][k] and Bs[n][k] so both fragments read k-pairs as one word.
extern "C" __global__ void gemm_bf16(int M, int N, int K, const float* __restrict__ A, long sam, long sak, long sab,
                                     const bf16_t* __restrict__ B, long sbk, long sbn, long sbb, float* __restrict__ C, long scm, long scn,
                                     long scb, float alpha, float beta) {
    __shared__ __align__(16) bf16_t As[BM][BK + 8];
    __shared__ __align__(16) bf16_t Bs[BN][BK + 8];
    const long bz = blockIdx.z;
    A += bz * sab;
    B += bz * sbb;
    C += bz * scb;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    const int g = lane >> 2, t = lane & 3;
    float acc[2][4][4] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
        for (int e = tid; e < BM * BK; e += 128) {
            int i = e / BK, kk = e % BK;
            int gi = m0 + i, gk = k0 + kk;
            As[i][kk] = (gi < M && gk < K) ? f2bf(A[gi * sam + gk * sak]) : (bf16_t)0;
            int j = e / BK;
            int gj = n0 + j;
            Bs[j][kk] = (gj < N && gk < K) ? B[gk * sbk + gj * sbn] : (bf16_t)0;
        }
        __syncthreads();
        unsigned af[2][4], bfr[4][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            int r = wm + mt * 16 + g;
            af[mt][0] = *(const unsigned*)&As[r][2 * t];
            af[mt][1] = *(const unsigned*)&As[r + 8][2 * t];
            af[mt][2] = *(const unsigned*)&As[r][2 * t + 8];
            af[mt][3] = *(const unsigned*)&As[r + 8][2 * t + 8];
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            int c = wn + nt * 8 + g;
            bfr[nt][0] = *(const unsigned*)&Bs[c][2 * t];
            bfr[nt][1] = *(const unsigned*)&Bs[c][2 * t + 8];
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                mma_m16n8k16_bf16(acc[mt][nt], af[mt], bfr[nt]);
            }
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int i = m0 + wm + mt * 16 + g + (q >> 1) * 8;
                int j = n0 + wn + nt * 8 + 2 * t + (q & 1);
                if (i < M && j < N) {
                    float* c = &C[(long)i * scm + (long)j * scn];
                    float v = alpha * acc[mt][nt][q];
                    *c = beta == 0.f ? v : v + beta * *c;
                }
            }
}
