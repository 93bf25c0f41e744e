"""What the analyses run on: the models to compare and the batches of examples.

A comparison is a list of :class:`ModelSpec`: the base checkpoint alone, the base plus a jt_lora
adapter directory (LoRA, InA at some inhibition level, (IA)³), or another full checkpoint (e.g. a
fully fine-tuned model written by ``save_pretrained``). Models are loaded one at a time, in eval
mode with dropout off, so comparing several GPT-2 M variants needs memory for one model only.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

__all__ = ["ModelSpec", "load_model", "unique_slugs", "example_batches", "read_examples"]


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


def load_model(spec: ModelSpec):
    """The model ``spec`` names, in eval mode (adapters merged where possible, dropout off).

    Raises:
        FileNotFoundError: the checkpoint or adapter directory does not exist.
        ValueError: the files do not hold a GPT-2 / an adapter that fits the checkpoint (the
            message names the file).
    """
    from ..model import GPT2LMModel
    from ..saving import ADAPTER_FIELDS, load_adapter, read_adapter_config

    if not Path(spec.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {spec.checkpoint}")
    fields = {"adapter": "none"}
    if spec.adapter_dir is not None:
        if not Path(spec.adapter_dir).is_dir():
            raise FileNotFoundError(f"adapter directory not found: {spec.adapter_dir}")
        meta = read_adapter_config(spec.adapter_dir)
        fields = {k: (tuple(meta[k]) if isinstance(meta[k], list) else meta[k])
                  for k in ADAPTER_FIELDS if k in meta}
    fields["lora_dropout"] = 0.0
    model = GPT2LMModel.from_pretrained(spec.checkpoint, **fields)
    if spec.adapter_dir is not None:
        load_adapter(model, spec.adapter_dir)
    model.eval()
    return model


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
    from ..data import FTDataset

    if not Path(path).is_file():
        raise FileNotFoundError(f"data file not found: {path}")
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
    from ..data import collate

    order = np.argsort(dataset.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield collate([dataset[int(i)] for i in order[start:start + batch_size]], pad_to_multiple_of)


def num_batches(dataset, batch_size: int) -> int:
    return -(-len(dataset) // batch_size)


def padding_mask(lengths: np.ndarray, t: int) -> np.ndarray:
    """[B, T] float32: 1 for real tokens, 0 for padding."""
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
