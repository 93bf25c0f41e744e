"""Adapter files in HF PEFT's format, microsoft/LoRA checkpoints, and native jt_lora adapters.

PEFT's directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
whose keys are the model's parameter names with the adapter name dropped:
``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``, ``...ia3_l``.
jt_lora's parameter names are PEFT's, so the mapping is only that dropping.

A grouped LoRA (``enable_lora``, loralib's ``MergedLinear``: rank ``r`` on each
of ``g`` enabled parts of ``c_attn``) is written as the plain LoRA PEFT knows:
rank ``g·r``, the same ``A`` and a block ``B`` with zero blocks, and
``lora_alpha`` ``g·alpha`` so that PEFT's ``alpha'/(g·r)`` equals ``alpha/r``
(``sqrt(g)·alpha`` with rsLoRA). The grouped layout itself is kept in the
safetensors metadata (``jt_lora_config``), which PEFT ignores, so jt_lora
reads the file back with the same structure.

InA adds ``lora_inhibition`` (the InA reference's field) and
``lora_inhibition_slope`` to adapter_config.json. Stock PEFT drops them with a
warning and computes a plain LoRA. The InA reference code reads an ungrouped
InA adapter exactly (its gate: max over the module's whole rank, slope 0.01);
a grouped one it would misread, since jt_lora takes the max per part and the
rank-``g·r`` PEFT layout no longer says where the parts are. So a grouped InA
file is for jt_lora only (the parts are in the metadata), and
``save_adapter_dir(..., reference_compatible=True)``, the export meant for the
InA code or stock PEFT, refuses it and names the layout that matches the
reference: ``target_modules=["c_attn"]`` without ``enable_lora``.

InA files that jt_lora wrote before it recorded the slope were trained with
0.1 and load so, with a warning naming the file; InA files from elsewhere
without the field get the reference's 0.01.

Loading checks everything (config, keys, shapes, zero blocks) before the
model is changed, and undoes an injected adapter if anything fails.
"""
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..nn.lora import INA_SLOPE, LEGACY_INA_SLOPE
from ..models.saving import atomic_write_text, save_safetensors
from .config import LoraConfig, IA3Config, PeftConfig, config_from_dict
from .layers import IA3Layer, LoraLayer, assign

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "AdapterFileError", "peft_state_dict", "peft_config_dict",
           "save_adapter_dir", "read_adapter", "read_adapter_files", "assign_state", "load_adapter_into",
           "from_native", "MS_DEFAULT_ALPHA", "check_reference_compatible"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
META_KEY = "jt_lora_config"
WRITER_KEY = "jt_lora_writer"  # marks every file jt_lora writes from now on
SLOPE_FIELD = "lora_inhibition_slope"
MS_DEFAULT_ALPHA = 32.0  # microsoft/LoRA's GPT-2 E2E recipe (--lora_dim 4 --lora_alpha 32); not in its files


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded; the message names the file and the key."""


# --- saving ---------------------------------------------------------------------------------
def _effective(layer: LoraLayer, name: str, config: LoraConfig) -> Tuple[int, float]:
    """(r, lora_alpha) of the plain LoRA that equals this layer's adapter in PEFT."""
    g = layer.groups(name)
    r, alpha = layer.r[name], layer.lora_alpha[name]
    return r * g, alpha * (math.sqrt(g) if config.use_rslora else g)


def peft_state_dict(tuner, adapter_name: str) -> Dict[str, np.ndarray]:
    """The adapter's tensors under PEFT's saved key names (grouped LoRA spread to PEFT's layout)."""
    config = tuner.peft_config[adapter_name]
    out = {}
    for key, layer in tuner.tuner_layers():
        if adapter_name not in layer:
            continue
        if isinstance(layer, LoraLayer):
            out[f"{PREFIX}{key}.lora_A.weight"] = layer.lora_A[adapter_name].weight.numpy()
            out[f"{PREFIX}{key}.lora_B.weight"] = layer.full_b(adapter_name).numpy()
        elif isinstance(layer, IA3Layer):
            out[f"{PREFIX}{key}.ia3_l"] = layer.ia3_l[adapter_name].numpy()
        else:
            for n, p in layer.modules_to_save[adapter_name].named_parameters():
                out[f"{PREFIX}{key}.{n}"] = p.numpy()
    for name, p in _bias_params(tuner, config).items():
        out[PREFIX + name] = p.numpy()
    return out


def _bias_params(tuner, config) -> Dict[str, "object"]:
    """Biases a LoRA adapter with ``bias='all'`` / ``'lora_only'`` trains and saves, by parameter name."""
    mode = getattr(config, "bias", "none")
    if mode == "none":
        return {}
    if mode == "lora_only":
        return {f"{k}.base_layer.bias": l.base_layer.bias for k, l in tuner.tuner_layers()
                if isinstance(l, LoraLayer) and l.base_layer.bias is not None}
    skip = (".lora_", ".modules_to_save.", ".original_module.")
    return {n: p for n, p in tuner.model.named_parameters() if n.endswith("bias") and not any(s in n for s in skip)}


def peft_config_dict(tuner, adapter_name: str) -> dict:
    """adapter_config.json contents that stock PEFT reads (plus ``lora_inhibition`` for InA)."""
    config = tuner.peft_config[adapter_name]
    out = config.to_dict()
    out["inference_mode"] = True
    if isinstance(config, LoraConfig):
        out.pop("enable_lora")
        if config.lora_inhibition == 0.0:
            out.pop("lora_inhibition")
            out.pop(SLOPE_FIELD)
        pairs = {k: _effective(l, adapter_name, config) for k, l in tuner.tuner_layers()
                 if isinstance(l, LoraLayer) and adapter_name in l}
        (r, alpha), _ = Counter(pairs.values()).most_common(1)[0]
        out["r"], out["lora_alpha"] = r, alpha
        out["rank_pattern"] = {re.escape(k): pr for k, (pr, _) in pairs.items() if pr != r}
        out["alpha_pattern"] = {re.escape(k): pa for k, (_, pa) in pairs.items() if pa != alpha}
        out["use_dora"] = False
    return out


def _grouped_ina(tuner, adapter_name: str):
    """Module names where adapter ``adapter_name`` is InA with a per-part (grouped) gate."""
    config = tuner.peft_config[adapter_name]
    if not isinstance(config, LoraConfig) or config.lora_inhibition == 0.0:
        return []
    return [k for k, l in tuner.tuner_layers() if isinstance(l, LoraLayer) and adapter_name in l
            and l.groups(adapter_name) > 1]


def check_reference_compatible(tuner, adapter_name: str):
    """Raise unless the InA reference code (and, for LoRA/(IA)³, stock PEFT) reads the adapter as the
    same model: a grouped InA gate takes its max per part, the reference over the whole rank."""
    config = tuner.peft_config[adapter_name]
    grouped = _grouped_ina(tuner, adapter_name)
    if grouped:
        raise ValueError(f"adapter {adapter_name!r} is a grouped InA adapter (enable_lora={list(config.enable_lora)} on "
                         f"{grouped[0]}): its gate takes the max per part, while the InA reference takes it over the "
                         f"module's whole rank, so the exported file would mean a different model; train with "
                         f"LoraConfig(target_modules=['c_attn'], lora_inhibition=...) without enable_lora, which "
                         f"matches the reference exactly")
    if isinstance(config, LoraConfig) and config.lora_inhibition > 0 and config.lora_inhibition_slope != INA_SLOPE:
        raise ValueError(f"adapter {adapter_name!r} uses lora_inhibition_slope={config.lora_inhibition_slope}; the InA "
                         f"reference code always uses {INA_SLOPE}")


def save_adapter_dir(tuner, adapter_name: str, out_dir, reference_compatible: bool = False) -> Path:
    """Write one adapter as PEFT does: weights first, then the config, each atomically.

    ``reference_compatible``: the file is meant for stock PEFT / the InA reference code; adapters
    they would read as a different model are refused (see ``check_reference_compatible``). Without
    it, a grouped InA adapter is written for jt_lora (its parts recorded in the metadata) with a
    warning.
    """
    out_dir = Path(out_dir)
    config = tuner.peft_config[adapter_name]
    if reference_compatible:
        check_reference_compatible(tuner, adapter_name)
    elif _grouped_ina(tuner, adapter_name):
        warnings.warn(f"{out_dir}: grouped InA adapter {adapter_name!r} written for jt_lora: the InA reference code "
                      f"would take the gate's max over the whole rank of each module and compute a different model "
                      f"(use target_modules=['c_attn'] without enable_lora for a file it reads exactly)")
    metadata = {"format": "pt", WRITER_KEY: "1"}
    if isinstance(config, LoraConfig) and config.enable_lora is not None:
        metadata[META_KEY] = json.dumps(config.to_dict())
    save_safetensors(out_dir / WEIGHTS_NAME, peft_state_dict(tuner, adapter_name), metadata=metadata)
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(peft_config_dict(tuner, adapter_name), indent=2,
                                                        sort_keys=True))
    return out_dir


def _written_by_old_jt_lora(data: dict, metadata: dict) -> bool:
    """A file jt_lora wrote before it recorded the InA slope: its grouped-layout metadata, or a config
    without ``layers_to_transform``, a field every PEFT release since 0.4 writes and jt_lora never did."""
    if WRITER_KEY in metadata:
        return False
    return META_KEY in metadata or "layers_to_transform" not in data


def _ina_slope(data: dict, metadata: dict, source: Path) -> Optional[float]:
    """The slope to read an InA file with when it records none (None: recorded, or not InA)."""
    if SLOPE_FIELD in data or not data.get("lora_inhibition"):
        return None
    if _written_by_old_jt_lora(data, metadata):
        warnings.warn(f"{source}: InA adapter without {SLOPE_FIELD} (written by jt_lora before the slope was "
                      f"recorded): using {LEGACY_INA_SLOPE}, the slope it was trained with (the InA reference uses "
                      f"{INA_SLOPE})")
        return LEGACY_INA_SLOPE
    return INA_SLOPE


# --- reading --------------------------------------------------------------------------------
def read_adapter_files(path) -> Tuple[PeftConfig, Dict[str, np.ndarray], Optional[PeftConfig]]:
    """(config from adapter_config.json, tensors without the ``base_model.model.`` prefix,
    jt_lora's own config from the metadata or None)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{cfg_file}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{cfg_file}: expected a JSON object, got {type(data).__name__}")
    native, metadata = None, {}
    if (path / WEIGHTS_NAME).exists():
        weights = path / WEIGHTS_NAME
        try:
            from safetensors import safe_open
            with safe_open(str(weights), "np") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise AdapterFileError(f"{weights}: unreadable safetensors file ({e})") from e
    elif (path / LEGACY_WEIGHTS_NAME).exists():
        from ..models.torch_pickle import load_torch_file
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
    if META_KEY in metadata:
        try:
            native = json.loads(metadata[META_KEY])
            if slope is not None and SLOPE_FIELD not in native:
                native[SLOPE_FIELD] = slope
            native = config_from_dict(native)
        except (TypeError, ValueError, AttributeError) as e:
            raise AdapterFileError(f"{weights}: bad {META_KEY} metadata ({e})") from e
    return config, state, native


def _expected(tuner, name: str):
    """{file key (no prefix): (tensor, converter or None, shape in the file)} for an injected adapter."""
    config = tuner.peft_config[name]
    plan = {}
    for key, layer in tuner.tuner_layers():
        if name not in layer:
            continue
        if isinstance(layer, LoraLayer):
            a, b, enable = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.enable_lora[name]
            plan[f"{key}.lora_A.weight"] = (a, None, tuple(a.shape))
            if enable:
                r = layer.r[name]
                plan[f"{key}.lora_B.weight"] = (b, lambda arr, k, e=enable, r=r: _group_b(arr, e, r, k),
                                                (layer.out_features, r * sum(enable)))
            else:
                plan[f"{key}.lora_B.weight"] = (b, None, tuple(b.shape))
        elif isinstance(layer, IA3Layer):
            v = layer.ia3_l[name]
            plan[f"{key}.ia3_l"] = (v, None, tuple(v.shape))
        else:
            for n, p in layer.modules_to_save[name].named_parameters():
                plan[f"{key}.{n}"] = (p, None, tuple(p.shape))
    for n, p in _bias_params(tuner, config).items():
        plan[n] = (p, None, tuple(p.shape))
    return plan


def _group_b(full: np.ndarray, enable, r: int, key: str) -> np.ndarray:
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


def assign_state(tuner, name: str, state: Dict[str, np.ndarray], source: str, peft_layout: bool = True):
    """Check keys and shapes of ``state`` against the injected adapter ``name``, then copy it in.

    ``peft_layout``: grouped LoRA B's come as PEFT's block matrix (False: already grouped, as in
    microsoft/LoRA checkpoints). Nothing is written unless every tensor fits.
    """
    plan = _expected(tuner, name)
    if not peft_layout:
        plan = {k: (var, None, tuple(var.shape)) for k, (var, _, _) in plan.items()}
    missing = sorted(set(plan) - set(state))
    unexpected = sorted(set(state) - set(plan))
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(plan[k][2])}"
              for k in sorted(set(plan) & set(state)) if tuple(state[k].shape) != tuple(plan[k][2])]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {missing[:6]}"] if missing else []) + \
                ([f"unexpected keys {unexpected[:6]}"] if unexpected else []) + \
                ([f"shape mismatch: {'; '.join(shapes[:6])}"] if shapes else [])
        raise AdapterFileError(f"{source}: adapter does not fit the model: " + "; ".join(parts))
    values = {k: (conv(state[k], k) if conv else state[k]) for k, (_, conv, _) in plan.items()}
    for k, (var, _, _) in plan.items():
        assign(var, np.ascontiguousarray(values[k], dtype=np.float32))


def read_adapter(path, model, config: Optional[PeftConfig] = None):
    """(config, tensors, peft_layout) from a PEFT directory or a microsoft/LoRA checkpoint file,
    without touching the model (``model`` only tells the checkpoint reader the sizes)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path}")
    if path.is_file():
        file_config, state = _read_ms_checkpoint(model, path, config)
        return file_config, state, False
    file_config, state, native = read_adapter_files(path)
    return config or native or file_config, state, True


def load_adapter_into(tuner, path, adapter_name: str, is_trainable: bool = False,
                      config: Optional[PeftConfig] = None) -> PeftConfig:
    """Inject adapter ``adapter_name`` (frozen, inactive) from a file; on any error the model is as before."""
    config, state, peft_layout = read_adapter(path, tuner.model, config)
    config = config.replace(inference_mode=not is_trainable)
    frozen = [(p, p.is_stop_grad()) for p in tuner.parameters()]
    tuner.inject_adapter(adapter_name, config)
    try:
        assign_state(tuner, adapter_name, state, str(path), peft_layout)
    except BaseException:
        tuner.delete_adapter(adapter_name)
        for p, was_frozen in frozen:
            p.stop_grad() if was_frozen else p.start_grad()
        raise
    return config


def _read_ms_checkpoint(model, path: Path, config: Optional[LoraConfig]):
    """microsoft/LoRA's ``{'model_state_dict': ...}``: ``lora_A``/``lora_B`` on ``c_attn`` in loralib's
    grouped layout. The file stores neither alpha nor the enabled parts: alpha comes from ``config``
    (default 32, the E2E recipe, with a warning); two groups mean q and v (the repo's GPT-2 setting)."""
    from ..models.checkpoint import normalize_gpt2_keys, read_state_dict
    raw, _ = read_state_dict(path)
    lora = {k: v for k, v in normalize_gpt2_keys(raw).items() if k.endswith((".lora_A", ".lora_B"))}
    if not lora:
        raise AdapterFileError(f"{path}: no lora_A/lora_B entries; not a microsoft/LoRA adapter checkpoint")
    modules = sorted({k.rsplit(".", 1)[0] for k in lora})
    half = [m for m in modules if f"{m}.lora_A" not in lora or f"{m}.lora_B" not in lora]
    if half:
        raise AdapterFileError(f"{path}: {half[0]} has only one of lora_A/lora_B")
    first, n_embd = modules[0], model.config.n_embd
    b = lora[f"{first}.lora_B"]
    groups, r = b.shape[0] // n_embd, b.shape[1]
    if config is None:
        enable = {2: (True, False, True), 3: (True, True, True)}.get(groups)
        if enable is None:
            raise AdapterFileError(f"{path}: {first}.lora_B {list(b.shape)} adapts {groups} part(s) of c_attn; pass "
                                   f"config=LoraConfig(enable_lora=...) to say which")
        warnings.warn(f"{path}: microsoft/LoRA checkpoints do not store lora_alpha; assuming {MS_DEFAULT_ALPHA} "
                      f"(pass config=LoraConfig(r={r}, lora_alpha=...) to set it)")
        config = LoraConfig(r=r, lora_alpha=MS_DEFAULT_ALPHA, enable_lora=enable)
    elif config.r != r:
        raise AdapterFileError(f"{path}: {first}.lora_B {list(b.shape)} has rank {r}, config.r={config.r}")
    config = config.replace(target_modules=tuple(f"transformer.{m}" for m in modules))
    state = {}
    for m in modules:
        state[f"transformer.{m}.lora_A.weight"] = lora[f"{m}.lora_A"]
        state[f"transformer.{m}.lora_B.weight"] = lora[f"{m}.lora_B"]
    return config, state


# --- native jt_lora adapters ------------------------------------------------------------------
def from_native(model, adapter_name: str = "default"):
    """Turn a GPT2LMModel built with its own adapter (``adapter='lora'|'ina'|'ia3'``, e.g. trained by
    ``jt_lora.train``) into an equivalent ``PeftModel``, in place: the native layers become plain
    base layers holding the same weights, and the adapter tensors move into a PEFT-style adapter.

    LoRA / InA on ``c_attn`` becomes ``LoraConfig(target_modules=('c_attn',), enable_lora=...)``;
    (IA)³ becomes ``IA3Config`` on ``c_attn`` (vector of ones on the parts it leaves alone) and
    ``mlp.c_proj`` (feed-forward).
    """
    from ..nn.ia3 import IA3Linear
    from ..nn.lora import Linear, MergedLinear
    from .model import PeftModel
    from .tuner import _set_child

    cfg = model.config
    if cfg.adapter == "none":
        raise ValueError("the model has no native adapter; use get_peft_model(model, config)")
    model.train()  # unmerged: base weights as trained, adapters separate
    tensors = {}
    for key, m in list(model.named_modules()):
        if isinstance(m, (MergedLinear, IA3Linear)) or (isinstance(m, Linear) and m.r > 0):
            base = Linear(m.in_features, m.out_features, fan_in_fan_out=m.fan_in_fan_out, bias=m.bias is not None)
            base.weight, base.bias = m.weight, m.bias
            if isinstance(m, IA3Linear):
                tensors[key] = ("ia3", m.scale_vector().numpy(), m.feedforward)
            else:
                tensors[key] = ("lora", m.lora_A.numpy(), m.lora_B.numpy())
            _set_child(model, key, base)
    model.config = model.transformer.config = cfg.replace(adapter="none")
    if cfg.adapter == "ia3":
        ff = tuple(k for k, t in tensors.items() if t[2])
        config = IA3Config(target_modules=tuple(tensors), feedforward_modules=ff, fan_in_fan_out=True)
    else:
        config = LoraConfig(r=cfg.lora_attn_dim, lora_alpha=cfg.lora_attn_alpha, lora_dropout=cfg.lora_dropout,
                            lora_inhibition=cfg.lora_inhibition if cfg.adapter == "ina" else 0.0,
                            lora_inhibition_slope=cfg.lora_inhibition_slope,
                            target_modules=tuple(tensors), enable_lora=cfg.lora_enable, fan_in_fan_out=True)
    peft_model = PeftModel(model, config, adapter_name)
    tuner = peft_model.base_model
    for key, layer in tuner.tuner_layers():
        kind, *values = tensors[key]
        if kind == "ia3":
            vec, ff = values
            assign(layer.ia3_l[adapter_name], vec.reshape((1, -1) if ff else (-1, 1)))
        else:
            assign(layer.lora_A[adapter_name].weight, values[0])
            assign(layer.lora_B[adapter_name].weight, values[1])
    return peft_model
