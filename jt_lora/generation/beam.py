"""Beam-search generation with the semantics of microsoft/LoRA's ``examples/NLG/src/gpt2_beam.py``.

The search is the reference's, step for step:

* step ``i`` (``i`` tokens generated so far) post-processes the next-token logits of every
  hypothesis: repetition penalty on the tokens it generated (CTRL: a negative logit is multiplied,
  a positive one divided), eos ids banned while ``i < min_length``, and no token that would repeat
  an n-gram of its own generated tokens (the prompt takes no part in either);
* a hypothesis's score is the sum of its token log-probabilities; all ``beam x vocab`` extensions
  of the live hypotheses compete and the best ``beam`` survive (at step 0 only the prompt's);
* a survivor that ends in an eos id is a finished candidate scored ``score / length**length_penalty``
  (length counts the eos) and leaves the beam (its score becomes -inf); after the last step every
  remaining hypothesis is a candidate too; the best candidate wins (the first one on ties).

What differs is how it is computed, never the result:

* prompts of different lengths share a batch by LEFT padding with an attention mask and per-row
  position ids (the reference pads on the right and writes the cache at ``len_past``);
* the prompt runs once per prompt rather than once per beam, and only the last position goes
  through the LM head; then each step feeds one token per hypothesis against a KV cache
  (``generation.steppers``, ``generation.cache``);
* the search of a prompt stops as soon as no live hypothesis can beat its best candidate any more
  (scores only fall, so the bound is exact) and its rows leave the batch; the reference always
  runs ``eval_len`` steps;
* log-probabilities are ``log_softmax`` rather than ``log(softmax)`` (equal up to rounding, and
  finite where the probability underflows).

The bookkeeping (penalties, top-k, candidates) runs in numpy on the last-position logits: on a CPU
backend fetching them costs little (one host sync per step, by design), and Jittor compiles nothing
new as the cache grows (its kernels take shapes at run time).

The command line (``python -m jt_lora.generate``) is ``jt_lora.generate``; its files are
``generation.predictions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..backend import jt
from .steppers import make_stepper

__all__ = ["BeamSettings", "beam_search", "beam_search_batch", "length_order", "progress_bar"]

NEG_INF = np.float32(-np.inf)


@dataclass(frozen=True)
class BeamSettings:
    """Search settings, named as the reference's flags.

    Args:
        beam: hypotheses kept per prompt; 1 is greedy decoding.
        max_new_tokens: tokens generated per prompt at most (the reference's ``eval_len``).
        min_length: eos ids are banned while fewer tokens than this have been generated.
        length_penalty: a finished hypothesis of ``n`` tokens scores ``sum(log p) / n**length_penalty``.
        no_repeat_ngram_size: no n-gram of this size occurs twice among the generated tokens (0: off).
        repetition_penalty: CTRL's penalty on tokens generated before (1.0: off).
        eos_token_ids: ids that end a hypothesis; empty: only ``max_new_tokens`` ends it.
    """

    beam: int = 10
    max_new_tokens: int = 64
    min_length: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    eos_token_ids: Tuple[int, ...] = (50256,)

    def __post_init__(self):
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        if self.beam < 1 or self.max_new_tokens < 1:
            raise ValueError(f"beam and max_new_tokens must be >= 1, got {self.beam}, {self.max_new_tokens}")
        if self.min_length < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"min_length and no_repeat_ngram_size must be >= 0, got "
                             f"{self.min_length}, {self.no_repeat_ngram_size}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")




# ----------------------------------------------------------------------------------------------
# The reference's post-processing of next-token logits, vectorised over hypotheses.

def _postprocess(logits: np.ndarray, history: np.ndarray, step: int, s: BeamSettings) -> None:
    """In place, in the reference's order: repetition penalty, min_length, no-repeat n-gram.

    Args:
        logits: [rows, V] next-token logits.
        history: [rows, step] the tokens each hypothesis generated (not the prompt).
    """
    rows, length = history.shape
    if s.repetition_penalty != 1.0 and length:
        r = np.repeat(np.arange(rows), length)
        t = history.reshape(-1)
        v = logits[r, t]
        # repeated (r, t) pairs write the same value: each token is penalised once, as a set
        logits[r, t] = np.where(v < 0, v * s.repetition_penalty, v / s.repetition_penalty)
    if s.eos_token_ids and step < s.min_length:
        logits[:, list(s.eos_token_ids)] = NEG_INF
    n = s.no_repeat_ngram_size
    if n > 0 and length >= n:
        windows = np.lib.stride_tricks.sliding_window_view(history, n, axis=1)  # [rows, W, n]
        prefix = history[:, length - n + 1:]                                   # [rows, n-1]
        hit = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)               # [rows, W]
        r, w = np.nonzero(hit)
        logits[r, windows[r, w, -1]] = NEG_INF


def _extend(logits: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``scores[r] + log_softmax(logits[r])``: the score of every one-token extension [rows, V].

    Written as ``logits + (score - logsumexp)`` to make two passes over the logits instead of five.
    """
    m = logits.max(axis=1, keepdims=True)
    m[~np.isfinite(m)] = 0.0
    tmp = np.subtract(logits, m)
    np.exp(tmp, out=tmp)
    lse = m + np.log(tmp.sum(axis=1, keepdims=True))
    return np.add(logits, scores.reshape(-1, 1) - lse, out=tmp)


def _topk(cand: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row, sorted (higher score first, lower index on ties): (indices, scores).

    With fewer than ``k`` candidates the rest are index 0 with score -inf (dead hypotheses), so a
    beam may be wider than the vocabulary (the reference needs ``beam <= vocab``).

    A row of beam x 50257 candidates is first cut by a threshold, the k-th best of every 64th
    candidate: at least k candidates pass it, usually a few hundred, and only those are ranked
    (argpartition over the whole row costs ~10x more). The result is the same.
    """
    a, m = cand.shape
    if m < k:
        cand = np.concatenate([cand, np.full((a, k - m), NEG_INF, cand.dtype)], axis=1)
    m_all = cand.shape[1]
    stride = 64
    if m_all >= stride * k * 4:
        sub = cand[:, ::stride]
        t = np.partition(sub, sub.shape[1] - k, axis=1)[:, sub.shape[1] - k]  # [a] k-th best
        if np.isfinite(t).all():
            flat = np.flatnonzero(cand >= t[:, None])  # (np.nonzero on 2-D is ~15x slower)
            rows, cols = flat // m_all, flat % m_all
            groups = np.split(cols, np.cumsum(np.bincount(rows, minlength=a))[:-1])
            idx = np.stack([g[np.lexsort((g, -cand[r, g]))[:k]] for r, g in enumerate(groups)])
            return idx, np.take_along_axis(cand, idx, axis=1)
    idx = np.argsort(-cand, axis=1, kind="stable")[:, :k]  # small rows, or mostly -inf
    return np.where(idx < m, idx, 0), np.take_along_axis(cand, idx, axis=1)


# ----------------------------------------------------------------------------------------------

def beam_search_batch(model, prompts: Sequence[Sequence[int]], settings: BeamSettings, *,
                      use_cache: bool = True, early_stop: bool = True) -> Tuple[List[List[int]], List[float]]:
    """Beam search for a few prompts at once (one batch); the model must be in eval mode.

    Args:
        model: a ``GPT2LMModel``.
        prompts: token-id lists, any lengths >= 1.
        settings: the search settings.
        use_cache: False reruns the whole sequence every step, "gather" uses the plain gathered KV
            cache (both for testing the default cache).
        early_stop: stop a prompt once its result cannot change (exact; False runs every step).

    Returns:
        (sequences, scores): per prompt the best hypothesis (its tokens, ending with the eos id when
        it finished on one) and its length-normalised score.
    """
    s, k = settings, settings.beam
    vocab = model.config.vocab_size
    bad_eos = [e for e in s.eos_token_ids if not 0 <= e < vocab]
    if bad_eos:
        raise ValueError(f"eos ids {bad_eos} are outside the model's vocabulary (size {vocab})")
    n = len(prompts)
    lens = np.array([len(p) for p in prompts])
    if n == 0:
        return [], []
    if lens.min() < 1:
        raise ValueError("every prompt needs at least one token")
    width = int(lens.max())
    if width + s.max_new_tokens - 1 > model.config.n_positions:
        raise ValueError(f"prompt of {width} tokens + {s.max_new_tokens} new tokens exceeds the model's "
                         f"{model.config.n_positions} positions")
    ids = np.zeros((n, width), np.int32)          # left padded with 0
    mask = np.zeros((n, width), np.float32)
    pos = np.zeros((n, width), np.int32)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1.0
        pos[r, width - len(p):] = np.arange(len(p))
    padded = bool((lens != width).any())

    eos = np.array(s.eos_token_ids, dtype=np.int64)
    best = np.full(n, NEG_INF, np.float32)
    has_best = np.zeros(n, bool)
    best_seq: List[Optional[List[int]]] = [None] * n

    def add_candidates(rows: np.ndarray, scores: np.ndarray, history: np.ndarray, length: int, active):
        """The reference's _add_beam_candidate: rows in order; a row replaces the prompt's best if
        there is none yet or it scores strictly higher."""
        norm = scores / np.float32(length ** s.length_penalty)             # [A, k]
        for a, j in zip(*np.nonzero(rows)):
            p = active[a]
            if not has_best[p] or best[p] < norm[a, j]:
                best[p], has_best[p] = norm[a, j], True
                best_seq[p] = history[a * k + j].tolist()

    with jt.no_grad():
        stepper = make_stepper(use_cache, model, ids, mask, pos, padded, rows=n * k, steps=s.max_new_tokens)
        logits = stepper.first_logits                 # [rows, V]; one row per prompt at step 0
        active = np.arange(n)                         # prompts still searched
        scores = np.zeros((n, 1), np.float32)         # [A, rows per prompt]
        history = np.zeros((n, 0), np.int64)          # [rows, i] generated tokens
        for i in range(s.max_new_tokens):
            _postprocess(logits, history, i, s)
            cand = _extend(logits, scores).reshape(len(active), -1)
            flat, scores = _topk(cand, k)             # [A, k]
            src = (np.arange(len(active)) * (cand.shape[1] // vocab))[:, None] + flat // vocab
            tokens = flat % vocab
            history = np.concatenate([history[src.reshape(-1)], tokens.reshape(-1, 1)], axis=1)
            if len(eos):
                finished = np.isin(tokens, eos)
                if finished.any():
                    add_candidates(finished, scores, history, i + 1, active)
                    scores = np.where(finished, NEG_INF, scores)
            if i == s.max_new_tokens - 1:
                add_candidates(np.ones_like(scores, bool), scores, history, i + 1, active)
                break
            if early_stop:
                # Scores only fall, so a later candidate scores at most top / L**lp for some
                # length L in [i + 2, max_new_tokens]; the extreme lengths bound it.
                top = scores.max(axis=1)
                bound = np.maximum(top / np.float32((i + 2) ** s.length_penalty),
                                   top / np.float32(s.max_new_tokens ** s.length_penalty))
                keep = ~(has_best[active] & (best[active] >= bound))
                if not keep.any():
                    break
                if not keep.all():
                    active, scores, src, tokens = active[keep], scores[keep], src[keep], tokens[keep]
                    history = history[np.repeat(keep, k)]
            logits = stepper.step(src.reshape(-1), tokens.reshape(-1))
    return [list(map(int, q)) for q in best_seq], [float(b) for b in best]


def beam_search(model, prompts: Sequence[Sequence[int]], *, batch_size: int = 8, use_cache: bool = True,
                early_stop: bool = True, return_scores: bool = False, progress: bool = False, **settings):
    """Beam search over many prompts, batched by similar length; results in input order.

    Args:
        model: a ``GPT2LMModel``; it is put in eval mode (adapters merged), as the reference does.
        prompts: token-id lists.
        batch_size: prompts per batch (each becomes ``beam`` rows).
        use_cache, early_stop: see :func:`beam_search_batch`.
        return_scores: also return the normalised score of each result.
        progress: show a tqdm bar.
        **settings: fields of :class:`BeamSettings` (beam, max_new_tokens, min_length, ...).

    Returns:
        Per prompt the generated token ids (ending with the eos id if one ended it); with
        ``return_scores`` a pair (sequences, scores).
    """
    s = BeamSettings(**settings)
    model.eval()
    order = length_order([len(p) for p in prompts])
    seqs: List[Optional[List[int]]] = [None] * len(prompts)
    scores: List[Optional[float]] = [None] * len(prompts)
    bar = progress_bar(len(prompts), progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        out, sc = beam_search_batch(model, [prompts[i] for i in chunk], s, use_cache=use_cache,
                                    early_stop=early_stop)
        for i, q, v in zip(chunk, out, sc):
            seqs[i], scores[i] = q, v
        bar.update(len(chunk))
    bar.close()
    return (seqs, scores) if return_scores else seqs


def length_order(lengths: Sequence[int]) -> List[int]:
    """Longest first (memory trouble shows at once), ties by index: little padding per batch."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled, unit="prompt", dynamic_ncols=True)


