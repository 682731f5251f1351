// Rotary embedding, rotate-half layout over the first rot = 2·half dims of each head (half =
// inv_freq's length, rot ≤ hd): for each (row, head), dim i < half pairs with i + half at angle
// pos[row]·inv_freq[i], computed in f64 (positions reach 1e4+, where f32 angles lose ~1e-3 rad);
// cos and sin are multiplied by `scale` (LongRoPE/YaRN attention factor); dims rot..hd are copied
// (partial rotary). inverse = 1 applies scale·R(−θ) (the backward: dx = (s·R)ᵀdy = s·R(−θ)dy).
#include "common.cuh"

// One thread per (row, head, i) with i < half + (hd − rot): a rotated pair or a passed-through dim.
extern "C" __global__ void rope(float* __restrict__ y, const float* __restrict__ x, const long* __restrict__ pos,
                                const double* __restrict__ inv_freq, long rows, int h, int hd, int half, double scale, int inverse) {
    const int rot = 2 * half, per = half + (hd - rot);
    FOR_EACH(e, rows * h * per) {
        long row = e / ((long)h * per);
        int rem = (int)(e % ((long)h * per));
        int head = rem / per, i = rem % per;
        long base = (row * h + head) * hd;
        if (i >= half) {
            int j = rot + (i - half);
            y[base + j] = x[base + j];
            continue;
        }
        double s, c;
        sincos((double)pos[row] * inv_freq[i], &s, &c);
        float sn = (float)(scale * (inverse ? -s : s)), cs = (float)(scale * c);
        float a = x[base + i], b = x[base + i + half];
        y[base + i] = a * cs - b * sn;
        y[base + i + half] = b * cs + a * sn;
    }
}
