"""The files of a generation run: the reference's ``predict.*.jsonl``, made resumable.

In ``--work_dir``, for ``--output_file NAME.jsonl``:

* ``NAME.jsonl``: ``{"id": i, "predict": [eval_len ids, 0-padded]}`` lines, as gpt2_beam.py writes
  them (``best_sequence`` padded with 0), in the order batches finish. Each batch is appended and
  fsynced, so a killed run keeps what it finished and a re-run skips those ids; a half-written last
  line is cut off (:func:`read_predictions`).
* ``NAME.config.json``: the resolved settings. A resumed run must have the same
  :data:`RESUME_KEYS` (what decides a prediction), or it is refused: predictions made under two
  settings never mix in one file.
* ``NAME.txt``: the decoded text, one line per example, cut as gpt2_decode.py cuts it.

``--overwrite`` writes the new predictions to a hidden temp file beside the old one, which
replaces it (config first) only once the run is complete: a failure or a kill leaves the previous
files as they were. Every replacement goes through ``jt_lora.io.atomic``.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..io import atomic

__all__ = ["RESUME_KEYS", "PredictionFiles", "read_predictions", "append_records", "padded", "decoded_text"]

# Settings that change what is generated for an id: a resumed run must have the same ones.
RESUME_KEYS = ("data", "seq_len", "eval_len", "min_length", "beam", "length_penalty", "no_repeat_ngram_size",
               "repetition_penalty", "eos_token_ids", "init_checkpoint", "base_checkpoint", "adapter_dir",
               "model")

Records = List[Tuple[int, List[int]]]


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


def append_records(f, records: Records) -> None:
    """One finished batch, appended and made durable before the next batch starts."""
    f.write("".join(json.dumps({"id": i, "predict": p}) + "\n" for i, p in records))
    f.flush()
    os.fsync(f.fileno())


def padded(seq: List[int], length: int) -> List[int]:
    """The reference writes ``best_sequence``: eval_len ids, 0 after the sequence."""
    return seq + [0] * (length - len(seq))


def decoded_text(tokenizer, ids: Sequence[int], eos: Sequence[int]) -> str:
    """Decoded prediction as gpt2_decode reads it: cut at the first eos, then at <|endoftext|> and
    a blank line; stripped; one line."""
    cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
    text = tokenizer.decode(ids[:cut]).split("<|endoftext|>")[0].split("\n\n")[0].strip()
    return " ".join(text.split("\n"))


class PredictionFiles:
    """The three files of one run (see the module docstring).

    Args:
        out_path: ``WORK_DIR/OUTPUT_FILE``.
        overwrite: start afresh; the old files are replaced only when the new run completes.
    """

    def __init__(self, out_path: Path, overwrite: bool):
        self.out = Path(out_path)
        stem = self.out.name[:-len(".jsonl")] if self.out.name.endswith(".jsonl") else self.out.name
        self.config = self.out.with_name(stem + ".config.json")
        self.text = self.out.with_name(stem + ".txt")
        self.overwrite = overwrite
        self._writing = self.out.with_name(f".{self.out.name}.overwrite.tmp") if overwrite else self.out

    def done(self, resolved: dict, n_examples: int) -> Dict[int, List[int]]:
        """Predictions already written (none with ``--overwrite``), after checking that they were
        made with ``resolved``'s settings and ids below ``n_examples``."""
        if self.overwrite and self._writing.exists():
            self._writing.unlink()    # a killed earlier --overwrite run
        done = read_predictions(self._writing)
        if done:
            old = _read_json(self.config)
            if old is not None:
                changed = [k for k in RESUME_KEYS if json.dumps(old.get(k)) != json.dumps(resolved[k])]
                if changed:
                    raise ValueError(f"{self.out} was generated with different settings ({', '.join(changed)}); "
                                     f"use --overwrite or another --output_file")
            stray = sorted(i for i in done if not 0 <= i < n_examples)
            if stray:
                raise ValueError(f"{self.out}: ids {stray[:5]} are not in {resolved['data']} ({n_examples} examples)")
        return done

    @contextlib.contextmanager
    def appending(self, resolved: dict) -> Iterator[Callable[[Records], None]]:
        """Yields ``append(records)``. The config is written first when resuming or starting a new
        file, last (with the replacement) under ``--overwrite``."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if not self.overwrite:
            atomic.atomic_write_text(self.config, json.dumps(resolved, indent=2))
        try:
            with open(self._writing, "a", encoding="utf-8") as f:
                yield lambda records: append_records(f, records)
            if self.overwrite:
                atomic.atomic_write_text(self.config, json.dumps(resolved, indent=2))
                atomic.replace_file(self._writing, self.out)
        except BaseException:
            if self.overwrite and self._writing.exists():
                self._writing.unlink()
            raise

    def write_text(self, lines: Sequence[str]) -> None:
        atomic.atomic_write_text(self.text, "".join(line + "\n" for line in lines))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
