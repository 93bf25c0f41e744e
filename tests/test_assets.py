"""Asset lookup order (explicit path > $JT_LORA_DATA > project data/ > ../shared/data) and the download scripts."""

import os
import subprocess
from pathlib import Path

import pytest

from jt_lora import assets


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """A fake project root with data/, a ../shared/data beside it and an env-var directory."""
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.setattr(assets, "PROJECT_ROOT", project)
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    dirs = {"env": tmp_path / "envdata", "project": project / "data", "shared": tmp_path / "shared" / "data"}
    for d in dirs.values():
        d.mkdir(parents=True)
    return dirs


def _put(root, rel="e2e/valid.txt"):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path.resolve()


def test_precedence(roots, monkeypatch):
    shared = _put(roots["shared"])
    assert assets.find_asset("e2e/valid.txt") == shared
    project = _put(roots["project"])
    assert assets.find_asset("e2e/valid.txt") == project
    env = _put(roots["env"])
    monkeypatch.setenv(assets.ENV_VAR, str(roots["env"]))
    assert assets.find_asset("e2e/valid.txt") == env
    explicit = _put(roots["env"].parent / "elsewhere", "my_valid.txt")
    assert assets.find_asset("e2e/valid.txt", explicit=explicit) == explicit


def test_env_dir_without_the_file_falls_through(roots, monkeypatch):
    shared = _put(roots["shared"])
    monkeypatch.setenv(assets.ENV_VAR, str(roots["env"]))
    assert assets.find_asset("e2e/valid.txt") == shared


def test_directory_assets(roots):
    (roots["project"] / "gpt2-vocab").mkdir()
    assert assets.find_asset("gpt2-vocab") == (roots["project"] / "gpt2-vocab").resolve()


def test_explicit_path_must_exist(roots):
    _put(roots["project"])  # present elsewhere, but an explicit flag is never silently ignored
    with pytest.raises(FileNotFoundError, match="explicitly"):
        assets.find_asset("e2e/valid.txt", explicit=roots["env"] / "missing.txt")


def test_missing_asset_lists_every_place(roots, monkeypatch):
    monkeypatch.setenv(assets.ENV_VAR, str(roots["env"]))
    with pytest.raises(FileNotFoundError) as err:
        assets.find_asset("e2e/train.txt")
    message = str(err.value)
    for d in roots.values():
        assert str(d / "e2e" / "train.txt") in message
    assert "$JT_LORA_DATA" in message and "scripts/download_data.sh" in message
    assert assets.try_find_asset("e2e/train.txt") is None


def test_env_var_unset_is_not_searched(roots):
    assert [label for label, _ in assets.data_roots()] == ["project data/", "../shared/data"]


# --------------------------------------------------------------------------- download scripts
# Run with a fake `curl` first on PATH, so these tests never touch the network.

ROOT = Path(__file__).resolve().parents[1]
FAKE_CURL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_LOG"
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
[ "$FAKE_MODE" = offline ] && { echo "curl: (6) Could not resolve host" >&2; exit 6; }
echo fake > "$out"
"""


def _run_script(tmp_path, script, *args, mode="offline", **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "curl").write_text(FAKE_CURL)
    (bin_dir / "curl").chmod(0o755)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
                "FAKE_MODE": mode, **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


def test_download_data_offline_fails_clearly_and_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    run = _run_script(tmp_path, "download_data.sh", DATA_DIR=str(data))
    assert run.returncode == 1
    assert "could not download https://" in run.stderr and "No network?" in run.stderr
    assert len((tmp_path / "log").read_text().splitlines()) == 1  # stops at the first failure
    assert not data.exists() or not any(data.rglob("*"))  # no partial file, no empty folder


def test_download_data_skips_present_files(tmp_path):
    data = tmp_path / "data"
    _put(data, "boolq/train.jsonl")
    run = _run_script(tmp_path, "download_data.sh", "boolq", mode="online", DATA_DIR=str(data))
    assert run.returncode == 0, run.stderr
    assert "present: " in run.stdout and (data / "boolq" / "dev.jsonl").read_text() == "fake\n"
    assert (tmp_path / "log").read_text().count("storage.googleapis.com/boolq/dev.jsonl") == 1
    assert (data / "boolq" / "train.jsonl").read_text() == "x"  # untouched
    assert not list(data.rglob("*.tmp"))


def test_download_data_rejects_wrong_vocab_hash(tmp_path):
    data = tmp_path / "data"
    run = _run_script(tmp_path, "download_data.sh", "vocab", mode="online", DATA_DIR=str(data))
    assert run.returncode == 1 and "SHA-256" in run.stderr
    assert not (data / "gpt2-vocab" / "encoder.json").exists()


def test_download_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    run = _run_script(tmp_path, "download_checkpoints.sh", "medium", mode="online", CKPT_DIR=str(ckpt))
    assert run.returncode == 0, run.stderr
    assert (ckpt / "gpt2-medium-pytorch_model.bin").exists()
    assert "huggingface.co/openai-community/gpt2-medium/resolve/main/pytorch_model.bin" in (tmp_path / "log").read_text()
    run = _run_script(tmp_path, "download_checkpoints.sh", "small", CKPT_DIR=str(tmp_path / "other"))
    assert run.returncode == 1 and "No network?" in run.stderr and not (tmp_path / "other").exists()
