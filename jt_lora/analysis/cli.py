"""Command line: ``python -m jt_lora.analysis {attention,head-importance,induction} ...``.

Every subcommand compares one or more models: the base ``--init_checkpoint`` and, for each
``--adapter_dir DIR [--label TEXT]``, the base with that jt_lora adapter (any other full checkpoint,
e.g. a fully fine-tuned model, with ``--checkpoint PATH [--label TEXT]``). The base is a column of
its own when no other model is given or with ``--include_base``. Models are loaded and analysed one
at a time. Outputs go to ``--out``, each written atomically, next to ``<command>_config.json``
(the resolved settings); the paths written are printed on stdout, also with ``--no_progress``.
An adapter's type, rank, alpha, inhibition and slope come from its directory's config; the
matching flags may only repeat them. Bad input and I/O faults (unwritable ``--out``, a full disk,
undecodable or invalid files) end with one ``error:`` line naming the path, exit status 1, and the
files already written left intact.
"""
import errno
import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import List

import numpy as np

from .models import (ADAPTER_FLAGS, ModelSpec, example_batches, load_model, num_batches, read_examples,
                     unique_slugs)

__all__ = ["build_parser", "main"]


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not for None / False (the help sentence says what happens), nor
    when the help text already states it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _AddModel(argparse.Action):
    """``--adapter_dir`` / ``--checkpoint``: append a model; a following ``--label`` names it."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = list(getattr(namespace, "models", None) or [])
        models.append({"kind": self.const, "path": value, "label": None, "option": option_string})
        namespace.models = models


class _SetLabel(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        models = getattr(namespace, "models", None)
        if not models:
            parser.error(f"--label {value!r} must follow the --adapter_dir or --checkpoint it names "
                         "(the base model's label is --base_label)")
        if models[-1]["label"] is not None:
            parser.error(f"{models[-1]['option']} {models[-1]['path']} has two labels "
                         f"({models[-1]['label']!r}, {value!r})")
        models[-1]["label"] = value


def _common(p: argparse.ArgumentParser, data: bool) -> None:
    p.add_argument("--init_checkpoint", required=True,
                   help="base GPT-2 weights (HF directory/file or microsoft/LoRA checkpoint)")
    p.add_argument("--adapter_dir", action=_AddModel, const="adapter", dest="models", default=None,
                   metavar="DIR", help="a jt_lora adapter directory applied to the base (repeatable)")
    p.add_argument("--checkpoint", action=_AddModel, const="checkpoint", dest="models", metavar="PATH",
                   help="another full model, e.g. fully fine-tuned weights (repeatable)")
    p.add_argument("--label", action=_SetLabel, metavar="TEXT",
                   help="name of the preceding --adapter_dir/--checkpoint in figures and JSON "
                        "(without it: the directory name)")
    p.add_argument("--include_base", action="store_true",
                   help="also analyse the base model alone (always done when no other model is given)")
    p.add_argument("--base_label", default="base", help="label of the base model's column")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch_size", type=int, default=4, help="examples (sequences) per forward pass")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bars or per-model lines (the output paths are still printed)")
    p.add_argument("--adapter", choices=["lora", "ina", "ia3"],
                   help="adapter type; read from each --adapter_dir's config, and must agree with it if given")
    p.add_argument("--lora_dim", type=int, help="LoRA rank; read from the adapter config (checked if given)")
    p.add_argument("--lora_alpha", type=float, help="LoRA alpha; read from the adapter config (checked if given)")
    p.add_argument("--lora_inhibition", type=float,
                   help="InA inhibition; read from the adapter config (checked if given)")
    p.add_argument("--lora_slope", type=float,
                   help="InA gate's negative slope; read from the adapter config (checked if given)")
    if data:
        p.add_argument("--data", required=True, help="encoded JSONL ({'context': ids, 'completion': ids})")
        p.add_argument("--seq_len", type=int, default=512, help="examples are cut to this many tokens")
        p.add_argument("--max_examples", type=int, default=None, help="only the first N examples")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jt_lora.analysis",
        description="Interpretability of jt_lora GPT-2 models: attention maps, head importance, induction heads. "
                    "Compare models with repeated --adapter_dir DIR --label TEXT.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{attention,head-importance,induction}")

    a = sub.add_parser("attention", help="average attention maps per layer, PNGs and a layer x model grid",
                       formatter_class=_Help)
    _common(a, data=True)
    a.add_argument("--per_head", action="store_true", help="also save per-head averages (.npy + PNG per layer)")
    a.add_argument("--gamma", type=float, default=0.5,
                   help="power-law colour scale exponent (1 = linear; < 1 shows small probabilities)")

    h = sub.add_parser("head-importance", help="head importance (llm-interpret or Michel et al.) and FFN "
                       "knock-out loss change", formatter_class=_Help)
    _common(h, data=True)
    h.add_argument("--definition", default="llm-interpret", choices=["llm-interpret", "michel"],
                   help="llm-interpret: sum of per-token |grad . context| per head, layers 0..L-2 over "
                        "sum(length - 1), last layer over the loss tokens; michel: |d loss / d head mask|, "
                        "each layer's row over its L2 norm")
    h.add_argument("--loss_tokens", default="completion", choices=["completion", "all"],
                   help="tokens of the loss: completion only (as in fine-tuning) or every next token")
    h.add_argument("--no_ffn", action="store_true", help="skip the FFN knock-out (n_layer extra passes)")

    i = sub.add_parser("induction", help="prefix-matching and copying scores per head",
                       formatter_class=_Help)
    _common(i, data=False)
    i.add_argument("--num_sequences", type=int, default=20, help="random sequences per score")
    i.add_argument("--segment_len", type=int, default=25, help="distinct random tokens per segment")
    i.add_argument("--repeats", type=int, default=4, help="segment repeats for prefix matching")
    i.add_argument("--copy_len", type=int, default=None,
                   help="length of the unrepeated copying sequences (default segment_len * repeats)")
    i.add_argument("--exclude_ratio", type=float, default=0.04,
                   help="share of the lowest and of the highest token ids never drawn (GPT-2 ids follow "
                        "BPE merge order: the most and least frequent tokens)")
    i.add_argument("--bos_id", type=int, default=None,
                   help="token before every sequence (default 50256 for GPT-2's vocabulary, else none; -1 = none)")
    i.add_argument("--seed", type=int, default=0, help="seed of the random sequences")
    i.add_argument("--copying", default="llm-interpret", choices=["llm-interpret", "actual-output"],
                   help="llm-interpret: as prefix_matching_copying.py (heads read LayerNorm(embeddings); the "
                        "value at the current position through c_proj with its bias); actual-output: what "
                        "the head writes in the model (attention-weighted values, no bias)")
    i.add_argument("--prefix_matching", default="llm-interpret", choices=["llm-interpret", "exact"],
                   help="llm-interpret: the positions prefix_matching_copying.py sums, which at the last token of "
                        "each repeat include position 1 (the first segment token) besides the right ones; without "
                        "a BOS (--bos_id -1) as exact; exact: only the positions after earlier occurrences")
    return p


def _specs(args) -> List[ModelSpec]:
    others = args.models or []
    specs = []
    if args.include_base or not others:
        specs.append(ModelSpec(args.base_label, args.init_checkpoint))
    for m in others:
        label = m["label"] or (Path(m["path"]).name or m["path"])
        if m["kind"] == "adapter":
            specs.append(ModelSpec(label, args.init_checkpoint, m["path"]))
        else:
            specs.append(ModelSpec(label, m["path"]))
    flags = _adapter_flags(args)
    if flags and not any(s.adapter_dir for s in specs):
        raise ValueError(f"{', '.join(flags)} only check --adapter_dir configs, and no --adapter_dir is given")
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"labels must differ; repeated: {dupes} (name each model with --label)")
    return specs


def _adapter_flags(args) -> dict:
    """The adapter flags given on the command line, ``{"--lora_alpha": 32.0, ...}``."""
    return {flag: getattr(args, flag[2:]) for flag in ADAPTER_FLAGS if getattr(args, flag[2:]) is not None}


def _bar(args, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=args.no_progress, dynamic_ncols=True, leave=False, file=sys.stderr)


def _say(args, msg: str) -> None:
    if not args.no_progress:
        print(msg, file=sys.stderr)


class OutputError(Exception):
    """Writing ``path`` failed; the message says why and what to do."""

    def __init__(self, path: Path, error: OSError):
        code = error.errno
        if code == errno.ENOSPC:
            why = "no space left on the device; free space or choose another --out"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "not writable (read-only location or no permission); choose another --out"
        elif code in (errno.ENOTDIR, errno.EEXIST):
            why = "a part of the path is a regular file, not a directory; choose another --out"
        else:
            why = f"{error.strerror or error}; choose another --out"
        super().__init__(f"cannot write {path}: {why}")


def _writing(path: Path, write) -> None:
    """Run ``write()`` for ``path``; an OSError becomes an :class:`OutputError` naming it."""
    try:
        write()
    except OSError as e:
        raise OutputError(path, e) from None
    _WRITTEN.append(path)


_WRITTEN: List[Path] = []


def _save_npy(path: Path, array: np.ndarray) -> None:
    from ..io.atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array)
    _writing(path, lambda: atomic_write_bytes(path, buf.getvalue()))


def _save_json(path: Path, obj) -> None:
    from ..io.atomic import atomic_write_text

    _writing(path, lambda: atomic_write_text(path, json.dumps(obj, indent=1) + "\n"))


def _save_png(args, fig, path: Path) -> None:
    from .plots import save_figure

    _writing(path, lambda: save_figure(fig, path, dpi=args.dpi))


def _write_config(args, specs, out: Path) -> None:
    config = {k: v for k, v in vars(args).items() if k not in ("models", "label") + tuple(
        flag[2:] for flag in ADAPTER_FLAGS)}
    config["models"] = [s.describe() for s in specs]
    for key in ("init_checkpoint", "data", "out"):
        if config.get(key):
            config[key] = str(Path(config[key]).resolve())
    _save_json(out / f"{args.command.replace('-', '_')}_config.json", config)


def _check_same_shape(model, first, spec):
    if first is None:
        return model.config
    keys = ("n_layer", "n_head", "vocab_size")
    if any(getattr(model.config, k) != getattr(first, k) for k in keys):
        raise ValueError(f"{spec.label}: model shape {[getattr(model.config, k) for k in keys]} differs from the "
                         f"first model's {[getattr(first, k) for k in keys]} ({', '.join(keys)}); "
                         "compare models of one architecture")
    return first


def _release() -> None:
    """Return the memory of a model the caller has just deleted, before the next one is loaded."""
    from ..backend import jt

    jt.gc()


# ----------------------------------------------------------------------------------------------


def run_attention(args, specs, out: Path) -> dict:
    from .attention import attention_maps
    from .plots import attention_grid_figure, attention_map_figure, head_maps_figure

    slugs = unique_slugs([s.label for s in specs])
    first, dataset, averages, records = None, None, [], []
    for spec, slug in zip(specs, slugs):
        start = time.time()
        model = load_model(spec, _adapter_flags(args))
        first = _check_same_shape(model, first, spec)
        if dataset is None:
            dataset = read_examples(args.data, args.seq_len, model.config.vocab_size, args.max_examples)
            max_len = int(dataset.lengths.max())
        bar = _bar(args, num_batches(dataset, args.batch_size), f"{spec.label}: attention")
        maps = attention_maps(model, example_batches(dataset, args.batch_size), max_len,
                              per_head=args.per_head, progress=bar)
        bar.close()
        del model
        _release()
        model_dir = out / slug
        _save_npy(model_dir / "attention_average.npy", maps.average)
        if maps.heads is not None:
            _save_npy(model_dir / "attention_heads.npy", maps.heads)
        n_layer, n_head = maps.average.shape[0], first.n_head
        bar = _bar(args, n_layer, f"{spec.label}: figures")
        for layer in range(n_layer):
            title = f"{spec.label}: layer {layer}, mean of {n_head} heads over {maps.num_examples} examples"
            _save_png(args, attention_map_figure(maps.average[layer], title, args.gamma),
                      model_dir / f"layer_{layer}_head_average.png")
            if maps.heads is not None:
                _save_png(args, head_maps_figure(maps.heads[layer], f"{spec.label}: layer {layer}, per head",
                                                 args.gamma), model_dir / f"layer_{layer}_heads.png")
            bar.update(1)
        bar.close()
        averages.append(maps.average)
        records.append({**spec.describe(), "dir": slug, "entropy": maps.entropy.tolist(),
                        "files": {"average": f"{slug}/attention_average.npy",
                                  "heads": f"{slug}/attention_heads.npy" if maps.heads is not None else None,
                                  "layer_png": f"{slug}/layer_{{i}}_head_average.png"},
                        "seconds": round(time.time() - start, 2)})
        _say(args, f"{spec.label}: {maps.num_examples} examples, {n_layer} layers -> {model_dir}")
    _save_npy(out / "attention_count.npy", maps.count)
    title = f"Average attention over heads and {maps.num_examples} examples (colour ~ p^{args.gamma:g})"
    _save_png(args, attention_grid_figure(averages, [s.label for s in specs], title, args.gamma),
              out / "attention_grid.png")
    summary = {"command": "attention", "num_examples": maps.num_examples, "max_len": max_len,
               "n_layer": first.n_layer, "n_head": first.n_head, "shape": list(maps.average.shape),
               "grid": "attention_grid.png", "count": "attention_count.npy",
               "entropy_note": "mean entropy (nats) of a real query position's attention, per layer",
               "models": records}
    _save_json(out / "attention.json", summary)
    return summary


def run_head_importance(args, specs, out: Path) -> dict:
    from .importance import ffn_knockout, head_importance
    from .plots import importance_figure

    first, dataset, records = None, None, []
    for spec, slug in zip(specs, unique_slugs([s.label for s in specs])):
        start = time.time()
        model = load_model(spec, _adapter_flags(args))
        first = _check_same_shape(model, first, spec)
        if dataset is None:
            dataset = read_examples(args.data, args.seq_len, model.config.vocab_size, args.max_examples)
        nb = num_batches(dataset, args.batch_size)
        bar = _bar(args, nb, f"{spec.label}: head importance")
        imp = head_importance(model, example_batches(dataset, args.batch_size), args.loss_tokens,
                              definition=args.definition, progress=bar)
        bar.close()
        record = {**spec.describe(), "dir": slug, "loss": imp["loss"], "loss_tokens": int(imp["tokens"]),
                  "positions": int(imp["positions"]),
                  "head_importance": {"importance": imp["importance"].tolist(), "raw": imp["raw"].tolist()},
                  "ffn_knockout": None}
        if not args.no_ffn:
            bar = _bar(args, nb * model.config.n_layer, f"{spec.label}: FFN knock-out")
            ko = ffn_knockout(model, lambda: example_batches(dataset, args.batch_size), args.loss_tokens,
                              base_loss=imp["loss"], progress=bar)
            bar.close()
            record["ffn_knockout"] = {"base_loss": ko["base_loss"], "loss": ko["loss"].tolist(),
                                      "delta": ko["delta"].tolist()}
        del model
        _release()
        record["seconds"] = round(time.time() - start, 2)
        records.append(record)
        _say(args, f"{spec.label}: loss {imp['loss']:.4f} over {int(imp['tokens'])} tokens")
    summary = {"command": "head-importance", "definition": args.definition, "num_examples": len(dataset),
               "loss_tokens": args.loss_tokens, "batch_size": args.batch_size,
               "n_layer": first.n_layer, "n_head": first.n_head, "figure": "head_importance.png",
               "note": _IMPORTANCE_NOTES[args.definition] + "; ffn_knockout.delta[l] = loss without layer l's "
                       "feed-forward block - loss of the intact model",
               "models": records}
    scores = [np.array(r["head_importance"]["importance"]) for r in records]
    deltas = [np.array(r["ffn_knockout"]["delta"]) if r["ffn_knockout"] else np.zeros(first.n_layer)
              for r in records]
    name = "llm-interpret" if args.definition == "llm-interpret" else "Michel et al. 2019"
    title = f"Head importance ({name}) and FFN knock-out on {len(dataset)} examples"
    colour = ("sum |grad . context| per token" if args.definition == "llm-interpret"
              else "|dL/dmask|, L2-normalised per layer")
    _save_png(args, importance_figure(scores, deltas, [s.label for s in specs], title, colour),
              out / "head_importance.png")
    _save_json(out / "head_importance.json", summary)
    return summary


_IMPORTANCE_NOTES = {
    "llm-interpret": "importance[l][h] = sum over batches, examples and positions of |sum_d g*c|, c = head h's "
                     "slice of layer l's attention context (before c_proj), g = d(batch mean loss over the loss "
                     "tokens)/dc; layers 0..L-2 divided by positions = sum over examples of (real length - 1), "
                     "the last layer by loss_tokens (amazon-science/llm-interpret calculate_importance); "
                     "raw = importance",
    "michel": "raw[l][h] = loss-token-weighted mean over batches of |d batch mean loss / d head_mask[l][h]| at "
              "mask 1 (Michel et al. 2019); importance = raw / L2 norm of layer l",
}


def _top_heads(prefix: np.ndarray, copying: np.ndarray, k: int = 10):
    order = np.argsort(-prefix, axis=None)[:k]
    return [{"layer": int(i // prefix.shape[1]), "head": int(i % prefix.shape[1]),
             "prefix_matching": float(prefix.flat[i]), "copying": float(copying.flat[i])} for i in order]


def run_induction(args, specs, out: Path) -> dict:
    from .induction import induction_scores
    from .plots import head_scores_figure

    first, records, settings = None, [], None
    for spec, slug in zip(specs, unique_slugs([s.label for s in specs])):
        start = time.time()
        model = load_model(spec, _adapter_flags(args))
        first = _check_same_shape(model, first, spec)
        bos = args.bos_id
        if bos is None:
            bos = 50256 if model.config.vocab_size > 50256 else None
        elif bos < 0:
            bos = None
        settings = {"num_sequences": args.num_sequences, "segment_len": args.segment_len,
                    "repeats": args.repeats, "copy_len": args.copy_len or args.segment_len * args.repeats,
                    "exclude_ratio": args.exclude_ratio, "bos_id": bos, "seed": args.seed,
                    "copying": args.copying, "prefix_matching": args.prefix_matching}
        bar = _bar(args, -(-args.num_sequences // args.batch_size), f"{spec.label}: induction")
        scores = induction_scores(model, args.num_sequences, args.segment_len, args.repeats, args.copy_len,
                                  args.exclude_ratio, bos, args.seed, args.batch_size, copying=args.copying,
                                  prefix_matching=args.prefix_matching, progress=bar)
        bar.close()
        del model
        _release()
        prefix, copying = scores["prefix_matching"], scores["copying"]   # [N, L, H]
        records.append({**spec.describe(), "dir": slug,
                        "prefix_matching": {"mean": prefix.mean(0).tolist(), "std": prefix.std(0).tolist()},
                        "copying": {"mean": copying.mean(0).tolist(), "std": copying.std(0).tolist()},
                        "top_heads": _top_heads(prefix.mean(0), copying.mean(0)),
                        "seconds": round(time.time() - start, 2)})
        best = records[-1]["top_heads"][0]
        _say(args, f"{spec.label}: best prefix-matching head L{best['layer']}H{best['head']} "
                   f"({best['prefix_matching']:.3f}, copying {best['copying']:.3f})")
    summary = {"command": "induction", "settings": settings, "n_layer": first.n_layer, "n_head": first.n_head,
               "figure": "induction.png",
               "note": "mean/std over sequences of [layer][head] scores in [0, 1]; copying by the definition in "
                       "settings.copying (llm-interpret: prefix_matching_copying.py; actual-output: what the head "
                       "writes); prefix matching by settings.prefix_matching (llm-interpret: the script's positions, "
                       "position 1 included at the last token of each repeat when there is a BOS; exact: only the "
                       "positions after earlier occurrences); see jt_lora/analysis/induction.py",
               "models": records}
    rows = [("prefix matching", [np.array(r["prefix_matching"]["mean"]) for r in records], 0.0, 1.0),
            ("copying", [np.array(r["copying"]["mean"]) for r in records], 0.0, 1.0)]
    title = (f"Induction scores on {settings['num_sequences']} random sequences "
             f"({settings['segment_len']} tokens x {settings['repeats']})")
    _save_png(args, head_scores_figure(rows, [s.label for s in specs], title), out / "induction.png")
    _save_json(out / "induction.json", summary)
    return summary


_RUNNERS = {"attention": run_attention, "head-importance": run_head_importance, "induction": run_induction}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _WRITTEN.clear()
    out = Path(args.out)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        specs = _specs(args)
        _writing(out, lambda: out.mkdir(parents=True, exist_ok=True))
        _WRITTEN.pop()
        _write_config(args, specs, out)
        _RUNNERS[args.command](args, specs, out)
    except (FileNotFoundError, ValueError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # reading: a directory where a file was expected, no permission, ...
        print(f"error: cannot read {e.filename or 'an input'}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {len(_WRITTEN)} files to {out}:")
    for path in _WRITTEN:
        print(f"  {path}")
    return 0
