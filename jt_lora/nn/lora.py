"""LoRA layers with loralib's semantics, plus InA (shunting inhibition) as a gate.

``Linear``, ``Embedding`` and ``MergedLinear`` mirror ``loralib.layers``: the
frozen weight is stored as the checkpoint stores it (``fan_in_fan_out=True``
keeps GPT-2's Conv1D layout ``[in, out]``), ``lora_A`` starts kaiming-uniform,
``lora_B`` at zero (so step 0 equals the base model), scaling is
``lora_alpha / r``, ``eval()`` merges the update into the weight and
``train()`` takes it out again.

InA replaces the low-rank path ``B·A·x`` with
``B·leaky_relu(A·x - inhibition·max_rank(A·x), 0.01)``, the InA reference's
formula (it subtracts, with torch's default slope): non-linear, so a layer
with inhibition > 0 never merges; asking it to raises.

Merging keeps a host copy of the unmerged weight and unmerging restores it,
so any number of eval()/train() cycles leaves the frozen weight bit-identical
(subtracting the update again is not exact in floating point).

``LoraAdapterLayer`` is the one LoRA layer class; ``LoRALayer`` (and so ``Linear``,
``MergedLinear``, ``Embedding``) is its loralib-style front-end, ``jt_lora.peft.layers.LoraLayer``
its PEFT-style one. They differ only in where tensors live and so in their parameter names.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np

from ..backend import jt, nn
from .adapter_layer import DEFAULT_ADAPTER, AdapterLayer
from .kernels import dense

__all__ = ["LoraAdapterLayer", "LoRALayer", "Linear", "Embedding", "MergedLinear", "InhibitionGate",
           "kaiming_uniform", "INA_SLOPE", "LEGACY_INA_SLOPE", "lora_variant", "block_b", "lora_delta",
           "lora_update"]

# torch's leaky_relu default, which the InA reference code uses.
INA_SLOPE = 0.01
# The slope jt_lora used before it recorded the slope in adapter files: files without it were trained so.
LEGACY_INA_SLOPE = 0.1


def kaiming_uniform(shape, fan_in: int) -> "jt.Var":
    """torch's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jt.array(np.random.uniform(-bound, bound, size=shape).astype("float32"))


class InhibitionGate:
    """InA as a LoRA *variant*: it owns the low-rank path's non-linearity and the merge rule.

    Each token's rank activations ``h = A·x`` become ``leaky_relu(h - inhibition * max(h),
    negative_slope)``, the max taken over each group of ``r`` (one group per adapted part of a fused
    layer; a plain layer is one group). The InA reference subtracts the scaled max and uses torch's
    default slope 0.01; inhibition 0 is the identity, i.e. plain LoRA (PEFT's ``LoraVariant``
    pattern: the layer's forward stays plain and calls the variant's hook).

    Merge rule: a gate with inhibition > 0 is non-linear in x, so the update has no weight delta;
    ``check_mergeable`` is the one place that refuses, for every front-end.
    """

    def __init__(self, inhibition: float = 0.0, negative_slope: float = INA_SLOPE):
        if not 0.0 <= inhibition < 1.0:
            raise ValueError(f"lora_inhibition must be in [0, 1), got {inhibition}")
        if not 0.0 <= negative_slope < 1.0:
            raise ValueError(f"lora_inhibition_slope must be in [0, 1), got {negative_slope}")
        self.inhibition = float(inhibition)
        self.negative_slope = float(negative_slope)

    @property
    def mergeable(self) -> bool:
        return self.inhibition == 0.0

    def check_mergeable(self, what: str):
        """Raise (naming ``what``) unless the update is linear and can be folded into the weight."""
        if not self.mergeable:
            raise ValueError(f"{what} is InA (lora_inhibition={self.inhibition}): its update is non-linear in x, "
                             f"so it has no weight delta and cannot be merged into the weight (InA layers cannot "
                             f"merge: use merge_weights=False)")

    def __call__(self, h: "jt.Var", groups: int) -> "jt.Var":
        if self.inhibition == 0.0:
            return h
        shape = h.shape  # [..., groups * r]
        g = h.reshape(shape[:-1] + (groups, shape[-1] // groups))
        peak = g.max(dim=-1, keepdims=True)
        g = nn.leaky_relu(g - self.inhibition * peak, self.negative_slope)
        return g.reshape(shape)


def lora_variant(lora_inhibition: float = 0.0, lora_inhibition_slope: float = INA_SLOPE) -> InhibitionGate:
    """The variant object for a LoRA adapter: plain LoRA (inhibition 0) or InA."""
    return InhibitionGate(lora_inhibition, lora_inhibition_slope)


# --- the LoRA math, once: every LoRA layer (loralib-style and PEFT-style) goes through these -----------
def block_b(b: "jt.Var", enable: Optional[Sequence[bool]], r: int) -> "jt.Var":
    """Grouped ``B [part·g, r]`` spread into ``[part·len(enable), r·g]``: block-diagonal over the enabled
    parts, zero elsewhere (loralib's MergedLinear layout; PEFT's rank-``g·r`` B). ``enable=None``: as is."""
    if enable is None:
        return b
    g = sum(enable)
    part = b.shape[0] // g
    rows, j = [], 0
    for enabled in enable:
        cols = [b[j * part:(j + 1) * part] if enabled and k == j else jt.zeros((part, r), dtype=b.dtype)
                for k in range(g)]
        rows.append(jt.concat(cols, dim=1) if g > 1 else cols[0])
        j += int(enabled)
    return jt.concat(rows, dim=0)


def lora_delta(a, b_full, scaling: float, fan_in_fan_out: bool, gate: InhibitionGate, what: str):
    """``scaling · B·A`` in the weight's layout (``[in, out]`` when fan_in_fan_out); the variant decides
    whether a delta exists (InA: none, raises). Used by merge, PEFT's get_delta_weight and tests."""
    gate.check_mergeable(what)
    d = jt.matmul(b_full, a) * scaling  # [out, in]
    return d.transpose() if fan_in_fan_out else d


def lora_update(x, a, b_full, scaling: float, gate: InhibitionGate, groups: int, dropout: float, training: bool):
    """The low-rank path ``scaling · B·gate(A·dropout(x))`` ([..., in] -> [..., out]); factored, so
    dropout and the variant's gate act on ``A·x`` (and it is cheaper than a full delta)."""
    if dropout > 0 and training:
        x = nn.dropout(x, dropout, is_train=True)
    h = nn.matmul_transpose(x, a)  # [..., r·groups]
    h = gate(h, groups)
    return nn.matmul_transpose(h, b_full) * scaling


class LoraAdapterLayer(AdapterLayer):
    """The one LoRA layer: named LoRA/InA adapters on a dense projection, for both front-ends.

    Each adapter has ``A [r·g, in]`` and ``B [part·g, r]`` (``g`` enabled parts of a fused output,
    loralib ``MergedLinear``'s grouped layout; a plain adapter is ``g = 1``, ``part = out``), a
    scaling, a dropout and a variant (``InhibitionGate``). The forward is ``base(x) + Σ_pending
    scaling·B_full·gate(A·dropout(x))`` and merging adds ``Σ scaling·B_full·A``, both through the
    functions above, so they cannot disagree.

    Front-ends supply where things live: ``base_forward(x)``, ``lora_pair(name)`` (the A and B
    tensors) and ``_store_lora(name, a, b)``. The per-adapter settings are kept in dicts by name;
    the loralib-style layers show the ``"default"`` adapter's as plain values (``layer.r``), the
    PEFT-style layer the dicts (``layer.r["default"]``).
    """

    def _init_lora_settings(self):
        self._init_adapter_layer()
        self._r, self._alpha, self._scaling, self._dropout, self._enable, self._gate = {}, {}, {}, {}, {}, {}

    def add_lora(self, name: str, a, b, r: int, lora_alpha: float, scaling: float, lora_dropout: float = 0.0,
                 enable: Optional[Sequence[bool]] = None, gate: Optional[InhibitionGate] = None):
        """Add adapter ``name`` with factors ``a``/``b`` (grouped over ``enable``'s parts) and make it active."""
        self._store_lora(name, a, b)
        self._r[name], self._alpha[name], self._scaling[name] = int(r), lora_alpha, scaling
        self._dropout[name] = float(lora_dropout)
        self._enable[name] = None if enable is None else tuple(enable)
        self._gate[name] = gate if gate is not None else lora_variant()
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def adapter_names(self):
        return list(self._r)

    def _forget(self, name):
        self._drop_lora(name)
        for d in (self._r, self._alpha, self._scaling, self._dropout, self._enable, self._gate):
            d.pop(name, None)

    def adapter_rank(self, name: str = DEFAULT_ADAPTER) -> int:
        """Adapter ``name``'s rank per group (``r``)."""
        return self._r[name]

    def groups(self, name: str = DEFAULT_ADAPTER) -> int:
        """How many rank-``r`` groups adapter ``name`` has (enabled parts of a fused output; else 1)."""
        enable = self._enable[name]
        return sum(enable) if enable else 1

    def part_mask(self, name: str = DEFAULT_ADAPTER) -> Optional[Tuple[bool, ...]]:
        """Adapter ``name``'s per-part mask when it is grouped over a fused output (> 1 part), else None."""
        enable = self._enable.get(name)
        return enable if enable and len(enable) > 1 else None

    def full_b(self, name: str = DEFAULT_ADAPTER) -> "jt.Var":
        """``B`` as ``[out, r·groups]`` (grouped layouts spread into zero blocks)."""
        return block_b(self.lora_pair(name)[1], self._enable[name], self._r[name])

    def get_delta_weight(self, name: str = DEFAULT_ADAPTER) -> "jt.Var":
        """``scaling · B·A`` in the dense weight's layout (``[in, out]`` when fan_in_fan_out); InA raises."""
        return lora_delta(self.lora_pair(name)[0], self.full_b(name), self._scaling[name], self.fan_in_fan_out,
                          self._gate[name], f"{type(self).__name__} adapter {name!r}")

    def delta_weight(self, name: str = DEFAULT_ADAPTER) -> "jt.Var":
        """loralib-style name of ``get_delta_weight``."""
        return self.get_delta_weight(name)

    def merged_state(self, names):
        w = self._dense().weight
        for name in names:
            w = w + self.get_delta_weight(name)
        return w, None

    def lora_forward(self, name: str, x):
        """Adapter ``name``'s low-rank path alone."""
        return lora_update(x, self.lora_pair(name)[0], self.full_b(name), self._scaling[name], self._gate[name],
                           self.groups(name), self._dropout[name], self.training)

    def base_forward(self, x):
        raise NotImplementedError

    def execute(self, x):
        self._sync_mode()
        y = self.base_forward(x)
        for name in self._pending():
            y = y + self.lora_forward(name, x)
        return y

    # storage hooks: where a front-end keeps the factors (and so what their parameters are called)
    def lora_pair(self, name: str):
        raise NotImplementedError

    def _store_lora(self, name: str, a, b):
        raise NotImplementedError

    def _drop_lora(self, name: str):
        raise NotImplementedError


class LoRALayer(LoraAdapterLayer):
    """The loralib-style front-end (loralib's ``LoRALayer``): the dense weight on the layer itself and
    at most one adapter, ``"default"``, stored flat as ``lora_A``/``lora_B`` (microsoft/LoRA's
    parameter names), with its settings as plain attributes (``r``, ``scaling``, ``lora_alpha`` ...)."""

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float,
                   merge_weights: Optional[bool], lora_inhibition: float = 0.0,
                   lora_inhibition_slope: float = INA_SLOPE):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self._init_lora_settings()
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.gate = lora_variant(lora_inhibition, lora_inhibition_slope)
        if merge_weights is None:
            merge_weights = self.gate.mergeable
        if merge_weights:
            self.gate.check_mergeable(f"{type(self).__name__} with merge_weights=True (pass merge_weights=False)")
        self.merge_weights = bool(merge_weights)
        self._rank = int(r)

    def _add_default(self, a, b, enable=None):
        """Add the one adapter (r > 0) and freeze the dense weight, as loralib does."""
        self.add_lora(DEFAULT_ADAPTER, a, b, self._rank, self.lora_alpha, self.scaling, self.lora_dropout, enable,
                      self.gate)
        self.weight.stop_grad()

    @property
    def r(self) -> int:
        return self._r.get(DEFAULT_ADAPTER, 0)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self._rank if self._rank > 0 else 0.0

    @property
    def lora_inhibition(self) -> float:
        return self.gate.inhibition

    def lora_pair(self, name: str = DEFAULT_ADAPTER):
        return self.lora_A, self.lora_B

    def _store_lora(self, name: str, a, b):
        if name != DEFAULT_ADAPTER:
            raise ValueError(f"{type(self).__name__} holds one adapter ({DEFAULT_ADAPTER!r}); use jt_lora.peft "
                             f"for named adapters")
        self.lora_A, self.lora_B = a, b

    def _drop_lora(self, name: str):
        del self.lora_A, self.lora_B

    def _merges_on_eval(self) -> bool:
        return self.merge_weights and self.r > 0

    def _init_dense(self, in_features: int, out_features: int, fan_in_fan_out: bool, bias: bool):
        """nn.Linear's init (kaiming-uniform weight, uniform bias), stored in the requested layout."""
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        w = kaiming_uniform((out_features, in_features), in_features)
        self.weight = w.transpose() if fan_in_fan_out else w
        bound = 1.0 / math.sqrt(in_features)
        self.bias = jt.array(np.random.uniform(-bound, bound, out_features).astype("float32")) if bias else None

    def base_forward(self, x):
        """The frozen projection alone: x·W (+ b)."""
        return dense(x, self.weight, self.bias, self.fan_in_fan_out)


class Linear(LoRALayer):
    """A dense layer with an optional LoRA update (loralib ``Linear``).

    Args:
        in_features, out_features: layer sizes.
        r: LoRA rank; 0 means a plain linear layer.
        lora_alpha: scaling numerator (scaling = lora_alpha / r).
        lora_dropout: dropout on the input of the low-rank path.
        fan_in_fan_out: weight stored as ``[in, out]`` (GPT-2 Conv1D) instead of ``[out, in]``.
        merge_weights: merge on eval()/unmerge on train(); default True unless InA.
        lora_inhibition: InA inhibition level in [0, 1).
        lora_inhibition_slope: InA's leaky-ReLU negative slope (0.01, the InA reference's).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False,
                 merge_weights: Optional[bool] = None, lora_inhibition: float = 0.0, bias: bool = True,
                 lora_inhibition_slope: float = INA_SLOPE):
        self._init_dense(in_features, out_features, fan_in_fan_out, bias)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, lora_inhibition, lora_inhibition_slope)
        if r > 0:
            self._add_default(kaiming_uniform((r, in_features), in_features),
                              jt.zeros((out_features, r), dtype="float32"))


class Embedding(LoRALayer):
    """An embedding with an optional LoRA update (loralib ``Embedding``: A zeros, B normal)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: Optional[bool] = None):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = jt.array(np.random.normal(0, 1, (num_embeddings, embedding_dim)).astype("float32"))
        self.fan_in_fan_out = False
        self._init_lora(r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self._add_default(jt.zeros((r, num_embeddings), dtype="float32"),
                              jt.array(np.random.normal(0, 1, (embedding_dim, r)).astype("float32")))

    def get_delta_weight(self, name: str = DEFAULT_ADAPTER):
        a, b = self.lora_pair(name)
        return jt.matmul(b, a).transpose() * self._scaling[name]  # [num, dim]

    def base_forward(self, ids):
        return self.weight[ids]

    def lora_forward(self, name: str, ids):
        a, b = self.lora_pair(name)
        return nn.matmul_transpose(a.transpose()[ids], b) * self._scaling[name]  # A's columns are the rows


class MergedLinear(LoRALayer):
    """A fused projection (e.g. GPT-2's ``c_attn`` = q|k|v) with LoRA on some of its parts.

    ``enable_lora`` is a per-part mask: ``(True, False, True)`` adapts q and v of
    ``c_attn`` and leaves k exactly untouched. Each enabled part has its own
    rank-``r`` pair; ``lora_A`` stacks them as ``[r·n_enabled, in]`` and
    ``lora_B`` as ``[out_part·n_enabled, r]``, loralib's grouped layout, so
    microsoft/LoRA checkpoints load as they are.

    With InA the gate's max is taken per enabled part (each part's own rank-``r`` group). The InA
    reference adapts GPT-2's fused ``c_attn`` as one module and takes the max over its whole rank;
    a ``Linear`` (or ``enable_lora=(True,)``) on ``c_attn`` is that layer.

    Args: as ``Linear``, plus ``enable_lora`` (tuple of bools, one per part).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: Optional[bool] = None,
                 lora_inhibition: float = 0.0, bias: bool = True, lora_inhibition_slope: float = INA_SLOPE):
        enable_lora = tuple(bool(e) for e in enable_lora)
        if out_features % len(enable_lora) != 0:
            raise ValueError(f"out_features={out_features} is not divisible into {len(enable_lora)} parts")
        self._init_dense(in_features, out_features, fan_in_fan_out, bias)
        self.enable_lora = enable_lora
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, lora_inhibition, lora_inhibition_slope)
        groups, part = sum(enable_lora), out_features // len(enable_lora)
        if r > 0 and groups > 0:
            self._add_default(kaiming_uniform((r * groups, in_features), in_features),
                              jt.zeros((part * groups, r), dtype="float32"), enable_lora)
