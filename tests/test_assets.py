"""Asset lookup order (explicit path > $JT_LORA_DATA > project data/ > ../shared/data) and the download scripts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jt_lora.io import assets


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


# --------------------------------------------------------------------------- the quickstart check
def test_missing_assets_per_file_across_roots(roots, monkeypatch):
    monkeypatch.setenv(assets.ENV_VAR, str(roots["env"]))
    wanted = ("gpt2-vocab/encoder.json", "gpt2-vocab/vocab.bpe", "e2e/valid.txt")
    assert assets.missing_assets(wanted) == list(wanted)
    _put(roots["env"], "gpt2-vocab/encoder.json")
    _put(roots["shared"], "e2e/valid.txt")
    assert assets.missing_assets(wanted) == ["gpt2-vocab/vocab.bpe"]


def test_missing_data_message_is_one_line_with_places_and_fixes(roots, monkeypatch):
    missing = list(assets.QUICKSTART_ASSETS)
    plain = assets.missing_data_message(missing)
    assert "\n" not in plain and plain.startswith("error: ")
    assert "$JT_LORA_DATA (not set)" in plain
    assert str(roots["project"]) in plain and str(roots["shared"]) in plain
    assert "JT_LORA_DATA=/path/to/data bash scripts/demo.sh" in plain
    assert "bash scripts/download_data.sh" in plain and "could not download" not in plain
    assert "and 3 more" in plain  # six names: three shown
    monkeypatch.setenv(assets.ENV_VAR, str(roots["env"]))
    failed = assets.missing_data_message(["e2e/test.txt"], download_failed=True, command="bash scripts/test.sh")
    assert f"$JT_LORA_DATA={roots['env']}" in failed and "could not download it (offline?)" in failed
    assert "JT_LORA_DATA=/path/to/data bash scripts/test.sh" in failed and "(e2e/test.txt)" in failed


def test_check_cli_exit_codes(roots, capsys):
    assert assets.main(["check", "e2e/valid.txt"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "e2e/valid.txt" in err and "JT_LORA_DATA" in err
    _put(roots["project"])
    assert assets.main(["check", "e2e/valid.txt"]) == 0
    assert capsys.readouterr() == ("", "")
    assert assets.main(["where", "e2e/valid.txt", "e2e/test.txt"]) == 1
    assert capsys.readouterr().out.splitlines() == [f"e2e/valid.txt: {(roots['project'] / 'e2e' / 'valid.txt').resolve()}",
                                                    "e2e/test.txt: MISSING"]


# A copy of the scripts and jt_lora.io.assets in a fresh folder with no ../shared beside it: the
# fresh clone a new user has. The fake curl serves real vocab files (their SHA-256 is checked).
SERVE_CURL = FAKE_CURL.replace('echo fake > "$out"', 'src="$FAKE_SRC/$(basename "$url")"\n'
                               '[ -f "$src" ] && cp "$src" "$out" || echo fake > "$out"').replace(
    'echo "$@" >> "$FAKE_LOG"', 'echo "$@" >> "$FAKE_LOG"\nurl="${@: -1}"')


@pytest.fixture
def fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    (clone / "jt_lora" / "io").mkdir(parents=True)
    for script in (ROOT / "scripts").glob("*.sh"):
        (clone / "scripts" / script.name).write_text(script.read_text())
    for name in ("__init__.py", "io/__init__.py", "io/assets.py"):
        (clone / "jt_lora" / name).write_text((ROOT / "jt_lora" / name).read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(SERVE_CURL)
    (bin_dir / "curl").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (assets.ENV_VAR, "DATA_DIR")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"), FAKE_MODE="offline",
               FAKE_SRC=str(tmp_path / "served"), PYTHON=sys.executable)
    return clone, env


def _run(clone, env, script, *args):
    return subprocess.run(["bash", str(clone / "scripts" / script), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_ensure_data_uses_jt_lora_data_without_downloading(fresh_clone, tmp_path):
    clone, env = fresh_clone
    for rel in assets.QUICKSTART_ASSETS:
        _put(tmp_path / "mydata", rel)
    run = _run(clone, {**env, assets.ENV_VAR: str(tmp_path / "mydata")}, "ensure_data.sh")
    assert run.returncode == 0, run.stderr
    assert run.stdout == run.stderr == "" and not (tmp_path / "log").exists()


def test_ensure_data_offline_stops_with_one_message(fresh_clone, tmp_path):
    clone, env = fresh_clone
    run = _run(clone, env, "ensure_data.sh", "bash scripts/test.sh")
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: GPT-2 vocab / E2E data not found"), run.stderr
    for needle in ("$JT_LORA_DATA (not set)", str(clone / "data"), str(tmp_path / "shared" / "data"),
                   "could not download it (offline?)", "JT_LORA_DATA=/path/to/data bash scripts/test.sh",
                   "`bash scripts/download_data.sh`"):
        assert needle in lines[0]
    assert "could not download https://" in (clone / "data" / "download.log").read_text()


@pytest.mark.parametrize("script", ["demo.sh", "test.sh"])
def test_quickstart_commands_offline_stop_before_setup(fresh_clone, script):
    clone, env = fresh_clone
    run = _run(clone, env, script)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "JT_LORA_DATA" in run.stderr and "scripts/download_data.sh" in run.stderr
    assert f"bash scripts/{script}" in run.stderr
    assert not (clone / ".venv").exists()  # stopped in seconds, before installing anything


def test_ensure_data_downloads_what_is_missing_once(fresh_clone, tmp_path):
    clone, env = fresh_clone
    vocab = assets.try_find_asset("gpt2-vocab/encoder.json")
    if vocab is None:
        pytest.skip("needs the real GPT-2 vocab to serve (its SHA-256 is checked): scripts/download_data.sh")
    served = tmp_path / "served"
    served.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        (served / name).write_bytes((vocab.parent / name).read_bytes())
    env = {**env, "FAKE_MODE": "online"}
    run = _run(clone, env, "ensure_data.sh")
    assert run.returncode == 0, run.stderr
    assert "downloaded into data/" in run.stdout
    for rel in assets.QUICKSTART_ASSETS:
        assert (clone / "data" / rel).is_file(), rel
    assert (clone / "data" / "gpt2-vocab" / "vocab.bpe").read_bytes() == (vocab.parent / "vocab.bpe").read_bytes()
    calls = (tmp_path / "log").read_text()
    run = _run(clone, env, "ensure_data.sh")  # second run: found in data/, nothing fetched
    assert run.returncode == 0 and run.stdout == "" and (tmp_path / "log").read_text() == calls
