"""LayerNorm and GPT-2's tanh GELU as one CPU op each way (forward, backward).

Jittor builds LayerNorm from a mean, a variance and elementwise ops, and its backward from a dozen
more, each a pass over the activations with its own parallel region; on a GPT-2 S training step
(25 LayerNorms of [1024, 768]) that is several times what one pass costs. Here each direction is
one ``jt.code`` op: the forward writes ``y``; the gradient ops recompute each row's mean and 1/std
from ``x`` (``dx`` per row; ``dw``/``db`` summed per thread, then over threads). They are the code
op's own gradient sources, so Jittor keeps alive only ``x``, as for its own ops (a ``jt.Function``
kept every output until the backward: +285 MB on a GPT-2 S LoRA step).

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

# Per-row statistics, shared by the forward and the gradients (which recompute them from x rather
# than keep them: one extra read of x, and Jittor's graph then holds only what its own ops would).
_ROW_STATS = r"""
static inline void jtl_row_stats(const float *x, long long C, float eps, float &u, float &rstd) {
    double s = 0;
    for (long long j = 0; j < C; j++) s += x[j];
    u = (float)(s / C);
    double v = 0;
    for (long long j = 0; j < C; j++) { const float d = x[j] - u; v += (double)d * d; }
    rstd = 1.0f / std::sqrt((float)(v / C) + eps);
}
"""

# in0 x [..., C] (N rows), in1 w [C], in2 b [C] -> out0 y [..., C]; @EPS is compiled in
_LN_FWD = r"""
const long long C = in1_shape0, N = in0->num / C;
#pragma omp parallel for schedule(static)
for (long long i = 0; i < N; i++) {
    const float *x = in0_p + i * C;
    float u, rstd;
    jtl_row_stats(x, C, @EPS, u, rstd);
    float *y = out0_p + i * C;
    for (long long j = 0; j < C; j++) y[j] = in1_p[j] * ((x[j] - u) * rstd) + in2_p[j];
}
"""

# gradient sources (Jittor's code op: in* are the forward inputs, dout the output's gradient, out0 the result)
_LN_DX = r"""
const long long C = in1_shape0, N = in0->num / C;
#pragma omp parallel for schedule(static)
for (long long i = 0; i < N; i++) {
    const float *x = in0_p + i * C, *g = dout_p + i * C;
    float u, rstd;
    jtl_row_stats(x, C, @EPS, u, rstd);
    double sg = 0, sgx = 0;
    for (long long j = 0; j < C; j++) {
        const float gw = g[j] * in1_p[j];
        sg += gw; sgx += (double)gw * ((x[j] - u) * rstd);
    }
    const float mg = (float)(sg / C), mgx = (float)(sgx / C);
    float *dx = out0_p + i * C;
    for (long long j = 0; j < C; j++) dx[j] = rstd * (g[j] * in1_p[j] - mg - ((x[j] - u) * rstd) * mgx);
}
"""
# dw (@XHAT 1) or db (@XHAT 0): column sums of dout·x̂ or dout, per thread then over threads
_LN_DWB = r"""
const long long C = in1_shape0, N = in0->num / C;
const int T = omp_get_max_threads();
std::vector<double> part((size_t)T * C, 0.0);
#pragma omp parallel
{
    double *acc = part.data() + (size_t)omp_get_thread_num() * C;
    #pragma omp for schedule(static)
    for (long long i = 0; i < N; i++) {
        const float *x = in0_p + i * C, *g = dout_p + i * C;
        if (@XHAT) {
            float u, rstd;
            jtl_row_stats(x, C, @EPS, u, rstd);
            for (long long j = 0; j < C; j++) acc[j] += (double)g[j] * ((x[j] - u) * rstd);
        } else {
            for (long long j = 0; j < C; j++) acc[j] += g[j];
        }
    }
}
for (long long j = 0; j < C; j++) {
    double t = 0;
    for (int k = 0; k < T; k++) t += part[(size_t)k * C + j];
    out0_p[j] = (float)t;
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
# gradient source: in0 x, dout g -> out0 dx
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


def layer_norm(x, weight, bias, eps: float):
    """``weight · (x - mean) / sqrt(var + eps) + bias`` over the last axis (biased variance), one op
    each way (a ``jt.code`` op with its own gradient sources, not a ``jt.Function``: a Function keeps
    its outputs alive until the backward, a plain op only what its gradient reads)."""
    e = repr(float(eps)) + "f"
    header = _HEADER + _ROW_STATS
    return jt.code(x.shape, "float32", [x, weight, bias],
                cpu_header=header, cpu_src=_LN_FWD.replace("@EPS", e),
                cpu_grad_src=[_LN_DX.replace("@EPS", e),
                              _LN_DWB.replace("@EPS", e).replace("@XHAT", "1"),
                              _LN_DWB.replace("@EPS", e).replace("@XHAT", "0")])


def gelu_tanh(x):
    """GPT-2's ``0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))``, one op each way (the gradient op
    reads only ``x``)."""
    return jt.code(x.shape, "float32", [x], cpu_header=_HEADER, cpu_src=_GELU_FWD,
                   cpu_grad_src=[_GELU_BWD.replace("in1_p[i]", "dout_p[i]")])
