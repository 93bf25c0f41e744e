"""Batched matrix products through oneDNN's sgemm on the CPU.

Jittor maps only 2-D products onto oneDNN; a batched product such as attention's
``q @ k^T`` over [batch·heads] becomes a broadcast-multiply-reduce that runs at a
few GFLOP/s. ``batched_matmul`` issues one ``dnnl_sgemm`` per batch entry from a
small Jittor ``code`` op instead (the library is already loaded by Jittor's
oneDNN ops), with its own backward. Shapes are read at run time, so new sequence
lengths do not trigger recompilation. On CUDA, or without oneDNN, it falls back
to ``jt.matmul`` (cuBLAS has a batched product of its own).
"""
from .backend import jt, onednn_available, use_cuda

__all__ = ["batched_matmul", "fast_path_available"]

_HEADER = r"""
extern "C" int dnnl_sgemm(char transa, char transb, long long M, long long N, long long K,
    float alpha, const float *A, long long lda, const float *B, long long ldb,
    float beta, float *C, long long ldc);
"""
# in0: a [G, n, m] (or [G, m, n] when TA), in1: b [G, m, k] (or [G, k, m] when TB) -> out0 [G, n, k]
_SRC = r"""
const long long G = in0_shape0;
const long long n = @TA ? in0_shape2 : in0_shape1;
const long long m = @TA ? in0_shape1 : in0_shape2;
const long long k = @TB ? in1_shape1 : in1_shape2;
const long long sa = in0_shape1 * in0_shape2, sb = in1_shape1 * in1_shape2, sc = n * k;
if (G == 1) {  // one product: let oneDNN use every thread itself
    dnnl_sgemm(@TA ? 'T' : 'N', @TB ? 'T' : 'N', n, k, m, 1.f, in0_p, @TA ? n : m, in1_p, @TB ? m : k,
               0.f, out0_p, k);
} else {       // many small products: one thread each (oneDNN runs serially inside the region)
    #pragma omp parallel for schedule(static)
    for (long long g = 0; g < G; g++)
        dnnl_sgemm(@TA ? 'T' : 'N', @TB ? 'T' : 'N', n, k, m, 1.f,
                   in0_p + g * sa, @TA ? n : m, in1_p + g * sb, @TB ? m : k, 0.f, out0_p + g * sc, k);
}
"""

_FAST = None


def fast_path_available() -> bool:
    global _FAST
    if _FAST is None:
        _FAST = onednn_available() and not use_cuda()
    return _FAST


def _sgemm_batched(a, b, ta: bool, tb: bool):
    g = a.shape[0]
    n = a.shape[2] if ta else a.shape[1]
    k = b.shape[1] if tb else b.shape[2]
    src = _SRC.replace("@TA", "1" if ta else "0").replace("@TB", "1" if tb else "0")
    return jt.code((g, n, k), "float32", [a, b], cpu_header=_HEADER, cpu_src=src)


class _BatchedMatmul(jt.Function):
    def execute(self, a, b, tb):
        self.a, self.b, self.tb = a, b, tb
        return _sgemm_batched(a, b, False, tb)

    def grad(self, gc):
        a, b = self.a, self.b
        if self.tb:  # c = a @ b^T: da = gc @ b, db = gc^T @ a
            return _sgemm_batched(gc, b, False, False), _sgemm_batched(gc, a, True, False), None
        # c = a @ b: da = gc @ b^T, db = a^T @ gc
        return _sgemm_batched(gc, b, False, True), _sgemm_batched(a, gc, True, False), None


def batched_matmul(a, b, transpose_b: bool = False):
    """``a @ b`` (or ``a @ b^T``) over leading batch dimensions, float32.

    Args:
        a: [..., n, m]; b: [..., m, k] (or [..., k, m] with ``transpose_b``); same leading dims.
    """
    if not fast_path_available() or a.dtype != "float32" or b.dtype != "float32":
        return jt.matmul(a, b.transpose(*range(b.ndim - 2), b.ndim - 1, b.ndim - 2) if transpose_b else b)
    lead = a.shape[:-2]
    a3 = a.reshape((-1,) + tuple(a.shape[-2:]))
    b3 = b.reshape((-1,) + tuple(b.shape[-2:]))
    out = _BatchedMatmul.apply(a3, b3, transpose_b)
    return out.reshape(tuple(lead) + tuple(out.shape[-2:]))
