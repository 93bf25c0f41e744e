"""Adapter layers: loralib semantics, InA against a PyTorch re-implementation, (IA)3 merging."""
import numpy as np
import pytest

from conftest import needs_torch, torch_reference
from jt_lora import IA3Linear, Linear, MergedLinear, adapter_state_dict, mark_only_adapter_as_trainable
from jt_lora.backend import jt
from jt_lora.lora import Embedding

rng = np.random.default_rng(0)


def _rand(*shape, scale=0.5):
    return rng.normal(0, scale, shape).astype("float32")


def _set(var, value):
    frozen = var.is_stop_grad()
    var.update(jt.array(value))
    if frozen:
        var.stop_grad()


def _base_out(layer, x):
    w = layer.weight.numpy()
    y = x @ w if layer.fan_in_fan_out else x @ w.T
    return y + layer.bias.numpy()


def _layer(kind, **kw):
    if kind == "linear":
        return Linear(8, 6, r=2, lora_alpha=4, fan_in_fan_out=kw.pop("ffo", False), **kw)
    if kind == "merged":
        return MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=(True, False, True),
                            fan_in_fan_out=kw.pop("ffo", True), **kw)
    raise ValueError(kind)


@pytest.mark.parametrize("kind,ffo", [("linear", False), ("linear", True), ("merged", True), ("merged", False)])
def test_lora_zero_b_equals_base_and_init(kind, ffo):
    layer = _layer(kind, ffo=ffo)
    x = _rand(5, 8)
    np.testing.assert_allclose(layer(jt.array(x)).numpy(), _base_out(layer, x), atol=1e-6)
    a = layer.lora_A.numpy()
    assert np.abs(a).max() <= 1 / np.sqrt(8) and np.abs(a).max() > 0.5 / np.sqrt(8)  # kaiming-uniform bound
    assert not layer.lora_B.numpy().any()
    assert layer.scaling == 2.0
    assert layer.weight.is_stop_grad() and not layer.lora_A.is_stop_grad()


@pytest.mark.parametrize("kind,ffo", [("linear", False), ("linear", True), ("merged", True), ("merged", False)])
def test_eval_merges_train_unmerges(kind, ffo):
    layer = _layer(kind, ffo=ffo)
    _set(layer.lora_B, _rand(*layer.lora_B.shape))
    x = jt.array(_rand(5, 8))
    w0 = layer.weight.numpy().copy()
    unmerged = layer(x).numpy()
    layer.eval()
    assert layer.merged
    assert np.abs(layer.weight.numpy() - w0).max() > 1e-3  # the update went into the weight
    np.testing.assert_allclose(layer(x).numpy(), unmerged, atol=1e-5)
    layer.train()
    assert not layer.merged
    np.testing.assert_allclose(layer.weight.numpy(), w0, atol=1e-6)
    np.testing.assert_allclose(layer(x).numpy(), unmerged, atol=1e-6)


def test_merged_linear_matches_loralib_grouped_formula_and_leaves_k_untouched():
    layer = _layer("merged", lora_dropout=0.0)
    A, B = layer.lora_A.numpy(), _rand(8, 2)
    _set(layer.lora_B, B)
    x = _rand(3, 8)
    y = layer(jt.array(x)).numpy()
    base = _base_out(layer, x)
    # loralib: part g of the output gets B_g (A_g x) * scaling; disabled parts get nothing.
    q = base[:, 0:4] + (x @ A[0:2].T) @ B[0:4].T * 2.0
    v = base[:, 8:12] + (x @ A[2:4].T) @ B[4:8].T * 2.0
    np.testing.assert_allclose(y[:, 0:4], q, atol=1e-5)
    np.testing.assert_allclose(y[:, 8:12], v, atol=1e-5)
    exact_base = layer.base_forward(jt.array(x)).numpy()
    np.testing.assert_array_equal(y[:, 4:8], exact_base[:, 4:8])  # k: bit for bit the base
    d = layer.delta_weight().numpy()  # [in, out] layout
    assert not d[:, 4:8].any()


def test_ina_zero_inhibition_equals_lora():
    x = jt.array(_rand(4, 8))
    a = _layer("merged", lora_dropout=0.0)
    b = _layer("merged", lora_dropout=0.0, lora_inhibition=0.0)
    for name in ("weight", "bias", "lora_A"):
        _set(getattr(b, name), getattr(a, name).numpy())
    B = _rand(8, 2)
    _set(a.lora_B, B)
    _set(b.lora_B, B)
    np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), atol=1e-6)


def test_ina_refuses_to_merge():
    layer = _layer("merged", lora_inhibition=0.3)
    assert layer.merge_weights is False
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()
    layer.eval()  # eval keeps the exact non-linear path instead of merging
    assert not layer.merged
    with pytest.raises(ValueError, match="cannot merge"):
        _layer("merged", lora_inhibition=0.3, merge_weights=True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        _layer("merged", lora_inhibition=1.0)


@needs_torch
@pytest.mark.parametrize("inhibition", [0.1, 0.3, 0.9])
def test_ina_output_and_grads_match_pytorch(tmp_path, inhibition):
    layer = MergedLinear(8, 12, r=3, lora_alpha=6, enable_lora=(True, False, True), fan_in_fan_out=True,
                         lora_inhibition=inhibition)
    A, B = _rand(6, 8), _rand(8, 3)
    _set(layer.lora_A, A)
    _set(layer.lora_B, B)
    x, G = _rand(5, 8), _rand(5, 12)
    y = layer(jt.array(x)) - layer.base_forward(jt.array(x))
    loss = (y * jt.array(G)).sum()
    dA, dB = jt.grad(loss, [layer.lora_A, layer.lora_B])
    ref = torch_reference("ina", dict(x=x, A=A, B=B, G=G, groups=np.array(2), inhibition=np.array(inhibition),
                                      scaling=np.array(2.0), enable=np.array([1, 0, 1])), tmp_path)
    ref = np.load(ref / "ina.npz")
    np.testing.assert_allclose(y.numpy(), ref["y"], atol=1e-4)
    np.testing.assert_allclose(dA.numpy(), ref["dA"], atol=1e-4)
    np.testing.assert_allclose(dB.numpy(), ref["dB"], atol=1e-4)
    assert np.abs(ref["y"]).max() > 1e-2  # the path is really active


@pytest.mark.parametrize("ffo", [True, False])
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_ones_equal_base_and_merge_round_trip(ffo, feedforward):
    layer = IA3Linear(8, 12, enable_ia3=(False, True, True), feedforward=feedforward, fan_in_fan_out=ffo)
    x = _rand(4, 8)
    np.testing.assert_allclose(layer(jt.array(x)).numpy(), _base_out(layer, x), atol=1e-6)
    vec = 1 + _rand(*layer.ia3_l.shape)
    _set(layer.ia3_l, vec)
    y = layer(jt.array(x)).numpy()
    if feedforward:
        expected = _base_out(layer, x * vec)
    else:
        expected = _base_out(layer, x) * np.concatenate([np.ones(4, "float32"), vec])
    np.testing.assert_allclose(y, expected, atol=1e-5)
    w0 = layer.weight.numpy().copy()
    layer.eval()
    assert layer.merged
    np.testing.assert_allclose(layer(jt.array(x)).numpy(), y, atol=1e-5)
    layer.train()
    np.testing.assert_allclose(layer.weight.numpy(), w0, atol=1e-5)


def test_embedding_lora_merge_round_trip():
    emb = Embedding(10, 6, r=2, lora_alpha=4)
    _set(emb.lora_A, _rand(2, 10))
    ids = jt.array(np.array([[1, 2, 9]], dtype="int32"))
    y = emb(ids).numpy()
    expected = emb.weight.numpy()[[1, 2, 9]] + (emb.lora_A.numpy().T[[1, 2, 9]] @ emb.lora_B.numpy().T) * 2.0
    np.testing.assert_allclose(y[0], expected, atol=1e-5)
    emb.eval()
    np.testing.assert_allclose(emb(ids).numpy(), y, atol=1e-5)


class _Net(jt.Module):
    def __init__(self):
        self.proj = MergedLinear(8, 12, r=2, enable_lora=(True, False, True), fan_in_fan_out=True)
        self.other = Linear(12, 4)
        self.ia3 = IA3Linear(4, 4)


@pytest.mark.parametrize("bias,trainable", [
    ("none", {"proj.lora_A", "proj.lora_B", "ia3.ia3_l"}),
    ("lora_only", {"proj.lora_A", "proj.lora_B", "ia3.ia3_l", "proj.bias", "ia3.bias"}),
    ("all", {"proj.lora_A", "proj.lora_B", "ia3.ia3_l", "proj.bias", "ia3.bias", "other.bias"}),
])
def test_mark_only_adapter_trainable_and_state_dict(bias, trainable):
    net = _Net()
    mark_only_adapter_as_trainable(net, bias=bias)
    assert {n for n, p in net.named_parameters() if not p.is_stop_grad()} == trainable
    assert set(adapter_state_dict(net, bias=bias)) == trainable
    with pytest.raises(ValueError, match="bias must be one of"):
        mark_only_adapter_as_trainable(net, bias="some")


def test_eval_train_cycle_keeps_frozen_weights_frozen():
    """Jittor's own train() restores the grad state seen at the first eval(); ours the latest."""
    layer = _layer("merged")
    layer.eval()
    layer.train()
    layer.bias.stop_grad()  # frozen after the first cycle
    layer.eval()
    assert all(p.is_stop_grad() for p in layer.parameters())
    layer.train()
    assert layer.weight.is_stop_grad() and layer.bias.is_stop_grad()
    assert not layer.lora_A.is_stop_grad() and not layer.lora_B.is_stop_grad()
