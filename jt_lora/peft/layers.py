"""Multi-adapter layers: LoRA / InA and (IA)³ wrapped around a frozen base projection.

A tuner layer replaces a targeted ``Linear`` in place and keeps it as
``base_layer``; each named adapter lives in per-adapter containers named as in
HF PEFT, so Jittor's parameter names are PEFT's state-dict names:
``c_attn.base_layer.weight``, ``c_attn.lora_A.default.weight``,
``c_attn.lora_B.default.weight``, ``mlp.c_proj.ia3_l.default``. The ``lora_``
/ ``ia3_`` prefixes stay in every adapter tensor's name.

Every layer has the same parts: ``update_layer`` (add an adapter),
``merged_state`` (the weights with adapters folded in, computed without
touching the layer, so a caller can check a whole model before committing),
``apply_merge`` / ``unmerge`` and ``execute``. Merging keeps a copy of the
base weight and unmerging restores it, so unmerge is exact (dividing by an
(IA)³ vector or subtracting a LoRA update is not).
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..backend import jt, nn
from ..nn.ia3 import ia3_scaled, ia3_vector
from ..nn.lora import INA_SLOPE, ExactMerge, InhibitionGate, block_b, kaiming_uniform, lora_delta, lora_update, \
    lora_variant
from ..nn.modes import AdapterModule
from ..nn.modes import assign_keep_trainable as assign

__all__ = ["ModuleDict", "ParameterDict", "LoraWeight", "TunerLayer", "LoraLayer", "IA3Layer",
           "ModulesToSaveWrapper", "linear_info", "assign", "clone_module"]


class ModuleDict(nn.Sequential):
    """Named sub-modules that Jittor's ``named_parameters()`` sees (a plain dict would hide them)."""

    def __getitem__(self, name):
        return self.layers[name]

    def __setitem__(self, name, module):
        self.layers[name] = module

    def __delitem__(self, name):
        del self.layers[name]

    def __contains__(self, name):
        return name in self.layers


class ParameterDict(nn.ParameterList):
    """Named tensors that Jittor's ``named_parameters()`` sees: ``ia3_l.default``."""

    def __getitem__(self, name):
        return self.params[name]

    def __delitem__(self, name):
        del self.params[name]

    def __contains__(self, name):
        return name in self.params


class LoraWeight(jt.Module):
    """One factor of a LoRA pair, holding ``weight`` as PEFT's bias-free ``nn.Linear`` does."""

    def __init__(self, weight):
        self.weight = weight

    def execute(self, x):
        return nn.matmul_transpose(x, self.weight)


def linear_info(module) -> Optional[Tuple[int, int, bool]]:
    """(in_features, out_features, fan_in_fan_out) of a plain dense layer, or None.

    jt_lora ``Linear`` layers with r == 0 and Jittor's ``nn.Linear`` qualify; jt_lora layers
    that already carry their own adapter do not (wrapping them would stack two adapters).
    """
    from ..nn.lora import Linear
    if isinstance(module, Linear) and module.r == 0:
        return module.in_features, module.out_features, bool(module.fan_in_fan_out)
    if type(module) is nn.Linear:
        return module.in_features, module.out_features, False
    return None


def clone_module(module):
    """A deep copy with fresh tensors (frozen state kept); Jittor modules carry no deepcopy of their own."""
    new = copy.copy(module)
    for key, value in list(module.__dict__.items()):
        if isinstance(value, jt.Var):
            fresh = jt.array(value.numpy())
            new.__dict__[key] = fresh.stop_grad() if value.is_stop_grad() else fresh
        elif isinstance(value, jt.Module):
            new.__dict__[key] = clone_module(value)
        elif isinstance(value, dict) and any(isinstance(v, (jt.Var, jt.Module)) for v in value.values()):
            new.__dict__[key] = type(value)((k, clone_module(v) if isinstance(v, jt.Module) else
                                             jt.array(v.numpy())) for k, v in value.items())
    return new


class TunerLayer(ExactMerge, AdapterModule):
    """What every tuner layer shares: the base layer, active/merged bookkeeping, exact unmerge
    (``ExactMerge``, the same bookkeeping as the loralib-style layers, on ``base_layer``)."""

    adapter_layer_names: Tuple[str, ...] = ()

    def __init__(self, base_layer):
        info = linear_info(base_layer)
        if info is None:
            raise TypeError(f"cannot adapt {type(base_layer).__name__}: only plain dense layers (jt_lora Linear "
                            f"with r=0, jittor nn.Linear) are supported")
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = info
        self.active_adapters: List[str] = []
        self.merged_adapters: List[str] = []
        self.disabled = False

    def _dense(self):
        return self.base_layer

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> List[str]:
        return list(getattr(self, self.adapter_layer_names[0]).keys())

    def __contains__(self, name) -> bool:
        return name in getattr(self, self.adapter_layer_names[0])

    def adapter_params(self, name) -> list:
        out = []
        for container in self.adapter_layer_names:
            item = getattr(self, container)[name]
            out.extend([item] if isinstance(item, jt.Var) else item.parameters())
        return out

    def set_adapter(self, names: Sequence[str]):
        self.active_adapters = [n for n in names if n in self]

    def delete_adapter(self, name):
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge before deleting it")
        for container in self.adapter_layer_names:
            del getattr(self, container)[name]
        self._forget(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _forget(self, name):
        """Drop the per-adapter settings a subclass keeps."""

    # merging, in two phases so that a whole model can be checked before anything changes
    def merged_state(self, names: Sequence[str]):
        """(weight, bias) with ``names`` folded into the current weights; the layer is not touched."""
        raise NotImplementedError

    def apply_merge(self, names: Sequence[str], weight, bias):
        self._save_unmerged()
        self._assign_dense(weight, bias)
        self.merged_adapters.extend(names)

    def unmerge(self):
        """Restore the weights saved at the first merge: bit-identical to before merging."""
        self._restore_unmerged()
        self.merged_adapters = []

    def _pending(self) -> List[str]:
        """Active adapters that forward must still apply (not disabled, not merged)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]


class LoraLayer(TunerLayer):
    """LoRA / InA adapters on one dense layer: ``y = W·x + Σ_active scaling·B·gate(A·dropout(x))``.

    A plain adapter has ``lora_A [r, in]`` and ``lora_B [out, r]`` (PEFT's layout). A grouped one
    (``enable_lora`` on a fused layer) has loralib ``MergedLinear``'s ``lora_A [r·g, in]`` and
    ``lora_B [part·g, r]``: one rank-``r`` pair per enabled part, the other parts untouched.
    ``full_b`` spreads the grouped B into ``[out, r·g]`` with zero blocks; the forward and
    ``get_delta_weight`` both go through it, so they cannot disagree. The forward keeps the
    factored form (dropout and the InA gate act on ``A·x``; it is also cheaper than a full delta).
    """

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()
        self.r: Dict[str, int] = {}
        self.lora_alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}
        self.lora_dropout: Dict[str, float] = {}
        self.enable_lora: Dict[str, Optional[Tuple[bool, ...]]] = {}
        self.gate: Dict[str, InhibitionGate] = {}

    def update_layer(self, name: str, r: int, lora_alpha: float, scaling: float, lora_dropout: float = 0.0,
                     lora_inhibition: float = 0.0, enable_lora: Optional[Sequence[bool]] = None,
                     init_lora_weights=True, lora_inhibition_slope: float = INA_SLOPE):
        """Add adapter ``name``; ``enable_lora`` applies only when ``out == len(enable_lora)·in``."""
        n_in, n_out = self.in_features, self.out_features
        enable = tuple(enable_lora) if enable_lora is not None and n_out == len(enable_lora) * n_in else None
        g = sum(enable) if enable else 1
        part = n_out // len(enable) if enable else n_out
        if init_lora_weights == "gaussian":
            a = jt.array(np.random.normal(0, 1.0 / r, (r * g, n_in)).astype("float32"))
        else:
            a = kaiming_uniform((r * g, n_in), n_in)
        b = kaiming_uniform((part * g, r), r) if init_lora_weights is False else jt.zeros((part * g, r), "float32")
        self.lora_A[name] = LoraWeight(a)
        self.lora_B[name] = LoraWeight(b)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, lora_alpha, scaling
        self.lora_dropout[name] = float(lora_dropout)
        self.enable_lora[name] = enable
        self.gate[name] = lora_variant(lora_inhibition, lora_inhibition_slope)

    def _forget(self, name):
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.enable_lora, self.gate):
            d.pop(name, None)

    def groups(self, name) -> int:
        enable = self.enable_lora[name]
        return sum(enable) if enable else 1

    def full_b(self, name):
        """``lora_B`` as ``[out, r·g]`` (grouped adapters spread into zero blocks)."""
        return block_b(self.lora_B[name].weight, self.enable_lora[name], self.r[name])

    def get_delta_weight(self, name):
        """``scaling · B·A`` in the base weight's layout (``[in, out]`` when fan_in_fan_out)."""
        return lora_delta(self.lora_A[name].weight, self.full_b(name), self.scaling[name], self.fan_in_fan_out,
                          self.gate[name], f"adapter {name!r}")

    def merged_state(self, names):
        w = self.base_layer.weight
        for name in names:
            w = w + self.get_delta_weight(name)
        return w, None

    def lora_forward(self, name, x):
        return lora_update(x, self.lora_A[name].weight, self.full_b(name), self.scaling[name], self.gate[name],
                           self.groups(name), self.lora_dropout[name], self.training)

    def execute(self, x):
        y = self.base_layer(x)
        for name in self._pending():
            y = y + self.lora_forward(name, x)
        return y


class IA3Layer(TunerLayer):
    """(IA)³ vectors on one dense layer, in PEFT's shapes: ``ia3_l [out, 1]`` rescales the output
    (and the bias), or ``[1, in]`` on a feed-forward layer rescales the input. Several active
    adapters multiply, as in PEFT. With ``enable_ia3`` (jt_lora's per-part mask, as ``enable_lora``)
    a fused output keeps only the enabled parts' entries (``[part·g, 1]``); the others are ones."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer, is_feedforward: bool):
        super().__init__(base_layer)
        self.is_feedforward = bool(is_feedforward)
        self.ia3_l = ParameterDict()
        self.enable_ia3: Dict[str, Optional[Tuple[bool, ...]]] = {}

    def update_layer(self, name: str, init_ia3_weights: bool = True, enable_ia3: Optional[Sequence[bool]] = None):
        """Add adapter ``name``; ``enable_ia3`` applies only to an output-side vector of a fused layer
        (``out == len(enable_ia3)·in``), as ``enable_lora`` does."""
        n_in, n_out = self.in_features, self.out_features
        enable = tuple(enable_ia3) if enable_ia3 is not None and not self.is_feedforward \
            and n_out == len(enable_ia3) * n_in and not all(enable_ia3) else None
        size = n_out // len(enable) * sum(enable) if enable else n_out
        shape = (1, n_in) if self.is_feedforward else (size, 1)
        value = np.ones(shape) if init_ia3_weights else np.random.normal(1.0, 0.1, shape)
        self.ia3_l[name] = jt.array(value.astype("float32"))
        self.enable_ia3[name] = enable

    def _forget(self, name):
        self.enable_ia3.pop(name, None)

    def full_vector(self, name):
        """Adapter ``name``'s vector over the whole axis (``[in]`` or ``[out]``; ones on parts left alone)."""
        enable = self.enable_ia3.get(name)
        return ia3_vector(self.ia3_l[name], enable, self.out_features // len(enable) if enable else 0)

    def get_scaling_vector(self, names: Sequence[str]):
        """Product of the named vectors over the whole axis; the one function that defines what the
        adapters do, used by forward and merge."""
        vec = None
        for name in names:
            v = self.full_vector(name)
            vec = v if vec is None else vec * v
        return vec

    def merged_state(self, names):
        base = self.base_layer
        return ia3_scaled(base.weight, base.bias, self.get_scaling_vector(names), self.fan_in_fan_out,
                          self.is_feedforward)

    def execute(self, x):
        pending = self._pending()
        if not pending:
            return self.base_layer(x)
        vec = self.get_scaling_vector(pending)
        if self.is_feedforward:
            return self.base_layer(x * vec)
        return self.base_layer(x) * vec


class ModulesToSaveWrapper(AdapterModule):
    """A module trained in full: one copy per adapter, the original kept for the base model."""

    def __init__(self, module):
        self.original_module = module
        self.modules_to_save = ModuleDict()
        self.active_adapters: List[str] = []
        self.disabled = False

    def update(self, name: str):
        self.modules_to_save[name] = clone_module(self.original_module)

    def __contains__(self, name) -> bool:
        return name in self.modules_to_save

    def adapter_names(self) -> List[str]:
        return list(self.modules_to_save.keys())

    def adapter_params(self, name) -> list:
        return self.modules_to_save[name].parameters()

    def set_adapter(self, names: Sequence[str]):
        self.active_adapters = [n for n in names if n in self]

    def delete_adapter(self, name):
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def active_module(self):
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def execute(self, *args, **kw):
        return self.active_module()(*args, **kw)
