"""jt_lora.peft's API, method by method, each checked on numbers (no torch needed).

A tiny GPT-2 with random base weights; adapters get random non-zero tensors
so that every check compares outputs that really differ from the base model.
"""
import json
import re

import numpy as np
import pytest

from conftest import TINY
from jt_lora import GPT2Config, GPT2LMModel
from jt_lora.backend import jt, nn
from jt_lora.nn.lora import Linear
from jt_lora.peft import (AdapterFileError, IA3Config, LoraConfig, LoraLayer, ModulesToSaveWrapper,
                          PeftModel, get_peft_model)
from jt_lora.peft.config import config_from_dict
from jt_lora.peft.layers import TunerLayer

IDS = np.array([[1, 5, 7, 9, 11, 3, 2, 50], [4, 4, 8, 15, 16, 23, 42, 96]])
N = TINY["n_embd"]


def _base(seed=0):
    rng = np.random.default_rng(seed)
    model = GPT2LMModel(GPT2Config(**TINY, adapter="none"))
    for _, p in model.named_parameters():
        p.update(jt.array(rng.normal(0, 0.2, p.shape).astype("float32")))
    return model


def _logits(model, ids=IDS):
    return model(jt.array(ids.astype("int32")))[0].numpy()


def _randomize(model, adapter=None, seed=1):
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if (".lora_" in name or ".ia3_l." in name) and (adapter is None or f".{adapter}" in name):
            noise = rng.normal(0, 0.3, p.shape).astype("float32")
            p.update(jt.array(noise + 1.0 if "ia3_l" in name else noise))
    return model


def _snapshot(model):
    return {n: p.numpy().copy() for n, p in model.named_parameters()}


def _layers(model, cls=TunerLayer):
    return [(k, m) for k, m in model.named_modules() if isinstance(m, cls)]


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if not p.is_stop_grad())


@pytest.fixture
def base():
    model = _base()
    return model, _logits(model)


# --- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("make,error", [
    (lambda: LoraConfig(r=0), "r must be a positive integer"),
    (lambda: LoraConfig(r=-2), "r must be a positive integer"),
    (lambda: LoraConfig(lora_inhibition=1.0), r"lora_inhibition must be in \[0, 1\)"),
    (lambda: LoraConfig(lora_inhibition=-0.1), r"lora_inhibition must be in \[0, 1\)"),
    (lambda: LoraConfig(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (lambda: LoraConfig(lora_alpha=0), "lora_alpha must be a positive number"),
    (lambda: LoraConfig(bias="some"), "bias must be"),
    (lambda: LoraConfig(enable_lora=(False, False, False)), "at least one True"),
    (lambda: LoraConfig(init_lora_weights="pissa"), "init_lora_weights"),
    (lambda: LoraConfig(rank_pattern={"c_fc": 0}), r"rank_pattern\['c_fc'\]"),
    (lambda: LoraConfig(modules_to_save=["wte"]), "tied to it"),
    (lambda: IA3Config(target_modules=["c_attn"], feedforward_modules=["mlp.c_proj"]),
     r"feedforward_modules must be a subset of target_modules; not targeted: \['mlp.c_proj'\]"),
    (lambda: IA3Config(task_type="TRANSLATE"), "task_type"),
    (lambda: config_from_dict({"peft_type": "LORA", "use_dora": True}), "use_dora"),
    (lambda: config_from_dict({"peft_type": "PREFIX_TUNING"}), "PREFIX_TUNING"),
])
def test_config_validation_errors(make, error):
    with pytest.raises((ValueError, TypeError), match=error):
        make()


def test_config_json_round_trip_and_unknown_fields():
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["c_fc", "c_attn", "c_fc"], lora_inhibition=0.2)
    assert config.target_modules == ("c_attn", "c_fc")  # lists are sets, as in PEFT
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.warns(UserWarning, match="future_field"):
        loaded = config_from_dict({"peft_type": "IA3", "future_field": 1, "peft_version": "9.9", "use_dora": False})
    assert isinstance(loaded, IA3Config)


def test_unknown_architecture_and_nothing_matched(base):
    class Tiny(jt.Module):
        def __init__(self):
            self.proj = Linear(4, 4)

        def execute(self, x):
            return self.proj(x)

    with pytest.raises(ValueError, match="target_modules must be given for Tiny"):
        get_peft_model(Tiny(), LoraConfig())
    model, _ = base
    with pytest.raises(ValueError, match=r"matched no module.*'attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not dense layers"):
        get_peft_model(model, LoraConfig(target_modules=r".*ln_1"))
    with pytest.raises(ValueError, match="modules_to_save: no module named 'score'"):
        get_peft_model(model, LoraConfig(modules_to_save=["score"]))
    assert not _layers(model) and not _layers(model, ModulesToSaveWrapper)  # failed calls wrapped nothing
    with pytest.raises(ValueError, match=r"from_pretrained\(path\) gives the plain model"):
        get_peft_model(GPT2LMModel(GPT2Config(**TINY, adapter="lora")), LoraConfig())


def test_any_model_with_target_modules_and_jittor_linear():
    class Tiny(jt.Module):
        def __init__(self):
            self.proj = nn.Linear(6, 5)  # Jittor's own layer: weight [out, in]

        def execute(self, x):
            return self.proj(x)

    tiny = Tiny()
    w, b = tiny.proj.weight.numpy(), tiny.proj.bias.numpy()
    peft = get_peft_model(tiny, LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False))
    layer = tiny.proj
    assert isinstance(layer, LoraLayer) and not layer.fan_in_fan_out
    x = np.random.default_rng(5).normal(0, 1, (4, 6)).astype("float32")
    delta = layer.get_delta_weight("default").numpy()  # [out, in]
    a, bb = layer.lora_A["default"].weight.numpy(), layer.lora_B["default"].weight.numpy()
    np.testing.assert_allclose(delta, 2.0 * bb @ a, atol=1e-6)
    np.testing.assert_allclose(peft(jt.array(x)).numpy(), x @ (w + delta).T + b, atol=1e-5)


def _targets(config):
    model = get_peft_model(_base(), config)
    return sorted(k[len("base_model.model."):] for k, _ in _layers(model))


H = [f"transformer.h.{i}" for i in range(TINY["n_layer"])]


@pytest.mark.parametrize("config,expected", [
    (LoraConfig(), [f"{h}.attn.c_attn" for h in H]),  # GPT-2 default
    (LoraConfig(target_modules=["c_proj"]), sorted(f"{h}.{m}.c_proj" for h in H for m in ("attn", "mlp"))),
    (LoraConfig(target_modules=["mlp.c_proj"]), [f"{h}.mlp.c_proj" for h in H]),  # suffix at a dot
    (LoraConfig(target_modules=["transformer.h.1.mlp.c_fc"]), ["transformer.h.1.mlp.c_fc"]),  # exact name
    (LoraConfig(target_modules=r".*\.1\..*c_proj"), ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
    (LoraConfig(target_modules="c_attn"), []),  # a string is a regex full match: matches nothing here
    (LoraConfig(target_modules="all-linear", exclude_modules=["c_fc", "transformer.h.0.attn.c_proj"]),
     sorted([f"{h}.attn.c_attn" for h in H] + [f"{h}.mlp.c_proj" for h in H] + ["transformer.h.1.attn.c_proj"])),
    (LoraConfig(target_modules="all-linear"), sorted(f"{h}.{m}" for h in H for m in
                                                     ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))),
    (IA3Config(), sorted([f"{h}.attn.c_attn" for h in H] + [f"{h}.mlp.c_proj" for h in H])),
])
def test_target_module_matching(config, expected):
    if not expected:
        with pytest.raises(ValueError, match="matched no module"):
            _targets(config)
    else:
        assert _targets(config) == expected


def test_gpt2_defaults_lora_qv_grouped_and_ia3_feedforward():
    lora = get_peft_model(_base(), LoraConfig(r=3))
    layer = lora.base_model.model.transformer.h[0].attn.c_attn
    assert layer.enable_lora["default"] == (True, False, True)
    assert layer.lora_A["default"].weight.shape == [6, N] and layer.lora_B["default"].weight.shape == [2 * N, 3]
    assert lora.peft_config["default"].target_modules == ("c_attn",)
    ia3 = get_peft_model(_base(), IA3Config())
    h0 = ia3.base_model.model.transformer.h[0]
    assert not h0.attn.c_attn.is_feedforward and h0.attn.c_attn.ia3_l["default"].shape == [3 * N, 1]
    assert h0.mlp.c_proj.is_feedforward and h0.mlp.c_proj.ia3_l["default"].shape == [1, 4 * N]
    assert ia3.peft_config["default"].feedforward_modules == ("mlp.c_proj",)


# --- layers: forward, delta, merge ------------------------------------------------------------
@pytest.mark.parametrize("config", [LoraConfig(r=2, lora_alpha=4), IA3Config()], ids=["lora", "ia3"])
def test_init_equals_base(base, config):
    model, ref = base
    np.testing.assert_allclose(_logits(get_peft_model(model, config)), ref, atol=1e-6)


def _layer_io(layer, x):
    return layer(jt.array(x)).numpy(), layer.base_layer(jt.array(x)).numpy()


@pytest.mark.parametrize("enable", [None, (True, False, True), (False, True, False)])
def test_lora_layer_forward_equals_delta_weight_and_leaves_disabled_parts(enable):
    model = _randomize(get_peft_model(_base(), LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn"],
                                                          enable_lora=enable)))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    x = np.random.default_rng(3).normal(0, 1, (3, 5, N)).astype("float32")
    y, y0 = _layer_io(layer, x)
    delta = layer.get_delta_weight("default").numpy()  # [in, out] (Conv1D layout)
    np.testing.assert_allclose(y, y0 + x @ delta, atol=1e-5)
    for part, on in enumerate(enable or (True, True, True)):
        same = np.abs(y - y0)[..., part * N:(part + 1) * N].max()
        assert (same > 1e-3) if on else (same == 0.0)


@pytest.mark.parametrize("grouped", [True, False])
def test_ina_forward_is_the_reference_formula_and_refuses_to_merge(grouped):
    """The InA reference per module: h = A·x, m = max over the rank, B·leaky_relu(h - inhibition·m, 0.01).
    Grouped (q/v parts, jt_lora's default on GPT-2): each part is its own module; ``c_attn`` without
    enable_lora: one module over the whole rank, as the reference adapts GPT-2."""
    config = LoraConfig(r=2, lora_alpha=6, lora_inhibition=0.4)
    if not grouped:
        config = LoraConfig(r=4, lora_alpha=12, lora_inhibition=0.4, target_modules=["c_attn"])
    model = _randomize(get_peft_model(_base(), config))
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    x = np.random.default_rng(4).normal(0, 1, (2, 3, N)).astype("float32").astype(np.float64)
    y, y0 = _layer_io(layer, x.astype("float32"))
    a, b = layer.lora_A["default"].weight.numpy(), layer.lora_B["default"].weight.numpy()

    def module(a, b):
        h = x @ a.T
        h = h - 0.4 * h.max(-1, keepdims=True)
        return np.where(h > 0, h, 0.01 * h) @ b.T * 3.0

    if grouped:
        q, v = module(a[:2], b[:N]), module(a[2:], b[N:])
        want = np.concatenate([q, np.zeros_like(q), v], -1)
    else:
        want = module(a, b)
    np.testing.assert_allclose(y - y0, want, atol=1e-5)
    with pytest.raises(ValueError, match="InA.*cannot be merged"):
        model.merge_and_unload()
    assert _layers(model)  # nothing changed


@pytest.mark.parametrize("config", [
    LoraConfig(r=2, lora_alpha=4),
    LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    IA3Config(),
    IA3Config(target_modules=["c_fc", "attn.c_proj"], feedforward_modules=["attn.c_proj"]),
], ids=["lora_qv", "lora_all_rslora", "ia3", "ia3_custom"])
def test_merge_and_unload_equals_unmerged_forward(base, config):
    model, ref = base
    peft = _randomize(get_peft_model(model, config))
    unmerged = _logits(peft)
    assert np.abs(unmerged - ref).max() > 1e-2
    before = _snapshot(peft)
    peft.merge_adapter()
    np.testing.assert_allclose(_logits(peft), unmerged, atol=1e-5)
    peft.unmerge_adapter()  # restores the weights bit for bit
    assert all(np.array_equal(v, _snapshot(peft)[k]) for k, v in before.items())
    merged = peft.merge_and_unload()
    assert merged is model and not _layers(merged)
    assert isinstance(merged.transformer.h[0].attn.c_attn, Linear)
    np.testing.assert_allclose(_logits(merged), unmerged, atol=1e-5)


def test_merge_and_unload_selected_adapters(base):
    model, _ = base
    peft = _randomize(get_peft_model(model, LoraConfig(r=2, lora_alpha=4)))
    only_default = _logits(peft)
    peft.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"]))
    _randomize(peft, "other", seed=5)
    merged = peft.merge_and_unload(adapter_names=["default"])
    np.testing.assert_allclose(_logits(merged), only_default, atol=1e-5)


def test_safe_merge_rejects_nan_and_leaves_model_unchanged(base):
    model, _ = base
    peft = _randomize(get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")))
    layer = peft.base_model.model.transformer.h[1].mlp.c_fc
    b = layer.lora_B["default"].weight.numpy()
    b[3, 1] = np.nan
    layer.lora_B["default"].weight.update(jt.array(b))
    before, n_layers = _snapshot(peft), len(_layers(peft))
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc gives NaN/inf.*Nothing was merged"):
        peft.merge_and_unload(safe_merge=True)
    after = _snapshot(peft)
    assert len(_layers(peft)) == n_layers and not any(l.merged for _, l in _layers(peft))
    assert all(np.array_equal(v, after[k], equal_nan=True) for k, v in before.items())


# --- adapters: add, set, delete, disable ------------------------------------------------------
def test_set_adapter_switches_output_and_trainability(base):
    model, ref = base
    peft = _randomize(get_peft_model(model, LoraConfig(r=2, lora_alpha=4)))
    out_default = _logits(peft)
    peft.add_adapter("other", LoraConfig(r=3, lora_alpha=3, target_modules=["c_attn", "c_fc"]))
    # A new adapter is inactive and frozen (PEFT's rule): the output does not change.
    assert peft.active_adapters == ["default"] and all(".other." not in n for n in _trainable(peft))
    _randomize(peft, "other", seed=2)
    np.testing.assert_allclose(_logits(peft), out_default, atol=1e-6)
    peft.set_adapter("other")
    out_other = _logits(peft)
    assert np.abs(out_other - out_default).max() > 1e-2
    assert _trainable(peft) and all(".other." in n for n in _trainable(peft))
    # Several active adapters: their updates add up on every layer.
    peft.set_adapter(["default", "other"])
    assert peft.active_adapters == ["default", "other"]
    assert {n.split(".")[-2] for n in _trainable(peft)} == {"default", "other"}
    layer = peft.base_model.model.transformer.h[0].attn.c_attn
    x = np.random.default_rng(6).normal(0, 1, (2, 4, N)).astype("float32")
    y, y0 = _layer_io(layer, x)
    both = x @ (layer.get_delta_weight("default").numpy() + layer.get_delta_weight("other").numpy())
    np.testing.assert_allclose(y - y0, both, atol=1e-5)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['nope'\] not found; available: \['default', 'other'\]"):
        peft.set_adapter("nope")
    with pytest.raises(ValueError, match="cannot add a IA3 adapter"):
        peft.add_adapter("ia3", IA3Config())


def test_ia3_active_adapters_multiply(base):
    model, _ = base
    peft = _randomize(get_peft_model(model, IA3Config()))
    peft.add_adapter("b", IA3Config(init_ia3_weights=False))
    peft.set_adapter(["default", "b"])
    layer = peft.base_model.model.transformer.h[0].attn.c_attn
    x = np.random.default_rng(7).normal(0, 1, (2, 3, N)).astype("float32")
    y, y0 = _layer_io(layer, x)
    vec = layer.ia3_l["default"].numpy()[:, 0] * layer.ia3_l["b"].numpy()[:, 0]
    np.testing.assert_allclose(y, y0 * vec, atol=1e-5)


def test_delete_adapter(base):
    model, ref = base
    peft = _randomize(get_peft_model(model, LoraConfig(r=2, lora_alpha=4)))
    out_default = _logits(peft)
    peft.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    _randomize(peft, "other", seed=3)
    peft.set_adapter(["default", "other"])
    peft.delete_adapter("other")
    assert list(peft.peft_config) == ["default"] and peft.active_adapters == ["default"]
    assert isinstance(model.transformer.h[0].mlp.c_fc, Linear)  # c_fc had only "other": unwrapped
    np.testing.assert_allclose(_logits(peft), out_default, atol=1e-6)
    with pytest.raises(ValueError, match="not found"):
        peft.delete_adapter("other")
    peft.delete_adapter("default")
    assert not _layers(model) and peft.active_adapters == []
    np.testing.assert_allclose(_logits(peft), ref, atol=1e-6)


def test_disable_adapter_gives_base_logits(base):
    model, ref = base
    peft = _randomize(get_peft_model(model, IA3Config()))
    adapted = _logits(peft)
    with peft.disable_adapter():
        np.testing.assert_allclose(_logits(peft), ref, atol=1e-6)
    np.testing.assert_allclose(_logits(peft), adapted, atol=1e-6)
    peft.merge_adapter()
    peft.disable_adapter_layers()  # unmerges first, as PEFT
    assert not any(l.merged for _, l in _layers(peft))
    np.testing.assert_allclose(_logits(peft), ref, atol=1e-6)
    peft.enable_adapter_layers()
    np.testing.assert_allclose(_logits(peft), adapted, atol=1e-5)


def test_unload_gives_back_the_base_bit_identical(base):
    model, ref = base
    before = _snapshot(model)
    modules = {k: m for k, m in model.named_modules()}
    peft = _randomize(get_peft_model(model, IA3Config()))
    peft.add_adapter("more", IA3Config(target_modules=["c_fc"]))
    peft.merge_adapter()
    assert np.abs(_logits(peft) - ref).max() > 1e-2
    unloaded = peft.unload()
    assert unloaded is model and not _layers(model)
    assert {k: m for k, m in model.named_modules()} == modules  # the very same module objects
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert not any(p.is_stop_grad() for p in model.parameters())  # trainability as before wrapping
    np.testing.assert_array_equal(_logits(model), ref)


# --- combining --------------------------------------------------------------------------------
def test_add_weighted_adapter_ia3_is_the_weighted_sum_of_vectors(base):
    model, _ = base
    peft = _randomize(get_peft_model(model, IA3Config()))
    peft.add_adapter("b", IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                                    init_ia3_weights=False))
    peft.add_weighted_adapter(["default", "b"], [0.6, -0.3], "mix")
    h0 = peft.base_model.model.transformer.h[0]
    attn = h0.attn.c_attn
    expected = 0.6 * attn.ia3_l["default"].numpy() - 0.3 * attn.ia3_l["b"].numpy()
    np.testing.assert_allclose(attn.ia3_l["mix"].numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(h0.mlp.c_proj.ia3_l["mix"].numpy(), 0.6 * h0.mlp.c_proj.ia3_l["default"].numpy(),
                               atol=1e-7)  # only "default" adapts mlp.c_proj
    np.testing.assert_allclose(h0.mlp.c_fc.ia3_l["mix"].numpy(), -0.3 * h0.mlp.c_fc.ia3_l["b"].numpy(), atol=1e-7)
    assert h0.mlp.c_fc.is_feedforward
    assert peft.active_adapters == ["default"] and all(".mix" not in n for n in _trainable(peft))


def test_add_weighted_adapter_lora_cat_linear_svd(base):
    model, _ = base
    peft = _randomize(get_peft_model(model, LoraConfig(r=2, lora_alpha=4)))  # grouped q/v, rank 2 each
    peft.add_adapter("b", LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"]))
    peft.add_adapter("c", LoraConfig(r=3, lora_alpha=2, target_modules=["c_attn"]))
    _randomize(peft, "b", seed=8)
    _randomize(peft, "c", seed=9)
    layer = peft.base_model.model.transformer.h[1].attn.c_attn
    delta = {n: layer.get_delta_weight(n).numpy() for n in ("default", "b", "c")}
    # cat: exact weighted sum of updates, rank = sum of ranks (grouped 2+2, plain 3), scaling 1
    peft.add_weighted_adapter(["default", "b"], [0.7, -0.4], "cat", combination_type="cat")
    np.testing.assert_allclose(layer.get_delta_weight("cat").numpy(), 0.7 * delta["default"] - 0.4 * delta["b"],
                               atol=1e-6)
    assert layer.r["cat"] == 7 and layer.scaling["cat"] == 1.0
    # linear (equal ranks): PEFT's formula on A and B, hand-computed
    peft.add_weighted_adapter(["b", "c"], [0.5, 2.0], "lin", combination_type="linear")
    sb, sc = np.sqrt(0.5 * 2.0), np.sqrt(2.0 * 2 / 3)
    a = sb * layer.lora_A["b"].weight.numpy() + sc * layer.lora_A["c"].weight.numpy()
    b = sb * layer.lora_B["b"].weight.numpy() + sc * layer.lora_B["c"].weight.numpy()
    np.testing.assert_allclose(layer.lora_A["lin"].weight.numpy(), a, atol=1e-6)
    np.testing.assert_allclose(layer.lora_B["lin"].weight.numpy(), b, atol=1e-6)
    with pytest.raises(ValueError, match="same rank and layout"):
        peft.add_weighted_adapter(["default", "b"], [1, 1], "bad", combination_type="linear")
    # svd at full rank reproduces the exact sum
    peft.add_weighted_adapter(["default", "b"], [0.7, -0.4], "svd", combination_type="svd", svd_rank=7)
    np.testing.assert_allclose(layer.get_delta_weight("svd").numpy(), 0.7 * delta["default"] - 0.4 * delta["b"],
                               atol=1e-5)
    ina = LoraConfig(r=2, lora_alpha=4, lora_inhibition=0.2)
    peft.add_adapter("ina", ina)
    with pytest.raises(ValueError, match="cannot combine InA"):
        peft.add_weighted_adapter(["default", "ina"], [1, 1], "x", combination_type="cat")


# --- modules to save, bias ------------------------------------------------------------------------
def test_modules_to_save_and_bias_trainability(base):
    model, ref = base
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, modules_to_save=["ln_f"], bias="lora_only"))
    wrapper = model.transformer.ln_f
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert _trainable(peft) == sorted(
        [f"base_model.model.transformer.h.{i}.attn.c_attn.{k}" for i in range(2)
         for k in ("base_layer.bias", "lora_A.default.weight", "lora_B.default.weight")]
        + ["base_model.model.transformer.ln_f.modules_to_save.default.bias",
           "base_model.model.transformer.ln_f.modules_to_save.default.weight"])
    copy = wrapper.modules_to_save["default"]
    copy.weight.update(copy.weight * 1.5)
    changed = _logits(peft)
    assert np.abs(changed - ref).max() > 1e-2
    with peft.disable_adapter():
        np.testing.assert_allclose(_logits(peft), ref, atol=1e-6)
    assert np.array_equal(wrapper.original_module.weight.numpy(), _base().transformer.ln_f.weight.numpy())
    merged = peft.merge_and_unload()  # the trained copy replaces the original, as PEFT
    np.testing.assert_allclose(_logits(merged), changed, atol=1e-6)


def test_print_trainable_parameters(base, capsys):
    model, _ = base
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4))  # q, v: A [4, 16], B [32, 2] per layer
    total_base = sum(int(p.numel()) for p in _base().parameters())
    trainable = TINY["n_layer"] * (4 * N + 2 * N * 2)
    assert peft.get_nb_trainable_parameters() == (trainable, total_base + trainable)
    peft.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total_base + trainable:,d} || "
        f"trainable%: {100 * trainable / (total_base + trainable):.4f}")


def test_training_step_moves_only_the_active_adapter(base):
    model, _ = base
    peft = _randomize(get_peft_model(model, LoraConfig(r=2, lora_alpha=4)))
    peft.add_adapter("idle", LoraConfig(r=2, lora_alpha=4))
    before = _snapshot(peft)
    params = [p for p in peft.parameters() if not p.is_stop_grad()]
    opt = nn.SGD(params, lr=0.5)
    ids = jt.array(IDS.astype("int32"))
    opt.step(peft(ids, lm_labels=ids)[1])
    after = _snapshot(peft)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == sorted(n for n in before if ".default." in n)
    peft.eval()  # Jittor's eval freezes everything; train() gives back exactly the trainable set
    peft.train()
    assert [p for p in peft.parameters() if not p.is_stop_grad()] == params


# --- forward and generation pass-through ----------------------------------------------------------
def _greedy(model, prompt, steps=5):
    """Greedy decoding with the KV cache, through whatever the model's call does."""
    ids, past, out = jt.array(np.array([prompt], "int32")), None, []
    for _ in range(steps):
        logits, past = model(ids, past=past)
        nxt = int(logits.numpy()[0, -1].argmax())
        out.append(nxt)
        ids = jt.array(np.array([[nxt]], "int32"))
    return out


def test_forward_with_cache_and_generation_pass_through(base):
    model, _ = base
    peft = _randomize(get_peft_model(model, LoraConfig(r=2, lora_alpha=4)))
    full = _logits(peft)
    ids = jt.array(IDS.astype("int32"))
    first, past = peft(ids[:, :5])
    step, _ = peft(ids[:, 5:], past=past)
    np.testing.assert_allclose(np.concatenate([first.numpy(), step.numpy()], 1), full, atol=1e-5)
    assert peft.config is model.config and peft.transformer is model.transformer  # attributes pass through
    peft.eval()
    greedy = _greedy(peft, [1, 5, 7])
    with peft.disable_adapter():
        assert _greedy(peft, [1, 5, 7]) == _greedy(_base(), [1, 5, 7])
    try:
        from jt_lora.generation.beam import BeamSettings, beam_search_batch
    except ImportError:
        beam = None
    else:
        settings = BeamSettings(beam=3, max_new_tokens=5, eos_token_ids=())
        beam = beam_search_batch(peft, [[1, 5, 7], [4, 4, 8, 15]], settings)[0]
    merged = peft.merge_and_unload()
    assert _greedy(merged, [1, 5, 7]) == greedy
    if beam is not None:  # the beam search takes a PeftModel as it takes a GPT2LMModel
        assert beam_search_batch(merged, [[1, 5, 7], [4, 4, 8, 15]], settings)[0] == beam


# --- files ----------------------------------------------------------------------------------------
def test_save_load_several_adapters(base, tmp_path):
    model, _ = base
    peft = _randomize(get_peft_model(model, LoraConfig(r=2, lora_alpha=4)))
    peft.add_adapter("other", LoraConfig(r=3, lora_alpha=3, target_modules=["c_fc"]))
    _randomize(peft, "other", seed=4)
    peft.set_adapter(["default", "other"])
    both = _logits(peft)
    peft.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    assert not list(tmp_path.rglob("*.tmp"))
    loaded = PeftModel.from_pretrained(_base(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert loaded.active_adapters == ["default"]
    loaded.set_adapter(["default", "other"])
    np.testing.assert_allclose(_logits(loaded), both, atol=1e-6)
    assert len(_trainable(PeftModel.from_pretrained(_base(), tmp_path, is_trainable=True))) == 4
    assert not _trainable(PeftModel.from_pretrained(_base(), tmp_path))  # for inference: frozen (as PEFT)


@pytest.fixture
def saved(tmp_path):
    peft = _randomize(get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4)))
    peft.save_pretrained(tmp_path / "good")
    return tmp_path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_weights(path, edit):
    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(str(path / "adapter_model.safetensors"), "np") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(state)
    save_file(state, str(path / "adapter_model.safetensors"), metadata=meta)


KEY = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"


@pytest.mark.parametrize("break_it,error", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 20), "unreadable safetensors"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "invalid JSON"),
    (lambda d: _edit_weights(d, lambda s: s.pop(KEY)), re.escape(f"missing keys ['{KEY[17:]}']")),
    (lambda d: _edit_weights(d, lambda s: s.update({KEY: np.ones((48, 5), "float32")})),
     re.escape(f"{KEY[17:]}: file [48, 5] vs model [48, 4]")),
    (lambda d: _edit_weights(d, lambda s: s.update({KEY: np.ones((48, 4), "float32")})),
     r"block \(part 0, group 1\) must be zero"),
    (lambda d: _edit_weights(d, lambda s: s.update({"base_model.model.extra.weight": np.ones(2, "float32")})),
     r"unexpected keys \['extra.weight'\]"),
], ids=["truncated", "bad_json", "missing_key", "wrong_shape", "zero_block", "unexpected_key"])
def test_bad_adapter_files_name_the_problem_and_leave_the_model_unchanged(saved, break_it, error):
    bad = _copy(saved / "good", saved / "bad")
    break_it(bad)
    model = _base()
    before, grads = _snapshot(model), [p.is_stop_grad() for p in model.parameters()]
    with pytest.raises(ValueError, match=error):
        PeftModel.from_pretrained(model, bad)
    assert not _layers(model) and [p.is_stop_grad() for p in model.parameters()] == grads
    assert all(np.array_equal(v, _snapshot(model)[k]) for k, v in before.items())
    # Into an existing PeftModel: the failed adapter leaves no trace.
    peft = PeftModel.from_pretrained(_base(), saved / "good", is_trainable=True)
    out, names, trainable = _logits(peft), [k for k, _ in peft.named_parameters()], _trainable(peft)
    with pytest.raises(ValueError, match=error):
        peft.load_adapter(bad, adapter_name="second")
    assert list(peft.peft_config) == ["default"] and [k for k, _ in peft.named_parameters()] == names
    assert _trainable(peft) == trainable
    np.testing.assert_array_equal(_logits(peft), out)


def test_save_is_atomic(saved, monkeypatch):
    import jt_lora.io.atomic as atomic
    good = saved / "good"
    files = {f.name: f.read_bytes() for f in good.iterdir()}
    peft = _randomize(get_peft_model(_base(), IA3Config()))

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        peft.save_pretrained(good)
    assert {f.name: f.read_bytes() for f in good.iterdir()} == files  # old adapter intact, no temp files


def test_microsoft_lora_checkpoint_errors(tmp_path):
    from jt_lora.models.saving import save_safetensors
    path = tmp_path / "ms.safetensors"
    save_safetensors(path, {"transformer.h.0.attn.c_attn.weight": np.ones((N, 3 * N), "float32")})
    with pytest.raises(AdapterFileError, match="no lora_A/lora_B"):
        PeftModel.from_pretrained(_base(), path)
    save_safetensors(path, {"h.0.attn.c_attn.lora_A": np.ones((4, N), "float32"),
                            "h.0.attn.c_attn.lora_B": np.ones((2 * N, 2), "float32")})
    with pytest.raises(AdapterFileError, match="has rank 2, config.r=4"):
        PeftModel.from_pretrained(_base(), path, config=LoraConfig(r=4, enable_lora=(True, False, True)))
    model = PeftModel.from_pretrained(_base(), path, config=LoraConfig(r=2, lora_alpha=2, enable_lora=(True, False, True)))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLayer) and layer.lora_B["default"].weight.numpy().sum() == 2 * N * 2
    assert isinstance(model.base_model.model.transformer.h[1].attn.c_attn, Linear)  # only layer 0 adapted


# --- InA files: slope, legacy files, grouped layout -------------------------------------------
def _rewrite_without_writer(path):
    """Make a file look as jt_lora wrote it before the slope was recorded (no writer mark, no slope)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    weights = path / "adapter_model.safetensors"
    with safe_open(str(weights), "np") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "jt_lora_writer"}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "jt_lora_config" in meta:
        inner = json.loads(meta["jt_lora_config"])
        inner.pop("lora_inhibition_slope")
        meta["jt_lora_config"] = json.dumps(inner)
    save_file(state, str(weights), metadata=meta)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.pop("lora_inhibition_slope")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return cfg


def _gate_slopes(model):
    return {layer.gate["default"].negative_slope for _, layer in _layers(model, LoraLayer)}


@pytest.mark.parametrize("grouped", [True, False])
def test_ina_file_records_slope_and_legacy_files_load_with_0_1(tmp_path, grouped):
    targets = {} if grouped else {"target_modules": ["c_attn"]}
    model = _randomize(get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4, lora_inhibition=0.3,
                                                          lora_inhibition_slope=0.1, **targets)))
    ref = _logits(model)
    with pytest.warns(UserWarning) if grouped else _no_warning():
        model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_inhibition_slope"] == 0.1
    np.testing.assert_array_equal(_logits(PeftModel.from_pretrained(_base(), tmp_path)), ref)
    _rewrite_without_writer(tmp_path)
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / "adapter_config.json")) + ".*using 0.1"):
        legacy = PeftModel.from_pretrained(_base(), tmp_path)
    assert _gate_slopes(legacy) == {0.1}
    np.testing.assert_array_equal(_logits(legacy), ref)


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_ina_file_from_the_reference_code_reads_with_0_01(tmp_path):
    """A file PEFT (the InA code's patched PEFT) wrote: layers_to_transform present, no jt_lora mark."""
    model = _randomize(get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4, lora_inhibition=0.3,
                                                          target_modules=["c_attn"])))
    model.save_pretrained(tmp_path, reference_compatible=True)
    cfg = _rewrite_without_writer(tmp_path)
    cfg["layers_to_transform"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with _no_warning():
        loaded = PeftModel.from_pretrained(_base(), tmp_path)
    assert _gate_slopes(loaded) == {0.01}
    np.testing.assert_array_equal(_logits(loaded), _logits(model))


def test_reference_export_refuses_grouped_ina_and_names_the_alternative(tmp_path):
    model = _randomize(get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4, lora_inhibition=0.3)))
    with pytest.raises(ValueError, match=r"grouped InA.*max per part.*target_modules=\['c_attn'\].*without enable_lora"):
        model.save_pretrained(tmp_path / "ref", reference_compatible=True)
    assert not (tmp_path / "ref").exists()
    with pytest.warns(UserWarning, match="grouped InA adapter 'default' written for jt_lora"):
        model.save_pretrained(tmp_path / "jt")
    reloaded = PeftModel.from_pretrained(_base(), tmp_path / "jt")  # the parts come back from the metadata
    layer = reloaded.base_model.model.transformer.h[0].attn.c_attn
    assert layer.enable_lora["default"] == (True, False, True) and layer.groups("default") == 2
    np.testing.assert_array_equal(_logits(reloaded), _logits(model))
    odd = _randomize(get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4, lora_inhibition=0.3,
                                                        lora_inhibition_slope=0.1, target_modules=["c_attn"])))
    with pytest.raises(ValueError, match="always uses 0.01"):
        odd.save_pretrained(tmp_path / "odd", reference_compatible=True)
    plain = _randomize(get_peft_model(_base(), LoraConfig(r=2, lora_alpha=4)))
    plain.save_pretrained(tmp_path / "lora", reference_compatible=True)  # grouped plain LoRA is exact in PEFT
    assert "lora_inhibition_slope" not in json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
