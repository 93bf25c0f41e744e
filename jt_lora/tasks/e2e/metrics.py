"""E2E NLG metrics exactly as the official challenge scorer computes them.

The reference is ``measure_scores.py -p`` of the E2E NLG challenge (tuetschek/e2e-metrics), the
scorer the LoRA paper's E2E numbers come from:

* BLEU and NIST: its Python MTEval port (``pymteval``), re-implemented here. nltk's BLEU agrees only
  on long, matching outputs (it clips each sentence's denominator at 1 where pymteval lets short
  outputs pull it down, and returns 0 where pymteval smooths by 1e-15) and nltk's NIST uses another
  information weighting, so neither is used.
* METEOR, ROUGE_L, CIDEr: the MS-COCO caption evaluator (``pycocoevalcap``) on text lowercased and
  tokenised by Stanford's PTBTokenizer with punctuation tokens dropped. pycocoevalcap's scorers are
  used as they are; the tokenizer is run from its jar with the same flags and post-processing, but
  from a private temp directory (pycocoevalcap writes into its own install directory), and the
  JVMs run side by side (METEOR loads its paraphrase table while the tokenizers and BLEU/NIST run),
  so the full E2E test set takes ~13 s instead of ~20 s.

Scores are on the official scale: BLEU, METEOR and ROUGE_L in 0-1, NIST and CIDEr unscaled; the
paper prints BLEU, METEOR and ROUGE_L x100.

Input files are read the way the official scorer reads them: UTF-8, every line stripped;
predictions one per line (an empty line is an empty prediction); references of one input on
consecutive lines with a blank line between inputs, and a file holding a single group (no blank
separator, or only a trailing one) is a single-reference file, one reference per line.

Where the official scorer crashes (an input without references; NIST when some n-gram order has a
total output count of 0, e.g. every output is 2 tokens long) this module raises a clear error or
scores that NIST order 0. Its quirks are kept: BLEU can exceed 1 on a few very short outputs,
because pymteval adds ``len - n + 1`` to the n-gram count even when it is negative.

Usage::

    python -m jt_lora.metrics --ref REF.txt --pred PRED.txt [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
# Metrics the paper (and the LoRA README) report x100.
PERCENT_METRICS = ("BLEU", "METEOR", "ROUGE_L")

JAVA_HINT = (
    "METEOR and the PTB tokenizer of the official E2E scorer run on Java, and no `java` was found "
    "on PATH. Install a Java runtime (8 or newer), e.g. `apt-get install default-jre-headless` on "
    "Debian/Ubuntu, `conda install -c conda-forge openjdk`, or `brew install openjdk` on macOS, "
    "then check that `java -version` works."
)
COCO_HINT = "pycocoevalcap is not installed: `pip install pycocoevalcap` (or `pip install 'jt_lora[metrics]'`)."


class MetricsError(Exception):
    """Bad input or a missing dependency, reported to the user without a traceback."""


# --------------------------------------------------------------------------------------------
# Reading the files
# --------------------------------------------------------------------------------------------


def _read_stripped_lines(path: str, what: str) -> List[str]:
    """Lines of ``path`` as the official scorer sees them (codecs UTF-8 reader, each line stripped).

    ``str.splitlines`` breaks lines where Python's codecs reader does (``\\n``, ``\\r\\n``, ``\\r``
    and the Unicode line separators), and ``str.strip`` trims Unicode whitespace as it does. A
    byte-order mark is kept, as there.
    """
    p = Path(path)
    if not p.exists():
        raise MetricsError(f"{what} file not found: {path}")
    if not p.is_file():
        raise MetricsError(f"{what} file is not a regular file: {path}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise MetricsError(f"{path}:{line}: {what} file is not valid UTF-8 (byte {data[e.start:e.start + 1]!r} "
                           f"at offset {e.start}); convert it to UTF-8") from None
    return [line.strip() for line in text.splitlines()]


def read_predictions(path: str) -> List[str]:
    """One prediction per line; an empty line is an empty prediction (it is scored, not dropped)."""
    return _read_stripped_lines(path, "prediction")


def _reference_groups(path: str):
    """``(groups, single_ref)``: see :func:`read_references`; ``single_ref`` says the file had no
    blank separator and was split into one-line groups."""
    lines = _read_stripped_lines(path, "reference")
    groups: List[List[str]] = [[]]
    starts = [1]  # 1-based line where each group starts, for error messages
    for lineno, line in enumerate(lines, start=1):
        if line:
            groups[-1].append(line)
        else:
            groups.append([])
            starts.append(lineno + 1)
    if not groups[-1]:
        groups.pop()
        starts.pop()
    if len(groups) == 1:
        return [[ref] for ref in groups[0]], True
    for i, (group, start) in enumerate(zip(groups, starts)):
        if not group:
            where = "line 1 is blank" if start == 1 else f"lines {start - 1} and {start} are both blank"
            raise MetricsError(
                f"reference file {path}: input #{i + 1} has no references ({where}); separate inputs "
                "by exactly one blank line"
            )
    return groups, False


def read_references(path: str) -> List[List[str]]:
    """Reference groups: consecutive non-empty lines form one input's references.

    Follows the official reader: one trailing blank line (or the end of the file) closes the last
    group, and a file that holds a single group (no blank separator, or only a trailing one) is a
    single-reference file whose every line is one input (so one input with several references
    cannot be scored alone, as in the official scorer). Two blank lines in a row or a leading
    blank line would make an input without references, which the official scorer crashes on; here
    that is an error naming the line.
    """
    return _reference_groups(path)[0]


def load_pair(ref_path: str, pred_path: str):
    """Read and check a reference file and a prediction file.

    Returns:
        ``(references, predictions)``: a list of reference lists and a list of strings, one per input.

    Raises:
        MetricsError: a file is missing or unreadable, or the counts differ.
    """
    refs, single_ref = _reference_groups(ref_path)
    preds = read_predictions(pred_path)
    if len(refs) != len(preds):
        how = (
            "it has no blank line between inputs, so, as in the official scorer, each of its lines is "
            "read as the single reference of one input"
            if single_ref
            else "its inputs are groups of lines separated by one blank line"
        )
        raise MetricsError(
            f"prediction/reference count mismatch: {pred_path} has {len(preds)} predictions (lines) but "
            f"{ref_path} has {len(refs)} inputs ({how})"
        )
    if not refs:
        raise MetricsError(f"nothing to score: {ref_path} and {pred_path} are empty")
    return refs, preds


# --------------------------------------------------------------------------------------------
# BLEU and NIST (pymteval semantics)
# --------------------------------------------------------------------------------------------

# mteval-v13a's "basic" tokenisation, in the order pymteval applies it. Each pattern must keep
# its exact form: re.sub's left-to-right, non-overlapping matching decides cases such as "a..b".
_SGML_STEPS = (
    (re.compile(r"<skipped>"), ""),
    (re.compile(r"-\n"), ""),
    (re.compile(r"\n"), " "),
    (re.compile(r"&quot;"), '"'),
    (re.compile(r"&amp;"), "&"),
    (re.compile(r"&lt;"), "<"),
    (re.compile(r"&gt;"), ">"),
)
_TOKEN_STEPS = (
    # ASCII punctuation except  ' , - .  (ranges {-~  [-`  space-&  (-+  :-@  and /)
    (re.compile(r"([{-~\[-` -&(-+:-@/])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # period/comma not after a digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # period/comma not before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
    (re.compile(r"\s+"), " "),
)


def mteval_tokenize(text: str) -> List[str]:
    """Tokens of ``text`` as pymteval (mteval-v13a basic tokenisation) makes them, case kept.

    The empty string gives ``['']``: pymteval counts an empty output as one (empty) token.
    """
    for pattern, repl in _SGML_STEPS:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _TOKEN_STEPS:
        text = pattern.sub(repl, text)
    return text.strip().split(" ")


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: Sequence[Sequence[str]], n: int) -> Counter:
    """For each n-gram, its largest count in any single reference (the BLEU clipping bound)."""
    merged: Counter = Counter()
    for ref in refs:
        for gram, c in _ngrams(ref, n).items():
            if c > merged[gram]:
                merged[gram] = c
    return merged


def _tokenize_lower(text: str) -> List[str]:
    # pymteval is case-insensitive: it lowercases each token (after tokenising).
    return [tok.lower() for tok in mteval_tokenize(text)]


def bleu_score(references: Sequence[Sequence[str]], predictions: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 as pymteval's ``BLEUScore`` (case-insensitive, no smoothing).

    Per output: clipped n-gram hits; ``len - (n - 1)`` added to the n-gram count (negative for
    outputs shorter than n-1 tokens, exactly as pymteval does); the length of the reference closest
    in length (ties: the shorter one). Then exp(mean log precision), each precision floored as
    max(hits, 1e-15) / max(count, 1e-9), times the brevity penalty exp(1 - r/c) when c <= r.
    """
    hits = [0] * max_n
    counts = [0] * max_n
    ref_len = 0
    for refs, pred in zip(references, predictions):
        p = _tokenize_lower(pred)
        rs = [_tokenize_lower(r) for r in refs]
        for n in range(1, max_n + 1):
            bound = _max_ref_counts(rs, n)
            hits[n - 1] += sum(min(c, bound[g]) for g, c in _ngrams(p, n).items())
            counts[n - 1] += len(p) - (n - 1)
        ref_len += min((len(r) for r in rs), key=lambda length: (abs(length - len(p)), length))
    log_prec = sum(math.log(max(h, 1e-15) / max(c, 1e-9)) for h, c in zip(hits, counts))
    bp = 1.0
    if counts[0] <= ref_len:
        bp = math.exp(1.0 - ref_len / (float(counts[0]) if counts[0] else 1e-5))
    return bp * math.exp(log_prec / max_n)


# NIST length-penalty constant of mteval-v13a: the penalty is 0.5 when the output is 2/3 as long.
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def nist_score(references: Sequence[Sequence[str]], predictions: Sequence[str], max_n: int = 5) -> float:
    """Corpus NIST-5 as pymteval's ``NISTScore`` (case-insensitive).

    The information weight of an n-gram w1..wn is log2(count(w1..wn-1) / count(w1..wn)) with
    counts over all references of the corpus (count of the empty prefix = number of reference
    tokens). Score = sum over n of (information of the clipped hits / output n-gram count), times
    exp(-beta * ln(ratio)^2) when the output/average-reference length ratio is below 1. The
    per-input average reference length is the mean over that input's references.

    pymteval divides by zero when some order's total output n-gram count is 0 (e.g. every output
    has exactly 2 tokens); that order then contributes 0 here.
    """
    ref_counts = [Counter() for _ in range(max_n + 1)]  # index 0: the empty n-gram
    seg_hits: List[List[Counter]] = []  # per input, per order: clipped hit counts
    out_len = [0] * max_n
    avg_ref_len = 0.0
    for refs, pred in zip(references, predictions):
        p = _tokenize_lower(pred)
        rs = [_tokenize_lower(r) for r in refs]
        per_order = []
        for n in range(1, max_n + 1):
            out_len[n - 1] += len(p) - (n - 1)
            bound = _max_ref_counts(rs, n)
            per_order.append(Counter({g: min(c, bound[g]) for g, c in _ngrams(p, n).items() if bound[g]}))
            for r in rs:
                ref_counts[n].update(_ngrams(r, n))
        seg_hits.append(per_order)
        total = sum(len(r) for r in rs)
        ref_counts[0][()] += total
        avg_ref_len += total / float(len(rs))

    def info(gram: tuple) -> float:
        n = len(gram)
        if gram not in ref_counts[n]:
            return 0.0
        return math.log(ref_counts[n - 1][gram[:-1]] / float(ref_counts[n][gram]), 2)

    score = 0.0
    for n in range(max_n):
        gained = 0.0
        for per_order in seg_hits:
            gained += sum(info(g) * h for g, h in per_order[n].items())
        if out_len[n] != 0:
            score += gained / out_len[n]
    ratio = out_len[0] / float(avg_ref_len)
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        penalty = math.exp(-NIST_BETA * math.log(ratio) ** 2)
    return penalty * score


def mteval_scores(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> Dict[str, float]:
    """BLEU and NIST (pure Python, no Java)."""
    return {"BLEU": bleu_score(references, predictions), "NIST": nist_score(references, predictions)}


# --------------------------------------------------------------------------------------------
# METEOR, ROUGE_L, CIDEr (pycocoevalcap)
# --------------------------------------------------------------------------------------------

# Tokens pycocoevalcap's PTBTokenizer wrapper drops after tokenising (compared after lowercasing,
# so "-LRB-" and friends actually survive as "-lrb-": kept that way for agreement).
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def check_java() -> str:
    """Path of the ``java`` executable, or a MetricsError saying how to install one."""
    java = shutil.which("java")
    if java is None:
        raise MetricsError(JAVA_HINT)
    return java


def _coco_modules():
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise MetricsError(COCO_HINT) from None
    return Meteor, Rouge, Cider, Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)


class _PTBRun:
    """One PTBTokenizer JVM over a list of sentences, started now, read by :meth:`result`.

    Same command, file content and post-processing as pycocoevalcap's ``PTBTokenizer.tokenize``
    (``-preserveLines -lowerCase``, one sentence per line, punctuation tokens dropped).
    """

    def __init__(self, java: str, jar: Path, sentences: List[str], workdir: str, name: str):
        self.n = len(sentences)
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write("\n".join(s.replace("\n", " ") for s in sentences).encode("utf-8"))
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def result(self) -> List[str]:
        out, err = self.proc.communicate()
        lines = out.decode("utf-8").split("\n")
        if self.proc.returncode != 0 or len(lines) < self.n:
            raise MetricsError(
                f"Stanford PTBTokenizer (Java) failed (exit {self.proc.returncode}, {len(lines)} lines for "
                f"{self.n} sentences): {err.decode('utf-8', 'replace').strip()[-2000:]}"
            )
        return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION) for line in lines[: self.n]]

    def stop(self):
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    """End a child JVM with SIGTERM, never SIGKILL: when Jittor is imported in the same process
    (``import jt_lora`` does), its SIGCHLD handler exits Python on a child killed by any other signal."""
    if proc.poll() is None:
        proc.terminate()
    proc.wait()


def _close_meteor(meteor) -> None:
    """Stop METEOR's JVM now: closing its stdin ends it normally. (pycocoevalcap's
    ``Meteor.__del__`` would SIGKILL it at garbage collection; on a reaped process that is a no-op.)"""
    proc = meteor.meteor_p
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    _stop(proc)
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    # A compute_score that raised never released the wrapper's lock; its __del__ would block on it.
    if meteor.lock.locked():
        meteor.lock.release()


class _CocoRun:
    """The Java side of the scorer, started early so the JVMs warm up while Python computes BLEU."""

    def __init__(self, references: Sequence[Sequence[str]], predictions: Sequence[str]):
        java = check_java()
        Meteor, self._Rouge, self._Cider, jar = _coco_modules()
        self._tmp = tempfile.TemporaryDirectory(prefix="jt_lora_metrics_")
        self._ptb: List[_PTBRun] = []
        self.meteor = None
        try:
            self.meteor = Meteor()  # spawns METEOR's JVM (loads its paraphrase table: the slow part)
            flat_refs = [r for refs in references for r in refs]
            self._sizes = [len(refs) for refs in references]
            self._ptb.append(_PTBRun(java, jar, flat_refs, self._tmp.name, "refs.txt"))
            self._ptb.append(_PTBRun(java, jar, list(predictions), self._tmp.name, "preds.txt"))
        except BaseException:
            self.close()
            raise

    def result(self) -> Dict[str, float]:
        try:
            flat_refs = self._ptb[0].result()
            hyps = self._ptb[1].result()
            gts, res, pos = {}, {}, 0
            for i, size in enumerate(self._sizes):
                gts[i] = flat_refs[pos : pos + size]
                res[i] = [hyps[i]]
                pos += size
            # METEOR scores in its JVM while this thread does ROUGE_L and CIDEr.
            meteor_out: Dict[str, object] = {}

            def run_meteor():
                try:
                    meteor_out["score"] = self.meteor.compute_score(gts, res)[0]
                except (ValueError, OSError) as e:
                    meteor_out["error"] = e

            worker = threading.Thread(target=run_meteor, daemon=True)
            worker.start()
            rouge, _ = self._Rouge().compute_score(gts, res)
            cider, _ = self._Cider().compute_score(gts, res)
            worker.join()
            if "error" in meteor_out:
                err = b""
                try:
                    _stop(self.meteor.meteor_p)
                    err = self.meteor.meteor_p.stderr.read()
                except (OSError, ValueError):
                    pass
                raise MetricsError(
                    f"METEOR (Java) failed: {meteor_out['error']}; {err.decode('utf-8', 'replace').strip()[-2000:]}"
                )
            meteor = meteor_out["score"]
            return {"METEOR": float(meteor), "ROUGE_L": float(rouge), "CIDEr": float(cider)}
        finally:
            self.close()

    def close(self):
        for run in self._ptb:
            run.stop()
        if self.meteor is not None:
            _close_meteor(self.meteor)
            self.meteor = None
        self._tmp.cleanup()


def coco_scores(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> Dict[str, float]:
    """METEOR, ROUGE_L and CIDEr as the MS-COCO evaluator inside the official scorer (needs Java)."""
    return _CocoRun(references, predictions).result()


def score(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> Dict[str, float]:
    """All five official E2E metrics.

    Args:
        references: one list of reference strings per input (at least one each).
        predictions: one output string per input ("" for an empty output).

    Returns:
        ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` on the official scale.
    """
    if len(references) != len(predictions):
        raise MetricsError(f"{len(predictions)} predictions but {len(references)} reference groups")
    if not references:
        raise MetricsError("nothing to score")
    for i, refs in enumerate(references):
        if not refs:
            raise MetricsError(f"input #{i + 1} has no references")
    coco = _CocoRun(references, predictions)  # Java starts first ...
    try:
        scores = mteval_scores(references, predictions)  # ... while Python does BLEU/NIST
    except BaseException:
        coco.close()
        raise
    scores.update(coco.result())
    return {m: scores[m] for m in METRICS}


def score_files(ref_path: str, pred_path: str) -> Dict[str, float]:
    """:func:`score` on a reference file and a prediction file (formats in the module docstring)."""
    return score(*load_pair(ref_path, pred_path))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def format_table(scores: Dict[str, float]) -> str:
    """The five scores on the official scale and as the paper prints them (x100 for 0-1 metrics)."""
    rows = [f"{'metric':<8} {'official':>9} {'paper':>7}"]
    for m in METRICS:
        paper = scores[m] * 100 if m in PERCENT_METRICS else scores[m]
        rows.append(f"{m:<8} {scores[m]:>9.4f} {paper:>7.2f}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jt_lora.metrics",
        description="Score E2E NLG outputs with BLEU, NIST, METEOR, ROUGE_L and CIDEr as the official "
        "E2E challenge scorer (e2e-metrics measure_scores.py -p) does. Needs pycocoevalcap and Java.",
    )
    p.add_argument("--ref", required=True, help="references: one input's references on consecutive lines, "
                   "a blank line between inputs (no blank line at all: one reference per line)")
    p.add_argument("--pred", required=True, help="predictions: one line per input (an empty line is an empty output)")
    p.add_argument("--json", action="store_true", help="also print the scores as one JSON object, as the last line")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ...cli import run_cli
    args = build_parser().parse_args(argv)

    def body():
        refs, preds = load_pair(args.ref, args.pred)
        print(f"scoring {len(preds)} inputs against {sum(map(len, refs))} references ...", file=sys.stderr)
        scores = score(refs, preds)
        print(format_table(scores))
        if args.json:
            print(json.dumps(scores))
        return 0
    return run_cli(body, "jt_lora.metrics", user_errors=(MetricsError,), code=2)


if __name__ == "__main__":
    sys.exit(main())
