"""The one interface through which GPT-2's attention reads and stores keys and values.

The model never asks what kind of cache it was given (nanoGPT's model knows nothing of
generation): ``GPT2Model.execute`` wraps a ``past`` that is not a :class:`KVCache` (``None`` or the
per-layer ``(k, v)`` tuples a previous call returned) in a :class:`PlainCache`, then calls

* ``cache.length``: positions each row already holds (default position ids start there);
* ``cache.start(t, attention_mask, inspect)`` once, before the first layer;
* ``cache.attend(layer, qkv, dense)`` in every layer, with the layer's fused projection ``qkv``
  ``[B, T, 3C]``; it returns ``(a [B, T, C], probs or None)``. ``dense(qkv, past_kv, bias_mask)``
  is the model's own attention (split heads, prepend ``past_kv``, masked softmax, head mask,
  dropout): a cache that keeps plain tensors calls it with its keys and values and keeps the
  ``(k, v)`` it returns; a cache with its own kernel (``generation.cache.DecodeCache``) does not;
* ``cache.finish()`` after the last layer: the forward's second result.

The beam search's caches (``jt_lora.generation.cache``) implement the same four members.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..backend import jt

__all__ = ["KVCache", "PlainCache", "causal_mask"]


def causal_mask(t: int, t_past: int, attention_mask=None):
    """(keep, add) so that ``w*keep + add`` equals the reference's ``w*b - 1e10*(1-b)``.

    Args:
        t: query positions of this call; ``t_past``: cached key positions before them.
        attention_mask: ``[B, t_past + t]``, 1 for real keys, 0 for padding (None: all real).
    """
    total = t_past + t
    keep = np.tril(np.ones((total, total), dtype="float32"))[t_past:total, :total]  # [T, T_total]
    keep = jt.array(keep).reshape(1, 1, t, total)
    if attention_mask is not None:
        keep = keep * attention_mask.float32().reshape(attention_mask.shape[0], 1, 1, total)
    return keep, (keep - 1.0) * 1e10


class KVCache:
    """What the model calls (see the module docstring); subclasses implement every member."""

    @property
    def length(self) -> int:
        raise NotImplementedError

    def start(self, t: int, attention_mask, inspect: bool) -> None:
        """Prepare a forward of ``t`` tokens per row. ``inspect``: head masks or attention
        probabilities are asked for (a fused cache may refuse them)."""
        raise NotImplementedError

    def attend(self, layer: int, qkv, dense: Callable):
        raise NotImplementedError

    def finish(self):
        raise NotImplementedError


class PlainCache(KVCache):
    """Per-layer ``(k, v)`` tensors ``[B, H, T, D]``: the presents a forward returns and takes back.

    Args:
        past: per-layer ``(k, v)`` from a previous call, or None (a first pass).
    """

    def __init__(self, past: Optional[Sequence[Tuple]] = None):
        self.past: Optional[List[Tuple]] = None if past is None else list(past)
        self.presents: List[Tuple] = []
        self.bias_mask = None

    @property
    def length(self) -> int:
        return 0 if not self.past else self.past[0][0].shape[2]

    def start(self, t: int, attention_mask, inspect: bool) -> None:
        self.presents = []
        self.bias_mask = causal_mask(t, self.length, attention_mask)

    def attend(self, layer: int, qkv, dense: Callable):
        a, kv, probs = dense(qkv, None if self.past is None else self.past[layer], self.bias_mask)
        self.presents.append(kv)   # layers come in order
        return a, probs

    def finish(self):
        return self.presents
