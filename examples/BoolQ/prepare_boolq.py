"""Prepare BoolQ for jt_lora: official JSONL -> {train,valid,test}.jsonl + *_formatted.jsonl.

train/valid: a seeded split of the official train file (whole passages on one side);
test: the official dev file (the official test labels are hidden).
    bash scripts/download_data.sh vocab boolq            # when online
    python examples/BoolQ/prepare_boolq.py --out_dir data/boolq_prepared
Explicit files:
    python examples/BoolQ/prepare_boolq.py --train my/train.jsonl --dev my/dev.jsonl --out_dir out
Passages are cut (never the question or the answer) so every example fits --seq_len; the count is
reported per split. See examples/BoolQ/README.md.
"""

import argparse
import json
import sys
from pathlib import Path

try:
    from jt_lora.tasks.boolq import data as boolq
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from jt_lora.tasks.boolq import data as boolq


def _valid_size(text: str) -> float:
    value = float(text)
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1), got {text}")
    return value


def parse_args(argv=None):
    from jt_lora.cli import RawDescriptionDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="data/boolq_prepared", help="where {split}.jsonl and {split}_formatted.jsonl go")
    p.add_argument("--train", default=None, help="official train JSONL (default: boolq/train.jsonl in the data roots)")
    p.add_argument("--dev", default=None, help="official dev JSONL, used as test (default: boolq/dev.jsonl)")
    p.add_argument("--data_dir", default=None, help="data root holding boolq/ (default: asset search order)")
    p.add_argument("--seq_len", type=int, default=512, help="every example fits this many tokens (train --seq_len)")
    p.add_argument("--valid_size", type=_valid_size, default=0.1,
                   help="valid examples taken from train: a count, or a fraction below 1")
    p.add_argument("--seed", type=int, default=110, help="seed of the train/valid split")
    p.add_argument("--split_by", default="passage", choices=boolq.SPLIT_BY,
                   help="passage: questions about one passage stay on one side; example: exact sizes")
    p.add_argument("--template", default=boolq.DEFAULT_TEMPLATE,
                   help="prompt with {passage}, {question} and optionally {title} (the completion is ' yes'/' no')")
    p.add_argument("--no_title", action="store_true", help="leave the title out of the prompt")
    p.add_argument("--vocab", default=None, help="GPT-2 vocab dir with encoder.json + vocab.bpe (default: the gpt2-vocab asset)")
    p.add_argument("--add_bos", action=argparse.BooleanOptionalAction, default=True, help="append 50256 to the context")
    p.add_argument("--add_eos", action=argparse.BooleanOptionalAction, default=True, help="append 50256 to the completion")
    p.add_argument("--limit", type=int, default=None, help="read only the first N examples of each file")
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count bad lines instead of failing")
    p.add_argument("--force", action="store_true", help="re-convert even if outputs are up to date")
    args = p.parse_args(argv)
    if args.no_title:
        if args.template != boolq.DEFAULT_TEMPLATE:
            p.error("--no_title applies to the default template; leave {title} out of --template instead")
        args.template = boolq.NO_TITLE_TEMPLATE
    return args


def main(argv=None) -> int:
    from jt_lora.cli import run_cli
    args = parse_args(argv)
    return run_cli(lambda: _run(args), "prepare_boolq.py")


def _run(args) -> int:
    """Convert; OSError (full disk, read-only, a file where a directory should be) and ValueError (bad
    input, named by file:line) become one line through ``run_cli``."""
    results = boolq.prepare_boolq(
        args.out_dir, train_file=args.train, dev_file=args.dev, data_dir=args.data_dir, seq_len=args.seq_len,
        valid_size=args.valid_size, seed=args.seed, split_by=args.split_by, template=args.template,
        add_bos=args.add_bos, add_eos=args.add_eos, vocab_dir=args.vocab, skip_bad_lines=args.skip_bad_lines,
        limit=args.limit, force=args.force, log=lambda m: print(m, file=sys.stderr))
    summary = {split: {k: getattr(r, k) for k in ("n_examples", "n_yes", "n_no", "n_truncated", "max_length",
                                                  "n_bad_lines", "cached")}
               for split, r in results.items()}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
