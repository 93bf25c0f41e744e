"""GPT-2: parity with HF transformers on every checkpoint format, KV cache, loss, errors."""
import json

import numpy as np
import pytest

from conftest import TINY
from jt_lora import GPT2Config, GPT2LMModel
from jt_lora.backend import jt
from jt_lora.models.checkpoint import CheckpointError

TINY_CFG = GPT2Config(**TINY)


def _logits(model, ids):
    model.eval()
    return model(jt.array(ids.astype("int32")))[0].numpy()


@pytest.mark.parametrize("fmt,config", [
    ("hf_safetensors", None),                       # HF directory: config.json + model.safetensors
    ("hf_bin", None),                               # HF directory: config.json + pytorch_model.bin (zip)
    ("hf_safetensors/model.safetensors", TINY_CFG), # bare safetensors file
    ("hf_bin/pytorch_model.bin", TINY_CFG),         # bare torch zip file
    ("legacy.bin", TINY_CFG),                       # torch's legacy (pre-1.6) layout
    ("ms_legacy_names.pt", TINY_CFG),               # .g/.b/.w names inside model_state_dict
])
@pytest.mark.parametrize("adapter", ["none", "lora", "ia3"])
def test_hf_parity_every_format(hf_checkpoints, fmt, config, adapter):
    out, ids, ref = hf_checkpoints
    model = GPT2LMModel.from_pretrained(out / fmt, config=config, adapter=adapter)
    assert model.config.n_head == 4 and model.config.n_layer == 2
    np.testing.assert_allclose(_logits(model, ids), ref["base"], atol=1e-4)


def test_microsoft_lora_checkpoint_with_adapter_weights(hf_checkpoints):
    out, ids, ref = hf_checkpoints
    meta = json.loads((out / "meta.json").read_text())
    model = GPT2LMModel.from_pretrained(out / "ms_lora.pt", config=TINY_CFG, lora_attn_dim=meta["r"],
                                        lora_attn_alpha=meta["alpha"], lora_dropout=0.0)
    assert np.abs(model.transformer.h[0].attn.c_attn.lora_B.numpy()).max() > 0
    np.testing.assert_allclose(_logits(model, ids), ref["lora"], atol=1e-4)
    assert np.abs(ref["lora"] - ref["base"]).max() > 1e-2  # the adapter really changes the output
    model.train()  # unmerged path (no dropout here) gives the same numbers
    np.testing.assert_allclose(model(jt.array(ids.astype("int32")))[0].numpy(), ref["lora"], atol=1e-4)


def test_lora_rank_mismatch_names_key_and_shapes(hf_checkpoints):
    out, _, _ = hf_checkpoints
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.lora_A: checkpoint \[4, 16\] vs model \[8, 16\]"):
        GPT2LMModel.from_pretrained(out / "ms_lora.pt", config=TINY_CFG, lora_attn_dim=4)


def test_loading_errors_name_path_and_keys(hf_checkpoints, tmp_path):
    out, _, _ = hf_checkpoints
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        GPT2LMModel.from_pretrained(tmp_path / "nowhere.bin")
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.bin"):
        GPT2LMModel.from_pretrained(bad, config=TINY_CFG)
    wrong = TINY_CFG.replace(n_layer=3)
    with pytest.raises(CheckpointError, match="n_layer: checkpoint 2 vs config 3"):
        GPT2LMModel.from_pretrained(out / "legacy.bin", config=wrong)
    from safetensors.numpy import load_file, save_file
    state = load_file(str(out / "hf_safetensors" / "model.safetensors"))
    state.pop("transformer.h.1.mlp.c_fc.bias")
    state["transformer.h.0.extra.weight"] = np.zeros(3, "float32")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['h\.1\.mlp\.c_fc\.bias'\]; unexpected keys \['h\.0\.extra\.weight'\]"):
        GPT2LMModel.from_pretrained(tmp_path / "partial.safetensors", config=TINY_CFG)


def _random_model(adapter="lora", seed=0, **kw):
    np.random.seed(seed)
    model = GPT2LMModel(TINY_CFG.replace(adapter=adapter, lora_dropout=0.0, **kw))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith(("lora_B", "ia3_l")):
            frozen = p.is_stop_grad()
            p.update(jt.array((1.0 if name.endswith("ia3_l") else 0.0) + rng.normal(0, 0.3, p.shape).astype("float32")))
            if frozen:
                p.stop_grad()
    return model


@pytest.mark.parametrize("adapter,kw", [("lora", {}), ("ina", {"lora_inhibition": 0.3}), ("ia3", {})])
def test_kv_cache_equals_full_forward(adapter, kw):
    model = _random_model(adapter, **kw)
    model.eval()
    ids = jt.array(np.random.default_rng(1).integers(0, 97, (2, 9)).astype("int32"))
    full = model(ids)[0].numpy()
    logits, past = model(ids[:, :5])
    steps = [logits.numpy()]
    for t in range(5, 9):
        logits, past = model(ids[:, t:t + 1], past=past)
        steps.append(logits.numpy())
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_left_padding_with_attention_mask_equals_unpadded():
    model = _random_model("lora")
    model.eval()
    short = np.array([[5, 6, 7]], dtype="int32")
    padded = np.array([[0, 0, 5, 6, 7]], dtype="int32")
    mask = np.array([[0, 0, 1, 1, 1]], dtype="float32")
    pos = np.array([[0, 0, 0, 1, 2]], dtype="int32")
    ref = model(jt.array(short))[0].numpy()
    got = model(jt.array(padded), attention_mask=jt.array(mask), position_ids=jt.array(pos))[0].numpy()
    np.testing.assert_allclose(got[:, 2:], ref, atol=1e-5)


def test_adapter_models_at_init_equal_base_and_merge_is_exact():
    base = _random_model("none")
    ids = np.random.default_rng(2).integers(0, 97, (2, 7))
    ref = _logits(base, ids)
    base_params = dict(base.named_parameters())
    for adapter in ("lora", "ia3"):
        fresh = GPT2LMModel(TINY_CFG.replace(adapter=adapter))  # adapters at their init
        for name, p in fresh.named_parameters():
            if name in base_params:
                frozen = p.is_stop_grad()
                p.update(base_params[name].clone())
                if frozen:
                    p.stop_grad()
        np.testing.assert_allclose(_logits(fresh, ids), ref, atol=1e-5)
    for adapter in ("lora", "ia3"):
        model = _random_model(adapter)  # non-trivial adapter weights
        model.train()
        unmerged = model(jt.array(ids.astype("int32")))[0].numpy()
        merged = _logits(model, ids)
        np.testing.assert_allclose(merged, unmerged, atol=1e-5)
        assert np.abs(merged - ref).max() > 1e-3


def test_loss_matches_reference_formula():
    model = _random_model("lora")
    model.eval()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 97, (2, 6)).astype("int32")
    labels = rng.integers(0, 97, (2, 6)).astype("int32")
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype="float32")
    logits = model(jt.array(ids))[0].numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    for eps in (0.0, 0.1):
        per = (1 - eps) * nll + eps * (-logp.mean(-1))
        expected = (per * mask).sum() / (mask.sum() + 1e-4)
        _, loss = model(jt.array(ids), lm_labels=jt.array(labels), lm_mask=jt.array(mask), label_smooth=eps)
        assert abs(loss.item() - expected) < 1e-4


def test_only_adapters_trainable_and_cards():
    model = _random_model("lora")
    trainable = {n for n, p in model.named_parameters() if not p.is_stop_grad()}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{m}" for i in range(2) for m in "AB"}
    model.eval()
    model.train()
    assert {n for n, p in model.named_parameters() if not p.is_stop_grad()} == trainable
    for card, dims in {"gpt2.sm": (768, 12, 12), "gpt2.md": (1024, 24, 16), "gpt2.lg": (1280, 36, 20)}.items():
        c = GPT2Config.from_card(card)
        assert (c.n_embd, c.n_layer, c.n_head, c.vocab_size, c.n_positions) == dims + (50257, 1024)
        assert (c.lora_attn_dim, c.lora_attn_alpha, c.lora_dropout, c.lora_enable) == (4, 32, 0.1, (True, False, True))
    with pytest.raises(ValueError, match="unknown model card"):
        GPT2Config.from_card("gpt2.xl")


def test_head_and_ffn_masks_are_inputs():
    model = _random_model("lora")
    model.eval()
    ids = jt.array(np.arange(6, dtype="int32").reshape(1, 6))
    ref = model(ids)[0].numpy()
    ones = model(ids, head_mask=jt.ones((2, 4)), ffn_mask=jt.ones((2,)))[0].numpy()
    np.testing.assert_allclose(ones, ref, atol=1e-6)
    off = model(ids, head_mask=jt.zeros((2, 4)), ffn_mask=jt.zeros((2,)))[0].numpy()
    # with every head and FFN off, hidden = embeddings only: logits = ln_f(wte[x] + wpe[p]) @ wte^T
    t = model.transformer
    h = t.wte.weight.numpy()[np.arange(6)] + t.wpe.weight.numpy()[:6]
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    h = h * t.ln_f.weight.numpy() + t.ln_f.bias.numpy()
    np.testing.assert_allclose(off[0], h @ t.wte.weight.numpy().T, atol=1e-4)


def test_from_pretrained_builds_the_plain_model_unless_an_adapter_is_asked(hf_checkpoints):
    """As transformers (and microsoft/LoRA with lora_attn_dim=0): no adapter by default, so the
    result goes straight into get_peft_model, as in PEFT."""
    from jt_lora import LoraConfig, get_peft_model
    out, ids, ref = hf_checkpoints
    plain = GPT2LMModel.from_pretrained(out / "hf_safetensors")
    assert plain.config.adapter == "none"
    assert not [n for n, _ in plain.named_parameters() if "lora_" in n or "ia3_" in n]
    peft = get_peft_model(plain, LoraConfig(r=2, lora_alpha=4))
    assert {n for n, p in peft.named_parameters() if not p.is_stop_grad()} == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.default.weight" for i in range(2) for m in "AB"}
    np.testing.assert_allclose(_logits(peft, ids), ref["base"], atol=1e-4)  # B = 0: the base model
    native = GPT2LMModel.from_pretrained(out / "hf_safetensors", adapter="ina", lora_attn_dim=2, lora_inhibition=0.3)
    assert native.config.adapter == "ina" and native.transformer.h[0].attn.c_attn.r == 2
    with pytest.raises(ValueError, match=r"adapter fields \['lora_attn_dim'\] but no adapter"):
        GPT2LMModel.from_pretrained(out / "hf_safetensors", lora_attn_dim=2)


def test_ina_slope_in_config_and_native_adapter_file(tmp_path):
    """The slope reaches every InA layer, save_adapter records it, and a file written without it
    (before it was recorded) reads as 0.1 with a warning naming the file."""
    from jt_lora.models.saving import ADAPTER_CONFIG, load_adapter, read_adapter_config, save_adapter
    model = _random_model("ina", lora_inhibition=0.3)
    assert model.config.lora_inhibition_slope == 0.01
    assert {b.attn.c_attn.gate.negative_slope for b in model.transformer.h} == {0.01}
    save_adapter(model, tmp_path / "new")
    assert json.loads((tmp_path / "new" / ADAPTER_CONFIG).read_text())["lora_inhibition_slope"] == 0.01
    legacy = _random_model("ina", lora_inhibition=0.3, lora_inhibition_slope=0.1)
    # the old format (jt_lora_adapter.*), as written before the slope was recorded
    from jt_lora.models.saving import ADAPTER_FIELDS, save_safetensors
    from jt_lora.nn.adapters import adapter_state_dict
    (tmp_path / "old").mkdir()
    save_safetensors(tmp_path / "old" / "jt_lora_adapter.safetensors", adapter_state_dict(legacy))
    cfg_file = tmp_path / "old" / "jt_lora_adapter.json"
    meta = {k: v for k, v in legacy.config.to_dict().items() if k in ADAPTER_FIELDS and k != "lora_inhibition_slope"}
    cfg_file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=f"{cfg_file}.*using 0.1"):
        read = read_adapter_config(tmp_path / "old")
    assert read["lora_inhibition_slope"] == 0.1
    rebuilt = _random_model("ina", lora_inhibition=0.3, lora_inhibition_slope=0.1)  # same base weights (seed)
    for n, p in rebuilt.named_parameters():
        if "lora_" in n:
            p.update(jt.zeros(p.shape))
    with pytest.warns(UserWarning, match="using 0.1"):
        load_adapter(rebuilt, tmp_path / "old")
    ids = np.random.default_rng(4).integers(0, 97, (2, 6))
    np.testing.assert_array_equal(_logits(rebuilt, ids), _logits(legacy, ids))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="lora_inhibition_slope: adapter 0.1 vs model 0.01"):
        load_adapter(GPT2LMModel(TINY_CFG.replace(adapter="ina", lora_inhibition=0.3)), tmp_path / "old")
    with pytest.raises(ValueError, match="lora_inhibition_slope must be in"):
        TINY_CFG.replace(lora_inhibition_slope=-1.0)


@pytest.mark.parametrize("adapter,kw", [("lora", {}), ("ina", {"lora_inhibition": 0.3}), ("ia3", {})])
def test_100_eval_train_cycles_leave_the_model_bit_identical(adapter, kw):
    """The trainer runs one eval()/train() cycle per --eval_interval: the base must not drift."""
    model = _random_model(adapter, **kw)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    for _ in range(100):
        model.eval()
        model.train()
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.numpy(), before[n], err_msg=n)
