"""Induction-head scores: prefix matching and copying, per head, on random token sequences.

Olsson et al. (2022) characterise an induction head by two behaviours on a repeated sequence
``... A B ... A``: at the second ``A`` it attends to ``B``, the token after the previous occurrence
(*prefix matching*), and its output raises the logit of the token it attends to (*copying*).
Bansal et al. (2023, OPT-66B) turned both into scores per head; we follow their set-up:

* Sequences: ``segment_len`` distinct random tokens (drawn without replacement from a pool that
  leaves out the ``exclude_ratio`` lowest and highest ids; GPT-2 ids are ordered roughly by BPE
  merge rank, so these are the most and least frequent tokens), after an optional BOS token.
* Prefix matching: the segment repeated ``repeats`` times; for every position whose token occurred
  before, the attention mass on the positions right after its earlier occurrences; averaged over
  those positions (0 = never, 1 = all attention there). Two variants (``definition=``):

  - ``llm-interpret`` (default), as ``prefix_matching_copying.py``: with BOS at position 0 and the
    segment (length ``L``) at positions ``1..R*L``, query ``j`` in ``L+1..R*L`` sums the attention on
    positions ``num*L + j%L + 1`` for ``num`` in ``range(j // L)``, and the sums are averaged over
    the ``(R-1)*L`` queries. For ``j % L != 0`` these are exactly the positions after the earlier
    occurrences of ``j``'s token; for the last token of a segment (``j = k*L``) they are
    ``1, L+1, ..., (k-1)*L+1``: the right ones *plus position 1*, the first segment token (which
    follows BOS, not an earlier occurrence). We copy this. Without a BOS (``bos_id=None``) the
    script has no counterpart (it always puts BOS first) and the default computes ``exact``:
    its extra position is "the token after BOS", which does not exist, and counting position 0
    instead would add the attention sink of the first position.
  - ``exact``: only the positions after earlier occurrences (``prefix_matching_targets``); differs
    from the default by the attention on position 1 at the rows ``j % L == 0``, ``j >= 2L``.
* Copying: one sequence of ``copy_len`` distinct random tokens (not repeated). At each position
  ``j >= 1`` a head's output vector is read through the unembedding (no final LayerNorm: a direct
  logit attribution); over the tokens in context (positions ``0..j``) the softmax probabilities are
  centred on their mean, negative values set to zero, and the score is the share of the token at the
  head's most-attended position; averaged over ``j``. Two variants (``definition=``):

  - ``llm-interpret`` (default), as Bansal et al.'s ``prefix_matching_copying.py``: every layer's
    heads are fed the LayerNorm of the *embeddings* (token + position; the script never passes the
    residual stream on from layer to layer), both for their attention pattern and their values; the
    output vector at ``j`` is the head's value *at position j* (not attention-weighted) through its
    rows of ``c_proj``, *with* ``c_proj``'s bias.
  - ``actual-output``: what the head really writes in the model: its attention-weighted values,
    computed on the model's own residual stream, through its rows of ``c_proj``, without the bias.

  The softmax normaliser over the vocabulary cancels in the ratio, so only the in-context logits are
  computed (the script's full-vocabulary softmax gives the same ratio up to rounding).
"""
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from ..backend import jt

__all__ = ["token_pool", "random_token_sequences", "repeat_sequences", "prefix_matching_targets",
           "head_outputs", "embedding_head_values", "prefix_matching_scores", "copying_scores",
           "induction_scores", "script_prefix_targets", "COPYING_DEFINITIONS", "PREFIX_MATCHING_DEFINITIONS"]

COPYING_DEFINITIONS = ("llm-interpret", "actual-output")
PREFIX_MATCHING_DEFINITIONS = ("llm-interpret", "exact")


def token_pool(vocab_size: int, exclude_ratio: float = 0.04, bos_id: Optional[int] = None) -> np.ndarray:
    """Token ids to draw from: ``[k, vocab_size - k)`` with ``k = int(exclude_ratio * vocab_size)``,
    without ``bos_id``."""
    if not 0.0 <= exclude_ratio < 0.5:
        raise ValueError(f"exclude_ratio must be in [0, 0.5), got {exclude_ratio}")
    k = int(exclude_ratio * vocab_size)
    pool = np.arange(k, vocab_size - k)
    return pool[pool != bos_id] if bos_id is not None else pool


def random_token_sequences(num: int, length: int, pool: np.ndarray, seed: int = 0) -> np.ndarray:
    """[num, length] int64, each row ``length`` distinct tokens of ``pool``."""
    if length > len(pool):
        raise ValueError(f"cannot draw {length} distinct tokens from a pool of {len(pool)} ids; "
                         "use shorter sequences or a smaller --exclude_ratio")
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(pool, size=length, replace=False) for _ in range(num)]).astype(np.int64)


def repeat_sequences(segments: np.ndarray, repeats: int, bos_id: Optional[int] = None) -> np.ndarray:
    """[N, S] -> [N, (1 +) S * repeats]: each row repeated, after ``bos_id`` if given."""
    out = np.tile(segments, (1, repeats))
    if bos_id is not None:
        out = np.concatenate([np.full((len(out), 1), bos_id, dtype=out.dtype), out], axis=1)
    return out


def prefix_matching_targets(tokens: np.ndarray) -> np.ndarray:
    """[N, T] -> bool [N, T, T]: ``[n, j, k]`` is True when ``k <= j`` and the token before ``k``
    equals the token at ``j`` (``k`` follows an earlier occurrence of ``j``'s token)."""
    n, t = tokens.shape
    same = tokens[:, :, None] == tokens[:, None, :]          # [N, j, k-1]: tokens[j] == tokens[k-1]
    targets = np.zeros((n, t, t), dtype=bool)
    targets[:, :, 1:] = same[:, :, :-1]
    return targets & np.tril(np.ones((t, t), dtype=bool))[None]


def script_prefix_targets(length: int, segment_len: int) -> np.ndarray:
    """bool [T, T] for ``T = 1 + length``: the positions ``prefix_matching_copying.py`` sums at each
    query of ``[BOS] + segment * R`` (``length = R * segment_len``), from its loop
    ``for j in range(L+1, R*L+1): for num in range(j//L): attn[j][num*L + j%L + 1]``. Rows before
    ``L+1`` are empty. For ``j % L == 0`` this includes position 1 (see the module doc)."""
    seg = segment_len
    if seg < 1 or length % seg or length // seg < 2:
        raise ValueError(f"the script's layout needs R >= 2 whole segments of {seg} tokens, got {length} tokens")
    targets = np.zeros((length + 1, length + 1), dtype=bool)
    for j in range(seg + 1, length + 1):
        rows = np.arange(j // seg) * seg + j % seg + 1
        targets[j, rows] = True
    return targets


def _segment_len(tokens: np.ndarray, bos_id: int, segment_len: Optional[int]) -> int:
    """Check ``tokens`` is ``[bos_id] + segment * R`` (R >= 2) and return the segment length
    (inferred from the first repeat of ``tokens[:, 1]`` when not given)."""
    n, t = tokens.shape
    if not (tokens[:, 0] == bos_id).all():
        raise ValueError(f"llm-interpret prefix matching with bos_id={bos_id} needs every sequence to start with it")
    body = tokens[:, 1:]
    if segment_len is None:
        again = np.nonzero((body[:, 1:] == body[:, :1]).all(0))[0]
        segment_len = int(again[0]) + 1 if len(again) else t
    seg = segment_len
    if seg < 1 or (t - 1) % seg or (t - 1) // seg < 2 or \
            not (body == np.tile(body[:, :seg], (1, (t - 1) // seg))).all():
        raise ValueError(f"llm-interpret prefix matching needs [BOS] + a segment of {seg} tokens repeated "
                         f">= 2 times; use definition='exact' for other sequences")
    return seg


def _embedded(model, input_ids: np.ndarray):
    """(token + position embeddings [B, T, C], a plain causal cache for one full pass, the per-head
    one-hot [H, 1, 1, C]): what both ways of reading a head start from."""
    from ..models.kv_cache import PlainCache

    tr = model.transformer
    b, t = input_ids.shape
    ids = jt.array(input_ids.astype(np.int32))
    x = tr.wte(ids) + tr.wpe(jt.arange(t).int32().reshape(1, t).broadcast((b, t)))
    cache = PlainCache()                 # no past: plain causal attention
    cache.start(t, None, inspect=True)
    return x, cache, _head_one_hot(model.config.n_head, model.config.n_embd)


def head_outputs(model, input_ids: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Per layer: attention probabilities [B, H, T, T] and each head's write to the residual
    stream [B, H, T, C] (its attention-weighted values through its rows of ``c_proj``, without the
    bias). The residual stream itself comes from the model's own blocks, unmasked."""
    b, t = input_ids.shape
    n_head, width = model.config.n_head, model.config.n_embd
    with jt.no_grad():
        x, cache, one_hot = _embedded(model, input_ids)
        for i, block in enumerate(model.transformer.h):
            attn = block.attn
            v = attn._split(attn.c_attn(block.ln_1(x))[:, :, 2 * width:3 * width])   # [B, H, T, D]
            x_next, probs = block(x, cache, i, None, None, True)
            mixed = jt.matmul(probs, v).transpose(0, 2, 1, 3).reshape(1, b, t, width)  # [1, B, T, C]
            per_head = attn.c_proj((mixed * one_hot).reshape(n_head * b, t, width))
            per_head = per_head - attn.c_proj(jt.zeros((1, 1, width), dtype="float32"))
            yield probs.numpy(), per_head.reshape(n_head, b, t, width).transpose(1, 0, 2, 3).numpy()
            x = x_next


def _head_one_hot(n_head: int, width: int):
    """[H, 1, 1, C]: row h keeps head h's D features of the concatenated [H*D] context."""
    d = width // n_head
    one_hot = np.zeros((n_head, 1, 1, width), dtype=np.float32)
    for h in range(n_head):
        one_hot[h, ..., h * d:(h + 1) * d] = 1.0
    return jt.array(one_hot)


def embedding_head_values(model, input_ids: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Per layer, as llm-interpret's copying score reads a head: attention probabilities
    [B, H, T, T] and output vectors [B, H, T, C], both computed from ``ln_1`` of the token +
    position embeddings (not the residual stream); the output at ``j`` is the head's value at ``j``
    through its rows of ``c_proj``, bias included."""
    b, t = input_ids.shape
    n_head, width = model.config.n_head, model.config.n_embd
    with jt.no_grad():
        x, cache, one_hot = _embedded(model, input_ids)
        for i, block in enumerate(model.transformer.h):
            attn = block.attn
            hs = block.ln_1(x)
            _, probs = attn(hs, cache, i, None, True)                                  # [B, H, T, T]
            v = attn.c_attn(hs)[:, :, 2 * width:3 * width].reshape(1, b, t, width)    # [1, B, T, C]
            per_head = attn.c_proj((v * one_hot).reshape(n_head * b, t, width))       # bias included
            yield probs.numpy(), per_head.reshape(n_head, b, t, width).transpose(1, 0, 2, 3).numpy()


def prefix_matching_scores(model, tokens: np.ndarray, definition: str = "llm-interpret",
                           bos_id: Optional[int] = None, segment_len: Optional[int] = None) -> np.ndarray:
    """[N, T] repeated sequences -> [N, L, H]: per sequence, the mean over positions with an
    earlier occurrence of their token of the attention on the positions following it.

    ``definition="llm-interpret"`` (default) with ``bos_id`` given: the script's positions
    (``script_prefix_targets``; ``tokens`` must be ``[bos_id] + segment * R``, ``segment_len``
    inferred when None), which add position 1 at the rows ``j % L == 0``. With ``bos_id=None`` the
    default equals ``"exact"``: only the positions after earlier occurrences (module doc)."""
    from .attention import batch_attention

    if definition not in PREFIX_MATCHING_DEFINITIONS:
        raise ValueError(f"prefix-matching definition must be one of {list(PREFIX_MATCHING_DEFINITIONS)}, "
                         f"got {definition!r}")
    if definition == "llm-interpret" and bos_id is not None:
        seg = _segment_len(tokens, bos_id, segment_len)
        targets = np.broadcast_to(script_prefix_targets(tokens.shape[1] - 1, seg), (len(tokens),) + (tokens.shape[1],) * 2)
        scored = np.zeros(tokens.shape, dtype=bool)
        scored[:, seg + 1:] = True                            # the script's c = (R-1)L queries
    else:
        targets = prefix_matching_targets(tokens)             # [N, T, T]
        scored = targets.any(-1)                              # [N, T] rows with a target
    if not scored.any(1).all():
        raise ValueError("a sequence without repeated tokens has no prefix-matching positions")
    lengths = np.full(len(tokens), tokens.shape[1])
    scores = []
    for probs in batch_attention(model, tokens, lengths):       # [N, H, T, T]
        mass = (probs * targets[:, None]).sum(-1)              # [N, H, T]
        scores.append((mass * scored[:, None]).sum(-1) / scored.sum(-1)[:, None])
    return np.stack(scores, axis=1)


def copying_scores(model, tokens: np.ndarray, definition: str = "llm-interpret") -> np.ndarray:
    """[N, T] sequences -> [N, L, H]: per sequence, the mean over positions ``j >= 1`` of the
    most-attended token's share of the raised in-context probabilities (see the module doc for the
    two ``definition`` s)."""
    n, t = tokens.shape
    if t < 2:
        raise ValueError("copying needs sequences of at least 2 tokens")
    if definition not in COPYING_DEFINITIONS:
        raise ValueError(f"copying definition must be one of {list(COPYING_DEFINITIONS)}, got {definition!r}")
    heads = embedding_head_values if definition == "llm-interpret" else head_outputs
    embed = model.transformer.wte.weight.numpy()[tokens].astype(np.float64)   # [N, T(k), C]
    allowed = np.tril(np.ones((t, t), dtype=bool))[None, None]  # [1, 1, j, k]: k attendable from j
    scores = []
    for probs, outs in heads(model, tokens):                  # [N, H, T, T], [N, H, T, C]
        logits = np.einsum("nhjc,nkc->nhjk", outs.astype(np.float64), embed)   # in-context logits
        logits = np.where(allowed, logits, -np.inf)
        e = np.exp(logits - logits.max(-1, keepdims=True))    # softmax up to a per-row factor
        mean = e.sum(-1, keepdims=True) / np.arange(1, t + 1)[None, None, :, None]
        raised = np.where(allowed, np.maximum(e - mean, 0.0), 0.0)
        top = np.take_along_axis(raised, probs.argmax(-1)[..., None], -1)[..., 0]   # [N, H, T]
        total = raised.sum(-1)
        ratio = np.where(total > 0, top / np.where(total > 0, total, 1.0), 0.0)
        scores.append(ratio[:, :, 1:].mean(-1))
    return np.stack(scores, axis=1)


def induction_scores(model, num_sequences: int = 20, segment_len: int = 25, repeats: int = 4,
                     copy_len: Optional[int] = None, exclude_ratio: float = 0.04,
                     bos_id: Optional[int] = None, seed: int = 0, batch_size: int = 4,
                     copying: str = "llm-interpret", prefix_matching: str = "llm-interpret",
                     progress=None) -> Dict[str, np.ndarray]:
    """Prefix-matching and copying scores of every head of ``model``.

    Args:
        num_sequences: random sequences per score.
        segment_len: distinct tokens per segment (prefix matching repeats it ``repeats`` times).
        copy_len: length of the unrepeated copying sequences (default ``segment_len * repeats``).
        exclude_ratio: share of the lowest and of the highest token ids left out of the pool.
        bos_id: token put first in every sequence (GPT-2: 50256), or None.
        copying: ``"llm-interpret"`` (the script's definition) or ``"actual-output"``.
        prefix_matching: ``"llm-interpret"`` (the script's positions, including position 1 at the
            last token of each repeat when there is a BOS; without one, as ``"exact"``) or ``"exact"``.
        progress: an optional tqdm bar advanced once per batch.

    Returns:
        ``prefix_matching`` and ``copying``: [N, L, H] per-sequence scores.
    """
    cfg = model.config
    copy_len = segment_len * repeats if copy_len is None else copy_len
    if prefix_matching not in PREFIX_MATCHING_DEFINITIONS:
        raise ValueError(f"prefix-matching definition must be one of {list(PREFIX_MATCHING_DEFINITIONS)}, "
                         f"got {prefix_matching!r}")
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 (prefix matching needs a repeat), got {repeats}")
    extra = 0 if bos_id is None else 1
    longest = extra + max(segment_len * repeats, copy_len)
    if longest > cfg.n_positions:
        raise ValueError(f"sequences of {longest} tokens exceed the model's n_positions={cfg.n_positions}")
    if bos_id is not None and not 0 <= bos_id < cfg.vocab_size:
        raise ValueError(f"bos_id {bos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    pool = token_pool(cfg.vocab_size, exclude_ratio, bos_id)
    repeated = repeat_sequences(random_token_sequences(num_sequences, segment_len, pool, seed), repeats, bos_id)
    plain = repeat_sequences(random_token_sequences(num_sequences, copy_len, pool, seed + 1), 1, bos_id)
    prefix, copy_scores = [], []
    for start in range(0, num_sequences, batch_size):
        prefix.append(prefix_matching_scores(model, repeated[start:start + batch_size], prefix_matching,
                                             bos_id, segment_len))
        copy_scores.append(copying_scores(model, plain[start:start + batch_size], copying))
        if progress is not None:
            progress.update(1)
    return {"prefix_matching": np.concatenate(prefix), "copying": np.concatenate(copy_scores),
            "prefix_tokens": repeated, "copying_tokens": plain}
