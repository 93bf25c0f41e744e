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
  through the LM head; then the KV cache is gathered by beam index each step;
* the search of a prompt stops as soon as no live hypothesis can beat its best candidate any more
  (scores only fall, so the bound is exact) and its rows leave the batch; the reference always
  runs ``eval_len`` steps;
* log-probabilities are ``log_softmax`` rather than ``log(softmax)`` (equal up to rounding, and
  finite where the probability underflows).

The bookkeeping (penalties, top-k, candidates) runs in numpy on the last-position logits: on a CPU
backend fetching them costs little, and Jittor compiles nothing new as the cache grows (its kernels
take shapes at run time), so no fixed-capacity cache is needed.

Command line: ``python -m jt_lora.generate --data test.jsonl --init_checkpoint ... --beam 10``
writes ``{"id": i, "predict": [ids]}`` lines like the reference's ``predict.*.jsonl``; see
:func:`main` and ``run_inference.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..backend import jt
from .cache import DecodeCache
from ..nn.kernels import batched_matmul, fast_path_available, small_rows_matmul, use_small_rows

__all__ = ["BeamSettings", "beam_search", "beam_search_batch", "read_predictions", "main"]

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
# Model stepping: the same interface with the KV cache and with full recomputation (for tests).

class _CachedStepper:
    """Runs the prompt once, then one token per hypothesis per step against a gathered KV cache
    (``[rows, H, T, D]`` per layer, reordered by beam index and grown every step)."""

    def __init__(self, model, head, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, padded: bool,
                 rows: int = 0, steps: int = 0):
        self.model, self.head, self.padded = model, head, padded
        self.mask = mask               # [rows, T_total] 1 = real key, 0 = left padding
        self.next_pos = pos[:, -1] + 1  # [rows] position of the next token
        self.first_logits, self.past = _prompt_pass(model, head, ids, mask, pos, padded)

    def step(self, src: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Reorder the rows to ``src`` (indices into the current rows), feed ``tokens`` [rows]."""
        if len(src) != len(self.mask) or not np.array_equal(src, np.arange(len(src))):
            idx = jt.array(src.astype(np.int32))
            self.past = [(k[idx], v[idx]) for k, v in self.past]  # [rows, H, T, D] each
            self.mask, self.next_pos = self.mask[src], self.next_pos[src]
        rows = len(src)
        self.mask = np.concatenate([self.mask, np.ones((rows, 1), np.float32)], axis=1)
        hidden, self.past, _ = self.model.transformer(
            jt.array(tokens.astype(np.int32).reshape(rows, 1)), past=self.past,
            position_ids=jt.array(self.next_pos.astype(np.int32).reshape(rows, 1)),
            attention_mask=jt.array(self.mask) if self.padded else None)
        self.next_pos = self.next_pos + 1
        return _last_logits(self.head, hidden)


class _DecodeCacheStepper:
    """Runs the prompt once, then one token per hypothesis per step against a ``DecodeCache``:
    nothing is reordered or copied (CPU; the same results as ``_CachedStepper``)."""

    def __init__(self, model, head, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, padded: bool,
                 rows: int = 0, steps: int = 0):
        self.model, self.head = model, head
        self.next_pos = pos[:, -1] + 1  # [rows] position of the next token
        self.first_logits, presents = _prompt_pass(model, head, ids, mask, pos, padded)
        self.cache = DecodeCache(presents, mask if padded else None, rows, steps)

    def step(self, src: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Rows continue rows ``src`` of the previous step and feed ``tokens`` [rows]."""
        self.cache.advance(src)
        self.next_pos = self.next_pos[src]
        rows = len(src)
        hidden, _, _ = self.model.transformer(
            jt.array(tokens.astype(np.int32).reshape(rows, 1)), past=self.cache,
            position_ids=jt.array(self.next_pos.astype(np.int32).reshape(rows, 1)))
        self.next_pos = self.next_pos + 1
        return _last_logits(self.head, hidden)


def _prompt_pass(model, head, ids, mask, pos, padded):
    """The prompts once (left padded): (last-position logits [rows, V], per-layer (k, v))."""
    hidden, presents, _ = model.transformer(
        jt.array(ids), position_ids=jt.array(pos) if padded else None,
        attention_mask=jt.array(mask) if padded else None)
    return _last_logits(head, hidden), presents


class _RecomputeStepper:
    """Reruns the whole sequence every step: the slow reference the cache must agree with."""

    def __init__(self, model, head, ids, mask, pos, padded, rows=0, steps=0):
        self.model, self.head, self.ids, self.mask, self.pos = model, head, ids, mask, pos
        self.first_logits = self._run()

    def _run(self):
        hidden, _, _ = self.model.transformer(jt.array(self.ids), position_ids=jt.array(self.pos),
                                              attention_mask=jt.array(self.mask))
        return _last_logits(self.head, hidden)

    def step(self, src, tokens):
        rows = len(src)
        self.ids = np.concatenate([self.ids[src], tokens.reshape(rows, 1).astype(np.int32)], axis=1)
        self.mask = np.concatenate([self.mask[src], np.ones((rows, 1), np.float32)], axis=1)
        self.pos = np.concatenate([self.pos[src], self.pos[src][:, -1:] + 1], axis=1)
        return self._run()


def _stepper_class(use_cache):
    """``use_cache``: True picks the fastest cache for the backend, "gather" the plain KV cache,
    False recomputation (the last two for tests)."""
    if not use_cache:
        return _RecomputeStepper
    if use_cache == "gather" or not fast_path_available():
        return _CachedStepper
    return _DecodeCacheStepper


def _lm_head(model):
    """The tied LM head ``wte`` [V, C]. ``nn.matmul_transpose`` (what ``model.logits`` uses) copies
    the transposed 50257x768 weight on every call; oneDNN's sgemm reads it transposed in place
    (``jt_lora.nn.kernels``), so no copy is made at all (it cost ~40 ms a step and 154 MB on GPT-2 S)."""
    return model.transformer.wte.weight


def _last_logits(head, hidden) -> np.ndarray:
    """LM head on the last position only: [rows, T, C] -> float32 numpy [rows, V] (writable).
    A few rows (a decoding step) take ``small_rows_matmul``, which reads the head as oneDNN's left
    operand: ~13 vs ~29 ms for 10 rows on GPT-2 S."""
    last = hidden[:, -1]
    if use_small_rows(last.shape[0], last, head):
        logits = small_rows_matmul(last, head, transpose_w=True).numpy()
    else:
        logits = batched_matmul(last.unsqueeze(0), head.unsqueeze(0), transpose_b=True)[0].numpy()
    return logits if logits.flags.writeable else logits.copy()


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
        stepper = _stepper_class(use_cache)(model, _lm_head(model), ids, mask, pos, padded,
                                            rows=n * k, steps=s.max_new_tokens)
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
    order = _length_order([len(p) for p in prompts])
    seqs: List[Optional[List[int]]] = [None] * len(prompts)
    scores: List[Optional[float]] = [None] * len(prompts)
    bar = _progress(len(prompts), progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        out, sc = beam_search_batch(model, [prompts[i] for i in chunk], s, use_cache=use_cache,
                                    early_stop=early_stop)
        for i, q, v in zip(chunk, out, sc):
            seqs[i], scores[i] = q, v
        bar.update(len(chunk))
    bar.close()
    return (seqs, scores) if return_scores else seqs


def _length_order(lengths: Sequence[int]) -> List[int]:
    """Longest first (memory trouble shows at once), ties by index: little padding per batch."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled, unit="prompt", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Output file: append-only JSONL, resumable.

def read_predictions(path) -> Dict[int, List[int]]:
    """``{id: predict}`` from a predictions JSONL; a truncated last line (a killed run) is cut off.

    The file itself is truncated to its last complete line so appends continue cleanly.

    Raises:
        ValueError: a line other than the last is not a valid prediction record (names file and line).
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]      # text after the last newline (normally empty) is a partial line
    keep_bytes = len(data) - len(lines[-1])
    out: Dict[int, List[int]] = {}
    for no, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            _id, pred = int(rec["id"]), [int(t) for t in rec["predict"]]
        except (ValueError, KeyError, TypeError):
            if no == len(complete) and not lines[-1]:
                keep_bytes -= len(raw) + 1   # a damaged final line: dropped like a partial one
                break
            raise ValueError(f"{path}:{no}: not a prediction record {{'id', 'predict'}}: {raw[:80]!r}") from None
        out[_id] = pred
    if keep_bytes != len(data):
        dropped = data[keep_bytes:]
        print(f"{path}: dropping an incomplete last line ({len(dropped)} bytes) from an interrupted run",
              file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(keep_bytes)
            f.flush()
            os.fsync(f.fileno())
    return out


def _append_records(f, records: List[Tuple[int, List[int]]]) -> None:
    f.write("".join(json.dumps({"id": i, "predict": p}) + "\n" for i, p in records))
    f.flush()
    os.fsync(f.fileno())


def _pad(seq: List[int], length: int) -> List[int]:
    """The reference writes ``best_sequence``: eval_len ids, 0 after the sequence."""
    return seq + [0] * (length - len(seq))


def _text(tokenizer, ids: Sequence[int], eos: Sequence[int]) -> str:
    """Decoded prediction as gpt2_decode reads it: cut at the first eos, then at <|endoftext|> and
    a blank line; stripped; one line."""
    cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
    text = tokenizer.decode(ids[:cut]).split("<|endoftext|>")[0].split("\n\n")[0].strip()
    return " ".join(text.split("\n"))


# ----------------------------------------------------------------------------------------------
# Command line.

# Settings that change what is generated for an id: a resumed run must have the same ones.
_RESUME_KEYS = ("data", "seq_len", "eval_len", "min_length", "beam", "length_penalty", "no_repeat_ngram_size",
                "repetition_penalty", "eos_token_ids", "init_checkpoint", "base_checkpoint", "adapter_dir",
                "model")


def build_parser() -> argparse.ArgumentParser:
    from ..cli import DefaultsHelpFormatter
    from ..models.loading import add_model_flags

    p = argparse.ArgumentParser(
        prog="python -m jt_lora.generate", formatter_class=DefaultsHelpFormatter,
        description="Beam-search generation (microsoft/LoRA gpt2_beam.py semantics), resumable.")
    p.add_argument("--data", required=True, help="encoded JSONL ({'context': ids, 'completion': ids})")
    p.add_argument("--batch_size", type=int, default=10, help="prompts per batch (each is --beam rows)")
    p.add_argument("--seq_len", type=int, default=512, help="prompts keep their last seq_len - eval_len tokens")
    p.add_argument("--eval_len", type=int, default=256, help="tokens generated at most")
    p.add_argument("--min_length", type=int, default=0, help="eos banned before this many tokens")
    add_model_flags(p)
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--length_penalty", type=float, default=1.0, help="a finished hypothesis scores sum(log p) / len**lp")
    p.add_argument("--no_repeat_ngram_size", type=int, default=4, help="no generated n-gram of this size twice (0: off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="CTRL's penalty on generated tokens (1: off)")
    p.add_argument("--eos_token_id", action="append", type=int, default=None,
                   help="eos id, repeatable; as in the reference 50256 is always included, so the default "
                        "is 50256 alone (ids outside the model's vocabulary are dropped)")
    p.add_argument("--work_dir", default=".", help="output directory")
    p.add_argument("--output_file", default="beam_prediction.jsonl", help="JSONL name inside --work_dir")
    p.add_argument("--vocab", default=None, help="GPT-2 vocab directory: also write decoded text "
                                                 "(default: the gpt2-vocab asset when found)")
    p.add_argument("--unique_contexts", action=argparse.BooleanOptionalAction, default=False,
                   help="generate once per distinct prompt and write it for every id sharing it "
                        "(E2E repeats each MR once per reference: ~7x fewer searches, same predictions)")
    p.add_argument("--max_examples", type=int, default=None, help="only the first N examples (default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh instead of resuming; the old file is replaced only once the new one is complete")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def build_model(args):
    """The model the flags describe, in eval mode (see ``jt_lora.models.loading``)."""
    from ..models.loading import build_model as build
    return build(args)


def validate_args(args) -> None:
    """Every flag checked before any work or write; errors name the flag."""
    from ..cli import positive_int
    positive_int("--batch_size", args.batch_size)
    positive_int("--beam", args.beam)
    positive_int("--eval_len", args.eval_len)
    positive_int("--max_examples", args.max_examples)
    positive_int("--min_length", args.min_length, 0)
    positive_int("--no_repeat_ngram_size", args.no_repeat_ngram_size, 0)
    if args.seq_len <= args.eval_len:
        raise ValueError(f"--seq_len ({args.seq_len}) must exceed --eval_len ({args.eval_len}): "
                         f"prompts keep their last seq_len - eval_len tokens")
    if not args.repetition_penalty > 0:
        raise ValueError(f"--repetition_penalty must be > 0, got {args.repetition_penalty}")
    if "/" in args.output_file or not args.output_file.strip("."):
        raise ValueError(f"--output_file must be a file name inside --work_dir, got {args.output_file!r}")
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"--data file not found: {args.data}")
    _check_writable_dir(Path(args.work_dir))
    from ..models.loading import check_model_flags
    check_model_flags(args)


def _check_writable_dir(work_dir: Path) -> None:
    """Fail before loading anything when --work_dir cannot hold the outputs."""
    for parent in [work_dir, *work_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--work_dir {work_dir}: {parent} is a regular file, not a directory; "
                                 f"choose another --work_dir")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--work_dir {work_dir}: {parent} is not writable (read-only file system or "
                                 f"permissions); choose another --work_dir")
            return


def _read_config(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    from ..cli import run_cli
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), "jt_lora.generate")


def _run(args) -> int:
    from ..training.data import FTDataset
    from ..io.atomic import atomic_write_text, replace_file

    validate_args(args)
    out_path = Path(args.work_dir) / args.output_file
    stem = out_path.name[:-len(".jsonl")] if out_path.name.endswith(".jsonl") else out_path.name
    config_path = out_path.with_name(stem + ".config.json")
    text_path = out_path.with_name(stem + ".txt")

    model = build_model(args)
    vocab = model.config.vocab_size
    eos_all = list(dict.fromkeys([50256] + list(args.eos_token_id or [])))
    eos = [e for e in eos_all if 0 <= e < vocab]
    if eos != eos_all:
        print(f"note: eos ids {sorted(set(eos_all) - set(eos))} are outside the vocabulary ({vocab}); ignored",
              file=sys.stderr)
    settings = BeamSettings(beam=args.beam, max_new_tokens=args.eval_len, min_length=args.min_length,
                            length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                            repetition_penalty=args.repetition_penalty, eos_token_ids=tuple(eos))

    dataset = FTDataset(args.data, args.seq_len, max_eval_len=args.eval_len, vocab_size=vocab)
    n = len(dataset) if args.max_examples is None else min(len(dataset), args.max_examples)
    queries = [dataset[i]["query"].tolist() for i in range(n)]

    resolved = {
        "data": str(Path(args.data).resolve()), "seq_len": args.seq_len, "eval_len": args.eval_len,
        "min_length": args.min_length, "beam": args.beam, "length_penalty": args.length_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size, "repetition_penalty": args.repetition_penalty,
        "eos_token_ids": eos,
        **{k: (str(Path(v).resolve()) if v else None)
           for k, v in (("init_checkpoint", args.init_checkpoint), ("base_checkpoint", args.base_checkpoint),
                        ("adapter_dir", args.adapter_dir))},
        "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.to_dict().items()
                  if k not in ("lora_dropout", "merge_weights", "embd_pdrop", "attn_pdrop", "resid_pdrop")},
        "batch_size": args.batch_size, "unique_contexts": args.unique_contexts, "max_examples": args.max_examples,
        "num_examples": n, "output_file": str(out_path), "text_file": None,
        "settings": asdict(settings),
    }

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # --overwrite: the new predictions go to a temp file that replaces the old one only when complete;
    # a failure or a kill leaves the previous file (and its config) as it was.
    write_path = out_path.with_name(f".{out_path.name}.overwrite.tmp") if args.overwrite else out_path
    if args.overwrite and write_path.exists():
        write_path.unlink()    # a killed earlier --overwrite run
    done = read_predictions(write_path)
    if done:
        old = _read_config(config_path)
        if old is not None:
            changed = [k for k in _RESUME_KEYS if json.dumps(old.get(k)) != json.dumps(resolved[k])]
            if changed:
                raise ValueError(f"{out_path} was generated with different settings ({', '.join(changed)}); "
                                 f"use --overwrite or another --output_file")
        stray = sorted(i for i in done if not 0 <= i < len(dataset))
        if stray:
            raise ValueError(f"{out_path}: ids {stray[:5]} are not in {args.data} ({len(dataset)} examples)")

    tokenizer = None
    if args.vocab is not None or vocab == 50257:
        from ..io.assets import try_find_asset
        from ..models.tokenizer import load_tokenizer
        if args.vocab is not None or try_find_asset("gpt2-vocab") is not None:
            tokenizer = load_tokenizer(args.vocab)
            resolved["text_file"] = str(text_path)
    if not args.overwrite:
        atomic_write_text(config_path, json.dumps(resolved, indent=2))

    # Work items: one per example, or one per distinct prompt (all its ids written together).
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(tuple(q) if args.unique_contexts else (i,), []).append(i)
    pending = [(ids[0], [i for i in ids if i not in done]) for ids in groups.values()]
    pending = [(first, todo) for first, todo in pending if todo]
    print(f"{n} examples, {len(groups)} {'distinct prompts' if args.unique_contexts else 'prompts'}; "
          f"{len(pending)} to generate, {len(done)} ids already in {out_path}", file=sys.stderr)

    order = _length_order([len(queries[first]) for first, _ in pending])
    bar = _progress(len(pending), not args.no_progress)
    new_tokens, start = 0, time.time()
    try:
        with open(write_path, "a", encoding="utf-8") as f:
            for b in range(0, len(order), args.batch_size):
                chunk = [pending[j] for j in order[b:b + args.batch_size]]
                seqs, _ = beam_search_batch(model, [queries[first] for first, _ in chunk], settings)
                records = sorted((i, _pad(q, args.eval_len)) for (_, todo), q in zip(chunk, seqs) for i in todo)
                _append_records(f, records)
                for i, p in records:
                    done[i] = p
                new_tokens += sum(len(q) for q in seqs)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - start, 1e-9):.1f}")
        bar.close()
        if args.overwrite:
            atomic_write_text(config_path, json.dumps(resolved, indent=2))
            replace_file(write_path, out_path)
    except BaseException:
        bar.close()
        if args.overwrite and write_path.exists():
            write_path.unlink()
        raise

    if tokenizer is not None:
        lines = [_text(tokenizer, done[i], eos) if i in done else "" for i in range(n)]
        atomic_write_text(text_path, "".join(line + "\n" for line in lines))
    print(f"wrote {out_path} ({len(done)} ids)" + (f" and {text_path}" if tokenizer is not None else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
