"""The backend module: CPU fallback on a machine with nvcc but no GPU, oneDNN, quiet logging."""
import os
import subprocess
import sys

import numpy as np
import pytest

from jt_lora import backend
from jt_lora.backend import jt


def test_cpu_fallback_sets_empty_nvcc_path_when_no_device():
    if backend.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present; the fallback is not used")
    assert os.environ.get("nvcc_path") == ""
    assert not backend.use_cuda()
    assert backend.device_name() == "cpu"


def test_onednn_matmul_is_active_on_cpu():
    if backend.use_cuda():
        pytest.skip("running on CUDA")
    assert backend.onednn_available(), "Jittor fell back to its slow CPU matmul: install jittor-offline"
    a = np.random.default_rng(0).normal(size=(64, 48)).astype("float32")
    b = np.random.default_rng(1).normal(size=(48, 32)).astype("float32")
    np.testing.assert_allclose(jt.matmul(jt.array(a), jt.array(b)).numpy(), a @ b, rtol=1e-4, atol=1e-4)


def _import_stderr(extra_env):
    env = {**os.environ, **extra_env}
    env.pop("nvcc_path", None)
    env.pop("log_silent", None)
    proc = subprocess.run([sys.executable, "-c", "import jt_lora; from jt_lora.backend import jt; print(jt.ones(2).sum().item())"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("2.0")
    return proc.stderr


def test_info_logging_quiet_by_default_and_switchable():
    quiet = _import_stderr({"JT_LORA_VERBOSE": "0"})
    assert "[i " not in quiet
    loud = _import_stderr({"JT_LORA_VERBOSE": "1"})
    assert "[i " in loud


def test_forced_cpu_and_missing_cuda_error():
    env = {**os.environ, "JT_LORA_DEVICE": "cuda"}
    env.pop("nvcc_path", None)
    if backend.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, "-c", "import jt_lora.backend"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "JT_LORA_DEVICE=cuda but the CUDA driver reports no device" in proc.stderr


def test_kernels_compile_on_the_calling_thread_unless_asked():
    """Jittor's parallel op compiler is off (two crashes in its threads); the switch restores it."""
    assert jt.flags.use_parallel_op_compiler == 0
    code = "from jt_lora.backend import jt; print(jt.flags.use_parallel_op_compiler)"
    env = {**os.environ, "JT_LORA_PARALLEL_COMPILE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0
