"""The model's one KV-cache interface (``jt_lora.models.kv_cache``): a cache written outside the
package drives GPT-2 through the four members alone, and gives what a full forward gives; the beam
search's caches refuse what they cannot do, with one clear message."""
import ast
from pathlib import Path

import numpy as np
import pytest

from jt_lora import GPT2Config, GPT2LMModel
from jt_lora.backend import jt
from jt_lora.models.kv_cache import KVCache

TINY = dict(vocab_size=61, n_positions=32, n_embd=16, n_layer=3, n_head=4, lora_dropout=0.0)


@pytest.fixture(scope="module")
def model():
    np.random.seed(0)
    m = GPT2LMModel(GPT2Config(**TINY))
    rng = np.random.default_rng(1)
    for name, p in m.named_parameters():
        base = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
        p.update(jt.array((base + rng.normal(0, 0.4, p.shape)).astype("float32")))
    m.eval()
    return m


class DictCache(KVCache):
    """Keys and values in a dict by layer, one row, no padding: only the interface is used."""

    def __init__(self):
        self.kv, self.calls = {}, []

    @property
    def length(self):
        return 0 if not self.kv else self.kv[0][0].shape[2]

    def start(self, t, attention_mask, inspect):
        from jt_lora.models.kv_cache import causal_mask
        self.calls.append(("start", t))
        self.bias = causal_mask(t, self.length)

    def attend(self, layer, qkv, dense):
        self.calls.append(("attend", layer))
        a, self.kv[layer], probs = dense(qkv, self.kv.get(layer), self.bias)
        return a, probs

    def finish(self):
        return self


def test_a_foreign_cache_drives_the_model_token_by_token(model):
    ids = np.array([[5, 17, 3, 40, 2, 9, 33]], np.int32)
    with jt.no_grad():
        full = model(jt.array(ids))[0].numpy()[0]          # [T, V]: one causal pass, no cache
        cache, got = DictCache(), []
        for j in range(ids.shape[1]):
            logits, same = model(jt.array(ids[:, j:j + 1]), past=cache)
            assert same is cache                           # the forward returns what finish() gives
            got.append(logits.numpy()[0, -1])
    np.testing.assert_allclose(np.stack(got), full, rtol=1e-4, atol=1e-4)
    assert cache.calls[:4] == [("start", 1), ("attend", 0), ("attend", 1), ("attend", 2)]
    assert len(cache.calls) == 4 * ids.shape[1]


def test_tuple_past_is_the_plain_cache(model):
    """The documented call: presents of a first pass, fed back as ``past``."""
    ids = np.array([[8, 1, 44, 12, 6]], np.int32)
    with jt.no_grad():
        full = model(jt.array(ids))[0].numpy()
        first, presents = model(jt.array(ids[:, :3]))
        assert isinstance(presents, list) and len(presents) == 3 and presents[0][0].shape == (1, 4, 3, 4)
        rest, presents2 = model(jt.array(ids[:, 3:]), past=presents)
    np.testing.assert_allclose(np.concatenate([first.numpy(), rest.numpy()], 1), full, rtol=1e-4, atol=1e-4)
    assert presents2[0][0].shape == (1, 4, 5, 4)


def test_beam_caches_refuse_what_they_cannot_do(model):
    from jt_lora.generation.cache import DecodeCache, GatheredCache
    ids = jt.array(np.array([[3, 8, 1]], np.int32))
    with jt.no_grad():
        _, presents, _ = model.transformer(ids)
        gathered = GatheredCache(presents, None)
        gathered.advance(np.zeros(2, np.int64))
        with pytest.raises(ValueError, match="keeps its own key mask"):
            model.transformer(jt.array(np.zeros((2, 1), np.int32)), past=gathered,
                              attention_mask=jt.array(np.ones((2, 4), np.float32)))
        decode = DecodeCache(presents, None, rows=2, steps=2)
        decode.advance(np.zeros(2, np.int64))
        for kw in (dict(output_attentions=True), dict(head_mask=jt.ones((3, 4)))):
            with pytest.raises(ValueError, match="one token per row, without head masks"):
                model.transformer(jt.array(np.zeros((2, 1), np.int32)), past=decode, **kw)


def test_the_model_does_not_know_generation():
    """nanoGPT's shape: GPT-2's module imports no generation code and tests no cache's type."""
    src = (Path(__file__).resolve().parent.parent / "jt_lora" / "models" / "gpt2.py").read_text()
    tree = ast.parse(src)
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in imported if "generation" in m]
    assert "DecodeCache" not in src and "callable(" not in src
