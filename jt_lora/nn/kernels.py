"""Matrix products on the CPU where Jittor's own mapping is slow.

* ``batched_matmul``: Jittor maps only 2-D products onto oneDNN; a batched product such as
  attention's ``q @ k^T`` over [batch·heads] becomes a broadcast-multiply-reduce that runs at a
  few GFLOP/s. It issues one ``dnnl_sgemm`` per batch entry from a small Jittor ``code`` op
  instead (the library is already loaded by Jittor's oneDNN ops), with its own backward.
* ``small_rows_matmul``: inference products with a handful of rows (a decoding step: batch x beam
  rows against a whole weight matrix) are bound by reading the weight once; oneDNN's sgemm packs
  the weight first and reaches ~60% of the bandwidth its own matrix-vector path gets. A
  register-blocked kernel that streams the weight in its stored layout does better (GPT-2 S,
  10 rows: ~23 vs ~33 ms per step for the 48 block projections, ~11 vs ~29 ms for the tied LM head).

Shapes are read at run time, so new sequence lengths do not trigger recompilation. On CUDA, or
without oneDNN, both fall back to ``jt.matmul`` (cuBLAS has a batched product of its own).
"""
import functools
import math

from ..backend import cpu_flags, jt, nn, onednn_available, use_cuda
from . import bf16 as _bf16

__all__ = ["batched_matmul", "dense", "small_rows_matmul", "use_small_rows", "fast_path_available", "SMALL_ROWS_MAX",
           "DECODE_ATTEND_CPP", "MASKED_SOFTMAX_CPP"]

_HEADER = r"""
extern "C" int dnnl_sgemm(char transa, char transb, long long M, long long N, long long K,
    float alpha, const float *A, long long lda, const float *B, long long ldb,
    float beta, float *C, long long ldc);
"""
# in0: a [G, n, m] (or [G, m, n] when TA), in1: b [G, m, k] (or [G, k, m] when TB) -> out0 [G, n, k]
_SRC = r"""
const long long G = in0_shape0;
const long long n = @TA ? in0_shape2 : in0_shape1;
const long long m = @TA ? in0_shape1 : in0_shape2;
const long long k = @TB ? in1_shape1 : in1_shape2;
const long long sa = in0_shape1 * in0_shape2, sb = in1_shape1 * in1_shape2, sc = n * k;
if (G == 1) {  // one product: let oneDNN use every thread itself
    dnnl_sgemm(@TA ? 'T' : 'N', @TB ? 'T' : 'N', n, k, m, 1.f, in0_p, @TA ? n : m, in1_p, @TB ? m : k,
               0.f, out0_p, k);
} else {       // many small products: one thread each (oneDNN runs serially inside the region)
    #pragma omp parallel for schedule(static)
    for (long long g = 0; g < G; g++)
        dnnl_sgemm(@TA ? 'T' : 'N', @TB ? 'T' : 'N', n, k, m, 1.f,
                   in0_p + g * sa, @TA ? n : m, in1_p + g * sb, @TB ? m : k, 0.f, out0_p + g * sc, k);
}
"""


# One (row, head) of a decode step's attention, shared by generation.cache.DecodeCache's op and
# nn.decode_block's fused block: softmax(q·k / sqrt(D))·v over the row's prompt keys (padding, mask 0,
# scored -1e10 as the reference's masked attention) and the keys its ancestry stored in the step
# buffers (slot s, row path[s]; this step's own row at slot t). w / vrow: scratch of Tp + t + 1.
DECODE_ATTEND_CPP = r"""
static inline void jtl_attend_one(const float* q, const float* pk, const float* pv, const float* pm, long long Tp,
                                  const float* Kb, const float* Vb, const int* path, long long t, long long r,
                                  long long cap, long long C, long long hoff, long long D, float sqrt_d,
                                  float* w, const float** vrow, float* o) {
    long long n = 0;
    for (long long j = 0; j < Tp; j++, n++) {
        float s = 0.f;
        for (long long d = 0; d < D; d++) s += q[d] * pk[j * D + d];
        w[n] = pm[j] > 0.f ? s / sqrt_d : -1e10f;
        vrow[n] = pv + j * D;
    }
    for (long long s = 0; s <= t; s++, n++) {
        const long long row = s < t ? path[s] : r;
        const float* k = Kb + (s * cap + row) * C + hoff;
        float a = 0.f;
        for (long long d = 0; d < D; d++) a += q[d] * k[d];
        w[n] = a / sqrt_d;
        vrow[n] = Vb + (s * cap + row) * C + hoff;
    }
    float mx = w[0];
    for (long long j = 1; j < n; j++) mx = w[j] > mx ? w[j] : mx;
    float sum = 0.f;
    for (long long j = 0; j < n; j++) { w[j] = std::exp(w[j] - mx); sum += w[j]; }
    for (long long d = 0; d < D; d++) o[d] = 0.f;
    for (long long j = 0; j < n; j++) {
        const float pj = w[j] / sum;
        const float* v = vrow[j];
        for (long long d = 0; d < D; d++) o[d] += pj * v[d];
    }
}
"""

_FAST = None


def fast_path_available() -> bool:
    global _FAST
    if _FAST is None:
        _FAST = onednn_available() and not use_cuda()
    return _FAST


def _sgemm_batched(a, b, ta: bool, tb: bool):
    g = a.shape[0]
    n = a.shape[2] if ta else a.shape[1]
    k = b.shape[1] if tb else b.shape[2]
    src = _SRC.replace("@TA", "1" if ta else "0").replace("@TB", "1" if tb else "0")
    return jt.code((g, n, k), "float32", [a, b], cpu_header=_HEADER, cpu_src=src)


class _BatchedMatmul(jt.Function):
    def execute(self, a, b, tb):
        self.a, self.b, self.tb = a, b, tb
        return _sgemm_batched(a, b, False, tb)

    def grad(self, gc):
        a, b = self.a, self.b
        if self.tb:  # c = a @ b^T: da = gc @ b, db = gc^T @ a
            return _sgemm_batched(gc, b, False, False), _sgemm_batched(gc, a, True, False), None
        # c = a @ b: da = gc @ b^T, db = a^T @ gc
        return _sgemm_batched(gc, b, False, True), _sgemm_batched(a, gc, True, False), None


def batched_matmul(a, b, transpose_b: bool = False):
    """``a @ b`` (or ``a @ b^T``) over leading batch dimensions, float32.

    Args:
        a: [..., n, m]; b: [..., m, k] (or [..., k, m] with ``transpose_b``); same leading dims.
    """
    if not fast_path_available() or a.dtype != "float32" or b.dtype != "float32":
        return jt.matmul(a, b.transpose(*range(b.ndim - 2), b.ndim - 1, b.ndim - 2) if transpose_b else b)
    lead = a.shape[:-2]
    a3 = a.reshape((-1,) + tuple(a.shape[-2:]))
    b3 = b.reshape((-1,) + tuple(b.shape[-2:]))
    out = _BatchedMatmul.apply(a3, b3, transpose_b)
    return out.reshape(tuple(lead) + tuple(out.shape[-2:]))


# ----------------------------------------------------------------------------------------------
# Few rows against a large weight (decoding): stream the weight once, rows held in registers.

SMALL_ROWS_MAX = 64   # above this many rows oneDNN's packed sgemm is as fast

_SMALL_HEADER = r"""
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <omp.h>
extern "C" int dnnl_sgemm(char transa, char transb, long long M, long long N, long long K,
    float alpha, const float *A, long long lda, const float *B, long long ldb,
    float beta, float *C, long long ldc);
#if defined(__AVX512F__)
#define JTL_VEC 16
#elif defined(__AVX__)
#define JTL_VEC 8
#else
#define JTL_VEC 4
#endif
#define JTL_KB 16
typedef float jtl_vec __attribute__((vector_size(JTL_VEC * 4)));
static inline jtl_vec jtl_load(const float* p) { jtl_vec v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void jtl_store(float* p, jtl_vec v) { __builtin_memcpy(p, &v, sizeof v); }
"""

# The row count is compiled in (@M, a bucket of at most _strip_rows_max() rows; the actual count
# M <= @M is read at run time and missing rows count as zeros): the accumulators then stay in
# registers (a run-time row count behind a switch ran ~30% slower). in0 x [M, K], in1 w [K, N],
# in2 bias [N] when @BIAS -> out0 [M, N].
_STRIP_SRC = r"""
const long long M = in0_shape0, K = in0_shape1, N = in1_shape1;
const float* X = in0_p; const float* W = in1_p; float* Y = out0_p;
const float* B = @BIAS ? (const float*)@BIAS_P : nullptr;
// column strips of two vectors, k in blocks of JTL_KB rows: JTL_KB interleaved sequential streams
const long long S = 2 * JTL_VEC, nstrips = N / S;
#pragma omp parallel
{
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const long long s0 = nstrips * tid / nt, s1 = nstrips * (tid + 1) / nt;
    float xk[JTL_KB][@M];
    for (long long k0 = 0; k0 < K; k0 += JTL_KB) {
        const int kn = (int)std::min<long long>(JTL_KB, K - k0);
        for (int k = 0; k < kn; k++)
            for (int r = 0; r < @M; r++) xk[k][r] = r < M ? X[r * K + k0 + k] : 0.f;
        for (long long s = s0; s < s1; s++) {
            const long long j0 = s * S;
            jtl_vec a0[@M], a1[@M];
            for (int r = 0; r < @M; r++) {
                if (k0 == 0 || r >= M) { a0[r] = (jtl_vec){}; a1[r] = (jtl_vec){}; }
                else { a0[r] = jtl_load(Y + r * N + j0); a1[r] = jtl_load(Y + r * N + j0 + JTL_VEC); }
            }
            const float* w = W + k0 * N + j0;
            for (int k = 0; k < kn; k++, w += N) {
                // two strips ahead in this row: the hardware prefetcher alone falls behind on
                // JTL_KB interleaved streams (~25 -> ~22 ms for GPT-2 S's 48 projections, 10 rows)
                __builtin_prefetch(w + 4 * JTL_VEC);
                __builtin_prefetch(w + 5 * JTL_VEC);
                const jtl_vec w0 = jtl_load(w), w1 = jtl_load(w + JTL_VEC);
                for (int r = 0; r < @M; r++) { a0[r] += xk[k][r] * w0; a1[r] += xk[k][r] * w1; }
            }
            if (B && k0 + kn == K) {
                const jtl_vec b0 = jtl_load(B + j0), b1 = jtl_load(B + j0 + JTL_VEC);
                for (int r = 0; r < @M; r++) { a0[r] += b0; a1[r] += b1; }
            }
            for (int r = 0; r < @M; r++)
                if (r < M) { jtl_store(Y + r * N + j0, a0[r]); jtl_store(Y + r * N + j0 + JTL_VEC, a1[r]); }
        }
    }
}
for (long long j = nstrips * S; j < N; j++)   // columns past the last whole strip
    for (long long r = 0; r < M; r++) {
        float a = 0.f;
        for (long long k = 0; k < K; k++) a += X[r * K + k] * W[k * N + j];
        Y[r * N + j] = a + (B ? B[j] : 0.f);
    }
"""

# W [N, K] with few rows: two weight rows at a time against every input row held in registers,
# weight rows prefetched 8 ahead (~11 vs ~14 ms for oneDNN's best layout on GPT-2 S's LM head).
_DOT_SRC = r"""
const long long M = in0_shape0, K = in0_shape1, N = in1_shape0, KV = K / JTL_VEC * JTL_VEC;
const float* W = in1_p; float* Y = out0_p;
const float* B = @BIAS ? (const float*)@BIAS_P : nullptr;
float* X = (float*)std::calloc(@M * K, sizeof(float));   // the rows, zero-padded to the bucket
std::memcpy(X, in0_p, sizeof(float) * M * K);
#pragma omp parallel for schedule(static)
for (long long n = 0; n < N - 1; n += 2) {
    const float* w0p = W + n * K; const float* w1p = w0p + K;
    jtl_vec a[@M], b[@M];
    for (int r = 0; r < @M; r++) { a[r] = (jtl_vec){}; b[r] = (jtl_vec){}; }
    for (long long k = 0; k < KV; k += JTL_VEC) {
        __builtin_prefetch(w0p + k + 8 * K);
        __builtin_prefetch(w1p + k + 8 * K);
        const jtl_vec w0 = jtl_load(w0p + k), w1 = jtl_load(w1p + k);
        for (int r = 0; r < @M; r++) { const jtl_vec xv = jtl_load(X + r * K + k); a[r] += xv * w0; b[r] += xv * w1; }
    }
    for (int r = 0; r < M; r++) {
        float s0 = 0.f, s1 = 0.f;
        for (int i = 0; i < JTL_VEC; i++) { s0 += a[r][i]; s1 += b[r][i]; }
        for (long long k = KV; k < K; k++) { s0 += X[r * K + k] * w0p[k]; s1 += X[r * K + k] * w1p[k]; }
        Y[r * N + n] = s0 + (B ? B[n] : 0.f);
        Y[r * N + n + 1] = s1 + (B ? B[n + 1] : 0.f);
    }
}
if (N % 2)
    for (long long r = 0; r < M; r++) {
        float s = 0.f;
        for (long long k = 0; k < K; k++) s += X[r * K + k] * W[(N - 1) * K + k];
        Y[r * N + N - 1] = s + (B ? B[N - 1] : 0.f);
    }
std::free(X);
"""

# W [N, K] (nn.Linear layout, the tied LM head): oneDNN's sgemm streams W well when it is the
# left operand, so compute (W x^T) [N, M] and transpose it into place (+ bias).
_LEFT_SRC = r"""
const long long M = in0_shape0, K = in0_shape1, N = in1_shape0;
const float* X = in0_p; const float* W = in1_p; float* Y = out0_p;
const float* B = @BIAS ? (const float*)@BIAS_P : nullptr;
float* T = (float*)std::malloc(sizeof(float) * N * M);
dnnl_sgemm('N', 'T', N, M, K, 1.f, W, K, X, K, 0.f, T, M);
#pragma omp parallel for schedule(static)
for (long long r = 0; r < M; r++)
    for (long long n = 0; n < N; n++) Y[r * N + n] = T[n * M + r] + (B ? B[n] : 0.f);
std::free(T);
"""


def _strip_rows_max() -> int:
    """Most rows whose accumulators fit the vector registers (2 per row + 2 for the weight: 32
    registers with AVX-512, 16 with AVX2; Jittor compiles with -march=native); 0: no strip kernel."""
    global _STRIP_MAX
    if _STRIP_MAX is None:
        flags = cpu_flags()
        _STRIP_MAX = 12 if "avx512f" in flags else (6 if "avx2" in flags else 0)
    return _STRIP_MAX


_STRIP_MAX = None
# Kernels are compiled per bucket (a few seconds each, once per machine), not per row count.
_ROW_BUCKETS = (1, 2, 4, 6, 8, 10, 12)


@functools.lru_cache(maxsize=None)
def _small_source(kind: str, rows: int, with_bias: bool) -> str:
    src = {"dot": _DOT_SRC, "left": _LEFT_SRC, "strip": _STRIP_SRC}[kind].replace("@M", str(rows))
    return src.replace("@BIAS_P", "in2_p" if with_bias else "nullptr").replace("@BIAS", "1" if with_bias else "0")


def use_small_rows(rows: int, *vars_) -> bool:
    """True when a product of ``rows`` input rows should take ``small_rows_matmul``: CPU fast path,
    few rows, float32, and nothing that needs a gradient (the kernel has no backward)."""
    if rows > SMALL_ROWS_MAX or not fast_path_available():
        return False
    if any(v is not None and v.dtype != "float32" for v in vars_):
        return False
    return bool(jt.flags.no_grad) or all(v is None or v.is_stop_grad() for v in vars_)


def small_rows_matmul(x, w, transpose_w: bool = False, bias=None):
    """``x @ w (+ bias)`` (``x @ w^T`` with ``transpose_w``) for a few rows, without gradient.

    Args:
        x: [..., K] with at most ``SMALL_ROWS_MAX`` rows in all.
        w: [K, N], or [N, K] with ``transpose_w`` (a weight in ``nn.Linear`` / tied-embedding layout).
        bias: optional [N], added in the same pass.
    """
    lead = tuple(x.shape[:-1])
    k = x.shape[-1]
    n = w.shape[0] if transpose_w else w.shape[1]
    x2 = x.reshape((-1, k))
    if x2.shape[0] > SMALL_ROWS_MAX:
        raise ValueError(f"small_rows_matmul takes at most {SMALL_ROWS_MAX} rows, got {x2.shape[0]}")
    if (w.shape[1] if transpose_w else w.shape[0]) != k:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, w {tuple(w.shape)}, transpose_w={transpose_w}")
    rows = x2.shape[0]
    bucket = next((b for b in _ROW_BUCKETS if rows <= b <= _strip_rows_max()), 0)
    in_registers = bucket > 0
    if not transpose_w and not in_registers:
        y = jt.matmul(x2, w)  # more rows than registers: oneDNN's packed sgemm
        return (y + bias if bias is not None else y).reshape(lead + (n,))
    inputs = [x2, w] + ([bias] if bias is not None else [])
    kind = ("dot" if in_registers else "left") if transpose_w else "strip"
    out = jt.code((rows, n), "float32", inputs, cpu_header=_SMALL_HEADER,
                  cpu_src=_small_source(kind, bucket, bias is not None))
    return out.reshape(lead + (n,))


def dense(x, weight, bias=None, fan_in_fan_out: bool = True):
    """``x·W (+ b)`` with ``W`` stored ``[in, out]`` (``fan_in_fan_out``, GPT-2's Conv1D) or
    ``[out, in]`` (``nn.Linear``). Inference products of a few rows (decoding) take
    ``small_rows_matmul``; inside ``bf16.compute()`` a frozen weight's product runs in bf16
    (``nn.bf16``); everything else, and anything that needs a gradient, ``jt.matmul``."""
    if use_small_rows(math.prod(x.shape[:-1]), x, weight, bias):
        return small_rows_matmul(x, weight, transpose_w=not fan_in_fan_out, bias=bias)
    if _bf16.use_for(x, weight):   # --precision bf16: frozen weight, inside bf16.compute()
        return _bf16.dense(x, weight, bias, fan_in_fan_out)
    y = jt.matmul(x, weight) if fan_in_fan_out else nn.matmul_transpose(x, weight)
    return y + bias if bias is not None else y


# ----------------------------------------------------------------------------------------------
# (IA)³'s per-feature scaling as its own op.

_SCALE_SRC = r"""
const long long C = in1_shape0, R = in0->num / C;
#pragma omp parallel for schedule(static)
for (long long r = 0; r < R; r++)
    for (long long c = 0; c < C; c++) out0_p[r * C + c] = in0_p[r * C + c] * in1_p[c];
"""
# in0 x [R*C], in1 gy [R*C] -> out0 [C]: column sums of x*gy, per-thread partials then added
_COLSUM_SRC = r"""
const long long C = out0_shape0, R = in0->num / C;
for (long long c = 0; c < C; c++) out0_p[c] = 0.f;
#pragma omp parallel
{
    float* part = new float[C]();
    #pragma omp for schedule(static)
    for (long long r = 0; r < R; r++)
        for (long long c = 0; c < C; c++) part[c] += in0_p[r * C + c] * in1_p[r * C + c];
    #pragma omp critical
    for (long long c = 0; c < C; c++) out0_p[c] += part[c];
    delete[] part;
}
"""


def _scale(x, s):
    return jt.code(x.shape, "float32", [x, s], cpu_src=_SCALE_SRC)


class _ScaleLastDim(jt.Function):
    def execute(self, x, s):
        self.x, self.s = x, s
        return _scale(x, s)

    def grad(self, gy):
        gs = jt.code(self.s.shape, "float32", [self.x, gy], cpu_src=_COLSUM_SRC)
        return _scale(gy, self.s), gs


def scale_last_dim(x, s):
    """``x * s`` for ``x [..., C]`` and ``s [C]``, with gradients for both.

    Jittor fuses the product into the neighbouring element-wise kernel; fused with GELU's tanh,
    under (IA)³'s feed-forward scaling, that kernel ran ~20x slower than GELU alone (33 vs 1.6 ms
    per GPT-2 S layer on a batch of 8 x 128). As an op of its own (OpenMP over rows) it is not fused.
    """
    if not fast_path_available() or x.dtype != "float32" or s.dtype != "float32":
        return x * s
    return _ScaleLastDim.apply(x, s)


# ----------------------------------------------------------------------------------------------
# Attention's masked softmax in one pass forward and one backward.

# in0 scores [B, H, Tq, Tk]; in1 keep [Bk, Hk, Tq, Tk] (Bk in {1, B}, Hk in {1, H}) -> out0 probs.
# The reference's w = s / sqrt(D); w*keep - 1e10*(1 - keep); softmax over the last axis.
# Shared by both directions: shapes, and each row's (broadcast) keep mask.
_SOFTMAX_ROWS = r"""
const long long B = in0_shape0, H = in0_shape1, Tq = in0_shape2, Tk = in0_shape3;
const long long Bk = in1_shape0, Hk = in1_shape1;
const float sqrt_d = (float)data["sqrt_d"];
#pragma omp parallel for schedule(static)
for (long long row = 0; row < B * H * Tq; row++) {
    const long long i = row % Tq, h = (row / Tq) % H, b = row / (Tq * H);
    const float* keep = in1_p + (((Bk == 1 ? 0 : b) * Hk + (Hk == 1 ? 0 : h)) * Tq + i) * Tk;
"""
# The reference's masked softmax of one row and its gradient (shared with nn.fused_attention).
MASKED_SOFTMAX_CPP = r"""
// p = softmax(s / sqrt_d * keep - 1e10 * (1 - keep)) over n entries (p may be s)
static inline void jtl_masked_softmax_row(const float* s, const float* keep, long long n, float sqrt_d, float* p) {
    float m = -INFINITY;
    for (long long j = 0; j < n; j++) {
        const float x = s[j] / sqrt_d * keep[j] + (keep[j] - 1.f) * 1e10f;
        p[j] = x;
        m = x > m ? x : m;
    }
    float sum = 0.f;
    for (long long j = 0; j < n; j++) { p[j] = std::exp(p[j] - m); sum += p[j]; }
    for (long long j = 0; j < n; j++) p[j] /= sum;
}
// the gradient w.r.t. s given p and the gradient g of p: keep / sqrt_d * p * (g - sum(p g)) (gs may be g)
static inline void jtl_masked_softmax_grad_row(const float* p, const float* g, const float* keep, long long n,
                                               float sqrt_d, float* gs) {
    float dot = 0.f;
    for (long long j = 0; j < n; j++) dot += p[j] * g[j];
    for (long long j = 0; j < n; j++) gs[j] = p[j] * (g[j] - dot) * keep[j] / sqrt_d;
}
"""
_SOFTMAX_SRC = _SOFTMAX_ROWS + r"""
    jtl_masked_softmax_row(in0_p + row * Tk, keep, Tk, sqrt_d, out0_p + row * Tk);
}
"""
# in0 probs, in1 keep, in2 grad of probs -> out0 grad of scores
_SOFTMAX_GRAD_SRC = _SOFTMAX_ROWS + r"""
    jtl_masked_softmax_grad_row(in0_p + row * Tk, in2_p + row * Tk, keep, Tk, sqrt_d, out0_p + row * Tk);
}
"""
_SOFTMAX_HEADER = "#include <cmath>\n" + MASKED_SOFTMAX_CPP


class _AttentionSoftmax(jt.Function):
    def execute(self, scores, keep, sqrt_d):
        self.keep, self.data = keep, {"sqrt_d": float(sqrt_d)}
        self.probs = jt.code(scores.shape, "float32", [scores, keep], cpu_header=_SOFTMAX_HEADER,
                             cpu_src=_SOFTMAX_SRC, data=self.data)
        return self.probs

    def grad(self, gp):
        gs = jt.code(self.probs.shape, "float32", [self.probs, self.keep, gp], cpu_header=_SOFTMAX_HEADER,
                     cpu_src=_SOFTMAX_GRAD_SRC, data=self.data)
        return gs, None, None


def attention_softmax(scores, keep, add, sqrt_d: float):
    """``softmax(scores / sqrt_d * keep + add)`` over the last axis, where ``add`` is
    ``(keep - 1) * 1e10`` (``model.causal_mask``'s pair): the reference's masked attention.

    Jittor recomputed the scaled, masked scores inside each of the four fused kernels of its
    forward and backward (~11 ms per GPT-2 S layer on a batch of 8 x 128); here each direction is
    one OpenMP pass. ``keep`` broadcasts over batch and heads (``[1 or B, 1 or H, Tq, Tk]``).
    """
    b, h = scores.shape[:2]
    ok_keep = keep.ndim == 4 and keep.shape[0] in (1, b) and keep.shape[1] in (1, h) \
        and tuple(keep.shape[2:]) == tuple(scores.shape[2:])
    if not fast_path_available() or scores.dtype != "float32" or keep.dtype != "float32" or not ok_keep:
        return nn.softmax(scores / sqrt_d * keep + add, dim=-1)
    return _AttentionSoftmax.apply(scores, keep.stop_grad(), sqrt_d)
