"""BoolQ accuracy, two ways: ``python -m jt_lora.eval_boolq``.

* **text** (``--predictions``): the first word of each generated answer (``jt_lora.generate``'s
  ``{"id", "predict": ids}`` JSONL, a ``{"id", "text"}`` JSONL, or a text file with one prediction
  per line), case-insensitive, must be ``yes`` or ``no``; anything else is *unparseable*, counted
  wrong and reported.
* **loglik** (a model: ``--base_checkpoint`` + ``--adapter_dir``, or ``--init_checkpoint``): the
  answer is whichever of `` yes`` / `` no`` the model finds more likely right after the prompt, so
  no generation is needed. Both are single GPT-2 tokens, so one forward pass per prompt decides:
  ``log p(" yes" | prompt) >= log p(" no" | prompt)`` means yes (ties go to yes). Prompts are
  batched by length and padded on the right; causal attention keeps real tokens from seeing the
  padding, and positions start at 0 in every row, so no attention mask is needed.

``--data`` is the prepared test file (``examples/BoolQ/prepare_boolq.py``): the encoded JSONL
(needed for loglik: the exact prompt ids the model was trained on) or, for text mode, the formatted
one. Gold labels come from its completions.

Output: a confusion table, then one JSON line (always the last line of stdout): ``mode``,
``accuracy``, ``n``, ``correct``, ``unparseable``, ``per_class`` (gold count, correct, predicted,
recall per label), ``confusion`` (gold -> predicted -> count), ``majority_accuracy``.
``--output_file`` also writes one JSON line per example.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...training.data import iter_jsonl_objects

__all__ = ["parse_answer", "read_gold", "read_predictions", "score", "loglik_scores", "format_confusion", "main"]

LABELS = ("yes", "no")
UNPARSEABLE = "unparseable"
EOS_ID = 50256
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)")


def parse_answer(text: str) -> Optional[str]:
    """``"yes"`` / ``"no"`` from the first word of ``text`` (case-insensitive), else None.

    ``" Yes."`` and ``"no, it is not"`` parse; ``"yesterday"``, ``"maybe"``, ``"- yes"`` and ``""`` do not.
    """
    m = _FIRST_WORD.match(text)
    word = m.group(1).lower() if m else None
    return word if word in LABELS else None


@dataclass
class Gold:
    """The test set as the evaluator needs it."""

    labels: List[str]  # "yes" / "no" per example, in file order
    contexts: Optional[List[List[int]]] = None  # prompt ids (encoded files only)


def _label_ids(tokenizer) -> Dict[str, List[int]]:
    return {w: tokenizer.encode(" " + w) for w in LABELS}


def read_gold(path, tokenizer=None) -> Gold:
    """Gold labels (and prompt ids) from a prepared BoolQ file, encoded or formatted.

    Args:
        path: ``test.jsonl`` (``{"context": ids, "completion": ids(" yes"|" no") + [50256]}``) or
            ``test_formatted.jsonl`` (``{"context": str, "completion": "yes"|"no"}``).
        tokenizer: needed for an encoded file (to know the ids of `` yes`` / `` no``).

    Raises:
        ValueError: naming file and line, for invalid JSON, a missing key, or a completion that is
            not yes/no; or an empty file.
    """
    labels, contexts, encoded = [], [], None
    label_ids = None
    for line_no, record in iter_jsonl_objects(path):
        if "context" not in record or "completion" not in record:
            raise ValueError(f"{path}:{line_no}: expected an object with 'context' and 'completion'")
        completion = record["completion"]
        if encoded is None:
            encoded = isinstance(completion, list)
            if encoded:
                if tokenizer is None:
                    raise ValueError(f"{path}: an encoded file needs the GPT-2 vocab (--vocab)")
                label_ids = _label_ids(tokenizer)
        if encoded:
            ids = list(completion)
            while ids and ids[-1] == EOS_ID:
                ids.pop()
            label = next((w for w, want in label_ids.items() if ids == want), None)
            context = record["context"]
            if not isinstance(context, list) or not all(isinstance(t, int) for t in context):
                raise ValueError(f"{path}:{line_no}: 'context' must be token ids like the first line's")
            contexts.append(context)
        else:
            label = completion.strip().lower() if isinstance(completion, str) else None
            label = label if label in LABELS else None
        if label is None:
            raise ValueError(f"{path}:{line_no}: completion {str(completion)[:40]} is not ' yes' / ' no' "
                             "(is this a prepared BoolQ file?)")
        labels.append(label)
    if not labels:
        raise ValueError(f"{path}: no examples (empty file?)")
    return Gold(labels, contexts if encoded else None)


def read_predictions(path, tokenizer=None) -> Dict[int, str]:
    """``{id: text}`` from generated answers (read only; never changes the file).

    Formats: JSONL lines ``{"id": i, "predict": [ids]}`` (ids cut at the first 50256, then decoded)
    or ``{"id": i, "text": str}``; any other file is plain text, line ``i + 1`` holding id ``i``.

    Raises:
        ValueError: naming file and line, for a JSONL line that is not such a record, or a
            duplicated id.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next((s for s in lines if s.strip()), "")
    if not (path.suffix == ".jsonl" or first.lstrip().startswith("{")):
        return dict(enumerate(lines))
    out: Dict[int, str] = {}
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            i = int(record["id"])
            if "predict" in record:
                ids = [int(t) for t in record["predict"]]
                ids = ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids
                if tokenizer is None:
                    raise ValueError("token ids need the GPT-2 vocab (--vocab)")
                text = tokenizer.decode(ids)
            else:
                text = str(record["text"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{line_no}: not a prediction record {{'id', 'predict' | 'text'}} ({e}): "
                             f"{raw[:80]!r}") from None
        if i in out:
            raise ValueError(f"{path}:{line_no}: id {i} appears twice")
        out[i] = text
    return out


# ----------------------------------------------------------------------------- scoring


@dataclass
class Score:
    """Counts behind the JSON report."""

    confusion: Dict[str, Dict[str, int]] = field(
        default_factory=lambda: {g: {p: 0 for p in (*LABELS, UNPARSEABLE)} for g in LABELS})

    def add(self, gold: str, predicted: Optional[str]) -> None:
        self.confusion[gold][predicted or UNPARSEABLE] += 1

    def report(self) -> Dict:
        c = self.confusion
        n = sum(sum(row.values()) for row in c.values())
        correct = sum(c[g][g] for g in LABELS)
        per_class = {}
        for g in LABELS:
            n_gold = sum(c[g].values())
            per_class[g] = {"n": n_gold, "correct": c[g][g], "predicted": sum(c[x][g] for x in LABELS),
                            "recall": c[g][g] / n_gold if n_gold else None}
        return {"accuracy": correct / n if n else None, "n": n, "correct": correct,
                "unparseable": sum(c[g][UNPARSEABLE] for g in LABELS), "per_class": per_class,
                "confusion": c, "majority_accuracy": max(p["n"] for p in per_class.values()) / n if n else None}


def score(gold: Sequence[str], predicted: Sequence[Optional[str]]) -> Dict:
    """The report for gold labels vs predicted labels (None = unparseable, counted wrong)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    s = Score()
    for g, p in zip(gold, predicted):
        s.add(g, p)
    return s.report()


def format_confusion(report: Dict) -> str:
    """A small table: gold labels down, predictions across."""
    cols = (*LABELS, UNPARSEABLE)
    rows = [f"{'gold / predicted':>16} " + " ".join(f"{c:>11}" for c in cols) + f" {'total':>7}"]
    for g in LABELS:
        row = report["confusion"][g]
        rows.append(f"{g:>16} " + " ".join(f"{row[c]:>11}" for c in cols) + f" {sum(row.values()):>7}")
    acc = report["accuracy"]
    rows.append(f"accuracy {acc:.4f} ({report['correct']}/{report['n']}), {report['unparseable']} unparseable, "
                f"majority class {report['majority_accuracy']:.4f}" if acc is not None else "no examples")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- log-likelihood


def loglik_scores(model, contexts: Sequence[Sequence[int]], yes_id: int, no_id: int, *, batch_size: int = 8,
                  max_len: Optional[int] = None, pad_to_multiple_of: int = 8, progress: bool = False) -> np.ndarray:
    """``log p(yes_id | context)`` and ``log p(no_id | context)`` for every context: float64 [N, 2].

    Args:
        model: a ``GPT2LMModel`` (put in eval mode here: adapters merged, no dropout).
        contexts: prompt token ids, any lengths >= 1.
        yes_id, no_id: the single tokens compared (`` yes`` = 3763, `` no`` = 645 in GPT-2).
        batch_size: prompts per forward pass.
        max_len: keep only the last ``max_len`` tokens of longer prompts (default: the model's
            ``n_positions``).
        pad_to_multiple_of: round padded lengths up (fewer distinct shapes).
        progress: show a tqdm bar (on stderr).
    """
    from tqdm import tqdm

    from ...backend import jt

    model.eval()
    max_len = max_len or model.config.n_positions
    vocab = model.config.vocab_size
    if not (0 <= yes_id < vocab and 0 <= no_id < vocab):
        raise ValueError(f"label ids {yes_id}, {no_id} are outside the model's vocabulary ({vocab})")
    prompts = [list(c)[-max_len:] for c in contexts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    top = max(max(p) for p in prompts)
    if top >= vocab or min(min(p) for p in prompts) < 0:
        raise ValueError(f"prompt token ids outside the model's vocabulary [0, {vocab}) (max {top})")
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # longest first: padding is small
    out = np.zeros((len(prompts), 2), np.float64)
    head = model.transformer.wte.weight.transpose()  # [C, V], transposed once, not per batch
    head.sync()
    bar = tqdm(total=len(prompts), disable=not progress, unit="prompt", dynamic_ncols=True, file=sys.stderr)
    with jt.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            lens = np.array([len(prompts[i]) for i in chunk])
            width = min(-(-int(lens.max()) // pad_to_multiple_of) * pad_to_multiple_of, max_len)
            ids = np.zeros((len(chunk), width), np.int32)  # right padding with 0
            for r, i in enumerate(chunk):
                ids[r, :lens[r]] = prompts[i]
            hidden, _, _ = model.transformer(jt.array(ids))  # [B, T, C]
            last = hidden[jt.array(np.arange(len(chunk), dtype=np.int32)), jt.array((lens - 1).astype(np.int32))]
            logits = jt.matmul(last, head).numpy().astype(np.float64)  # [B, V]
            m = logits.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
            out[chunk, 0] = logits[:, yes_id] - lse
            out[chunk, 1] = logits[:, no_id] - lse
            bar.update(len(chunk))
    bar.close()
    return out


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from ...cli import DefaultsHelpFormatter
    from ...models.loading import add_model_flags

    p = argparse.ArgumentParser(prog="python -m jt_lora.eval_boolq", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    a = p.add_argument
    a("--data", required=True, help="prepared BoolQ test file: test.jsonl (encoded) or test_formatted.jsonl")
    a("--mode", default="auto", choices=["auto", "text", "loglik"],
      help="auto: text when --predictions is given, else loglik")
    a("--predictions", default=None, help="text mode: generated answers (jt_lora.generate JSONL, or text lines)")
    a("--vocab", default=None, help="GPT-2 vocab dir (default: the gpt2-vocab asset)")
    add_model_flags(p)   # the same model flags and rules as jt_lora.generate's
    a("--batch_size", type=int, default=8, help="loglik: prompts per forward pass")
    a("--seq_len", type=int, default=None, help="loglik: keep the last N prompt tokens (default: n_positions)")
    a("--max_examples", type=int, default=None, help="only the first N examples")
    a("--output_file", default=None, help="also write one JSON line per example here")
    a("--no_progress", action="store_true", help="no progress bar")
    return p


def _tokenizer(vocab):
    from ...models.tokenizer import load_tokenizer
    return load_tokenizer(vocab)


def main(argv=None) -> int:
    from ...cli import run_cli
    args = build_parser().parse_args(argv)

    def body():
        report = _run(args)
        print(format_confusion(report))
        print(json.dumps(report))
        return 0
    return run_cli(body, "jt_lora.eval_boolq")


def _validate(args) -> None:
    """Flags checked before any work; errors name the flag."""
    from ...cli import positive_int
    positive_int("--batch_size", args.batch_size)
    positive_int("--seq_len", args.seq_len)
    positive_int("--max_examples", args.max_examples)
    if not args.predictions:
        from ...models.loading import check_model_flags
        check_model_flags(args)
    if args.output_file:
        out = Path(args.output_file)
        for parent in out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"--output_file {out}: {parent} is a regular file, not a directory")
                break


def _run(args) -> Dict:
    _validate(args)
    t0 = time.perf_counter()
    mode = args.mode if args.mode != "auto" else ("text" if args.predictions else "loglik")
    if mode == "text" and not args.predictions:
        raise ValueError("--mode text needs --predictions")
    if mode == "loglik" and args.predictions:
        raise ValueError("--predictions is for --mode text; loglik mode scores with a model")
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"data file not found: {args.data}")
    tokenizer = _tokenizer(args.vocab) if mode == "loglik" else _maybe_tokenizer(args)
    gold = read_gold(args.data, tokenizer)
    n = len(gold.labels) if args.max_examples is None else min(len(gold.labels), args.max_examples)
    report, rows = (_text_mode if mode == "text" else _loglik_mode)(args, gold, n, tokenizer)
    report = {"mode": mode, **report, "data": str(Path(args.data).resolve()),
              "seconds": round(time.perf_counter() - t0, 3)}
    if args.output_file:
        from ...io.atomic import atomic_write_text
        atomic_write_text(Path(args.output_file), (json.dumps(r) + "\n" for r in rows))
    return report


def _text_mode(args, gold: Gold, n: int, tokenizer) -> Tuple[Dict, List[Dict]]:
    """Accuracy of the first words of generated answers; missing ids are reported, not scored."""
    if not Path(args.predictions).is_file():
        raise FileNotFoundError(f"predictions file not found: {args.predictions}")
    predictions = read_predictions(args.predictions, tokenizer)
    stray = sorted(i for i in predictions if not 0 <= i < len(gold.labels))
    if stray:
        raise ValueError(f"{args.predictions}: ids {stray[:5]} are not in {args.data} ({len(gold.labels)} examples)")
    ids = [i for i in range(n) if i in predictions]
    if len(ids) < n:
        print(f"warning: {n - len(ids)} of {n} examples have no prediction in {args.predictions}; "
              "scoring the others (n_missing in the JSON)", file=sys.stderr)
    parsed = {i: parse_answer(predictions[i]) for i in ids}
    rows = [{"id": i, "gold": gold.labels[i], "predicted": parsed[i] or UNPARSEABLE, "text": predictions[i]}
            for i in ids]
    bad = [r for r in rows if r["predicted"] == UNPARSEABLE]
    if bad:
        shown = "; ".join(repr(r["text"][:30]) for r in bad[:3])
        print(f"{len(bad)} unparseable answers (first word not yes/no), e.g. {shown}", file=sys.stderr)
    report = score([gold.labels[i] for i in ids], [parsed[i] for i in ids])
    return {**report, "predictions": str(Path(args.predictions).resolve()), "n_missing": n - len(ids)}, rows


def _loglik_mode(args, gold: Gold, n: int, tokenizer) -> Tuple[Dict, List[Dict]]:
    """Accuracy of the more likely of " yes" / " no" after each prompt."""
    if gold.contexts is None:
        raise ValueError(f"{args.data}: loglik mode needs the encoded file (test.jsonl), not the formatted one")
    ids_yes, ids_no = (_label_ids(tokenizer)[w] for w in LABELS)
    if len(ids_yes) != 1 or len(ids_no) != 1:
        raise ValueError(f"' yes' / ' no' must be single tokens, got {ids_yes} / {ids_no}")
    model = _build_model(args)
    max_len = min(args.seq_len or model.config.n_positions, model.config.n_positions)
    labels, contexts = gold.labels[:n], gold.contexts[:n]
    t0 = time.perf_counter()
    logp = loglik_scores(model, contexts, ids_yes[0], ids_no[0], batch_size=args.batch_size, max_len=max_len,
                         progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    predicted = [LABELS[0] if y >= no else LABELS[1] for y, no in logp]
    rows = [{"id": i, "gold": g, "predicted": p, "logp_yes": float(logp[i, 0]), "logp_no": float(logp[i, 1])}
            for i, (g, p) in enumerate(zip(labels, predicted))]
    extra = {"n_context_truncated": sum(len(c) > max_len for c in contexts),
             "mean_logp_gold": float(np.mean([logp[i, LABELS.index(g)] for i, g in enumerate(labels)])),
             "examples_per_s": round(n / max(seconds, 1e-9), 2)}
    return {**score(labels, predicted), **extra}, rows


def _maybe_tokenizer(args):
    """The tokenizer if one can be found (token-id predictions need it; text ones do not)."""
    try:
        return _tokenizer(args.vocab)
    except FileNotFoundError:
        if args.vocab is not None:
            raise
        return None


def _build_model(args):
    """The model the flags describe, loaded exactly as ``jt_lora.generate`` loads it (eval mode)."""
    from ...models.loading import build_model
    return build_model(args)


if __name__ == "__main__":
    sys.exit(main())
