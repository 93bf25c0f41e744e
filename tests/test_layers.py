"""Adapter layers against independent computations: PyPI loralib (LoRA semantics, merging, what its
helpers select), the InA reference formula in PyTorch and by hand, numpy float64 for (IA)³; and
exact unmerging over many eval()/train() cycles."""
import json

import numpy as np
import pytest

from conftest import needs_torch, torch_reference
from jt_lora import IA3Linear, Linear, MergedLinear, adapter_state_dict, mark_only_adapter_as_trainable
from jt_lora.backend import jt
from jt_lora.nn.lora import Embedding, InhibitionGate

rng = np.random.default_rng(0)


def _rand(*shape, scale=0.5):
    return rng.normal(0, scale, shape).astype("float32")


def _set(var, value):
    frozen = var.is_stop_grad()
    var.update(jt.array(value))
    if frozen:
        var.stop_grad()


def _layer(kind, **kw):
    if kind == "linear":
        return Linear(8, 6, r=2, lora_alpha=4, fan_in_fan_out=kw.pop("ffo", False), **kw)
    if kind == "merged":
        return MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=(True, False, True),
                            fan_in_fan_out=kw.pop("ffo", True), **kw)
    raise ValueError(kind)


# --- LoRA against PyPI loralib ----------------------------------------------------------------
@pytest.fixture(scope="module")
def loralib_ref(tmp_path_factory):
    """loralib's outputs for fixed weights; the jt_lora layers get the same weights."""
    pytest.importorskip("loralib")
    r = np.random.default_rng(7)
    f = lambda *s: r.normal(0, 0.5, s).astype("float32")  # noqa: E731
    inp = {"x": f(5, 8), "ids": np.array([[1, 2, 9, 0]], dtype=np.int64),
           "emb_weight": f(10, 6), "emb_A": f(2, 10), "emb_B": f(6, 2)}
    for ffo in (0, 1):
        inp[f"linear{ffo}_weight"] = f(8, 6) if ffo else f(6, 8)
        inp[f"linear{ffo}_bias"], inp[f"linear{ffo}_A"], inp[f"linear{ffo}_B"] = f(6), f(2, 8), f(6, 2)
        inp[f"merged{ffo}_weight"] = f(8, 12) if ffo else f(12, 8)
        inp[f"merged{ffo}_bias"], inp[f"merged{ffo}_A"], inp[f"merged{ffo}_B"] = f(12), f(4, 8), f(8, 2)
    out = torch_reference("loralib", inp, tmp_path_factory.mktemp("loralib"))
    return inp, dict(np.load(out / "loralib.npz")), json.loads((out / "loralib_select.json").read_text())


@needs_torch
@pytest.mark.parametrize("kind", ["linear", "merged"])
@pytest.mark.parametrize("ffo", [0, 1])
def test_lora_forward_and_merge_equal_loralib(loralib_ref, kind, ffo):
    inp, ref, _ = loralib_ref
    key = f"{kind}{ffo}"
    layer = _layer(kind, ffo=bool(ffo))
    for name, suffix in (("weight", "weight"), ("bias", "bias"), ("lora_A", "A"), ("lora_B", "B")):
        _set(getattr(layer, name), inp[f"{key}_{suffix}"])
    x = jt.array(inp["x"])
    np.testing.assert_allclose(layer(x).numpy(), ref[f"{key}_train"], rtol=1e-5, atol=1e-5)
    assert np.abs(ref[f"{key}_train"] - ref[f"{key}_eval"]).max() < 1e-4
    layer.eval()
    assert layer.merged
    np.testing.assert_allclose(layer.weight.numpy(), ref[f"{key}_merged_weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(x).numpy(), ref[f"{key}_eval"], rtol=1e-5, atol=1e-5)
    if kind == "merged":  # k (the disabled part) is untouched by the merge, in either layout
        w0 = inp[f"{key}_weight"]
        k_cols = (slice(None), slice(4, 8)) if ffo else (slice(4, 8), slice(None))
        np.testing.assert_array_equal(layer.weight.numpy()[k_cols], w0[k_cols])


@needs_torch
def test_embedding_equals_loralib(loralib_ref):
    inp, ref, _ = loralib_ref
    emb = Embedding(10, 6, r=2, lora_alpha=4)
    for name, key in (("weight", "emb_weight"), ("lora_A", "emb_A"), ("lora_B", "emb_B")):
        _set(getattr(emb, name), inp[key])
    ids = jt.array(inp["ids"].astype("int32"))
    np.testing.assert_allclose(emb(ids).numpy(), ref["emb_train"], rtol=1e-5, atol=1e-5)
    emb.eval()
    np.testing.assert_allclose(emb.weight.numpy(), ref["emb_merged_weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb(ids).numpy(), ref["emb_eval"], rtol=1e-5, atol=1e-5)


class _Net(jt.Module):
    """The net the loralib reference builds, with the same names."""

    def __init__(self):
        self.proj = MergedLinear(8, 12, r=2, enable_lora=(True, False, True), fan_in_fan_out=True)
        self.lin = Linear(12, 6, r=2)
        self.other = Linear(6, 4)
        self.emb = Embedding(10, 8, r=2)


@needs_torch
@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_trainable_and_state_dict_select_what_loralib_selects(loralib_ref, bias):
    _, _, select = loralib_ref
    net = _Net()
    mark_only_adapter_as_trainable(net, bias=bias)
    assert sorted(n for n, p in net.named_parameters() if not p.is_stop_grad()) == select[bias]["trainable"]
    assert sorted(adapter_state_dict(net, bias=bias)) == select[bias]["state_dict"]


def test_bad_bias_mode_is_refused():
    with pytest.raises(ValueError, match="bias must be one of"):
        mark_only_adapter_as_trainable(_Net(), bias="some")


def test_ia3_vectors_are_adapter_parameters():
    class Net(jt.Module):
        def __init__(self):
            self.ia3 = IA3Linear(4, 4)
            self.other = Linear(4, 4)
    net = Net()
    mark_only_adapter_as_trainable(net, bias="lora_only")
    assert {n for n, p in net.named_parameters() if not p.is_stop_grad()} == {"ia3.ia3_l", "ia3.bias"}


def test_lora_init_is_loralibs():
    """A kaiming-uniform (bound 1/sqrt(in)), B zero, scaling alpha/r, base frozen."""
    layer = _layer("merged")
    a = layer.lora_A.numpy()
    assert np.abs(a).max() <= 1 / np.sqrt(8) and np.abs(a).max() > 0.5 / np.sqrt(8)
    assert not layer.lora_B.numpy().any()
    assert layer.scaling == 2.0
    assert layer.weight.is_stop_grad() and not layer.lora_A.is_stop_grad()


# --- InA against the reference formula -----------------------------------------------------------
def test_ina_gate_hand_computed_values():
    """h = [2, -1, 0.5], inhibition 0.5: max 2, h - 1 = [1, -2, -0.5], leaky_relu slope 0.01."""
    h = jt.array(np.array([[2.0, -1.0, 0.5]], dtype="float32"))
    np.testing.assert_allclose(InhibitionGate(0.5)(h, 1).numpy(), [[1.0, -0.02, -0.005]], rtol=1e-6)
    # two groups: each takes its own max ([2, -1] -> max 2; [0.5, 3] -> max 3)
    h2 = jt.array(np.array([[2.0, -1.0, 0.5, 3.0]], dtype="float32"))
    np.testing.assert_allclose(InhibitionGate(0.5)(h2, 2).numpy(), [[1.0, -0.02, -0.01, 1.5]], rtol=1e-6)
    assert InhibitionGate(0.3).negative_slope == 0.01
    with pytest.raises(ValueError, match="slope"):
        InhibitionGate(0.3, 1.0)


@needs_torch
@pytest.mark.parametrize("inhibition", [0.0, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("kind", ["whole", "grouped"])
def test_ina_output_and_grads_equal_the_reference(tmp_path, inhibition, kind):
    """``whole``: one module on the full output (the reference's c_attn). ``grouped``: q and v parts
    (enable_lora), which equals the reference applied to q and v as separate modules."""
    if kind == "whole":
        layer = Linear(8, 12, r=3, lora_alpha=6, fan_in_fan_out=True, lora_inhibition=inhibition)
        A, B, rows = _rand(3, 8), _rand(12, 3), [3]
    else:
        layer = MergedLinear(8, 12, r=3, lora_alpha=6, enable_lora=(True, False, True), fan_in_fan_out=True,
                             lora_inhibition=inhibition)
        A, B, rows = _rand(6, 8), _rand(8, 3), [3, 0, 3]
    _set(layer.lora_A, A)
    _set(layer.lora_B, B)
    x, G = _rand(5, 8), _rand(5, 12)
    y = layer(jt.array(x)) - layer.base_forward(jt.array(x))
    dA, dB = jt.grad((y * jt.array(G)).sum(), [layer.lora_A, layer.lora_B])
    ref = np.load(torch_reference("ina", dict(x=x, A=A, B=B, G=G, inhibition=np.array(inhibition),
                                              scaling=np.array(2.0), rank_rows=np.array(rows)), tmp_path) / "ina.npz")
    np.testing.assert_allclose(y.numpy(), ref["y"], atol=1e-5)
    np.testing.assert_allclose(dA.numpy(), ref["dA"], atol=1e-4)
    np.testing.assert_allclose(dB.numpy(), ref["dB"], atol=1e-4)
    assert np.abs(ref["y"]).max() > 1e-2  # the path is really active


def test_ina_slope_changes_the_output():
    """The slope is used: 0.1 (jt_lora's legacy value) gives other numbers than 0.01."""
    x = jt.array(_rand(6, 8))
    outs = []
    for slope in (0.01, 0.1):
        layer = _layer("merged", lora_inhibition=0.5, lora_inhibition_slope=slope)
        _set(layer.lora_A, np.linspace(-1, 1, 32, dtype="float32").reshape(4, 8))
        _set(layer.lora_B, np.ones((8, 2), dtype="float32"))
        outs.append((layer(x) - layer.base_forward(x)).numpy())
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


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


# --- (IA)³ against numpy float64 ---------------------------------------------------------------
@pytest.mark.parametrize("ffo", [True, False])
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_forward_and_merge_equal_float64(ffo, feedforward):
    layer = IA3Linear(8, 12, enable_ia3=(False, True, True), feedforward=feedforward, fan_in_fan_out=ffo)
    _set(layer.bias, _rand(12))
    w = layer.weight.numpy().astype(np.float64)
    w = w if ffo else w.T  # [in, out]
    b = layer.bias.numpy().astype(np.float64)
    x = _rand(4, 8)
    np.testing.assert_allclose(layer(jt.array(x)).numpy(), x @ w + b, rtol=1e-5, atol=1e-5)  # ones: the base
    vec = 1 + _rand(*layer.ia3_l.shape)
    _set(layer.ia3_l, vec)
    if feedforward:
        expected = (x * vec) @ w + b
    else:
        expected = (x @ w + b) * np.concatenate([np.ones(4), vec])
    np.testing.assert_allclose(layer(jt.array(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    assert layer.merged
    np.testing.assert_allclose(layer(jt.array(x)).numpy(), expected, rtol=1e-5, atol=1e-5)


# --- exact unmerge -------------------------------------------------------------------------------
def _cycle_layers():
    lora = _layer("merged", lora_dropout=0.0)
    _set(lora.lora_B, _rand(8, 2))
    lin = _layer("linear")
    _set(lin.lora_B, _rand(6, 2))
    emb = Embedding(10, 6, r=2, lora_alpha=4)
    _set(emb.lora_A, _rand(2, 10))
    ina = _layer("merged", lora_inhibition=0.3)
    _set(ina.lora_B, _rand(8, 2))
    ia3 = IA3Linear(8, 12, enable_ia3=(False, True, True), fan_in_fan_out=True)
    _set(ia3.ia3_l, 1 + _rand(8, scale=0.3))
    _set(ia3.bias, _rand(12))
    ia3_ff = IA3Linear(8, 12, feedforward=True, fan_in_fan_out=False)
    _set(ia3_ff.ia3_l, 1 + _rand(8, scale=0.3))
    return {"lora": lora, "lora_linear": lin, "lora_embedding": emb, "ina": ina, "ia3": ia3, "ia3_ff": ia3_ff}


@pytest.mark.parametrize("name", ["lora", "lora_linear", "lora_embedding", "ina", "ia3", "ia3_ff"])
def test_100_eval_train_cycles_leave_base_weights_bit_identical(name):
    layer = _cycle_layers()[name]
    frozen = {n: p.numpy().copy() for n, p in layer.named_parameters() if n in ("weight", "bias")}
    layer.eval()
    if name != "ina":  # merging really changes the weight, so restoring is what keeps it exact
        assert layer.merged and np.abs(layer.weight.numpy() - frozen["weight"]).max() > 1e-3
    for _ in range(100):
        layer.train()
        layer.eval()
    layer.train()
    assert not layer.merged
    for n, value in frozen.items():
        np.testing.assert_array_equal(getattr(layer, n).numpy(), value, err_msg=n)
    assert getattr(layer, "_unmerged", None) is None  # the eval-mode copy is released


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
