"""Head importance and copying scores against PyTorch computations of llm-interpret's definitions
(tests/analysis_ref.py, run on transformers' GPT2LMHeadModel with the same weights, in a
subprocess), plus copying scores with known answers on hand-set weights."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_torch
from jt_lora.analysis import importance as imp
from jt_lora.analysis import induction as ind
from jt_lora.analysis.models import example_batches
from jt_lora.backend import jt
from jt_lora.training.data import FTDataset
from jt_lora.models.gpt2 import GPT2Config, GPT2LMModel

HERE = Path(__file__).parent
TINY = dict(vocab_size=97, n_positions=64, n_embd=16, n_layer=3, n_head=4, adapter="none")


def _reference(mode: str, inputs: dict, tmp: Path) -> dict:
    inp, out = tmp / f"{mode}_in.json", tmp / f"{mode}_out.json"
    inp.write_text(json.dumps(inputs))
    proc = subprocess.run([sys.executable, str(HERE / "analysis_ref.py"), mode, str(inp), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"analysis reference {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _random_model(seed=0, std=0.3):
    """A tiny GPT-2 with large random weights and biases (peaked attention, visible gradients)."""
    np.random.seed(seed)
    model = GPT2LMModel(GPT2Config(**{**TINY, "initializer_range": std}))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if "ln_" in name:
            p.update(jt.array((1.0 + rng.normal(0, 0.2, p.shape)).astype(np.float32)
                              if name.endswith("weight") else rng.normal(0, 0.1, p.shape).astype(np.float32)))
        elif name.endswith("bias"):
            p.update(jt.array(rng.normal(0, 0.1, p.shape).astype(np.float32)))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    model = _random_model()
    model.save_pretrained(root / "model")
    model.eval()
    return model, root


def _pairs(seed=0, n=7):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, 97, rng.integers(2, 9)).tolist(), rng.integers(1, 97, rng.integers(2, 9)).tolist())
            for _ in range(n)]


@needs_torch
@pytest.mark.parametrize("batch_size", [1, 3])
def test_head_importance_equals_llm_interpret_reference(saved, batch_size, tmp_path):
    model, root = saved
    pairs = _pairs()
    dataset = FTDataset(pairs, 64)
    batches = list(example_batches(dataset, batch_size))
    ref = _reference("importance", {"model_dir": str(root / "model"), "examples": pairs,
                                    "batches": [b["id"].tolist() for b in batches]}, tmp_path)
    got = imp.head_importance(model, batches, definition="llm-interpret")
    assert got["positions"] == ref["tot_tokens"] == sum(len(c) + len(x) - 1 for c, x in pairs)
    assert got["tokens"] == ref["eff_tokens"] == sum(len(x) for _, x in pairs)
    expected = np.array(ref["llm-interpret"])
    assert expected.min() > 1e-4                                   # every head matters a little
    np.testing.assert_allclose(got["importance"], expected, rtol=1e-4, atol=1e-7)
    michel = imp.head_importance(model, batches, definition="michel")["importance"]
    np.testing.assert_allclose(michel, np.array(ref["michel"]), rtol=1e-4, atol=1e-6)
    # the two definitions differ: not a renamed copy of one another
    assert np.abs(michel - expected).max() > 0.1


@needs_torch
def test_copying_equals_the_scripts_definition(saved, tmp_path):
    model, root = saved
    pool = ind.token_pool(97, 0.04, bos_id=96)
    tokens = ind.repeat_sequences(ind.random_token_sequences(3, 12, pool, seed=5), 1, bos_id=96)
    ref = np.array(_reference("copying", {"model_dir": str(root / "model"), "tokens": tokens.tolist()},
                              tmp_path)["copying"])
    got = ind.copying_scores(model, tokens, "llm-interpret")
    assert got.shape == ref.shape == (3, 3, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    actual = ind.copying_scores(model, tokens, "actual-output")
    assert np.abs(actual - ref).max() > 0.05                      # the other variant is another number


# ---------------------------------------------------------------------------------------------- known answers


def _self_copying_layer():
    """One layer, 4 heads, one-hot token embeddings (24 tokens) and zero position embeddings.

    Head 0 attends to its own position (q = k = token one-hot, scaled: q . k is large for the same
    token only); its value is the token and its output writes that token's slot, so its
    in-context logits are the one-hot of the value's token. Every other weight is zero (heads 1-3
    write nothing: their scores are 0).
    """
    v, c, h = 24, 32, 4
    model = GPT2LMModel(GPT2Config(vocab_size=v, n_positions=16, n_embd=c, n_layer=1, n_head=h, adapter="none"))
    w = {name: np.zeros(p.shape) for name, p in model.named_parameters()}
    w["transformer.wte.weight"][np.arange(v), np.arange(v)] = 1.0
    w["transformer.wte.weight"][:, c - 1] = -1.0                  # zero-mean rows: LN only rescales
    for name in w:
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            w[name][:] = 1.0
    qkv, proj = np.zeros((c, 3 * c)), np.zeros((c, c))
    d = c // h                                                    # head 0: features 0..7 (tokens 0..7)
    for t in range(d):
        qkv[t, 2 * c + t] = 1.0                                   # value: token slot
        proj[t, t] = 3.0
        qkv[t, t] = qkv[t, c + t] = 4.0
    w["transformer.h.0.attn.c_attn.weight"], w["transformer.h.0.attn.c_proj.weight"] = qkv, proj
    for name, p in model.named_parameters():
        p.update(jt.array(w[name].astype(np.float32)))
    return model.eval()


def test_copying_known_answers_self_attending_copy_head():
    """A head that attends to the current token and writes it back: score 1 by both definitions
    (one layer: the embeddings are the residual stream, and the value at j is the most-attended
    one), 0 for heads that write nothing."""
    model = _self_copying_layer()
    tokens = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    for definition in ind.COPYING_DEFINITIONS:
        scores = ind.copying_scores(model, tokens, definition)
        np.testing.assert_allclose(scores[:, 0, 0], 1.0, atol=1e-3)
        np.testing.assert_array_equal(scores[:, 0, 1:], 0.0)


@needs_torch
def test_prefix_matching_equals_the_scripts_loop(saved, tmp_path):
    """The default prefix-matching score equals ``prefix_matching_copying.py``'s double loop applied
    to transformers' attention (BOS + a segment repeated 4 times); ``exact`` is another number,
    lower by exactly the attention on position 1 at the rows j % L == 0."""
    model, root = saved
    seg, bos = 12, 96
    pool = ind.token_pool(97, 0.04, bos_id=bos)
    tokens = ind.repeat_sequences(ind.random_token_sequences(3, seg, pool, seed=7), 4, bos_id=bos)
    ref = np.array(_reference("prefix_matching", {"model_dir": str(root / "model"), "tokens": tokens.tolist(),
                                                  "segment_len": seg}, tmp_path)["prefix_matching"])
    got = ind.prefix_matching_scores(model, tokens, "llm-interpret", bos_id=bos, segment_len=seg)
    assert got.shape == ref.shape == (3, 3, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    inferred = ind.prefix_matching_scores(model, tokens, bos_id=bos)          # segment length from the tokens
    np.testing.assert_allclose(inferred, got, rtol=0, atol=1e-7)
    exact = ind.prefix_matching_scores(model, tokens, "exact", bos_id=bos)
    rows = np.arange(2, 5) * seg                                               # j = 2L, 3L, 4L
    extra = np.stack([probs[:, :, rows, 1].sum(-1) / (3 * seg) for probs, _ in ind.head_outputs(model, tokens)], 1)
    np.testing.assert_allclose(got - exact, extra, rtol=1e-4, atol=1e-6)
    assert np.abs(exact - ref).max() > 1e-3                                    # the test tells the two apart
