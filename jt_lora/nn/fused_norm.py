"""LayerNorm and GPT-2's tanh GELU as one CPU op each way (forward, backward).

Jittor builds LayerNorm from a mean, a variance and elementwise ops, and its backward from a dozen
more, each a pass over the activations with its own parallel region; on a GPT-2 S training step
(25 LayerNorms of [1024, 768]) that is several times what one pass costs. Here each direction is
one ``jt.code`` op: the forward writes ``y`` and the per-row mean and 1/std, the backward reads
them back (``dx`` per row; ``dw``/``db`` summed per thread, then over threads).

The formulas are the reference's (microsoft/LoRA's ``LayerNorm``: biased variance, eps inside the
square root; GPT-2's tanh GELU), with row sums in double, so results agree with the unfused ops
to float rounding (tested against numpy float64). CPU with the fast path only; elsewhere the
model keeps Jittor's own ops (``use_fused_norm``). ``JT_LORA_FUSED_NORM=0`` turns it off.
"""
import math
import os

from ..backend import jt
from .kernels import fast_path_available

__all__ = ["layer_norm", "gelu_tanh", "use_fused_norm"]

_HEADER = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
// exp from a range-reduced polynomial (Cephes' expf coefficients), written so that the compiler
// vectorises the GELU loops; relative error ~1e-7.
static inline float jtl_exp_neg(float x) {  // e^x for x <= 0
    x = x < -87.0f ? -87.0f : x;
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}
// 1 + tanh(z) and 1 - tanh(z)^2 from e = exp(-2|z|) without cancellation: 2/(1+e) or 2e/(1+e),
// and 4e/(1+e)^2 (forming tanh first and subtracting loses everything where x^3 makes |z| large).
static inline float jtl_one_plus_tanh(float z, float e) {
    return (z >= 0 ? 2.0f : 2.0f * e) / (1.0f + e);
}
static inline float jtl_sech2(float e) {
    const float d = 1.0f + e;
    return 4.0f * e / (d * d);
}
"""

# in0 x [N, C], in1 w [C], in2 b [C], in3 eps [1] -> out0 y [N, C], out1 mean [N], out2 rstd [N]
_LN_FWD = r"""
const long long N = in0_shape0, C = in0_shape1;
const float eps = in3_p[0];
#pragma omp parallel for schedule(static)
for (long long i = 0; i < N; i++) {
    const float *x = in0_p + i * C;
    double s = 0;
    for (long long j = 0; j < C; j++) s += x[j];
    const float u = (float)(s / C);
    double v = 0;
    for (long long j = 0; j < C; j++) { const float d = x[j] - u; v += (double)d * d; }
    const float rstd = 1.0f / std::sqrt((float)(v / C) + eps);
    float *y = out0_p + i * C;
    for (long long j = 0; j < C; j++) y[j] = in1_p[j] * ((x[j] - u) * rstd) + in2_p[j];
    out1_p[i] = u;
    out2_p[i] = rstd;
}
"""

# in0 g [N, C], in1 x [N, C], in2 w [C], in3 mean [N], in4 rstd [N] -> out0 dx [N, C], out1 dw [C], out2 db [C]
_LN_BWD = r"""
const long long N = in0_shape0, C = in0_shape1;
const int T = omp_get_max_threads();
std::vector<double> part((size_t)T * 2 * C, 0.0);
#pragma omp parallel
{
    double *dw = part.data() + (size_t)omp_get_thread_num() * 2 * C, *db = dw + C;
    #pragma omp for schedule(static)
    for (long long i = 0; i < N; i++) {
        const float *g = in0_p + i * C, *x = in1_p + i * C;
        const float u = in3_p[i], rstd = in4_p[i];
        double sg = 0, sgx = 0;
        for (long long j = 0; j < C; j++) {
            const float xh = (x[j] - u) * rstd, gw = g[j] * in2_p[j];
            sg += gw; sgx += (double)gw * xh;
            dw[j] += (double)g[j] * xh; db[j] += g[j];
        }
        const float mg = (float)(sg / C), mgx = (float)(sgx / C);
        float *dx = out0_p + i * C;
        for (long long j = 0; j < C; j++) {
            const float xh = (x[j] - u) * rstd;
            dx[j] = rstd * (g[j] * in2_p[j] - mg - xh * mgx);
        }
    }
}
for (long long j = 0; j < C; j++) {
    double w = 0, b = 0;
    for (int t = 0; t < T; t++) { w += part[(size_t)t * 2 * C + j]; b += part[(size_t)t * 2 * C + C + j]; }
    out1_p[j] = (float)w; out2_p[j] = (float)b;
}
"""

_K = math.sqrt(2.0 / math.pi)
# in0 x -> out0 gelu(x)
_GELU_FWD = r"""
const long long n = in0->num;
const float k = @K;
#pragma omp parallel for simd schedule(static)
for (long long i = 0; i < n; i++) {
    const float x = in0_p[i];
    const float z = k * (x + 0.044715f * x * x * x);
    out0_p[i] = 0.5f * x * jtl_one_plus_tanh(z, jtl_exp_neg(-2.0f * std::fabs(z)));
}
""".replace("@K", repr(_K) + "f")
# in0 x, in1 g -> out0 dx
_GELU_BWD = r"""
const long long n = in0->num;
const float k = @K;
#pragma omp parallel for simd schedule(static)
for (long long i = 0; i < n; i++) {
    const float x = in0_p[i];
    const float z = k * (x + 0.044715f * x * x * x);
    const float e = jtl_exp_neg(-2.0f * std::fabs(z));
    out0_p[i] = in1_p[i] * (0.5f * jtl_one_plus_tanh(z, e)
                            + 0.5f * x * jtl_sech2(e) * k * (1.0f + 3.0f * 0.044715f * x * x));
}
""".replace("@K", repr(_K) + "f")

_ENABLED = None


def use_fused_norm() -> bool:
    """Whether the model's LayerNorm and GELU take these ops (CPU fast path, not turned off)."""
    global _ENABLED
    if _ENABLED is None:
        _ENABLED = fast_path_available() and os.environ.get("JT_LORA_FUSED_NORM", "1") != "0"
    return _ENABLED


class _LayerNorm(jt.Function):
    def execute(self, x, w, b, eps):
        y, mean, rstd = jt.code([x.shape, (x.shape[0],), (x.shape[0],)], ["float32"] * 3, [x, w, b, eps],
                                cpu_header=_HEADER, cpu_src=_LN_FWD)
        self.saved = (x, w, mean, rstd)
        return y

    def grad(self, g):
        x, w, mean, rstd = self.saved
        dx, dw, db = jt.code([x.shape, w.shape, w.shape], ["float32"] * 3, [g, x, w, mean, rstd],
                             cpu_header=_HEADER, cpu_src=_LN_BWD)
        return dx, dw, db, None


def layer_norm(x, weight, bias, eps: float):
    """``weight · (x - mean) / sqrt(var + eps) + bias`` over the last axis (biased variance), one op."""
    shape = x.shape
    y = _LayerNorm.apply(x.reshape(-1, shape[-1]), weight, bias, jt.array([eps], dtype="float32"))
    return y.reshape(shape)


class _Gelu(jt.Function):
    def execute(self, x):
        self.x = x
        return jt.code(x.shape, "float32", [x], cpu_header=_HEADER, cpu_src=_GELU_FWD)

    def grad(self, g):
        return jt.code(self.x.shape, "float32", [self.x, g], cpu_header=_HEADER, cpu_src=_GELU_BWD)


def gelu_tanh(x):
    """GPT-2's ``0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))``, one op each way."""
    return _Gelu.apply(x)
