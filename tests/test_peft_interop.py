"""Exact interchange with HF PEFT: jt_lora -> PEFT, PEFT -> jt_lora, microsoft/LoRA -> both.

One session fixture builds a tiny GPT-2, saves it as the shared HF base, and
runs tests/peft_ref.py twice in a subprocess (torch must not share the
process with Jittor): first to make PEFT adapters and a microsoft/LoRA
checkpoint, then to evaluate what jt_lora saved. Adapter tensors are random
and non-zero everywhere, so every part of every file matters.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import HAS_TORCH, TINY
from jt_lora import GPT2Config, GPT2LMModel
from jt_lora.backend import jt
from jt_lora.nn.lora import InhibitionGate
from jt_lora.peft import IA3Config, LoraConfig, PeftModel, from_native, get_peft_model
from jt_lora.peft.config import config_from_dict
from jt_lora.peft.layers import LoraLayer

pytestmark = pytest.mark.skipif(not (HAS_TORCH and __import__("importlib").util.find_spec("peft")),
                                reason="torch + transformers + peft not installed")

HERE = Path(__file__).parent
IDS = np.array([[1, 5, 7, 9, 11, 3, 2, 50], [4, 4, 8, 15, 16, 23, 42, 96]])
ATOL = 1e-4

# jt_lora adapters saved for PEFT (random non-zero tensors).
JT_CASES = {
    "lora_qv": LoraConfig(r=2, lora_alpha=8),  # GPT-2 default: q and v of c_attn (grouped, rank 2 each)
    "lora_mixed": LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], enable_lora=(True, False, True),
                             modules_to_save=["ln_f"]),  # grouped c_attn + plain c_fc: rank_pattern in the file
    "lora_all_linear": LoraConfig(r=3, lora_alpha=6, target_modules="all-linear", use_rslora=True, bias="all",
                                  exclude_modules=["transformer.h.1.mlp.c_proj"]),
    "lora_regex_lora_only_bias": LoraConfig(r=2, lora_alpha=2, target_modules=r".*\.h\.1\.(attn|mlp)\.c_proj",
                                            bias="lora_only"),
    "ia3": IA3Config(init_ia3_weights=False),  # GPT-2 default: c_attn (output) and mlp.c_proj (input)
    "ia3_regex": IA3Config(target_modules=r".*\.(c_fc|mlp\.c_proj)", feedforward_modules=r".*mlp\.c_proj",
                           init_ia3_weights=False),
}
# PEFT adapters (adapter_config.json fields) loaded by jt_lora.
PEFT_CASES = {
    "p_lora_default": {"peft_type": "LORA", "r": 2, "lora_alpha": 8},  # PEFT's GPT-2 default: all of c_attn
    "p_lora_patterns": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": "all-linear",
                        "rank_pattern": {"c_fc": 4}, "alpha_pattern": {"attn.c_attn": 16}, "use_rslora": True},
    "p_lora_bias_m2s": {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["c_attn", "attn.c_proj"],
                        "bias": "lora_only", "modules_to_save": ["ln_f"], "lora_dropout": 0.1},
    "p_lora_bias_all": {"peft_type": "LORA", "r": 1, "lora_alpha": 3, "target_modules": ["mlp.c_proj"],
                        "bias": "all"},  # saved as adapter_model.bin
    "p_ia3_default": {"peft_type": "IA3"},
    "p_ia3_custom": {"peft_type": "IA3", "target_modules": ["c_fc", "mlp.c_proj", "attn.c_proj"],
                     "feedforward_modules": ["mlp.c_proj"]},
}
# Pairs combined with add_weighted_adapter on both sides.
WEIGHTED_SOURCES = {
    "w1": LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
    "w2": LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "mlp.c_proj"]),
    "iw1": IA3Config(init_ia3_weights=False),
    "iw2": IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], init_ia3_weights=False),
}
WEIGHTED = {
    "lora_cat": (("w1", "w2"), (0.7, -0.4), "cat"),
    "lora_linear": (("w1", "w2"), (0.7, 0.5), "linear"),
    "lora_svd": (("w1", "w2"), (0.7, -0.4), "svd"),
    "ia3_weighted": (("iw1", "iw2"), (0.6, 0.3), None),
}


def _torch(root: Path, tag: str, jobs):
    spec = root / f"{tag}.json"
    spec.write_text(json.dumps({"base": str(root / "base"), "ids": IDS.tolist(), "jobs": jobs}))
    out = root / f"{tag}_out"
    proc = subprocess.run([sys.executable, str(HERE / "peft_ref.py"), str(spec), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peft_ref.py failed:\n{proc.stderr[-3000:]}")
    return dict(np.load(out / "logits.npz")), json.loads((out / "facts.json").read_text())


def _logits(model):
    return model(jt.array(IDS.astype("int32")))[0].numpy()


def _randomize(model, rng):
    """Every trainable tensor (adapters, modules-to-save copies, trained biases) random and non-zero."""
    for name, p in model.named_parameters():
        if p.is_stop_grad():
            continue
        noise = rng.normal(0, 0.3, p.shape).astype("float32")
        p.update(jt.array(noise + 1.0 if "ia3_l" in name else p.numpy() + noise))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_interop")
    rng = np.random.default_rng(0)
    base = GPT2LMModel(GPT2Config(**TINY, adapter="none"))
    for _, p in base.named_parameters():
        p.update(jt.array(rng.normal(0, 0.2, p.shape).astype("float32")))
    base.save_pretrained(root / "base")

    def fresh(**kw):
        return GPT2LMModel.from_pretrained(root / "base", adapter=kw.pop("adapter", "none"), **kw)

    w = {"root": root, "fresh": fresh, "base": _logits(fresh()), "jt": {}, "reload": {}, "counts": {}}

    # Round 1 (torch): PEFT-made adapters and a microsoft/LoRA checkpoint.
    jobs = [{"kind": "make", "name": n, "config": c, "seed": i, "out": str(root / n),
             "safetensors": n != "p_lora_bias_all"}  # one legacy adapter_model.bin (torch pickle)
            for i, (n, c) in enumerate(PEFT_CASES.items())]
    jobs.append({"kind": "ms", "name": "ms", "r": 2, "alpha": 32.0, "seed": 7, "out": str(root / "ms.pt")})
    w["peft"], w["peft_facts"] = _torch(root, "round1", jobs)

    # jt_lora adapters, saved for PEFT and reloaded by jt_lora.
    for name, config in {**JT_CASES, **WEIGHTED_SOURCES}.items():
        model = get_peft_model(fresh(), config)
        _randomize(model, rng)
        w["jt"][name] = _logits(model)
        model.save_pretrained(root / name)
        w["reload"][name] = _logits(PeftModel.from_pretrained(fresh(), root / name))
    # InA as the reference adapts GPT-2: c_attn as one module (max over its whole rank).
    ina = get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=16, lora_inhibition=0.3, target_modules=["c_attn"]))
    _randomize(ina, rng)
    w["jt"]["ina"] = _logits(ina)
    ina.save_pretrained(root / "ina", reference_compatible=True)
    w["reload"]["ina"] = _logits(PeftModel.from_pretrained(fresh(), root / "ina"))
    for _, layer in ina.base_model.tuner_layers():
        layer.gate["default"] = InhibitionGate(0.3, 0.1)  # jt_lora's slope before it followed the reference
    w["ina_slope_0.1"] = _logits(ina)
    for _, layer in ina.base_model.tuner_layers():
        layer.gate["default"] = InhibitionGate(0.0)
    w["ina_as_lora"] = _logits(ina)
    # Native jt_lora adapters (GPT2Config.adapter), converted with from_native.
    for name, kw in {"native_lora": dict(adapter="lora", lora_attn_dim=2, lora_attn_alpha=8, lora_dropout=0.0),
                     "native_ia3": dict(adapter="ia3")}.items():
        native = fresh(**kw)
        _randomize(native, rng)
        w["jt"][name] = _logits(native.eval())
        converted = from_native(native)
        w["converted_" + name] = _logits(converted)
        converted.save_pretrained(root / name)
    # PEFT -> jt_lora.
    w["from_peft"] = {n: _logits(PeftModel.from_pretrained(fresh(), root / n)) for n in PEFT_CASES}
    for n in PEFT_CASES:
        config = config_from_dict(json.loads((root / n / "adapter_config.json").read_text()))
        w["counts"][n] = get_peft_model(fresh(), config.replace(inference_mode=False)).get_nb_trainable_parameters()
    with pytest.warns(UserWarning, match="lora_alpha"):
        ms_model = PeftModel.from_pretrained(fresh(), root / "ms.pt")
    w["from_ms"] = _logits(ms_model)
    ms_model.save_pretrained(root / "ms_resaved")
    # Weighted combinations on the jt side.
    w["weighted"] = {}
    for name, (sources, weights, kind) in WEIGHTED.items():
        model = PeftModel.from_pretrained(fresh(), root / sources[0], adapter_name="a0")
        model.load_adapter(root / sources[1], adapter_name="a1")
        model.add_weighted_adapter(["a0", "a1"], list(weights), "combined",
                                   **({"combination_type": kind} if kind else {}))
        model.set_adapter("combined")
        w["weighted"][name] = _logits(model)

    # Round 2 (torch): PEFT evaluates what jt_lora saved, and combines adapters itself.
    saved = list(JT_CASES) + ["ina", "native_lora", "native_ia3", "ms_resaved"]
    jobs = [{"kind": "eval", "name": n, "adapter": str(root / n)} for n in saved]
    jobs.append({"kind": "ina", "name": "ina_reference", "adapter": str(root / "ina"), "inhibition": 0.3})
    jobs += [{"kind": "weighted", "name": n, "adapters": [str(root / s) for s in sources], "weights": list(weights),
              "combination_type": kind} for n, (sources, weights, kind) in WEIGHTED.items()]
    w["peft_eval"], w["peft_eval_facts"] = _torch(root, "round2", jobs)
    return w


@pytest.mark.parametrize("name", list(JT_CASES) + ["native_lora", "native_ia3"])
def test_jt_lora_to_peft_same_logits(world, name):
    ours = world["jt"][name]
    assert np.abs(ours - world["base"]).max() > 1e-2  # the adapter really changes the output
    np.testing.assert_allclose(world["peft_eval"][name], ours, atol=ATOL)
    assert not any("Unexpected" in m for m in world["peft_eval_facts"][name]["warnings"])


@pytest.mark.parametrize("name", list(JT_CASES) + list(WEIGHTED_SOURCES) + ["ina"])
def test_jt_lora_save_load_round_trip(world, name):
    np.testing.assert_allclose(world["reload"][name], world["jt"][name], atol=1e-6)


@pytest.mark.parametrize("name", ["native_lora", "native_ia3"])
def test_from_native_keeps_the_output(world, name):
    np.testing.assert_allclose(world["converted_" + name], world["jt"][name], atol=1e-5)


@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_peft_to_jt_lora_same_logits(world, name):
    ref = world["peft"][name]
    assert np.abs(ref - world["base"]).max() > 1e-2
    np.testing.assert_allclose(world["from_peft"][name], ref, atol=ATOL)


@pytest.mark.parametrize("name", list(PEFT_CASES))
def test_trainable_parameter_counts_match_peft(world, name):
    facts = world["peft_facts"][name]
    assert world["counts"][name] == (facts["trainable"], facts["total"])


def test_microsoft_lora_checkpoint_to_jt_lora_and_on_to_peft(world):
    ref = world["peft"]["ms"]
    assert np.abs(ref - world["base"]).max() > 1e-2
    np.testing.assert_allclose(world["from_ms"], ref, atol=ATOL)
    np.testing.assert_allclose(world["peft_eval"]["ms_resaved"], ref, atol=ATOL)


@pytest.mark.parametrize("name", list(WEIGHTED))
def test_add_weighted_adapter_matches_peft(world, name):
    ours = world["weighted"][name]
    assert np.abs(ours - world["base"]).max() > 1e-2
    np.testing.assert_allclose(ours, world["peft_eval"][name], atol=ATOL)


def test_ina_file_carries_inhibition_and_stock_peft_drops_it(world):
    cfg = json.loads((world["root"] / "ina" / "adapter_config.json").read_text())
    assert cfg["lora_inhibition"] == 0.3 and cfg["peft_type"] == "LORA"
    np.testing.assert_allclose(world["reload"]["ina"], world["jt"]["ina"], atol=1e-6)
    # Stock PEFT warns that it ignores the field and computes the plain LoRA with the same tensors.
    assert any("lora_inhibition" in m for m in world["peft_eval_facts"]["ina"]["warnings"])
    np.testing.assert_allclose(world["peft_eval"]["ina"], world["ina_as_lora"], atol=ATOL)
    assert np.abs(world["peft_eval"]["ina"] - world["jt"]["ina"]).max() > 1e-2


def test_ina_equals_the_reference_code_on_gpt2(world):
    """The InA reference's forward (patched into PEFT's LoRA layers, slope 0.01, whole-rank max) on the
    file jt_lora exported gives jt_lora's logits; slope 0.1 (jt_lora's old gate) does not."""
    ref = world["peft_eval"]["ina_reference"]
    assert world["peft_eval_facts"]["ina_reference"]["patched"] == TINY["n_layer"]
    assert np.abs(ref - world["ina_as_lora"]).max() > 1e-2  # the gate matters on these tensors
    np.testing.assert_allclose(world["jt"]["ina"], ref, atol=ATOL)
    assert np.abs(world["ina_slope_0.1"] - ref).max() > 1e-3


def test_grouped_lora_file_layout(world):
    """q/v-only LoRA of rank 2 is PEFT's rank-4 LoRA on c_attn: block B with zero k rows, alpha doubled."""
    from safetensors import safe_open
    root, n = world["root"], TINY["n_embd"]
    cfg = json.loads((root / "lora_qv" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["fan_in_fan_out"]) == (4, 16, ["c_attn"], True)
    with safe_open(str(root / "lora_qv" / "adapter_model.safetensors"), "np") as f:
        keys = sorted(f.keys())
        b = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
        native = json.loads(f.metadata()["jt_lora_config"])
    assert keys == [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight"
                    for i in range(TINY["n_layer"]) for ab in "AB"]
    assert b.shape == (3 * n, 4)
    assert not b[n:2 * n].any() and not b[:n, 2:].any() and not b[2 * n:, :2].any()  # k rows, off-diagonal
    assert b[:n, :2].any() and b[2 * n:, 2:].any()
    assert (native["r"], native["lora_alpha"], native["enable_lora"]) == (2, 8, [True, False, True])
    # Mixed ranks go to rank_pattern / alpha_pattern, keyed by the exact module name.
    mixed = json.loads((root / "lora_mixed" / "adapter_config.json").read_text())
    assert (mixed["r"], mixed["lora_alpha"]) in ((4, 8), (2, 4))
    assert len(mixed["rank_pattern"]) == TINY["n_layer"] and len(mixed["alpha_pattern"]) == TINY["n_layer"]
    # Reloaded by jt_lora with the grouped layout it was saved with.
    model = PeftModel.from_pretrained(world["fresh"](), root / "lora_qv")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLayer) and layer.enable_lora["default"] == (True, False, True)
    assert layer.lora_B["default"].weight.shape == [2 * n, 2]
