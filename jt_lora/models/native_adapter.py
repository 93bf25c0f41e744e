"""``save_adapter`` / ``load_adapter`` for a GPT-2 built with its own adapter (``GPT2Config(adapter=...)``).

The loralib-style front-end's side of the one adapter format (``adapter_files``): the trainer's
``adapter/`` and checkpoints are PEFT directories, which ``PeftModel.from_pretrained`` (jt_lora's or
HF PEFT's) reads too. ``read_adapter_config`` gives the directory's adapter as ``GPT2Config`` fields
(``ADAPTER_FIELDS``, plus the recorded base shape, step, run id), which generate, eval_boolq,
analysis and resume use to build the model. Saving and loading never change train/eval mode: a merged
layer is unmerged, written, and merged again.
"""
from pathlib import Path
from typing import List, Tuple

from ..nn.adapter_layer import DEFAULT_ADAPTER
from ..nn.ia3 import IA3Linear
from ..nn.lora import LoRALayer
from ..nn.modes import assign_keep_trainable
from ..peft.config import IA3Config, LoraConfig, PeftConfig
from .adapter_files import (CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, check_plan, config_path, layer_file_plan,
                            layer_file_state, read_adapter_files, write_adapter_dir)

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_FIELDS", "save_adapter", "load_adapter",
           "read_adapter_config", "native_fields", "native_adapter_config"]

ADAPTER_CONFIG = CONFIG_NAME
ADAPTER_WEIGHTS = WEIGHTS_NAME
ADAPTER_FIELDS = ("adapter", "lora_attn_dim", "lora_attn_alpha", "lora_dropout", "lora_inhibition",
                  "lora_inhibition_slope", "lora_enable", "ia3_enable", "ia3_feedforward")
_SHAPE = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_FEEDFORWARD = "mlp.c_proj"


def _adapter_layers(model) -> List[Tuple[str, object]]:
    return [(k, m) for k, m in model.named_modules()
            if isinstance(m, (IA3Linear, LoRALayer)) and DEFAULT_ADAPTER in m]


def native_adapter_config(model) -> Tuple[PeftConfig, List[Tuple[str, object]]]:
    """The model's adapter as the one config type (targets by suffix, parts as enable_* masks), and its
    adapter layers; ``save_adapter`` and ``from_native`` both describe a native model with it."""
    cfg, layers = model.config, _adapter_layers(model)
    if cfg.adapter == "none" or not layers:
        raise ValueError("the model has no adapter tensors (config.adapter='none'?)")
    if cfg.adapter == "ia3":
        ff = tuple(_FEEDFORWARD for _, m in layers if m.feedforward)[:1]
        targets = ("c_attn",) * any(not m.feedforward for _, m in layers) + ff
        return IA3Config(target_modules=targets, feedforward_modules=ff, enable_ia3=cfg.ia3_enable,
                         fan_in_fan_out=True), layers
    ina = cfg.adapter == "ina"
    config = LoraConfig(r=cfg.lora_attn_dim, lora_alpha=cfg.lora_attn_alpha, lora_dropout=cfg.lora_dropout,
                        lora_inhibition=cfg.lora_inhibition if ina else 0.0, lora_inhibition_slope=cfg.lora_inhibition_slope,
                        target_modules=("c_attn",), enable_lora=cfg.lora_enable, fan_in_fan_out=True)
    return config, layers


def save_adapter(model, out_dir, extra: dict = None) -> Path:
    """Write the model's adapter as a PEFT directory, with the base shape (and ``extra``) recorded.

    Args:
        model: a ``GPT2LMModel`` built with ``adapter='lora'|'ina'|'ia3'`` (either mode; unchanged).
        out_dir: the directory (created; files written atomically).
        extra: more to record (the trainer: step, run id).
    """
    config, layers = native_adapter_config(model)
    ranks = {k: (m.r, m.groups()) for k, m in layers if not isinstance(m, IA3Linear)}
    state = {}
    for key, m in layers:
        state.update(layer_file_state(key, m, DEFAULT_ADAPTER))
    cfg = model.config.to_dict()
    info = {"base": {k: cfg[k] for k in _SHAPE}, **(extra or {})}
    return write_adapter_dir(out_dir, config, ranks, state, info)


def _suffixes(targets, source) -> set:
    if targets is None or isinstance(targets, str):
        raise AdapterFileError(f"{source}: target_modules={targets!r}; GPT2Config(adapter=...) needs a list of "
                               f"names (load it with PeftModel.from_pretrained)")
    return {_FEEDFORWARD if t.endswith(_FEEDFORWARD) else t.rsplit(".", 1)[-1] for t in targets}


def native_fields(config: PeftConfig, source) -> dict:
    """The adapter as ``GPT2Config`` fields, or an error naming ``source`` when the native model cannot
    express it (other targets, rank patterns, rsLoRA, trained biases ...: PeftModel can)."""
    unsupported = [k for k, bad in (("modules_to_save", config.modules_to_save),
                                    ("exclude_modules", config.exclude_modules),
                                    ("rank_pattern", getattr(config, "rank_pattern", None)),
                                    ("alpha_pattern", getattr(config, "alpha_pattern", None)),
                                    ("use_rslora", getattr(config, "use_rslora", False)),
                                    ("bias", getattr(config, "bias", "none") != "none")) if bad]
    targets = _suffixes(config.target_modules, source)
    allowed = {"c_attn", _FEEDFORWARD} if isinstance(config, IA3Config) else {"c_attn"}
    if unsupported or not targets <= allowed:
        what = unsupported or [f"target_modules={sorted(targets)}"]
        raise AdapterFileError(f"{source}: {', '.join(what)}: not expressible as GPT2Config(adapter=...), which "
                               f"adapts {sorted(allowed)} only; load it with PeftModel.from_pretrained")
    if isinstance(config, IA3Config):
        ff = _suffixes(config.feedforward_modules or (), source)
        if ff != (targets & {_FEEDFORWARD}):
            raise AdapterFileError(f"{source}: feedforward_modules={sorted(ff)}: GPT2Config(adapter='ia3') rescales the "
                                   f"input of {_FEEDFORWARD} and the output of c_attn")
        enable = config.enable_ia3 or (True, True, True)
        return {"adapter": "ia3", "ia3_enable": list(enable if "c_attn" in targets else (False,) * 3),
                "ia3_feedforward": _FEEDFORWARD in targets}
    ina = config.lora_inhibition > 0
    return {"adapter": "ina" if ina else "lora", "lora_attn_dim": config.r, "lora_attn_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout, "lora_inhibition": config.lora_inhibition,
            "lora_inhibition_slope": config.lora_inhibition_slope,
            "lora_enable": list(config.enable_lora or (True,))}


def read_adapter_config(adapter_dir) -> dict:
    """The adapter of ``adapter_dir`` (either format) as ``GPT2Config`` fields plus what was recorded
    beside it (``base`` shape, ``step`` ...). An InA file without a slope from before it was recorded
    gets the legacy 0.1, with a warning."""
    files = read_adapter_files(adapter_dir)
    return {**native_fields(files.config, files.config_file), **files.model_info}


def _plan(model) -> dict:
    """{file key: (parameter, converter, shape in the file)} for the model's adapter tensors."""
    plan = {}
    for key, m in _adapter_layers(model):
        plan.update(layer_file_plan(key, m, DEFAULT_ADAPTER))
    return plan


def _compared(fields: dict) -> Tuple[str, ...]:
    if fields["adapter"] == "ia3":
        return "adapter", "ia3_enable", "ia3_feedforward"
    slope = ("lora_inhibition_slope",) if fields["adapter"] == "ina" else ()
    return ("adapter", "lora_attn_dim", "lora_attn_alpha", "lora_inhibition", "lora_enable") + slope


def load_adapter(model, adapter_dir) -> dict:
    """Load an adapter directory (either format) into a model built with the same adapter.

    Everything is checked before anything is copied, so a bad file leaves the model unchanged; the
    model's train/eval mode is kept. Returns what ``read_adapter_config`` returns.
    """
    files = read_adapter_files(adapter_dir)
    source = files.config_file
    fields = native_fields(files.config, source)
    cfg = model.config.to_dict()
    wrong = [f"{k}: adapter {fields[k]!r} vs model {cfg[k]!r}" for k in _compared(fields)
             if _norm(fields[k]) != _norm(cfg[k])]
    if wrong:
        raise AdapterFileError(f"{adapter_dir}: adapter does not fit the model: " + "; ".join(wrong))
    plan = _plan(model)
    values = check_plan(plan, files.state, source)
    merged = [m for _, m in _adapter_layers(model) if m.merged]
    for m in merged:
        m.unmerge()
    for k, (p, _, _) in plan.items():
        assign_keep_trainable(p, values[k])
    for m in merged:
        m.merge()
    return {**fields, **files.model_info}


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def adapter_config_file(adapter_dir) -> Path:
    """The file errors should name for an adapter directory (either format)."""
    return config_path(adapter_dir)
