"""Prepare E2E NLG data for jt_lora: the equivalent of LoRA's create_datasets.sh (E2E part).

Everything found (train/valid/test, from LoRA's txt files or the official CSVs):
    python examples/NLG/prepare_e2e.py --out_dir data/e2e_prepared
Offline (no train set), carve a small demo train split out of valid:
    python examples/NLG/prepare_e2e.py --out_dir data/e2e_prepared --train_from_valid 300
One file:
    python examples/NLG/prepare_e2e.py --input e2e-csv/devset.csv --output valid.jsonl
See examples/NLG/README.md.
"""

import argparse
import sys
from pathlib import Path

try:
    from jt_lora.tasks.e2e import data as e2e_data
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from jt_lora.tasks.e2e import data as e2e_data


def parse_args(argv=None):
    from jt_lora.cli import RawDescriptionDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawDescriptionDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="data/e2e_prepared", help="where {split}.jsonl and {split}_formatted.jsonl go")
    p.add_argument("--splits", nargs="+", default=["train", "valid", "test"], choices=list(e2e_data.SPLIT_SOURCES),
                   help="splits to convert (those found)")
    p.add_argument("--data_dir", default=None, help="data root holding e2e/ or e2e-csv/ (default: asset search order)")
    p.add_argument("--source", default="auto", choices=["auto", "txt", "csv"], help="auto: txt files, else CSVs")
    p.add_argument("--input", default=None, help="convert this one file (txt or CSV) instead of the splits")
    p.add_argument("--output", default=None, help="encoded JSONL for --input")
    p.add_argument("--formatted_output", default=None, help="formatted JSONL for --input (optional)")
    p.add_argument("--vocab", default=None, help="GPT-2 vocab dir with encoder.json + vocab.bpe (default: the gpt2-vocab asset)")
    p.add_argument("--add_bos", action=argparse.BooleanOptionalAction, default=True, help="append 50256 to the context")
    p.add_argument("--add_eos", action=argparse.BooleanOptionalAction, default=True, help="append 50256 to the completion")
    p.add_argument("--csv_text", default="raw", choices=e2e_data.TEXT_STYLES,
                   help="CSV references: raw (verbatim) or lora (word-tokenized like LoRA's txt, ~99%% exact)")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N examples of each output")
    p.add_argument("--train_from_valid", type=int, default=None,
                   help="if no train data is found: first N valid examples become train (demo only)")
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count bad lines instead of failing")
    p.add_argument("--seq_len", type=int, default=512, help="report how many examples the loader will truncate")
    p.add_argument("--force", action="store_true", help="re-convert even if outputs are up to date")
    args = p.parse_args(argv)
    if args.input and not args.output:
        p.error("--input needs --output")
    return args


def main(argv=None) -> int:
    from jt_lora.cli import run_cli
    args = parse_args(argv)
    return run_cli(lambda: _run(args), "prepare_e2e.py")


def _run(args) -> int:
    """Convert; OSError (full disk, read-only, a file where a directory should be) and ValueError (bad
    input, named by file:line) become one line through ``run_cli``."""
    kwargs = dict(vocab_dir=args.vocab, add_bos=args.add_bos, add_eos=args.add_eos, text_style=args.csv_text,
                  skip_bad_lines=args.skip_bad_lines, limit=args.limit, force=args.force)
    if args.input:
        result = e2e_data.convert_file(args.input, args.output, args.formatted_output, **kwargs)
        results = {"input": result}
        status = "cached" if result.cached else f"{result.seconds:.2f}s"
        print(f"{result.n_examples} examples -> {result.output} ({status}, {result.n_bad_lines} bad lines skipped)")
        for message in result.bad_lines[:3]:
            print(f"  skipped {message}")
    else:
        results = e2e_data.prepare_e2e(args.out_dir, args.splits, data_dir=args.data_dir, source=args.source,
                                       train_from_valid=args.train_from_valid, **kwargs)
    for name, r in results.items():
        n_long = r.n_longer_than(args.seq_len)
        if n_long:
            print(f"{name}: {n_long} of {r.n_examples} examples exceed --seq_len {args.seq_len} and will be truncated")
    if not results:
        from jt_lora.io.assets import data_roots
        searched = ", ".join(f"{label} ({path}/e2e)" for label, path in data_roots())
        print(f"error: no E2E data found (searched {searched}); point JT_LORA_DATA at a directory holding "
              "e2e/ (or e2e-csv/), pass --data_dir, or run `bash scripts/download_data.sh`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
