"""Command lines under bad input and I/O faults: one line naming the path and what to do, a non-zero
exit, no traceback, finished output kept; help shows defaults; wrappers name outputs after the
settings used. Faults are injected with writers that fail on purpose (no mounts needed)."""

import errno
import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jt_lora.tasks.e2e import decode as D
from jt_lora.tasks.e2e import data as e2e_data

ROOT = Path(__file__).resolve().parents[1]


def _script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_error_line(err: str, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len([x for x in lines if "error" in x]) == 1, err
    for n in needles:
        assert n in err, err


def _fail(code):
    def writer(path, *a, **k):
        raise OSError(code, os.strerror(code), str(path))
    return writer


# ---------------------------------------------------------------------------------------------- wrappers

@pytest.fixture
def fake_python(tmp_path):
    """A PYTHON that prints the arguments it was given, one per line."""
    fake = tmp_path / "fakepy"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


def _inference_args(fake_python, tmp_path, *flags):
    env = {**os.environ, "PYTHON": str(fake_python), "ADAPTER_DIR": "none", "WORK_DIR": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "run_inference.sh"), *flags], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    return args[args.index("--output_file") + 1]


def test_run_inference_names_its_output_after_the_final_flags(fake_python, tmp_path):
    assert _inference_args(fake_python, tmp_path) == "predict.model.b10p08r4.jsonl"
    assert _inference_args(fake_python, tmp_path, "--beam", "4") == "predict.model.b4p08r4.jsonl"
    assert _inference_args(fake_python, tmp_path, "--beam", "4", "--beam=2", "--length_penalty", "1.0",
                           "--no_repeat_ngram_size", "0") == "predict.model.b2p10r0.jsonl"
    assert _inference_args(fake_python, tmp_path, "--beam", "4", "--output_file", "mine.jsonl") == "mine.jsonl"


@pytest.mark.parametrize("cmd, first, python_help", [
    (["bash", "run_inference.sh", "--help"], "usage: [ENV=...] ./run_inference.sh", "usage: python -m jt_lora.generate"),
    (["bash", "run_metric.sh", "-h"], "Decode generated E2E token ids", "usage: python -m jt_lora.metrics"),
    (["bash", "examples/BoolQ/eval_boolq.sh", "--batch_size", "2", "--help"], "usage: [ENV=...]",
     "usage: python -m jt_lora.eval_boolq"),
    (["bash", "examples/BoolQ/run_inference_boolq.sh", "--help"], "usage: [ENV=...]",
     "usage: python -m jt_lora.generate"),
    (["bash", "examples/BoolQ/finetune_boolq.sh", "--help"], "usage: [ENV=...]", "usage: finetune.sh"),
])
def test_wrapper_help_prints_its_usage_first_then_pythons(cmd, first, python_help, tmp_path):
    env = {**os.environ, "DATA_DIR": str(tmp_path / "nowhere"), "WORK_DIR": str(tmp_path / "work"),
           "PYTHON": sys.executable}   # this interpreter, whether or not the project has a .venv
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(first) and python_help in out.stdout
    assert out.stdout.index(first) < out.stdout.index(python_help)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("cmd", [["bash", "finetune.sh", "--help"], ["bash", "run_inference.sh", "--help"],
                                 ["bash", "run_metric.sh", "-h"], ["bash", "examples/BoolQ/eval_boolq.sh", "--help"],
                                 ["bash", "scripts/ensure_data.sh"]])
def test_every_driver_runs_the_interpreter_named_by_PYTHON(cmd, tmp_path):
    stub = tmp_path / "stub-python"
    stub.write_text('#!/bin/sh\necho "stub interpreter: $*"\n')
    stub.chmod(0o755)
    for python in (str(stub), stub.name):   # a path, or a command name found on PATH
        env = {**os.environ, "PYTHON": python, "PATH": f"{tmp_path}:{os.environ['PATH']}",
               "WORK_DIR": str(tmp_path / "work")}
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "stub interpreter: " in out.stdout, (python, out.stdout[-500:], out.stderr[-500:])
    # a PYTHON that is not there stops with one line, not a silent switch to another interpreter
    env = {**os.environ, "PYTHON": str(tmp_path / "no-such-python"), "WORK_DIR": str(tmp_path / "work")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", (out.stdout[-500:], out.stderr[-500:])
    _one_error_line(out.stderr, f"PYTHON={tmp_path / 'no-such-python'}")
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------------------- help

@pytest.mark.parametrize("module", ["jt_lora.generate", "jt_lora.eval_boolq", "jt_lora.bench",
                                    "jt_lora.metrics", "jt_lora.decode", "jt_lora.data"])
def test_help_shows_each_default_once_and_never_none(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "(default: None)" not in text
    for chunk in text.split(" --")[1:]:            # one flag's entry: its default at most once
        assert chunk.count("(default:") <= 1, chunk


@pytest.mark.parametrize("script", ["examples/NLG/prepare_e2e.py", "examples/BoolQ/prepare_boolq.py"])
def test_prepare_scripts_help_shows_defaults(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "(default: None)" not in out.stdout
    assert "(default: 512)" in " ".join(out.stdout.split())


# ---------------------------------------------------------------------------------------------- faults

def test_bench_rejects_zero_batch_before_any_work(capsys):
    from jt_lora import bench
    assert bench.main(["--batch", "0"]) == 1
    _one_error_line(capsys.readouterr().err, "--batch must be >= 1, got 0")


E2E_TXT = "name[A] , food[B]||A serves B .\nname[C]||C is here .\n"


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")])
def test_prepare_e2e_io_fault_is_one_line(tmp_path, monkeypatch, capsys, code, hint):
    prep = _script(ROOT / "examples/NLG/prepare_e2e.py")
    src = tmp_path / "valid.txt"
    src.write_text(E2E_TXT)
    monkeypatch.setattr(e2e_data, "atomic_write_text", _fail(code))
    assert prep.main(["--input", str(src), "--output", str(tmp_path / "out" / "valid.jsonl")]) == 1
    _one_error_line(capsys.readouterr().err, "valid", hint)


def test_prepare_e2e_output_under_a_file_and_non_utf8_input(tmp_path, capsys):
    prep = _script(ROOT / "examples/NLG/prepare_e2e.py")
    src = tmp_path / "valid.txt"
    src.write_text(E2E_TXT)
    (tmp_path / "plain").write_text("x")
    assert prep.main(["--input", str(src), "--output", str(tmp_path / "plain" / "valid.jsonl")]) == 1
    _one_error_line(capsys.readouterr().err, str(tmp_path / "plain"))
    src.write_bytes(b"name[A]||A .\nname[Caf\xe9]||C .\n")
    assert prep.main(["--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 1
    _one_error_line(capsys.readouterr().err, f"{src}:2:9: not valid UTF-8")


def test_prepare_boolq_io_fault_and_non_utf8(tmp_path, monkeypatch, capsys):
    from jt_lora.tasks.boolq import data as boolq
    prep = _script(ROOT / "examples/BoolQ/prepare_boolq.py")
    rec = {"question": "is it", "title": "T", "passage": "It is.", "answer": True}
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps({**rec, "passage": f"P{i}."}) + "\n" for i in range(6)))
    dev.write_bytes(json.dumps(rec).encode() + b"\n" + b'{"question": "caf\xe9"}\n')
    assert prep.main(["--train", str(train), "--dev", str(dev), "--out_dir", str(tmp_path / "o"),
                      "--valid_size", "2"]) == 1
    _one_error_line(capsys.readouterr().err, f"{dev}:2:18: not valid UTF-8")
    dev.write_text(json.dumps(rec) + "\n")
    monkeypatch.setattr(boolq, "atomic_write_text", _fail(errno.ENOSPC))
    monkeypatch.setattr(boolq, "write_jsonl", _fail(errno.ENOSPC))
    assert prep.main(["--train", str(train), "--dev", str(dev), "--out_dir", str(tmp_path / "o"),
                      "--valid_size", "2"]) == 1
    _one_error_line(capsys.readouterr().err, "No space left on device", "the disk is full")


def _decode_files(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"context": "name : A", "completion": "A ."}) + "\n")
    sample = tmp_path / "s.jsonl"
    sample.write_text(json.dumps({"id": 0, "predict": [65]}) + "\n")
    return inp, sample


def test_decode_enospc_keeps_previous_outputs(tmp_path, monkeypatch, capsys):
    inp, sample = _decode_files(tmp_path)
    args = ["--sample_file", str(sample), "--input_file", str(inp), "--output_ref_file", str(tmp_path / "r.txt"),
            "--output_pred_file", str(tmp_path / "p.txt")]
    monkeypatch.setattr("jt_lora.models.tokenizer.load_tokenizer", lambda vocab=None: type("T", (), {
        "decode": staticmethod(lambda ids: "".join(map(chr, ids)))})())
    assert D.main(args) == 0
    before = (tmp_path / "p.txt").read_bytes()
    monkeypatch.setattr(D, "atomic_write_text", _fail(errno.ENOSPC))
    assert D.main(args) == 2
    _one_error_line(capsys.readouterr().err, "r.txt: No space left on device")
    assert (tmp_path / "p.txt").read_bytes() == before


def test_run_metric_non_utf8_and_bad_json_name_file_line_column(tmp_path):
    inp, sample = _decode_files(tmp_path)
    inp.write_bytes(b'{"context": "name : A", "completion": "A ."}\n{"context": "caf\xe9", "completion": "x"}\n')
    run = lambda: subprocess.run(["bash", str(ROOT / "run_metric.sh"), "--sample_file", str(sample),  # noqa: E731
                                  "--input_file", str(inp), "--vocab", str(tmp_path)],
                                 capture_output=True, text=True, timeout=120)
    out = run()
    assert out.returncode != 0
    _one_error_line(out.stderr, f"{inp}:2:17: not valid UTF-8")
    inp.write_text('{"context": "name : A", "completion": "A ."}\n{"context": "B",, "completion": "x"}\n')
    out = run()
    assert out.returncode != 0
    _one_error_line(out.stderr, f"{inp}:2:17: invalid JSON")


def test_metrics_non_utf8_names_file_and_line(tmp_path, capsys):
    from jt_lora.tasks.e2e import metrics
    (tmp_path / "ref.txt").write_text("a b\n\nc d\n\n")
    (tmp_path / "pred.txt").write_bytes(b"a b\nc \xff\n")
    assert metrics.main(["--ref", str(tmp_path / "ref.txt"), "--pred", str(tmp_path / "pred.txt")]) == 2
    _one_error_line(capsys.readouterr().err, f"{tmp_path / 'pred.txt'}:2:")


def test_eval_boolq_flags_and_output_path_checked_first(tmp_path, capsys):
    from jt_lora.tasks.boolq import evaluate as eval_boolq
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"context": [1, 2], "completion": [3]}) + "\n")
    (tmp_path / "plain").write_text("x")
    assert eval_boolq.main(["--data", str(data), "--batch_size", "0"]) == 1
    _one_error_line(capsys.readouterr().err, "--batch_size must be >= 1, got 0")
    assert eval_boolq.main(["--data", str(data), "--output_file", str(tmp_path / "plain" / "o.jsonl")]) == 1
    _one_error_line(capsys.readouterr().err, "--output_file", "is a regular file")
    assert eval_boolq.main(["--data", str(data), "--adapter", "lora", "--lora_inhibition", "0.3"]) == 1
    _one_error_line(capsys.readouterr().err, "--lora_inhibition applies only to --adapter ina")
