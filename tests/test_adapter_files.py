"""The one adapter format: files written by the old code load through the new code with the logits
they gave (tests/fixtures/legacy_adapters, written at commit 32f7b8a), and what the trainer writes
now loads into both front-ends and into HF PEFT identically."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from jt_lora.backend import jt
from jt_lora import GPT2LMModel, PeftModel, load_adapter, save_adapter
from jt_lora.models.adapter_files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError
from jt_lora.models.native_adapter import read_adapter_config

FIX = Path(__file__).resolve().parent / "fixtures" / "legacy_adapters"
IDS = np.load(FIX / "input_ids.npy")
EXPECTED = np.load(FIX / "expected_logits.npz")
NATIVE = ["native_lora", "native_ina", "native_ina_no_slope", "native_ia3"]
PEFT_DIRS = ["peft_lora", "peft_lora_grouped", "peft_ina", "peft_ia3"]


def _logits(model):
    out, _ = model(jt.array(IDS))
    return out.numpy()


def _native(name, path=None):
    """A GPT-2 built from the adapter directory's own config, adapter loaded, in eval mode."""
    path = path or FIX / name
    meta = read_adapter_config(path)
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items()
              if k not in ("base", "step", "run_id")}
    model = GPT2LMModel.from_pretrained(FIX / "base", **fields)
    load_adapter(model, path)
    return model.eval()


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


@pytest.mark.parametrize("name", NATIVE)
def test_legacy_native_dirs_load_into_the_native_model(name):
    np.testing.assert_allclose(_logits(_quiet(_native, name)), EXPECTED[name], atol=1e-5)


def test_legacy_ina_without_slope_warns_and_uses_0_1():
    with pytest.warns(UserWarning, match=r"native_ina_no_slope.*jt_lora_adapter.json.*0\.1"):
        meta = read_adapter_config(FIX / "native_ina_no_slope")
    assert meta["lora_inhibition_slope"] == 0.1 and meta["base"]["n_embd"] == 32


@pytest.mark.parametrize("name", NATIVE + PEFT_DIRS)
def test_every_legacy_dir_loads_into_the_peft_style_model(name):
    base = GPT2LMModel.from_pretrained(FIX / "base")
    model = _quiet(PeftModel.from_pretrained, base, FIX / name)
    np.testing.assert_allclose(_logits(model), EXPECTED[name], atol=1e-5)


@pytest.mark.parametrize("name", ["native_lora", "native_ina", "native_ia3"])
def test_resaved_native_adapter_is_a_peft_dir_that_both_front_ends_read_the_same(name, tmp_path):
    model = _quiet(_native, name)
    save_adapter(model, tmp_path / "a", extra={"step": 3})
    assert model.training is False  # saving keeps the mode
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert read_adapter_config(tmp_path / "a")["step"] == 3
    np.testing.assert_allclose(_logits(_native(name, tmp_path / "a")), EXPECTED[name], atol=1e-5)
    peft = PeftModel.from_pretrained(GPT2LMModel.from_pretrained(FIX / "base"), tmp_path / "a")
    np.testing.assert_allclose(_logits(peft), EXPECTED[name], atol=1e-5)


def test_load_adapter_keeps_eval_mode_and_merges(tmp_path):
    model = _quiet(_native, "native_lora")
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.merged and not model.training
    load_adapter(model, FIX / "native_lora")
    assert c_attn.merged and not model.training
    np.testing.assert_allclose(_logits(model), EXPECTED["native_lora"], atol=1e-5)


def test_a_peft_only_adapter_is_refused_by_the_native_reader_with_the_file_named():
    with pytest.raises(AdapterFileError, match=r"peft_lora.*c_fc.*PeftModel.from_pretrained"):
        read_adapter_config(FIX / "peft_lora")


def test_a_mismatched_adapter_names_the_field(tmp_path):
    model = GPT2LMModel.from_pretrained(FIX / "base", adapter="lora", lora_attn_dim=4, lora_attn_alpha=8)
    with pytest.raises(AdapterFileError, match="lora_attn_dim: adapter 2 vs model 4"):
        load_adapter(model, FIX / "native_lora")
