"""The oneDNN batched product used by attention: values and gradients equal jt.matmul's."""
import numpy as np
import pytest

from jt_lora.backend import jt
from jt_lora.kernels import batched_matmul, fast_path_available


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (7, 1, 9, 3)])
def test_batched_matmul_matches_reference_values_and_grads(shape, transpose_b):
    rng = np.random.default_rng(0)
    lead, (n, m, k) = shape[:-3], shape[-3:]
    a = jt.array(rng.normal(size=lead + (n, m)).astype("float32"))
    b_shape = lead + ((k, m) if transpose_b else (m, k))
    b = jt.array(rng.normal(size=b_shape).astype("float32"))
    g = jt.array(rng.normal(size=lead + (n, k)).astype("float32"))
    out = batched_matmul(a, b, transpose_b=transpose_b)
    b_np = np.swapaxes(b.numpy(), -1, -2) if transpose_b else b.numpy()
    np.testing.assert_allclose(out.numpy(), np.matmul(a.numpy(), b_np), rtol=1e-5, atol=1e-5)
    da, db = jt.grad((out * g).sum(), [a, b])
    np.testing.assert_allclose(da.numpy(), np.matmul(g.numpy(), np.swapaxes(b_np, -1, -2)), rtol=1e-5, atol=1e-5)
    db_ref = np.matmul(np.swapaxes(a.numpy(), -1, -2), g.numpy())
    np.testing.assert_allclose(db.numpy(), np.swapaxes(db_ref, -1, -2) if transpose_b else db_ref,
                               rtol=1e-5, atol=1e-5)


def test_fast_path_is_used_on_cpu_with_onednn():
    from jt_lora import backend
    assert fast_path_available() == (backend.onednn_available() and not backend.use_cuda())
