"""How the beam search asks the model for next-token logits: one small interface, two ways.

A stepper runs the (left-padded) prompts once (``first_logits`` [prompts, V]), then each
``step(src, tokens)`` continues row ``src[r]`` of the previous step with ``tokens[r]`` and returns
the next-token logits [rows, V] as writable float32 numpy. The search
(``jt_lora.generation.beam``) never sees which one it has:

* :class:`CachedStepper` feeds one token per row against a KV cache (``generation.cache``): the
  host-side ``DecodeCache`` where the few-row kernels exist, the ``GatheredCache`` elsewhere;
* :class:`RecomputeStepper` reruns the whole sequence every step: the slow reference the caches
  must agree with (tests only).
"""
from __future__ import annotations

import numpy as np

from ..backend import jt
from ..nn.decode_block import FusedDecoder
from ..nn.kernels import batched_matmul, fast_path_available, small_rows_matmul, use_small_rows
from .cache import DecodeCache, GatheredCache

__all__ = ["make_stepper", "CachedStepper", "RecomputeStepper"]


def make_stepper(use_cache, model, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, padded: bool,
                 rows: int, steps: int):
    """The stepper for ``use_cache``: True the fastest cache for the backend, "gather" the plain
    gathered cache, False recomputation (the last two for tests).

    Args:
        ids, mask, pos: the left-padded prompts [prompts, T], their key mask (1 real, 0 padding)
            and position ids; ``padded``: some prompt is padded (else the mask is all ones).
        rows, steps: most rows a step feeds and most steps (a cache may preallocate them).
    """
    if not use_cache:
        return RecomputeStepper(model, ids, mask, pos)
    cache = GatheredCache if use_cache == "gather" or not fast_path_available() else DecodeCache
    return CachedStepper(cache, model, ids, mask, pos, padded, rows, steps)


class CachedStepper:
    """The prompts once, then one token per hypothesis per step against ``cache_cls``'s cache."""

    def __init__(self, cache_cls, model, ids, mask, pos, padded, rows, steps):
        self.model, self.head = model, lm_head(model)
        self.next_pos = pos[:, -1] + 1  # [rows] position of the next token
        hidden, presents, _ = model.transformer(
            jt.array(ids), position_ids=jt.array(pos) if padded else None,
            attention_mask=jt.array(mask) if padded else None)
        self.first_logits = last_logits(self.head, hidden)
        self.cache = cache_cls(presents, mask if padded else None, rows, steps)
        # a whole block per op where it applies (CPU, eval, merged adapters): nn.decode_block
        self.fused = FusedDecoder.for_model(model, rows) if cache_cls is DecodeCache else None

    def step(self, src: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        self.cache.advance(src)
        self.next_pos = self.next_pos[src]
        rows = len(src)
        if self.fused is not None:
            logits = self.fused.step(self.cache, tokens, self.next_pos)
            self.next_pos = self.next_pos + 1
            return logits
        hidden, _, _ = self.model.transformer(
            jt.array(tokens.astype(np.int32).reshape(rows, 1)), past=self.cache,
            position_ids=jt.array(self.next_pos.astype(np.int32).reshape(rows, 1)))
        self.next_pos = self.next_pos + 1
        return last_logits(self.head, hidden)


class RecomputeStepper:
    """Reruns every row's whole sequence (prompt and generated tokens) each step."""

    def __init__(self, model, ids, mask, pos):
        self.model, self.head, self.ids, self.mask, self.pos = model, lm_head(model), ids, mask, pos
        self.first_logits = self._run()

    def _run(self):
        hidden, _, _ = self.model.transformer(jt.array(self.ids), position_ids=jt.array(self.pos),
                                              attention_mask=jt.array(self.mask))
        return last_logits(self.head, hidden)

    def step(self, src, tokens):
        rows = len(src)
        self.ids = np.concatenate([self.ids[src], tokens.reshape(rows, 1).astype(np.int32)], axis=1)
        self.mask = np.concatenate([self.mask[src], np.ones((rows, 1), np.float32)], axis=1)
        self.pos = np.concatenate([self.pos[src], self.pos[src][:, -1:] + 1], axis=1)
        return self._run()


def lm_head(model):
    """The tied LM head ``wte`` [V, C]. ``nn.matmul_transpose`` (what ``model.logits`` uses) copies
    the transposed 50257x768 weight on every call; oneDNN's sgemm reads it transposed in place
    (``jt_lora.nn.kernels``), so no copy is made at all (it cost ~40 ms a step and 154 MB on GPT-2 S).
    An int8 head set by ``nn.quant.quantize_model`` (``--precision int8``) is taken instead, and the
    strips of a model packed by ``nn.decode_block.pack_model``."""
    head = getattr(model, "quantized_head", None) or getattr(model, "packed_head", None)
    return model.transformer.wte.weight if head is None else head


def last_logits(head, hidden) -> np.ndarray:
    """LM head on the last position only: [rows, T, C] -> float32 numpy [rows, V] (writable).
    A few rows (a decoding step) take ``small_rows_matmul``, which reads the head as oneDNN's left
    operand: ~13 vs ~29 ms for 10 rows on GPT-2 S."""
    last = hidden[:, -1]
    if not isinstance(head, jt.Var):   # an opt-in int8 head (nn.quant.QuantizedHead)
        logits = head(last).numpy()
    elif use_small_rows(last.shape[0], last, head):
        logits = small_rows_matmul(last, head, transpose_w=True).numpy()
    else:
        logits = batched_matmul(last.unsqueeze(0), head.unsqueeze(0), transpose_b=True)[0].numpy()
    return logits if logits.flags.writeable else logits.copy()
