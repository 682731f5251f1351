// Rotary embedding, rotate-half layout: for each (row, head), dim i < hd/2 pairs with i + hd/2;
// angle = pos[row]·inv_freq[i] in f64 (positions reach 1e4+, where f32 angles lose ~1e-3 rad).
// inverse = 1 applies R(−θ) (the backward: R is orthogonal, so dx = Rᵀdy).
#include "common.cuh"

extern "C" __global__ void rope(float* __restrict__ y, const float* __restrict__ x, const long* __restrict__ pos,
                                const double* __restrict__ inv_freq, long rows, int h, int hd, int inverse) {
    const int half = hd / 2;
    FOR_EACH(e, rows * h * half) {
        long row = e / ((long)h * half);
        int rem = (int)(e % ((long)h * half));
        int head = rem / half, i = rem % half;
        double s, c;
        sincos((double)pos[row] * inv_freq[i], &s, &c);
        float sn = inverse ? -(float)s : (float)s, cs = (float)c;
        long base = (row * h + head) * hd;
        float a = x[base + i], b = x[base + i + half];
        y[base + i] = a * cs - b * sn;
        y[base + i + half] = b * cs + a * sn;
    }
}
