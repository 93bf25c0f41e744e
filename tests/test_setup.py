"""scripts/setup.sh is idempotent: on a set-up .venv a second run changes nothing and takes well
under a second (no pip, no Jittor import), while a package removed behind the stamp's back is noticed."""
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"


def _setup(**env):
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=1800)


def test_second_run_is_quick_and_changes_nothing():
    first = _setup()
    assert first.returncode == 0, first.stderr[-2000:]
    stamps = {p: p.read_text() for p in VENV.glob(".jt_lora_*")}
    assert len(stamps) == 2  # the install stamp and the Jittor-compiled stamp
    start = time.time()
    second = _setup()
    seconds = time.time() - start
    assert second.returncode == 0, second.stderr[-2000:]
    assert "up to date" in second.stdout and "installing" not in second.stdout
    assert seconds < 5, f"second setup run took {seconds:.1f}s"
    assert {p: p.read_text() for p in VENV.glob(".jt_lora_*")} == stamps


def test_the_loralib_reference_is_installed():
    # The LoRA layer tests compare with PyPI loralib; setup.sh's import check reinstalls the test
    # extras when it is missing even if the stamp says the install is current.
    out = subprocess.run([str(VENV / "bin" / "python"), "-c", "import loralib, inspect; print(inspect.getsourcefile(loralib))"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "site-packages" in out.stdout, out.stderr
