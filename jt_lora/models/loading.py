"""The one way to build a model: ``load_model(base, adapter=None, **overrides)``, and the model flags
of ``jt_lora.generate`` / ``jt_lora.eval_boolq`` that resolve to it (``build_model``).

Training, generation, BoolQ evaluation, the analyses and the benchmark all build their model here,
so the rules below hold everywhere: an adapter's own config decides its settings, the weights decide
the shape, and the model comes back in the mode asked for (eval: adapters merged where possible).

Two ways to name weights:

* ``--adapter_dir DIR --base_checkpoint BASE``: an adapter saved by training. Its
  ``jt_lora_adapter.json`` is the source of truth for the adapter type, rank, alpha, inhibition
  (and the InA slope) and records the base's shape. A flag may repeat a recorded value; one that
  contradicts it is an error naming the flag and the file (silently using the flag would compute
  a model that was never trained).
* ``--init_checkpoint CKPT``: weights with everything in them (a HF directory or file, or a
  microsoft/LoRA checkpoint holding base + LoRA tensors). Such a checkpoint records no adapter
  settings, so the flags give them; rank and alpha default to the LoRA paper's 4 and 32, the same
  defaults as ``jt_lora.train`` (one set for every entry point). InA's inhibition has no safe
  default: ``--adapter ina`` needs it.

Model shape comes from the weights (``config.json`` or the tensors' shapes); the head count, which
tensors do not show, from ``config.json``, ``--n_head``, the adapter's record, then the standard
GPT-2 width table. ``--model_card`` only helps where nothing else tells; when it disagrees with the
weights a warning says so and the weights win.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

__all__ = ["LORA_DIM", "LORA_ALPHA", "load_model", "add_model_flags", "resolve_adapter", "resolve_shape",
           "check_model_flags", "build_model"]

LORA_DIM = 4         # the LoRA paper's E2E rank; jt_lora.train's default
LORA_ALPHA = 32.0    # the LoRA paper's alpha; jt_lora.train's default
CARDS = ("gpt2.sm", "gpt2.md", "gpt2.lg")
_CARD_SHAPES = {"gpt2.sm": (768, 12, 12), "gpt2.md": (1024, 24, 16), "gpt2.lg": (1280, 36, 20)}

# flag, argparse attribute, adapter-config field
_FLAG_FIELDS = (("--adapter", "adapter", "adapter"), ("--lora_dim", "lora_dim", "lora_attn_dim"),
                ("--lora_alpha", "lora_alpha", "lora_attn_alpha"),
                ("--lora_inhibition", "lora_inhibition", "lora_inhibition"),
                ("--lora_inhibition_slope", "lora_inhibition_slope", "lora_inhibition_slope"))


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The weight, shape and adapter flags (None = "not given": recorded values then apply)."""
    a = p.add_argument
    a("--init_checkpoint", default=None,
      help="model weights: HF directory/file or microsoft/LoRA checkpoint (LoRA weights included)")
    a("--base_checkpoint", default=None, help="base weights when the adapter is in --adapter_dir")
    a("--adapter_dir", default=None,
      help="jt_lora adapter directory (save_adapter); its jt_lora_adapter.json decides the adapter")
    a("--model_card", default=None, choices=CARDS,
      help="architecture when the weights do not tell (default: the shapes of the weights themselves; "
           "a card that disagrees with them is ignored with a warning)")
    a("--n_head", type=int, default=None,
      help="attention heads, for a checkpoint of non-standard width without config.json "
           "(default: config.json, the adapter's record, then GPT-2's head size 64)")
    a("--adapter", default=None, choices=["lora", "ina", "ia3", "none"],
      help="adapter of --init_checkpoint (default: from --adapter_dir's config; else lora when "
           "--lora_dim is given, otherwise none)")
    a("--lora_dim", type=int, default=None,
      help=f"LoRA rank r of --init_checkpoint (default: {LORA_DIM}, or --adapter_dir's value)")
    a("--lora_alpha", type=float, default=None,
      help=f"LoRA alpha (default: {LORA_ALPHA:g}, or --adapter_dir's value)")
    a("--lora_inhibition", type=float, default=None,
      help="InA inhibition level in (0, 1), only with --adapter ina (default: --adapter_dir's value; "
           "required for --adapter ina with --init_checkpoint)")
    a("--lora_inhibition_slope", type=float, default=None,
      help="InA leaky-ReLU slope, only with --adapter ina (default: --adapter_dir's value, else the model's)")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b


def resolve_adapter(args, meta: Optional[dict] = None, meta_path: str = "", fields=()) -> dict:
    """Adapter fields of ``GPT2Config`` from the flags and (when given) an adapter config.

    Args:
        meta: the adapter directory's config (``read_adapter_config``), or None for --init_checkpoint.
        meta_path: its file, named in errors.
        fields: the adapter-config field names of this version (``saving.ADAPTER_FIELDS``).

    Raises:
        ValueError: naming the flag (and the file) for a contradiction or a flag that does not apply.
    """
    given = {flag: getattr(args, attr) for flag, attr, _ in _FLAG_FIELDS if getattr(args, attr) is not None}
    if meta is not None:
        out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items() if k in fields}
        adapter = meta.get("adapter")
        for flag, attr, field in _FLAG_FIELDS:
            if flag not in given:
                continue
            if field not in meta:
                raise ValueError(f"{flag} {given[flag]}: {meta_path} records no {field}; drop the flag")
            if not _same(given[flag], meta[field]):
                raise ValueError(f"{flag} {given[flag]} contradicts {field}={meta[field]!r} in {meta_path}; "
                                 f"the adapter's config decides: drop the flag")
        _check_applies(adapter, given)
    else:
        adapter = args.adapter or ("lora" if args.lora_dim is not None else "none")
        _check_applies(adapter, given)
        out = {"adapter": adapter}
        if adapter in ("lora", "ina"):
            r = LORA_DIM if args.lora_dim is None else args.lora_dim
            if r < 1:
                raise ValueError(f"--lora_dim must be >= 1, got {r}")
            out.update(lora_attn_dim=r, lora_attn_alpha=LORA_ALPHA if args.lora_alpha is None else args.lora_alpha)
        if adapter == "ina":
            if args.lora_inhibition is None:
                raise ValueError("--adapter ina needs --lora_inhibition in (0, 1): the checkpoint does not record it")
            out["lora_inhibition"] = args.lora_inhibition
            if args.lora_inhibition_slope is not None:
                out["lora_inhibition_slope"] = args.lora_inhibition_slope
    if out.get("adapter") == "ina" and not 0 < float(out.get("lora_inhibition", 0)) < 1:
        src = f" ({meta_path})" if meta is not None else ""
        raise ValueError(f"--lora_inhibition must be in (0, 1) for an InA adapter{src}, got "
                         f"{out.get('lora_inhibition')} (0 is plain LoRA: use --adapter lora)")
    out["lora_dropout"] = 0.0
    return out


def _check_applies(adapter: Optional[str], given: dict) -> None:
    """Flags of one adapter kind given with another are errors, not silently ignored."""
    if adapter != "ina":
        for flag in ("--lora_inhibition", "--lora_inhibition_slope"):
            if flag in given:
                raise ValueError(f"{flag} applies only to --adapter ina, not {adapter}")
    if adapter not in ("lora", "ina"):
        for flag in ("--lora_dim", "--lora_alpha"):
            if flag in given:
                raise ValueError(f"{flag} applies only to --adapter lora/ina, not {adapter}")


def resolve_shape(arch: dict, weights: str, args, recorded: Optional[dict] = None, recorded_path: str = "",
                  warn=None) -> dict:
    """``n_embd``, ``n_layer``, ``n_head``, ``vocab_size``, ``n_positions`` for the weights.

    Args:
        arch: what the weights tell (``config.json`` fields, or the tensors' shapes: no ``n_head``).
        recorded: the base shape recorded in the adapter's config (``meta['base']``), if any.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    recorded = recorded or {}
    for k in ("n_embd", "n_layer", "vocab_size", "n_positions"):
        if k in recorded and k in arch and recorded[k] != arch[k]:
            raise ValueError(f"{recorded_path} was trained on a base with {k}={recorded[k]}, "
                             f"but {weights} has {k}={arch[k]}: wrong base checkpoint?")
    shape = dict(arch)
    width = arch["n_embd"]
    if args.n_head is not None:
        if args.n_head < 1 or width % args.n_head:
            raise ValueError(f"--n_head {args.n_head} does not divide the width n_embd={width} of {weights}")
        for where, value in ((f"{weights}/config.json", arch.get("n_head")), (recorded_path, recorded.get("n_head"))):
            if value is not None and value != args.n_head:
                raise ValueError(f"--n_head {args.n_head} contradicts n_head={value} in {where}; drop the flag")
        shape["n_head"] = args.n_head
    elif "n_head" not in shape:
        if recorded.get("n_head"):
            shape["n_head"] = recorded["n_head"]
        elif args.model_card and _CARD_SHAPES[args.model_card][0] == width:
            shape["n_head"] = _CARD_SHAPES[args.model_card][2]
        elif width % 64 == 0:
            shape["n_head"] = width // 64     # every GPT-2 size has 64-wide heads
        else:
            raise ValueError(f"{weights}: n_embd={width} has no standard head count; pass --n_head")
    if args.model_card:
        e, l, h = _CARD_SHAPES[args.model_card]
        if (e, l, h) != (shape["n_embd"], shape["n_layer"], shape["n_head"]):
            warn(f"--model_card {args.model_card} (n_embd={e}, n_layer={l}, n_head={h}) disagrees with {weights} "
                 f"(n_embd={shape['n_embd']}, n_layer={shape['n_layer']}, n_head={shape['n_head']}); "
                 f"using the checkpoint's shapes")
    return shape


def check_model_flags(args) -> dict:
    """The adapter fields the flags resolve to, checked before any weights are read (cheap)."""
    from .saving import ADAPTER_FIELDS, read_adapter_config
    if args.adapter_dir is None:
        return resolve_adapter(args, fields=ADAPTER_FIELDS)
    meta = read_adapter_config(args.adapter_dir)
    return resolve_adapter(args, meta, str(adapter_config_file(args.adapter_dir)), ADAPTER_FIELDS)


def adapter_config_file(adapter_dir) -> Path:
    """The config file of an adapter directory (named in errors); its format is ``saving``'s business."""
    try:
        from .adapter_files import config_path
        return Path(config_path(Path(adapter_dir)))
    except ImportError:
        from .saving import ADAPTER_CONFIG
        return Path(adapter_dir) / ADAPTER_CONFIG


def _adapter_fields(meta: dict, meta_path: str, overrides: dict) -> dict:
    """GPT2Config's adapter fields from an adapter's config; an override may only repeat them."""
    from .saving import ADAPTER_FIELDS
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items() if k in ADAPTER_FIELDS}
    for k, v in overrides.items():
        if k not in ADAPTER_FIELDS or k == "lora_dropout":
            continue
        name = "adapter_type" if k == "adapter" else k
        if k not in out:
            raise ValueError(f"{name}={v!r}: {meta_path} records no {k}; drop it (the adapter's config decides)")
        if not _same(tuple(v) if isinstance(v, list) else v, out[k]):
            raise ValueError(f"{name}={v!r} contradicts {k}={out[k]!r} in {meta_path}; "
                             f"the adapter's config decides: drop {name}")
    return out


def load_model(base=None, adapter=None, *, training: bool = False, card: Optional[str] = None, **overrides):
    """The one way to build a ``GPT2LMModel``: base weights, optionally an adapter directory on top.

    Args:
        base: GPT-2 weights (HF directory or file, microsoft/LoRA checkpoint); None = random init of
            ``card`` (a pipeline demo, as ``jt_lora.train`` without ``--init_checkpoint``).
        adapter: an adapter directory written by training / ``save_adapter``. Its config decides the
            adapter type, rank, alpha, parts, inhibition and slope; an override may repeat a recorded
            value, and one that contradicts it is an error naming the field and the file.
        training: False (default): eval mode, adapters merged where possible, dropout off.
            True: train mode (only adapter tensors trainable), dropout as configured.
        card: ``gpt2.sm``/``md``/``lg``: the shape of a random init, or a hint for weights that do not
            record their head count (it never overrides the weights' shapes).
        **overrides: ``GPT2Config`` fields: a new adapter's settings when ``adapter`` is None
            (``adapter_type="lora"|"ina"|"ia3"``, i.e. the config's ``adapter`` field, ``lora_attn_dim=4``...),
            ``lora_dropout``, or ``n_head`` where the weights do not tell it.

    Raises:
        FileNotFoundError / ValueError: naming the file, and the field or key that is wrong.
    """
    from types import SimpleNamespace

    from .checkpoint import _architecture, load_into_model, normalize_gpt2_keys, read_state_dict
    from .gpt2 import GPT2Config, GPT2LMModel
    from .saving import load_adapter, read_adapter_config

    meta = None
    if "adapter_type" in overrides:     # ``adapter`` names the directory; the config field is "adapter"
        overrides["adapter"] = overrides.pop("adapter_type")
    fields = dict(overrides)
    if adapter is not None:
        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter directory not found: {adapter}")
        meta = read_adapter_config(adapter)
        meta_path = str(adapter_config_file(adapter))
        fields.update(_adapter_fields(meta, meta_path, overrides))
    else:
        fields.setdefault("adapter", "none")   # as from_pretrained and transformers: the plain GPT-2
    if not training:
        fields["lora_dropout"] = 0.0
    if base is None:
        model = GPT2LMModel(GPT2Config.from_card(card or "gpt2.sm", **fields))
    else:
        raw, hf_config = read_state_dict(base)
        state = normalize_gpt2_keys(raw)
        del raw
        arch = _architecture(state, hf_config, base, need_heads=False)
        hints = SimpleNamespace(n_head=fields.pop("n_head", None), model_card=card)
        shape = resolve_shape(arch, str(base), hints, (meta or {}).get("base"), meta_path if meta else "")
        known = set(GPT2Config.__dataclass_fields__)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"load_model: unknown GPT2Config field(s) {unknown}")
        model = GPT2LMModel(GPT2Config(**{**shape, **fields}))
        load_into_model(model, state, strict=True, source=str(base))
    if adapter is not None:
        load_adapter(model, adapter)
    if training:
        model.train()
    else:
        model.eval()
    return model


def build_model(args):
    """The model the flags describe, weights loaded, in eval mode (adapters merged where possible)."""
    meta = meta_path = None
    if args.adapter_dir is not None:
        if args.base_checkpoint and args.init_checkpoint:
            raise ValueError("with --adapter_dir give the base weights once: --base_checkpoint or --init_checkpoint")
        weights = args.base_checkpoint or args.init_checkpoint
        if weights is None:
            raise ValueError("--adapter_dir needs the base weights: --base_checkpoint (or --init_checkpoint)")
        from .saving import ADAPTER_FIELDS, read_adapter_config
        meta = read_adapter_config(args.adapter_dir)
        meta_path = str(adapter_config_file(args.adapter_dir))
    else:
        from .saving import ADAPTER_FIELDS
        weights = args.init_checkpoint or args.base_checkpoint
        if weights is None:
            raise ValueError("no weights: give --init_checkpoint (or --base_checkpoint with --adapter_dir)")
    fields = resolve_adapter(args, meta, meta_path or "", ADAPTER_FIELDS)   # errors name the flags
    if meta is not None:
        fields = {}                            # the adapter's config decides; the flags only repeated it
    if args.n_head is not None:
        fields["n_head"] = args.n_head
    if "adapter" in fields:
        fields["adapter_type"] = fields.pop("adapter")
    return load_model(weights, args.adapter_dir, card=args.model_card, **fields)
