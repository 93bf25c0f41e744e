"""Opt-in bfloat16 compute for the frozen base's products in training (``--precision bf16``).

What runs in bf16: the products of every frozen dense layer (forward ``x·W`` and the backward
``dL/dx = g·Wᵀ``) and the tied LM head's two products inside the fused head + loss
(``nn.fused_loss``: the logits ``h·wteᵀ`` and ``P·wte``). Inputs are rounded to bf16 (round to
nearest even), products accumulate in fp32 and come out in fp32. Everything else stays fp32: the
master weights, the adapters and their gradients, the optimiser state, LayerNorm, softmax,
attention's batched products, the loss and its reductions.

How: oneDNN's ``dnnl_gemm_bf16bf16f32`` (the library Jittor already loads) with oneDNN's AMX
kernels. oneDNN 2.2 uses AMX only when its ISA cap is raised to ``avx512_core_amx``
(``dnnl_set_max_cpu_isa``, which must run before oneDNN's first JIT kernel of the process), and
Linux >= 5.16 lets a process use AMX tile data only after ``arch_prctl(ARCH_REQ_XCOMP_PERM)``,
which this oneDNN predates; ``enable()`` does both. Without AMX the same call runs oneDNN's
AVX512-BF16 kernel, which measured *slower* than fp32 sgemm on the development machine (0.57x), so
bf16 is refused there.

Frozen weights are converted once to a bf16 copy (kept per weight tensor; 2 bytes per weight) and
reused every step; training never changes them (LoRA/(IA)³ merges in eval mode are undone exactly
before the next training step, and evaluation itself runs in fp32: only code inside ``compute()``
takes this path).
"""
import contextlib
import ctypes
import os
import platform

from ..backend import cpu_flags, jt, onednn_available, use_cuda

__all__ = ["Bf16Unavailable", "unavailable_reason", "enable", "enabled", "compute", "active", "to_bf16",
           "matmul", "dense", "fused_head_loss", "clear_cache", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")
_ISA_AMX = 0x3e7            # dnnl_cpu_isa_avx512_core_amx (oneDNN 2.x)
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158       # x86_64
_NEEDED_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


class Bf16Unavailable(ValueError):
    """bf16 compute cannot run here; the message is the one line to show."""


_ENABLED = False
_ACTIVE = False


def unavailable_reason():
    """Why bf16 compute cannot run on this machine, or None when it can (before ``enable()``)."""
    if use_cuda():
        return "bf16 compute is implemented for the CPU (oneDNN with AMX) only, and this run uses CUDA"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"bf16 compute needs Linux on x86_64 with AMX, this is {platform.system()} {platform.machine()}"
    if not onednn_available():
        return "bf16 compute needs Jittor's oneDNN, which is not available in this Jittor"
    missing = [f for f in _NEEDED_FLAGS if f not in cpu_flags()]
    if missing:
        return (f"this CPU lacks {', '.join(missing)}: without AMX, oneDNN's bf16 products are slower "
                "than fp32 here; use --precision fp32")
    return None


def _dnnl():
    """The oneDNN library Jittor loaded (the same handle, found in this process's mappings)."""
    path = None
    with open("/proc/self/maps") as f:
        for line in f:
            name = line.rsplit(" ", 1)[-1].strip()
            if os.path.basename(name).startswith(("libdnnl.so", "libmkldnn.so")):
                path = name
                break
    if path is None:
        raise Bf16Unavailable("bf16 compute: Jittor's oneDNN library is not loaded in this process")
    lib = ctypes.CDLL(path)
    for fn in ("dnnl_set_max_cpu_isa", "dnnl_get_effective_cpu_isa", "dnnl_gemm_bf16bf16f32"):
        if not hasattr(lib, fn):
            raise Bf16Unavailable(f"bf16 compute: Jittor's oneDNN ({path}) has no {fn}")
    return lib


def enable() -> None:
    """Make oneDNN's AMX bf16 kernels usable in this process, or raise ``Bf16Unavailable``.

    Call before any other oneDNN work of the process (model building does none; a training step
    does): oneDNN fixes its ISA cap at its first kernel.
    """
    global _ENABLED
    if _ENABLED:
        return
    reason = unavailable_reason()
    if reason:
        raise Bf16Unavailable(reason)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        raise Bf16Unavailable(f"the kernel refused AMX tile data to this process (arch_prctl: "
                              f"{os.strerror(ctypes.get_errno())}); use --precision fp32")
    lib = _dnnl()
    lib.dnnl_set_max_cpu_isa(_ISA_AMX)   # fails harmlessly once oneDNN has run: checked next
    if lib.dnnl_get_effective_cpu_isa() != _ISA_AMX:
        raise Bf16Unavailable("oneDNN's AMX kernels could not be enabled (oneDNN already ran in this process "
                              "before bf16 was set up, or its ISA is capped by DNNL_MAX_CPU_ISA)")
    _ENABLED = True


def enabled() -> bool:
    return _ENABLED


def active() -> bool:
    """True inside ``compute()`` after ``enable()``: the dense layers and the fused LM head take bf16."""
    return _ACTIVE


@contextlib.contextmanager
def compute(on: bool = True):
    """Build the graph of the enclosed code (forward and ``jt.grad``) with bf16 products."""
    global _ACTIVE
    if on and not _ENABLED:
        raise RuntimeError("bf16.compute() before bf16.enable()")
    before, _ACTIVE = _ACTIVE, bool(on)
    try:
        yield
    finally:
        _ACTIVE = before


# ----------------------------------------------------------------------------------------------
# Kernels. bf16 values are held as int16 Vars (the raw bits).

_HEADER = r"""
#include <cstdint>
#include <cstdlib>
#include <cstring>
extern "C" int dnnl_gemm_bf16bf16f32(char transa, char transb, long long M, long long N, long long K,
    float alpha, const uint16_t *A, long long lda, const uint16_t *B, long long ldb,
    float beta, float *C, long long ldc);
// fp32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet)
static inline uint16_t jtl_bf16(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static void jtl_to_bf16(const float* x, uint16_t* y, long long n) {
    #pragma omp parallel for schedule(static)
    for (long long i = 0; i < n; i++) y[i] = jtl_bf16(x[i]);
}
"""

_CONVERT_SRC = r"""
jtl_to_bf16(in0_p, (uint16_t*)out0_p, in0->num);
"""

# in0 a [M, K] fp32, in1 b16 [K, N] (or [N, K] when @TB) bf16 bits -> out0 [M, N] fp32 = a · b (or a · bᵀ)
_MATMUL_SRC = r"""
const long long M = in0_shape0, K = in0_shape1;
const long long N = @TB ? in1_shape0 : in1_shape1;
uint16_t* A = (uint16_t*)std::malloc(sizeof(uint16_t) * M * K);
jtl_to_bf16(in0_p, A, M * K);
dnnl_gemm_bf16bf16f32('N', @TB ? 'T' : 'N', M, N, K, 1.f, A, K, (const uint16_t*)in1_p, @TB ? K : N,
                      0.f, out0_p, N);
std::free(A);
"""


def to_bf16(x):
    """The bf16 bits of fp32 ``x`` (round to nearest even) as an int16 Var of the same shape."""
    return jt.code(x.shape, "int16", [x], cpu_header=_HEADER, cpu_src=_CONVERT_SRC)


def _matmul16(a, b16, transpose_b: bool):
    n = b16.shape[0] if transpose_b else b16.shape[1]
    return jt.code((a.shape[0], n), "float32", [a, b16], cpu_header=_HEADER,
                   cpu_src=_MATMUL_SRC.replace("@TB", "1" if transpose_b else "0"))


class _FrozenMatmul(jt.Function):
    """``a · w`` (or ``a · wᵀ``) with a frozen ``w`` given as its bf16 copy: gradient for ``a`` only."""

    def execute(self, a, w16, transpose_b):
        self.w16, self.tb = w16, transpose_b
        return _matmul16(a, w16, transpose_b)

    def grad(self, g):
        return _matmul16(g, self.w16, not self.tb), None, None


_CACHE = {}   # id(weight) -> (weight, its bf16 copy)


def clear_cache() -> None:
    """Forget the bf16 copies of frozen weights (needed only if a frozen weight is reassigned)."""
    _CACHE.clear()


def _weight16(w):
    hit = _CACHE.get(id(w))
    if hit is not None and hit[0] is w and tuple(hit[1].shape) == tuple(w.shape):
        return hit[1]
    w16 = to_bf16(w.detach()).stop_grad()
    w16.sync()
    _CACHE[id(w)] = (w, w16)
    return w16


def matmul(a, w, transpose_w: bool = False):
    """``a [M, K] · w`` (``w [K, N]``, or ``[N, K]`` with ``transpose_w``) in bf16 with fp32
    accumulation; ``w`` must be frozen (its bf16 copy is cached), ``a`` gets a gradient."""
    if a.dtype != "float32" or w.dtype != "float32":
        raise TypeError(f"bf16.matmul takes float32 inputs, got {a.dtype} and {w.dtype}")
    return _FrozenMatmul.apply(a, _weight16(w), bool(transpose_w))


def dense(x, weight, bias=None, fan_in_fan_out: bool = True):
    """``kernels.dense`` in bf16: ``x·W (+ b)`` with a frozen ``W`` (``[in, out]`` with
    ``fan_in_fan_out``, else ``[out, in]``); the bias is added in fp32."""
    lead = tuple(x.shape[:-1])
    y = matmul(x.reshape((-1, x.shape[-1])), weight, transpose_w=not fan_in_fan_out)
    y = y.reshape(lead + (y.shape[-1],))
    return y + bias if bias is not None else y


def use_for(x, weight) -> bool:
    """Whether a dense product takes bf16: inside ``compute()``, fp32, a frozen weight."""
    return _ACTIVE and x.dtype == "float32" and weight.dtype == "float32" and weight.is_stop_grad()


# ----------------------------------------------------------------------------------------------
# The fused LM head + loss (nn.fused_loss) with its two vocabulary-sized products in bf16.

_FUSED_SRC = {}


def _fused_source(fwd_src: str) -> str:
    """``fused_loss``'s frozen-head forward source (``fwd_src``) with the logits and ``P·wte``
    products in bf16: h is rounded once, each chunk of probabilities before its product; the rest
    of the op (online logsumexp, the target and mean terms, the ε column sums) is unchanged fp32."""
    if fwd_src not in _FUSED_SRC:
        src = fwd_src.replace("@DH", "1")
        swaps = [
            ("float* Z = (float*)std::malloc(sizeof(float) * N * VC);",
             "float* Z = (float*)std::malloc(sizeof(float) * N * VC);\n"
             "uint16_t* H16 = (uint16_t*)std::malloc(sizeof(uint16_t) * N * C);\n"
             "uint16_t* Z16 = (uint16_t*)std::malloc(sizeof(uint16_t) * N * VC);\n"
             "const uint16_t* W16 = (const uint16_t*)in3_p;\n"
             "jtl_to_bf16(H, H16, N * C);"),
            ("dnnl_sgemm('N', 'T', N, vc, C, 1.f, H, C, Wc, C, 0.f, Z, vc);",
             "dnnl_gemm_bf16bf16f32('N', 'T', N, vc, C, 1.f, H16, C, W16 + v0 * C, C, 0.f, Z, vc);"),
            ("dnnl_sgemm('N', 'N', N, C, vc, 1.f, Z, vc, Wc, C, 1.f, acc, C);",
             "jtl_to_bf16(Z, Z16, N * vc);\n"
             "    dnnl_gemm_bf16bf16f32('N', 'N', N, C, vc, 1.f, Z16, vc, W16 + v0 * C, C, 1.f, acc, C);"),
            ("std::free(Z);", "std::free(Z); std::free(H16); std::free(Z16);"),
        ]
        for old, new in swaps:
            if src.count(old) != 1:
                raise RuntimeError(f"nn.fused_loss changed: cannot derive its bf16 variant (looking for {old!r})")
            src = src.replace(old, new)
        _FUSED_SRC[fwd_src] = src
    return _FUSED_SRC[fwd_src]


def fused_head_loss(h, wte, targets, eps: float, chunk: int, fwd_src: str, header: str):
    """``fused_loss._forward(..., with_dh=True)`` with bf16 products: (loss [N], dL/dh [N, C]) for a
    frozen ``wte`` [V, C] (its bf16 copy is cached). ``fwd_src``/``header``: fused_loss's op source
    and header (passed in, so that this module does not import fused_loss)."""
    n, c = h.shape
    loss, _, dh = jt.code([(n,), (n,), (n, c)], ["float32"] * 3, [h, wte, targets, _weight16(wte)],
                          cpu_header=header + _HEADER, cpu_src=_fused_source(fwd_src),
                          data={"eps": float(eps), "chunk": int(chunk)})
    return loss, dh
