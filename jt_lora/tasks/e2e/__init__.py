"""E2E NLG: data preparation (LoRA's format), decoding generated ids for the scorer, the official metrics."""
