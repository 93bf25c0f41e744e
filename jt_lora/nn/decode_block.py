"""A whole GPT-2 block of a beam-search step in one CPU op, and the tied LM head in another.

A decoding step multiplies a few rows (batch x beam) by every weight, so it is bound by reading
the weights. Through the model's own path a block is ~8 Jittor ops (layer norms, four few-row
products, the decode cache's attention, GELU, residual adds), each its own OpenMP region; a step
of GPT-2 S ran ~100 regions and its threads spent much of their time forking and joining. Here:

* :func:`block_step`: ``ln_1 -> c_attn -> attention over the DecodeCache -> c_proj -> + x -> ln_2
  -> c_fc -> GELU -> mlp.c_proj -> + x`` is one ``jt.code`` op with one ``#pragma omp parallel``
  region and a barrier between phases (4 per block). Layer norms are computed by every thread for
  all rows into its own buffer (a few thousand floats), which saves two barriers.
* :func:`head_step`: ``ln_f`` and the tied LM head in one region.
* The weights are repacked once (:class:`PackedWeights`) into strips of 32 output columns, each
  strip one contiguous ``[in, 32]`` block, and thread ``i`` of ``n`` owns strips ``[S*i/n,
  S*(i+1)/n)``: one sequential stream per thread per matrix, prefetched 8 KB ahead. A thread that
  runs out of strips takes the others' from the back (one compare-and-swap per strip), so a thread
  slowed by another process does not hold the phase back. The rows (at most 12 per pass with
  AVX-512; more rows go in passes over the strip, which is then in L2) sit in registers, two
  vectors of accumulators each, as in ``kernels.small_rows_matmul``.
  The strips of every block weight and of the head (GPT-2 S: 340 + 154 MB, GPT-2 M: 1.21 GB +
  206 MB) sit in one private anonymous mapping aligned to 2 MB and advised ``MADV_HUGEPAGE`` where
  transparent huge pages allow it (``JT_LORA_DECODE_HUGEPAGES=0``: not advised), written by a C
  loop straight from each Var's memory.
* Memory, two modes. :func:`pack_model` (what ``jt_lora.generate`` and ``jt_lora.bench`` do) makes
  the strips the model's *only* copy: block by block, each projection becomes a
  :class:`PackedLinear` and its fp32 tensors are freed and given back to the OS before the next
  block is packed; ``wte`` becomes a :class:`PackedEmbedding` reading the head's strips. The model
  is inference only afterwards. Any other caller gets a packed *copy* (:meth:`FusedDecoder.for_model`),
  which costs a second copy of the weights while it is kept.
* GELU is GPT-2's tanh form written as ``y / (1 + exp(-2u))`` (``1 + tanh(u) = 2 sigmoid(2u)``)
  with a vector ``exp`` (range reduction, degree-7 polynomial, relative error ~2e-7).

Every output element is summed in the same order whatever the thread count, so results do not
depend on it. The math equals the model's path to float rounding (tests: ``tests/test_decode_block.py``).

When it applies (:func:`FusedDecoder.for_model`): CPU fast path, ``JT_LORA_FUSED_DECODE`` not
``0``, the model in eval mode, float32, every block the plain GPT-2 block whose four projections
are plain (LoRA / (IA)3 merged into the weights: no adapter left for the forward to apply; an InA
layer never merges, so an InA model keeps the model's path). A model quantized by ``nn.quant``
(``--precision int8``, with its head) runs the same ops on its int8 strips in place
(:class:`Int8Blocks`; the strip kernel is templated on the weight type). The packed copy
is keyed on the Jittor ids of every tensor it was built from (an ``update``/``assign`` gives a
tensor a new id, and ``train()``/``eval()`` re-assign merged weights), so changed weights are
repacked and a model in train mode drops its copy. (Writing into a weight's memory through
``var.data`` in place keeps its id: not seen.)

Threads (:func:`decode_threads`): ``JT_LORA_DECODE_THREADS`` if set, else the CPUs this process
may run on (``os.sched_getaffinity``) capped by ``OMP_NUM_THREADS``. With spinning barriers, one
thread too many on a loaded machine costs far more than it brings (GPT-2 S, load ~7 on 2 cores:
~90 ms a step with one thread, 200-600 ms with two; quiet: 48 ms with one, 28 ms with two), so the
decoder also calibrates online
(:class:`ThreadChooser`): it times steps with ``n`` and ``n - 1`` threads alternately, keeps the
faster, and probes again after 32 steps, then 64, ... 512 while the choice holds (the results do
not change with the count).
"""
from __future__ import annotations

import mmap
import os
import time
import weakref
from typing import List, Optional

import numpy as np

from ..backend import jt, release_freed_memory
from .kernels import DECODE_ATTEND_CPP, SMALL_ROWS_MAX, fast_path_available

__all__ = ["FusedDecoder", "PackedWeights", "Int8Blocks", "PackedLinear", "PackedEmbedding", "PackedHead",
           "pack_model", "block_step", "head_step", "fused_decode_enabled", "decode_threads", "plain_dense", "STRIP"]

STRIP = 32          # output columns per packed strip
_ALIGN = 2 << 20    # huge-page alignment of the packed buffer

_HEADER = r"""
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <immintrin.h>
#include <omp.h>
#if defined(__AVX512F__)
#define JDB_VEC 16
#define JDB_MB 12
#elif defined(__AVX__)
#define JDB_VEC 8
#define JDB_MB 3
#else
#define JDB_VEC 4
#define JDB_MB 2
#endif
#define JDB_S 32
#define JDB_NV (JDB_S / JDB_VEC)
// software prefetch this many strip rows (128 B each) ahead in the thread's one stream: 8 KB. One
// thread on a 400 MB matrix (loaded machine, medians of alternated runs): none 4.5-5.5 GB/s, 16 rows
// 7.0-7.4, 32 7.6-8.7, 64 8.1-13.5 (the stream kernel: 9-16); no clear gain past 64.
#define JDB_PF 64
typedef float jdb_vec __attribute__((vector_size(JDB_VEC * 4)));
typedef int jdb_ivec __attribute__((vector_size(JDB_VEC * 4)));
static inline jdb_vec jdb_load(const float* p) { jdb_vec v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void jdb_store(float* p, jdb_vec v) { __builtin_memcpy(p, &v, sizeof v); }
static inline jdb_vec jdb_splat(float x) { jdb_vec v; for (int i = 0; i < JDB_VEC; i++) v[i] = x; return v; }
static inline long long jdb_pad(long long n) { return (n + JDB_S - 1) / JDB_S * JDB_S; }

// exp(z) for z in [-87, 88] (clamped): 2^(z log2 e) = 2^n * 2^(f - 1/2) * sqrt(2), f in [0, 1)
static inline jdb_vec jdb_exp(jdb_vec z) {
    const jdb_vec lo = jdb_splat(-87.f), hi = jdb_splat(88.f);
    z = z < lo ? lo : z;
    z = z > hi ? hi : z;
    const jdb_vec zp = z * 1.4426950408889634f + 128.f;          // in [2.5, 255)
    const jdb_ivec n = __builtin_convertvector(zp, jdb_ivec);      // floor (zp > 0)
    const jdb_vec g = (zp - __builtin_convertvector(n, jdb_vec) - 0.5f) * 0.6931471805599453f;
    jdb_vec p = jdb_splat(1.f / 5040.f);                           // e^g, |g| <= ln2 / 2: Taylor to g^7
    p = p * g + 1.f / 720.f; p = p * g + 1.f / 120.f; p = p * g + 1.f / 24.f;
    p = p * g + 1.f / 6.f;   p = p * g + 0.5f;        p = p * g + 1.f;  p = p * g + 1.f;
    const jdb_ivec bits = (n - 1) << 23;                           // 2^(n - 128) as a float
    jdb_vec scale; __builtin_memcpy(&scale, &bits, sizeof scale);
    return p * scale * 1.4142135623730951f;
}
// GPT-2's gelu: 0.5 y (1 + tanh(u)) = y / (1 + exp(-2u)), u = sqrt(2/pi) (y + 0.044715 y^3)
static inline jdb_vec jdb_gelu(jdb_vec y) {
    const jdb_vec u = 0.7978845608028654f * (y + 0.044715f * y * y * y);
    return y / (1.f + jdb_exp(-2.f * u));
}

// JDB_VEC weights as floats: fp32 strips, or int8 strips (--precision int8, nn.quant's layout), sign-
// extended and converted in registers (GCC's __builtin_convertvector makes scalar code of this)
static inline jdb_vec jdb_wload(const float* p) { return jdb_load(p); }
static inline jdb_vec jdb_wload(const int8_t* p) {
#if defined(__AVX512F__)
    return (jdb_vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
    return (jdb_vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
    jdb_vec v; for (int i = 0; i < JDB_VEC; i++) v[i] = (float)p[i]; return v;
#endif
}

// one strip: acc[MB][S] = xT[K][MB]^T . w[K][S] (w: the packed strip), then * scale (int8: the
// strip's per-column scales), + bias, GELU if asked
template <int MB, typename WT>
static inline void jdb_strip(const float* __restrict xT, const WT* __restrict w, long long K,
                             const float* __restrict scale, const float* __restrict bias, bool gelu,
                             float* __restrict tile) {
    jdb_vec acc[MB][JDB_NV];
    for (int r = 0; r < MB; r++) for (int v = 0; v < JDB_NV; v++) acc[r][v] = (jdb_vec){};
    for (long long k = 0; k < K; k++, w += JDB_S) {
        const char* pf = (const char*)(w + JDB_PF * JDB_S);
        for (int v = 0; v < JDB_S * (int)sizeof(WT); v += 64) __builtin_prefetch(pf + v);
        jdb_vec wv[JDB_NV];
        for (int v = 0; v < JDB_NV; v++) wv[v] = jdb_wload(w + v * JDB_VEC);
        for (int r = 0; r < MB; r++) {
            const float xs = xT[k * MB + r];
            for (int v = 0; v < JDB_NV; v++) acc[r][v] += xs * wv[v];
        }
    }
    for (int r = 0; r < MB; r++)
        for (int v = 0; v < JDB_NV; v++) {
            jdb_vec y = acc[r][v];
            if (scale) y *= jdb_load(scale + v * JDB_VEC);
            if (bias) y += jdb_load(bias + v * JDB_VEC);
            if (gelu) y = jdb_gelu(y);
            jdb_store(tile + r * JDB_S + v * JDB_VEC, y);
        }
}

// Strip claims: thread t owns strips [lo, hi) of the current product, packed in one atomic (lo | hi
// << 32). It takes its own from the front (one sequential stream), then takes the others' from the
// back, so a thread slowed by another process on its core does not hold the whole phase back.
// A range is set by its owner at the start of a product and is empty when the product is done (so a
// thief that reads a range not yet set for this product finds nothing to take).
static inline bool jdb_take(std::atomic<unsigned long long>& a, bool front, long long& s) {
    unsigned long long v = a.load(std::memory_order_relaxed);
    for (;;) {
        const unsigned long long lo = v & 0xffffffffull, hi = v >> 32;
        if (lo >= hi) return false;
        const unsigned long long nv = front ? ((lo + 1) | (hi << 32)) : (lo | ((hi - 1) << 32));
        if (a.compare_exchange_weak(v, nv, std::memory_order_relaxed)) { s = front ? (long long)lo : (long long)hi - 1; return true; }
    }
}

// Y[R, N] = epi(X[R, K] . W * scale + bias) (+ resid), strips shared out as above. W packed
// [ceil(N/S)][K][S] (float or int8); scale (int8 only) and bias padded to whole strips (or null).
// xT: this thread's scratch, R * K floats; ranges: one per thread.
template <typename WT>
static void jdb_matmul(const float* X, long long R, long long K, const WT* W, const float* scale, long long N,
                       const float* bias, bool gelu, const float* resid, float* Y,
                       int tid, int nt, float* xT, std::atomic<unsigned long long>* ranges) {
    const long long ns = (N + JDB_S - 1) / JDB_S, s0 = ns * tid / nt, s1 = ns * (tid + 1) / nt;
    ranges[tid].store((unsigned long long)s0 | ((unsigned long long)s1 << 32), std::memory_order_relaxed);
    // the rows transposed, in chunks of at most JDB_MB: chunk c is [K][mb_c]
    for (long long r0 = 0; r0 < R; r0 += JDB_MB) {
        const long long mb = std::min<long long>(JDB_MB, R - r0);
        float* xc = xT + r0 * K;
        for (long long r = 0; r < mb; r++)
            for (long long k = 0; k < K; k++) xc[k * mb + r] = X[(r0 + r) * K + k];
    }
    float tile[JDB_MB * JDB_S];
    int victim = tid;
    for (;;) {
        long long s;
        if (!jdb_take(ranges[tid], true, s)) {
            bool got = false;
            for (int i = 1; i < nt && !got; i++) {
                victim = (tid + i) % nt;
                got = jdb_take(ranges[victim], false, s);
            }
            if (!got) break;
        }
        const WT* w = W + s * K * JDB_S;
        const float* sc = scale ? scale + s * JDB_S : nullptr;
        const float* b = bias ? bias + s * JDB_S : nullptr;
        const long long j0 = s * JDB_S, cn = std::min<long long>(JDB_S, N - j0);
        for (long long r0 = 0; r0 < R; r0 += JDB_MB) {
            const int mb = (int)std::min<long long>(JDB_MB, R - r0);
            const float* xc = xT + r0 * K;
            switch (mb) {
#define JDB_CASE(m) case m: jdb_strip<(m <= JDB_MB ? m : 1), WT>(xc, w, K, sc, b, gelu, tile); break;
                JDB_CASE(1) JDB_CASE(2) JDB_CASE(3) JDB_CASE(4) JDB_CASE(5) JDB_CASE(6)
                JDB_CASE(7) JDB_CASE(8) JDB_CASE(9) JDB_CASE(10) JDB_CASE(11) JDB_CASE(12)
#undef JDB_CASE
            }
            for (int r = 0; r < mb; r++) {
                float* y = Y + (r0 + r) * N + j0;
                const float* t = tile + r * JDB_S;
                if (resid) { const float* x = resid + (r0 + r) * N + j0; for (long long c = 0; c < cn; c++) y[c] = x[c] + t[c]; }
                else for (long long c = 0; c < cn; c++) y[c] = t[c];
            }
        }
    }
}

// the reference's layer norm of every row: w * (x - mean) / sqrt(var + eps) + b
static void jdb_layernorm(const float* X, long long R, long long C, const float* w, const float* b,
                          float eps, float* Y) {
    for (long long r = 0; r < R; r++) {
        const float* x = X + r * C; float* y = Y + r * C;
        float u = 0.f;
        for (long long c = 0; c < C; c++) u += x[c];
        u /= (float)C;
        float s = 0.f;
        for (long long c = 0; c < C; c++) { const float d = x[c] - u; s += d * d; }
        s /= (float)C;
        const float inv = 1.f / std::sqrt(s + eps);
        for (long long c = 0; c < C; c++) y[c] = w[c] * ((x[c] - u) * inv) + b[c];
    }
}
""" + DECODE_ATTEND_CPP

# in0 x [R, C]; in1/in2 prompt keys/values [P, H, Tp, D]; in3 prompt key mask [P, Tp]; in4 each
# row's prompt [R] int32; in5 ancestry [R, >= t] int32 -> out0 [R, C], the block's output.
# data: the DecodeCache's (t, cap, k/v buffer addresses, sqrt_d) and the packed block's address,
# eps and the thread count. The packed block: ln_1 w, b, c_attn b, attn.c_proj b, ln_2 w, b, c_fc b,
# mlp.c_proj b (each padded to whole strips), then the four weights as strips.
_BLOCK_SHAPES = r"""
const long long R = in0_shape0, C = in0_shape1, C3 = 3 * C, C4 = 4 * C;
const long long H = in1_shape1, Tp = in1_shape2, D = in1_shape3, ld_path = in5_shape1;
const long long t = (long long)data["t"], cap = (long long)data["cap"];
float* Kb = (float*)(uintptr_t)data["k_addr"];
float* Vb = (float*)(uintptr_t)data["v_addr"];
const float sqrt_d = (float)data["sqrt_d"], eps = (float)data["eps"];
const int nt_asked = (int)data["threads"];
"""
_BLOCK_BODY = r"""
const float* X = in0_p; float* Y = out0_p;
std::vector<float> shared((size_t)(R * (C3 + C + C + C4)));
float* qkv = shared.data(); float* A = qkv + R * C3; float* X1 = A + R * C; float* F = X1 + R * C;
std::vector<std::atomic<unsigned long long>> ranges(std::max(nt_asked, 1) + 64);
for (auto& a : ranges) a.store(0);
#pragma omp parallel num_threads(nt_asked)
{
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> xT((size_t)(R * C4)), h((size_t)(R * C));
    jdb_layernorm(X, R, C, ln1w, ln1b, eps, h.data());
    jdb_matmul(h.data(), R, C, W_attn, S_attn, C3, b_attn, false, nullptr, qkv, tid, nt, xT.data(), ranges.data());
    #pragma omp barrier
    {   // attention of each (row, head) over its prompt and its ancestry (as DecodeCache.attend)
        std::vector<float> w(Tp + t + 1);
        std::vector<const float*> vrow(Tp + t + 1);
        #pragma omp for collapse(2) schedule(static)
        for (long long r = 0; r < R; r++)
            for (long long hh = 0; hh < H; hh++) {
                std::memcpy(Kb + (t * cap + r) * C + hh * D, qkv + r * C3 + C + hh * D, D * sizeof(float));
                std::memcpy(Vb + (t * cap + r) * C + hh * D, qkv + r * C3 + 2 * C + hh * D, D * sizeof(float));
                const long long p = in4_p[r];
                jtl_attend_one(qkv + r * C3 + hh * D, in1_p + (p * H + hh) * Tp * D, in2_p + (p * H + hh) * Tp * D,
                               in3_p + p * Tp, Tp, Kb, Vb, in5_p + r * ld_path, t, r, cap, C, hh * D, D, sqrt_d,
                               w.data(), vrow.data(), A + r * C + hh * D);
            }
    }   // the for's barrier
    jdb_matmul(A, R, C, W_proj, S_proj, C, b_proj, false, X, X1, tid, nt, xT.data(), ranges.data());
    #pragma omp barrier
    jdb_layernorm(X1, R, C, ln2w, ln2b, eps, h.data());
    jdb_matmul(h.data(), R, C, W_fc, S_fc, C4, b_fc, true, nullptr, F, tid, nt, xT.data(), ranges.data());
    #pragma omp barrier
    jdb_matmul(F, R, C4, W_mp, S_mp, C, b_mp, false, X1, Y, tid, nt, xT.data(), ranges.data());
}
"""
_BLOCK_SRC = _BLOCK_SHAPES + r"""
const float* P = (const float*)(uintptr_t)data["w_addr"];
const long long p1 = jdb_pad(C), p3 = jdb_pad(C3), p4 = jdb_pad(C4);
const float* ln1w = P; const float* ln1b = ln1w + p1; const float* b_attn = ln1b + p1;
const float* b_proj = b_attn + p3; const float* ln2w = b_proj + p1; const float* ln2b = ln2w + p1;
const float* b_fc = ln2b + p1; const float* b_mp = b_fc + p4;
const float* W_attn = P + (long long)data["w_off"];
const float* W_proj = W_attn + C * p3; const float* W_fc = W_proj + C * p1; const float* W_mp = W_fc + C * p4;
const float *S_attn = nullptr, *S_proj = nullptr, *S_fc = nullptr, *S_mp = nullptr;
""" + _BLOCK_BODY
# --precision int8: the same block with nn.quant's int8 strips, read from the QuantizedLinear tensors
# in place: in6-in9 ln_1 w, b, ln_2 w, b; then per projection (c_attn, attn.c_proj, c_fc, mlp.c_proj)
# its packed q [NS, K, 32] int8, scale and bias (both padded to whole strips).
_BLOCK_INT8_SRC = _BLOCK_SHAPES + r"""
const float* ln1w = in6_p; const float* ln1b = in7_p; const float* ln2w = in8_p; const float* ln2b = in9_p;
const int8_t* W_attn = (const int8_t*)in10_p; const float* S_attn = in11_p; const float* b_attn = in12_p;
const int8_t* W_proj = (const int8_t*)in13_p; const float* S_proj = in14_p; const float* b_proj = in15_p;
const int8_t* W_fc = (const int8_t*)in16_p; const float* S_fc = in17_p; const float* b_fc = in18_p;
const int8_t* W_mp = (const int8_t*)in19_p; const float* S_mp = in20_p; const float* b_mp = in21_p;
""" + _BLOCK_BODY

# in0 x [R, C] (before ln_f) -> out0 logits [R, V]. data: the packed head (ln_f w, b padded, then
# wte^T as strips), V, eps, threads.
_HEAD_SHAPES = r"""
const long long R = in0_shape0, C = in0_shape1, V = out0_shape1;
const float eps = (float)data["eps"];
const int nt_asked = (int)data["threads"];
"""
_HEAD_BODY = r"""
std::vector<std::atomic<unsigned long long>> ranges(std::max(nt_asked, 1) + 64);
for (auto& a : ranges) a.store(0);
#pragma omp parallel num_threads(nt_asked)
{
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> xT((size_t)(R * C)), h((size_t)(R * C));
    jdb_layernorm(in0_p, R, C, lnw, lnb, eps, h.data());
    jdb_matmul(h.data(), R, C, W, S_head, V, nullptr, false, nullptr, out0_p, tid, nt, xT.data(), ranges.data());
}
"""
_HEAD_SRC = _HEAD_SHAPES + r"""
const float* P = (const float*)(uintptr_t)data["w_addr"];
const float* lnw = P; const float* lnb = P + jdb_pad(C);
const float* W = P + (long long)data["w_off"];
const float* S_head = nullptr;
""" + _HEAD_BODY
# int8: in1/in2 ln_f w, b; in3 the head's int8 strips of wte^T, in4 their scales
_HEAD_INT8_SRC = _HEAD_SHAPES + r"""
const float* lnw = in1_p; const float* lnb = in2_p;
const int8_t* W = (const int8_t*)in3_p; const float* S_head = in4_p;
""" + _HEAD_BODY

# in0 x [R, C] -> out0 [R, N]: x times the strips at data["addr"] (the packed head of a pack_model model,
# for the prompt pass), threads: OpenMP's default.
_STRIPS_SRC = r"""
const long long R = in0_shape0, C = in0_shape1, N = out0_shape1;
const float* W = (const float*)(uintptr_t)data["addr"];
std::vector<std::atomic<unsigned long long>> ranges(omp_get_max_threads() + 64);
for (auto& a : ranges) a.store(0);
#pragma omp parallel
{
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> xT((size_t)(R * C));
    jdb_matmul(in0_p, R, C, W, (const float*)nullptr, N, nullptr, false, nullptr, out0_p, tid, nt, xT.data(), ranges.data());
}
"""

# in0 token ids [T] int32 -> out0 [T, C]: rows of wte read back from the packed head wte^T (strip t / 32,
# column t % 32 of each of its C rows).
_GATHER_SRC = r"""
const long long T = in0_shape0, C = out0_shape1, V = (long long)data["vocab"];
const float* W = (const float*)(uintptr_t)data["addr"];
for (long long i = 0; i < T; i++) {
    const long long t = in0_p[i];
    float* o = out0_p + i * C;
    if (t < 0 || t >= V) { for (long long k = 0; k < C; k++) o[k] = NAN; continue; }
    const float* w = W + (t / 32) * C * 32 + t % 32;
    for (long long k = 0; k < C; k++) o[k] = w[k * 32];
}
"""

# in0 a weight [K, N] (data["transposed"] 0) or [N, K] (1: the tied wte) -> its strips [ceil(N/32), K, 32]
# written at data["addr"] (zero columns pad the last strip); out0 [1] is a dummy. Reads the Var's own
# memory: no host copy of the weight is made while packing.
_PACK_SRC = r"""
const bool tr = data["transposed"] != 0;
const long long K = tr ? in0_shape1 : in0_shape0, N = tr ? in0_shape0 : in0_shape1, NS = (N + 31) / 32;
const float* W = in0_p;
float* D = (float*)(uintptr_t)data["addr"];
#pragma omp parallel for schedule(static)
for (long long s = 0; s < NS; s++) {
    float* d = D + s * K * 32;
    const long long n0 = s * 32, cn = std::min<long long>(32, N - n0);
    if (!tr) {
        for (long long k = 0; k < K; k++) {
            std::memcpy(d + k * 32, W + k * N + n0, sizeof(float) * cn);
            for (long long j = cn; j < 32; j++) d[k * 32 + j] = 0.f;
        }
    } else {
        for (long long j = 0; j < 32; j++)
            for (long long k = 0; k < K; k++) d[k * 32 + j] = j < cn ? W[(n0 + j) * K + k] : 0.f;
    }
}
out0_p[0] = 0.f;
"""

# out0 [K, N]: one projection's weight unpacked from its strips at data["addr"] (PackedLinear).
_UNPACK_SRC = r"""
const long long K = out0_shape0, N = out0_shape1, NS = (N + 31) / 32;
const float* P = (const float*)(uintptr_t)data["addr"];
#pragma omp parallel for schedule(static)
for (long long k = 0; k < K; k++)
    for (long long s = 0; s < NS; s++)
        std::memcpy(out0_p + k * N + s * 32, P + (s * K + k) * 32, sizeof(float) * std::min<long long>(32, N - s * 32));
"""


def fused_decode_enabled() -> bool:
    """The fused step is on unless ``JT_LORA_FUSED_DECODE=0`` (and needs the CPU fast path)."""
    return os.environ.get("JT_LORA_FUSED_DECODE", "1") != "0" and fast_path_available()


def _hugepages_enabled() -> bool:
    if os.environ.get("JT_LORA_DECODE_HUGEPAGES", "1") == "0":
        return False
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False
    return "[never]" not in mode


def decode_threads() -> int:
    """Threads for the fused step: ``JT_LORA_DECODE_THREADS``, else the CPUs this process may use,
    capped by ``OMP_NUM_THREADS``."""
    env = os.environ.get("JT_LORA_DECODE_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, n)


# ----------------------------------------------------------------------------------------------
# Which layers are plain products

def _pending(layer) -> bool:
    """Whether ``layer``'s forward still applies an adapter on top of ``x @ W + b``."""
    if hasattr(layer, "_pending"):                  # the AdapterLayer family
        return bool(layer._pending())
    if type(layer).__name__ == "IA3Linear":         # single-adapter layers of older versions
        return not getattr(layer, "merged", False)
    return getattr(layer, "r", 0) > 0 and not getattr(layer, "merged", False)


def plain_dense(layer):
    """``(W [in, out] Var, bias Var or None)`` when ``layer``'s forward is exactly ``x @ W + b``
    in float32 (no adapter left to apply, Conv1D or Linear layout), else None."""
    if type(layer).__name__ not in ("Linear", "MergedLinear", "IA3Linear") or _pending(layer):
        return None
    dense = layer._dense() if hasattr(layer, "_dense") else layer
    w, b = getattr(dense, "weight", None), getattr(dense, "bias", None)
    if not isinstance(w, jt.Var) or w.ndim != 2 or w.dtype != "float32":
        return None
    if b is not None and (not isinstance(b, jt.Var) or b.dtype != "float32"):
        return None
    fan = getattr(layer, "fan_in_fan_out", None)
    if fan is None:
        return None
    return (w if fan else w.transpose(1, 0)), b


def _is(obj, name: str) -> bool:
    return type(obj).__name__ == name and type(obj).__module__.endswith("models.gpt2")


def _plain_gpt2_block(block) -> bool:
    """The model's own GPT-2 block (attention, MLP, two layer norms): what the block op computes."""
    return (_is(block, "Block") and _is(block.attn, "Attention") and _is(block.mlp, "MLP")
            and _is(block.ln_1, "LayerNorm") and _is(block.ln_2, "LayerNorm"))


def _block_tensors(block):
    """The tensors of one block in packing order, or None when the block cannot be fused."""
    if not _plain_gpt2_block(block):
        return None
    if block.is_train or block.ln_1.eps != block.ln_2.eps:
        return None
    layers = [plain_dense(m) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    if any(x is None for x in layers):
        return None
    return dict(ln1=(block.ln_1.weight, block.ln_1.bias), ln2=(block.ln_2.weight, block.ln_2.bias),
                attn=layers[0], proj=layers[1], fc=layers[2], mproj=layers[3], eps=block.ln_1.eps)


def _pad(n: int) -> int:
    return (n + STRIP - 1) // STRIP * STRIP


# ----------------------------------------------------------------------------------------------
# The packed copy

class PackedWeights:
    """One 2 MB-aligned float32 buffer (advised ``MADV_HUGEPAGE`` when allowed) holding every
    block's vectors and strip-packed weights, then ``ln_f`` and the strip-packed ``wte^T``.

    Built empty (the mapping's pages cost nothing until written), then filled one block at a time
    (:meth:`pack_block`, :meth:`pack_head`), so :func:`pack_model` can drop each block's fp32
    tensors as it goes."""

    def __init__(self, n_blocks: int, n_embd: int, eps: float, vocab: int):
        c = self.n_embd = int(n_embd)
        self.n_blocks, self.eps = int(n_blocks), float(eps)
        p1, p3, p4 = _pad(c), _pad(3 * c), _pad(4 * c)
        self.block_w_off = 4 * p1 + p3 + p1 + p4 + p1   # 32-float multiple: weights start 128-byte aligned
        # where each projection's strips start in a block, and its [in, out] shape
        self.layout = {"attn": (self.block_w_off, c, 3 * c)}
        self.layout["proj"] = (self.layout["attn"][0] + c * p3, c, c)
        self.layout["fc"] = (self.layout["proj"][0] + c * p1, c, 4 * c)
        self.layout["mproj"] = (self.layout["fc"][0] + c * p4, 4 * c, c)
        self.block_floats = (self.layout["mproj"][0] + 4 * c * p1 + 1023) // 1024 * 1024
        self.vocab, self.head_w_off = int(vocab), 2 * p1
        nbytes = (self.block_floats * self.n_blocks + self.head_w_off + c * _pad(self.vocab)) * 4
        # private: a shared anonymous mapping is shmem, which has its own (usually off) huge-page switch
        self._map = mmap.mmap(-1, nbytes + _ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = np.frombuffer(self._map, np.uint8)
        start = (-raw.ctypes.data) % _ALIGN
        self.threads = None   # the FusedDecoders' ThreadChooser for this copy
        self.hugepages = False
        if _hugepages_enabled() and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
                self.hugepages = True
            except OSError:
                pass
        self.buf = raw[start:start + nbytes].view(np.float32)
        self.nbytes = nbytes
        self.block_addr: List[Optional[int]] = [None] * self.n_blocks
        self.head_addr: Optional[int] = None

    @classmethod
    def of_model(cls, blocks: List[dict], ln_f, wte) -> "PackedWeights":
        """A packed copy of every block (``_block_tensors`` dicts) and of the head; the model keeps
        its tensors."""
        packed = cls(len(blocks), int(wte.shape[1]), blocks[0]["eps"], int(wte.shape[0]))
        for i, t in enumerate(blocks):
            packed.pack_block(i, t)
        packed.pack_head(ln_f, wte)
        return packed

    def pack_head(self, ln_f, wte) -> None:
        """Write ``ln_f``'s vectors and ``wte^T`` [C, V] as strips after the blocks."""
        c, p1 = self.n_embd, _pad(self.n_embd)
        seg = self.buf[self.n_blocks * self.block_floats:]
        seg[:self.head_w_off] = 0.0
        seg[:c] = ln_f.weight.numpy()
        seg[p1:p1 + c] = ln_f.bias.numpy()
        _pack_var(seg[self.head_w_off:], wte, transposed=True)
        self.head_addr = seg.ctypes.data

    @property
    def head_strips_addr(self) -> int:
        return self.head_addr + 4 * self.head_w_off

    def pack_block(self, i: int, t: dict) -> None:
        """Write block ``i``'s tensors (a ``_block_tensors`` dict) into its segment."""
        p1, p3, p4 = _pad(self.n_embd), _pad(3 * self.n_embd), _pad(4 * self.n_embd)
        seg = self.buf[i * self.block_floats:(i + 1) * self.block_floats]
        vecs = [(t["ln1"][0], p1), (t["ln1"][1], p1), (t["attn"][1], p3), (t["proj"][1], p1),
                (t["ln2"][0], p1), (t["ln2"][1], p1), (t["fc"][1], p4), (t["mproj"][1], p1)]
        off = 0
        for v, n in vecs:
            seg[off:off + n] = 0.0
            if v is not None:
                arr = v.numpy().reshape(-1)
                seg[off:off + arr.size] = arr
            off += n
        for key in ("attn", "proj", "fc", "mproj"):
            start, k, n = self.layout[key]
            w = t[key][0]
            if tuple(w.shape) != (k, n):
                raise ValueError(f"block {i} {key}: weight shape {tuple(w.shape)}, expected {(k, n)}")
            _pack_var(seg[start:], w)
        self.block_addr[i] = seg.ctypes.data

    def weight_addr(self, i: int, key: str) -> int:
        """Address of block ``i``'s ``key`` projection strips (``attn``, ``proj``, ``fc``, ``mproj``)."""
        return self.block_addr[i] + 4 * self.layout[key][0]

    def hugepage_bytes(self) -> Optional[int]:
        """Bytes of the packed mapping backed by transparent huge pages (its ``AnonHugePages`` in
        ``/proc/self/smaps``), or None where that cannot be read."""
        addr = self.buf.ctypes.data
        try:
            inside = False
            for line in open("/proc/self/smaps"):
                head = line.split(None, 1)[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None


def _pack_var(dst: np.ndarray, w, transposed: bool = False) -> int:
    """Write the Var ``w`` [K, N] (``transposed``: [N, K]) as ``[ceil(N/32), K, 32]`` strips (zero
    columns pad the last) into the float32 array ``dst``; returns the floats written."""
    k, n = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
    floats = (n + STRIP - 1) // STRIP * k * STRIP
    if dst.dtype != np.float32 or dst.size < floats or not dst.flags.c_contiguous:
        raise ValueError(f"pack destination too small or not float32: {dst.size} < {floats}")
    jt.code((1,), "float32", [w], cpu_header=_HEADER, cpu_src=_PACK_SRC,
            data=dict(addr=float(dst.ctypes.data), transposed=float(bool(transposed)))).sync()
    return floats


# ----------------------------------------------------------------------------------------------
# The ops

def block_step(x, attn_inputs, attn_data: dict, packed, layer: int, eps: float, threads: int):
    """One fused block: x [R, C] -> [R, C]. ``attn_inputs``/``attn_data``: the DecodeCache's
    (``DecodeCache.layer_inputs``); ``packed``: a :class:`PackedWeights` or :class:`Int8Blocks`."""
    if isinstance(packed, Int8Blocks):
        return jt.code(x.shape, "float32", [x] + list(attn_inputs) + packed.blocks[layer], cpu_header=_HEADER,
                       cpu_src=_BLOCK_INT8_SRC, data=dict(attn_data, eps=float(eps), threads=float(threads)))
    data = dict(attn_data, w_addr=float(packed.block_addr[layer]), w_off=float(packed.block_w_off),
                eps=float(eps), threads=float(threads))
    return jt.code(x.shape, "float32", [x] + list(attn_inputs), cpu_header=_HEADER, cpu_src=_BLOCK_SRC,
                   data=data)


def head_step(x, packed, eps: float, threads: int):
    """``ln_f`` and the tied head: x [R, C] -> logits [R, V]."""
    if isinstance(packed, Int8Blocks):
        return jt.code((x.shape[0], packed.vocab), "float32", [x] + packed.head, cpu_header=_HEADER,
                       cpu_src=_HEAD_INT8_SRC, data=dict(eps=float(eps), threads=float(threads)))
    data = dict(w_addr=float(packed.head_addr), w_off=float(packed.head_w_off), eps=float(eps),
                threads=float(threads))
    return jt.code((x.shape[0], packed.vocab), "float32", [x], cpu_header=_HEADER, cpu_src=_HEAD_SRC,
                   data=data)


class Int8Blocks:
    """What the int8 block and head ops read, in place (``--precision int8``, ``nn.quant``): per block
    ``ln_1``/``ln_2`` and each projection's int8 strips, scales and bias (``QuantizedLinear``), then
    ``ln_f`` and the ``QuantizedHead``'s strips and scales. No copy: the quantized model already
    stores its weights as strips."""

    def __init__(self, blocks: List[list], head: list, eps: float, vocab: int):
        self.blocks, self.head, self.eps, self.vocab = blocks, head, float(eps), int(vocab)
        self.n_blocks = len(blocks)
        self.threads = None   # the FusedDecoders' ThreadChooser

    @classmethod
    def of_model(cls, model) -> Optional["Int8Blocks"]:
        """From a model swapped by ``nn.quant.quantize_model`` (with its head), or None where a block
        is not plain GPT-2 with four ``QuantizedLinear`` projections (InA keeps its fp32 path)."""
        tr = model.transformer
        qh = getattr(model, "quantized_head", None)
        if qh is None or tr.is_train or not _is(tr.ln_f, "LayerNorm"):
            return None
        blocks, eps = [], set()
        for block in tr.h:
            if not _plain_gpt2_block(block):
                return None
            vars_ = [block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias]
            for parent_name, name, _ in _PROJECTIONS:
                layer = getattr(getattr(block, parent_name), name)
                q = getattr(layer, "q", None)
                if type(layer).__name__ != "QuantizedLinear" or q is None or q.bias is None:
                    return None
                vars_ += [q.packed, q.scale, q.bias]
            blocks.append(vars_)
            eps |= {block.ln_1.eps, block.ln_2.eps}
        if len(eps) != 1:
            return None
        return cls(blocks, [tr.ln_f.weight, tr.ln_f.bias, qh.q.packed, qh.q.scale], eps.pop(), qh.q.out_features)


# ----------------------------------------------------------------------------------------------
# The model-level step

_PACKED = weakref.WeakKeyDictionary()   # model -> (signature, PackedWeights): the copy mode


def _signature(tensors) -> tuple:
    return tuple(None if v is None else v.id for v in tensors)


def _fusable_blocks(model, rows: int) -> Optional[list]:
    """The ``_block_tensors`` of every block when the fused step applies to ``model`` feeding
    ``rows`` rows a step, else None (see the module docstring)."""
    if not fused_decode_enabled() or rows > SMALL_ROWS_MAX:
        return None
    tr = getattr(model, "transformer", None)
    if tr is None or getattr(model, "quantized", False) or getattr(model, "quantized_head", None) is not None:
        return None
    blocks = [_block_tensors(b) for b in tr.h]
    wte = tr.wte.weight
    if (any(b is None for b in blocks) or tr.is_train or not _is(tr.ln_f, "LayerNorm")
            or not isinstance(wte, jt.Var) or wte.dtype != "float32" or len({b["eps"] for b in blocks}) != 1):
        return None
    return blocks


class FusedDecoder:
    """A beam step of a whole GPT-2 through the fused ops: embeddings (Jittor), one op per block,
    one for ``ln_f`` + head. Build with :meth:`for_model` (None when the model's path must be used)."""

    def __init__(self, model, packed: PackedWeights):
        self.model, self.packed, self.eps = model, packed, packed.eps
        self.head_eps = model.transformer.ln_f.eps
        if packed.threads is None:   # the choice outlives one search: kept with the packed copy
            packed.threads = ThreadChooser()
        self.chooser = packed.threads

    # the chooser's settings, as the decoder's own (tests and benchmarks set them)
    threads = property(lambda self: self.chooser.threads, lambda self, v: setattr(self.chooser, "threads", v))
    fixed = property(lambda self: self.chooser.fixed, lambda self, v: setattr(self.chooser, "fixed", v))
    max_threads = property(lambda self: self.chooser.max_threads,
                           lambda self, v: setattr(self.chooser, "max_threads", v))

    @classmethod
    def for_model(cls, model, rows: int = 1) -> Optional["FusedDecoder"]:
        """The fused decoder for ``model`` feeding at most ``rows`` rows a step, or None when the
        model's own path applies (see the module docstring; more than ``kernels.SMALL_ROWS_MAX``
        rows go to oneDNN's packed products).

        A model converted by :func:`pack_model` uses its packed weights. Any other model gets a
        packed copy, kept while its tensors keep their ids (repacked when they change, dropped when
        the model is back in train mode)."""
        own = getattr(model, "decode_packed", None)
        if own is not None or getattr(model, "quantized", False):
            if not fused_decode_enabled() or rows > SMALL_ROWS_MAX or model.transformer.is_train:
                return None
            if own is None:   # --precision int8: the quantized strips, read in place
                hit = _PACKED.get(model)
                if hit is None or not isinstance(hit[1], Int8Blocks):
                    int8 = Int8Blocks.of_model(model)
                    if int8 is None:
                        return None
                    hit = _PACKED[model] = (None, int8)
                own = hit[1]
            return cls(model, own)
        blocks = _fusable_blocks(model, rows)
        if blocks is None:
            _PACKED.pop(model, None)   # e.g. back in train mode: the copy is stale, free it
            return None
        tr = model.transformer
        tensors = [tr.wte.weight, tr.ln_f.weight, tr.ln_f.bias]
        for b in blocks:
            tensors += [*b["ln1"], *b["ln2"], *b["attn"], *b["proj"], *b["fc"], *b["mproj"]]
        sig = _signature(tensors)
        hit = _PACKED.get(model)
        if hit is None or hit[0] != sig:
            _PACKED.pop(model, None)   # free the old copy before building the new one
            hit = (sig, PackedWeights.of_model(blocks, tr.ln_f, tr.wte.weight))
            _PACKED[model] = hit
        return cls(model, hit[1])

    def hidden(self, cache, tokens: np.ndarray, positions: np.ndarray):
        """The blocks' output (before ``ln_f``) for one token per row: [R, C] Var."""
        tr = self.model.transformer
        rows = len(tokens)
        x = tr.wte(jt.array(tokens.astype(np.int32).reshape(rows))) + \
            tr.wpe(jt.array(positions.astype(np.int32).reshape(rows)))
        for i in range(self.packed.n_blocks):
            inputs, data = cache.layer_inputs(i)
            x = block_step(x, inputs, data, self.packed, i, self.eps, self.threads)
        return x

    def step(self, cache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Next-token logits [R, V] (float32 numpy) for one token per row, against ``cache`` (a
        ``generation.cache.DecodeCache`` already advanced to this step)."""
        t0 = time.perf_counter()
        logits = head_step(self.hidden(cache, tokens, positions), self.packed, self.head_eps, self.threads).numpy()
        self._calibrate(time.perf_counter() - t0)
        return logits if logits.flags.writeable else logits.copy()

    def _calibrate(self, seconds: float) -> None:
        self.chooser.record(seconds)


# ----------------------------------------------------------------------------------------------
# Packing in place: the packed strips become the model's only copy of the block weights

class PackedLinear(jt.Module):
    """Inference-only stand-in for a plain projection whose weight lives in a :class:`PackedWeights`
    (:func:`pack_model`). The fused step reads the strips directly; any other forward (the prompt
    pass) unpacks the weight into a temporary and takes ``kernels.dense``, the model's own product,
    so it gives what the fp32 layer gave, bit for bit."""

    def __init__(self, packed: PackedWeights, block: int, key: str, bias=None):
        self.is_train = False
        self._packed, self._addr = packed, packed.weight_addr(block, key)
        _, self.in_features, self.out_features = packed.layout[key]
        self.fan_in_fan_out = True
        self._bias = bias   # a Var: underscore, so Jittor does not list it as a parameter

    def unpacked_weight(self):
        """The weight [in, out] as a new Var (exactly the packed values)."""
        return jt.code((self.in_features, self.out_features), "float32", [], cpu_header=_HEADER,
                       cpu_src=_UNPACK_SRC, data=dict(addr=float(self._addr)))

    def execute(self, x):
        if self.is_train:
            raise RuntimeError("a model packed for decoding (jt_lora.nn.decode_block.pack_model) is inference "
                               "only: its fp32 block weights live in the packed strips")
        from .kernels import dense
        return dense(x, self.unpacked_weight(), self._bias, True)


class PackedEmbedding(jt.Module):
    """Inference-only stand-in for the tied ``wte`` of a :func:`pack_model` model: token rows read
    back from the packed head's ``wte^T`` strips (exactly the embedding's values)."""

    def __init__(self, packed: PackedWeights):
        self.is_train = False
        self._packed = packed
        self.num_embeddings, self.embedding_dim = packed.vocab, packed.n_embd

    @property
    def weight(self):
        raise RuntimeError("a model packed for decoding (jt_lora.nn.decode_block.pack_model) is inference "
                           "only: its wte lives in the packed head's strips")

    def execute(self, ids):
        flat = ids.reshape((-1,)).int32()
        out = jt.code((flat.shape[0], self.embedding_dim), "float32", [flat], cpu_header=_HEADER,
                      cpu_src=_GATHER_SRC, data=dict(addr=float(self._packed.head_strips_addr),
                                                     vocab=float(self.num_embeddings)))
        return out.reshape(tuple(ids.shape) + (self.embedding_dim,))


class PackedHead:
    """The tied LM head of a :func:`pack_model` model for the prompt pass: ``head(h [R, C])`` ->
    logits [R, V] through the strips (``generation.steppers.lm_head`` takes it)."""

    def __init__(self, packed: PackedWeights):
        self._packed = packed

    def __call__(self, hidden):
        return jt.code((hidden.shape[0], self._packed.vocab), "float32", [hidden], cpu_header=_HEADER,
                       cpu_src=_STRIPS_SRC, data=dict(addr=float(self._packed.head_strips_addr)))


_PROJECTIONS = (("attn", "c_attn", "attn"), ("attn", "c_proj", "proj"), ("mlp", "c_fc", "fc"),
                ("mlp", "c_proj", "mproj"))


def pack_model(model, rows: int = 1) -> Optional[dict]:
    """Make the packed strips the model's only copy of its block weights and of ``wte``, for
    inference-only callers (``jt_lora.generate``, ``jt_lora.bench``): each block's four projections
    are packed, then replaced by :class:`PackedLinear` modules, and their fp32 tensors (with a
    merged layer's saved unmerged weight) are freed before the next block is packed; then ``wte^T``
    is packed and ``wte`` replaced by :class:`PackedEmbedding` (the head reads the strips:
    :class:`PackedHead`). Peak memory is the model plus one block (plus the head's strips while
    ``wte`` is packed), and afterwards the packed copy costs nothing over the fp32 model (the copy
    mode of :meth:`FusedDecoder.for_model` keeps both: +494 MB on GPT-2 S, +1.41 GB on M).

    One-way: the model is inference only afterwards (``train()`` then a forward raises; adapters
    cannot be saved). Puts the model in eval mode (adapters merged). Returns a summary, or None
    (model unchanged apart from eval mode) where the fused step does not apply (``rows`` rows a
    step, see :meth:`FusedDecoder.for_model`).
    """
    if getattr(model, "decode_packed", None) is not None:
        return {"blocks": model.decode_packed.n_blocks, "bytes": model.decode_packed.nbytes, "already": True}
    model.eval()
    blocks = _fusable_blocks(model, rows)
    if blocks is None:
        return None
    tr = model.transformer
    packed = PackedWeights(len(blocks), int(tr.wte.weight.shape[1]), blocks[0]["eps"], int(tr.wte.weight.shape[0]))
    del blocks   # hold no block's tensors but the one being packed
    _PACKED.pop(model, None)
    for i, block in enumerate(model.transformer.h):
        t = _block_tensors(block)
        packed.pack_block(i, t)
        for parent_name, name, key in _PROJECTIONS:
            bias = t[key][1]
            setattr(getattr(block, parent_name), name,
                    PackedLinear(packed, i, key, None if bias is None else bias.stop_grad()))
        del t, bias
        release_freed_memory()
    packed.pack_head(tr.ln_f, tr.wte.weight)
    tr.wte = PackedEmbedding(packed)
    release_freed_memory()
    model.decode_packed, model.packed_head = packed, PackedHead(packed)
    return {"blocks": packed.n_blocks, "bytes": packed.nbytes, "hugepages": packed.hugepages}


class ThreadChooser:
    """Online thread-count choice for the fused step (the results do not depend on it).

    It probes ``max`` and ``max - 1`` threads on alternate steps (up to ``PROBES`` steps each, fewer
    when one is clearly slower: ``CLEAR`` times the other's median), then runs the faster for a
    window of steps and probes again; the window doubles (32 up to 512) while the choice holds.
    The first step is not timed (compiles, first touches). ``JT_LORA_DECODE_THREADS`` fixes the count.
    On a loaded 2-core machine two threads with barriers between phases ran 3-6x slower than one
    (a descheduled thread stalls every barrier), so probing must cost little there.
    """

    FIRST_WINDOW, MAX_WINDOW, PROBES, CLEAR = 32, 512, 3, 1.5

    def __init__(self):
        self.max_threads = decode_threads()
        self.threads = self.max_threads
        self.fixed = bool(os.environ.get("JT_LORA_DECODE_THREADS"))
        self.window = self.FIRST_WINDOW
        self._probing, self._skip, self._left, self._times, self._last = True, 1, 0, {}, None

    def record(self, seconds: float) -> None:
        """Note the last step's time (taken with ``self.threads``) and set the next step's count."""
        if self.fixed or self.max_threads < 2:
            return
        if not self._probing:
            self._left -= 1
            if self._left <= 0:
                self._probing, self._times = True, {}
            return
        if self._skip:
            self._skip -= 1
            return
        a, b = self.max_threads, self.max_threads - 1
        self._times.setdefault(self.threads, []).append(seconds)
        ta, tb = self._times.get(a, []), self._times.get(b, [])
        done = len(ta) >= self.PROBES and len(tb) >= self.PROBES
        if ta and tb and len(ta) == len(tb):
            ma, mb = float(np.median(ta)), float(np.median(tb))
            done = done or max(ma, mb) > self.CLEAR * min(ma, mb)
        if not done:
            self.threads = b if self.threads == a else a
            return
        best = a if float(np.median(ta)) <= float(np.median(tb)) else b
        self.window = min(2 * self.window, self.MAX_WINDOW) if best == self._last else self.FIRST_WINDOW
        self._last, self.threads, self._probing, self._left = best, best, False, self.window
