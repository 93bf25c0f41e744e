"""``python -m jt_lora.eval_boolq``: BoolQ accuracy by log-likelihood or from generated text.

The command; its implementation is ``jt_lora.tasks.boolq.evaluate``."""
import sys

from .tasks.boolq.evaluate import main, build_parser  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
