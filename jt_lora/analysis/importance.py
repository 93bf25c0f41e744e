"""Which heads and feed-forward blocks the LM loss depends on.

Head importance follows Michel et al. (2019), "Are Sixteen Heads Really Better than One?": every
head's attention probabilities are multiplied by a mask variable ``xi[l, h] = 1`` (the model's
``head_mask`` input), and the importance of a head is the expected absolute gradient of the loss
with respect to it::

    I[l, h] = E |dL/d xi[l, h]|    (at xi = 1, i.e. the unchanged model)

Expectation over batches, weighted by each batch's loss tokens; with ``batch_size=1`` it is the
paper's per-example expectation. ``normalized`` divides each layer's row by its L2 norm, as the
paper does before comparing heads across layers.

The feed-forward knock-out sets the model's ``ffn_mask[l] = 0`` (the block's output is dropped, the
residual stream passes through) and reports the dataset loss minus the intact model's loss.
"""
from typing import Callable, Dict, Iterable, Optional

import numpy as np

from ..backend import jt
from ..model import token_losses
from .models import padding_mask

__all__ = ["head_importance", "dataset_loss", "ffn_knockout", "loss_weights"]


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


def head_importance(model, batches: Iterable[dict], tokens: str = "completion",
                    progress=None) -> Dict[str, np.ndarray]:
    """Michel et al. head importance of ``model`` over ``batches``.

    Returns:
        ``raw`` [L, H]: token-weighted mean over batches of ``|dL_batch/d head_mask|``, where
        ``L_batch`` is the batch's mean token loss; ``normalized`` [L, H]: each layer's row over
        its L2 norm; ``loss``: the intact model's mean token loss; ``tokens``: tokens counted.
    """
    cfg = model.config
    acc = np.zeros((cfg.n_layer, cfg.n_head))
    loss_sum, n_tokens = 0.0, 0.0
    for batch in batches:
        weights = loss_weights(batch, tokens)
        n = float(weights.sum())
        if n == 0:
            if progress is not None:
                progress.update(1)
            continue
        head_mask = jt.ones((cfg.n_layer, cfg.n_head), dtype="float32")
        total = _forward_loss(model, batch, weights, head_mask=head_mask)
        grad = jt.grad(total / n, head_mask)   # d(mean token loss of the batch)/d mask
        acc += np.abs(grad.numpy().astype(np.float64)) * n
        loss_sum += float(total.item())
        n_tokens += n
        if progress is not None:
            progress.update(1)
    if n_tokens == 0:
        raise ValueError("no loss tokens in the data (every completion mask is empty)")
    raw = acc / n_tokens
    norm = np.linalg.norm(raw, axis=1, keepdims=True)
    normalized = raw / np.where(norm > 0, norm, 1.0)
    return {"raw": raw, "normalized": normalized, "loss": loss_sum / n_tokens, "tokens": n_tokens}


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
