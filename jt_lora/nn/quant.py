"""Opt-in int8 weight-only inference (``--precision int8``): the frozen projections as int8 with fp32
scales per output channel, for beam search on the CPU. Never the default: fp32 is untouched.

A decoding step multiplies batch x beam rows by every weight, so on the CPU it is bound by reading
the weights (``nn.kernels``: GPT-2 S reads 494 MB per step in fp32). Stored as int8, the same
weights are a quarter of the bytes; the kernel here streams them once and dequantizes in registers:

* quantization (once, after adapters are merged): per output channel ``j``, ``s_j = max_k |W_kj| /
  127`` and ``q_kj = round(W_kj / s_j)`` in [-127, 127], so ``|W_kj - s_j q_kj| <= s_j / 2``;
* layout: the ``[in, out]`` weight is cut into strips of 32 output columns, each strip stored as
  one contiguous ``[in, 32]`` int8 block (zero columns pad the last strip), so a thread reads one
  sequential stream;
* kernel (``jt.code``, OpenMP over strips): the rows are transposed into a small ``[in, rows]``
  buffer; per input feature, 32 int8 weights are sign-extended and converted to two float vectors
  (``vpmovsxbd`` + ``vcvtdq2ps`` under AVX-512), and every row (at most 12 held in registers,
  more in chunks of that many) accumulates ``x * w`` in fp32; the scale and bias are applied once
  at the end: ``y_rj = s_j * sum_k x_rk q_kj + b_j``.

Which layers: ``c_attn``, ``attn.c_proj``, ``c_fc`` and ``mlp.c_proj`` of every block (their merged
weights: LoRA and (IA)3 are folded in by ``eval()`` first), and optionally the tied LM head
(``wte`` read as ``[C, V]``; the embedding lookup keeps the fp32 table). InA cannot merge: its
low-rank path stays fp32 on top of the quantized base. :func:`quantize_model` swaps the modules
in place and drops the fp32 copies of the swapped weights; the model is then inference only.

CPU fast path only (``kernels.fast_path_available()``: oneDNN, no CUDA); elsewhere
:func:`check_precision` refuses ``int8`` with one line.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from ..backend import cpu_flags, jt, release_freed_memory
from .kernels import SMALL_ROWS_MAX, fast_path_available

__all__ = ["PRECISIONS", "STRIP", "check_precision", "quantize_per_channel", "dequantize", "Int8Weight",
           "QuantizedLinear", "QuantizedHead", "quantize_model", "int8_matmul"]

PRECISIONS = ("fp32", "int8")
STRIP = 32   # output columns per packed strip (two AVX-512 vectors)


def check_precision(value: str, flag: str = "--precision") -> str:
    """``value`` if it is a known precision usable here; else ``ValueError`` naming ``flag``."""
    if value not in PRECISIONS:
        raise ValueError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    if value == "int8" and not fast_path_available():
        raise ValueError(f"{flag} int8 needs the CPU fast path (oneDNN, no CUDA), which this process does not "
                         f"have; use {flag} fp32")
    return value


# ----------------------------------------------------------------------------------------------
# Quantization (numpy, once)

def quantize_per_channel(w_io: np.ndarray):
    """Symmetric int8 per output channel of an ``[in, out]`` weight.

    Returns (q int8 [in, out], scale float32 [out]) with ``|w - scale * q| <= scale / 2`` elementwise
    (a column of zeros gets scale 1 and q 0).
    """
    w = np.asarray(w_io, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [in, out] weight, got shape {w.shape}")
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``scale * q`` as float32 ``[in, out]``."""
    return q.astype(np.float32) * np.asarray(scale, np.float32)


def _pack(q: np.ndarray) -> np.ndarray:
    """[K, N] int8 -> [ceil(N / STRIP), K, STRIP] int8, zero columns padding the last strip."""
    k, n = q.shape
    ns = -(-n // STRIP)
    padded = np.zeros((k, ns * STRIP), np.int8)
    padded[:, :n] = q
    return np.ascontiguousarray(padded.reshape(k, ns, STRIP).transpose(1, 0, 2))


def _pad(v: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    out[:len(v)] = v
    return out


# ----------------------------------------------------------------------------------------------
# The kernel

_HEADER = r"""
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#if defined(__AVX512F__)
#define JTQ_VEC 16
#elif defined(__AVX2__)
#define JTQ_VEC 8
#else
#define JTQ_VEC 4
#endif
#define JTQ_NV (32 / JTQ_VEC)
typedef float jtq_vec __attribute__((vector_size(JTQ_VEC * 4)));
static inline jtq_vec jtq_load(const float* p) { jtq_vec v; __builtin_memcpy(&v, p, sizeof v); return v; }
// JTQ_VEC int8 weights -> floats (GCC's __builtin_convertvector makes scalar code of this)
static inline jtq_vec jtq_i8(const int8_t* p) {
#if defined(__AVX512F__)
    return (jtq_vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
    return (jtq_vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
    jtq_vec v; for (int i = 0; i < JTQ_VEC; i++) v[i] = (float)p[i]; return v;
#endif
}
"""

# in0 x [M, K] float32; in1 packed q [NS, K, 32] int8; in2 scale [NS*32]; in3 bias [NS*32] when @BIAS
# -> out0 [M, N] with N <= NS*32. @MB rows are held in registers (compiled in); more rows go in chunks.
_SRC = r"""
const long long M = in0_shape0, K = in0_shape1, NS = in1_shape0, N = out0_shape1;
const long long MB = @MB, nchunks = (M + MB - 1) / MB;
const float* X = in0_p;
const int8_t* Q = (const int8_t*)in1_p;
const float* SC = in2_p;
const float* B = @BIAS ? (const float*)@BIAS_P : nullptr;
float* Y = out0_p;
// rows transposed per chunk: XT[c][k][r], zero past the last row
float* XT = (float*)std::malloc(sizeof(float) * nchunks * K * MB);
for (long long c = 0; c < nchunks; c++)
    for (long long k = 0; k < K; k++)
        for (long long r = 0; r < MB; r++) {
            const long long row = c * MB + r;
            XT[(c * K + k) * MB + r] = row < M ? X[row * K + k] : 0.f;
        }
#pragma omp parallel for schedule(static)
for (long long s = 0; s < NS; s++) {
    const int8_t* qs = Q + s * K * 32;
    const long long j0 = s * 32;
    for (long long c = 0; c < nchunks; c++) {
        const float* xt = XT + c * K * MB;
        jtq_vec acc[@MB][JTQ_NV];
        for (int r = 0; r < @MB; r++)
            for (int v = 0; v < JTQ_NV; v++) acc[r][v] = (jtq_vec){};
        for (long long k = 0; k < K; k++) {
            __builtin_prefetch(qs + (k + 32) * 32);   // 1 KB ahead in this strip's stream
            jtq_vec w[JTQ_NV];
            for (int v = 0; v < JTQ_NV; v++) w[v] = jtq_i8(qs + k * 32 + v * JTQ_VEC);
            for (int r = 0; r < @MB; r++) {
                const float xv = xt[k * @MB + r];
                for (int v = 0; v < JTQ_NV; v++) acc[r][v] += xv * w[v];
            }
        }
        for (int r = 0; r < @MB; r++) {
            const long long row = c * MB + r;
            if (row >= M) break;
            float* y = Y + row * N + j0;
            for (int v = 0; v < JTQ_NV; v++) {
                jtq_vec o = acc[r][v] * jtq_load(SC + j0 + v * JTQ_VEC);
                if (B) o += jtq_load(B + j0 + v * JTQ_VEC);
                const long long jv = j0 + v * JTQ_VEC;
                if (jv + JTQ_VEC <= N) __builtin_memcpy(y + v * JTQ_VEC, &o, sizeof o);
                else for (long long i = 0; jv + i < N; i++) y[v * JTQ_VEC + i] = o[i];
            }
        }
    }
}
std::free(XT);
"""

# in0 packed q [NS, K, 32] int8; in1 scale [NS*32] -> out0 [K, N] float32 (N <= NS*32): the
# dequantized weight, for products of many rows (the prompt pass) through oneDNN.
_DEQUANT_SRC = r"""
const long long NS = in0_shape0, K = in0_shape1, N = out0_shape1;
const int8_t* Q = (const int8_t*)in0_p;
#pragma omp parallel for schedule(static)
for (long long k = 0; k < K; k++) {
    float* o = out0_p + k * N;
    for (long long s = 0; s < NS; s++) {
        const int8_t* q = Q + (s * K + k) * 32;
        const float* sc = in1_p + s * 32;
        const long long n = std::min<long long>(32, N - s * 32);
        for (long long i = 0; i < n; i++) o[s * 32 + i] = sc[i] * (float)q[i];
    }
}
"""


def _rows_in_registers() -> int:
    """Most rows whose accumulators fit the vector registers: 32/VEC per row + 32/VEC for the weight
    (32 registers of 16 floats with AVX-512; 16 of 8 with AVX2)."""
    global _ROWS_MAX
    if _ROWS_MAX is None:
        flags = cpu_flags()
        _ROWS_MAX = 12 if "avx512f" in flags else (3 if "avx2" in flags else 1)
    return _ROWS_MAX


_ROWS_MAX = None
_BUCKETS = (1, 2, 4, 6, 8, 10, 12)   # compiled once each (a few seconds, cached by Jittor)


@functools.lru_cache(maxsize=None)
def _source(rows_in_registers: int, with_bias: bool) -> str:
    return (_SRC.replace("@MB", str(rows_in_registers))
            .replace("@BIAS_P", "in3_p" if with_bias else "nullptr").replace("@BIAS", "1" if with_bias else "0"))


def _bucket(rows: int) -> int:
    top = _rows_in_registers()
    return next((b for b in _BUCKETS if rows <= b <= top), max(b for b in _BUCKETS if b <= top))


def int8_matmul(x, packed, scale, bias=None, n: Optional[int] = None):
    """``x @ (scale * q) (+ bias)`` with ``q`` packed by :class:`Int8Weight` ([NS, K, 32] int8).

    Args:
        x: float32 [M, K] (any M; at most 12 rows are held in registers at a time).
        packed, scale, bias: the packed weight, its scale [NS*32] and optional bias [NS*32] (padded).
        n: output columns (default NS*32).
    """
    m, k = x.shape
    ns = packed.shape[0]
    n = ns * STRIP if n is None else n
    if packed.shape[1] != k:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, packed weight {tuple(packed.shape)}")
    inputs = [x, packed, scale] + ([bias] if bias is not None else [])
    return jt.code((m, n), "float32", inputs, cpu_header=_HEADER, cpu_src=_source(_bucket(m), bias is not None))


def _dequantized(packed, scale, n: int):
    return jt.code((packed.shape[1], n), "float32", [packed, scale], cpu_header=_HEADER, cpu_src=_DEQUANT_SRC)


class Int8Weight:
    """A weight ``[in, out]`` (or ``[out, in]`` with ``transpose``) quantized per output channel and
    packed in strips; ``matmul(x)`` is ``x @ W_dequantized (+ bias)``.

    Args:
        w: float32 numpy weight; bias: optional [out].
        transpose: ``w`` is ``[out, in]`` (``nn.Linear`` or the tied embedding).
    """

    def __init__(self, w: np.ndarray, bias: Optional[np.ndarray] = None, transpose: bool = False):
        w = np.asarray(w, np.float32)
        w_io = w.T if transpose else w
        self.in_features, self.out_features = w_io.shape
        q, scale = quantize_per_channel(w_io)
        packed = _pack(q)
        width = packed.shape[0] * STRIP
        self.packed = jt.array(packed).stop_grad()
        self.scale = jt.array(_pad(scale, width)).stop_grad()
        self.bias = None if bias is None else jt.array(_pad(np.asarray(bias, np.float32), width)).stop_grad()
        jt.sync([v for v in (self.packed, self.scale, self.bias) if v is not None])
        self.nbytes = packed.nbytes + 4 * width * (1 if bias is None else 2)

    def matmul(self, x):
        """x [..., in] float32 -> [..., out]."""
        lead = tuple(x.shape[:-1])
        x2 = x.reshape((-1, self.in_features))
        if x2.shape[0] <= SMALL_ROWS_MAX:
            y = int8_matmul(x2, self.packed, self.scale, self.bias, self.out_features)
        else:   # many rows (the prompt pass): dequantize, then oneDNN's packed sgemm
            y = jt.matmul(x2, _dequantized(self.packed, self.scale, self.out_features))
            if self.bias is not None:
                y = y + self.bias[:self.out_features]
        return y.reshape(lead + (self.out_features,))

    def dequantized(self) -> np.ndarray:
        """The weight as the kernel sees it, float32 ``[in, out]`` (for tests)."""
        return _dequantized(self.packed, self.scale, self.out_features).numpy()


# ----------------------------------------------------------------------------------------------
# Modules

class QuantizedLinear(jt.Module):
    """Inference-only stand-in for a frozen projection whose adapter (if any) is merged: ``x·W + b``
    with ``W`` int8 per output channel.

    Args:
        weight: float32 numpy, ``[in, out]`` (``fan_in_fan_out``, GPT-2's Conv1D) or ``[out, in]``.
        bias: optional [out].
    """

    def __init__(self, weight: np.ndarray, bias: Optional[np.ndarray] = None, fan_in_fan_out: bool = True):
        self.is_train = False
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.q = Int8Weight(weight, bias, transpose=not self.fan_in_fan_out)

    def execute(self, x):
        if self.is_train:
            raise RuntimeError("a quantized model is inference only (it has no fp32 weights to train)")
        return self.q.matmul(x)


def _pending_lora(layer) -> bool:
    """The layer adds an unmerged low-rank path in eval mode (InA, which cannot merge)."""
    return getattr(layer, "r", 0) > 0 and not getattr(layer, "merged", False)


def _quantize_layer(parent, name: str) -> Int8Weight:
    """Swap ``parent.<name>`` (an eval-mode ``nn.lora``/``nn.ia3`` projection) for its int8 version.

    Merged or adapter-free layers are replaced by a :class:`QuantizedLinear` (their fp32 tensors go
    with them); a layer with a pending low-rank path (InA) stays, its frozen product
    (``base_forward``) switched to the int8 one, and its fp32 low-rank path runs on top as before.
    """
    layer = getattr(parent, name)
    if getattr(layer, "is_train", True):
        raise ValueError("quantize a model in eval mode (adapters merged), not in training")
    if hasattr(layer, "ia3_l") and not layer.merged:
        raise ValueError(f"{type(layer).__name__}: an unmerged (IA)3 layer cannot be quantized; "
                         f"build it with merge_weights=True")
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    bias = None if getattr(layer, "bias", None) is None else layer.bias.numpy()
    if _pending_lora(layer):
        if not hasattr(layer, "base_forward"):
            raise ValueError(f"{type(layer).__name__} has an unmerged adapter and no base_forward to quantize")
        q = Int8Weight(layer.weight.numpy(), bias, transpose=not fan_in_fan_out)
        layer.base_forward = q.matmul     # the instance's frozen product; the LoRA path is untouched
        return q
    ql = QuantizedLinear(layer.weight.numpy(), bias, fan_in_fan_out)
    setattr(parent, name, ql)
    return ql.q


class QuantizedHead:
    """The tied LM head ``wte`` [V, C] as int8 (per vocabulary entry): ``head(h [R, C])`` -> logits."""

    def __init__(self, wte: np.ndarray):
        self.q = Int8Weight(wte, None, transpose=True)

    def __call__(self, hidden):
        return self.q.matmul(hidden)


_PROJECTIONS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def quantize_model(model, head: bool = True) -> dict:
    """Swap a ``GPT2LMModel``'s block projections (and with ``head`` its tied LM head) for int8 ones,
    in place, after putting it in eval mode (adapters merged). The model is inference only after.

    The beam search's stepper (``generation.steppers.lm_head``) takes ``model.quantized_head`` when it
    is set. Returns a summary: layers swapped, fp32 and int8 bytes of the swapped weights.
    """
    check_precision("int8", "precision")
    if getattr(model, "quantized", False):
        raise ValueError("this model is already quantized")
    model.eval()
    fp32_bytes = int8_bytes = layers = 0
    for block in model.transformer.h:
        for parent_name, name in _PROJECTIONS:
            parent = getattr(block, parent_name)
            fp32_bytes += int(np.prod(getattr(parent, name).weight.shape)) * 4
            int8_bytes += _quantize_layer(parent, name).nbytes
            layers += 1
        release_freed_memory()   # this block's fp32 weights, before the next is quantized
    if head:
        wte = model.transformer.wte.weight
        model.quantized_head = QuantizedHead(wte.numpy())
        fp32_bytes += int(np.prod(wte.shape)) * 4
        int8_bytes += model.quantized_head.q.nbytes
    model.quantized = True
    return {"layers": layers, "head": bool(head), "fp32_bytes": int(fp32_bytes), "int8_bytes": int(int8_bytes)}
