"""Which heads and feed-forward blocks the LM loss depends on.

Head importance, two definitions (``definition=``), both built from the token term
``s[b, t, l, h] = sum_d g * c`` where ``c`` is head ``h``'s slice of layer ``l``'s attention context
(the per-head outputs before ``c_proj``) and ``g = dL/dc``, ``L`` each batch's mean loss over its
loss tokens:

* ``llm-interpret`` (default): Bansal et al. (2023), amazon-science/llm-interpret
  ``calculate_importance``: ``sum over batches, examples, positions of |s|`` (absolute value per
  token); layers ``0 .. L-2`` divided by the total over examples of (real sequence length - 1),
  i.e. context + completion tokens without padding, minus one; the last layer divided by the number
  of loss (label) tokens, as only their positions get a gradient there. Padding positions carry no
  gradient (padded keys get zero attention), so counting them would change nothing. No per-layer
  normalisation. The loss is a mean per batch, so the scores depend on how examples are batched, as
  in the reference (``batch_size=1``: a sum of per-example terms).
* ``michel``: Michel et al. (2019), "Are Sixteen Heads Really Better than One?": ``|dL/d xi[l, h]|``
  for a mask ``xi`` on every head (= ``|sum over tokens of s|``), averaged over batches weighted by
  their loss tokens, then each layer's row divided by its L2 norm.

The feed-forward knock-out sets the model's ``ffn_mask[l] = 0`` (the block's output is dropped, the
residual stream passes through) and reports the dataset loss minus the intact model's loss.
"""
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Optional

import numpy as np

from ..backend import jt
from ..models.gpt2 import token_losses
from .models import padding_mask

__all__ = ["head_importance", "dataset_loss", "ffn_knockout", "loss_weights", "DEFINITIONS"]

DEFINITIONS = ("llm-interpret", "michel")


def loss_weights(batch: dict, tokens: str = "completion") -> np.ndarray:
    """[B, T] weights of the loss: the reference's completion mask, or every real next-token
    prediction (``tokens="all"``: positions 0 .. len-2)."""
    if tokens == "completion":
        return batch["mask"].astype(np.float32)
    if tokens == "all":
        return padding_mask(np.asarray(batch["length"]) - 1, batch["input"].shape[1])
    raise ValueError(f"tokens must be 'completion' or 'all', got {tokens!r}")


def _forward_loss(model, batch, weights, head_mask=None, ffn_mask=None):
    """Summed token loss (a jt scalar) of one batch; the caller divides by the token count.

    The LM head (``n_embd x vocab``) runs only at positions with a loss weight: on short examples it
    is the costliest part of the forward pass, and the FFN knock-out repeats it ``n_layer`` times.
    """
    b, t = batch["input"].shape
    ids = jt.array(batch["input"].astype(np.int32))
    mask = jt.array(padding_mask(batch["length"], t))
    hidden, _, _ = model.transformer(ids, attention_mask=mask, head_mask=head_mask, ffn_mask=ffn_mask)
    flat = weights.reshape(-1)
    where = np.nonzero(flat)[0].astype(np.int32)
    logits = model.logits(hidden.reshape(b * t, hidden.shape[-1])[jt.array(where)])      # [N, V]
    losses = token_losses(logits, jt.array(batch["target"].reshape(-1)[where].astype(np.int32)))
    return (losses * jt.array(flat[where])).sum()


class _GatedProjection(jt.Module):
    """Stands in for an attention block's ``c_proj``: multiplies the context (the per-head
    attention outputs, concatenated) by a gate of ones ``[B, T, H, 1]`` before projecting it.

    The gate changes nothing in the forward pass; its gradient is, per example, position and
    head, ``sum_d dL/dc * c`` over the head's slice ``c`` of the context: the token-level term
    both importance definitions are built from.
    """

    def __init__(self, proj, n_head: int):
        self._proj, self._n_head, self._gate = proj, n_head, None

    def execute(self, x):
        b, t, c = x.shape
        gated = (x.reshape(b, t, self._n_head, c // self._n_head) * self._gate).reshape(b, t, c)
        return self._proj(gated)


@contextmanager
def _context_gates(model):
    """Every block's ``attn.c_proj`` wrapped by a :class:`_GatedProjection`, restored on exit."""
    blocks = list(model.transformer.h)
    originals = [block.attn.c_proj for block in blocks]
    wrappers = [_GatedProjection(proj, model.config.n_head) for proj in originals]
    try:
        for block, wrapper in zip(blocks, wrappers):
            block.attn.c_proj = wrapper
        yield wrappers
    finally:
        for block, proj in zip(blocks, originals):
            block.attn.c_proj = proj


def head_importance(model, batches: Iterable[dict], tokens: str = "completion",
                    definition: str = "llm-interpret", progress=None) -> Dict[str, object]:
    """Head importance of ``model`` over ``batches``, by either definition (see the module doc).

    Both come from one pass per batch: with ``c`` a head's slice of the attention context and
    ``g = dL_batch/dc`` (``L_batch`` the batch's mean token loss), the token term is
    ``s = sum_d g * c``.

    * ``llm-interpret``: ``sum |s|`` over batches, examples and positions; layers ``0 .. L-2``
      divided by the total of (real length - 1) over the examples, the last layer by the number of
      loss tokens. No per-layer normalisation.
    * ``michel``: ``|sum s|`` per batch (= ``|dL_batch/d head_mask|``), weighted by the batch's
      loss tokens and divided by their total, then each layer's row divided by its L2 norm.

    Returns:
        ``importance`` [L, H] (the chosen definition's scores), ``raw`` [L, H] (before the
        per-layer normalisation; equal to ``importance`` for llm-interpret), ``definition``,
        ``loss`` (the intact model's mean token loss), ``tokens`` (loss tokens) and
        ``positions`` (total of real length - 1).
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"definition must be one of {list(DEFINITIONS)}, got {definition!r}")
    cfg = model.config
    per_token = np.zeros((cfg.n_layer, cfg.n_head))     # llm-interpret: sum of |s|
    per_batch = np.zeros((cfg.n_layer, cfg.n_head))     # michel: sum of |sum s| * batch tokens
    loss_sum, n_tokens, n_positions = 0.0, 0.0, 0.0
    with _context_gates(model) as gates:
        for batch in batches:
            weights = loss_weights(batch, tokens)
            n = float(weights.sum())
            if n > 0:
                b, t = batch["input"].shape
                for gate in gates:
                    gate._gate = jt.ones((b, t, cfg.n_head, 1), dtype="float32")
                total = _forward_loss(model, batch, weights)
                grads = jt.grad(total / n, [gate._gate for gate in gates])
                for layer, grad in enumerate(grads):
                    s = grad.numpy().astype(np.float64)[..., 0]           # [B, T, H]
                    per_token[layer] += np.abs(s).sum((0, 1))
                    per_batch[layer] += np.abs(s.sum((0, 1))) * n
                loss_sum += float(total.item())
                n_tokens += n
                n_positions += float(np.maximum(np.asarray(batch["length"]) - 1, 0).sum())
            if progress is not None:
                progress.update(1)
        for gate in gates:
            gate._gate = None
    if n_tokens == 0:
        raise ValueError("no loss tokens in the data (every completion mask is empty)")
    if definition == "llm-interpret":
        raw = per_token.copy()
        raw[:-1] /= n_positions
        raw[-1] /= n_tokens
        importance = raw
    else:
        raw = per_batch / n_tokens
        norm = np.linalg.norm(raw, axis=1, keepdims=True)
        importance = raw / np.where(norm > 0, norm, 1.0)
    return {"importance": importance, "raw": raw, "definition": definition, "loss": loss_sum / n_tokens,
            "tokens": n_tokens, "positions": n_positions}


def dataset_loss(model, batches: Iterable[dict], tokens: str = "completion", head_mask=None,
                 ffn_mask=None, progress=None) -> float:
    """Mean token loss over ``batches`` with optional head / FFN masks (numpy or jt arrays)."""
    if head_mask is not None and not isinstance(head_mask, jt.Var):
        head_mask = jt.array(np.asarray(head_mask, dtype=np.float32))
    if ffn_mask is not None and not isinstance(ffn_mask, jt.Var):
        ffn_mask = jt.array(np.asarray(ffn_mask, dtype=np.float32))
    loss_sum, n_tokens = 0.0, 0.0
    with jt.no_grad():
        for batch in batches:
            weights = loss_weights(batch, tokens)
            if weights.sum() > 0:
                loss_sum += float(_forward_loss(model, batch, weights, head_mask, ffn_mask).item())
                n_tokens += float(weights.sum())
            if progress is not None:
                progress.update(1)
    if n_tokens == 0:
        raise ValueError("no loss tokens in the data (every completion mask is empty)")
    return loss_sum / n_tokens


def ffn_knockout(model, make_batches: Callable[[], Iterable[dict]], tokens: str = "completion",
                 base_loss: Optional[float] = None, progress=None) -> Dict[str, object]:
    """Loss with each layer's feed-forward block removed, one layer at a time.

    Args:
        make_batches: returns a fresh iterable of batches (the data is read once per layer).
        base_loss: the intact model's loss if already known (e.g. from ``head_importance``).

    Returns:
        ``base_loss``; ``loss`` [L] with layer l's FFN output zeroed; ``delta`` [L] = loss - base.
    """
    n_layer = model.config.n_layer
    if base_loss is None:
        base_loss = dataset_loss(model, make_batches(), tokens, progress=progress)
    losses = []
    for layer in range(n_layer):
        mask = np.ones(n_layer, dtype=np.float32)
        mask[layer] = 0.0
        losses.append(dataset_loss(model, make_batches(), tokens, ffn_mask=mask, progress=progress))
    losses = np.array(losses)
    return {"base_loss": float(base_loss), "loss": losses, "delta": losses - base_loss}
