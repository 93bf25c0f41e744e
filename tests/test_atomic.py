"""The one write policy (jt_lora.io.atomic): temp file beside the target, fsync it, rename, fsync the dir."""
import os
import stat

import pytest

from jt_lora.io import atomic


def _spy(monkeypatch):
    """Record, in order, each fsync (file or dir) and each rename."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file",))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_policy_temp_beside_target_fsync_rename_fsync_dir(tmp_path, monkeypatch):
    events = _spy(monkeypatch)
    target = tmp_path / "sub" / "out.json"
    atomic.atomic_write_text(target, "{}\n")
    assert [e[0] for e in events] == ["fsync-file", "replace", "fsync-dir"]
    src, dst = events[1][1], events[1][2]
    assert dst == str(target)
    assert os.path.dirname(src) == str(target.parent)                       # same directory: atomic rename
    assert os.path.basename(src).startswith(".out.json.") and src.endswith(".tmp")   # hidden from globs
    assert target.read_text() == "{}\n"


def test_usual_permissions_and_bytes_and_chunks(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    atomic.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic.atomic_write_text(tmp_path / "t.txt", (f"{i}\n" for i in range(3)))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_bytes() == b"0\n1\n2\n"
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o666 & ~umask   # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("old\n")

    def chunks():
        yield "new line 1\n"
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic.atomic_write_text(target, chunks())
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_atomic_open_text_mode_writes_unix_newlines_and_rejects_other_modes(tmp_path):
    with atomic.atomic_open(tmp_path / "x.txt", "w") as f:
        f.write("a\nb\n")
    assert (tmp_path / "x.txt").read_bytes() == b"a\nb\n"
    with pytest.raises(ValueError, match="mode must be"):
        with atomic.atomic_open(tmp_path / "y.txt", "a"):
            pass


def test_replace_dir_swaps_whole_directories(tmp_path, monkeypatch):
    final, tmp = tmp_path / "checkpoint-4", tmp_path / ".checkpoint-4.tmp"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    events = _spy(monkeypatch)
    atomic.replace_dir(tmp, final)
    assert (final / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]     # the .old copy is gone
    assert events[-1] == ("fsync-dir",)


def test_replace_file_and_move_aside(tmp_path):
    (tmp_path / ".p.tmp").write_text("complete")
    atomic.replace_file(tmp_path / ".p.tmp", tmp_path / "p.jsonl")
    assert (tmp_path / "p.jsonl").read_text() == "complete" and not (tmp_path / ".p.tmp").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken exists"):
        atomic.move_aside(tmp_path / "run", tmp_path / "taken")
    atomic.move_aside(tmp_path / "run", tmp_path / "run.replaced")
    assert (tmp_path / "run.replaced").is_dir() and not (tmp_path / "run").exists()
