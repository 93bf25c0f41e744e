"""The PEFT-style front-end's side of the one adapter format (``models/adapter_files``).

Its parameter names are PEFT's, so mapping a ``PeftModel``'s adapter to the file's keys is only
dropping the adapter name; the grouped-LoRA and part-masked (IA)³ layouts are converted by the
functions ``adapter_files`` and ``nn`` share. Reading covers PEFT directories (HF PEFT's or jt_lora's,
including the trainer's ``adapter/``), legacy ``jt_lora_adapter.*`` directories (converted by
``adapter_files``) and microsoft/LoRA checkpoints (``_read_ms_checkpoint``).

InA: a q/v-grouped InA adapter takes its gate's max per part, which the rank-``g·r`` PEFT layout
cannot express; ``reference_compatible=True``, the export meant for the InA reference code or stock
PEFT, refuses it and names the layout that matches the reference: ``target_modules=["c_attn"]``
without ``enable_lora``.

Loading checks everything (config, keys, shapes, zero blocks) before the model is changed, and
undoes an injected adapter if anything fails. ``from_native`` turns a natively built model into a
``PeftModel`` without changing its train/eval mode.
"""
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..models.adapter_files import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, AdapterFileError, check_plan,
                                    layer_file_plan, layer_file_state, peft_config_json, read_adapter_files,
                                    write_adapter_dir)
from ..nn.lora import INA_SLOPE
from .config import LoraConfig, PeftConfig
from .layers import IA3Layer, LoraLayer, assign

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PREFIX", "AdapterFileError", "peft_state_dict", "peft_config_dict",
           "save_adapter_dir", "read_adapter", "read_adapter_files", "assign_state", "load_adapter_into",
           "MS_DEFAULT_ALPHA", "check_reference_compatible"]

MS_DEFAULT_ALPHA = 32.0  # microsoft/LoRA's GPT-2 E2E recipe (--lora_dim 4 --lora_alpha 32); not in its files


# --- saving ---------------------------------------------------------------------------------
def _adapter_state(tuner, adapter_name: str) -> Dict[str, np.ndarray]:
    """The adapter's tensors in PEFT's layout, keys without the prefix (grouped LoRA B and part-masked
    (IA)³ vectors spread to full size)."""
    config = tuner.peft_config[adapter_name]
    out = {}
    for key, layer in tuner.tuner_layers():
        if adapter_name not in layer:
            continue
        if isinstance(layer, (LoraLayer, IA3Layer)):
            out.update(layer_file_state(key, layer, adapter_name))
        else:
            for n, p in layer.modules_to_save[adapter_name].named_parameters():
                out[f"{key}.{n}"] = p.numpy()
    for name, p in _bias_params(tuner, config).items():
        out[name] = p.numpy()
    return out


def peft_state_dict(tuner, adapter_name: str) -> Dict[str, np.ndarray]:
    """The adapter's tensors under PEFT's saved key names."""
    return {PREFIX + k: v for k, v in _adapter_state(tuner, adapter_name).items()}


def _ranks(tuner, adapter_name: str):
    return {k: (l.r[adapter_name], l.groups(adapter_name)) for k, l in tuner.tuner_layers()
            if isinstance(l, LoraLayer) and adapter_name in l}


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
    return peft_config_json(tuner.peft_config[adapter_name], _ranks(tuner, adapter_name))


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
    return write_adapter_dir(out_dir, config, _ranks(tuner, adapter_name), _adapter_state(tuner, adapter_name))


# --- reading --------------------------------------------------------------------------------
def _expected(tuner, name: str):
    """{file key (no prefix): (tensor, converter or None, shape in the file)} for an injected adapter."""
    config = tuner.peft_config[name]
    plan = {}
    for key, layer in tuner.tuner_layers():
        if name not in layer:
            continue
        if isinstance(layer, (LoraLayer, IA3Layer)):
            plan.update(layer_file_plan(key, layer, name))
        else:
            for n, p in layer.modules_to_save[name].named_parameters():
                plan[f"{key}.{n}"] = (p, None, tuple(p.shape))
    for n, p in _bias_params(tuner, config).items():
        plan[n] = (p, None, tuple(p.shape))
    return plan


def assign_state(tuner, name: str, state: Dict[str, np.ndarray], source: str, peft_layout: bool = True):
    """Check keys and shapes of ``state`` against the injected adapter ``name``, then copy it in.

    ``peft_layout``: grouped LoRA B's come as PEFT's block matrix (False: already grouped, as in
    microsoft/LoRA checkpoints). Nothing is written unless every tensor fits.
    """
    plan = _expected(tuner, name)
    if not peft_layout:
        plan = {k: (var, None, tuple(var.shape)) for k, (var, _, _) in plan.items()}
    values = check_plan(plan, state, source)
    for k, (var, _, _) in plan.items():
        assign(var, values[k])


def read_adapter(path, model, config: Optional[PeftConfig] = None):
    """(config, tensors, peft_layout) from a PEFT directory or a microsoft/LoRA checkpoint file,
    without touching the model (``model`` only tells the checkpoint reader the sizes)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path}")
    if path.is_file():
        file_config, state = _read_ms_checkpoint(model, path, config)
        return file_config, state, False
    files = read_adapter_files(path)
    return config or files.config, files.state, True


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
