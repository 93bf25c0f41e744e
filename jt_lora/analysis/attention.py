"""Attention probabilities averaged over examples (padding excluded), per layer and head.

For each layer, query position ``i`` and key position ``j``::

    average[l, i, j] = sum over examples n with i, j < len_n of mean_h probs_n[l, h, i, j]
                       / #{n : i, j < len_n}

so a position counts only in the examples that reach it, and padded keys never receive
attention (they are masked in the forward pass). This is the "average attention map" InA compares
across inhibition levels; ``heads`` keeps the same average without the mean over heads.
"""
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from ..backend import jt
from .models import padding_mask

__all__ = ["AttentionMaps", "attention_maps", "batch_attention"]


@dataclass
class AttentionMaps:
    """Averages over examples.

    Attributes:
        average: [L, T, T] mean over heads and examples.
        count: [T, T] how many examples have both positions (the divisor of each entry).
        heads: [L, H, T, T] mean over examples per head, or None when not asked for.
        entropy: [L] mean entropy (nats) of a real query row's attention, over heads and rows.
        num_examples: examples averaged.
    """

    average: np.ndarray
    count: np.ndarray
    heads: Optional[np.ndarray]
    entropy: np.ndarray
    num_examples: int


def batch_attention(model, input_ids: np.ndarray, lengths: np.ndarray):
    """Per-layer attention probabilities of a right-padded batch, as numpy [B, H, T, T] each."""
    t = input_ids.shape[1]
    mask = padding_mask(lengths, t)
    with jt.no_grad():
        _, _, attentions = model(jt.array(input_ids.astype(np.int32)), attention_mask=jt.array(mask),
                                 output_attentions=True)
        return [a.numpy() for a in attentions]


def attention_maps(model, batches: Iterable[dict], max_len: int, per_head: bool = False,
                   progress=None) -> AttentionMaps:
    """Average attention maps of ``model`` over ``batches`` (``jt_lora.data.collate`` batches).

    Args:
        model: a ``GPT2LMModel`` in eval mode.
        batches: right-padded dicts with ``input`` [B, T] and ``length`` [B].
        max_len: size of the maps (at least the longest example).
        per_head: also keep the per-head average (memory L*H*T*T float64).
        progress: an optional tqdm bar, advanced by one per batch.
    """
    cfg = model.config
    n_layer, n_head = cfg.n_layer, cfg.n_head
    total = np.zeros((n_layer, max_len, max_len))
    heads = np.zeros((n_layer, n_head, max_len, max_len)) if per_head else None
    count = np.zeros((max_len, max_len))
    entropy_sum, rows, examples = np.zeros(n_layer), 0, 0
    for batch in batches:
        ids, lengths = batch["input"], batch["length"]
        if lengths.max() > max_len:
            raise ValueError(f"an example of {lengths.max()} tokens is longer than max_len={max_len}")
        ids = ids[:, :max_len]   # only padding lies beyond max_len (pad_to_multiple_of)
        b, t = ids.shape
        valid = padding_mask(lengths, t)                    # [B, T]
        pairs = valid[:, :, None] * valid[:, None, :]       # [B, Tq, Tk]: both positions real
        count[:t, :t] += pairs.sum(0)
        rows += int(valid.sum()) * n_head
        examples += b
        for layer, probs in enumerate(batch_attention(model, ids, lengths)):  # [B, H, T, T]
            total[layer, :t, :t] += np.einsum("bhij,bij->ij", probs, pairs, dtype=np.float64) / n_head
            if heads is not None:
                heads[layer, :, :t, :t] += np.einsum("bhij,bij->hij", probs, pairs, dtype=np.float64)
            plogp = np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-30)), 0.0)
            entropy_sum[layer] -= (plogp.sum(-1) * valid[:, None, :]).sum()
        if progress is not None:
            progress.update(1)
    if examples == 0:
        raise ValueError("no examples to average")
    divisor = np.maximum(count, 1.0)
    return AttentionMaps(
        average=(total / divisor).astype(np.float32),
        count=count.astype(np.int64),
        heads=None if heads is None else (heads / divisor).astype(np.float32),
        entropy=entropy_sum / rows,
        num_examples=examples,
    )
