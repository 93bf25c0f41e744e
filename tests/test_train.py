"""Training: schedules, the reference AdamW, loss going down, exact resume, NaN guard, MPI parity."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from jt_lora.training.optim import AdamW, lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sched,step,expected", [
    ("linear", 0, 0.0), ("linear", 5, 0.5), ("linear", 10, 1.0), ("linear", 55, 0.5), ("linear", 100, 0.0),
    ("linear", 120, 0.0), ("constant", 3, 0.3), ("constant", 80, 1.0),
    ("cosine", 0, 0.0), ("cosine", 5, 0.5), ("cosine", 50, 0.5), ("cosine", 100, 0.0), ("cosine", 25, 0.5 * (1 + math.cos(math.pi / 4))),
    ("none", 0, 1.0),
])
def test_schedule_values_at_known_steps(sched, step, expected):
    assert lr_lambda(sched, step, warmup=10, max_step=100) == pytest.approx(expected)


def _reference_adamw(p, grads, lr, b1, b2, eps, wd, correct_bias):
    """microsoft/LoRA's AdamW written out in numpy."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if correct_bias else lr
        p = p - step * m / (np.sqrt(v) + eps)
        p = p - lr * wd * p
    return p


@pytest.mark.parametrize("correct_bias", [True, False])
def test_adamw_matches_reference(correct_bias):
    from jt_lora.backend import jt
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 4)).astype("float32")
    grads = [rng.normal(size=(3, 4)).astype("float32") for _ in range(5)]
    p = jt.array(p0)
    opt = AdamW([("w", p)], lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, correct_bias=correct_bias)
    for g in grads:
        opt.step([jt.array(g)])
    expected = _reference_adamw(p0.astype(np.float64), grads, 0.01, 0.9, 0.999, 1e-6, 0.01, correct_bias)
    np.testing.assert_allclose(p.numpy(), expected, rtol=1e-5, atol=1e-6)
    state = opt.state_dict()
    assert int(state["step_count"]) == 5 and set(state) == {"step_count", "exp_avg.w", "exp_avg_sq.w"}


def _synthetic(path, n=48, seed=0):
    """A learnable toy task: completion = context shifted by a per-example offset."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            ctx = [int(x) for x in rng.integers(0, 30, rng.integers(3, 9))] + [63]
            f.write(json.dumps({"context": ctx, "completion": [(c + 7) % 30 for c in ctx[:-1]] + [62]}) + "\n")
    return path


RANDOM_TINY = ["--model_card", "gpt2.sm", "--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--vocab_size", "64"]


def _args(data, work_dir, *extra, base=None):
    model = ["--init_checkpoint", str(base)] if base else RANDOM_TINY
    return [sys.executable, "-m", "jt_lora.train", "--train_data", str(data), *model, "--seq_len", "32",
            "--train_batch_size", "4", "--lr", "0.01", "--log_interval", "1", "--no_plot",
            "--work_dir", str(work_dir), *extra]


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)
    return proc


def _losses(work_dir, kind="train", key="loss"):
    return [json.loads(line)[key] for line in open(os.path.join(work_dir, "log.jsonl")) if json.loads(line)["kind"] == kind]


def _adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return _synthetic(d / "train.jsonl"), _synthetic(d / "valid.jsonl", n=12, seed=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved tiny base whose weights are large enough for adapters to move its outputs."""
    from jt_lora import GPT2Config, GPT2LMModel
    np.random.seed(0)
    model = GPT2LMModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                   initializer_range=0.3, adapter="none"))
    out = tmp_path_factory.mktemp("base")
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("adapter", ["lora", "ina", "ia3"])
def test_loss_decreases_and_outputs_written(data, base, tmp_path, adapter):
    train, valid = data
    proc = _run(_args(train, tmp_path, "--valid_data", str(valid), "--adapter", adapter, "--max_epoch", "4",
                      "--lr", "0.01", "--lora_dim", "8", "--eval_interval", "12", "--save_interval", "12",
                      "--label_smooth", "0.1", base=base))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(tmp_path)
    valid_losses = _losses(tmp_path, "valid", "valid_loss")
    assert len(losses) == 48 and len(valid_losses) == 4
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.4, losses
    assert valid_losses[-1] < valid_losses[0] - 0.2
    config = json.load(open(tmp_path / "train_config.json"))
    assert config["model_config"]["adapter"] == adapter and str(base) in config["base"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-36", "checkpoint-48"]


def test_random_init_is_stated_and_its_base_saved(data, tmp_path):
    train, _ = data
    proc = _run(_args(train, tmp_path, "--max_step", "2", "--save_interval", "100"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RANDOM INIT" in proc.stderr
    assert "RANDOM INIT" in json.load(open(tmp_path / "train_config.json"))["base"]
    from jt_lora import GPT2LMModel
    GPT2LMModel.from_pretrained(tmp_path / "base")  # the random base is loadable for inference


def test_resume_after_kill_equals_uninterrupted(data, base, tmp_path):
    train, _ = data
    common = ["--max_step", "24", "--save_interval", "4", "--lora_dropout", "0.1", "--warmup_step", "3",
              "--correct_bias", "--clip", "1.0", "--grad_acc", "2"]
    full = tmp_path / "full"
    assert _run(_args(train, full, *common, base=base)).returncode == 0
    # Kill a second run hard once it has written a mid-run checkpoint, then resume it.
    part = tmp_path / "part"
    proc = subprocess.Popen(_args(train, part, *common, "--keep_checkpoints", "10", base=base), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (part / "checkpoint-8" / "trainer_state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (part / "adapter").exists(), "the run finished before it could be killed"
    resumed = _run(_args(train, part, *common, "--resume", base=base))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _adapter(full / "adapter"), _adapter(part / "adapter")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    assert max(np.abs(a[k]).max() for k in a if k.endswith("lora_B.weight")) > 0  # it trained


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    train, _ = data
    proc = _run(_args(train, tmp_path, "--max_step", "12", "--save_interval", "1", "--lr", "1e30",
                      "--warmup_step", "4", "--keep_checkpoints", "0"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    import re
    found = re.search(r"loss is (?:nan|inf|-inf) at step (\d+)|non-finite adapter weights after step (\d+)", proc.stderr)
    bad_step = int(found.group(1) or found.group(2))
    assert "last good checkpoint" in proc.stderr
    steps = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert steps == list(range(1, bad_step)), (steps, bad_step)  # nothing written at or after the bad step
    assert not (tmp_path / "adapter").exists()
    for arr in _adapter(tmp_path / f"checkpoint-{steps[-1]}").values():
        assert np.isfinite(arr).all()


def test_bad_arguments_give_clear_errors(data, tmp_path):
    train, _ = data
    proc = _run(_args(train, tmp_path, "--adapter", "ina", "--lora_inhibition", "0"))
    assert proc.returncode == 2 and "needs --lora_inhibition > 0" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": [1, 2]}\n')
    proc = _run(_args(bad, tmp_path))
    assert proc.returncode == 2 and "bad.jsonl:1: missing key 'completion'" in proc.stderr
    proc = _run(_args(train, tmp_path / "nothing", "--resume"))
    assert proc.returncode == 2 and "no checkpoint in" in proc.stderr


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed (scripts/setup.sh installs it)")
def test_two_mpi_processes_equal_one_process_with_the_same_global_batch(data, base, tmp_path):
    train, _ = data
    common = ["--max_step", "6", "--lora_dropout", "0", "--save_interval", "100"]
    one = _run(_args(train, tmp_path / "one", *common, "--train_batch_size", "4", base=base))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                *_args(train, tmp_path / "two", *common, "--train_batch_size", "2", base=base)])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size 2" in two.stderr
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), atol=1e-5)
    a, b = _adapter(tmp_path / "one" / "adapter"), _adapter(tmp_path / "two" / "adapter")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)


def _finetune_sh(*args, **env):
    """finetune.sh with this interpreter (not whatever python3 is on PATH when .venv is missing)."""
    return _run(["bash", "finetune.sh", *args], env={**os.environ, "PYTHON": sys.executable, **env})


def test_finetune_sh_help_prints_its_usage_then_the_trainers(tmp_path):
    proc = _finetune_sh("--help", DATA_DIR=str(tmp_path / "data"), CKPT=str(tmp_path / "base.bin"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: finetune.sh")
    for name in ("DATA_DIR", "CKPT", "NPROC", "PYTHON"):
        assert f"  {name} " in out
    assert f"(now: {sys.executable})" in out and f"--train_data {tmp_path}/data/train.jsonl" in out
    assert "  --lr 0.0002\n" in out and "  --correct_bias\n" in out
    assert out.index("usage: python -m jt_lora.train") > out.index("Flags passed by default")
    assert "(default: None)" not in out
    assert os.listdir(tmp_path) == []  # nothing created


def test_finetune_sh_defaults_are_the_paper_recipe_and_overridable():
    proc = _finetune_sh("--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = json.loads(proc.stdout.strip().splitlines()[-1])["args"]
    expected = dict(lr=2e-4, weight_decay=0.01, correct_bias=True, adam_beta1=0.9, adam_beta2=0.999,
                    scheduler="linear", warmup_step=500, max_epoch=5, train_batch_size=8, label_smooth=0.1,
                    lora_dim=4, lora_alpha=32, lora_dropout=0.1, random_seed=110, model_card="gpt2.md",
                    seq_len=512, adapter="lora", clip=0.0, grad_acc=1)
    assert {k: args[k] for k in expected} == expected
    assert args["init_checkpoint"].endswith("pretrained_checkpoints/gpt2-medium-pytorch_model.bin")
    proc = _finetune_sh("--dry_run", "--adapter", "ina", "--lora_inhibition", "0.1", "--no-correct_bias", "--lr", "1e-3")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["args"]["adapter"], out["args"]["correct_bias"], out["args"]["lr"]) == ("ina", False, 1e-3)
    assert out["model_config"]["lora_inhibition"] == 0.1
