"""BoolQ data preparation: the official JSONL -> LoRA-style formatted and encoded JSONL.

BoolQ (Clark et al., 2019) has one JSON object per line: ``question`` (lower case, no question
mark), ``title`` (the Wikipedia article), ``passage`` and ``answer`` (``true``/``false``). Each
example becomes a prompt/completion pair for the same training and generation code as E2E:

* formatted JSONL: ``{"context": prompt, "completion": "yes" | "no"}``, with the prompt
  ``"{title}: {passage}\\nQuestion: {question}?\\nAnswer:"`` by default (:data:`DEFAULT_TEMPLATE`);
* encoded JSONL: ``context = encode(prompt) + [50256]``, ``completion = encode(" yes") + [50256]``
  (or `` no``), as :mod:`jt_lora.tasks.e2e.data` writes E2E.

The training loader cuts ``context + completion`` at ``seq_len`` from the right, which would cut
the answer. So passages are truncated here instead, at a word boundary from the end, until the
whole example fits ``seq_len``; the question and the answer are always kept. The budget uses the
longer of the two completions, so a passage is cut the same whether the answer is yes or no (the
cut must not leak the label).

Splits: the official test labels are hidden, so the official dev file serves as test, and the
official train file is split into train/valid with a seed. By default whole passages go to one
side (BoolQ asks several questions about some passages), so valid never shares a passage with
train.

Outputs are written atomically with a ``.meta.json`` beside each, and re-used while it records the
same source, vocab and settings (the conventions and helpers of :mod:`jt_lora.tasks.prepared`).
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from jt_lora.io.assets import try_find_asset
from jt_lora.io.textio import iter_text_lines
from jt_lora.io.atomic import atomic_write_text
from jt_lora.tasks.prepared import (BOS_ID, EOS_ID, BadLines, encoded_jsonl_lines, fingerprint, gc_paused,
                                    load_cached_result, meta_path, vocab_fingerprint, write_json, write_jsonl)

FORMAT_VERSION = 1
DEFAULT_TEMPLATE = "{title}: {passage}\nQuestion: {question}?\nAnswer:"
NO_TITLE_TEMPLATE = "{passage}\nQuestion: {question}?\nAnswer:"
LABELS = ("yes", "no")  # completion words for answer true / false
SPLIT_BY = ("passage", "example")
# Official files, relative to a data root (scripts/download_data.sh boolq puts them there).
OFFICIAL_FILES = {"train": "boolq/train.jsonl", "dev": "boolq/dev.jsonl"}


@dataclass(frozen=True)
class Example:
    """One BoolQ question and where it came from."""

    question: str
    passage: str
    answer: bool
    title: str = ""
    line: int = 0  # 1-based line in the source file


@dataclass
class ReadResult:
    """Examples read from one file, plus the bad lines skipped (only with ``skip_bad_lines``)."""

    path: Path
    examples: List[Example]
    bad_lines: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading


def _check_record(record, bad: BadLines, line: int) -> Optional[Example]:
    """An Example from one decoded JSON line, or None after reporting why it is bad."""
    if not isinstance(record, dict):
        bad(line, f"expected a JSON object, got {type(record).__name__}")
        return None
    for key in ("question", "passage"):
        value = record.get(key)
        if key not in record:
            bad(line, f"missing field {key!r} (has {sorted(record)})")
            return None
        if not isinstance(value, str) or not value.strip():
            bad(line, f"field {key!r} must be a non-empty string, got {json.dumps(value)[:60]}")
            return None
    # The official files call the label "answer"; SuperGLUE's copy of BoolQ calls it "label".
    key = "answer" if "answer" in record else "label" if "label" in record else None
    if key is None:
        bad(line, f"missing field 'answer' (has {sorted(record)}; the official test file has no labels)")
        return None
    if not isinstance(record[key], bool):
        bad(line, f"field {key!r} must be true or false, got {json.dumps(record[key])[:60]}")
        return None
    title = record.get("title", "")
    if title is None:
        title = ""
    if not isinstance(title, str):
        bad(line, f"field 'title' must be a string, got {json.dumps(title)[:60]}")
        return None
    return Example(record["question"].strip(), record["passage"].strip(), record[key], title.strip(), line)


def read_boolq(path, *, skip_bad_lines: bool = False, limit: Optional[int] = None) -> ReadResult:
    """Read a BoolQ JSONL file (blank lines are ignored).

    Args:
        path: e.g. ``boolq/train.jsonl`` or ``boolq/dev.jsonl``.
        skip_bad_lines: skip and report bad lines instead of raising on the first one.
        limit: keep only the first ``limit`` examples.

    Raises:
        ValueError: naming file and line, for invalid JSON, a missing field, a field of the wrong
            type (``answer`` must be a JSON boolean) or an empty string (unless skipped); or for a
            file without examples.
    """
    path = Path(path)
    bad, examples = BadLines(path, skip_bad_lines), []
    for line_no, line in iter_text_lines(path):   # non-UTF-8 bytes: an error naming file:line:column
        if limit is not None and len(examples) >= limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))   # with the line end, errors say "column 1"
        except json.JSONDecodeError as e:
            bad(line_no, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        example = _check_record(record, bad, line_no)
        if example is not None:
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no usable examples ({len(bad.found)} bad lines skipped)")
    return ReadResult(path, examples, bad.found)


# ----------------------------------------------------------------------------- prompts


def check_template(template: str) -> None:
    """A template needs ``{passage}`` and ``{question}``; ``{title}`` is optional.

    Raises:
        ValueError: a placeholder is missing, unknown, or the template is not a format string.
    """
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"bad template {template!r}: {e}") from None
    missing, unknown = {"passage", "question"} - names, names - {"passage", "question", "title"}
    if missing or unknown:
        raise ValueError(f"template {template!r}: needs {{passage}} and {{question}}, may use {{title}}"
                         + (f"; missing {sorted(missing)}" if missing else "")
                         + (f"; unknown {sorted(unknown)}" if unknown else ""))


def render_prompt(example: Example, template: str = DEFAULT_TEMPLATE, passage: Optional[str] = None) -> str:
    """The prompt text for ``example`` (``passage`` replaces its passage, e.g. a truncated one).

    The question loses a trailing ``?`` (the default template adds one); an example without a
    title drops the ``"{title}: "`` prefix of the default template rather than printing ``": "``.
    """
    if not example.title and template == DEFAULT_TEMPLATE:
        template = NO_TITLE_TEMPLATE
    question = example.question.rstrip().rstrip("?").rstrip()
    return template.format(title=example.title, passage=example.passage if passage is None else passage,
                           question=question)


def label_word(answer: bool) -> str:
    return LABELS[0] if answer else LABELS[1]


@dataclass
class Fitted:
    """A prompt that fits the token budget."""

    text: str
    ids: List[int]
    truncated: bool  # the passage was cut
    words_dropped: int = 0


def fit_prompt(example: Example, tokenizer, budget: int, template: str = DEFAULT_TEMPLATE,
               ids: Optional[List[int]] = None) -> Fitted:
    """Render ``example`` in at most ``budget`` tokens, cutting the passage at a word end if needed.

    Keeps the longest prefix of the passage's words that fits (binary search over the word count;
    the token count only grows with more words, and the result is checked either way).

    Args:
        example: the example.
        tokenizer: anything with ``encode(str) -> list[int]``.
        budget: maximum number of prompt tokens.
        template: see :func:`render_prompt`.
        ids: the token ids of the untruncated prompt, if already known.

    Raises:
        ValueError: even with an empty passage the prompt has more than ``budget`` tokens (the
            question or title is too long for ``seq_len``).
    """
    text = render_prompt(example, template)
    if ids is None:
        ids = tokenizer.encode(text)
    if len(ids) <= budget:
        return Fitted(text, ids, False)
    ends = [m.end() for m in re.finditer(r"\S+", example.passage)]

    def attempt(k: int) -> Tuple[str, List[int]]:
        t = render_prompt(example, template, example.passage[: ends[k - 1]] if k else "")
        return t, tokenizer.encode(t)

    best = attempt(0)
    if len(best[1]) > budget:
        raise ValueError(f"the prompt has {len(best[1])} tokens with an empty passage, more than the {budget} "
                         "allowed by seq_len (question or title too long; raise --seq_len)")
    lo, hi = 0, len(ends) - 1  # k = lo fits; k = len(ends) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = attempt(mid)
        if len(found[1]) <= budget:
            lo, best = mid, found
        else:
            hi = mid - 1
    return Fitted(best[0], best[1], True, len(ends) - lo)


# ----------------------------------------------------------------------------- splits


def split_train_valid(examples: Sequence[Example], valid_size: float, seed: int,
                      split_by: str = "passage") -> Tuple[List[Example], List[Example]]:
    """Seeded train/valid split, both in file order.

    Args:
        examples: the official train examples.
        valid_size: a count (>= 1) or a fraction of the examples (< 1).
        seed: the same seed, examples and settings give the same split (it does not depend on the
            template, vocab or seq_len).
        split_by: ``"passage"`` keeps all questions about one passage on one side (valid then has
            at least ``valid_size`` examples, overshooting by less than one passage's questions);
            ``"example"`` splits single examples (exactly ``valid_size``).

    Raises:
        ValueError: ``valid_size`` leaves no train or no valid examples, or ``split_by`` is unknown.
    """
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    n = len(examples)
    if 0 < valid_size < 1:
        n_valid = int(round(valid_size * n))
    elif valid_size >= 1 and float(valid_size).is_integer():
        n_valid = int(valid_size)
    else:
        n_valid = -1
    if not 1 <= n_valid < n:
        raise ValueError(f"valid_size {valid_size} must be a whole count in [1, {n - 1}] or a fraction in (0, 1) "
                         f"giving at least one example on each side ({n} examples)")
    groups: Dict[str, List[int]] = {}
    for i, e in enumerate(examples):
        key = f"{e.title}\n{e.passage}" if split_by == "passage" else str(i)
        groups.setdefault(key, []).append(i)
    order = list(groups.values())  # first-appearance order: deterministic
    random.Random(seed).shuffle(order)
    valid = set()
    for members in order:
        if len(valid) >= n_valid:
            break
        valid.update(members)
    if len(valid) >= n:
        raise ValueError(f"valid_size {valid_size}: whole passages leave no train examples; use split_by='example'")
    return [e for i, e in enumerate(examples) if i not in valid], [e for i, e in enumerate(examples) if i in valid]


# ----------------------------------------------------------------------------- conversion


@dataclass
class SplitResult:
    """What :func:`convert_examples` wrote (also stored in the output's ``.meta.json``)."""

    split: str
    source: str
    output: str
    formatted_output: str
    n_examples: int
    n_yes: int
    n_no: int
    n_truncated: int  # passages cut so that question and answer fit seq_len
    max_length: int  # longest len(context) + len(completion), at most seq_len
    mean_length: float
    n_bad_lines: int = 0
    bad_lines: List[str] = field(default_factory=list)  # the first few, "file:line: reason"
    cached: bool = False
    seconds: float = 0.0


def encode_examples(examples: Sequence[Example], tokenizer, seq_len: int, *, template: str = DEFAULT_TEMPLATE,
                    add_bos: bool = True, add_eos: bool = True, on_error=None) -> Tuple[List[Dict], List[Dict], int]:
    """Formatted and encoded records for ``examples``, each fitting ``seq_len`` tokens.

    Args:
        examples: the examples.
        tokenizer: anything with ``encode`` and ``encode_batch`` (see :mod:`jt_lora.models.tokenizer`).
        seq_len: the training ``--seq_len``: ``len(context) + len(completion) <= seq_len``.
        template: see :func:`render_prompt`.
        add_bos, add_eos: append 50256 to the context / completion, as for E2E.
        on_error: ``f(line, reason)`` for an example that cannot fit (default: raise ValueError).

    Returns:
        (formatted records, encoded records, number of truncated passages).
    """
    bos, eos = [BOS_ID] if add_bos else [], [EOS_ID] if add_eos else []
    completions = {word: tokenizer.encode(" " + word) + eos for word in LABELS}
    budget = seq_len - len(bos) - max(len(c) for c in completions.values())
    if budget < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for a prompt")
    prompts = [render_prompt(e, template) for e in examples]
    all_ids = tokenizer.encode_batch(prompts)
    formatted, encoded, n_truncated = [], [], 0
    for e, ids in zip(examples, all_ids):
        try:
            fitted = fit_prompt(e, tokenizer, budget, template, ids)
        except ValueError as err:
            if on_error is None:
                raise ValueError(f"line {e.line}: {err}") from None
            on_error(e.line, str(err))
            continue
        n_truncated += fitted.truncated
        word = label_word(e.answer)
        formatted.append({"context": fitted.text, "completion": word})
        encoded.append({"context": fitted.ids + bos, "completion": list(completions[word])})
    return formatted, encoded, n_truncated


def convert_examples(split: str, examples: Sequence[Example], source, output, formatted_output, tokenizer,
                     settings: Dict, *, bad_lines: Sequence[str] = (), skip_bad_lines: bool = False) -> SplitResult:
    """Encode ``examples`` and write both JSONL files and the ``.meta.json`` (all atomically)."""
    t0 = time.perf_counter()
    output, formatted_output = Path(output), Path(formatted_output)
    bad = BadLines(Path(source), skip_bad_lines)
    with gc_paused():
        formatted, encoded, n_truncated = encode_examples(
            examples, tokenizer, settings["seq_len"], template=settings["template"], add_bos=settings["add_bos"],
            add_eos=settings["add_eos"], on_error=bad)
        if not encoded:
            raise ValueError(f"{source}: no {split} example fits seq_len {settings['seq_len']}")
        lengths = [len(r["context"]) + len(r["completion"]) for r in encoded]
        write_jsonl(formatted_output, formatted)
        atomic_write_text(output, encoded_jsonl_lines(encoded))
    all_bad = list(bad_lines) + bad.found
    n_yes = sum(r["completion"] == LABELS[0] for r in formatted)
    result = SplitResult(split=split, source=str(source), output=str(output), formatted_output=str(formatted_output),
                         n_examples=len(encoded), n_yes=n_yes, n_no=len(encoded) - n_yes, n_truncated=n_truncated,
                         max_length=max(lengths), mean_length=round(sum(lengths) / len(lengths), 2),
                         n_bad_lines=len(all_bad), bad_lines=all_bad[:10])
    stored = asdict(result)
    del stored["cached"], stored["seconds"]
    write_json(meta_path(output), {"settings": settings, "source": fingerprint(Path(source)), "result": stored})
    result.seconds = time.perf_counter() - t0
    return result


def find_official(name: str, data_dir=None) -> Optional[Path]:
    """The official ``train`` or ``dev`` file under ``data_dir``, else the asset search order."""
    rel = OFFICIAL_FILES[name]
    if data_dir is not None:
        path = Path(data_dir) / rel
        return path.resolve() if path.exists() else None
    return try_find_asset(rel)


def prepare_boolq(
    out_dir,
    *,
    train_file=None,
    dev_file=None,
    data_dir=None,
    seq_len: int = 512,
    valid_size: float = 0.1,
    seed: int = 110,
    split_by: str = "passage",
    template: str = DEFAULT_TEMPLATE,
    add_bos: bool = True,
    add_eos: bool = True,
    vocab_dir=None,
    skip_bad_lines: bool = False,
    limit: Optional[int] = None,
    force: bool = False,
    log=print,
) -> Dict[str, SplitResult]:
    """Write ``out_dir/{train,valid,test}.jsonl`` + ``{split}_formatted.jsonl`` (+ ``.meta.json``).

    train/valid come from the official train file (seeded split), test from the official dev file.
    A missing official file is reported and its splits skipped.

    Args:
        out_dir: output directory.
        train_file, dev_file: explicit sources; None looks for ``boolq/{train,dev}.jsonl`` under
            ``data_dir``, or else in the :mod:`jt_lora.io.assets` search order.
        seq_len: every example fits this many tokens (passages are cut, see :func:`fit_prompt`).
        valid_size, seed, split_by: see :func:`split_train_valid`.
        template: prompt template (see :func:`render_prompt`).
        add_bos, add_eos: append 50256 to context / completion (LoRA's convention; keep both).
        vocab_dir: GPT-2 vocab directory (None: the ``gpt2-vocab`` asset).
        skip_bad_lines: skip and count bad lines instead of raising.
        limit: read only the first ``limit`` examples of each file (quick runs).
        force: rebuild even if the outputs are current.
        log: where progress messages go.

    Returns:
        ``{split: SplitResult}`` for the splits written or found current.

    Raises:
        ValueError / FileNotFoundError: bad settings, a bad line (naming file and line), a missing
            explicit file, or no official file at all.
    """
    from jt_lora.models.tokenizer import load_tokenizer  # tiktoken is only needed when encoding

    check_template(template)
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    out_dir = Path(out_dir)
    sources = {}
    for name, explicit in (("train", train_file), ("dev", dev_file)):
        if explicit is not None and not Path(explicit).is_file():
            raise FileNotFoundError(f"BoolQ {name} file not found: {explicit}")
        sources[name] = Path(explicit).resolve() if explicit is not None else find_official(name, data_dir)
    if sources["train"] is None and sources["dev"] is None:
        raise FileNotFoundError(f"no BoolQ data found ({', '.join(OFFICIAL_FILES.values())}); run "
                                "`bash scripts/download_data.sh boolq` when online, or pass --train/--dev")
    tokenizer = load_tokenizer(vocab_dir)
    common = {"format_version": FORMAT_VERSION, "seq_len": seq_len, "template": template, "add_bos": add_bos,
              "add_eos": add_eos, "skip_bad_lines": skip_bad_lines, "limit": limit,
              "vocab_sha256": vocab_fingerprint(tokenizer.vocab_dir)}
    plan = {"train": ("train", {"valid_size": valid_size, "seed": seed, "split_by": split_by}),
            "valid": ("train", {"valid_size": valid_size, "seed": seed, "split_by": split_by}),
            "test": ("dev", {})}

    results: Dict[str, SplitResult] = {}
    pending = {}
    for split, (src_name, extra) in plan.items():
        source = sources[src_name]
        if source is None:
            log(f"{split}: official {src_name} file not found ({OFFICIAL_FILES[src_name]}); skipped")
            continue
        settings = {**common, **extra, "split": split}
        outputs = (out_dir / f"{split}.jsonl", out_dir / f"{split}_formatted.jsonl")
        cached = None if force else load_cached_result(source, outputs, settings, SplitResult)
        if cached is not None:
            results[split] = cached
        else:
            pending[split] = (source, outputs, settings)

    reads = {}
    for split, (source, outputs, settings) in pending.items():
        t0 = time.perf_counter()
        if source not in reads:
            reads[source] = read_boolq(source, skip_bad_lines=skip_bad_lines, limit=limit)
        read = reads[source]
        examples = read.examples
        if split in ("train", "valid"):
            train, valid = split_train_valid(examples, valid_size, seed, split_by)
            examples = train if split == "train" else valid
        result = convert_examples(split, examples, source, *outputs, tokenizer, settings,
                                  bad_lines=read.bad_lines, skip_bad_lines=skip_bad_lines)
        result.seconds = time.perf_counter() - t0
        results[split] = result

    for split in ("train", "valid", "test"):
        r = results.get(split)
        if r is None:
            continue
        status = "cached" if r.cached else f"{r.seconds:.2f}s"
        log(f"{split}: {r.n_examples} examples ({r.n_yes} yes, {r.n_no} no) from {r.source} -> {r.output} "
            f"({status}); {r.n_truncated} passages truncated to fit seq_len {seq_len}; "
            f"length mean {r.mean_length} max {r.max_length}"
            + (f"; {r.n_bad_lines} bad lines skipped" if r.n_bad_lines else ""))
        for message in r.bad_lines[:3]:
            log(f"  skipped {message}")
    return results
