"""The InA study command: its measures against their definitions, flag checks, and (marked
``study``) a tiny end-to-end run with all five variants that is killed and resumed."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jt_lora import study

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- measures


def _js_by_hand(p, q):
    """Jensen-Shannon divergence of two distributions from its definition, in nats."""
    total = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log(a / m)
        if b > 0:
            total += 0.5 * b * math.log(b / m)
    return total


def _causal_maps(rng, layers, heads, t):
    logits = rng.normal(size=(layers, heads, t, t))
    logits = np.where(np.tril(np.ones((t, t))) > 0, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_js_divergence_bounds_and_value():
    rng = np.random.default_rng(0)
    t = 6
    count = np.zeros((t, t))
    count[:4, :4] = 3       # positions 4, 5 are padding in every example
    p, q = _causal_maps(rng, 2, 3, t), _causal_maps(rng, 2, 3, t)
    js = study.js_divergence_by_layer(p, q, count)
    expected = [np.mean([_js_by_hand(p[l, h, i], q[l, h, i]) for h in range(3) for i in range(4)]) for l in range(2)]
    np.testing.assert_allclose(js, expected, rtol=1e-10)
    assert np.all(study.js_divergence_by_layer(p, p, count) == 0)
    # disjoint supports reach the bound ln 2
    a = np.zeros((1, 1, 2, 2)); a[..., 1, 0] = 1; a[..., 0, 0] = 1
    b = np.zeros((1, 1, 2, 2)); b[..., 1, 1] = 1; b[..., 0, 0] = 1
    np.testing.assert_allclose(study.js_divergence_by_layer(a, b, np.ones((2, 2))), [math.log(2) / 2])


def test_rank_correlation_is_spearman():
    assert study.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert study.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # 1 - 6 sum d^2 / (n (n^2 - 1)) for distinct ranks: d = (0, 1, -1, 0, 0) -> 1 - 12/120
    assert study.rank_correlation([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    # ties take their mean rank: ranks (0.5, 0.5, 2) vs (0, 1, 2) -> Pearson of those ranks
    ra, rb = np.array([0.5, 0.5, 2.0]), np.array([0.0, 1.0, 2.0])
    assert study.rank_correlation([1, 1, 5], [1, 2, 3]) == pytest.approx(np.corrcoef(ra, rb)[0, 1])


def test_variants_and_layers_parse():
    vs = study.parse_variants("full,lora,ina:0.1,ina:0.3,ina:0.9")
    assert [v.name for v in vs] == ["full", "lora", "ina0.1", "ina0.3", "ina0.9"]
    assert [v.label for v in vs] == ["full FT", "LoRA", "InA 10%", "InA 30%", "InA 90%"]
    assert vs[3].train_flags() == ["--adapter", "ina", "--lora_inhibition", "0.3"]
    for bad, words in [("ina", "unknown"), ("ina:1.5", "(0, 1)"), ("lora,lora", "repeated"), ("dora", "unknown")]:
        with pytest.raises(study.StudyError, match=words.replace("(", r"\(").replace(")", r"\)")):
            study.parse_variants(bad)
    assert study.default_layers(24) == [0, 1, 2, 3, 20, 21, 22, 23]
    assert study.default_layers(2) == [0, 1]
    assert study.parse_layers("0-1,-1", 12) == [0, 1, 11]
    with pytest.raises(study.StudyError, match="layer 12"):
        study.parse_layers("12", 12)


def _cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "jt_lora.study", *argv], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def test_bad_flags_stop_before_writing(tmp_path):
    out = tmp_path / "out"
    data = tmp_path / "d.jsonl"
    data.write_text('{"context": [1], "completion": [2]}\n')
    common = ["--base", str(tmp_path), "--train_data", str(data), "--eval_data", str(data),
              "--test_data", str(data), "--test_formatted", str(data), "--out", str(out)]
    r = _cli(*common, "--variants", "full,ina:2")
    assert r.returncode == 2 and "--variants" in r.stderr and "Traceback" not in r.stderr
    r = _cli(*common, "--train_args", "--adapter ia3")
    assert r.returncode == 2 and "--train_args" in r.stderr
    r = _cli(*common[:-2], "--out", str(data))
    assert r.returncode == 2 and "is a file" in r.stderr
    r = _cli("--train_data", str(data))
    assert r.returncode == 2 and "--base is required" in r.stderr
    cfg = tmp_path / "c.json"
    cfg.write_text('{"base": "x",\n "bogus": 1}')
    r = _cli("--config", str(cfg))
    assert r.returncode == 2 and "unknown keys ['bogus']" in r.stderr
    cfg.write_text('{"base": "x",\n "out" 1}')
    r = _cli("--config", str(cfg))
    assert r.returncode == 2 and f"{cfg}:2:8" in r.stderr
    assert not out.exists()
