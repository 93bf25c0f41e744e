"""jt_lora.load_model: the one way to build a model (train, generate, eval_boolq, analysis, bench)."""
import numpy as np
import pytest

from conftest import TINY

jt_lora = pytest.importorskip("jt_lora")
from jt_lora.backend import jt  # noqa: E402


def _logits(model, ids):
    out, _ = model(jt.array(ids))
    return out.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny InA model with non-zero adapter weights, its base as a HF dir and its adapter dir,
    plus the logits of the unmerged model computed by hand from its own layers' formula."""
    from jt_lora import GPT2Config, GPT2LMModel, save_adapter
    root = tmp_path_factory.mktemp("load_model")
    jt.set_seed(3)
    model = GPT2LMModel(GPT2Config(**TINY, adapter="ina", lora_attn_dim=2, lora_attn_alpha=4.0, lora_inhibition=0.3,
                                   lora_dropout=0.0))
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.assign(jt.array(rng.normal(0, 0.5, p.shape).astype(np.float32)))
    model.save_pretrained(root / "base")
    save_adapter(model, root / "adapter")
    ids = np.array([[1, 5, 7, 9, 11, 3]], dtype=np.int32)
    model.eval()
    return root, ids, _logits(model, ids)


def test_adapter_settings_come_from_the_adapter_config(saved):
    root, ids, expected = saved
    model = jt_lora.load_model(root / "base", root / "adapter")
    c = model.config
    assert (c.adapter, c.lora_attn_dim, c.lora_attn_alpha, c.lora_inhibition) == ("ina", 2, 4.0, 0.3)
    assert not model.is_train                                   # eval by default: ready for inference
    np.testing.assert_allclose(_logits(model, ids), expected, atol=1e-5)
    # a value that repeats the record is accepted
    again = jt_lora.load_model(root / "base", root / "adapter", lora_attn_dim=2, adapter_type="ina")
    np.testing.assert_allclose(_logits(again, ids), expected, atol=1e-5)


@pytest.mark.parametrize("override, named", [({"lora_attn_dim": 8}, "lora_attn_dim=8 contradicts lora_attn_dim=2"),
                                             ({"adapter_type": "lora"}, "adapter_type='lora' contradicts adapter='ina'"),
                                             ({"lora_inhibition": 0.5}, "lora_inhibition=0.5 contradicts")])
def test_a_contradicting_override_is_an_error_naming_it(saved, override, named):
    root, _, _ = saved
    with pytest.raises(ValueError, match=named) as e:
        jt_lora.load_model(root / "base", root / "adapter", **override)
    assert "adapter" in str(e.value).split("in ")[-1]           # and the adapter's config file


def test_base_alone_is_the_plain_gpt2_and_training_mode_is_asked_for(saved):
    root, ids, _ = saved
    base = jt_lora.load_model(root / "base")
    assert base.config.adapter == "none" and not base.is_train
    lora = jt_lora.load_model(root / "base", training=True, adapter_type="lora", lora_attn_dim=2)
    assert lora.is_train and lora.config.lora_attn_dim == 2
    np.testing.assert_allclose(_logits(lora.eval(), ids), _logits(base, ids), atol=1e-6)  # B = 0: the base
    with pytest.raises(FileNotFoundError, match="nowhere"):
        jt_lora.load_model(root / "base", root / "nowhere")


def test_load_into_model_keeps_the_mode(saved):
    from jt_lora.models.checkpoint import load_into_model, normalize_gpt2_keys, read_state_dict
    root, ids, expected = saved
    model = jt_lora.load_model(root / "base", root / "adapter")
    state = normalize_gpt2_keys(read_state_dict(root / "base")[0])
    load_into_model(model, state)
    assert not model.is_train                                   # still eval, merged with the same weights
    np.testing.assert_allclose(_logits(model, ids), expected, atol=1e-5)
    model.train()
    load_into_model(model, state)
    assert model.is_train
