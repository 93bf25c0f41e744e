"""What the analyses run on: the models to compare and the batches of examples.

A comparison is a list of :class:`ModelSpec`: the base checkpoint alone, the base plus a jt_lora
adapter directory (LoRA, InA at some inhibition level, (IA)³), or another full checkpoint (e.g. a
fully fine-tuned model written by ``save_pretrained``). Models are loaded one at a time, in eval
mode with dropout off, so comparing several GPT-2 M variants needs memory for one model only.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

__all__ = ["ModelSpec", "load_model", "unique_slugs", "example_batches", "read_examples", "read_json",
           "check_utf8", "ADAPTER_FLAGS"]

# Command-line flag -> adapter config field it must agree with (the adapter directory decides).
ADAPTER_FLAGS = {"--adapter": "adapter", "--lora_dim": "lora_attn_dim", "--lora_alpha": "lora_attn_alpha",
                 "--lora_inhibition": "lora_inhibition", "--lora_slope": "slope"}


def check_utf8(path) -> None:
    """ValueError naming ``path`` and the line when the file is not UTF-8 (readers decoding it
    as text would otherwise fail with a bare ``UnicodeDecodeError``)."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None


def read_json(path) -> dict:
    """A JSON object file; ValueError naming the file with the line and column of what is wrong."""
    check_utf8(path)
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _slope_field(meta: dict) -> Optional[str]:
    """The adapter config's InA slope field (named ``*slope*``), if it records one."""
    return next((k for k in meta if "slope" in k), None)


@dataclass
class ModelSpec:
    """One column of a comparison.

    Args:
        label: name shown in figures and JSON (e.g. ``"InA 30%"``).
        checkpoint: full GPT-2 weights (HF dir/file or microsoft/LoRA checkpoint).
        adapter_dir: a jt_lora adapter directory applied on top of ``checkpoint``; None for the
            checkpoint alone.
    """

    label: str
    checkpoint: str
    adapter_dir: Optional[str] = None

    def describe(self) -> Dict[str, Optional[str]]:
        return {"label": self.label, "checkpoint": str(Path(self.checkpoint).resolve()),
                "adapter_dir": str(Path(self.adapter_dir).resolve()) if self.adapter_dir else None}


def check_adapter_flags(adapter_dir, meta: dict, flags: Dict[str, object]) -> None:
    """Flags given on the command line must agree with the adapter directory's own config.

    Args:
        flags: ``{"--lora_alpha": 32.0, ...}`` (flags not given are left out).

    Raises:
        ValueError: naming the flag, the config file and both values.
    """
    from ..models.loading import adapter_config_file

    config_file = adapter_config_file(adapter_dir)
    for flag, value in flags.items():
        field = ADAPTER_FLAGS[flag]
        if field == "slope":
            field = _slope_field(meta)
        if field is None or field not in meta:
            raise ValueError(f"{flag} {value}: {config_file} does not record it; "
                             f"drop {flag} (the adapter directory's config decides)")
        recorded = meta[field]
        same = (float(recorded) == float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                else recorded == value)
        if not same:
            raise ValueError(f"{flag} {value} contradicts {field}={recorded!r} in "
                             f"{config_file}; drop {flag} (the adapter's config decides)")


def load_model(spec: ModelSpec, flags: Optional[Dict[str, object]] = None):
    """The model ``spec`` names, in eval mode (adapters merged where possible, dropout off).

    The adapter type, rank, alpha, inhibition and slope come from the adapter directory's own
    config; ``flags`` (command-line values) may only repeat them.

    Raises:
        FileNotFoundError: the checkpoint or adapter directory does not exist.
        ValueError: the files do not hold a GPT-2 / an adapter that fits the checkpoint (the
            message names the file).
    """
    from ..models.loading import adapter_config_file
    from ..models.loading import load_model as build
    from ..models.saving import read_adapter_config

    if not Path(spec.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {spec.checkpoint}")
    if spec.adapter_dir is not None:
        if not Path(spec.adapter_dir).is_dir():
            raise FileNotFoundError(f"adapter directory not found: {spec.adapter_dir}")
        read_json(adapter_config_file(spec.adapter_dir))   # bytes and syntax, with line and column
        check_adapter_flags(spec.adapter_dir, read_adapter_config(spec.adapter_dir), flags or {})
    config = Path(spec.checkpoint) / "config.json"
    if config.is_file():
        read_json(config)
    return build(spec.checkpoint, spec.adapter_dir)


def unique_slugs(labels: List[str]) -> List[str]:
    """File-system-safe directory names for labels (``"InA 30%"`` -> ``"InA_30"``), made unique."""
    slugs, seen = [], {}
    for label in labels:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_.") or "model"
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.append(slug if n == 0 else f"{slug}_{n + 1}")
    return slugs


def read_examples(path, seq_len: int, vocab_size: int, max_examples: Optional[int] = None):
    """The first ``max_examples`` examples of an encoded JSONL file as an ``FTDataset``."""
    from ..training.data import FTDataset

    if not Path(path).is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    check_utf8(path)
    dataset = FTDataset(path, seq_len, vocab_size=vocab_size)
    if max_examples is not None and max_examples < len(dataset):
        if max_examples < 1:
            raise ValueError(f"--max_examples must be >= 1, got {max_examples}")
        dataset = FTDataset(dataset.examples[:max_examples], seq_len)
    return dataset


def example_batches(dataset, batch_size: int, pad_to_multiple_of: int = 8) -> Iterator[Dict[str, np.ndarray]]:
    """Batches of ``dataset`` grouped by length (less padding; every analysis excludes padding, so
    the order does not change any result). Each batch is ``jt_lora.data.collate`` output:
    ``input``/``target``/``mask`` [B, T] and ``length`` [B]."""
    from ..training.data import collate

    order = np.argsort(dataset.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield collate([dataset[int(i)] for i in order[start:start + batch_size]], pad_to_multiple_of)


def num_batches(dataset, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


def padding_mask(lengths: np.ndarray, t: int) -> np.ndarray:
    """[B, T] float32: 1 for real tokens, 0 for padding."""
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
