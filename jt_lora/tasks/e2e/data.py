"""E2E NLG data preparation: ``MR||text`` files or the official CSVs -> LoRA's JSONL files.

Two outputs per split, as in microsoft/LoRA's ``create_datasets.sh``:

* formatted JSONL (``format_converting_e2e.py``): ``{"context": MR, "completion": text}``, where a
  txt line is stripped, split at ``||``, and the first part is the MR, the second the text;
* encoded JSONL (``gpt2_encode.py --add_bos --add_eos``): ``context = encode(MR) + [50256]`` and
  ``completion = encode(" " + text) + [50256]``, with GPT-2 BPE from :mod:`jt_lora.models.tokenizer`.

The official CSVs (``mr,ref``) write MRs as ``name[The Mill], eatType[pub], priceRange[£20-25]``;
LoRA's txt files hold the same rows, in the same order, as ``name : The Mill | Type : pub |
price : £ 20 - 25``. :func:`official_mr_to_lora` performs that conversion; it reproduces every one
of the 9,365 MRs of LoRA's valid.txt/test.txt from devset.csv/testset_w_refs.csv. LoRA's texts are
also word-tokenized (``It 's near the centre .``); :func:`lora_tokenize` approximates that (99.1% of
those rows exact, the rest differ because the original tokenization is itself inconsistent, e.g.
``isn't`` became both ``isn 't`` and ``is n't``), so CSV texts are kept verbatim unless asked.

Outputs are written atomically and re-used while their sidecar ``<output>.meta.json`` says they
were built from the same inputs with the same settings.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from jt_lora.io.assets import try_find_asset
from jt_lora.io.atomic import atomic_write_text
from jt_lora.io.textio import iter_text_lines
from jt_lora.tasks.prepared import (BOS_ID, EOS_ID, BadLines, encoded_jsonl_lines, fingerprint, gc_paused,
                                    load_cached_result, meta_path, vocab_fingerprint, write_json, write_jsonl)

FORMAT_VERSION = 1
SEPARATOR = "||"
TEXT_STYLES = ("raw", "lora")
# Official attribute names -> the names LoRA's txt files use (all others are kept as they are).
LORA_ATTRIBUTE_NAMES = {"eatType": "Type", "familyFriendly": "family friendly", "priceRange": "price"}
# Where each split is looked for, in order (paths relative to a data root, see jt_lora.io.assets).
SPLIT_SOURCES = {
    "train": ("e2e/train.txt", "e2e-csv/trainset.csv"),
    "valid": ("e2e/valid.txt", "e2e-csv/devset.csv"),
    "test": ("e2e/test.txt", "e2e-csv/testset_w_refs.csv"),
}


@dataclass(frozen=True)
class Example:
    """One (MR, text) pair and where it came from."""

    context: str
    completion: str
    line: int  # 1-based line in the source file (a CSV record's first line)


@dataclass
class ReadResult:
    """Examples read from one file, plus the bad lines skipped (only with ``skip_bad_lines``)."""

    path: Path
    examples: List[Example]
    bad_lines: List[str] = field(default_factory=list)  # "file:line: reason", in file order


# ----------------------------------------------------------------------------- text conversion


def lora_tokenize(text: str) -> str:
    """Word-tokenize like LoRA's E2E txt files (an approximation, see the module docstring).

    Splits punctuation, ``£``, hyphens inside words and numbers, quotes and PTB-style contractions
    (``it's`` -> ``it 's``, ``isn't`` -> ``is n't``), and collapses whitespace.
    """
    text = re.sub(r"(?<=\s)'(?=\w)|(?<=\w)'(?=\s|$|[.,])", " ' ", text)  # quotes, not contractions
    text = re.sub(r"([A-Za-z])n't\b", r"\1 n't", text)
    text = re.sub(r"(?<=\w)'(s|re|ve|ll|d|m)\b", r" '\1", text)
    text = re.sub(r'([,!?;:()"£&/])', r" \1 ", text)
    text = re.sub(r"(?<=[A-Za-z])-(?=[A-Za-z])|(?<=\d)-(?=\d)", " - ", text)
    text = re.sub(r"\.(?=\s|$|[A-Z])", " . ", text)
    return " ".join(text.split())


_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(?:,|$)")


def parse_official_mr(mr: str) -> List[Tuple[str, str]]:
    """``"name[The Mill], eatType[pub]"`` -> ``[("name", "The Mill"), ("eatType", "pub")]``.

    Raises:
        ValueError: the string is not a comma-separated list of ``attribute[value]`` items.
    """
    items, pos = [], 0
    for m in _MR_ITEM.finditer(mr):
        if m.start() != pos:
            break
        items.append((m.group(1), m.group(2)))
        pos = m.end()
    if not items or pos != len(mr):
        raise ValueError(f"not an E2E meaning representation (attribute[value], ...): {mr!r}")
    return items


def official_mr_to_lora(mr: str) -> str:
    """Official MR notation -> LoRA's: ``name : The Mill | Type : pub | price : £ 20 - 25``."""
    return " | ".join(f"{LORA_ATTRIBUTE_NAMES.get(k, k)} : {lora_tokenize(v)}" for k, v in parse_official_mr(mr))


# ----------------------------------------------------------------------------- reading


def _finish(path: Path, examples: List[Example], bad: BadLines, n_lines: int) -> ReadResult:
    if n_lines == 0:
        raise ValueError(f"{path}: file is empty (no examples)")
    if not examples:
        raise ValueError(f"{path}: no usable examples ({len(bad.found)} bad lines skipped)")
    return ReadResult(path, examples, bad.found)


def read_txt(path, *, skip_bad_lines: bool = False, limit: Optional[int] = None) -> ReadResult:
    """Read an ``MR||text`` file (LoRA's e2e/{train,valid,test}.txt).

    Like LoRA's converter, the line is stripped and the text keeps no trailing space. A line
    without exactly one ``||``, or with an empty MR or text, is bad.

    Args:
        path: the txt file.
        skip_bad_lines: skip and report bad lines instead of raising on the first one.
        limit: keep only the first ``limit`` examples.

    Raises:
        ValueError: naming file and line, for a bad line (unless skipped) or an empty file.
    """
    path = Path(path)
    bad, examples, n_lines = BadLines(path, skip_bad_lines), [], 0
    for n_lines, line in iter_text_lines(path):   # non-UTF-8 bytes: an error naming file:line:column
        if limit is not None and len(examples) >= limit:
            break
        parts = line.strip().split(SEPARATOR)
        if len(parts) != 2:
            what = "a blank line" if not line.strip() else f"{len(parts) - 1} '||' separators, expected 1"
            bad(n_lines, f"{what}: {line.strip()[:80]!r}")
        elif not parts[0].strip() or not parts[1].strip():
            bad(n_lines, f"empty {'MR' if not parts[0].strip() else 'text'}: {line.strip()[:80]!r}")
        else:
            examples.append(Example(parts[0], parts[1], n_lines))
    return _finish(path, examples, bad, n_lines)


def read_csv(
    path, *, text_style: str = "raw", skip_bad_lines: bool = False, limit: Optional[int] = None
) -> ReadResult:
    """Read an official E2E CSV (``mr,ref``) into LoRA-notation examples.

    Args:
        path: e.g. ``devset.csv`` or ``testset_w_refs.csv`` (``testset.csv`` has no references).
        text_style: ``"raw"`` keeps each reference verbatim; ``"lora"`` applies :func:`lora_tokenize`.
        skip_bad_lines: skip and report bad records instead of raising.
        limit: keep only the first ``limit`` examples.

    Raises:
        ValueError: naming file and line, for a bad header, a bad record (unless skipped) or an
            empty file.
    """
    if text_style not in TEXT_STYLES:
        raise ValueError(f"text_style must be one of {TEXT_STYLES}, got {text_style!r}")
    path = Path(path)
    bad, examples = BadLines(path, skip_bad_lines), []
    with contextlib.closing(iter_text_lines(path)) as lines:
        reader = csv.reader(text for _, text in lines)   # UTF-8 checked per line, file:line:column
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: file is empty (no examples)")
        columns = [c.strip().lower() for c in header]
        if "mr" not in columns or "ref" not in columns:
            raise ValueError(
                f"{path}:1: bad CSV header {header}; expected columns 'mr' and 'ref' "
                "(the official testset.csv has no references: use testset_w_refs.csv)"
            )
        i_mr, i_ref = columns.index("mr"), columns.index("ref")
        start = reader.line_num + 1
        n_records = 0
        for row in reader:
            line, start = start, reader.line_num + 1
            if limit is not None and len(examples) >= limit:
                break
            if not row:
                continue  # csv yields [] for a blank line between records
            n_records += 1
            if len(row) != len(header):
                bad(line, f"{len(row)} fields, the header has {len(header)}: {row}")
                continue
            mr, ref = row[i_mr].strip(), row[i_ref].strip()
            if not mr or not ref:
                bad(line, f"empty {'mr' if not mr else 'ref'}: {row}")
                continue
            try:
                context = official_mr_to_lora(mr)
            except ValueError as e:
                bad(line, str(e))
                continue
            examples.append(Example(context, lora_tokenize(ref) if text_style == "lora" else ref, line))
    if n_records == 0:
        raise ValueError(f"{path}: file has a header but no records")
    return _finish(path, examples, bad, n_records)


def read_examples(path, **kwargs) -> ReadResult:
    """:func:`read_csv` for ``*.csv``, else :func:`read_txt` (``text_style`` applies to CSV only)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path, **kwargs)
    kwargs.pop("text_style", None)
    return read_txt(path, **kwargs)


# ----------------------------------------------------------------------------- conversion


def formatted_records(examples: Iterable[Example]) -> List[Dict[str, str]]:
    """LoRA's formatted JSONL records: ``{"context": MR, "completion": text}``."""
    return [{"context": e.context, "completion": e.completion} for e in examples]


def encode_examples(examples: Sequence[Example], tokenizer, add_bos: bool = True, add_eos: bool = True) -> List[Dict]:
    """LoRA's encoded records (gpt2_encode.py): context ids [+ bos], ids of ' ' + text [+ eos].

    Args:
        examples: the pairs to encode.
        tokenizer: anything with ``encode_batch(list[str]) -> list[list[int]]`` (see jt_lora.models.tokenizer).
        add_bos: append 50256 to the context (it separates MR and text; LoRA always sets it).
        add_eos: append 50256 to the completion (teaches the model to stop).
    """
    contexts = tokenizer.encode_batch([e.context for e in examples])
    completions = tokenizer.encode_batch([" " + e.completion for e in examples])
    bos, eos = [BOS_ID] if add_bos else [], [EOS_ID] if add_eos else []
    return [{"context": c + bos, "completion": t + eos} for c, t in zip(contexts, completions)]


@dataclass
class ConvertResult:
    """What :func:`convert_file` did (also stored in the output's ``.meta.json``)."""

    source: str
    output: str
    formatted_output: Optional[str]
    n_examples: int
    n_bad_lines: int
    bad_lines: List[str]  # the first few, "file:line: reason"
    length_histogram: Dict[str, int]  # len(context) + len(completion) -> number of examples
    cached: bool = False
    seconds: float = 0.0

    def n_longer_than(self, seq_len: int) -> int:
        """Examples the loader will truncate at ``seq_len`` (context + completion longer than it)."""
        return sum(n for length, n in self.length_histogram.items() if int(length) > seq_len)


def convert_file(
    source,
    output,
    formatted_output=None,
    *,
    vocab_dir=None,
    add_bos: bool = True,
    add_eos: bool = True,
    text_style: str = "raw",
    skip_bad_lines: bool = False,
    start: int = 0,
    stop: Optional[int] = None,
    limit: Optional[int] = None,
    force: bool = False,
) -> ConvertResult:
    """Convert one E2E file (txt or CSV) to encoded JSONL, and optionally formatted JSONL.

    Skips the work when ``output`` is newer than ``source`` and its ``.meta.json`` records the same
    source, vocab and settings (unless ``force``).

    Args:
        source: ``MR||text`` txt file or official CSV.
        output: encoded JSONL path (``{"context": ids, "completion": ids}``).
        formatted_output: optional formatted JSONL path (``{"context": str, "completion": str}``).
        vocab_dir: GPT-2 vocab directory (None: the ``gpt2-vocab`` asset).
        add_bos, add_eos: as ``gpt2_encode.py --add_bos --add_eos`` (both on by default, like LoRA).
        text_style: for CSV sources, ``"raw"`` or ``"lora"`` (see :func:`read_csv`).
        skip_bad_lines: skip and count bad lines instead of raising.
        start, stop: keep examples ``[start:stop]`` (used to carve a demo train split from valid).
        limit: then keep only the first ``limit`` of those.
        force: re-convert even if the cached output looks current.
    """
    from jt_lora.models.tokenizer import load_tokenizer  # tiktoken is only needed when encoding

    t0 = time.perf_counter()
    source, output = Path(source), Path(output)
    formatted_output = Path(formatted_output) if formatted_output else None
    tokenizer = load_tokenizer(vocab_dir)
    settings = {
        "format_version": FORMAT_VERSION,
        "add_bos": add_bos,
        "add_eos": add_eos,
        "text_style": text_style if source.suffix.lower() == ".csv" else None,
        "skip_bad_lines": skip_bad_lines,
        "start": start,
        "stop": stop,
        "limit": limit,
        "vocab_sha256": vocab_fingerprint(tokenizer.vocab_dir),
        "formatted_output": str(formatted_output.resolve()) if formatted_output else None,
    }
    if not force:
        cached = load_cached_result(source, [output] + ([formatted_output] if formatted_output else []),
                                    settings, ConvertResult)
        if cached is not None:
            cached.seconds = time.perf_counter() - t0
            return cached

    with gc_paused():
        read = read_examples(source, text_style=text_style, skip_bad_lines=skip_bad_lines, limit=stop)
        examples = read.examples[start:stop][:limit]
        if not examples:
            raise ValueError(f"{source}: no examples in the range [{start}:{stop}] (file has {len(read.examples)})")
        records = encode_examples(examples, tokenizer, add_bos=add_bos, add_eos=add_eos)
        histogram: Dict[str, int] = {}
        for r in records:
            key = str(len(r["context"]) + len(r["completion"]))
            histogram[key] = histogram.get(key, 0) + 1
        if formatted_output:
            write_jsonl(formatted_output, formatted_records(examples))
        atomic_write_text(output, encoded_jsonl_lines(records))
    result = ConvertResult(
        source=str(source),
        output=str(output),
        formatted_output=str(formatted_output) if formatted_output else None,
        n_examples=len(records),
        n_bad_lines=len(read.bad_lines),
        bad_lines=read.bad_lines[:10],
        length_histogram=dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
    )
    stored = asdict(result)
    del stored["cached"], stored["seconds"]
    write_json(meta_path(output), {"settings": settings, "source": fingerprint(source), "result": stored})
    result.seconds = time.perf_counter() - t0
    return result


def first_mr_boundary(examples: Sequence[Example], n: int) -> int:
    """The smallest index >= n where the MR changes, so that [:i] and [i:] share no MR."""
    i = max(1, n)
    while i < len(examples) and examples[i].context == examples[i - 1].context:
        i += 1
    return min(i, len(examples))


def find_split_source(split: str, source: str = "auto", data_dir=None) -> Optional[Path]:
    """Where a split's data is: the txt file, else the official CSV (``source`` = auto|txt|csv).

    Args:
        split: ``train``, ``valid`` or ``test``.
        source: ``"txt"`` or ``"csv"`` to accept only that kind.
        data_dir: an explicit data root (a flag); None uses the :mod:`jt_lora.io.assets` search order.
    """
    txt, csv_name = SPLIT_SOURCES[split]
    candidates = {"auto": (txt, csv_name), "txt": (txt,), "csv": (csv_name,)}[source]
    for rel in candidates:
        if data_dir is not None:
            path = Path(data_dir) / rel
            if path.exists():
                return path.resolve()
        else:
            found = try_find_asset(rel)
            if found is not None:
                return found
    return None


def prepare_e2e(
    out_dir,
    splits: Sequence[str] = ("train", "valid", "test"),
    *,
    data_dir=None,
    source: str = "auto",
    train_from_valid: Optional[int] = None,
    log=print,
    **convert_kwargs,
) -> Dict[str, ConvertResult]:
    """Prepare every split that is found into ``out_dir/{split}.jsonl`` + ``{split}_formatted.jsonl``.

    Args:
        out_dir: output directory.
        splits: which of train/valid/test to prepare.
        data_dir: explicit data root; None searches ``$JT_LORA_DATA``, ``data/``, ``../shared/data``.
        source: ``auto`` (txt, else CSV), ``txt`` or ``csv``.
        train_from_valid: only when no train file is found: use the first N valid examples (N rounded
            up to a whole MR group) as train and the rest as valid. For offline demos only: the
            official train set has 42k examples, and this valid set loses those N.
        log: where progress messages go.
        **convert_kwargs: passed to :func:`convert_file` (vocab_dir, limit, skip_bad_lines, ...).

    Returns:
        ``{split: ConvertResult}`` for the splits prepared.
    """
    out_dir = Path(out_dir)
    sources = {s: find_split_source(s, source, data_dir) for s in splits}
    ranges: Dict[str, Tuple[int, Optional[int]]] = {s: (0, None) for s in splits}
    if "train" in splits and sources["train"] is None:
        looked = ", ".join(SPLIT_SOURCES["train"])
        valid_src = sources.get("valid") or find_split_source("valid", source, data_dir)
        if train_from_valid and valid_src is not None:
            kw = {k: v for k, v in convert_kwargs.items() if k in ("skip_bad_lines", "text_style")}
            valid_examples = read_examples(valid_src, **kw).examples
            cut = first_mr_boundary(valid_examples, train_from_valid)
            if cut >= len(valid_examples):
                raise ValueError(f"--train_from_valid {train_from_valid} leaves no valid examples ({valid_src})")
            sources["train"], ranges["train"] = valid_src, (0, cut)
            if "valid" in splits:
                ranges["valid"] = (cut, None)
            log(
                f"train: no train data found ({looked}); DEMO ONLY: using the first {cut} examples of "
                f"{valid_src.name} as train and the remaining {len(valid_examples) - cut} as valid"
            )
        else:
            log(
                f"train: not found ({looked}) in any data root; it is not available offline. "
                "Run `bash scripts/download_data.sh` when online, or pass --train_from_valid N "
                "to carve a small demo train split out of valid."
            )
            sources["train"] = None
    elif train_from_valid and "train" in splits:
        log(f"train: found {sources['train']}; --train_from_valid ignored")

    results = {}
    for split in splits:
        src = sources[split]
        if src is None:
            if split != "train":
                log(f"{split}: not found ({', '.join(SPLIT_SOURCES[split])}); skipped")
            continue
        start, stop = ranges[split]
        result = convert_file(
            src,
            out_dir / f"{split}.jsonl",
            out_dir / f"{split}_formatted.jsonl",
            start=start,
            stop=stop,
            **convert_kwargs,
        )
        status = "cached" if result.cached else f"{result.seconds:.2f}s"
        bad = f", {result.n_bad_lines} bad lines skipped" if result.n_bad_lines else ""
        log(f"{split}: {result.n_examples} examples from {src} -> {result.output} ({status}{bad})")
        for message in result.bad_lines[:3]:
            log(f"  skipped {message}")
        results[split] = result
    return results
