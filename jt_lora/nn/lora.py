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
"""
import math
from typing import Optional, Sequence

import numpy as np

from ..backend import jt, nn
from .kernels import dense
from .modes import AdapterModule, assign_keep_trainable

__all__ = ["LoRALayer", "Linear", "Embedding", "MergedLinear", "InhibitionGate", "kaiming_uniform",
           "INA_SLOPE", "LEGACY_INA_SLOPE", "ExactMerge",
           "lora_variant", "block_b", "lora_delta", "lora_update"]

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


class ExactMerge:
    """Merge/unmerge bookkeeping shared by every adapter layer (both front-ends).

    ``_save_unmerged`` keeps the dense weight (and bias) as host arrays before an adapter is folded
    in; ``_restore_unmerged`` puts those arrays back, so the frozen tensors are bit-identical after any
    number of cycles (subtracting an update or dividing by an (IA)³ vector drifts by rounding). The
    copy lives only while merged (eval mode): one copy of each merged layer's weight.
    ``_dense()`` is the module holding ``weight``/``bias``: the layer itself, or a PEFT layer's base.
    """

    _unmerged = None

    def _dense(self):
        return self

    def _save_unmerged(self):
        if self._unmerged is not None:  # already merged: keep the original
            return
        dense = self._dense()
        self._unmerged = (dense.weight.numpy().copy(),
                          None if getattr(dense, "bias", None) is None else dense.bias.numpy().copy())

    def _assign_dense(self, weight, bias=None):
        dense = self._dense()
        assign_keep_trainable(dense.weight, weight)
        if bias is not None and getattr(dense, "bias", None) is not None:
            assign_keep_trainable(dense.bias, bias)

    def _restore_unmerged(self):
        if self._unmerged is None:
            return
        self._assign_dense(*self._unmerged)
        self._unmerged = None

    merged = False

    def _merges_on_eval(self) -> bool:
        """Whether ``eval()`` folds the adapter in (loralib's ``merge_weights``); layers override."""
        return False

    def unmerge(self):
        """Restore the tensors saved by ``merge`` (idempotent; exact, unlike subtracting an update or
        dividing by a vector)."""
        if not self.merged:
            return
        self._restore_unmerged()
        self.merged = False

    def _sync_mode(self):
        """Merge in eval mode and unmerge in train mode, as loralib does."""
        if not self._merges_on_eval():
            return
        if self.training and self.merged:
            self.unmerge()
        elif not self.training and not self.merged:
            self.merge()

    def unmerged_weights(self):
        """(weight, bias) as numpy without the adapter folded in, whatever the mode: for writers that
        must not switch the model to train mode."""
        if self._unmerged is not None:
            return self._unmerged
        dense = self._dense()
        return dense.weight.numpy(), None if getattr(dense, "bias", None) is None else dense.bias.numpy()


class LoRALayer(ExactMerge, AdapterModule):
    """State shared by every loralib-style LoRA layer (loralib's ``LoRALayer``)."""

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float,
                   merge_weights: Optional[bool], lora_inhibition: float = 0.0,
                   lora_inhibition_slope: float = INA_SLOPE):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.gate = lora_variant(lora_inhibition, lora_inhibition_slope)
        self.scaling = lora_alpha / r if r > 0 else 0.0
        if merge_weights is None:
            merge_weights = self.gate.mergeable
        if merge_weights:
            self.gate.check_mergeable(f"{type(self).__name__} with merge_weights=True (pass merge_weights=False)")
        self.merge_weights = bool(merge_weights)
        self.merged = False

    @property
    def lora_inhibition(self) -> float:
        return self.gate.inhibition

    _enable = None  # per-part mask (MergedLinear); None: one plain pair

    @property
    def _groups_n(self) -> int:
        return sum(self._enable) if self._enable else 1

    def full_b(self) -> "jt.Var":
        """``lora_B`` as ``[out, r·groups]`` (grouped layouts spread into zero blocks)."""
        return block_b(self.lora_B, self._enable, self.r)

    def delta_weight(self) -> "jt.Var":
        """scaling · B·A (zero-padded to the full output), in the weight's own layout."""
        return lora_delta(self.lora_A, self.full_b(), self.scaling, self.fan_in_fan_out, self.gate,
                          type(self).__name__)

    # merge/unmerge through the one delta function
    def merge(self):
        """Add the low-rank update to the frozen weight (idempotent; InA raises)."""
        if self.merged or self.r == 0:
            return
        delta = self.delta_weight()
        self._save_unmerged()
        self._assign_dense(self.weight + delta)
        self.merged = True

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

    def execute(self, x):
        self._sync_mode()
        y = self.base_forward(x)
        if self.r > 0 and not self.merged:
            y = y + lora_update(x, self.lora_A, self.full_b(), self.scaling, self.gate, self._groups_n,
                                self.lora_dropout, self.training)
        return y


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
            self.lora_A = kaiming_uniform((r, in_features), in_features)
            self.lora_B = jt.zeros((out_features, r), dtype="float32")
            self.weight.stop_grad()


class Embedding(LoRALayer):
    """An embedding with an optional LoRA update (loralib ``Embedding``: A zeros, B normal)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: Optional[bool] = None):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = jt.array(np.random.normal(0, 1, (num_embeddings, embedding_dim)).astype("float32"))
        self._init_lora(r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self.lora_A = jt.zeros((r, num_embeddings), dtype="float32")
            self.lora_B = jt.array(np.random.normal(0, 1, (embedding_dim, r)).astype("float32"))
            self.weight.stop_grad()

    def delta_weight(self):
        return jt.matmul(self.lora_B, self.lora_A).transpose() * self.scaling  # [num, dim]

    def execute(self, ids):
        self._sync_mode()
        y = self.weight[ids]
        if self.r > 0 and not self.merged:
            after_a = self.lora_A.transpose()[ids]  # [..., r]
            y = y + nn.matmul_transpose(after_a, self.lora_B) * self.scaling
        return y


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
        self._enable = enable_lora
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights, lora_inhibition, lora_inhibition_slope)
        self._groups = sum(enable_lora)
        self._part = out_features // len(enable_lora)
        if r > 0 and self._groups > 0:
            self.lora_A = kaiming_uniform((r * self._groups, in_features), in_features)
            self.lora_B = jt.zeros((self._part * self._groups, r), dtype="float32")
            self.weight.stop_grad()
        else:
            self.r = 0
