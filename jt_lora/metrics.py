"""``python -m jt_lora.metrics``: the official E2E metrics.

The command; its implementation is ``jt_lora.tasks.e2e.metrics``."""
import sys

from .tasks.e2e.metrics import main, build_parser  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
