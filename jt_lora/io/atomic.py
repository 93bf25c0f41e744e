"""The one way jt_lora puts a file (or a directory) in place: readers see the old one or the new one.

The policy, the same for every writer (adapters, checkpoints, configs, predictions, plots, data):

1. Write to a temp file in the target's own directory (``.<name>.<random>.tmp``: hidden, so a glob
   for outputs never sees it; same file system, so the rename is atomic).
2. Flush and ``fsync`` the temp file: a crash after the rename can never leave an empty or short
   file under the real name (ext4/xfs may otherwise commit the rename before the data).
3. Give it the usual permissions (``0666 & ~umask``; ``mkstemp`` makes ``0600``).
4. ``os.replace`` it onto the target: atomic on POSIX, overwrites an existing file.
5. ``fsync`` the directory, so the rename itself survives a power cut. Best effort: some file
   systems (and Windows) refuse to open or fsync a directory, which costs only that durability.

On any error (or Ctrl-C) the temp file is removed and the previous file is left as it was.

The cost is two fsyncs per file, paid only where outputs are written (configs, checkpoints, the
end of a generation run), never inside a training step or a decode step.

Directories (a training checkpoint: several files that belong together) are written whole under a
temporary name and moved in by ``replace_dir``; a file that grew over a long run (``--overwrite``
predictions, appended and fsynced batch by batch) is moved in by ``replace_file``.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator, Union

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_open", "replace_file", "replace_dir",
           "move_aside", "fsync_dir"]

_UMASK = os.umask(0)      # read once: os.umask can only be read by setting it, which is not thread-safe
os.umask(_UMASK)


def fsync_dir(path) -> None:
    """Make renames in ``path`` durable (best effort: some file systems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO]:
    """A file object for ``path`` that becomes ``path`` only when the ``with`` block ends cleanly.

    Args:
        mode: ``"wb"`` or ``"w"`` (text, ``encoding``, ``\\n`` line ends on every platform).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        text = {"encoding": encoding, "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` by the module's policy (temp file, fsync, rename, fsync dir)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: Union[str, Iterable[str]]) -> None:
    """Write UTF-8 text (a string, or chunks written one by one without joining them) atomically."""
    with atomic_open(path, "w") as f:
        if isinstance(text, str):
            f.write(text)
        else:
            f.writelines(text)


def replace_file(src, dst) -> None:
    """Move a complete file ``src`` (already fsynced by its writer, in ``dst``'s directory) onto ``dst``."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def replace_dir(tmp, final) -> None:
    """Move a fully written directory ``tmp`` to ``final``; an old ``final`` is removed only after.

    POSIX cannot rename a directory over a non-empty one, so the old one steps aside as
    ``<final>.old`` first; a crash in between leaves ``<final>.old`` complete (and readable).
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def move_aside(path, target) -> None:
    """Rename ``path`` to ``target``, which must not exist (never clobbers: ``os.rename`` semantics
    on a directory, checked for files too)."""
    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} exists; not replacing it")
    os.rename(path, target)
    fsync_dir(target.parent)
