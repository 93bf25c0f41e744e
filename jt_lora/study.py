"""The InA attention study in one resumable command.

The InA paper compares, layer by layer, the head-averaged attention of a fully fine-tuned GPT-2,
LoRA, and InA at several inhibition levels. This command runs that whole comparison::

    python -m jt_lora.study --base CKPT --train_data train.jsonl --valid_data valid.jsonl \\
        --eval_data valid.jsonl --test_data test.jsonl --test_formatted test_formatted.jsonl \\
        --variants full,lora,ina:0.1,ina:0.3,ina:0.9 --out study/

For each variant it trains (``python -m jt_lora.train``), generates on the test set and scores the
output (E2E metrics, or BoolQ accuracy with ``--task boolq``), then analyses every model on
``--eval_data`` (``python -m jt_lora.analysis attention --per_head`` and ``head-importance``) and
writes:

* ``attention_table.png``: rows = the chosen layers, columns = the base and each variant, one
  colour scale per row (the InA README's table as one figure);
* ``study.md``: the same table in Markdown with each model's ``layer_{i}_head_average.png``, then
  per-layer distances, entropy and head-importance rank changes, then the task scores;
* ``summary.json``: everything above as numbers.

Every stage runs in a child process with its output in ``logs/``; a finished stage leaves a
marker in ``state/``, so running the same command again (e.g. after ``kill -9``) skips what is done
and resumes training from its last checkpoint. A variant that fails is reported with its log and
the other variants go on; the command then exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["Variant", "parse_variants", "default_layers", "js_divergence_by_layer", "rank_correlation",
           "build_parser", "main"]

PROG = "python -m jt_lora.study"

# Keys of the resolved settings that change results: a re-run into the same --out must agree on them.
_RESULT_KEYS = ("base", "task", "train_data", "valid_data", "eval_data", "test_data", "test_formatted",
                "train_args", "generate_args", "variant_args", "eval_examples", "seq_len", "model_card")


class StudyError(Exception):
    """A problem the user can fix; reported as one line."""


@dataclass(frozen=True)
class Variant:
    """One column of the study: a training recipe."""

    name: str                      # directory name, e.g. "ina0.3"
    adapter: str                   # full | lora | ina | ia3
    inhibition: float = 0.0

    @property
    def spec(self) -> str:
        """The ``--variants`` item this variant was parsed from (normalised)."""
        return f"ina:{self.inhibition:g}" if self.adapter == "ina" else self.adapter

    @property
    def label(self) -> str:
        if self.adapter == "full":
            return "full FT"
        if self.adapter == "ina":
            return f"InA {self.inhibition * 100:g}%"
        return {"lora": "LoRA", "ia3": "(IA)³"}[self.adapter]

    def train_flags(self) -> List[str]:
        if self.adapter == "ina":
            return ["--adapter", "ina", "--lora_inhibition", repr(self.inhibition)]
        return ["--adapter", self.adapter]


def parse_variants(text: str) -> List[Variant]:
    """``"full,lora,ina:0.1,ia3"`` -> variants; inhibition levels must lie in (0, 1)."""
    out: List[Variant] = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        kind, _, level = item.partition(":")
        kind = kind.lower()
        if kind in ("full", "lora", "ia3") and not level:
            out.append(Variant(kind, kind))
        elif kind == "ina" and level:
            try:
                inhibition = float(level)
            except ValueError:
                raise StudyError(f"--variants: {item!r}: the inhibition level must be a number, e.g. ina:0.3") from None
            if not 0.0 < inhibition < 1.0:
                raise StudyError(f"--variants: {item!r}: the inhibition level must lie in (0, 1)")
            out.append(Variant(f"ina{inhibition:g}", "ina", inhibition))
        else:
            raise StudyError(f"--variants: unknown variant {item!r} (use full, lora, ia3 or ina:LEVEL)")
    if not out:
        raise StudyError("--variants: no variant given")
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StudyError(f"--variants: repeated {dupes}")
    return out


def default_layers(n_layer: int) -> List[int]:
    """The first 4 and the last 4 layers (all of them for models of up to 8 layers)."""
    return sorted(set(range(min(4, n_layer))) | set(range(max(0, n_layer - 4), n_layer)))


def parse_layers(text: Optional[str], n_layer: int) -> List[int]:
    if not text:
        return default_layers(n_layer)
    layers = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise StudyError(f"--layers: {part!r} is not a layer or a range like 0-3")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        for layer in range(lo, hi + 1):
            layer = layer if layer >= 0 else n_layer + layer
            if not 0 <= layer < n_layer:
                raise StudyError(f"--layers: layer {layer} does not exist (the model has {n_layer})")
            layers.add(layer)
    return sorted(layers)


# ----------------------------------------------------------------------------- measures


def js_divergence_by_layer(p: np.ndarray, q: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mean Jensen-Shannon divergence (nats, in [0, ln 2]) per layer between two per-head maps.

    Args:
        p, q: [L, H, T, T] attention averaged over examples (``attention_heads.npy``); each real
            query row is a distribution over keys.
        count: [T, T] examples reaching both positions; query rows with ``count[i, i] == 0`` are
            padding everywhere and are left out.

    Returns:
        [L]: the mean over heads and real query positions.
    """
    rows = np.diag(count) > 0
    p = p[:, :, rows, :].astype(np.float64)
    q = q[:, :, rows, :].astype(np.float64)
    m = 0.5 * (p + q)

    def kl(a, b):
        return np.where(a > 0, a * (np.log(np.maximum(a, 1e-300)) - np.log(np.maximum(b, 1e-300))), 0.0).sum(-1)

    js = 0.5 * kl(p, m) + 0.5 * kl(q, m)     # [L, H, rows]
    return js.mean(axis=(1, 2))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (1: same ranking, -1: reversed)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train full fine-tuning, LoRA and InA variants from one base model, compare their "
                    "attention layer by layer (the InA study) and score each on the task. Resumable: "
                    "run the same command again to continue.",
        epilog="Settings can also come from a JSON file (--config): keys are the flag names; flags "
               "given on the command line win.")
    a = p.add_argument
    a("--config", default=None, help="JSON file of settings (keys = flag names)")
    a("--base", help="base GPT-2 weights (HF dir/file or microsoft/LoRA checkpoint); required")
    a("--model_card", default=None, help="architecture of a --base without config.json "
                                         "(default: the trainer's, gpt2.md)")
    a("--task", default="e2e", choices=["e2e", "boolq"], help="how variants are scored (default: e2e)")
    a("--train_data", help="encoded JSONL for training; required")
    a("--valid_data", default=None, help="encoded JSONL for the trainer's validation loss (default: none)")
    a("--eval_data", help="encoded JSONL the attention and head importance are measured on; required")
    a("--eval_examples", type=int, default=200, help="examples of --eval_data analysed (default: 200)")
    a("--seq_len", type=int, default=512, help="examples are cut to this many tokens (default: 512)")
    a("--test_data", help="encoded test JSONL to generate from (e2e) or score (boolq); required")
    a("--test_formatted", default=None,
      help="e2e: the formatted test JSONL with the references (default: --test_data with "
           "'_formatted' before .jsonl)")
    a("--variants", default="full,lora,ina:0.1,ina:0.3,ina:0.9",
      help="comma-separated: full, lora, ia3, ina:LEVEL (default: full,lora,ina:0.1,ina:0.3,ina:0.9)")
    a("--train_args", default="", help="extra flags for every python -m jt_lora.train run, one string "
                                       "(default: none: the trainer's defaults, i.e. the paper's recipe)")
    a("--variant_args", default=None,
      help="JSON object: extra trainer flags per variant name, e.g. '{\"full\": \"--lr 1e-5\"}' (default: none)")
    a("--generate_args", default="--beam 10 --length_penalty 0.8 --no_repeat_ngram_size 4 --eval_len 64 "
                                  "--eos_token_id 628 --eos_token_id 50256 --batch_size 4 --unique_contexts",
      help="flags for python -m jt_lora.generate (e2e) (default: the LoRA paper's E2E decoding: %(default)s)")
    a("--layers", default=None, help="layers in the attention table, e.g. 0-3,20-23 (default: first 4 and last 4)")
    a("--no_base_column", action="store_true", help="leave the base model out of the attention table")
    a("--gamma", type=float, default=0.5, help="colour scale exponent of the attention maps (default: 0.5)")
    a("--out", help="output directory; required")
    a("--force", action="store_true", help="continue in --out even though result-changing settings differ")
    a("--no_progress", action="store_true", help="no progress bar")
    return p


def _resolve_args(argv) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        try:
            values = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except OSError as e:
            raise StudyError(f"--config {args.config}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise StudyError(f"--config {args.config}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(values, dict):
            raise StudyError(f"--config {args.config}: expected a JSON object of flag names")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise StudyError(f"--config {args.config}: unknown keys {unknown}")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    for flag in ("base", "train_data", "eval_data", "test_data", "out"):
        if not getattr(args, flag):
            raise StudyError(f"--{flag} is required (on the command line or in --config)")
    return args


def _validate(args) -> dict:
    """Every check that can fail before anything is written; returns the resolved settings."""
    variants = parse_variants(args.variants)
    for flag in ("base", "train_data", "valid_data", "eval_data", "test_data"):
        path = getattr(args, flag)
        if path and not Path(path).exists():
            raise StudyError(f"--{flag} {path}: not found")
    test_formatted = args.test_formatted
    if args.task == "e2e":
        if test_formatted is None:
            test_formatted = re.sub(r"\.jsonl$", "", args.test_data) + "_formatted.jsonl"
        if not Path(test_formatted).is_file():
            raise StudyError(f"--test_formatted {test_formatted}: not found (the formatted test file with references)")
    if args.eval_examples < 1:
        raise StudyError(f"--eval_examples must be >= 1, got {args.eval_examples}")
    if args.seq_len < 2:
        raise StudyError(f"--seq_len must be >= 2, got {args.seq_len}")
    variant_args = {}
    if args.variant_args:
        try:
            variant_args = json.loads(args.variant_args) if isinstance(args.variant_args, str) else args.variant_args
        except json.JSONDecodeError as e:
            raise StudyError(f"--variant_args: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(variant_args, dict) or not all(isinstance(v, str) for v in variant_args.values()):
            raise StudyError("--variant_args must be a JSON object of variant name -> flag string")
        unknown = sorted(set(variant_args) - {v.name for v in variants})
        if unknown:
            raise StudyError(f"--variant_args names no variant of --variants: {unknown}")
    for flag in ("train_args", "generate_args"):
        try:
            shlex.split(getattr(args, flag))
        except ValueError as e:
            raise StudyError(f"--{flag}: {e}") from None
    reserved = {"--adapter", "--lora_inhibition", "--work_dir", "--train_data", "--valid_data",
                "--init_checkpoint", "--resume", "--overwrite"}
    clash = sorted(reserved & set(shlex.split(args.train_args)))
    if clash:
        raise StudyError(f"--train_args may not set {clash}: the study sets them per variant")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out}: is a file; choose a directory")
    for parent in out.resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise StudyError(f"--out {out}: {parent} is a file")
            if not os.access(parent, os.W_OK):
                raise StudyError(f"--out {out}: {parent} is not writable; choose another --out")
            break
    return {
        "base": str(Path(args.base).resolve()), "model_card": args.model_card, "task": args.task,
        "train_data": str(Path(args.train_data).resolve()),
        "valid_data": str(Path(args.valid_data).resolve()) if args.valid_data else None,
        "eval_data": str(Path(args.eval_data).resolve()), "eval_examples": args.eval_examples,
        "seq_len": args.seq_len, "test_data": str(Path(args.test_data).resolve()),
        "test_formatted": str(Path(test_formatted).resolve()) if test_formatted else None,
        "variants": [v.spec for v in variants], "train_args": args.train_args, "variant_args": variant_args,
        "generate_args": args.generate_args, "layers": args.layers, "gamma": args.gamma,
        "base_column": not args.no_base_column,
    }


# ----------------------------------------------------------------------------- running stages


class Study:
    """The stages of one study directory and their resume markers."""

    def __init__(self, settings: dict, out: Path, progress: bool):
        from .io.atomic import atomic_write_text

        self.s = settings
        self.out = out
        self.variants = parse_variants(",".join(settings["variants"]))
        self.progress = progress
        self._write = atomic_write_text
        self.failures: Dict[str, str] = {}

    # -- bookkeeping
    def marker(self, name: str) -> Path:
        return self.out / "state" / f"{name}.json"

    def done(self, name: str) -> Optional[dict]:
        try:
            return json.loads(self.marker(name).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def finish(self, name: str, record: dict) -> dict:
        record = {**record, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._write(self.marker(name), json.dumps(record, indent=1) + "\n")
        return record

    def run(self, name: str, argv: Sequence[str]) -> None:
        """Run ``python argv...`` with its output in logs/<name>.log; raise StudyError on failure."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(f"\n$ {shlex.join([sys.executable, *argv])}\n".encode())
            f.flush()
            code = subprocess.call([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        if code != 0:
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            last = next((ln for ln in reversed(tail) if ln.startswith("error")), tail[-1] if tail else "")
            raise StudyError(f"{name} failed (exit {code}): {last.strip()[:300]} (log: {log})")

    # -- paths
    def vdir(self, v: Variant) -> Path:
        return self.out / "variants" / v.name

    def model_spec(self, v: Variant) -> List[str]:
        """The analysis CLI's flags naming this variant's model."""
        train = self.vdir(v) / "train"
        if v.adapter == "full":
            return ["--checkpoint", str(train / "model"), "--label", v.label]
        return ["--adapter_dir", str(train / "adapter"), "--label", v.label]

    # -- stages
    def train(self, v: Variant) -> dict:
        name = f"{v.name}.train"
        if self.done(name):
            return self.done(name)
        work = self.vdir(v) / "train"
        argv = ["-m", "jt_lora.train", "--train_data", self.s["train_data"], "--init_checkpoint", self.s["base"],
                "--work_dir", str(work), *v.train_flags(), "--seq_len", str(self.s["seq_len"])]
        if self.s["valid_data"]:
            argv += ["--valid_data", self.s["valid_data"]]
        if self.s["model_card"]:
            argv += ["--model_card", self.s["model_card"]]
        argv += shlex.split(self.s["train_args"]) + shlex.split(self.s["variant_args"].get(v.name, ""))
        if any(work.glob("checkpoint-*")):
            argv.append("--resume")
        elif work.exists():
            argv += ["--overwrite", "delete"]   # a run killed before its first checkpoint: nothing to keep
        self.run(name, argv)
        final = work / ("model" if v.adapter == "full" else "adapter")
        if not final.is_dir():
            raise StudyError(f"{name}: the trainer finished without writing {final}")
        log = _read_log(work / "log.jsonl")
        return self.finish(name, {"output": str(final), "final_train_loss": log.get("train"),
                                  "final_valid_loss": log.get("valid")})

    def score(self, v: Variant) -> dict:
        name = f"{v.name}.score"
        if self.done(name):
            return self.done(name)
        train = self.vdir(v) / "train"
        if v.adapter == "full":
            model = ["--init_checkpoint", str(train / "model")]
        else:
            model = ["--base_checkpoint", self.s["base"], "--adapter_dir", str(train / "adapter")]
        card = ["--model_card", self.s["model_card"]] if self.s["model_card"] else []
        gen = self.vdir(v) / "generate"
        if self.s["task"] == "boolq":
            report = gen / "eval_boolq.json"
            self.run(f"{v.name}.eval", ["-m", "jt_lora.eval_boolq", "--data", self.s["test_data"], *model, *card,
                                        "--no_progress", "--output_file", str(gen / "answers.jsonl")])
            text = (self.out / "logs" / f"{v.name}.eval.log").read_text(errors="replace").strip().splitlines()
            scores = json.loads(text[-1])
            self._write(report, json.dumps(scores, indent=1) + "\n")
            return self.finish(name, {"scores": {"accuracy": scores["accuracy"]}})
        self.run(f"{v.name}.generate", ["-m", "jt_lora.generate", "--data", self.s["test_data"], *model, *card,
                                        "--seq_len", str(self.s["seq_len"]), "--work_dir", str(gen),
                                        "--output_file", "predict.jsonl", "--no_progress",
                                        *shlex.split(self.s["generate_args"])])
        ref, pred = gen / "e2e_ref.txt", gen / "e2e_pred.txt"
        self.run(f"{v.name}.decode", ["-m", "jt_lora.decode", "--sample_file", str(gen / "predict.jsonl"),
                                      "--input_file", self.s["test_formatted"], "--output_ref_file", str(ref),
                                      "--output_pred_file", str(pred)])
        self.run(f"{v.name}.metrics", ["-m", "jt_lora.metrics", "--ref", str(ref), "--pred", str(pred), "--json"])
        lines = (self.out / "logs" / f"{v.name}.metrics.log").read_text(errors="replace").strip().splitlines()
        scores = json.loads(lines[-1])
        return self.finish(name, {"scores": scores, "predictions": str(pred)})

    def analyse(self, kind: str, models: List[Variant]) -> dict:
        """One analysis (attention | importance) over the base and ``models``; redone when the set changes."""
        name = f"analysis.{kind}"
        labels = ["base"] + [v.label for v in models]
        prev = self.done(name)
        if prev and prev.get("labels") == labels:
            return prev
        out = self.out / "analysis" / kind
        command = "attention" if kind == "attention" else "head-importance"
        argv = ["-m", "jt_lora.analysis", command, "--init_checkpoint", self.s["base"], "--include_base",
                "--base_label", "base", "--data", self.s["eval_data"], "--max_examples", str(self.s["eval_examples"]),
                "--seq_len", str(self.s["seq_len"]), "--out", str(out), "--no_progress"]
        for v in models:
            argv += self.model_spec(v)
        argv += ["--per_head", "--gamma", repr(self.s["gamma"])] if kind == "attention" else ["--no_ffn"]
        self.run(name, argv)
        summary = json.loads((out / ("attention.json" if kind == "attention" else "head_importance.json")).read_text())
        return self.finish(name, {"labels": labels, "dir": str(out), "summary": summary})


def _read_log(path: Path) -> dict:
    """Last train and valid loss in a trainer's log.jsonl."""
    last = {}
    try:
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "train" and "loss" in rec:
                last["train"] = rec["loss"]
            if rec.get("kind") == "valid" and "valid_loss" in rec:
                last["valid"] = rec["valid_loss"]
    except OSError:
        pass
    return last


# ----------------------------------------------------------------------------- report


def _importance_matrix(record: dict) -> np.ndarray:
    """The head-importance [L, H] of one model record of head_importance.json (the default definition)."""
    imp = record["head_importance"]
    if isinstance(imp, dict):
        for key in ("scores", "importance", "raw"):
            if key in imp:
                return np.asarray(imp[key], np.float64)
    return np.asarray(imp, np.float64)


def measures(attention: dict, importance: Optional[dict], labels: List[str], att_dir: Path) -> dict:
    """Per model and layer: JS divergence from the base and from full FT, entropy, and the rank
    correlation of head importance with the base's."""
    records = {r["label"]: r for r in attention["models"]}
    count = np.load(att_dir / attention["count"])
    heads = {lab: np.load(att_dir / records[lab]["files"]["heads"]) for lab in labels}
    imp = {}
    if importance is not None:
        imp = {r["label"]: _importance_matrix(r) for r in importance["models"]}
    out = {}
    for lab in labels:
        row = {"entropy": [float(x) for x in records[lab]["entropy"]],
               "js_from_base": js_divergence_by_layer(heads[lab], heads["base"], count).tolist()}
        if "full FT" in heads and lab != "full FT":
            row["js_from_full"] = js_divergence_by_layer(heads[lab], heads["full FT"], count).tolist()
        if lab in imp and "base" in imp:
            row["importance_rank_corr_base"] = [rank_correlation(a, b) for a, b in zip(imp[lab], imp["base"])]
            row["importance_rank_corr_base_all"] = rank_correlation(imp[lab].ravel(), imp["base"].ravel())
        out[lab] = row
    return out


def attention_table(att_dir: Path, attention: dict, labels: List[str], layers: List[int], gamma: float, path: Path):
    from .analysis.plots import attention_grid_figure, save_figure

    records = {r["label"]: r for r in attention["models"]}
    maps = [np.load(att_dir / records[lab]["files"]["average"])[layers] for lab in labels]
    title = (f"Head-averaged attention over {attention['num_examples']} examples "
             f"(layers {', '.join(map(str, layers))}; colour ~ p^{gamma:g})")
    save_figure(attention_grid_figure(maps, labels, title, gamma, layer_ids=layers), path)


def _fmt(x, digits=4):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(summary: dict, att_rel: str) -> str:
    layers, labels = summary["layers"], summary["table_labels"]
    lines = ["# InA attention study", "",
             f"Base: `{summary['settings']['base']}`; attention measured on {summary['num_examples']} examples of "
             f"`{summary['settings']['eval_data']}`. Each image is the attention map averaged over heads and "
             "examples (padding excluded).", "",
             "![attention table](attention_table.png)", "",
             "| layer | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    dirs = summary["attention_dirs"]
    for layer in layers:
        cells = [f"![{lab} layer {layer}]({att_rel}/{dirs[lab]}/layer_{layer}_head_average.png)" for lab in labels]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    m = summary["measures"]
    models = [lab for lab in summary["models"] if lab != "base"]
    lines += ["", "## Distance from the base and from full fine-tuning", "",
              "Mean Jensen-Shannon divergence (nats, at most ln 2 = 0.693) between per-head attention maps "
              "averaged over examples, over heads and real query positions; entropy is the mean entropy "
              "(nats) of a query position's attention; rank corr. is Spearman's correlation of the layer's "
              "head importance with the base model's (1 = same ranking).", "",
              "| layer | model | JS from base | JS from full FT | entropy | head-importance rank corr. with base |",
              "|---|---|---|---|---|---|"]
    for layer in range(summary["n_layer"]):
        for lab in ["base"] + models:
            row = m[lab]
            full = row.get("js_from_full")
            corr = row.get("importance_rank_corr_base")
            lines.append(f"| {layer} | {lab} | {_fmt(row['js_from_base'][layer])} | "
                         f"{_fmt(full[layer] if full else None)} | {_fmt(row['entropy'][layer], 3)} | "
                         f"{_fmt(corr[layer] if corr else None, 3)} |")
    lines += ["", "## Task scores", ""]
    keys = summary["score_keys"]
    lines += ["| model | " + " | ".join(keys) + " | final train loss |", "|---|" + "---|" * (len(keys) + 1)]
    for name, rec in summary["variants"].items():
        if rec.get("error"):
            lines.append(f"| {rec['label']} | failed: {rec['error'][:120]} |" + " |" * len(keys))
            continue
        scores = rec.get("scores") or {}
        lines.append(f"| {rec['label']} | " + " | ".join(_fmt(scores.get(k)) for k in keys)
                     + f" | {_fmt(rec.get('final_train_loss'))} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def _check_settings(out: Path, settings: dict, force: bool) -> None:
    path = out / "study_config.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    diffs = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in _RESULT_KEYS if old.get(k) != settings.get(k)]
    if diffs and not force:
        raise StudyError(f"--out {out} holds a study with other settings ({'; '.join(diffs)}); use another --out, "
                         "or --force to continue it anyway")


def run_study(args) -> int:
    settings = _validate(args)
    out = Path(args.out)
    _check_settings(out, settings, args.force)
    from .io.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study_config.json", json.dumps(settings, indent=1) + "\n")
    study = Study(settings, out, progress=not args.no_progress)
    from tqdm import tqdm

    total = 2 * len(study.variants) + 2
    bar = tqdm(total=total, desc="study", disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)
    results: Dict[str, dict] = {}
    for v in study.variants:
        results[v.name] = {"label": v.label, "adapter": v.adapter, "inhibition": v.inhibition}
        for stage in ("train", "score"):
            bar.set_description(f"{v.label}: {stage}")
            if results[v.name].get("error"):
                bar.update(1)
                continue
            try:
                results[v.name].update(getattr(study, stage)(v))
            except StudyError as e:
                results[v.name]["error"] = str(e)
                tqdm.write(f"error: {v.label}: {e}", file=sys.stderr)
            bar.update(1)
    trained = [v for v in study.variants if "output" in results[v.name]]
    analyses = {}
    for kind in ("attention", "importance"):
        bar.set_description(f"analysis: {kind}")
        try:
            analyses[kind] = study.analyse(kind, trained)
        except StudyError as e:
            tqdm.write(f"error: analysis: {e}", file=sys.stderr)
            analyses[kind] = {"error": str(e)}
        bar.update(1)
    bar.close()

    summary = {"settings": settings, "variants": results}
    att = analyses["attention"]
    if "summary" in att:
        attention = att["summary"]
        att_dir = Path(att["dir"])
        labels = att["labels"]
        layers = parse_layers(settings["layers"], attention["n_layer"])
        table_labels = labels if settings["base_column"] else labels[1:]
        imp = analyses["importance"].get("summary")
        summary.update({
            "n_layer": attention["n_layer"], "n_head": attention["n_head"], "num_examples": attention["num_examples"],
            "layers": layers, "models": labels, "table_labels": table_labels,
            "attention_dirs": {r["label"]: r["dir"] for r in attention["models"]},
            "measures": measures(attention, imp, labels, att_dir),
            "importance_definition": imp.get("definition") if imp else None,
            "figure": "attention_table.png", "markdown": "study.md",
        })
        if table_labels:
            attention_table(att_dir, attention, table_labels, layers, settings["gamma"], out / "attention_table.png")
        keys = sorted({k for r in results.values() for k in (r.get("scores") or {})},
                      key=lambda k: ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "accuracy"].index(k)
                      if k in ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "accuracy"] else 99)
        summary["score_keys"] = keys
        atomic_write_text(out / "study.md", markdown(summary, os.path.relpath(att_dir, out)))
    else:
        summary["analysis_error"] = att.get("error")
    summary["failed"] = {n: r["error"] for n, r in results.items() if r.get("error")}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    print(f"study: {out / 'summary.json'}" + (f", {out / 'study.md'}, {out / 'attention_table.png'}"
                                              if "figure" in summary else ""), file=sys.stderr)
    if summary["failed"] or "analysis_error" in summary:
        failed = ", ".join(summary["failed"]) or "analysis"
        print(f"error: {failed} failed; the rest is kept. Fix the cause (see logs/ in {out}) and run the same "
              "command again to continue", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    try:
        args = _resolve_args(argv)
        return run_study(args)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror}; check the path and free space", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
