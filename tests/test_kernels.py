"""The CPU kernels (oneDNN products, few-row products, (IA)³ scaling, masked softmax): values and
gradients against numpy computations, never against the ops they replace."""
import numpy as np
import pytest

from jt_lora.backend import jt
from jt_lora.nn.kernels import batched_matmul, fast_path_available


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


@pytest.mark.parametrize("rows", [1, 5, 10, 12, 13, 40, 64])
@pytest.mark.parametrize("k,n", [(768, 2304), (37, 70), (3072, 96), (5, 3)])
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_rows_matmul_matches_float64_product(rows, k, n, transpose_w, with_bias):
    """Every path (register strips with column tails, oneDNN fallback, left-operand sgemm +
    transpose) gives the product, bias included, for row counts inside and past the strip limit."""
    from jt_lora.nn.kernels import small_rows_matmul
    rng = np.random.default_rng(rows * 1000 + k)
    x = rng.normal(size=(rows, k)).astype("float32")
    w = rng.normal(size=(n, k) if transpose_w else (k, n)).astype("float32")
    b = rng.normal(size=n).astype("float32")
    ref = x.astype(np.float64) @ (w.T if transpose_w else w).astype(np.float64) + (b if with_bias else 0.0)
    with jt.no_grad():
        got = small_rows_matmul(jt.array(x), jt.array(w), transpose_w,
                                jt.array(b) if with_bias else None).numpy()
    assert got.shape == (rows, n)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_small_rows_matmul_keeps_leading_dims_and_rejects_bad_shapes():
    from jt_lora.nn.kernels import SMALL_ROWS_MAX, small_rows_matmul
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    w = rng.normal(size=(8, 64)).astype("float32")
    with jt.no_grad():
        got = small_rows_matmul(jt.array(x), jt.array(w)).numpy()
        np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="at most"):
            small_rows_matmul(jt.zeros((SMALL_ROWS_MAX + 1, 8)), jt.array(w))
        with pytest.raises(ValueError, match="do not match"):
            small_rows_matmul(jt.array(x), jt.array(w), transpose_w=True)


def test_dense_takes_the_inference_kernel_only_without_gradients():
    """Under no_grad a few rows take the kernel; with a trainable input the ordinary product runs,
    and its gradient is right."""
    from jt_lora.nn.kernels import dense, use_small_rows
    rng = np.random.default_rng(2)
    x = jt.array(rng.normal(size=(4, 16)).astype("float32"))
    w = jt.array(rng.normal(size=(16, 32)).astype("float32"))
    b = jt.array(rng.normal(size=32).astype("float32"))
    assert not use_small_rows(4, x, w, b)          # all three require grad
    with jt.no_grad():
        assert use_small_rows(4, x, w, b) == fast_path_available()
        assert not use_small_rows(65, x, w, b)
        np.testing.assert_allclose(dense(x, w, b).numpy(), x.numpy() @ w.numpy() + b.numpy(), rtol=1e-5, atol=1e-5)
    y = dense(x, w, b)
    gx, gw = jt.grad((y * y).sum(), [x, w])
    ref = 2 * (x.numpy() @ w.numpy() + b.numpy())
    np.testing.assert_allclose(gx.numpy(), ref @ w.numpy().T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw.numpy(), x.numpy().T @ ref, rtol=1e-4, atol=1e-4)


def test_scale_last_dim_values_and_gradients():
    """(IA)³'s scaling op: x*s, and gradients gy*s and the column sums of x*gy."""
    from jt_lora.nn.kernels import scale_last_dim
    rng = np.random.default_rng(3)
    x = jt.array(rng.normal(size=(3, 5, 7)).astype("float32"))
    s = jt.array(rng.normal(size=7).astype("float32"))
    g = rng.normal(size=(3, 5, 7)).astype("float32")
    y = scale_last_dim(x, s)
    np.testing.assert_allclose(y.numpy(), x.numpy() * s.numpy(), rtol=1e-6)
    gx, gs = jt.grad((y * jt.array(g)).sum(), [x, s])
    np.testing.assert_allclose(gx.numpy(), g * s.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gs.numpy(), (x.numpy() * g).reshape(-1, 7).sum(0), rtol=1e-4, atol=1e-5)


def _softmax_ref(scores, keep, add, sqrt_d, g):
    """numpy float64: p = softmax(w/√d·keep + add) and dL/dw for L = sum(p·g)."""
    z = scores.astype(np.float64) / sqrt_d * keep + add
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    dz = p * (g - (p * g).sum(-1, keepdims=True))
    return p, dz / sqrt_d * keep


@pytest.mark.parametrize("keep_batch,keep_heads", [(1, 1), (2, 1), (2, 3)])
def test_attention_softmax_matches_float64_reference(keep_batch, keep_heads):
    """Values and score gradients of the fused masked softmax equal the reference's
    softmax(w/√d·keep - 1e10·(1-keep)) computed in numpy float64 (gradient by its closed form), for keep
    masks broadcast over batch and/or heads (with masked keys), and on causal_mask with padding."""
    from jt_lora.nn.kernels import attention_softmax
    from jt_lora.models.gpt2 import causal_mask
    rng = np.random.default_rng(keep_batch * 10 + keep_heads)
    b, h, tq, tk = 2, 3, 4, 6
    scores_np = rng.normal(0, 3, size=(b, h, tq, tk)).astype("float32")
    keep_np = (rng.random((keep_batch, keep_heads, tq, tk)) < 0.7).astype("float32")
    keep_np[..., -1] = 1.0                       # every row sees at least one key
    add_np = (keep_np - 1.0) * 1e10
    g_np = rng.normal(size=(b, h, tq, tk)).astype("float32")
    scores = jt.array(scores_np)
    got = attention_softmax(scores, jt.array(keep_np), jt.array(add_np), 8.0)
    p_ref, dz_ref = _softmax_ref(scores_np, keep_np, add_np, 8.0, g_np)
    assert (p_ref[np.broadcast_to(keep_np, p_ref.shape) == 0] == 0).all()
    np.testing.assert_allclose(got.numpy(), p_ref, rtol=1e-5, atol=1e-7)
    (g_got,) = jt.grad((got * jt.array(g_np)).sum(), [scores])
    np.testing.assert_allclose(g_got.numpy(), dz_ref, rtol=1e-4, atol=1e-6)
    pad = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], np.float32)
    keep_c, add_c = causal_mask(3, 2, jt.array(pad))
    s2 = rng.normal(size=(2, 3, 3, 5)).astype("float32")
    keep_ref = np.tril(np.ones((5, 5), np.float32))[2:5][None, None] * pad[:, None, None, :]
    p2, _ = _softmax_ref(s2, keep_ref, (keep_ref - 1.0) * 1e10, 8.0, np.zeros_like(s2))
    np.testing.assert_allclose(attention_softmax(jt.array(s2), keep_c, add_c, 8.0).numpy(), p2,
                               rtol=1e-5, atol=1e-7)
