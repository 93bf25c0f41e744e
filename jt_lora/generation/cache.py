"""The KV caches of a beam search, both behind the model's one cache interface (``models.kv_cache``).

Each is built from the prompt pass's per-layer ``(k, v)`` and its key mask, and each beam step
calls ``advance(src)`` (row ``r`` continues row ``src[r]``) before feeding one token per row:

* :class:`GatheredCache`: the plain cache ``[rows, heads, T, D]`` gathered by beam index and grown
  by one position every step, attended by the model's own dense attention. Any backend; it is what
  the reference does, and the oracle the decode cache is tested against.
* :class:`DecodeCache` (CPU): the gathered cache copies the whole cache twice per layer per step
  (~9% of a GPT-2 S step at 10 beams). Here nothing is copied:

  - the prompt's keys and values stay as the prompt pass produced them, one copy per prompt rather
    than one per beam;
  - the keys and values of generated tokens go to a preallocated host buffer, slot ``s`` holding
    what row ``j`` fed at step ``s``; each row keeps its ancestry (the row it descended from at
    every earlier step), a few integers per step;
  - one fused op per layer writes this step's keys and values and attends over the prompt and the
    row's ancestry: ``softmax(q·k / sqrt(D))·v`` with padded prompt keys scored ``-1e10``, as the
    reference's masked attention does.

  The buffer is numpy memory owned by the cache; the op receives its address as run-time data, so
  Jittor compiles the op once. CPU only (where the few-row kernels exist): elsewhere the beam
  search takes the gathered cache (``generation.steppers.make_stepper``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..backend import jt
from ..models.kv_cache import KVCache, PlainCache
from ..nn.kernels import DECODE_ATTEND_CPP

__all__ = ["GatheredCache", "DecodeCache"]

_HEADER = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
""" + DECODE_ATTEND_CPP

# in0 qkv [R, 3C]; in1/in2 prompt keys/values [P, H, Tp, D]; in3 prompt key mask [P, Tp] (1 real,
# 0 padding); in4 each row's prompt [R] int32; in5 ancestry [R, >= t] int32 (row at each earlier
# step) -> out0 [R, C]. data: t (this step's slot), cap (rows per slot), k/v buffer addresses.
_SRC = r"""
const long long R = in0_shape0, C3 = in0_shape1, C = C3 / 3;
const long long H = in1_shape1, Tp = in1_shape2, D = in1_shape3, ld_path = in5_shape1;
const long long t = (long long)data["t"], cap = (long long)data["cap"];
float* Kb = (float*)(uintptr_t)data["k_addr"];
float* Vb = (float*)(uintptr_t)data["v_addr"];
const float sqrt_d = (float)data["sqrt_d"];
const float* qkv = in0_p;
for (long long r = 0; r < R; r++) {
    std::memcpy(Kb + (t * cap + r) * C, qkv + r * C3 + C, C * sizeof(float));
    std::memcpy(Vb + (t * cap + r) * C, qkv + r * C3 + 2 * C, C * sizeof(float));
}
#pragma omp parallel
{
    std::vector<float> w(Tp + t + 1);
    std::vector<const float*> vrow(Tp + t + 1);
    #pragma omp for collapse(2) schedule(static)
    for (long long r = 0; r < R; r++)
        for (long long h = 0; h < H; h++) {
            const long long p = in4_p[r];
            jtl_attend_one(qkv + r * C3 + h * D, in1_p + (p * H + h) * Tp * D, in2_p + (p * H + h) * Tp * D,
                           in3_p + p * Tp, Tp, Kb, Vb, in5_p + r * ld_path, t, r, cap, C, h * D, D, sqrt_d,
                           w.data(), vrow.data(), out0_p + r * C + h * D);
        }
}
"""


class GatheredCache(PlainCache):
    """The plain per-layer ``(k, v)`` of a beam search, reordered by beam index every step.

    Args: as :class:`DecodeCache` (``rows`` and ``steps`` are not needed: it grows as it goes).
    """

    def __init__(self, presents: Sequence[Tuple], prompt_mask: Optional[np.ndarray], rows: int = 0,
                 steps: int = 0):
        super().__init__(presents)
        self.rows = presents[0][0].shape[0]
        self.mask = None if prompt_mask is None else np.asarray(prompt_mask, np.float32)  # [rows, T]

    def advance(self, src: np.ndarray) -> None:
        """Start a step whose row ``r`` continues row ``src[r]`` (at the first step: prompt ``src[r]``)."""
        if len(src) != self.rows or not np.array_equal(src, np.arange(len(src))):
            idx = jt.array(np.asarray(src, np.int32))
            self.past = [(k[idx], v[idx]) for k, v in self.past]  # [rows, H, T, D] each
            if self.mask is not None:
                self.mask = self.mask[src]
        self.rows = len(src)
        if self.mask is not None:
            self.mask = np.concatenate([self.mask, np.ones((self.rows, 1), np.float32)], axis=1)

    def start(self, t: int, attention_mask, inspect: bool) -> None:
        if attention_mask is not None:
            raise ValueError("a GatheredCache keeps its own key mask: pass no attention_mask")
        super().start(t, None if self.mask is None else jt.array(self.mask), inspect)

    def finish(self):
        self.past = self.presents   # this step's keys and values are the next step's past
        return self


class DecodeCache(KVCache):
    """Keys and values of a beam search after its prompt pass; pass it as ``past`` to the model.

    Args:
        presents: the prompt pass's per-layer ``(k, v)``, each ``[prompts, H, T_prompt, D]``.
        prompt_mask: ``[prompts, T_prompt]``, 1 for real tokens, 0 for left padding (None: all real).
        rows: most hypotheses a step feeds (prompts x beam).
        steps: most steps (tokens fed per hypothesis).
    """

    def __init__(self, presents: Sequence[Tuple], prompt_mask: Optional[np.ndarray], rows: int, steps: int):
        k0 = presents[0][0]
        p, h, tp, d = k0.shape
        self.heads, self.head_dim, self.rows_cap, self.steps = h, d, int(rows), int(steps)
        self.prompt_k = [k for k, _ in presents]
        self.prompt_v = [v for _, v in presents]
        jt.sync(self.prompt_k + self.prompt_v)
        mask = np.ones((p, tp), np.float32) if prompt_mask is None else np.asarray(prompt_mask, np.float32)
        self.prompt_mask = jt.array(mask)
        # untouched pages cost no memory: the buffer fills as the search goes
        self.buffer = np.empty((len(presents), 2, self.steps, self.rows_cap, h * d), np.float32)
        self.t = -1                # slot of the step being fed
        self.prompt_of_row: Optional[np.ndarray] = None
        self.ancestry: Optional[np.ndarray] = None  # [rows, t]: row at each earlier step

    @property
    def length(self) -> int:
        """Positions a row attends to before this step's token (prompt width + tokens fed)."""
        return self.prompt_mask.shape[1] + max(self.t, 0)

    def advance(self, src: np.ndarray) -> None:
        """Start a step whose row ``r`` continues row ``src[r]`` of the previous step (at the first
        step: of the prompt pass, i.e. ``src`` are prompt indices)."""
        src = np.asarray(src, np.int32)
        if len(src) > self.rows_cap:
            raise ValueError(f"{len(src)} rows exceed the cache's {self.rows_cap}")
        if self.t + 1 >= self.steps:
            raise ValueError(f"the cache holds {self.steps} steps")
        if self.t < 0:
            self.prompt_of_row, self.ancestry = src, np.zeros((len(src), 0), np.int32)
        else:
            self.prompt_of_row = self.prompt_of_row[src]
            self.ancestry = np.concatenate([self.ancestry[src], src[:, None]], axis=1)
        self.t += 1
        self._rows_var = jt.array(self.prompt_of_row)
        anc = self.ancestry if self.t > 0 else np.zeros((len(src), 1), np.int32)
        self._ancestry_var = jt.array(np.ascontiguousarray(anc))

    def start(self, t: int, attention_mask, inspect: bool) -> None:
        if t != 1 or inspect or attention_mask is not None:
            raise ValueError("a DecodeCache takes one token per row, without head masks, attentions "
                             "or an attention_mask (it keeps its own)")

    def attend(self, layer: int, qkv, dense=None):
        """Store this step's keys and values for ``layer`` and attend in one op (``dense``, the
        model's own attention, is not used): qkv ``[R, 1, 3C]`` -> (``[R, 1, C]``, None)."""
        r, _, c3 = qkv.shape
        if r != len(self.prompt_of_row):
            raise ValueError(f"{r} rows fed, but the step was started for {len(self.prompt_of_row)}")
        inputs, data = self.layer_inputs(layer)
        out = jt.code((r, c3 // 3), "float32", [qkv.reshape(r, c3)] + inputs,
                      cpu_header=_HEADER, cpu_src=_SRC, data=data)
        return out.reshape(r, 1, c3 // 3), None

    def layer_inputs(self, layer: int):
        """What this step's attention for ``layer`` reads, after the ``qkv`` input: the op inputs
        (prompt keys, values, key mask, each row's prompt, ancestry) and the run-time data (slot,
        rows per slot, sqrt(D), k/v buffer addresses). Shared with ``nn.decode_block``'s fused block."""
        buf = self.buffer[layer]
        data = {"t": float(self.t), "cap": float(self.rows_cap), "sqrt_d": float(np.sqrt(self.head_dim)),
                "k_addr": float(buf[0].ctypes.data), "v_addr": float(buf[1].ctypes.data)}
        return [self.prompt_k[layer], self.prompt_v[layer], self.prompt_mask, self._rows_var,
                self._ancestry_var], data

    def finish(self):
        return self
