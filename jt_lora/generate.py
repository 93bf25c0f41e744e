"""``python -m jt_lora.generate``: beam search with microsoft/LoRA's gpt2_beam.py semantics.

The command; its implementation is ``jt_lora.generation.beam``."""
import sys

from .generation.beam import BeamSettings, beam_search, beam_search_batch, build_parser, main, read_predictions  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
