"""(IA)³: learned vectors that rescale a frozen projection's output parts or its input.

On GPT-2 the default (both front-ends: PEFT's GPT-2 targets, which the InA code uses) rescales all
of ``c_attn``'s output (``enable_ia3=(True, True, True)``; ``(False, True, True)`` is the (IA)³ paper's
k and v only) and ``mlp.c_proj``'s input, the feed-forward activation (``feedforward=True``). Vectors start at ones, so
step 0 equals the base model. Both kinds merge into the weight: an
output-side vector scales the weight's output columns and the bias, an
input-side one the weight's input rows. Unmerging restores the weight and
bias saved at merge time instead of dividing by the vector, so eval()/train()
cycles never move the frozen tensors (dividing drifts by rounding each cycle).

``IA3AdapterLayer`` is the one (IA)³ layer class; ``IA3Linear`` is its loralib-style front-end and
``jt_lora.peft.layers.IA3Layer`` its PEFT-style one (they differ only in parameter names).
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np

from ..backend import jt
from .adapter_layer import DEFAULT_ADAPTER, AdapterLayer
from .kernels import dense, scale_last_dim
from .lora import kaiming_uniform

__all__ = ["IA3AdapterLayer", "IA3Linear", "ia3_vector", "ia3_scaled"]


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


class IA3AdapterLayer(AdapterLayer):
    """The one (IA)³ layer: named scaling vectors on a dense projection, for both front-ends.

    Each adapter's learned vector covers the input (``is_feedforward``) or the output, where a
    per-part mask (``enable``) keeps only the enabled parts' entries of a fused output (the others
    are ones). Several active adapters multiply, as in PEFT. ``get_scaling_vector`` is the one
    function that defines what the adapters do; the forward and merging both use it.

    Front-ends supply ``base_forward(x)``, ``ia3_vector_of(name)`` and ``_store_ia3(name, value)``:
    the loralib-style ``IA3Linear`` keeps one flat ``ia3_l [size]``, the PEFT-style
    ``peft.layers.IA3Layer`` PEFT's ``ia3_l.<name> [out, 1]`` / ``[1, in]``.
    """

    def _init_ia3_settings(self, is_feedforward: bool):
        self._init_adapter_layer()
        self.is_feedforward = bool(is_feedforward)
        self._ia3_enable = {}

    def add_ia3(self, name: str, value, enable: Optional[Sequence[bool]] = None):
        """Add adapter ``name`` (vector ``value``; ``enable`` only for an output-side vector) and activate it."""
        self._store_ia3(name, value)
        self._ia3_enable[name] = None if enable is None or self.is_feedforward or all(enable) else tuple(enable)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def adapter_names(self):
        return list(self._ia3_enable)

    def _forget(self, name):
        self._drop_ia3(name)
        self._ia3_enable.pop(name, None)

    def part_mask(self, name: str = DEFAULT_ADAPTER) -> Optional[Tuple[bool, ...]]:
        """Adapter ``name``'s per-part mask of a fused output (None: the vector covers the whole axis)."""
        return self._ia3_enable.get(name)

    def full_vector(self, name: str = DEFAULT_ADAPTER) -> "jt.Var":
        """Adapter ``name``'s vector over the whole axis (``[in]`` or ``[out]``; ones on parts left alone)."""
        enable = self._ia3_enable[name]
        return ia3_vector(self.ia3_vector_of(name), enable, self.out_features // len(enable) if enable else 0)

    def get_scaling_vector(self, names: Sequence[str]) -> "jt.Var":
        """Product of the named adapters' vectors over the whole axis."""
        vec = None
        for name in names:
            v = self.full_vector(name)
            vec = v if vec is None else vec * v
        return vec

    def merged_state(self, names):
        dense_ = self._dense()
        return ia3_scaled(dense_.weight, getattr(dense_, "bias", None), self.get_scaling_vector(names),
                          self.fan_in_fan_out, self.is_feedforward)

    def base_forward(self, x):
        raise NotImplementedError

    def execute(self, x):
        self._sync_mode()
        pending = self._pending()
        if not pending:
            return self.base_forward(x)
        vec = self.get_scaling_vector(pending)
        if self.is_feedforward:
            return self.base_forward(scale_last_dim(x, vec))
        return scale_last_dim(self.base_forward(x), vec)

    # storage hooks
    def ia3_vector_of(self, name: str):
        raise NotImplementedError

    def _store_ia3(self, name: str, value):
        raise NotImplementedError

    def _drop_ia3(self, name: str):
        raise NotImplementedError


class IA3Linear(IA3AdapterLayer):
    """The loralib-style (IA)³ front-end: a dense (optionally fused) projection with one vector,
    ``ia3_l`` (flat, ``[in]`` or the enabled parts of ``[out]``), on the layer itself.

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
        self.fan_in_fan_out = fan_in_fan_out
        self.merge_weights = merge_weights
        self._init_ia3_settings(feedforward)
        w = kaiming_uniform((out_features, in_features), in_features)
        self.weight = (w.transpose() if fan_in_fan_out else w).stop_grad()
        bound = 1.0 / math.sqrt(in_features)
        self.bias = jt.array(np.random.uniform(-bound, bound, out_features).astype("float32")) if bias else None
        part = out_features // len(enable_ia3)
        size = in_features if feedforward else part * sum(enable_ia3)
        self.add_ia3(DEFAULT_ADAPTER, jt.ones((size,), dtype="float32"), enable_ia3)

    @property
    def feedforward(self) -> bool:
        return self.is_feedforward

    def scale_vector(self) -> "jt.Var":
        """The full-length scaling vector: ``[in]`` (feed-forward) or ``[out]`` with ones on untouched parts."""
        return self.full_vector(DEFAULT_ADAPTER)

    def ia3_vector_of(self, name: str = DEFAULT_ADAPTER):
        return self.ia3_l

    def _store_ia3(self, name: str, value):
        if name != DEFAULT_ADAPTER:
            raise ValueError(f"IA3Linear holds one adapter ({DEFAULT_ADAPTER!r}); use jt_lora.peft for named adapters")
        self.ia3_l = value

    def _drop_ia3(self, name: str):
        del self.ia3_l

    def _merges_on_eval(self) -> bool:
        return self.merge_weights

    def base_forward(self, x):
        return dense(x, self.weight, self.bias, self.fan_in_fan_out)
