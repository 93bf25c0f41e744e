"""Attention's core, ``softmax(mask(q·kᵀ/√d))·v`` for every head, as one op each way (CPU fast path).

Through Jittor's ops a GPT-2 S training step spent ~180 ms of ~2.4 s around attention's products
rather than in them: slicing q, k and v out of ``c_attn``'s output (a getitem forward, a setitem
into a materialised zero tensor backward), transposing them to ``[B, H, T, D]`` and the result
back, plus a separate softmax pass each way. Here the op reads q, k and v in place from the
``[B, T, 3C]`` projection (oneDNN's sgemm takes the row stride ``3C``), runs the reference's
masked softmax between the two products, and writes ``a`` straight into ``[B, T, C]``; the
backward writes the gradient of ``qkv`` in place the same way. One (batch, head) pair per OpenMP
iteration, each doing its four (backward: four) products sequentially.

It applies to a first pass without cache, head mask, kept probabilities or attention dropout in
training (:func:`attention_core_applies`); the model's unfused path stays for everything else and
is what the tests compare it with (``tests/test_fused_attention.py``). ``JT_LORA_FUSED_ATTENTION=0``
turns it off.
"""
from __future__ import annotations

import os

from ..backend import jt
from .kernels import MASKED_SOFTMAX_CPP, fast_path_available

__all__ = ["attention_core", "attention_core_applies"]

_HEADER = r"""
#include <cmath>
#include <vector>
extern "C" int dnnl_sgemm(char transa, char transb, long long M, long long N, long long K,
    float alpha, const float *A, long long lda, const float *B, long long ldb,
    float beta, float *C, long long ldc);
""" + MASKED_SOFTMAX_CPP

# in0 qkv [B, T, 3C]; in1 keep [Bk, Hk, T, T] (Bk in {1, B}, Hk in {1, H}); data heads, sqrt_d.
_SHAPES = r"""
const long long B = in0_shape0, T = in0_shape1, C3 = in0_shape2, C = C3 / 3;
const long long H = (long long)data["heads"], D = C / H, Bk = in1_shape0, Hk = in1_shape1;
const float sqrt_d = (float)data["sqrt_d"];
"""

# -> out0 a [B, T, C], out1 probs [B, H, T, T]: p = softmax(s / sqrt(D) * keep - 1e10 * (1 - keep)), the
# reference's masked softmax (as kernels.attention_softmax), then a = p v.
_FORWARD_SRC = _SHAPES + r"""
#pragma omp parallel for schedule(static)
for (long long bh = 0; bh < B * H; bh++) {
    const long long b = bh / H, h = bh % H;
    const float* Q = in0_p + b * T * C3 + h * D;
    const float* K = Q + C;
    const float* V = Q + 2 * C;
    float* P = out1_p + bh * T * T;
    dnnl_sgemm('N', 'T', T, T, D, 1.f, Q, C3, K, C3, 0.f, P, T);
    const float* keep0 = in1_p + ((Bk == 1 ? 0 : b) * Hk + (Hk == 1 ? 0 : h)) * T * T;
    for (long long i = 0; i < T; i++) jtl_masked_softmax_row(P + i * T, keep0 + i * T, T, sqrt_d, P + i * T);
    dnnl_sgemm('N', 'N', T, D, T, 1.f, P, T, V, C3, 0.f, out0_p + b * T * C + h * D, C);
}
"""

# The gradient source of qkv (Jittor's code op: in0/in1 the forward inputs, dout the gradient of a,
# pout1 the forward's probs) -> out0 grad of qkv [B, T, 3C]:
# dV = pᵀ da; dP = da vᵀ; dS = keep / sqrt(D) * p * (dP - rowsum(p dP)); dQ = dS k; dK = dSᵀ q.
_BACKWARD_SRC = _SHAPES + r"""
#pragma omp parallel
{
    std::vector<float> dP((size_t)(T * T));
    #pragma omp for schedule(static)
    for (long long bh = 0; bh < B * H; bh++) {
        const long long b = bh / H, h = bh % H;
        const float* Q = in0_p + b * T * C3 + h * D;
        const float* K = Q + C;
        const float* V = Q + 2 * C;
        const float* P = pout1_p + bh * T * T;
        const float* GA = dout_p + b * T * C + h * D;
        float* GQ = out0_p + b * T * C3 + h * D;
        float* GK = GQ + C;
        float* GV = GQ + 2 * C;
        dnnl_sgemm('T', 'N', T, D, T, 1.f, P, T, GA, C, 0.f, GV, C3);
        dnnl_sgemm('N', 'T', T, T, D, 1.f, GA, C, V, C3, 0.f, dP.data(), T);
        const float* keep0 = in1_p + ((Bk == 1 ? 0 : b) * Hk + (Hk == 1 ? 0 : h)) * T * T;
        for (long long i = 0; i < T; i++)
            jtl_masked_softmax_grad_row(P + i * T, dP.data() + i * T, keep0 + i * T, T, sqrt_d, dP.data() + i * T);
        dnnl_sgemm('N', 'N', T, D, T, 1.f, dP.data(), T, K, C3, 0.f, GQ, C3);
        dnnl_sgemm('T', 'N', T, D, T, 1.f, dP.data(), T, Q, C3, 0.f, GK, C3);
    }
}
"""


def attention_core_applies(qkv, keep, heads: int) -> bool:
    """Whether :func:`attention_core` takes this call (CPU fast path, float32, a mask that
    broadcasts over batch and heads, heads dividing the width; ``JT_LORA_FUSED_ATTENTION`` not 0)."""
    if os.environ.get("JT_LORA_FUSED_ATTENTION", "1") == "0" or not fast_path_available():
        return False
    if qkv.ndim != 3 or qkv.dtype != "float32" or keep.dtype != "float32" or qkv.shape[2] % (3 * heads):
        return False
    b, t = qkv.shape[:2]
    return (keep.ndim == 4 and keep.shape[0] in (1, b) and keep.shape[1] in (1, heads)
            and tuple(keep.shape[2:]) == (t, t))


def attention_core(qkv, keep, heads: int, sqrt_d: float):
    """``a [B, T, C]`` = per head ``softmax(q·kᵀ / sqrt_d · keep − 1e10 · (1 − keep)) · v`` with q, k, v
    the thirds of ``qkv [B, T, 3C]`` split into ``heads`` heads; gradient for ``qkv`` only."""
    b, t, c3 = qkv.shape
    data = {"heads": float(heads), "sqrt_d": float(sqrt_d)}
    # a code op with its own gradient source (a jt.Function kept more of the graph alive: see
    # nn.fused_norm); only out0's gradient is ever asked for, probs stay internal
    a, _ = jt.code([(b, t, c3 // 3), (b, int(heads), t, t)], ["float32", "float32"], [qkv, keep.stop_grad()],
                   cpu_header=_HEADER, cpu_src=_FORWARD_SRC, cpu_grad_src=[_BACKWARD_SRC, ""], data=data)
    return a
