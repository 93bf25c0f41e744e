"""Lazy package exports: a name is imported from its module on first use.

``import jt_lora`` (and ``jt_lora.analysis``) must stay cheap, because the tokenizer, data
preparation, decoding and metrics never need Jittor, whose first import configures and compiles.
"""
import importlib
from typing import Callable, Dict, Tuple

__all__ = ["lazy_exports"]


def lazy_exports(package: str, namespace: dict, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a public name to the submodule
    (relative to ``package``) that defines it; a resolved name is cached in ``namespace``."""

    def __getattr__(name):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
