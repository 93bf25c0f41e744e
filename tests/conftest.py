"""Shared fixtures: a tiny GPT-2 config and PyTorch reference values from a subprocess."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
TINY = dict(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4)

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch + transformers not installed (pip install '.[test]')")


def torch_reference(mode: str, inputs: dict, out_dir: Path) -> Path:
    """Run tests/torch_ref.py MODE in its own process; returns out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inp = out_dir / f"{mode}_in.npz"
    np.savez(inp, **inputs)
    proc = subprocess.run([sys.executable, str(HERE / "torch_ref.py"), mode, str(inp), str(out_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torch reference {mode} failed:\n{proc.stderr[-3000:]}")
    return out_dir


def pytest_report_header(config):
    """Say where the data came from, or which files are missing (the tests reading them will skip)."""
    from jt_lora.io import assets
    missing = assets.missing_assets()
    if missing:
        return (f"data: MISSING {', '.join(missing)}: tests that read them will skip; "
                f"`bash scripts/test.sh` downloads them, or set {assets.ENV_VAR}")
    return f"data: GPT-2 vocab and E2E files found (vocab: {assets.find_asset('gpt2-vocab/encoder.json').parent})"


@pytest.fixture(scope="session")
def tiny_config():
    from jt_lora import GPT2Config
    return GPT2Config(**TINY)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Tiny HF GPT-2 saved in every format, plus reference logits for ``ids``."""
    if not HAS_TORCH:
        pytest.skip("torch + transformers not installed")
    ids = np.array([[1, 5, 7, 9, 11, 3, 2, 50], [4, 4, 8, 15, 16, 23, 42, 96]], dtype=np.int64)
    out = torch_reference("gpt2", {"seed": np.array(0), "ids": ids}, tmp_path_factory.mktemp("hf"))
    return out, ids, dict(np.load(out / "logits.npz"))
