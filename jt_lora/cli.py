"""What every jt_lora command line shares: help that shows defaults, and one-line errors.

Each entry point's ``main`` turns the user's mistakes and the machine's faults into one line on
stderr and a non-zero exit, never a traceback: a bad flag or input (``ValueError``, naming the flag,
file and line), and an I/O fault (``OSError``: a full disk, a read-only file system, an output path
under a regular file), where the message names the path and says what to do about it.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, Optional

__all__ = ["DefaultsHelpFormatter", "RawDescriptionDefaultsHelpFormatter", "describe_os_error", "run_cli"]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` once per flag, and only where it tells the reader something.

    Skipped when the help text already speaks of the default (it says what None means, e.g. "from
    the adapter's config"), when the default is None or suppressed, for required flags and for
    plain switches (``store_true``: off unless given).
    ``--x/--no-x`` flags (``BooleanOptionalAction``) show theirs.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if ("default" in text or action.required or action.default is None or switch
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


class RawDescriptionDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults as above, and the description printed as written (usage examples keep their lines)."""


_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write somewhere else",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "permission denied: choose a location you can write (or read) to",
    errno.EPERM: "operation not permitted: choose a location you can write to",
    errno.ENOTDIR: "a parent of this path is a regular file, not a directory: choose another path",
    errno.EISDIR: "this path is a directory: give a file name",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EEXIST: "a file is in the way: remove it or choose another path",
}


def describe_os_error(e: OSError) -> str:
    """``PATH: what went wrong (what to do)`` for an I/O fault, without a traceback."""
    if e.errno is None:   # raised by our own code with a full message (e.g. FileNotFoundError(text))
        return str(e)
    path = e.filename if e.filename is not None else "?"
    what = e.strerror or str(e)
    hint = _HINTS.get(e.errno)
    return f"{path}: {what} ({hint})" if hint else f"{path}: {what}"


def run_cli(body: Callable[[], int], prog: str, *, user_errors=(ValueError,), code: int = 1) -> int:
    """Run ``body``; a user error or an I/O fault becomes ``prog: error: ...`` and exit ``code``.

    ``UnicodeDecodeError`` is a ``ValueError``; readers that know the line report it themselves,
    and this catch keeps any other from becoming a traceback.
    """
    try:
        return body()
    except OSError as e:
        print(f"{prog}: error: {describe_os_error(e)}", file=sys.stderr)
    except user_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished output is kept", file=sys.stderr)
        return 130
    return code


def positive_int(flag: str, value: Optional[int], minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``flag`` when ``value`` is below ``minimum`` (None is allowed)."""
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")
