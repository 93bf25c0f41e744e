"""``python -m jt_lora.train``: fine-tune GPT-2 with LoRA, InA, (IA)³ or all weights.

The command; its implementation is ``jt_lora.training.trainer``."""
import sys

from .training.trainer import build_parser, main, masked_loss_sum  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
