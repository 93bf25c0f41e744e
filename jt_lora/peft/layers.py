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
from ..nn.lora import INA_SLOPE, InhibitionGate, kaiming_uniform
from ..nn.modes import AdapterModule

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


def assign(var, value):
    """Overwrite a tensor's value in place, keeping whether it is frozen."""
    frozen = var.is_stop_grad()
    var.update(value.detach() if isinstance(value, jt.Var) else jt.array(value))
    if frozen:
        var.stop_grad()


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


class TunerLayer(AdapterModule):
    """What every tuner layer shares: the base layer, active/merged bookkeeping, exact unmerge."""

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
        self._backup = None  # (weight, bias) as numpy before the first merge

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
        base = self.base_layer
        if self._backup is None:
            self._backup = (base.weight.numpy().copy(), None if base.bias is None else base.bias.numpy().copy())
        assign(base.weight, weight)
        if bias is not None and base.bias is not None:
            assign(base.bias, bias)
        self.merged_adapters.extend(names)

    def unmerge(self):
        """Restore the weights saved at the first merge: bit-identical to before merging."""
        if self._backup is None:
            return
        weight, bias = self._backup
        assign(self.base_layer.weight, weight)
        if bias is not None:
            assign(self.base_layer.bias, bias)
        self._backup = None
        self.merged_adapters = []

    def _pending(self) -> List[str]:
        """Active adapters that forward must still apply (not disabled, not merged)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]


def _expand_groups(b, enable: Sequence[bool], r: int):
    """Grouped ``B [part·g, r]`` as the full ``[part·len(enable), r·g]``: block-diagonal over enabled parts."""
    g = sum(enable)
    part = b.shape[0] // g
    rows, j = [], 0
    for enabled in enable:
        cols = [b[j * part:(j + 1) * part] if enabled and k == j else jt.zeros((part, r), dtype=b.dtype)
                for k in range(g)]
        rows.append(jt.concat(cols, dim=1) if g > 1 else cols[0])
        j += int(enabled)
    return jt.concat(rows, dim=0)


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
        self.gate[name] = InhibitionGate(lora_inhibition, lora_inhibition_slope)

    def _forget(self, name):
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.enable_lora, self.gate):
            d.pop(name, None)

    def groups(self, name) -> int:
        enable = self.enable_lora[name]
        return sum(enable) if enable else 1

    def full_b(self, name):
        """``lora_B`` as ``[out, r·g]`` (grouped adapters spread into zero blocks)."""
        b = self.lora_B[name].weight
        enable = self.enable_lora[name]
        return _expand_groups(b, enable, self.r[name]) if enable else b

    def get_delta_weight(self, name):
        """``scaling · B·A`` in the base weight's layout (``[in, out]`` when fan_in_fan_out)."""
        if self.gate[name].inhibition > 0.0:
            raise ValueError(f"adapter {name!r} is InA (lora_inhibition={self.gate[name].inhibition}): its update is "
                             "non-linear in x, so it has no weight delta and cannot be merged")
        d = jt.matmul(self.full_b(name), self.lora_A[name].weight) * self.scaling[name]  # [out, in]
        return d.transpose() if self.fan_in_fan_out else d

    def merged_state(self, names):
        w = self.base_layer.weight
        for name in names:
            w = w + self.get_delta_weight(name)
        return w, None

    def lora_forward(self, name, x):
        p = self.lora_dropout[name]
        if p > 0 and self.training:
            x = nn.dropout(x, p, is_train=True)
        h = nn.matmul_transpose(x, self.lora_A[name].weight)  # [..., r·g]
        h = self.gate[name](h, self.groups(name))
        return nn.matmul_transpose(h, self.full_b(name)) * self.scaling[name]  # [..., out]

    def execute(self, x):
        y = self.base_layer(x)
        for name in self._pending():
            y = y + self.lora_forward(name, x)
        return y


class IA3Layer(TunerLayer):
    """(IA)³ vectors on one dense layer, in PEFT's shapes: ``ia3_l [out, 1]`` rescales the output
    (and the bias), or ``[1, in]`` on a feed-forward layer rescales the input. Several active
    adapters multiply, as in PEFT."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer, is_feedforward: bool):
        super().__init__(base_layer)
        self.is_feedforward = bool(is_feedforward)
        self.ia3_l = ParameterDict()

    def update_layer(self, name: str, init_ia3_weights: bool = True):
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        value = np.ones(shape) if init_ia3_weights else np.random.normal(1.0, 0.1, shape)
        self.ia3_l[name] = jt.array(value.astype("float32"))

    def get_scaling_vector(self, names: Sequence[str]):
        """Product of the named vectors, flattened to ``[in]`` or ``[out]``; the one function that
        defines what the adapters do, used by forward and merge."""
        vec = None
        for name in names:
            v = self.ia3_l[name].reshape(-1)
            vec = v if vec is None else vec * v
        return vec

    def merged_state(self, names):
        vec = self.get_scaling_vector(names)
        out_axis = 1 if self.fan_in_fan_out else 0
        axis = 1 - out_axis if self.is_feedforward else out_axis
        shape = [1, 1]
        shape[axis] = -1
        base = self.base_layer
        weight = base.weight * vec.reshape(shape)
        bias = base.bias * vec if base.bias is not None and not self.is_feedforward else None
        return weight, bias

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
