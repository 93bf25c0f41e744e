"""The one adapter file format: HF PEFT's directory, with jt_lora's extra fields, and its converters.

A directory holds ``adapter_config.json`` (PEFT's fields; InA adds ``lora_inhibition`` and
``lora_inhibition_slope``) and ``adapter_model.safetensors`` with PEFT's key names
(``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``, ``...ia3_l``), so
``peft.PeftModel.from_pretrained`` on transformers' GPT-2 reads it. Both front-ends write it:
``PeftModel.save_pretrained`` and the loralib-style ``save_adapter`` (the trainer's ``adapter/`` and
checkpoints). jt_lora's extras live in the safetensors metadata, which PEFT ignores silently:

* ``jt_lora_config``: jt_lora's own config (``enable_lora`` / ``enable_ia3``: the parts of a fused
  layer; PEFT's layout cannot say where the parts are);
* ``jt_lora_model``: what the trainer records beside the adapter (the base model's shape, step,
  run id);
* ``jt_lora_writer``: marks files written since InA's slope was recorded.

A grouped LoRA (rank ``r`` on each of ``g`` enabled parts) is written as the plain LoRA PEFT knows:
rank ``g·r``, the same ``A``, a block ``B`` with zero blocks, ``lora_alpha`` ``g·alpha`` (so
``alpha'/(g·r) = alpha/r``; ``sqrt(g)·alpha`` with rsLoRA). A part-masked (IA)³ vector is written
full length with ones on the parts left alone. Both are exact for PEFT.

Converters: ``jt_lora_adapter.{json,safetensors}`` directories (written before this format) read as
the same adapter; InA files without a slope, from jt_lora before the slope was recorded, read with
the 0.1 they were trained with and a warning naming the file.
"""
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..backend import jt
from ..nn.ia3 import ia3_vector
from ..nn.lora import INA_SLOPE, LEGACY_INA_SLOPE, block_b
from ..peft.config import IA3Config, LoraConfig, PeftConfig, config_from_dict
from ..io.atomic import atomic_write_text
from .tensor_files import save_safetensors

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LEGACY_WEIGHTS_NAME", "LEGACY_CONFIG", "LEGACY_WEIGHTS", "PREFIX",
           "META_KEY", "MODEL_KEY", "WRITER_KEY", "SLOPE_FIELD", "AdapterFileError", "AdapterFiles",
           "peft_config_json", "write_adapter_dir", "read_adapter_files", "group_b", "part_vector",
           "config_path", "is_adapter_dir", "layer_file_state", "layer_file_plan", "check_plan"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"          # PEFT before safetensors
LEGACY_CONFIG = "jt_lora_adapter.json"             # jt_lora's own format before this one
LEGACY_WEIGHTS = "jt_lora_adapter.safetensors"
PREFIX = "base_model.model."
META_KEY = "jt_lora_config"
MODEL_KEY = "jt_lora_model"
WRITER_KEY = "jt_lora_writer"
SLOPE_FIELD = "lora_inhibition_slope"


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded; the message names the file and the key."""


class AdapterFiles:
    """What a directory holds, read and checked: ``config`` (jt_lora's view, parts included),
    ``state`` (PEFT layout, keys without ``base_model.model.``), ``model_info`` (base shape, step ...)
    and ``config_file`` (named in errors)."""

    def __init__(self, config: PeftConfig, state: Dict[str, np.ndarray], model_info: dict, config_file: Path):
        self.config, self.state, self.model_info, self.config_file = config, state, model_info, config_file


def config_path(adapter_dir) -> Path:
    """The config file of an adapter directory, in either format (the new one when neither exists)."""
    adapter_dir = Path(adapter_dir)
    legacy = adapter_dir / LEGACY_CONFIG
    return legacy if legacy.exists() and not (adapter_dir / CONFIG_NAME).exists() else adapter_dir / CONFIG_NAME


def is_adapter_dir(path) -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or (path / LEGACY_CONFIG).is_file()


# --- writing ----------------------------------------------------------------------------------------
def peft_config_json(config: PeftConfig, ranks: Dict[str, Tuple[int, int]]) -> dict:
    """adapter_config.json contents stock PEFT reads. ``ranks``: {module key: (r, groups)} of a LoRA
    adapter, so grouped layers are described as PEFT's rank-``g·r`` LoRA (rank/alpha patterns where
    modules differ from the most common)."""
    out = config.to_dict()
    out["inference_mode"] = True
    out.pop("enable_ia3", None)
    if isinstance(config, LoraConfig):
        out.pop("enable_lora")
        if config.lora_inhibition == 0.0:
            out.pop("lora_inhibition")
            out.pop(SLOPE_FIELD)
        pairs = {k: (r * g, config.alpha_for(k) * (math.sqrt(g) if config.use_rslora else g))
                 for k, (r, g) in ranks.items()}
        (r, alpha), _ = Counter(pairs.values()).most_common(1)[0]
        out["r"], out["lora_alpha"] = r, alpha
        out["rank_pattern"] = {re.escape(k): pr for k, (pr, _) in pairs.items() if pr != r}
        out["alpha_pattern"] = {re.escape(k): pa for k, (_, pa) in pairs.items() if pa != alpha}
        out["use_dora"] = False
    return out


def write_adapter_dir(out_dir, config: PeftConfig, ranks: Dict[str, Tuple[int, int]],
                      state: Dict[str, np.ndarray], model_info: Optional[dict] = None) -> Path:
    """Write one adapter: weights first, then the config, each atomically (``state`` in PEFT's layout,
    keys without the prefix)."""
    out_dir = Path(out_dir)
    metadata = {"format": "pt", WRITER_KEY: "1"}
    if getattr(config, "enable_lora", None) is not None or getattr(config, "enable_ia3", None) is not None:
        metadata[META_KEY] = json.dumps(config.to_dict())
    if model_info:
        metadata[MODEL_KEY] = json.dumps(model_info)
    save_safetensors(out_dir / WEIGHTS_NAME, {PREFIX + k: v for k, v in state.items()}, metadata=metadata)
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(peft_config_json(config, ranks), indent=2, sort_keys=True))
    return out_dir


# --- the layout conversions a reader needs (the forward direction is nn's block_b / ia3_vector) -----
def group_b(full: np.ndarray, enable, r: int, key: str) -> np.ndarray:
    """PEFT's block ``B [out, r·g]`` back to the grouped ``[part·g, r]``; the zero blocks must be zero."""
    g, part = sum(enable), full.shape[0] // len(enable)
    blocks, j = [], 0
    for i, enabled in enumerate(enable):
        rows = full[i * part:(i + 1) * part]
        for k in range(g):
            block = rows[:, k * r:(k + 1) * r]
            if enabled and k == j:
                blocks.append(block)
            elif np.any(block != 0):
                raise AdapterFileError(f"{key}: block (part {i}, group {k}) must be zero for enable_lora="
                                       f"{list(enable)} but holds non-zero values")
        j += int(enabled)
    return np.concatenate(blocks, axis=0)


def part_vector(full: np.ndarray, enable, key: str) -> np.ndarray:
    """A full-length (IA)³ vector back to its enabled parts; the other parts must be ones."""
    flat = full.reshape(-1)
    part = flat.shape[0] // len(enable)
    kept = []
    for i, enabled in enumerate(enable):
        block = flat[i * part:(i + 1) * part]
        if enabled:
            kept.append(block)
        elif np.any(block != 1):
            raise AdapterFileError(f"{key}: part {i} must be ones for enable_ia3={list(enable)} but is not")
    return np.concatenate(kept)


# --- one adapter layer <-> the file's tensors (both front-ends) -----------------------------------
def layer_file_state(key: str, layer, name: str) -> Dict[str, np.ndarray]:
    """Adapter ``name`` of one adapter layer (``nn.LoraAdapterLayer`` / ``nn.IA3AdapterLayer``, either
    front-end) as the file's tensors, keys without the prefix: grouped B spread to PEFT's block
    matrix, part-masked (IA)³ vectors to full length in PEFT's ``[out, 1]`` / ``[1, in]``."""
    from ..nn.ia3 import IA3AdapterLayer
    if isinstance(layer, IA3AdapterLayer):
        vec = layer.full_vector(name).numpy()
        return {f"{key}.ia3_l": vec.reshape((1, -1) if layer.is_feedforward else (-1, 1))}
    return {f"{key}.lora_A.weight": layer.lora_pair(name)[0].numpy(),
            f"{key}.lora_B.weight": layer.full_b(name).numpy()}


def layer_file_plan(key: str, layer, name: str) -> dict:
    """{file key: (parameter, converter from the file's layout to the parameter's, shape in the file)}
    for adapter ``name`` of one adapter layer (either front-end): the inverse of ``layer_file_state``."""
    from ..nn.ia3 import IA3AdapterLayer
    if isinstance(layer, IA3AdapterLayer):
        v, enable = layer.ia3_vector_of(name), layer.part_mask(name)
        shape = tuple(v.shape)
        file_shape = (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
        return {f"{key}.ia3_l": (v, lambda arr, k, e=enable, s=shape: (part_vector(arr, e, k) if e else arr).reshape(s),
                                 file_shape)}
    a, b = layer.lora_pair(name)
    enable, r = layer.part_mask(name), layer.adapter_rank(name)
    plan = {f"{key}.lora_A.weight": (a, None, tuple(a.shape))}
    if enable:
        plan[f"{key}.lora_B.weight"] = (b, lambda arr, k, e=enable, r=r: group_b(arr, e, r, k),
                                        (layer.out_features, r * sum(enable)))
    else:
        plan[f"{key}.lora_B.weight"] = (b, None, tuple(b.shape))
    return plan


def check_plan(plan: dict, state: Dict[str, np.ndarray], source) -> Dict[str, np.ndarray]:
    """The file's tensors converted to the parameters' layouts, after checking keys, shapes and zero
    blocks; raises naming ``source`` and the keys. Nothing is assigned here."""
    missing = sorted(set(plan) - set(state))
    unexpected = sorted(set(state) - set(plan))
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(plan[k][2])}"
              for k in sorted(set(plan) & set(state)) if tuple(state[k].shape) != tuple(plan[k][2])]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {missing[:6]}"] if missing else []) + \
                ([f"unexpected keys {unexpected[:6]}"] if unexpected else []) + \
                ([f"shape mismatch: {'; '.join(shapes[:6])}"] if shapes else [])
        raise AdapterFileError(f"{source}: adapter does not fit the model: " + "; ".join(parts))
    return {k: np.ascontiguousarray(conv(state[k], k) if conv else state[k], dtype=np.float32)
            for k, (_, conv, _) in plan.items()}


# --- reading ----------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: invalid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{path}: not UTF-8 ({e})") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path):
    try:
        from safetensors import safe_open
        with safe_open(str(path), "np") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise AdapterFileError(f"{path}: unreadable safetensors file ({e})") from e


def _written_by_old_jt_lora(data: dict, metadata: dict) -> bool:
    """A file jt_lora wrote before it recorded the InA slope: its grouped-layout metadata, or a config
    without ``layers_to_transform``, a field every PEFT release since 0.4 writes and jt_lora never did."""
    if WRITER_KEY in metadata:
        return False
    return META_KEY in metadata or "layers_to_transform" not in data


def _legacy_slope(source: Path) -> float:
    warnings.warn(f"{source}: InA adapter without {SLOPE_FIELD} (written by jt_lora before the slope was "
                  f"recorded): using {LEGACY_INA_SLOPE}, the slope it was trained with (the InA reference uses "
                  f"{INA_SLOPE})")
    return LEGACY_INA_SLOPE


def _ina_slope(data: dict, metadata: dict, source: Path) -> Optional[float]:
    """The slope to read an InA file with when it records none (None: recorded, or not InA)."""
    if SLOPE_FIELD in data or not data.get("lora_inhibition"):
        return None
    return _legacy_slope(source) if _written_by_old_jt_lora(data, metadata) else INA_SLOPE


def read_adapter_files(path) -> AdapterFiles:
    """Read an adapter directory in any format jt_lora knows (PEFT's, legacy ``jt_lora_adapter.*``)."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists() and (path / LEGACY_CONFIG).exists():
        return _read_legacy_native(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} (or {LEGACY_CONFIG}) in {path}")
    data = _read_json(cfg_file)
    metadata = {}
    if (path / WEIGHTS_NAME).exists():
        weights = path / WEIGHTS_NAME
        metadata, state = _read_safetensors(weights)
    elif (path / LEGACY_WEIGHTS_NAME).exists():
        from .torch_pickle import load_torch_file
        weights = path / LEGACY_WEIGHTS_NAME
        state = load_torch_file(weights)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {path}")
    stray = [k for k in state if not k.startswith(PREFIX)]
    if stray:
        raise AdapterFileError(f"{weights}: keys without the '{PREFIX}' prefix PEFT writes: {stray[:4]}")
    state = {k[len(PREFIX):]: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    slope = _ina_slope(data, metadata, cfg_file)
    try:
        config = config_from_dict(data if slope is None else {**data, SLOPE_FIELD: slope})
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{cfg_file}: {e}") from e
    info = {}
    try:
        if META_KEY in metadata:
            native = json.loads(metadata[META_KEY])
            if slope is not None and SLOPE_FIELD not in native:
                native[SLOPE_FIELD] = slope
            config = config_from_dict(native)
        if MODEL_KEY in metadata:
            info = json.loads(metadata[MODEL_KEY])
    except (TypeError, ValueError, AttributeError) as e:
        raise AdapterFileError(f"{weights}: bad jt_lora metadata ({e})") from e
    return AdapterFiles(config, state, info, cfg_file)


def _read_legacy_native(path: Path) -> AdapterFiles:
    """Converter: a ``jt_lora_adapter.*`` directory (native layer names, grouped B, k/v-only (IA)³ vector)
    as the same adapter in PEFT's layout."""
    cfg_file, weights = path / LEGACY_CONFIG, path / LEGACY_WEIGHTS
    meta = _read_json(cfg_file)
    if not weights.exists():
        raise FileNotFoundError(f"no {LEGACY_WEIGHTS} in {path}")
    _, raw = _read_safetensors(weights)
    kind = meta.get("adapter")
    try:
        if kind in ("lora", "ina"):
            slope = meta.get(SLOPE_FIELD)
            if kind == "ina" and slope is None:
                slope = _legacy_slope(cfg_file)
            config = LoraConfig(r=int(meta["lora_attn_dim"]), lora_alpha=meta["lora_attn_alpha"],
                                lora_dropout=meta.get("lora_dropout", 0.0),
                                lora_inhibition=meta.get("lora_inhibition", 0.0) if kind == "ina" else 0.0,
                                lora_inhibition_slope=INA_SLOPE if slope is None else slope,
                                target_modules=("c_attn",), enable_lora=tuple(meta["lora_enable"]),
                                fan_in_fan_out=True)
        elif kind == "ia3":
            targets = ("c_attn",) * any(meta["ia3_enable"]) + ("mlp.c_proj",) * bool(meta["ia3_feedforward"])
            config = IA3Config(target_modules=targets, feedforward_modules=("mlp.c_proj",) * bool(
                meta["ia3_feedforward"]), enable_ia3=tuple(meta["ia3_enable"]), fan_in_fan_out=True)
        else:
            raise ValueError(f"adapter {kind!r} is not lora, ina or ia3")
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{cfg_file}: not a jt_lora adapter config ({type(e).__name__}: {e})") from e
    state = {}
    for name, value in raw.items():
        key, _, tensor = name.rpartition(".")
        value = np.asarray(value, dtype=np.float32)
        if tensor == "lora_A":
            state[f"{key}.lora_A.weight"] = value
        elif tensor == "lora_B":
            full = block_b(jt.array(value), config.enable_lora, config.r)
            state[f"{key}.lora_B.weight"] = full.numpy()
        elif tensor == "ia3_l" and key.endswith("mlp.c_proj"):
            state[f"{key}.ia3_l"] = value.reshape(1, -1)
        elif tensor == "ia3_l":
            part = value.shape[0] // sum(config.enable_ia3)
            state[f"{key}.ia3_l"] = ia3_vector(jt.array(value), config.enable_ia3, part).numpy().reshape(-1, 1)
        else:
            raise AdapterFileError(f"{weights}: unexpected key {name!r} (not lora_A, lora_B or ia3_l)")
    info = {k: meta[k] for k in meta if k not in _LEGACY_ADAPTER_FIELDS}
    return AdapterFiles(config, state, info, cfg_file)


_LEGACY_ADAPTER_FIELDS = ("adapter", "lora_attn_dim", "lora_attn_alpha", "lora_dropout", "lora_inhibition",
                          SLOPE_FIELD, "lora_enable", "ia3_enable", "ia3_feedforward")
