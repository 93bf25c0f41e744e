"""(IA)³: learned vectors that rescale a frozen projection's output parts or its input.

On GPT-2 the default (both front-ends: PEFT's GPT-2 targets, which the InA code uses) rescales all
of ``c_attn``'s output (``enable_ia3=(True, True, True)``; ``(False, True, True)`` is the (IA)³ paper's
k and v only) and ``mlp.c_proj``'s input, the feed-forward activation (``feedforward=True``). Vectors start at ones, so
step 0 equals the base model. Both kinds merge into the weight: an
output-side vector scales the weight's output columns and the bias, an
input-side one the weight's input rows. Unmerging restores the weight and
bias saved at merge time instead of dividing by the vector, so eval()/train()
cycles never move the frozen tensors (dividing drifts by rounding each cycle).
"""
import math
from typing import Optional, Sequence

import numpy as np

from ..backend import jt, nn
from .kernels import dense, scale_last_dim
from .lora import ExactMerge, kaiming_uniform
from .modes import AdapterModule

__all__ = ["IA3Linear", "ia3_vector", "ia3_scaled"]


# --- the (IA)³ math, once: every (IA)³ layer (loralib-style and PEFT-style) goes through these -----------
def ia3_vector(l: "jt.Var", enable: Optional[Sequence[bool]], part: int) -> "jt.Var":
    """The full-length scaling vector from the learned one: ``enable`` (a per-part mask of a fused
    output) puts ones on the parts left alone; ``None`` means ``l`` already covers the whole axis."""
    l = l.reshape(-1)
    if enable is None or all(enable):
        return l
    parts, g = [], 0
    for enabled in enable:
        if enabled:
            parts.append(l[g * part:(g + 1) * part])
            g += 1
        else:
            parts.append(jt.ones((part,), dtype=l.dtype))
    return jt.concat(parts, dim=0)


def ia3_scaled(weight, bias, vec, fan_in_fan_out: bool, feedforward: bool):
    """(weight, bias) with the vector folded in: the output axis (and the bias) for an output-side
    vector, the input axis for a feed-forward (input-side) one; the weight's layout decides which
    tensor axis that is. Merge and tests use it; unmerge restores instead of dividing."""
    out_axis = 1 if fan_in_fan_out else 0
    axis = 1 - out_axis if feedforward else out_axis
    shape = [1, 1]
    shape[axis] = -1
    weight = weight * vec.reshape(shape)
    if bias is not None and not feedforward:
        bias = bias * vec
    return weight, (None if feedforward else bias)


class IA3Linear(ExactMerge, AdapterModule):
    """A dense (optionally fused) projection with (IA)³ scaling.

    Args:
        in_features, out_features: layer sizes.
        enable_ia3: per-part mask of the output (ignored when ``feedforward``).
        feedforward: scale the input instead of the output.
        fan_in_fan_out: weight stored as ``[in, out]`` (GPT-2 Conv1D).
        merge_weights: merge on eval()/unmerge on train().
    """

    def __init__(self, in_features: int, out_features: int, enable_ia3: Sequence[bool] = (True,),
                 feedforward: bool = False, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 bias: bool = True):
        enable_ia3 = tuple(bool(e) for e in enable_ia3)
        if out_features % len(enable_ia3) != 0:
            raise ValueError(f"out_features={out_features} is not divisible into {len(enable_ia3)} parts")
        self.in_features, self.out_features = in_features, out_features
        self.enable_ia3 = enable_ia3
        self.feedforward = feedforward
        self.fan_in_fan_out = fan_in_fan_out
        self.merge_weights = merge_weights
        self.merged = False
        w = kaiming_uniform((out_features, in_features), in_features)
        self.weight = (w.transpose() if fan_in_fan_out else w).stop_grad()
        bound = 1.0 / math.sqrt(in_features)
        self.bias = jt.array(np.random.uniform(-bound, bound, out_features).astype("float32")) if bias else None
        self._part = out_features // len(enable_ia3)
        size = in_features if feedforward else self._part * sum(enable_ia3)
        self.ia3_l = jt.ones((size,), dtype="float32")

    def scale_vector(self) -> "jt.Var":
        """The full-length scaling vector: ``[in]`` (feed-forward) or ``[out]`` with ones on untouched parts."""
        return ia3_vector(self.ia3_l, None if self.feedforward else self.enable_ia3, self._part)

    def merge(self):
        """Fold the vector into the weight (and bias), keeping the unmerged tensors (idempotent)."""
        if self.merged:
            return
        self._save_unmerged()
        self._assign_dense(*ia3_scaled(self.weight, self.bias, self.scale_vector(), self.fan_in_fan_out,
                                       self.feedforward))
        self.merged = True

    def _merges_on_eval(self) -> bool:
        return self.merge_weights

    def execute(self, x):
        self._sync_mode()
        if self.feedforward and not self.merged:
            x = scale_last_dim(x, self.scale_vector())
        y = dense(x, self.weight, self.bias, self.fan_in_fan_out)
        if not self.feedforward and not self.merged:
            y = scale_last_dim(y, self.scale_vector())
        return y
