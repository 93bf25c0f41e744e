"""The one place that imports Jittor.

Jittor decides at import time whether to build CUDA kernels: on a machine that
has ``nvcc`` but no GPU it crashes unless ``nvcc_path`` is empty. We probe for a
CUDA device through the driver library (no Jittor, no torch) and only then
import Jittor, so ``import jt_lora`` works everywhere and uses the GPU when
one is present. Jittor's info logging is silenced unless ``JT_LORA_VERBOSE=1``.

Environment:
    JT_LORA_DEVICE   ``cpu`` forces the CPU, ``cuda`` insists on CUDA.
    JT_LORA_VERBOSE  ``1`` keeps Jittor's own info logging.
"""
import ctypes
import os
import signal
import warnings

__all__ = ["jt", "nn", "cuda_device_count", "use_cuda", "onednn_available", "device_name", "cpu_flags",
           "release_freed_memory"]


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 when no driver or no GPU)."""
    for lib in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        try:
            if cuda.cuInit(0) != 0:
                return 0
            count = ctypes.c_int(0)
            if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
            return int(count.value)
        except AttributeError:
            return 0
    return 0


def _configure_environment() -> bool:
    """Set Jittor's environment before its import; return whether CUDA will be used."""
    want = os.environ.get("JT_LORA_DEVICE", "").lower()
    n_gpu = 0 if want == "cpu" else cuda_device_count()
    if want == "cuda" and n_gpu == 0:
        raise RuntimeError("JT_LORA_DEVICE=cuda but the CUDA driver reports no device")
    if n_gpu == 0:
        # Without this Jittor tries to initialise CUDA because nvcc exists, and crashes.
        os.environ["nvcc_path"] = ""
    if os.environ.get("JT_LORA_VERBOSE", "0") not in ("1", "true", "yes"):
        os.environ.setdefault("log_silent", "1")
    return n_gpu > 0


_CUDA = _configure_environment()

import jittor as jt  # noqa: E402  (must follow the environment set-up above)
from jittor import nn  # noqa: E402

# Jittor's SIGCHLD handler ends this process whenever any child dies of a signal (meant for its
# compile workers); a library that runs subprocesses (tests, METEOR's Java) must not die with them.
if hasattr(signal, "SIGCHLD"):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)

# Jittor compiles the new kernels of a graph in up to 8 threads. Twice a process died in one of them
# (thread 'C3': a segfault at a near-null address, then "malloc_consolidate(): invalid chunk size"),
# once in a test's training subprocess and once in scripts/bench.sh, at the start of a run, and never
# again in dozens of reruns. Kernels are compiled on the calling thread instead (Jittor's serial path);
# they are cached per machine, so only a first run pays (24 new kernels: 13.6-16.0 s instead of
# 8.3-9.3 s on 2 cores). JT_LORA_PARALLEL_COMPILE=1 restores Jittor's default.
if os.environ.get("JT_LORA_PARALLEL_COMPILE", "0") != "1":
    jt.flags.use_parallel_op_compiler = 0

# Jittor enables flush-to-zero; numpy then warns that float64's smallest subnormal is zero.
warnings.filterwarnings("ignore", message="The value of the smallest subnormal")

if _CUDA and jt.has_cuda:
    jt.flags.use_cuda = 1


def use_cuda() -> bool:
    """True when Jittor runs its kernels on a CUDA device."""
    return bool(jt.flags.use_cuda)


def device_name() -> str:
    return "cuda" if use_cuda() else "cpu"


_CPU_FLAGS = None


def cpu_flags() -> frozenset:
    """This CPU's instruction-set flags (``/proc/cpuinfo``; empty elsewhere): which hand kernels fit
    (AVX-512 or AVX2 register blocking, AMX for bf16). Read once."""
    global _CPU_FLAGS
    if _CPU_FLAGS is None:
        flags = frozenset()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
        _CPU_FLAGS = flags
    return _CPU_FLAGS


def onednn_available() -> bool:
    """True when Jittor's CPU matmul goes through oneDNN (about 10x faster than its fallback)."""
    from jittor import compile_extern

    return getattr(compile_extern, "mkl_ops", None) is not None


def release_freed_memory() -> None:
    """Give memory freed by dropped tensors back to the OS (after swapping a model's weights for
    packed or int8 ones): Jittor's allocator keeps freed blocks (``jt.gc()`` returns them to malloc)
    and glibc keeps freed heap pages (``malloc_trim``)."""
    jt.gc()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
