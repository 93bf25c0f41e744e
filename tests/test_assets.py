"""Asset lookup order: explicit path > $JT_LORA_DATA > project data/ > ../shared/data."""

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
