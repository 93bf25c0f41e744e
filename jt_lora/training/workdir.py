"""A training run's ownership of its ``work_dir``, and recovery from what a crash or fault left there.

A work_dir belongs to one run: ``run.json`` holds its run id and the settings that decide its
result, and every checkpoint repeats both. That is what keeps a new run from silently mixing with
an old one (pruning the old run's checkpoints or the new one's, deleting its log, or letting a later
``--resume`` continue the wrong run). Nothing here imports Jittor: these are file decisions, tested
on their own.

What is atomic: each file is written to a temp file, fsynced and renamed (:mod:`jt_lora.io.atomic`); a
checkpoint directory is written under a temporary name and renamed whole. What is not: ``log.jsonl`` is
appended line by line, so a resume rewrites it (atomically) up to the checkpoint's step.
"""
import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..io.atomic import atomic_write_text, move_aside

__all__ = ["RUN_FILE", "STATE_FILE", "OPTIM_FILE", "RESULT_FLAGS", "OutputError", "RunConflict",
           "new_run_id", "fingerprint", "config_differences", "read_run", "run_outputs", "set_aside",
           "check_output_location", "list_checkpoints", "validate_checkpoint", "newest_valid_checkpoint",
           "prune_checkpoints", "truncate_log", "output_errors"]

RUN_FILE = "run.json"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")   # models/adapter_files.py: the one format
FULL_MODEL_DIR = "model"   # full fine-tuning: the whole model as a HF GPT-2 directory
# Names a training run writes into its work_dir; any of them means the directory holds a run.
_RUN_NAMES = (RUN_FILE, "train_config.json", "log.jsonl", "adapter", FULL_MODEL_DIR, "base", "loss_curve.png")

# Flags whose value changes the trained adapter: a resume with any of them different is another run.
RESULT_FLAGS = ("init_checkpoint", "model_card", "n_layer", "n_embd", "n_head", "vocab_size", "adapter",
                "lora_dim", "lora_alpha", "lora_dropout", "lora_inhibition", "lr", "weight_decay",
                "correct_bias", "adam_epsilon", "adam_beta1", "adam_beta2", "scheduler", "warmup_step",
                "max_epoch", "max_step", "clip", "label_smooth", "train_data", "seq_len",
                "train_batch_size", "grad_acc", "random_seed", "ia3_parts", "precision")
# What a run recorded before the flag existed ran with: the flag's default.
_ABSENT = {"precision": "fp32"}
_PATH_FLAGS = ("init_checkpoint", "train_data")


class OutputError(Exception):
    """Writing an output failed (read-only, disk full, a file where a directory should be...); the
    message is the one line to show: the path and what to do."""


class RunConflict(ValueError):
    """The work_dir or checkpoint belongs to another run, or its settings differ from the flags."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def fingerprint(args, world_size: int = 1) -> Dict[str, object]:
    """The settings that decide a run's result, as comparable plain values (paths made absolute)."""
    fp = {}
    for flag in RESULT_FLAGS:
        value = getattr(args, flag, None)
        if flag in _PATH_FLAGS and value is not None:
            value = os.path.abspath(str(value))
        fp[flag] = _ABSENT.get(flag) if value is None and flag in _ABSENT else value
    if fp["init_checkpoint"] is not None:  # the checkpoint decides the shape; the card is not used
        fp.update(model_card=None, n_layer=None, n_embd=None, vocab_size=None)
    if fp["adapter"] != "ina":  # only InA reads it
        fp["lora_inhibition"] = None
    if fp["adapter"] != "ia3":  # only (IA)3 reads it
        fp["ia3_parts"] = None
    fp["world_size"] = world_size
    return fp


def config_differences(recorded: Dict[str, object], current: Dict[str, object]) -> List[str]:
    """``--flag: checkpoint X, now Y`` for each result-deciding setting that differs."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key, _ABSENT.get(key)), current.get(key, _ABSENT.get(key))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b
        if not same:
            name = "world size (NPROC)" if key == "world_size" else f"--{key}"
            out.append(f"{name}: checkpoint {a!r}, now {b!r}")
    return out


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: broken JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def read_run(work_dir) -> Optional[dict]:
    """The run record of work_dir, or None when there is none (or it is unreadable)."""
    path = Path(work_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return _read_json(path)
    except (ValueError, OSError):
        return None


def run_outputs(work_dir) -> List[str]:
    """Names in work_dir that a training run wrote (empty: no run lives there)."""
    d = Path(work_dir)
    if not d.is_dir():
        return []
    found = [n for n in _RUN_NAMES if (d / n).exists()]
    found += sorted(p.name for p in d.glob("checkpoint-*"))
    return found


def set_aside(work_dir, mode: str) -> str:
    """Make room for a new run (``--overwrite``): ``move`` renames the old work_dir to a sibling
    ``<name>.replaced-<time>`` (nothing is lost), ``delete`` removes it. Returns what was done."""
    d = Path(work_dir)
    if mode == "delete":
        shutil.rmtree(d)
        return f"--overwrite delete: removed the previous run in {d}"
    target = d.with_name(f"{d.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{d.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    move_aside(d, target)
    return f"--overwrite: moved the previous run in {d} to {target}"


def check_output_location(work_dir) -> Optional[str]:
    """Why work_dir cannot be written (a regular file on the way, read-only), or None. Only reads."""
    d = Path(os.path.abspath(work_dir))
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == d else f"is under {probe}, which is"
        return f"--work_dir {work_dir} {where} a regular file, not a directory: choose another --work_dir"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return (f"--work_dir {work_dir}: {probe} is not writable (read-only file system or permissions): "
                "choose another --work_dir")
    return None


def _step_of(path: Path) -> Optional[int]:
    tail = path.name.split("-", 1)[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def list_checkpoints(work_dir) -> List[Tuple[int, Path]]:
    """(step, dir) of every ``checkpoint-<step>`` directory, newest first (complete or not)."""
    found = [(_step_of(p), p) for p in Path(work_dir).glob("checkpoint-*") if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


def validate_checkpoint(ckpt_dir) -> dict:
    """Read every file of a checkpoint; its trainer state, or ValueError naming the broken file."""
    from safetensors.numpy import load_file
    ckpt_dir = Path(ckpt_dir)
    state_path = ckpt_dir / STATE_FILE
    if not state_path.is_file():
        raise ValueError(f"{ckpt_dir}: not a jt_lora checkpoint (no {STATE_FILE})")
    state = _read_json(state_path)
    missing = [k for k in ("step", "loader") if k not in state]
    if missing:
        raise ValueError(f"{state_path}: lacks {missing}")
    if (ckpt_dir / FULL_MODEL_DIR).is_dir():   # full fine-tuning
        _read_json(ckpt_dir / FULL_MODEL_DIR / "config.json")
        weights = (f"{FULL_MODEL_DIR}/model.safetensors", OPTIM_FILE)
    else:
        if not (ckpt_dir / ADAPTER_FILES[0]).is_file():
            raise ValueError(f"{ckpt_dir / ADAPTER_FILES[0]}: missing")
        _read_json(ckpt_dir / ADAPTER_FILES[0])
        weights = (ADAPTER_FILES[1], OPTIM_FILE)
    for name in weights:
        path = ckpt_dir / name
        if not path.is_file():
            raise ValueError(f"{path}: missing")
        try:
            load_file(str(path))
        except Exception as e:  # safetensors raises its own error types on truncated files
            raise ValueError(f"{path}: unreadable ({str(e).splitlines()[0][:120]})") from None
    return state


def newest_valid_checkpoint(work_dir, say: Callable[[str], None]) -> Tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint that reads back whole; each broken newer one is named via ``say``."""
    for _, path in list_checkpoints(work_dir):
        try:
            return path, validate_checkpoint(path)
        except (ValueError, OSError) as e:
            say(f"warning: skipping broken checkpoint: {e}; falling back to the previous checkpoint")
    return None, None


def prune_checkpoints(work_dir, run_id: str, keep: int, current_step: int) -> List[Path]:
    """Remove this run's checkpoints beyond the newest ``keep`` (0 = keep all). Checkpoints of any
    other run (or of none) are never touched, nor is any at or after ``current_step``'s."""
    if keep <= 0:
        return []
    mine = []
    for step, path in list_checkpoints(work_dir):
        try:
            state = _read_json(path / STATE_FILE)
        except (ValueError, OSError):
            continue
        if state.get("run_id") == run_id and step <= current_step:
            mine.append(path)
    for path in mine[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    return mine[keep:]


def truncate_log(log_path, step: int) -> int:
    """Rewrite log.jsonl (atomically) without entries past ``step`` or broken lines; returns how many
    were dropped. A resumed run re-logs those steps, so keeping them would repeat them."""
    path = Path(log_path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and int(rec.get("step", 0)) <= step
        except (ValueError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(k + "\n" for k in kept))
    return dropped


_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space or choose another --work_dir",
    errno.EDQUOT: "disk quota exceeded: free space or choose another --work_dir",
    errno.EROFS: "read-only file system: choose another --work_dir",
    errno.EACCES: "permission denied: choose another --work_dir or fix its permissions",
    errno.EPERM: "permission denied: choose another --work_dir or fix its permissions",
    errno.ENOTDIR: "a regular file is in the way where a directory is needed: choose another --work_dir",
    errno.EEXIST: "a file is in the way: choose another --work_dir",
}


@contextlib.contextmanager
def output_errors(path, intact: str = ""):
    """Turn an OSError while writing ``path`` into one OutputError line naming it and what to do."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        advice = _ADVICE.get(e.errno, e.strerror or str(e))
        where = e.filename if getattr(e, "filename", None) else path
        raise OutputError(f"cannot write {where}: {advice}" + (f"; {intact}" if intact else "")) from e
