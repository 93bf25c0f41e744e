"""One place to find third-party assets (GPT-2 vocab, E2E data, BoolQ, checkpoints).

Assets are never committed to the project. They are looked up, in this order:

1. an explicit path given by the caller (a command-line flag); if given, it must exist;
2. ``$JT_LORA_DATA/<relpath>`` (the env var names a directory);
3. ``<project root>/data/<relpath>`` (where ``scripts/download_data.sh`` puts them);
4. ``<project root>/../shared/data/<relpath>`` (a read-only copy beside the project).

Names are paths relative to a data root, e.g. ``gpt2-vocab``, ``e2e/test.txt`` or
``e2e-csv/testset_w_refs.csv``. A missing asset raises a FileNotFoundError that lists every place
that was tried and says how to get it (``$JT_LORA_DATA`` or the download script).

The module needs only the standard library, so the shell scripts can ask it, with any Python 3 and
before ``.venv`` exists, whether the quickstart data is there::

    python3 -m jt_lora.io.assets check     # silent, exit 0 when found; else one error line, exit 1
    python3 -m jt_lora.io.assets where     # where each quickstart file is found
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

ENV_VAR = "JT_LORA_DATA"
# The repository root: jt_lora/io/assets.py -> jt_lora/io -> jt_lora -> root.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOWNLOAD_SCRIPT = "scripts/download_data.sh"
DOWNLOAD_HINT = f"run `bash {DOWNLOAD_SCRIPT}` (needs network) or set {ENV_VAR} to a data directory containing"
# What scripts/demo.sh and the data tests read: the GPT-2 vocab and the E2E valid/test files (both
# LoRA's txt and the official CSVs). `bash scripts/download_data.sh` fetches all of them (~10 MB).
QUICKSTART_ASSETS = (
    "gpt2-vocab/encoder.json",
    "gpt2-vocab/vocab.bpe",
    "e2e/valid.txt",
    "e2e/test.txt",
    "e2e-csv/devset.csv",
    "e2e-csv/testset_w_refs.csv",
)


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
    tried = [] if os.environ.get(ENV_VAR) else [f"  ${ENV_VAR}: not set"]
    for label, root in data_roots():
        path = root / relpath
        if path.exists():
            return path.resolve()
        tried.append(f"  {label}: {path}")
    raise FileNotFoundError(
        f"asset {str(relpath)!r} not found; looked in:\n" + "\n".join(tried) + f"\nTo get it, {DOWNLOAD_HINT} {relpath}."
    )


def try_find_asset(relpath: PathLike, explicit: Optional[PathLike] = None) -> Optional[Path]:
    """Like :func:`find_asset` but returns None when the asset is absent (for "use what is found")."""
    try:
        return find_asset(relpath, explicit)
    except FileNotFoundError:
        return None


def missing_assets(relpaths: Sequence[PathLike] = QUICKSTART_ASSETS) -> List[str]:
    """The names in ``relpaths`` found in no data root (each file may come from a different root)."""
    return [str(rel) for rel in relpaths if try_find_asset(rel) is None]


def missing_data_message(missing: Sequence[str], download_failed: bool = False,
                         command: str = "bash scripts/demo.sh") -> str:
    """One error line for a user with no data: what is missing, where we looked, and the two fixes.

    Args:
        missing: the asset names not found (see :func:`missing_assets`).
        download_failed: the download script was tried and failed (the usual cause: no network).
        command: the command the user ran, shown with ``JT_LORA_DATA=...`` in front of it.
    """
    env = os.environ.get(ENV_VAR)
    places = [f"${ENV_VAR}={env}" if env else f"${ENV_VAR} (not set)"]
    places += [str(root) for label, root in data_roots() if not label.startswith("$")]
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    tried = f"; `bash {DOWNLOAD_SCRIPT}` could not download it (offline?)" if download_failed else ""
    return (f"error: GPT-2 vocab / E2E data not found ({shown}); searched {', '.join(places)}{tried}. "
            f"Fix: set {ENV_VAR} to a directory holding gpt2-vocab/ and e2e/ "
            f"(e.g. {ENV_VAR}=/path/to/data {command}), or run `bash {DOWNLOAD_SCRIPT}` when online.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``check``: exit 1 with one error line when quickstart data is missing; ``where``: list it."""
    parser = argparse.ArgumentParser(prog="python -m jt_lora.io.assets", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("check", "where"))
    parser.add_argument("names", nargs="*", help="asset names (default: the quickstart set)")
    parser.add_argument("--download_failed", action="store_true",
                        help="say in the error that the download script was tried and failed")
    parser.add_argument("--command", default="bash scripts/demo.sh", help="the user's command, for the error's example")
    args = parser.parse_args(argv)
    names = args.names or list(QUICKSTART_ASSETS)
    if args.action == "where":
        for name in names:
            print(f"{name}: {try_find_asset(name) or 'MISSING'}")
    missing = missing_assets(names)
    if missing and args.action == "check":
        print(missing_data_message(missing, args.download_failed, args.command), file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
