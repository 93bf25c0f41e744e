"""Induction scores on a GPT-2 whose weights are set by hand to contain an induction circuit.

Residual stream (128 dims): one-hot token (25), one-hot *previous* token (25), one-hot position
(32), and a balance dim that keeps every row's mean at zero, so LayerNorm only rescales.

* layer 0, head 0: previous-token head. Query of position p matches the key of position p-1; its
  value is the token, written into the previous-token slot.
* layer 1, head 0: induction head. Query = current token, key = previous-token slot, value = the
  token, written back into the token slot (so its output raises that token's logit). A query bias
  makes it fall back to the BOS position when nothing matches, as real induction heads do.
* layer 1, head 1: random weights. All other heads and both MLPs are zero.
"""
import json

import numpy as np
import pytest

from jt_lora.analysis import induction as ind
from jt_lora.backend import jt
from jt_lora.models.gpt2 import GPT2Config, GPT2LMModel

V, P, C, H = 25, 32, 128, 4      # vocab (24 random tokens + BOS), positions, width, heads
D = C // H
BOS = 24
TOK, PREV, POS, BAL = 0, V, 2 * V, 2 * V + P


def _set(model, values):
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.update(jt.array(values.get(name, np.zeros(p.shape, dtype=np.float32)).astype(np.float32)))


def hand_induction_model(seed=0):
    cfg = GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=2, n_head=H, adapter="none")
    model = GPT2LMModel(cfg)
    rng = np.random.default_rng(seed)
    w = {}
    wte = np.zeros((V, C))
    wte[np.arange(V), TOK + np.arange(V)] = 1.0
    wte[:, BAL] = -1.0
    wpe = np.zeros((P, C))
    wpe[np.arange(P), POS + np.arange(P)] = 1.0
    wpe[:, BAL] = -1.0
    w["transformer.wte.weight"], w["transformer.wpe.weight"] = wte, wpe
    for i in range(2):
        for ln in ("ln_1", "ln_2"):
            w[f"transformer.h.{i}.{ln}.weight"] = np.ones(C)
    w["transformer.ln_f.weight"] = np.ones(C)

    # Layer 0, head 0: previous-token head (q/k over positions, v = token -> previous-token slot).
    qkv, proj = np.zeros((C, 3 * C)), np.zeros((C, C))
    for p in range(1, P):
        qkv[POS + p, 0 + (p - 1)] = 5.0
    for p in range(P):
        qkv[POS + p, C + p] = 1.0
    for t in range(V):
        qkv[TOK + t, 2 * C + t] = 1.0
    # LN maps the one-hot 1 to about 4.6: scale back to 1 in the previous-token slot, keep rows zero-mean
    scale = 1.0 / 4.62
    for t in range(V):
        proj[t, PREV + t] = scale
        proj[t, BAL] = -scale
    w["transformer.h.0.attn.c_attn.weight"], w["transformer.h.0.attn.c_proj.weight"] = qkv, proj

    # Layer 1, head 0: induction head; head 1: random.
    qkv, proj, bias = np.zeros((C, 3 * C)), np.zeros((C, C)), np.zeros(3 * C)
    for t in range(V):
        qkv[TOK + t, t] = 10.0                  # query: current token
        qkv[PREV + t, C + t] = 1.0              # key: token before the key position
        qkv[TOK + t, 2 * C + t] = 1.0           # value: the key position's token
        proj[t, TOK + t] = 3.0                  # written into the token slot: raises its logit
    qkv[TOK + BOS, C + V] = 1.0                 # key at BOS ...
    bias[V] = 17.0                              # ... always matched a little (fallback when no match)
    head1 = slice(D, 2 * D)
    for part in range(3):
        qkv[:, part * C + D:part * C + 2 * D] = rng.normal(0, 0.3, (C, D))
    proj[head1, :] = rng.normal(0, 0.3, (D, C))
    w["transformer.h.1.attn.c_attn.weight"], w["transformer.h.1.attn.c_proj.weight"] = qkv, proj
    w["transformer.h.1.attn.c_attn.bias"] = bias
    _set(model, w)
    model.eval()
    return model


@pytest.fixture(scope="module")
def hand_model():
    return hand_induction_model()


def test_prefix_matching_targets_by_hand():
    tokens = np.array([[9, 1, 2, 3, 1, 2, 3]])
    t = ind.prefix_matching_targets(tokens)[0]
    expected = np.zeros((7, 7), dtype=bool)
    expected[4, 2] = True     # 2nd "1": the position after the 1st "1"
    expected[5, 3] = True
    expected[6, 4] = True     # 2nd "3": after the 1st "3" comes position 4
    np.testing.assert_array_equal(t, expected)


def test_script_prefix_targets_are_the_exact_ones_plus_position_1_at_segment_ends():
    """The script's loop (BOS + L=4 tokens x 3): at j = 8 and 12 it also reads position 1."""
    seg = 4
    tokens = ind.repeat_sequences(np.array([[5, 6, 7, 8]]), 3, bos_id=0)
    script = ind.script_prefix_targets(12, seg)
    literal = np.zeros((13, 13), dtype=bool)
    for j in range(seg + 1, 3 * seg + 1):                        # prefix_matching_copying.py, with 3 repeats
        for num in range(j // seg):
            literal[j, num * seg + j % seg + 1] = True
    np.testing.assert_array_equal(script, literal)
    exact = ind.prefix_matching_targets(tokens)[0]
    diff = script & ~exact
    assert not (exact & ~script).any()                           # nothing of the exact set is missing
    np.testing.assert_array_equal(np.argwhere(diff), [[8, 1], [12, 1]])
    np.testing.assert_array_equal(np.nonzero(script.any(1))[0], np.arange(5, 13))   # c = (R-1) L rows
    with pytest.raises(ValueError, match="whole segments"):
        ind.script_prefix_targets(10, 4)


def _uniform_attention_model():
    """All weights zero: every head attends uniformly, attn[j, k] = 1 / (j + 1) for k <= j."""
    model = GPT2LMModel(GPT2Config(vocab_size=V, n_positions=P, n_embd=16, n_layer=1, n_head=2, adapter="none"))
    _set(model, {})
    return model.eval()


def test_prefix_matching_known_answers_on_uniform_attention():
    """Uniform attention 1/(j+1): the script sums j // L positions at every scored row j (position 1
    included at j % L == 0), the exact score one fewer at those rows; c = (R-1) L rows either way.
    Without BOS the default equals exact; a sequence off the script's layout is refused."""
    seg, repeats = 5, 4
    model = _uniform_attention_model()
    tokens = ind.repeat_sequences(ind.random_token_sequences(2, seg, np.arange(24), seed=4), repeats, BOS)
    j = np.arange(seg + 1, seg * repeats + 1)
    script = ((j // seg) / (j + 1)).mean()
    exact = ((j // seg - (j % seg == 0)) / (j + 1)).mean()
    got = ind.prefix_matching_scores(model, tokens, bos_id=BOS, segment_len=seg)
    np.testing.assert_allclose(got, script, rtol=1e-5)
    np.testing.assert_allclose(ind.prefix_matching_scores(model, tokens, "exact", bos_id=BOS), exact, rtol=1e-5)
    no_bos = tokens[:, 1:]
    np.testing.assert_allclose(ind.prefix_matching_scores(model, no_bos),
                               ind.prefix_matching_scores(model, no_bos, "exact"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="start with it"):
        ind.prefix_matching_scores(model, no_bos, bos_id=BOS)
    with pytest.raises(ValueError, match="repeated"):
        ind.prefix_matching_scores(model, tokens[:, :-1], bos_id=BOS, segment_len=seg)
    with pytest.raises(ValueError, match="definition"):
        ind.prefix_matching_scores(model, tokens, "llm_interpret", bos_id=BOS)


def test_random_sequences_are_distinct_tokens_from_the_pool():
    pool = ind.token_pool(100, exclude_ratio=0.1, bos_id=50)
    assert pool.min() == 10 and pool.max() == 89 and 50 not in pool and len(pool) == 79
    seqs = ind.random_token_sequences(5, 30, pool, seed=3)
    assert seqs.shape == (5, 30)
    assert all(len(set(row)) == 30 for row in seqs.tolist())
    assert np.isin(seqs, pool).all()
    rep = ind.repeat_sequences(seqs, 3, bos_id=50)
    assert rep.shape == (5, 91) and (rep[:, 0] == 50).all()
    np.testing.assert_array_equal(rep[:, 1:31], rep[:, 61:91])
    with pytest.raises(ValueError, match="distinct tokens"):
        ind.random_token_sequences(1, 80, pool)


def test_hand_model_has_a_previous_token_head(hand_model):
    tokens = ind.repeat_sequences(ind.random_token_sequences(2, 8, np.arange(24), seed=1), 3, BOS)
    probs, _ = next(ind.head_outputs(hand_model, tokens))
    prev_mass = np.diagonal(probs[:, 0], offset=-1, axis1=1, axis2=2)     # [N, T-1]: attention i -> i-1
    assert prev_mass.min() > 0.99


def test_induction_head_scores_high_and_random_head_low(hand_model):
    scores = ind.induction_scores(hand_model, num_sequences=6, segment_len=8, repeats=3,
                                  exclude_ratio=0.0, bos_id=BOS, seed=0, batch_size=3, copying="actual-output")
    prefix, copying = scores["prefix_matching"].mean(0), scores["copying"].mean(0)   # [L, H]
    assert scores["prefix_matching"].shape == (6, 2, H) and scores["copying"].shape == (6, 2, H)
    assert prefix[1, 0] > 0.95 and copying[1, 0] > 0.95          # the hand-built induction head
    assert prefix[1, 1] < 0.3 and copying[1, 1] < 0.6             # the random head
    assert prefix[0, 0] < 0.05                                    # previous-token head: wrong offset
    assert copying[0, 0] < 0.05 and copying[1, 2] < 0.05          # writes no token logit / writes nothing
    assert np.argmax(prefix) == np.ravel_multi_index((1, 0), prefix.shape)


def test_llm_interpret_copying_reads_heads_on_the_embeddings(hand_model):
    """Known answer for the script's definition: fed LayerNorm(embeddings), the induction head's
    query finds no previous-token slot and falls back to BOS, while its value at j is token j's;
    the raised probability of BOS is then 0, so the head scores exactly 0 (it scores > 0.95 on
    what it actually writes). Heads that write nothing score 0 either way."""
    tokens = ind.repeat_sequences(ind.random_token_sequences(3, 20, np.arange(24), seed=2), 1, BOS)
    scores = ind.copying_scores(hand_model, tokens, "llm-interpret")
    np.testing.assert_array_equal(scores[:, 1, 0], 0.0)
    np.testing.assert_array_equal(scores[:, 1, 2:], 0.0)
    assert ind.copying_scores(hand_model, tokens, "actual-output")[:, 1, 0].min() > 0.95


def test_head_outputs_add_up_to_the_model_output():
    """One layer, zero MLP: ln_f(x + sum of head outputs + c_proj bias) @ wte.T are the logits."""
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=16, n_layer=1, n_head=4, adapter="none",
                     initializer_range=0.3)
    model = GPT2LMModel(cfg)
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters():
        if ".mlp.c_fc." in name or ".mlp.c_proj." in name:
            p.update(jt.zeros(p.shape, dtype="float32"))
        elif name.endswith("bias"):
            p.update(jt.array(rng.normal(0, 0.1, p.shape).astype(np.float32)))
    model.eval()
    ids = rng.integers(0, 97, (2, 9))
    (probs, outs), = list(ind.head_outputs(model, ids))
    assert probs.shape == (2, 4, 9, 9) and outs.shape == (2, 4, 9, 16)
    tr = model.transformer
    x = tr.wte.weight.numpy()[ids] + tr.wpe.weight.numpy()[np.arange(9)]
    x = x + outs.sum(1) + tr.h[0].attn.c_proj.bias.numpy()
    u = x - x.mean(-1, keepdims=True)
    hidden = u / np.sqrt((u * u).mean(-1, keepdims=True) + 1e-5) * tr.ln_f.weight.numpy() + tr.ln_f.bias.numpy()
    expected = hidden @ tr.wte.weight.numpy().T
    logits = model(jt.array(ids.astype(np.int32)))[0].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_induction_cli_finds_the_hand_built_head(hand_model, tmp_path):
    from jt_lora.analysis.cli import main

    hand_model.save_pretrained(tmp_path / "hand")
    hand_model.eval()
    out = tmp_path / "out"
    rc = main(["induction", "--init_checkpoint", str(tmp_path / "hand"), "--out", str(out), "--num_sequences", "4",
               "--segment_len", "8", "--repeats", "3", "--exclude_ratio", "0", "--bos_id", str(BOS),
               "--batch_size", "2", "--no_progress"])
    assert rc == 0
    summary = json.loads((out / "induction.json").read_text())
    (record,) = summary["models"]
    assert record["label"] == "base"
    assert np.array(record["prefix_matching"]["mean"]).shape == (2, H)
    assert np.array(record["copying"]["std"]).shape == (2, H)
    top = record["top_heads"][0]
    assert (top["layer"], top["head"]) == (1, 0) and top["prefix_matching"] > 0.95 and top["copying"] == 0.0
    assert summary["settings"]["bos_id"] == BOS and summary["settings"]["copy_len"] == 24
    assert summary["settings"]["copying"] == "llm-interpret"
    assert summary["settings"]["prefix_matching"] == "llm-interpret"
    default_prefix = np.array(record["prefix_matching"]["mean"])
    rc = main(["induction", "--init_checkpoint", str(tmp_path / "hand"), "--out", str(out), "--num_sequences", "4",
               "--segment_len", "8", "--repeats", "3", "--exclude_ratio", "0", "--bos_id", str(BOS),
               "--batch_size", "2", "--no_progress", "--copying", "actual-output"])
    summary = json.loads((out / "induction.json").read_text())
    assert rc == 0 and summary["settings"]["copying"] == "actual-output"
    assert summary["models"][0]["top_heads"][0]["copying"] > 0.95
    assert summary["settings"]["prefix_matching"] == "llm-interpret"
    np.testing.assert_allclose(summary["models"][0]["prefix_matching"]["mean"], default_prefix, rtol=1e-6)
    rc = main(["induction", "--init_checkpoint", str(tmp_path / "hand"), "--out", str(out), "--num_sequences", "4",
               "--segment_len", "8", "--repeats", "3", "--exclude_ratio", "0", "--bos_id", str(BOS),
               "--batch_size", "2", "--no_progress", "--prefix_matching", "exact"])
    summary = json.loads((out / "induction.json").read_text())
    assert rc == 0 and summary["settings"]["prefix_matching"] == "exact"
    exact_prefix = np.array(summary["models"][0]["prefix_matching"]["mean"])
    assert summary["models"][0]["top_heads"][0]["prefix_matching"] > 0.95
    assert (default_prefix >= exact_prefix - 1e-7).all() and np.abs(default_prefix - exact_prefix).max() > 1e-4
    assert (out / "induction.png").stat().st_size > 0 and (out / "induction_config.json").exists()
