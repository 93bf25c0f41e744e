"""``python -m jt_lora.generate``: beam search with microsoft/LoRA's gpt2_beam.py flags and results.

The command only: its flags (the reference's, plus the model flags shared with ``eval_boolq``), the
checks made before anything is loaded or written, and the run. The search is
``jt_lora.generation.beam`` (``from jt_lora.generate import beam_search`` keeps working), the
output files ``jt_lora.generation.predictions``, the model comes from ``jt_lora.models.loading``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Tuple

from .generation.beam import BeamSettings, beam_search, beam_search_batch, length_order, progress_bar
from .generation.predictions import PredictionFiles, decoded_text, padded, read_predictions

__all__ = ["BeamSettings", "beam_search", "beam_search_batch", "read_predictions", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from .cli import DefaultsHelpFormatter
    from .models.loading import add_model_flags

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
    p.add_argument("--precision", default="fp32",
                   help="weights of the projections and LM head: fp32, or int8 (opt-in, CPU only: int8 per "
                        "output channel after merging the adapter; faster, slightly different outputs)")
    return p


def build_model(args):
    """The model the flags describe, in eval mode (see ``jt_lora.models.loading``)."""
    from .models.loading import build_model as build
    return build(args)


def validate_args(args) -> None:
    """Every flag checked before any work or write; errors name the flag."""
    from .cli import positive_int
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
    from .nn.quant import check_precision
    check_precision(args.precision)
    _check_writable_dir(Path(args.work_dir))
    from .models.loading import check_model_flags
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


def main(argv=None) -> int:
    from .cli import run_cli
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), "jt_lora.generate")


def _run(args) -> int:
    from .training.data import FTDataset

    validate_args(args)
    files = PredictionFiles(Path(args.work_dir) / args.output_file, args.overwrite)
    model = build_model(args)
    if args.precision != "fp32":
        from .nn.quant import quantize_model
        quantize_model(model)
    else:   # the fused step's packed strips become the only copy of the block weights (inference only)
        from .nn.decode_block import pack_model
        pack_model(model, rows=args.batch_size * args.beam)
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
        "num_examples": n, "output_file": str(files.out), "text_file": None,
        "settings": asdict(settings),
    }
    if args.precision != "fp32":   # part of "model", so fp32 and int8 predictions never mix in one file
        resolved["model"]["precision"] = args.precision
    done = files.done(resolved, len(dataset))

    tokenizer = None
    if args.vocab is not None or vocab == 50257:
        from .io.assets import try_find_asset
        from .models.tokenizer import load_tokenizer
        if args.vocab is not None or try_find_asset("gpt2-vocab") is not None:
            tokenizer = load_tokenizer(args.vocab)
            resolved["text_file"] = str(files.text)

    # Work items: one per example, or one per distinct prompt (all its ids written together).
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(tuple(q) if args.unique_contexts else (i,), []).append(i)
    pending = [(ids[0], [i for i in ids if i not in done]) for ids in groups.values()]
    pending = [(first, todo) for first, todo in pending if todo]
    print(f"{n} examples, {len(groups)} {'distinct prompts' if args.unique_contexts else 'prompts'}; "
          f"{len(pending)} to generate, {len(done)} ids already in {files.out}", file=sys.stderr)

    order = length_order([len(queries[first]) for first, _ in pending])
    bar = progress_bar(len(pending), not args.no_progress)
    new_tokens, start = 0, time.time()
    try:
        with files.appending(resolved) as append:
            for b in range(0, len(order), args.batch_size):
                chunk = [pending[j] for j in order[b:b + args.batch_size]]
                seqs, _ = beam_search_batch(model, [queries[first] for first, _ in chunk], settings)
                records = sorted((i, padded(q, args.eval_len)) for (_, todo), q in zip(chunk, seqs) for i in todo)
                append(records)
                for i, p in records:
                    done[i] = p
                new_tokens += sum(len(q) for q in seqs)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - start, 1e-9):.1f}")
    finally:
        bar.close()

    if tokenizer is not None:
        files.write_text([decoded_text(tokenizer, done[i], eos) if i in done else "" for i in range(n)])
    print(f"wrote {files.out} ({len(done)} ids)" + (f" and {files.text}" if tokenizer is not None else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
