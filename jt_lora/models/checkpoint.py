"""Loading GPT-2 weights from the files users have: HF and microsoft/LoRA checkpoints.

Accepted: ``pytorch_model.bin`` (torch zip or legacy layout, read without
torch), ``model.safetensors``, a HF directory (``config.json`` + either), and
microsoft/LoRA training checkpoints (``{'model_state_dict': ...}`` with
``module.transformer.`` / ``transformer.`` prefixes, legacy ``.g/.b/.w``
suffixes and ``lora_A``/``lora_B`` entries). Every problem is reported with
the path and the key: missing and unexpected keys are listed, shape
mismatches name both shapes.
"""
import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..nn.adapters import is_adapter_param
from ..nn.modes import assign_keep_trainable

__all__ = ["read_state_dict", "normalize_gpt2_keys", "load_gpt2_checkpoint", "load_into_model",
           "CheckpointError"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Buffers and the tied head that GPT-2 checkpoints carry but the model derives itself.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_IGNORED_KEYS = ("lm_head.weight", "lm_head.decoder.weight")
# n_head cannot be read off weight shapes; the released sizes fix it.
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the path and key."""


def read_state_dict(path) -> Tuple[Dict[str, np.ndarray], Optional[dict]]:
    """(tensors as numpy, HF config dict or None) from a file or a HF-style directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    hf_config = None
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.exists():
            try:
                hf_config = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
        found = [path / n for n in _WEIGHT_FILES if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f"{path}: no {' or '.join(_WEIGHT_FILES)} in this directory")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    else:
        from .torch_pickle import load_torch_file
        state = load_torch_file(path)
        if isinstance(state, dict) and "model_state_dict" in state:
            state = state["model_state_dict"]
        elif isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return dict(state), hf_config


def normalize_gpt2_keys(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Map every known naming onto the transformer's own (``h.0.attn.c_attn.weight``)."""
    out = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "transformer."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k in _IGNORED_KEYS or k.endswith(_IGNORED_SUFFIXES):
            continue
        if k.endswith(".g") or k.endswith(".w"):
            k = k[:-2] + ".weight"
        elif k.endswith(".b"):
            k = k[:-2] + ".bias"
        out[k] = value
    return out


def _architecture(state, hf_config, path, need_heads: bool = True) -> dict:
    if hf_config is not None:
        act = hf_config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise CheckpointError(f"{path}: activation_function={act!r} is not GPT-2's tanh GELU")
        arch = {k: hf_config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                                          "layer_norm_epsilon") if k in hf_config}
        return arch
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise CheckpointError(f"{path}: no wte.weight/wpe.weight; not a GPT-2 checkpoint "
                              f"(first keys: {list(state)[:5]})")
    vocab, width = state["wte.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("h."))
    arch = dict(vocab_size=vocab, n_positions=state["wpe.weight"].shape[0], n_embd=width, n_layer=layers)
    if not need_heads:
        return arch
    if width not in _HEADS_BY_WIDTH:
        raise CheckpointError(f"{path}: n_embd={width} has no standard head count; pass --n_head "
                              "(from Python: n_head=... or config=GPT2Config(...))")
    return {**arch, "n_head": _HEADS_BY_WIDTH[width]}


def load_into_model(model, state: Dict[str, np.ndarray], strict: bool = True, source: str = "checkpoint"):
    """Copy normalised tensors into ``model.transformer``; adapter tensors may be absent.

    Returns (missing, unexpected) key lists (adapter keys missing from a base checkpoint are fine).
    The model stays in the mode it was in (an eval-mode model comes back merged with the new weights).
    """
    params = dict(model.transformer.named_parameters())
    unexpected = [k for k in state if k not in params]
    missing = [k for k in params if k not in state and not is_adapter_param(k)]
    shape_errors = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(params[k].shape)}"
                    for k in state if k in params and tuple(state[k].shape) != tuple(params[k].shape)]
    if shape_errors:
        raise CheckpointError(f"{source}: shape mismatch:\n  " + "\n  ".join(shape_errors))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source}: missing keys {missing}; unexpected keys {unexpected}")
    merged = not getattr(model, "is_train", True)
    if merged:  # adapters are unmerged while the weights are replaced, then merged into the new ones
        model.train()
    for k, arr in state.items():
        if k in params:
            assign_keep_trainable(params[k], np.ascontiguousarray(arr, dtype=np.float32))
    if merged:
        model.eval()
    return missing, unexpected


def load_gpt2_checkpoint(cls, path, config=None, strict: bool = True, **overrides):
    """Build ``cls`` (a model class with a ``config_class``) with the checkpoint's architecture and load
    its weights. The class is passed in, not imported, so that this module never imports the model."""
    raw, hf_config = read_state_dict(path)
    state = normalize_gpt2_keys(raw)
    arch = _architecture(state, hf_config, path, need_heads=config is None and "n_head" not in overrides)
    # The checkpoint decides the shape: an override may only fill in what it cannot tell (n_head).
    clash = [f"{k}: checkpoint {arch[k]} vs given {overrides[k]}" for k in arch
             if k in overrides and overrides[k] != arch[k]]
    if clash:
        raise CheckpointError(f"{path}: shape given does not match the checkpoint: " + ", ".join(clash))
    if config is None:
        config = cls.config_class(**{**arch, **overrides})
    else:
        config = config.replace(**overrides) if overrides else config
        wrong = {k: (v, getattr(config, k)) for k, v in arch.items() if getattr(config, k) != v}
        if wrong:
            raise CheckpointError(f"{path}: config does not match the checkpoint "
                                  + ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in wrong.items()))
    model = cls(config)
    load_into_model(model, state, strict=strict, source=str(path))
    return model
