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
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..backend import jt, nn
from ..nn.ia3 import IA3AdapterLayer
from ..nn.lora import INA_SLOPE, LoraAdapterLayer, kaiming_uniform, lora_variant
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


class TunerLayer:
    """The PEFT-style front-end part every tuner layer shares: the wrapped ``base_layer`` (whose
    parameters are ``<key>.base_layer.weight``) and the per-adapter containers. The math, activation
    and exact merge/unmerge come from the adapter layer classes in ``jt_lora.nn``."""

    adapter_layer_names: Tuple[str, ...] = ()

    def _init_base(self, base_layer):
        info = linear_info(base_layer)
        if info is None:
            raise TypeError(f"cannot adapt {type(base_layer).__name__}: only plain dense layers (jt_lora Linear "
                            f"with r=0, jittor nn.Linear) are supported")
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = info

    def _dense(self):
        return self.base_layer

    def base_forward(self, x):
        return self.base_layer(x)

    def adapter_params(self, name) -> list:
        out = []
        for container in self.adapter_layer_names:
            item = getattr(self, container)[name]
            out.extend([item] if isinstance(item, jt.Var) else item.parameters())
        return out


class LoraLayer(TunerLayer, LoraAdapterLayer):
    """The PEFT-style LoRA front-end: ``y = W·x + Σ_active scaling·B·gate(A·dropout(x))`` with each
    named adapter's factors in ``lora_A.<name>.weight`` / ``lora_B.<name>.weight`` and its settings
    as dicts by name (``layer.r["default"]``). A plain adapter has PEFT's ``lora_A [r, in]`` and
    ``lora_B [out, r]``; a grouped one (``enable_lora`` on a fused layer) loralib ``MergedLinear``'s
    ``[r·g, in]`` / ``[part·g, r]``. Everything else is ``LoraAdapterLayer``'s.
    """

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer):
        self._init_base(base_layer)
        self._init_lora_settings()
        self.active_adapters = []  # PEFT activates adapters through the tuner, not on adding
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()

    # per-adapter settings, by name (the dicts themselves: a change is seen by the layer)
    r = property(lambda self: self._r)
    lora_alpha = property(lambda self: self._alpha)
    scaling = property(lambda self: self._scaling)
    lora_dropout = property(lambda self: self._dropout)
    enable_lora = property(lambda self: self._enable)
    gate = property(lambda self: self._gate)

    def lora_pair(self, name: str):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _store_lora(self, name: str, a, b):
        self.lora_A[name] = LoraWeight(a)
        self.lora_B[name] = LoraWeight(b)

    def _drop_lora(self, name: str):
        del self.lora_A[name]
        del self.lora_B[name]

    def update_layer(self, name: str, r: int, lora_alpha: float, scaling: float, lora_dropout: float = 0.0,
                     lora_inhibition: float = 0.0, enable_lora: Optional[Sequence[bool]] = None,
                     init_lora_weights=True, lora_inhibition_slope: float = INA_SLOPE):
        """Add adapter ``name`` (inactive until the tuner activates it) with PEFT's initialisations;
        ``enable_lora`` applies only when ``out == len(enable_lora)·in``."""
        n_in, n_out = self.in_features, self.out_features
        enable = tuple(enable_lora) if enable_lora is not None and n_out == len(enable_lora) * n_in else None
        g = sum(enable) if enable else 1
        part = n_out // len(enable) if enable else n_out
        if init_lora_weights == "gaussian":
            a = jt.array(np.random.normal(0, 1.0 / r, (r * g, n_in)).astype("float32"))
        else:
            a = kaiming_uniform((r * g, n_in), n_in)
        b = kaiming_uniform((part * g, r), r) if init_lora_weights is False else jt.zeros((part * g, r), "float32")
        active = list(self.active_adapters)
        self.add_lora(name, a, b, r, lora_alpha, scaling, lora_dropout, enable,
                      lora_variant(lora_inhibition, lora_inhibition_slope))
        self.active_adapters = active


class IA3Layer(TunerLayer, IA3AdapterLayer):
    """The PEFT-style (IA)³ front-end: each named adapter's vector in ``ia3_l.<name>``, PEFT's shapes
    ``[out, 1]`` (output side) or ``[1, in]`` (feed-forward: the input). With ``enable_ia3`` (jt_lora's
    per-part mask, as ``enable_lora``) a fused output keeps only the enabled parts' entries
    (``[part·g, 1]``). Everything else is ``IA3AdapterLayer``'s."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer, is_feedforward: bool):
        self._init_base(base_layer)
        self._init_ia3_settings(is_feedforward)
        self.active_adapters = []
        self.ia3_l = ParameterDict()

    enable_ia3 = property(lambda self: self._ia3_enable)

    def ia3_vector_of(self, name: str):
        return self.ia3_l[name]

    def _store_ia3(self, name: str, value):
        self.ia3_l[name] = value

    def _drop_ia3(self, name: str):
        del self.ia3_l[name]

    def update_layer(self, name: str, init_ia3_weights: bool = True, enable_ia3: Optional[Sequence[bool]] = None):
        """Add adapter ``name`` (inactive until the tuner activates it); ``enable_ia3`` applies only to an
        output-side vector of a fused layer (``out == len(enable_ia3)·in``), as ``enable_lora`` does."""
        n_in, n_out = self.in_features, self.out_features
        enable = tuple(enable_ia3) if enable_ia3 is not None and not self.is_feedforward \
            and n_out == len(enable_ia3) * n_in and not all(enable_ia3) else None
        size = n_out // len(enable) * sum(enable) if enable else n_out
        shape = (1, n_in) if self.is_feedforward else (size, 1)
        value = np.ones(shape) if init_ia3_weights else np.random.normal(1.0, 0.1, shape)
        active = list(self.active_adapters)
        self.add_ia3(name, jt.array(value.astype("float32")), enable)
        self.active_adapters = active


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
