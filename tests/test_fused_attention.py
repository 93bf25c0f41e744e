"""nn.fused_attention: the one-op attention core against a float64 computation of the reference's
masked attention (values) and Jittor's autodiff of the same formula written with plain ops
(gradients), for causal and padded masks; and a GPT-2 training step with it on and off."""
import math

import numpy as np
import pytest

from jt_lora import GPT2Config, GPT2LMModel
from jt_lora.backend import jt, nn
from jt_lora.nn.fused_attention import attention_core, attention_core_applies
from jt_lora.nn.kernels import fast_path_available

pytestmark = pytest.mark.skipif(not fast_path_available(), reason="the fused attention is CPU fast path only")


def _masks(b, t, padded):
    keep = np.tril(np.ones((t, t), np.float32))[None, None].repeat(b if padded else 1, 0)
    if padded:
        keep[1, :, :, :2] = 0.0   # the second example's first two keys are padding
    return keep


def _reference64(qkv, keep, heads):
    """The reference's attention: w = q kᵀ / sqrt(D); w*b - 1e10*(1-b); softmax; p v (float64)."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    x = qkv.astype(np.float64)
    q, k, v = (x[:, :, i * c:(i + 1) * c].reshape(b, t, heads, d).transpose(0, 2, 1, 3) for i in range(3))
    w = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    kb = np.broadcast_to(keep, w.shape)
    w = w * kb - 1e10 * (1 - kb)
    p = np.exp(w - w.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, t, c)


def _plain_ops(qkv, keep, heads):
    """The same formula with Jittor's generic ops (for autodiff)."""
    b, t, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    q, k, v = (qkv[:, :, i * c:(i + 1) * c].reshape(b, t, heads, d).transpose(0, 2, 1, 3) for i in range(3))
    w = jt.matmul(q, k.transpose(0, 1, 3, 2)) / math.sqrt(d)
    w = w * keep - 1e10 * (1 - keep)
    return jt.matmul(nn.softmax(w, dim=-1), v).transpose(0, 2, 1, 3).reshape(b, t, c)


@pytest.mark.parametrize("b,t,heads,d,padded", [(2, 5, 3, 4, False), (2, 5, 3, 4, True), (3, 17, 2, 8, False),
                                                 (3, 17, 2, 8, True), (1, 1, 4, 2, False)])
def test_values_and_gradients(b, t, heads, d, padded):
    rng = np.random.default_rng(b * 100 + t)
    qkv_np = rng.normal(0, 1, (b, t, 3 * heads * d)).astype(np.float32)
    keep_np = _masks(b, t, padded)
    qkv, keep = jt.array(qkv_np), jt.array(keep_np)
    assert attention_core_applies(qkv, keep, heads)
    a = attention_core(qkv, keep, heads, math.sqrt(d))
    ref = _reference64(qkv_np, keep_np, heads)
    np.testing.assert_allclose(a.numpy(), ref, rtol=1e-5, atol=1e-5)
    g_out = jt.array(rng.normal(0, 1, a.shape).astype(np.float32))
    got = jt.grad((a * g_out).sum(), qkv).numpy()
    want = jt.grad((_plain_ops(qkv, keep, heads) * g_out).sum(), qkv).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert np.abs(got).max() > 0


def test_when_it_applies(monkeypatch):
    qkv = jt.zeros((2, 4, 24))
    assert attention_core_applies(qkv, jt.ones((1, 1, 4, 4)), 2)
    assert not attention_core_applies(qkv, jt.ones((1, 1, 4, 5)), 2)     # keys beyond the queries (a cache)
    assert not attention_core_applies(qkv, jt.ones((3, 1, 4, 4)), 2)     # a mask for another batch
    assert not attention_core_applies(jt.zeros((2, 4, 25)), jt.ones((1, 1, 4, 4)), 2)
    monkeypatch.setenv("JT_LORA_FUSED_ATTENTION", "0")
    assert not attention_core_applies(qkv, jt.ones((1, 1, 4, 4)), 2)


def _step(monkeypatch, fused: str, mask):
    monkeypatch.setenv("JT_LORA_FUSED_ATTENTION", fused)
    from jt_lora.models import gpt2
    calls = []
    monkeypatch.setattr(gpt2, "attention_core", lambda *a: calls.append(1) or attention_core(*a))
    np.random.seed(0)
    m = GPT2LMModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=24, n_layer=2, n_head=3, lora_dropout=0.0))
    rng = np.random.default_rng(1)
    for _, p in m.named_parameters():   # B of LoRA non-zero, so its gradient path is exercised too
        p.update(jt.array(rng.normal(0, 0.3, p.shape).astype(np.float32)))
    m.train()
    ids = jt.array(rng.integers(0, 50, (2, 9)).astype(np.int32))
    logits, _ = m(ids, attention_mask=jt.array(mask))
    params = [p for _, p in m.named_parameters() if not p.is_stop_grad()]
    loss = (logits * jt.array(rng.normal(0, 1, logits.shape).astype(np.float32))).sum()
    grads = [g.numpy() for g in jt.grad(loss, params)]
    assert len(calls) == (2 if fused == "1" else 0)   # one per layer when on
    return logits.numpy(), grads


@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_step_is_unchanged(monkeypatch, padded):
    mask = np.ones((2, 9), np.float32)
    if padded:
        mask[1, :3] = 0
    on_logits, on_grads = _step(monkeypatch, "1", mask)
    off_logits, off_grads = _step(monkeypatch, "0", mask)
    np.testing.assert_allclose(on_logits, off_logits, rtol=1e-5, atol=1e-5 * np.abs(off_logits).max())
    assert len(on_grads) == len(off_grads) > 0
    for a, b in zip(on_grads, off_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(np.abs(b).max(), 1e-6))
