"""The InA study command: its measures against their definitions, flag checks, and (marked
``study``) a tiny end-to-end run with all five variants that is killed and resumed."""
import json
import re
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


# ----------------------------------------------------------------------------- end to end


def _prepare(tmp_path):
    """E2E data as the demo makes it (train = first 300 valid examples), small eval/test files, and a
    tiny random GPT-2 base (the demo's shape)."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(ROOT / "examples" / "NLG" / "prepare_e2e.py"), "--out_dir", str(data),
                    "--train_from_valid", "300"], check=True, capture_output=True, cwd=ROOT)
    for src, dst, n in (("valid", "eval", 40), ("test", "test_small", 24), ("test_formatted", "test_small_formatted", 24)):
        lines = (data / f"{src}.jsonl").read_text().splitlines(keepends=True)[:n]
        (data / f"{dst}.jsonl").write_text("".join(lines))
    subprocess.run([sys.executable, "-c", (
        "import numpy as np, sys\n"
        "from jt_lora import GPT2Config, GPT2LMModel\n"
        "np.random.seed(0)\n"
        "GPT2LMModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, adapter='none')).save_pretrained(sys.argv[1])\n"),
        str(tmp_path / "base")], check=True, capture_output=True, cwd=ROOT)
    return data


def _study_argv(tmp_path, data):
    return [sys.executable, "-m", "jt_lora.study", "--base", str(tmp_path / "base"),
            "--train_data", str(data / "train.jsonl"), "--eval_data", str(data / "eval.jsonl"),
            "--eval_examples", "24", "--test_data", str(data / "test_small.jsonl"), "--seq_len", "128",
            "--train_args", "--max_step 30 --train_batch_size 8 --lr 0.01 --warmup_step 5 --label_smooth 0.1 "
                            "--save_interval 5 --log_interval 10 --no_plot",
            "--variant_args", '{"full": "--lr 0.001"}',
            "--generate_args", "--beam 2 --eval_len 12 --batch_size 8 --unique_contexts "
                               "--eos_token_id 628 --eos_token_id 50256",
            "--out", str(tmp_path / "out"), "--no_progress"]


@pytest.mark.study
def test_tiny_study_end_to_end_survives_kill_9(tmp_path):
    """All five variants of the InA study on the demo's tiny random GPT-2, killed with SIGKILL while
    the third variant trains, then resumed by running the same command again."""
    data = _prepare(tmp_path)
    argv = _study_argv(tmp_path, data)
    out = tmp_path / "out"
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while not list((out / "variants" / "ina0.1" / "train").glob("checkpoint-*")):
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.time() < deadline, "no InA 10% checkpoint within 10 minutes"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {p.name: json.loads(p.read_text())["finished"] for p in (out / "state").glob("*.json")}
    assert {"full.train.json", "full.score.json", "lora.train.json", "lora.score.json"} <= set(done_before)
    assert "ina0.1.train.json" not in done_before

    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, finished in done_before.items():   # finished stages are not redone
        assert json.loads((out / "state" / name).read_text())["finished"] == finished, name
    assert "--resume" in (out / "logs" / "ina0.1.train.log").read_text()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == {}
    assert summary["models"] == ["base", "full FT", "LoRA", "InA 10%", "InA 30%", "InA 90%"]
    assert summary["layers"] == [0, 1]
    for name, rec in summary["variants"].items():
        assert set(rec["scores"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}, name
    m = summary["measures"]
    assert m["base"]["js_from_base"] == [0.0, 0.0]
    assert "js_from_full" not in m["full FT"]
    for lab in ("LoRA", "InA 10%", "InA 30%", "InA 90%"):
        js = np.array(m[lab]["js_from_base"] + m[lab]["js_from_full"])
        assert np.all((js > 0) & (js < math.log(2))), (lab, js)
        assert len(m[lab]["importance_rank_corr_base"]) == 2
    assert (out / "attention_table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "study.md").read_text()
    assert "| 1 | ![base layer 1](" in md and "InA 90%" in md and "## Task scores" in md
    for link in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (out / link).is_file(), link
