"""Selecting adapter parameters by name: freezing and adapter-only state dicts.

Names are the contract: every adapter tensor's own name starts with ``lora_``
or ``ia3_``, so freezing, saving and optimiser set-up select by prefix.
"""
from typing import Dict

from ..backend import jt

__all__ = ["ADAPTER_PREFIXES", "is_adapter_param", "mark_only_adapter_as_trainable",
           "adapter_state_dict", "trainable_parameters", "count_parameters"]

ADAPTER_PREFIXES = ("lora_", "ia3_")
_BIAS_MODES = ("none", "all", "lora_only")


def is_adapter_param(name: str) -> bool:
    """``...c_attn.lora_A`` (native) and ``...c_attn.lora_A.default.weight`` (PEFT-style) alike."""
    return any(part.startswith(ADAPTER_PREFIXES) for part in name.split("."))


def _owners_with_adapters(names):
    return {n.rsplit(".", 1)[0] for n in names if is_adapter_param(n)}


def _bias_selected(name: str, bias: str, owners) -> bool:
    if not name.endswith("bias"):
        return False
    if bias == "all":
        return True
    if bias == "lora_only":
        return name.rsplit(".", 1)[0] in owners
    return False


def mark_only_adapter_as_trainable(model: jt.Module, bias: str = "none") -> None:
    """Freeze everything but adapter tensors (and biases per ``bias``: none, all, lora_only)."""
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
    named = list(model.named_parameters())
    owners = _owners_with_adapters(n for n, _ in named)
    for name, p in named:
        if is_adapter_param(name) or _bias_selected(name, bias, owners):
            p.start_grad()
        else:
            p.stop_grad()


def adapter_state_dict(model: jt.Module, bias: str = "none") -> Dict[str, "jt.Var"]:
    """Only what fine-tuning changed: adapter tensors (plus biases per ``bias``)."""
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
    state = model.state_dict()
    owners = _owners_with_adapters(state)
    return {k: v for k, v in state.items() if is_adapter_param(k) or _bias_selected(k, bias, owners)}


def trainable_parameters(model: jt.Module):
    return [p for p in model.parameters() if not p.is_stop_grad()]


def count_parameters(model: jt.Module):
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        n = int(p.numel())
        total += n
        trainable += 0 if p.is_stop_grad() else n
    return trainable, total
