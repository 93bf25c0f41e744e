"""One place to find third-party assets (GPT-2 vocab, E2E data, BoolQ, checkpoints).

Assets are never committed to the project. They are looked up, in this order:

1. an explicit path given by the caller (a command-line flag); if given, it must exist;
2. ``$JT_LORA_DATA/<relpath>`` (the env var names a directory);
3. ``<project root>/data/<relpath>`` (where ``scripts/download_data.sh`` puts them);
4. ``<project root>/../shared/data/<relpath>`` (a read-only copy beside the project).

Names are paths relative to a data root, e.g. ``gpt2-vocab``, ``e2e/test.txt`` or
``e2e-csv/testset_w_refs.csv``. A missing asset raises a FileNotFoundError that lists every place
that was tried and says how to download it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

ENV_VAR = "JT_LORA_DATA"
# The repository root: jt_lora/assets.py -> jt_lora -> root.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD_HINT = "run `bash scripts/download_data.sh` (needs network) or set JT_LORA_DATA to a directory holding it"


def data_roots() -> List[Tuple[str, Path]]:
    """The data directories searched after an explicit path, highest precedence first.

    Returns:
        ``(label, directory)`` pairs; the env var entry is present only when the variable is set.
    """
    roots = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append((f"${ENV_VAR}", Path(env).expanduser()))
    roots.append(("project data/", PROJECT_ROOT / "data"))
    roots.append(("../shared/data", PROJECT_ROOT.parent / "shared" / "data"))
    return roots


def find_asset(relpath: PathLike, explicit: Optional[PathLike] = None) -> Path:
    """Find a file or directory asset.

    Args:
        relpath: path relative to a data root, e.g. ``"gpt2-vocab"`` or ``"e2e/valid.txt"``.
        explicit: a path given by the user (a flag). When not None it wins outright, and a missing
            explicit path is an error rather than a silent fall-back to another copy.

    Returns:
        The resolved path of the first existing candidate.

    Raises:
        FileNotFoundError: nothing exists at any candidate; the message lists them all.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.exists():
            return path.resolve()
        raise FileNotFoundError(f"{relpath}: the path given explicitly does not exist: {path}")
    tried = []
    for label, root in data_roots():
        path = root / relpath
        if path.exists():
            return path.resolve()
        tried.append(f"  {label}: {path}")
    raise FileNotFoundError(
        f"asset {str(relpath)!r} not found; looked in:\n" + "\n".join(tried) + f"\nTo get it, {DOWNLOAD_HINT}."
    )


def try_find_asset(relpath: PathLike, explicit: Optional[PathLike] = None) -> Optional[Path]:
    """Like :func:`find_asset` but returns None when the asset is absent (for "use what is found")."""
    try:
        return find_asset(relpath, explicit)
    except FileNotFoundError:
        return None
