"""The one-op LayerNorm and tanh GELU (jt_lora.nn.fused_norm) against float64 numpy computations of
the reference's formulas (values and closed-form gradients), and the model's switch between them
and Jittor's own ops."""
import subprocess
import sys

import numpy as np
import pytest

from jt_lora.backend import jt
from jt_lora.nn.fused_norm import gelu_tanh, layer_norm
from jt_lora.nn.kernels import fast_path_available

pytestmark = pytest.mark.skipif(not fast_path_available(), reason="fused norm is the CPU fast path")

K = np.sqrt(2.0 / np.pi)


def ln_reference(x, w, b, eps, g):
    """float64 LayerNorm (biased variance) and the gradients of Σ g·y w.r.t. x, w, b."""
    x, w, b, g = (a.astype(np.float64) for a in (x, w, b, g))
    u = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - u) ** 2).mean(-1, keepdims=True) + eps)
    xh = (x - u) * rstd
    gw = g * w
    dx = rstd * (gw - gw.mean(-1, keepdims=True) - xh * (gw * xh).mean(-1, keepdims=True))
    axes = tuple(range(x.ndim - 1))
    return w * xh + b, dx, (g * xh).sum(axes), g.sum(axes)


@pytest.mark.parametrize("shape", [(3, 5, 16), (37, 768), (1, 1, 8)])
def test_layer_norm_matches_float64(shape):
    rng = np.random.default_rng(0)
    c = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    w = (rng.random(c) + 0.5).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    xv, wv, bv = jt.array(x), jt.array(w), jt.array(b)
    y = layer_norm(xv, wv, bv, 1e-5)
    dx, dw, db = jt.grad((y * jt.array(g)).sum(), [xv, wv, bv])
    ry, rdx, rdw, rdb = ln_reference(x, w, b, 1e-5, g)
    np.testing.assert_allclose(y.numpy(), ry, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dx.numpy(), rdx, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(dw.numpy(), rdw, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(db.numpy(), rdb, atol=1e-4, rtol=1e-5)


def test_gelu_matches_float64_and_stays_finite_for_large_inputs():
    """Large pre-activations included: Jittor's own tanh gradient gives NaN there (the fused one must not)."""
    x = np.concatenate([np.linspace(-12, 12, 2001), [-60.0, -30.0, 30.0, 60.0, 0.0, 1e-4]]).astype(np.float32)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    xv = jt.array(x)
    y = gelu_tanh(xv)
    dx = jt.grad((y * jt.array(g)).sum(), xv)
    x64 = x.astype(np.float64)
    t = np.tanh(K * (x64 + 0.044715 * x64 ** 3))
    ry = 0.5 * x64 * (1 + t)
    rdx = g * (0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * K * (1 + 3 * 0.044715 * x64 ** 2))
    assert np.isfinite(dx.numpy()).all()
    np.testing.assert_allclose(y.numpy(), ry, atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(dx.numpy(), rdx, atol=2e-6, rtol=1e-5)


_MODEL = r"""
import sys, numpy as np
sys.path.insert(0, {root!r})
from jt_lora.backend import jt
from jt_lora.models.gpt2 import GPT2Config, GPT2LMModel
from jt_lora.nn.fused_norm import use_fused_norm
jt.set_global_seed(0); np.random.seed(0)
model = GPT2LMModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, adapter="lora"))
ids = jt.array(np.random.default_rng(0).integers(0, 64, (2, 9)).astype("int32"))
logits, _ = model(ids)
loss = (logits * logits).mean()
g = jt.grad(loss, model.transformer.h[0].attn.c_attn.lora_A)
np.save({out!r}, np.concatenate([logits.numpy().ravel(), g.numpy().ravel()]))
print(use_fused_norm())
"""


def test_model_with_fused_ops_equals_jittors_ops(tmp_path):
    """The same tiny GPT-2 (logits and an adapter gradient) with JT_LORA_FUSED_NORM=1 and =0."""
    import os
    from pathlib import Path
    root = str(Path(__file__).resolve().parent.parent)
    outs, used = [], []
    for flag in ("1", "0"):
        out = str(tmp_path / f"out{flag}.npy")
        env = {**os.environ, "JT_LORA_FUSED_NORM": flag}
        res = subprocess.run([sys.executable, "-c", _MODEL.format(root=root, out=out)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        used.append(res.stdout.strip().splitlines()[-1])
        outs.append(np.load(out))
    assert used == ["True", "False"]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    assert np.abs(outs[0]).max() > 0
