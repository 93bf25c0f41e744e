"""``python -m jt_lora.data``: token-position counts of an encoded JSONL file.

The command; its implementation is ``jt_lora.training.data``."""
import sys

from .training.data import FTDataLoader, FTDataset, collate, main, read_encoded_jsonl, token_counts  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
