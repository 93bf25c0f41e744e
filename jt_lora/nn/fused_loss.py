"""The tied LM head and the reference's token loss in one op, in vocabulary chunks.

Training computes, for the N positions that carry loss, ``logits = h @ wteᵀ`` ([N, V], V = 50257)
and from them the reference's per-token loss ``(1-ε)·nll + ε·mean_v(-log p_v)``. Jittor holds the
whole [N, V] logits and a few same-sized temporaries for their backward (batch 8 x 128: ~200 MB
each). ``fused_token_losses`` never does: it walks the vocabulary in chunks of ``chunk`` rows of
``wte`` (one oneDNN sgemm per chunk into a scratch block of N x chunk floats) and keeps per token
only an online logsumexp (running max and sum), the target's logit and the sum of the logits.

Gradients. The loss of token n depends on row n of h only, so its gradient w.r.t. h_n is known in
the forward pass up to the upstream factor g_n:

    dL_n/dh_n = Σ_v p_nv·w_v − (1−ε)·w_{t_n} − ε·mean_v(w_v)

and ``Σ_v p_nv·w_v`` accumulates online like the sum of the softmax (flash attention's rescaling:
the accumulator is multiplied by exp(m_old − m_new) when the running max grows). So with a frozen
head (LoRA, InA, (IA)³) the forward does two sgemms per chunk, logits and ``P @ w``, and the
backward only scales rows by g_n: the same FLOPs as the unfused path, no recomputation. That
gradient enters Jittor's graph through plain ops (``s - s.detach()`` with ``s_n = h_n·dL_n/dh_n``),
not a ``jt.Function``: with a Function, Jittor's executor kept far more alive during a step (GPT-2 M
LoRA, batch 8 x 128: +1.2 GB peak RSS over the unfused path; without it: -550 MB). When
``wte`` needs a gradient (full fine-tuning) ``dL/dwte`` needs g first, so the forward keeps only the
statistics and the backward recomputes each chunk's logits and does both products (one extra
head-sized sgemm over the unfused path, in exchange for never holding [N, V]).

CPU with oneDNN only (``fast_path_available()``); elsewhere, and when ``JT_LORA_FUSED_LOSS=0``,
callers keep the unfused path (``token_losses`` on materialised logits).
"""
import os

from ..backend import jt
from .kernels import fast_path_available

__all__ = ["fused_token_losses", "fused_loss_enabled", "default_chunk"]

_HEADER = r"""
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
extern "C" int dnnl_sgemm(char transa, char transb, long long M, long long N, long long K,
    float alpha, const float *A, long long lda, const float *B, long long ldb,
    float beta, float *C, long long ldc);
"""

# in0 h [N, C], in1 wte [V, C], in2 targets [N] int32 -> out0 loss [N], out1 lse [N],
# out2 (@DH) dL_n/dh_n [N, C]. Per chunk of wte rows: Z = h @ wc^T (sgemm), then per row the online
# max/sum, target logit and logit sum; with @DH, Z becomes exp(Z - m_new) and acc += Z @ wc.
_FWD_SRC = r"""
const long long N = in0_shape0, C = in0_shape1, V = in1_shape0;
const float* H = in0_p; const float* W = in1_p; const int* T = in2_p;
const double eps = (double)data["eps"];
const long long VC = std::max<long long>(1, std::min<long long>((long long)data["chunk"], V));
float* Z = (float*)std::malloc(sizeof(float) * N * VC);
float* m = (float*)std::malloc(sizeof(float) * N);
double* s = (double*)std::calloc(N, sizeof(double));
double* zsum = (double*)std::calloc(N, sizeof(double));
float* zt = (float*)std::calloc(N, sizeof(float));
for (long long n = 0; n < N; n++) m[n] = -INFINITY;
#if @DH
float* acc = out2_p;
std::memset(acc, 0, sizeof(float) * N * C);
float* wsum = (float*)std::calloc(C, sizeof(float));   // column sums of wte (the ε term)
float* ones = (float*)std::malloc(sizeof(float) * VC);
for (long long j = 0; j < VC; j++) ones[j] = 1.f;
#endif
for (long long v0 = 0; v0 < V; v0 += VC) {
    const long long vc = std::min(VC, V - v0);
    const float* Wc = W + v0 * C;
    dnnl_sgemm('N', 'T', N, vc, C, 1.f, H, C, Wc, C, 0.f, Z, vc);
    #pragma omp parallel for schedule(static)
    for (long long n = 0; n < N; n++) {
        float* z = Z + n * vc;
        float mx = m[n], zs = 0.f;
        for (long long j = 0; j < vc; j++) { mx = z[j] > mx ? z[j] : mx; zs += z[j]; }
        zsum[n] += zs;
        const long long tj = (long long)T[n] - v0;
        if (tj >= 0 && tj < vc) zt[n] = z[tj];
        const float sc = std::exp(m[n] - mx);   // 0 on the first chunk (m = -inf)
        float sum = 0.f;
        for (long long j = 0; j < vc; j++) { const float e = std::exp(z[j] - mx); sum += e;
#if @DH
            z[j] = e;
#endif
        }
        s[n] = s[n] * sc + sum;
        m[n] = mx;
#if @DH
        float* a = acc + n * C;
        if (sc != 1.f) for (long long c = 0; c < C; c++) a[c] *= sc;
#endif
    }
#if @DH
    dnnl_sgemm('N', 'N', N, C, vc, 1.f, Z, vc, Wc, C, 1.f, acc, C);
    if (eps > 0) dnnl_sgemm('N', 'N', 1, C, vc, 1.f, ones, vc, Wc, C, 1.f, wsum, C);
#endif
}
#pragma omp parallel for schedule(static)
for (long long n = 0; n < N; n++) {
    const double lse = (double)m[n] + std::log(s[n]);
    out1_p[n] = (float)lse;
    out0_p[n] = (float)(lse - (1.0 - eps) * zt[n] - eps * (zsum[n] / V));
#if @DH
    const float inv = (float)(1.0 / s[n]);
    const long long t = T[n];
    const float* wt = (t >= 0 && t < V) ? W + t * C : nullptr;
    float* a = acc + n * C;
    for (long long c = 0; c < C; c++)
        a[c] = a[c] * inv - (wt ? (float)(1.0 - eps) * wt[c] : 0.f) - (float)(eps / V) * wsum[c];
#endif
}
#if @DH
std::free(wsum); std::free(ones);
#endif
std::free(Z); std::free(m); std::free(s); std::free(zsum); std::free(zt);
"""

# in0 h [N, C], in1 wte [V, C], in2 targets [N], in3 lse [N], in4 upstream g [N] -> out0 dh [N, C],
# out1 (@DW) dwte [V, C]. Per chunk: G = g_n·(exp(Z - lse_n) − ε/V − (1−ε)·[v = t_n]);
# dh += G @ wc; dwte[chunk] = Gᵀ @ h.
_BWD_SRC = r"""
const long long N = in0_shape0, C = in0_shape1, V = in1_shape0;
const float* H = in0_p; const float* W = in1_p; const int* T = in2_p;
const float* L = in3_p; const float* Gu = in4_p;
const double eps = (double)data["eps"];
const long long VC = std::max<long long>(1, std::min<long long>((long long)data["chunk"], V));
float* Z = (float*)std::malloc(sizeof(float) * N * VC);
const float ev = (float)(eps / V), keep = (float)(1.0 - eps);
for (long long v0 = 0; v0 < V; v0 += VC) {
    const long long vc = std::min(VC, V - v0);
    const float* Wc = W + v0 * C;
    dnnl_sgemm('N', 'T', N, vc, C, 1.f, H, C, Wc, C, 0.f, Z, vc);
    #pragma omp parallel for schedule(static)
    for (long long n = 0; n < N; n++) {
        float* z = Z + n * vc;
        const float g = Gu[n], l = L[n];
        for (long long j = 0; j < vc; j++) z[j] = g * (std::exp(z[j] - l) - ev);
        const long long tj = (long long)T[n] - v0;
        if (tj >= 0 && tj < vc) z[tj] -= g * keep;
    }
    dnnl_sgemm('N', 'N', N, C, vc, 1.f, Z, vc, Wc, C, v0 == 0 ? 0.f : 1.f, out0_p, C);
#if @DW
    dnnl_sgemm('T', 'N', vc, C, N, 1.f, Z, vc, H, C, 0.f, out1_p + v0 * C, C);
#endif
}
std::free(Z);
"""

_SCRATCH_FLOATS = 1 << 23   # the per-chunk logits block: 32 MB (see default_chunk)


def default_chunk(rows: int, vocab: int) -> int:
    """Vocabulary rows per chunk: a scratch block of about 4 MB (N x chunk floats), at least 256
    rows so each sgemm stays large enough for oneDNN's blocking."""
    return int(max(256, min(vocab, _SCRATCH_FLOATS // max(rows, 1))))


def fused_loss_enabled(wte=None) -> bool:
    """Whether the trainer takes the fused head + loss: never off the CPU fast path; otherwise
    ``JT_LORA_FUSED_LOSS=1`` always, ``=0`` never, unset: when the head ``wte`` is frozen (adapters,
    evaluation). A trained head (full fine-tuning) goes through a ``jt.Function`` whose memory in a
    full step was not measured, so it is opt-in."""
    if not fast_path_available():
        return False
    flag = os.environ.get("JT_LORA_FUSED_LOSS", "")
    if flag in ("0", "1"):
        return flag == "1"
    return wte is None or wte.is_stop_grad() or bool(jt.flags.no_grad)


def _forward(h, wte, targets, eps, chunk, with_dh: bool):
    n, c = h.shape
    data = {"eps": float(eps), "chunk": int(chunk)}
    shapes = [(n,), (n,)] + ([(n, c)] if with_dh else [])
    outs = jt.code(shapes, ["float32"] * len(shapes), [h, wte, targets], cpu_header=_HEADER,
                   cpu_src=_FWD_SRC.replace("@DH", "1" if with_dh else "0"), data=data)
    return outs


class _FusedHeadLossTrainedHead(jt.Function):
    """Full fine-tuning: statistics in the forward, dL/dh and dL/dwte from recomputed chunks."""

    def execute(self, h, wte, targets, eps, chunk, need_h):
        self.h, self.wte, self.targets, self.eps, self.chunk, self.need_h = h, wte, targets, eps, chunk, need_h
        loss, self.lse = _forward(h, wte, targets, eps, chunk, with_dh=False)
        return loss

    def grad(self, g):
        n, c = self.h.shape
        dh, dw = jt.code([(n, c), tuple(self.wte.shape)], ["float32", "float32"],
                         [self.h, self.wte, self.targets, self.lse, g], cpu_header=_HEADER,
                         cpu_src=_BWD_SRC.replace("@DW", "1"), data={"eps": float(self.eps), "chunk": int(self.chunk)})
        return (dh if self.need_h else None), dw, None, None, None, None


def fused_token_losses(h, wte, targets, label_smooth: float = 0.0, chunk: int = None):
    """Per-token loss [N] of ``logits = h @ wteᵀ`` as ``token_losses`` (``(1-ε)·nll + ε·mean_v(-log
    p_v)``, plain nll when ε <= 1e-4), without materialising the logits; gradients for ``h`` and, when
    it is not frozen, ``wte``.

    Args:
        h: [N, C] float32 hidden states of the positions that carry loss.
        wte: [V, C] float32, the tied embedding / LM head.
        targets: [N] int ids in [0, V).
        label_smooth: ε.
        chunk: vocabulary rows per chunk (default: ``default_chunk``).
    """
    if h.ndim != 2 or wte.ndim != 2 or h.shape[1] != wte.shape[1]:
        raise ValueError(f"shapes do not match: h {tuple(h.shape)}, wte {tuple(wte.shape)}")
    eps = float(label_smooth) if label_smooth > 0.0001 else 0.0
    chunk = int(chunk) if chunk else default_chunk(h.shape[0], wte.shape[0])
    grad_on = not jt.flags.no_grad
    need_h = grad_on and not h.is_stop_grad()
    need_w = grad_on and not wte.is_stop_grad()
    targets = targets.int32()
    if need_w:
        return _FusedHeadLossTrainedHead.apply(h, wte, targets, eps, chunk, need_h)
    if not need_h:
        return _forward(h, wte, targets, eps, chunk, with_dh=False)[0]
    # Frozen head: dL_n/dh_n comes out of the forward. s_n = h_n·dL_n/dh_n (a constant) has exactly
    # that gradient, and s - s.detach() adds exactly 0 to the value. Plain Jittor ops rather than a
    # jt.Function: with the Function Jittor's executor kept ~1.9 GB more alive during a GPT-2 M
    # LoRA step (batch 8 x 128), more than the [N, V] logits it replaces.
    from . import bf16
    if bf16.active():   # --precision bf16: the two vocabulary-sized products in bf16
        loss, dh = bf16.fused_head_loss(h.detach(), wte, targets, eps, chunk, _FWD_SRC, _HEADER)
    else:
        loss, _, dh = _forward(h.detach(), wte, targets, eps, chunk, with_dh=True)
    s = (h * dh.detach()).sum(1)
    return loss.detach() + (s - s.detach())
