"""``python -m jt_lora.analysis attention|head-importance|induction ...``"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
