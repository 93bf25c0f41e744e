"""Writing models and adapters to disk, atomically, in formats other tools read.

``save_pretrained`` writes a HF-style GPT-2 directory (``config.json`` +
``model.safetensors`` with ``transformer.*`` names, Conv1D layout), which
transformers and ``GPT2LMModel.from_pretrained`` both load. ``save_adapter`` /
``load_adapter`` keep only the adapter tensors plus the resolved adapter
config, so a fine-tuning run stores kilobytes, not the base model. The config
records InA's leaky-ReLU slope (``lora_inhibition_slope``); InA files written
before it was recorded were trained with slope 0.1 and are read so, with a
warning that names the file.
"""
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict

import numpy as np

from ..nn.adapters import adapter_state_dict, is_adapter_param

__all__ = ["atomic_write_bytes", "atomic_write_text", "save_safetensors", "save_pretrained",
           "save_adapter", "load_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FIELDS"]

ADAPTER_CONFIG = "jt_lora_adapter.json"
ADAPTER_WEIGHTS = "jt_lora_adapter.safetensors"
ADAPTER_FIELDS = ("adapter", "lora_attn_dim", "lora_attn_alpha", "lora_dropout", "lora_inhibition",
                  "lora_inhibition_slope", "lora_enable", "ia3_enable", "ia3_feedforward")
SLOPE_FIELD = "lora_inhibition_slope"


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes):
    """Write ``data`` to ``path`` via a temp file + rename: readers never see half a file."""
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def save_safetensors(path, tensors: Dict[str, np.ndarray], metadata=None):
    from safetensors.numpy import save
    arrays = {k: np.ascontiguousarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def _hf_config(cfg) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "initializer_range": cfg.initializer_range,
        "embd_pdrop": cfg.embd_pdrop, "attn_pdrop": cfg.attn_pdrop, "resid_pdrop": cfg.resid_pdrop,
        "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
        "eos_token_id": 50256 if cfg.vocab_size > 50256 else None, "tie_word_embeddings": True,
    }


def save_pretrained(model, out_dir, include_adapters: bool = False):
    """Base weights as a HF GPT-2 directory. Adapters are left out unless asked (merged or not,
    HF has no place for them); use ``save_adapter`` for those."""
    out_dir = Path(out_dir)
    model.train()  # unmerged: the base weights exactly as loaded/trained
    state = {}
    for name, p in model.transformer.named_parameters():
        if is_adapter_param(name) and not include_adapters:
            continue
        state["transformer." + name] = p.numpy()
    save_safetensors(out_dir / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(_hf_config(model.config), indent=2))


def save_adapter(model, out_dir, extra: dict = None):
    """Adapter tensors + the adapter part of the config (what ``load_adapter`` needs)."""
    out_dir = Path(out_dir)
    cfg = model.config.to_dict()
    meta = {k: cfg[k] for k in ADAPTER_FIELDS}
    meta["base"] = {k: cfg[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}
    if extra:
        meta.update(extra)
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("the model has no adapter tensors to save (adapter='none'?)")
    save_safetensors(out_dir / ADAPTER_WEIGHTS, state)
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(meta, indent=2))


def read_adapter_config(adapter_dir) -> dict:
    """The adapter config ``save_adapter`` wrote; an InA file without the slope gets the legacy 0.1."""
    from ..nn.lora import LEGACY_INA_SLOPE
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("adapter") == "ina" and SLOPE_FIELD not in meta:
        warnings.warn(f"{path}: no {SLOPE_FIELD} recorded (written before jt_lora recorded it); using "
                      f"{LEGACY_INA_SLOPE}, the slope such files were trained with (the InA reference uses 0.01)")
        meta[SLOPE_FIELD] = LEGACY_INA_SLOPE
    return meta


def load_adapter(model, adapter_dir):
    """Load adapter tensors saved by ``save_adapter`` into a model built with the same adapter.

    Everything is checked before anything is copied, so a bad file leaves the model unchanged.
    """
    from safetensors.numpy import load_file
    meta = read_adapter_config(adapter_dir)
    cfg = model.config.to_dict()
    skip = {"lora_dropout"} | (set() if meta.get("adapter") == "ina" else {SLOPE_FIELD})  # no effect on the numbers
    wrong = [f"{k}: adapter {meta[k]!r} vs model {cfg[k]!r}" for k in ADAPTER_FIELDS
             if k in meta and k not in skip and _norm(meta[k]) != _norm(cfg[k])]
    if wrong:
        raise ValueError(f"{adapter_dir}: adapter does not fit the model: " + "; ".join(wrong))
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: unreadable adapter weights ({e})") from e
    params = dict(model.named_parameters())
    expected = set(adapter_state_dict(model))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(params[k].shape)}"
              for k in state if k in params and tuple(state[k].shape) != tuple(params[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: missing {missing}; unexpected {unexpected}; shape mismatch {shapes}")
    model.train()
    from ..nn.modes import assign_keep_trainable
    for k, arr in state.items():
        assign_keep_trainable(params[k], arr.astype(np.float32))
    return meta


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
