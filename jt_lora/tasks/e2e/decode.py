"""Turn generated token ids into the E2E scorer's reference and prediction files.

The equivalent of microsoft/LoRA's ``examples/NLG/src/gpt2_decode.py`` for E2E:

* ``--input_file`` is the formatted test set, one JSON object per line with ``context`` (the MR)
  and ``completion`` (one human reference). Lines with the same context are one input; inputs keep
  the order in which their context first appears. With ``--ref_unique_file`` (one integer per
  input line) the integers group the lines instead of the context.
* ``--sample_file`` holds the generations, one JSON object per line with ``id`` (the input line it
  was generated from) and ``predict`` (token ids), as LoRA's ``gpt2_beam.py`` and
  ``jt_lora.generate`` write them; a line without ``predict`` may give the text as ``text``.
* Texts are cut at the first ``<|endoftext|>`` and the first blank line, then stripped.
* Output: the reference file (one input's references on consecutive lines, a blank line after each
  input) and the prediction file (one line per input), as ``jt_lora.metrics`` and the official
  scorer read them. Both are written to a temp file and renamed, so a crash never leaves half a file.

Where LoRA's script fails or writes a file the scorer would misread, this one stops with a message
or keeps the file well-formed: an input without a prediction is an error naming it (LoRA raises a
KeyError); a line break inside a text becomes a space (LoRA writes it through, shifting every later
line); an empty reference is an error (it would read as an input separator).

An input that occurs on several lines (E2E repeats each MR once per reference) can get several
predictions, and they need not agree: a batched run may pad the same prompt differently. As LoRA's
script does (it assigns ``refer_dict[key]['sample']`` for every sample line), the **last**
prediction in sample-file order is the one kept, so both give the same files.

Usage::

    python -m jt_lora.decode --vocab data/gpt2-vocab --sample_file work/predict.jsonl \\
        --input_file data/e2e/test_formatted.jsonl \\
        --output_ref_file work/e2e_ref.txt --output_pred_file work/e2e_pred.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Optional, Sequence

from ...io.atomic import atomic_write_text
from ...io.textio import iter_text_lines, parse_json_line

EOS_TEXT = "<|endoftext|>"
# Everything the scorer's line reader (str.splitlines) treats as a line break.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")


class DecodeError(Exception):
    """Bad input files, reported to the user without a traceback."""


def clean_text(text: str) -> str:
    """Cut at ``<|endoftext|>`` and at the first blank line, strip, and join any remaining lines."""
    text = text.split(EOS_TEXT)[0].split("\n\n")[0].strip()
    return _LINE_BREAKS.sub(" ", text)


def post_process(text: str, tokenize: bool = False, lower: bool = False) -> str:
    """LoRA's optional ``--lower`` then ``--tokenize`` (split at every non-word character)."""
    if lower:
        text = text.lower()
    if tokenize:
        text = " ".join(" ".join(re.split(r"(\W)", text)).split())
    return text


@dataclass
class Group:
    """One input: its references and, once seen, its prediction."""

    first_line: int  # 1-based line of the input file where this input first appears
    context: str
    references: List[str] = field(default_factory=list)
    prediction: Optional[str] = None


def _json_lines(path: str, what: str):
    """``(line_number, object)`` for each line of a JSONL file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DecodeError(f"{what} not found: {path}")
    try:
        for lineno, line in iter_text_lines(p):
            if not line.strip():
                raise DecodeError(f"{path}:{lineno}: empty line in {what} (one JSON object per line expected)")
            obj = parse_json_line(path, lineno, line)
            if not isinstance(obj, dict):
                raise DecodeError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
    except DecodeError:
        raise
    except ValueError as e:     # textio's UTF-8 and JSON errors (path:line:column): one error type for callers
        raise DecodeError(str(e)) from None


def read_unique_ids(path: str) -> List[int]:
    """The ``--ref_unique_file``: one integer per input line."""
    p = Path(path)
    if not p.is_file():
        raise DecodeError(f"ref_unique_file not found: {path}")
    ids = []
    for lineno, line in iter_text_lines(p):
        try:
            ids.append(int(line.strip()))
        except ValueError:
            raise DecodeError(f"{path}:{lineno}: expected an integer, got {line!r}") from None
    return ids


def group_references(input_file: str, unique_ids: Optional[Sequence[int]] = None):
    """Read the formatted test set.

    Returns:
        ``(groups, keys)``: the inputs in first-seen order (a dict key -> :class:`Group`), and for
        each input line (0-based, the ``id`` of the sample file) its group key.
    """
    groups: Dict[Hashable, Group] = {}
    keys: List[Hashable] = []
    for lineno, obj in _json_lines(input_file, "input_file"):
        for name in ("context", "completion"):
            if not isinstance(obj.get(name), str):
                raise DecodeError(f"{input_file}:{lineno}: missing string field {name!r}")
        if unique_ids is None:
            key = obj["context"]
        elif lineno > len(unique_ids):
            raise DecodeError(f"ref_unique_file has {len(unique_ids)} ids but {input_file} has more lines")
        else:
            key = unique_ids[lineno - 1]
        keys.append(key)
        ref = clean_text(obj["completion"])
        if not ref:
            raise DecodeError(f"{input_file}:{lineno}: empty reference (it would read as an input separator)")
        group = groups.setdefault(key, Group(first_line=lineno, context=obj["context"]))
        group.references.append(ref)
    if not keys:
        raise DecodeError(f"input_file {input_file} is empty")
    return groups, keys


def attach_predictions(groups: Dict[Hashable, Group], keys: Sequence[Hashable], sample_file: str,
                       decode_ids: Callable[[Sequence[int]], str]) -> int:
    """Give each input the last prediction in the sample file for any of its lines (the reference's rule).

    Every line is decoded and checked, including those a later line overrides.

    Returns:
        The number of sample lines read.

    Raises:
        DecodeError: a bad line, an ``id`` outside the input file, or an input left without a prediction.
    """
    n = 0
    for lineno, obj in _json_lines(sample_file, "sample_file"):
        n += 1
        idx = obj.get("id")
        if not isinstance(idx, int) or not 0 <= idx < len(keys):
            raise DecodeError(f"{sample_file}:{lineno}: id {idx!r} is not a line index of the input file "
                              f"(0..{len(keys) - 1})")
        group = groups[keys[idx]]
        if "predict" in obj:
            try:
                text = decode_ids(obj["predict"])
            except Exception as e:  # tiktoken raises several types for bad ids
                raise DecodeError(f"{sample_file}:{lineno}: cannot decode 'predict': {e}") from None
        elif isinstance(obj.get("text"), str):
            text = obj["text"]
        else:
            raise DecodeError(f"{sample_file}:{lineno}: no 'predict' token ids (or 'text')")
        group.prediction = clean_text(text)
    missing = [g for g in groups.values() if g.prediction is None]
    if missing:
        first = missing[0]
        raise DecodeError(
            f"{len(missing)} of {len(groups)} inputs have no prediction in {sample_file} (first: input "
            f"line {first.first_line}, context {first.context[:80]!r}); was generation interrupted?"
        )
    return n


def write_e2e_files(groups: Dict[Hashable, Group], ref_path: str, pred_path: str,
                    tokenize: bool = False, lower: bool = False) -> None:
    """The scorer's two files: references grouped by blank lines, one prediction per line."""
    refs, preds = [], []
    for g in groups.values():
        refs.extend(post_process(r, tokenize, lower) + "\n" for r in g.references)
        refs.append("\n")
        preds.append(post_process(g.prediction, tokenize, lower) + "\n")
    atomic_write_text(ref_path, "".join(refs))
    atomic_write_text(pred_path, "".join(preds))


def decode(sample_file: str, input_file: str, output_ref_file: str, output_pred_file: str,
           vocab: Optional[str] = None, ref_unique_file: Optional[str] = None, tokenize: bool = False,
           lower: bool = False, decode_ids: Optional[Callable[[Sequence[int]], str]] = None) -> Dict[str, int]:
    """Run the whole step (see the module docstring).

    Args:
        vocab: GPT-2 vocab directory (``encoder.json``, ``vocab.bpe``); None uses the asset lookup.
        decode_ids: ids -> text; defaults to the GPT-2 tokenizer of ``vocab``.

    Returns:
        Counts: ``inputs``, ``references``, ``samples`` (sample lines read).
    """
    unique_ids = read_unique_ids(ref_unique_file) if ref_unique_file else None
    groups, keys = group_references(input_file, unique_ids)
    if decode_ids is None:
        from jt_lora.models.tokenizer import load_tokenizer

        decode_ids = load_tokenizer(vocab).decode
    n_samples = attach_predictions(groups, keys, sample_file, decode_ids)
    write_e2e_files(groups, output_ref_file, output_pred_file, tokenize=tokenize, lower=lower)
    return {"inputs": len(groups), "references": len(keys), "samples": n_samples}


def build_parser() -> argparse.ArgumentParser:
    from ...cli import DefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="python -m jt_lora.decode", formatter_class=DefaultsHelpFormatter,
        description="Decode generated token ids into the E2E scorer's reference and prediction files "
        "(microsoft/LoRA gpt2_decode.py for E2E).",
    )
    p.add_argument("--vocab", default=None, help="GPT-2 vocab directory (default: the gpt2-vocab asset)")
    p.add_argument("--sample_file", required=True, help="generations: JSONL with 'id' and 'predict' token ids")
    p.add_argument("--input_file", required=True, help="formatted test set: JSONL with 'context' and 'completion'")
    p.add_argument("--output_ref_file", required=True, help="references out: grouped per input, blank line between")
    p.add_argument("--output_pred_file", required=True, help="predictions out: one line per input")
    p.add_argument("--ref_unique_file", default=None, help="optional: one integer per input line, grouping "
                   "the lines instead of identical contexts")
    p.add_argument("--tokenize", action="store_true", help="split both files' texts at non-word characters")
    p.add_argument("--lower", action="store_true", help="lowercase both files' texts")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ...cli import run_cli
    args = build_parser().parse_args(argv)

    def body():
        counts = decode(args.sample_file, args.input_file, args.output_ref_file, args.output_pred_file,
                        vocab=args.vocab, ref_unique_file=args.ref_unique_file, tokenize=args.tokenize,
                        lower=args.lower)
        print(f"decoded {counts['samples']} samples: {counts['inputs']} inputs, {counts['references']} "
              f"references -> {args.output_ref_file}, {args.output_pred_file}", file=sys.stderr)
        return 0
    return run_cli(body, "jt_lora.decode", user_errors=(DecodeError, ValueError), code=2)


if __name__ == "__main__":
    sys.exit(main())
