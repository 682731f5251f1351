// AdamW on device (decoupled weight decay, bias correction), one thread per element:
//   m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  p ← p − lr·(m·ibc1 / (√(v·ibc2) + eps) + wd·p)
// with ibc1 = 1/(1 − β1^t), ibc2 = 1/(1 − β2^t) computed in f64 on the host, matching optim::AdamW on the CPU.
#include "common.cuh"

extern "C" __global__ void adamw_step(float* p, float* m, float* v, const float* g, long n, float lr, float beta1, float beta2,
                                      float eps, float wd, float ibc1, float ibc2) {
    FOR_EACH(i, n) {
        float gi = g[i];
        float mi = beta1 * m[i] + (1.f - beta1) * gi;
        float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float upd = (mi * ibc1) / (sqrtf(vi * ibc2) + eps);
        p[i] = p[i] - lr * (upd + wd * p[i]);
    }
}
