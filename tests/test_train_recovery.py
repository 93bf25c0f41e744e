"""Training's failure and recovery: a work_dir owned by one run, flags checked before any write,
resume that checks settings and survives a broken checkpoint, one-line errors on I/O faults, and
one model shape from the checkpoint. Runs ``jt_lora.train.main`` in-process on a tiny model."""
import errno
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_train import _synthetic

train_mod = pytest.importorskip("jt_lora.train")
from jt_lora.io import atomic  # noqa: E402
from jt_lora.models import saving  # noqa: E402
from jt_lora.training import workdir  # noqa: E402

TINY = ["--model_card", "gpt2.sm", "--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--vocab_size", "64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return _synthetic(d / "train.jsonl")


def argv(data, work_dir, *extra, model=TINY):
    return ["--train_data", str(data), *model, "--seq_len", "32", "--train_batch_size", "4", "--lr", "0.01",
            "--log_interval", "1", "--no_plot", "--lora_dropout", "0.1", "--warmup_step", "2",
            "--work_dir", str(work_dir), *extra]


def run(capsys, *args):
    code = train_mod.main(list(args))
    return code, capsys.readouterr().err


def snapshot(root):
    """Every file under root with a hash of its bytes: equal snapshots mean nothing was touched."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def steps_logged(work_dir):
    return [json.loads(line)["step"] for line in open(work_dir / "log.jsonl") if json.loads(line)["kind"] == "train"]


def run_id_of(ckpt):
    return json.load(open(ckpt / workdir.STATE_FILE))["run_id"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished run (12 steps, checkpoints every 4) to compare resumed runs against."""
    wd = tmp_path_factory.mktemp("finished") / "run"
    assert train_mod.main(argv(data, wd, "--max_step", "12", "--save_interval", "4", "--keep_checkpoints", "0")) == 0
    return wd


# -- flags --------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr=-1e-3"], "--lr must be > 0"),
    (["--grad_acc", "0"], "--grad_acc must be >= 1"),
    (["--save_interval", "-1"], "--save_interval must be >= 0 (0 = only at the end)"),
    (["--eval_interval", "-5"], "--eval_interval must be >= 0"),
    (["--log_interval", "-1"], "--log_interval must be >= 0"),
    (["--lora_dropout", "1.0"], "--lora_dropout must be in [0, 1)"),
    (["--lora_dropout", "-0.1"], "--lora_dropout must be in [0, 1)"),
    (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
    (["--valid_batch_size", "0"], "--valid_batch_size must be >= 1"),
    (["--max_step", "0"], "--max_step must be >= 1"),
    (["--lora_inhibition", "0.3"], "--lora_inhibition only applies to --adapter ina"),
    (["--adapter", "ia3", "--lora_inhibition", "0.3"], "--lora_inhibition only applies to --adapter ina"),
    (["--adapter", "ina", "--lora_inhibition", "1.0"], "needs --lora_inhibition > 0 (0 is plain LoRA) and < 1"),
    (["--force"], "--force only applies with --resume"),
    (["--resume", "--overwrite"], "give one of them"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_named_and_nothing_is_written(data, tmp_path, capsys, extra, message):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "log.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')  # another run's log
    before = snapshot(tmp_path)
    code, err = run(capsys, *argv(data, wd, *extra))
    assert code == 2 and message in err, err
    assert len(error_lines(err)) == 1 and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_help_shows_each_default_once(capsys):
    parser = train_mod.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help and action.help != "==SUPPRESS==":
            assert formatter._expand_help(action).count("default") <= 1, action.option_strings
    flat = " ".join(text.split())
    assert "peak learning rate (default: 0.0002)" in flat
    assert "(default: no step limit, --max_epoch epochs)" in flat
    assert "(0 = only at the end) (default: 1000)" in flat  # --save_interval
    assert "(default: 0.3 with --adapter ina)" in flat
    assert "gradient-norm clip (0 = off) (default: 0.0)" in flat and "warm-up (default: 0)" in flat


# -- work_dir ownership -------------------------------------------------------------------------

def test_new_run_refuses_a_dir_holding_another_run_until_overwrite(data, tmp_path, capsys):
    wd = tmp_path / "run"
    code, _ = run(capsys, *argv(data, wd, "--max_step", "8", "--save_interval", "4", "--random_seed", "1"))
    assert code == 0
    old_id = run_id_of(wd / "checkpoint-8")
    before = snapshot(tmp_path)
    # Before the fix: the new run's checkpoint-2 was pruned at once (the old run's 4 and 8 were newer),
    # the old log was deleted, and a later --resume continued the old run.
    code, err = run(capsys, *argv(data, wd, "--max_step", "2", "--save_interval", "2"))
    assert code == 2 and f"--work_dir {wd} holds another run ({old_id}" in err and "--overwrite" in err, err
    assert snapshot(tmp_path) == before
    code, err = run(capsys, *argv(data, wd, "--max_step", "2", "--save_interval", "2", "--overwrite"))
    assert code == 0, err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and f"moved the previous run in {wd} to {moved[0]}" in err
    assert snapshot(moved[0]) == {k[len("run/"):]: v for k, v in before.items()}  # the old run, intact
    assert sorted(p.name for p in wd.glob("checkpoint-*")) == ["checkpoint-2"]
    assert run_id_of(wd / "checkpoint-2") != old_id and steps_logged(wd) == [1, 2]
    code, err = run(capsys, *argv(data, wd, "--max_step", "2", "--overwrite", "delete"))
    assert code == 0 and "removed the previous run" in err
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]) == 1


def test_pruning_removes_only_this_runs_checkpoints(tmp_path):
    def fake(step, run_id):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / workdir.STATE_FILE).write_text(json.dumps({"step": step, "run_id": run_id, "loader": {}}))
    for step in (10, 20, 30):
        fake(step, "old")
    for step in (2, 4, 6):
        fake(step, "new")
    (tmp_path / "checkpoint-40").mkdir()  # no state: belongs to no known run
    removed = workdir.prune_checkpoints(tmp_path, "new", keep=2, current_step=6)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == sorted(
        f"checkpoint-{s}" for s in (4, 6, 10, 20, 30, 40))
    assert workdir.prune_checkpoints(tmp_path, "new", keep=0, current_step=6) == []


# -- resume -------------------------------------------------------------------------------------

def test_resume_refuses_changed_settings_naming_each_unless_forced(data, finished, tmp_path, capsys):
    wd = tmp_path / "run"
    shutil.copytree(finished, wd)
    before = snapshot(wd)
    code, err = run(capsys, *argv(data, wd, "--max_step", "12", "--save_interval", "4", "--resume",
                                   "--lr", "0.02", "--random_seed", "7", "--lora_dim", "8"))
    assert code == 2, err
    for diff in ("--lr: checkpoint 0.01, now 0.02", "--random_seed: checkpoint 110, now 7",
                 "--lora_dim: checkpoint 4, now 8"):
        assert diff in err
    assert "--force" in err and "--save_interval" not in error_lines(err)[0]
    assert snapshot(wd) == before
    code, err = run(capsys, *argv(data, wd, "--max_step", "16", "--save_interval", "4", "--resume", "--force"))
    assert code == 0 and "--max_step: checkpoint 12, now 16" in err, err
    assert max(steps_logged(wd)) == 16


def test_resume_drops_log_entries_past_the_checkpoint(data, finished, tmp_path, capsys):
    wd = tmp_path / "run"
    code, _ = run(capsys, *argv(data, wd, "--max_step", "12", "--save_interval", "4", "--keep_checkpoints", "0",
                                 "--stop_after", "6"))
    assert code == 0 and steps_logged(wd) == [1, 2, 3, 4, 5, 6]
    code, err = run(capsys, *argv(data, wd, "--max_step", "12", "--save_interval", "4", "--keep_checkpoints", "0",
                                   "--resume"))
    assert code == 0, err
    assert "dropped 2 entries past step 4" in err
    assert steps_logged(wd) == list(range(1, 13))  # before: 1..6, 5, 6, 7, ...
    np.testing.assert_allclose([json.loads(line)["loss"] for line in open(wd / "log.jsonl")],
                               [json.loads(line)["loss"] for line in open(finished / "log.jsonl")], atol=1e-6)


@pytest.mark.parametrize("broken", ["optimizer.safetensors", "trainer_state.json", "adapter_model.safetensors"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(data, finished, tmp_path, capsys, broken):
    wd = tmp_path / "run"
    code, _ = run(capsys, *argv(data, wd, "--max_step", "12", "--save_interval", "4", "--keep_checkpoints", "0",
                                 "--stop_after", "8"))
    assert code == 0
    path = wd / "checkpoint-8" / broken
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated, as a crash or full disk leaves it
    code, err = run(capsys, *argv(data, wd, "--max_step", "12", "--save_interval", "4", "--keep_checkpoints", "0",
                                   "--resume"))
    assert code == 0, err
    assert f"skipping broken checkpoint: {path}" in err and f"resumed from {wd / 'checkpoint-4'} at step 4" in err
    assert "Traceback" not in err
    a = load_file(str(finished / "adapter" / saving.ADAPTER_WEIGHTS))
    b = load_file(str(wd / "adapter" / saving.ADAPTER_WEIGHTS))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)  # equal to the uninterrupted run


def test_resume_with_every_checkpoint_broken_is_one_error(data, tmp_path, capsys):
    wd = tmp_path / "run"
    assert run(capsys, *argv(data, wd, "--max_step", "4", "--save_interval", "4"))[0] == 0
    (wd / "checkpoint-4" / workdir.STATE_FILE).write_text("{broken")
    code, err = run(capsys, *argv(data, wd, "--max_step", "4", "--save_interval", "4", "--resume"))
    assert code == 2 and "no complete checkpoint in" in err and "Traceback" not in err


# -- I/O faults ---------------------------------------------------------------------------------

def failing_writer(monkeypatch, err_no, when):
    """Make the atomic writer fail with ``err_no`` for paths matching ``when``."""
    real = atomic.atomic_open

    def fake(path, mode="wb", **kw):
        if when(str(path)):
            raise OSError(err_no, os.strerror(err_no))
        return real(path, mode, **kw)
    monkeypatch.setattr(atomic, "atomic_open", fake)


def test_disk_full_at_a_checkpoint_keeps_what_was_finished(data, tmp_path, capsys, monkeypatch):
    wd = tmp_path / "run"
    failing_writer(monkeypatch, errno.ENOSPC, lambda p: "checkpoint-8" in p and p.endswith("optimizer.safetensors"))
    code, err = run(capsys, *argv(data, wd, "--max_step", "12", "--save_interval", "4", "--keep_checkpoints", "0"))
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [f"error: cannot write {wd / 'checkpoint-8'}: no space left on the device: free "
                                f"space or choose another --work_dir; checkpoints already written in {wd} are intact"]
    assert sorted(p.name for p in wd.iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]  # no temp dir left
    workdir.validate_checkpoint(wd / "checkpoint-4")
    monkeypatch.undo()
    code, err = run(capsys, *argv(data, wd, "--max_step", "12", "--save_interval", "4", "--keep_checkpoints", "0",
                                   "--resume"))
    assert code == 0 and "resumed from" in err and steps_logged(wd) == list(range(1, 13))


def test_read_only_file_system_is_one_line(data, tmp_path, capsys, monkeypatch):
    wd = tmp_path / "run"
    failing_writer(monkeypatch, errno.EROFS, lambda p: True)
    code, err = run(capsys, *argv(data, wd, "--max_step", "2"))
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [f"error: cannot write {wd}: read-only file system: choose another --work_dir; "
                                f"checkpoints already written in {wd} are intact"]


def test_output_under_a_regular_file_and_missing_inputs_are_named(data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run(capsys, *argv(data, blocker / "run"))
    assert code == 2 and f"--work_dir {blocker / 'run'} is under {blocker}, which is a regular file" in err
    code, err = run(capsys, *argv(data, blocker))
    assert code == 2 and f"--work_dir {blocker} is a regular file" in err
    code, err = run(capsys, *argv(tmp_path / "missing.jsonl", tmp_path / "run"))
    assert code == 2 and f"--train_data {tmp_path / 'missing.jsonl'}: no such file" in err
    code, err = run(capsys, *argv(data, tmp_path / "run", "--valid_data", str(tmp_path)))
    assert code == 2 and "--valid_data" in err and "not a regular file" in err
    assert len(error_lines(err)) == 1 and not (tmp_path / "run").exists()


# -- one model shape ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_base(tmp_path_factory):
    """A 2-layer, width-32 base as a lone .safetensors file: nothing tells its head count."""
    from jt_lora import GPT2Config, GPT2LMModel
    np.random.seed(0)
    model = GPT2LMModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, adapter="none"))
    out = tmp_path_factory.mktemp("bare")
    model.save_pretrained(out)
    return out / "model.safetensors"


def test_shape_comes_from_the_checkpoint_and_is_recorded(data, bare_base, tmp_path, capsys):
    model = ["--init_checkpoint", str(bare_base), "--model_card", "gpt2.md"]
    code, err = run(capsys, *argv(data, tmp_path / "a", "--max_step", "2", model=model))
    assert code == 2 and "n_embd=32 has no standard head count; pass --n_head" in err
    code, err = run(capsys, *argv(data, tmp_path / "b", "--max_step", "2", model=model + ["--n_layer", "2"]))
    assert code == 2 and "--n_layer only applies to a random init" in err
    code, err = run(capsys, *argv(data, tmp_path / "c", "--max_step", "2", model=model + ["--n_head", "4"]))
    assert code == 0, err
    assert err.count("--model_card gpt2.md does not match") == 1
    config = json.load(open(tmp_path / "c" / "train_config.json"))
    assert config["model_shape"] == dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    assert config["args"]["model_card"] is None and config["args"]["model_card_given"] == "gpt2.md"
    meta = saving.read_adapter_config(tmp_path / "c" / "adapter")   # what every reader of the adapter sees
    assert meta["base"] == dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    code, err = run(capsys, *argv(data, tmp_path / "d", "--max_step", "2", model=model + ["--n_head", "8"]))
    assert code == 0 and json.load(open(tmp_path / "d" / "train_config.json"))["model_shape"]["n_head"] == 8


def test_ia3_parts_choose_what_c_attn_rescales(data, tmp_path, capsys):
    """(IA)³'s default rescales q, k and v (PEFT's GPT-2 targets); --ia3_parts kv keeps q untouched
    (the paper's); the flag with another adapter is refused before anything is written."""
    trained = {}
    for parts in ("qkv", "kv"):
        wd = tmp_path / parts
        extra = ["--adapter", "ia3", "--max_step", "3", "--lr", "0.05"] + ([] if parts == "qkv" else ["--ia3_parts", "kv"])
        code, err = run(capsys, *argv(data, wd, *extra))
        assert code == 0, err
        tensors = load_file(str(wd / "adapter" / "adapter_model.safetensors"))
        vec = next(v for k, v in tensors.items() if k.endswith("h.0.attn.c_attn.ia3_l")).reshape(-1)
        trained[parts] = vec
        assert saving.read_adapter_config(wd / "adapter")["ia3_enable"] == [parts == "qkv", True, True]
    width = trained["qkv"].size // 3
    assert np.abs(trained["qkv"][:width] - 1).max() > 1e-4          # q's scales trained
    assert np.array_equal(trained["kv"][:width], np.ones(width, np.float32))   # q untouched: ones in the file
    assert np.abs(trained["kv"][width:] - 1).max() > 1e-4
    code, err = run(capsys, *argv(data, tmp_path / "bad", "--adapter", "lora", "--ia3_parts", "kv"))
    assert code == 2 and "--ia3_parts only applies to --adapter ia3" in err and not (tmp_path / "bad").exists()
