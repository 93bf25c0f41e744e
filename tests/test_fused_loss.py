"""The fused, vocabulary-chunked LM head + loss (jt_lora.nn.fused_loss) against a float64 numpy
computation of the reference's formula, against the unfused path, and inside a training step."""
import numpy as np
import pytest

from jt_lora.backend import jt
from jt_lora.nn import fused_loss
from jt_lora.nn.fused_loss import fused_token_losses
from jt_lora.nn.kernels import fast_path_available

pytestmark = pytest.mark.skipif(not fast_path_available(), reason="fused loss is the CPU oneDNN path")


def reference(h, w, t, eps, g):
    """float64: per-token loss (1-ε)·nll + ε·mean_v(-log p_v) (nll when ε <= 1e-4) of h @ wᵀ, and the
    gradients of Σ_n g_n·loss_n w.r.t. h and w (closed form: g_n·(p − ε/V − (1−ε)·onehot))."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    z = h @ w.T
    m = z.max(1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
    rows = np.arange(len(t))
    nll = lse - z[rows, t]
    e = eps if eps > 1e-4 else 0.0
    loss = (1 - e) * nll + e * (lse - z.mean(1))
    dz = np.exp(z - lse[:, None]) - e / w.shape[0]
    dz[rows, t] -= 1 - e
    dz *= g[:, None]
    return loss, dz @ w, dz.T @ h


def _inputs(n, v, c, seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, c)).astype(np.float32)
    w = (rng.standard_normal((v, c)) * 0.7).astype(np.float32)
    t = rng.integers(0, v, n).astype(np.int32)
    t[0] = v - 1   # a target in the last, partial chunk
    g = rng.standard_normal(n).astype(np.float32)
    return h, w, t, g


def _run(h, w, t, g, eps, chunk, train_w):
    hj, wj = jt.array(h), jt.array(w)
    if not train_w:
        wj = wj.stop_grad()
    loss = fused_token_losses(hj, wj, jt.array(t), eps, chunk=chunk)
    grads = jt.grad((loss * jt.array(g)).sum(), [hj, wj] if train_w else [hj])
    return loss.numpy(), [x.numpy() for x in grads]


@pytest.mark.parametrize("n,v,c,chunk", [(6, 1000, 24, 300), (1, 777, 16, 100), (9, 513, 8, None), (4, 61, 8, 7)])
@pytest.mark.parametrize("eps", [0.0, 5e-5, 0.1, 0.3])
@pytest.mark.parametrize("train_w", [False, True], ids=["frozen_head", "trained_head"])
def test_equals_float64_formula(n, v, c, chunk, eps, train_w):
    h, w, t, g = _inputs(n, v, c, seed=n + v)
    loss, grads = _run(h, w, t, g, eps, chunk, train_w)
    ref_loss, ref_dh, ref_dw = reference(h, w, t, eps, g)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], ref_dh, rtol=1e-4, atol=1e-5)
    if train_w:
        np.testing.assert_allclose(grads[1], ref_dw, rtol=1e-4, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    h, w, t, g = _inputs(5, 300, 16, seed=3)
    base = _run(h, w, t, g, 0.1, 300, True)
    for chunk in (1, 17, 64, 299, 1000):
        got = _run(h, w, t, g, 0.1, chunk, True)
        np.testing.assert_allclose(got[0], base[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(got[1], base[1]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_large_logits_are_stable():
    """The online logsumexp rescales: logits of ±80 (exp overflows float32 without the max)."""
    h, w, t, g = _inputs(4, 400, 8, seed=5)
    h *= 30.0
    loss, grads = _run(h, w, t, g, 0.1, 50, False)
    ref_loss, ref_dh, _ = reference(h, w, t, 0.1, g)
    assert np.isfinite(loss).all() and np.isfinite(grads[0]).all()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(grads[0], ref_dh, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_equals_unfused_token_losses(eps):
    from jt_lora.models.gpt2 import token_losses
    h, w, t, g = _inputs(7, 2000, 32, seed=11)
    out = {}
    for name in ("fused", "unfused"):
        hj, wj, tj = jt.array(h), jt.array(w), jt.array(t)
        if name == "fused":
            loss = fused_token_losses(hj, wj, tj, eps, chunk=333)
        else:
            loss = token_losses(jt.matmul(hj, wj.transpose()), tj, eps)
        out[name] = [loss.numpy()] + [x.numpy() for x in jt.grad((loss * jt.array(g)).sum(), [hj, wj])]
    for a, b in zip(out["fused"], out["unfused"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_no_grad_gives_the_loss_only():
    h, w, t, g = _inputs(3, 500, 8, seed=2)
    with jt.no_grad():
        loss = fused_token_losses(jt.array(h), jt.array(w), jt.array(t), 0.1, chunk=128).numpy()
    np.testing.assert_allclose(loss, reference(h, w, t, 0.1, g)[0], rtol=1e-5)


def test_switch_and_fallback(monkeypatch):
    monkeypatch.setenv("JT_LORA_FUSED_LOSS", "0")
    assert not fused_loss.fused_loss_enabled()
    monkeypatch.setenv("JT_LORA_FUSED_LOSS", "1")
    assert fused_loss.fused_loss_enabled(jt.ones((2, 2))) == fast_path_available()
    monkeypatch.delenv("JT_LORA_FUSED_LOSS")   # default: only with a frozen head
    assert fused_loss.fused_loss_enabled(jt.ones((2, 2)).stop_grad())
    assert not fused_loss.fused_loss_enabled(jt.ones((2, 2)))
    with pytest.raises(ValueError, match="shapes do not match"):
        fused_token_losses(jt.zeros((2, 3)), jt.zeros((5, 4)), jt.zeros((2,), dtype="int32"))


def _step(adapter, fused, monkeypatch, label_smooth):
    """One AdamW step of a tiny GPT-2 through the trainer's loss; returns (loss, grads, new params)."""
    from jt_lora import GPT2Config, GPT2LMModel
    from jt_lora.training.optim import AdamW
    from jt_lora.training.trainer import loss_and_grads
    monkeypatch.setenv("JT_LORA_FUSED_LOSS", "1" if fused else "0")
    monkeypatch.setattr(fused_loss, "default_chunk", lambda rows, vocab: 10)   # 97 = 9 x 10 + 7
    np.random.seed(0)
    model = GPT2LMModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                   initializer_range=0.3, lora_dropout=0.0, adapter=adapter))
    if adapter == "none":
        for p in model.parameters():
            p.start_grad()
    model.train()
    rng = np.random.default_rng(1)
    named = [(n, p) for n, p in model.named_parameters() if not p.is_stop_grad()]
    assert ("transformer.wte.weight" in dict(named)) == (adapter == "none")   # the head's gradient is tested
    for _, p in named:   # LoRA's B starts at zero: move every trained tensor off its init
        p.assign(p + jt.array(rng.standard_normal(p.shape).astype(np.float32) * 0.05))
    ids = rng.integers(0, 97, (3, 12)).astype(np.int32)
    mask = (rng.random((3, 12)) < 0.6).astype(np.float32)
    mask[0, 0] = 1.0
    batch = {"input": ids, "target": np.roll(ids, -1, axis=1), "mask": mask}
    opt = AdamW(named, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    loss, grads = loss_and_grads(model, batch, [p for _, p in named], label_smooth=label_smooth)
    out = (float(loss.item()), [g.numpy() for g in grads])
    opt.step(grads)
    return out + ([p.numpy() for _, p in named],)


@pytest.mark.parametrize("adapter,label_smooth", [("lora", 0.1), ("lora", 0.0), ("none", 0.1)],
                         ids=["lora", "lora_no_smoothing", "full"])
def test_training_step_equals_unfused(adapter, label_smooth, monkeypatch):
    fused = _step(adapter, True, monkeypatch, label_smooth)
    plain = _step(adapter, False, monkeypatch, label_smooth)
    assert abs(fused[0] - plain[0]) <= 1e-5 * max(1.0, abs(plain[0]))
    assert len(fused[1]) == len(plain[1]) > 0
    for a, b in zip(fused[1], plain[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[2], plain[2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_eval_loss_equals_unfused(monkeypatch):
    """evaluate()'s path: model.eval() freezes everything, the fused op then skips dL/dh."""
    from jt_lora import GPT2Config, GPT2LMModel
    from jt_lora.training.trainer import masked_loss_sum
    np.random.seed(0)
    model = GPT2LMModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                   initializer_range=0.3, adapter="lora"))
    model.eval()
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 97, (2, 9)).astype(np.int32)
    batch = {"input": ids, "target": np.roll(ids, -1, axis=1), "mask": (rng.random((2, 9)) < 0.7).astype(np.float32)}
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("JT_LORA_FUSED_LOSS", flag)
        got[flag] = float(masked_loss_sum(model, batch, 0.1).item())
    assert abs(got["1"] - got["0"]) <= 1e-5 * abs(got["0"])
