"""``python -m jt_lora.decode``: generated ids -> the E2E scorer's files (gpt2_decode.py).

The command; its implementation is ``jt_lora.tasks.e2e.decode``."""
import sys

from .tasks.e2e.decode import main, build_parser  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
