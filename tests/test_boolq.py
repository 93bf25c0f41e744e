"""BoolQ: conversion (template, passage truncation, splits, bad lines, caching), accuracy from text
and by log-likelihood against hand computations, and the wrappers end to end on a tiny model.

Every BoolQ-format file here is written by the tests (official fields, one object per line)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jt_lora.io import assets
from jt_lora.tasks.boolq import data as boolq
from jt_lora.tasks.boolq.data import Example
from jt_lora.tasks.boolq.evaluate import parse_answer, score

ROOT = Path(__file__).resolve().parents[1]
VOCAB = assets.try_find_asset("gpt2-vocab/encoder.json")
needs_vocab = pytest.mark.skipif(VOCAB is None, reason="GPT-2 vocab not found (scripts/download_data.sh)")
YES, NO = 3763, 645  # " yes", " no" in GPT-2
FILLER = ("The river flows through the old town and past the mill where the farmers bring their grain "
          "every autumn before the first snow falls on the hills . ")

RECORDS = [
    {"question": "is the mill on the river", "title": "Old Mill", "passage": "The mill stands on the river.",
     "answer": True},
    {"question": "does it snow in autumn?", "title": "Climate", "passage": FILLER * 6, "answer": False},
    {"question": "do farmers bring grain to the mill", "title": "Old Mill", "passage": FILLER * 9, "answer": True},
    {"question": "is the town new", "title": "", "passage": "The town is very old.", "answer": False},
    {"question": "is the hill high", "title": "Hills", "passage": FILLER * 2, "answer": True},
]


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def _many(n, seed=0, shared=3):
    """n examples; every ``shared`` consecutive questions share one passage (as in BoolQ)."""
    rng = np.random.default_rng(seed)
    return [{"question": f"is statement {i} true", "title": f"Page {i // shared}",
             "passage": f"Passage {i // shared}. " + FILLER * int(rng.integers(1, 3)), "answer": bool(rng.random() < 0.6)}
            for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    if VOCAB is None:
        pytest.skip("GPT-2 vocab not found")
    from jt_lora.models.tokenizer import load_tokenizer
    return load_tokenizer()


# ----------------------------------------------------------------------------- reading, template


def test_read_and_prompt_template(tmp_path):
    read = boolq.read_boolq(_write_jsonl(tmp_path / "b.jsonl", RECORDS[:1] + [""] + RECORDS[3:4]))
    assert read.examples == [Example("is the mill on the river", "The mill stands on the river.", True, "Old Mill", 1),
                             Example("is the town new", "The town is very old.", False, "", 3)]
    first, untitled = read.examples
    assert boolq.render_prompt(first) == "Old Mill: The mill stands on the river.\nQuestion: is the mill on the river?\nAnswer:"
    # no title: no ": " prefix; an existing "?" is not doubled
    assert boolq.render_prompt(untitled) == "The town is very old.\nQuestion: is the town new?\nAnswer:"
    assert boolq.render_prompt(Example("q?", "p", True, "T")) == "T: p\nQuestion: q?\nAnswer:"
    assert boolq.render_prompt(first, "{passage} Q: {question}? A:") == \
        "The mill stands on the river. Q: is the mill on the river? A:"
    # SuperGLUE's copy names the label "label" and has no title
    sg = boolq.read_boolq(_write_jsonl(tmp_path / "sg.jsonl", [{"question": "q", "passage": "p", "idx": 0, "label": False}]))
    assert sg.examples == [Example("q", "p", False, "", 1)]


@pytest.mark.parametrize("template,error", [("{passage}", "missing ['question']"),
                                            ("{passage} {question} {answer}", "unknown ['answer']"),
                                            ("{passage {question}", "bad template")])
def test_bad_template(template, error):
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        boolq.check_template(template)


@pytest.mark.parametrize("line,reason", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"title": "t", "passage": "p", "answer": true}', "missing field 'question'"),
    ('{"question": "q", "title": "t", "answer": true}', "missing field 'passage'"),
    ('{"question": "q", "title": "t", "passage": "p"}', "missing field 'answer'"),
    ('{"question": "q", "title": "t", "passage": "p", "answer": "yes"}', "'answer' must be true or false"),
    ('{"question": "q", "title": "t", "passage": "p", "answer": 1}', "'answer' must be true or false"),
    ('{"question": "  ", "title": "t", "passage": "p", "answer": true}', "'question' must be a non-empty string"),
    ('{"question": "q", "title": 3, "passage": "p", "answer": true}', "'title' must be a string"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, reason):
    path = _write_jsonl(tmp_path / "train.jsonl", RECORDS[:2] + ["", line, RECORDS[2]])
    with pytest.raises(ValueError) as e:
        boolq.read_boolq(path)
    assert f"{path}:4: " in str(e.value) and reason in str(e.value)
    skipped = boolq.read_boolq(path, skip_bad_lines=True)
    assert [x.line for x in skipped.examples] == [1, 2, 5]
    assert len(skipped.bad_lines) == 1 and skipped.bad_lines[0].startswith(f"{path}:4: ")


@needs_vocab
def test_prepare_reports_bad_line_with_file_and_line(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _many(8) + ['{"question": "q", "passage": "p", "answer": null}'])
    dev = _write_jsonl(tmp_path / "dev.jsonl", RECORDS)
    with pytest.raises(ValueError, match=rf"{train}:9: field 'answer' must be true or false"):
        boolq.prepare_boolq(tmp_path / "out", train_file=train, dev_file=dev, valid_size=2, log=lambda m: None)
    out = subprocess.run([sys.executable, str(ROOT / "examples/BoolQ/prepare_boolq.py"), "--train", str(train),
                          "--dev", str(dev), "--out_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 1 and f"{train}:9:" in out.stderr


# ----------------------------------------------------------------------------- conversion


@needs_vocab
def test_conversion_template_and_encoding(tmp_path, tok):
    dev = _write_jsonl(tmp_path / "dev.jsonl", RECORDS)
    res = boolq.prepare_boolq(tmp_path / "out", dev_file=dev, data_dir=tmp_path / "none", seq_len=512,
                              log=lambda m: None)
    assert set(res) == {"test"}  # no train file: only the official dev file, as test
    formatted = [json.loads(x) for x in (tmp_path / "out/test_formatted.jsonl").read_text().splitlines()]
    encoded = [json.loads(x) for x in (tmp_path / "out/test.jsonl").read_text().splitlines()]
    examples = boolq.read_boolq(dev).examples
    assert [f["context"] for f in formatted] == [boolq.render_prompt(e) for e in examples]  # nothing cut at 512
    assert [f["completion"] for f in formatted] == ["yes", "no", "yes", "no", "yes"]
    for f, e in zip(formatted, encoded):
        assert e["context"] == tok.encode(f["context"]) + [50256]
        assert e["completion"] == ([YES] if f["completion"] == "yes" else [NO]) + [50256]
    r = res["test"]
    assert (r.n_examples, r.n_yes, r.n_no, r.n_truncated) == (5, 3, 2, 0)
    assert r.max_length == max(len(e["context"]) + len(e["completion"]) for e in encoded)
    meta = json.loads((tmp_path / "out/test.jsonl.meta.json").read_text())
    assert meta["settings"]["seq_len"] == 512 and meta["result"]["n_truncated"] == 0


@needs_vocab
def test_truncation_keeps_question_and_answer(tmp_path, tok):
    from jt_lora.training.data import FTDataset

    seq_len = 64
    records = RECORDS + [dict(RECORDS[2], answer=False)]  # same passage and question, other answer
    dev = _write_jsonl(tmp_path / "dev.jsonl", records)
    res = boolq.prepare_boolq(tmp_path / "out", dev_file=dev, seq_len=seq_len, log=lambda m: None)["test"]
    formatted = [json.loads(x) for x in (tmp_path / "out/test_formatted.jsonl").read_text().splitlines()]
    encoded = [json.loads(x) for x in (tmp_path / "out/test.jsonl").read_text().splitlines()]
    examples = boolq.read_boolq(dev).examples
    # hand count: the untruncated prompt + bos + 2 completion tokens exceeds seq_len
    too_long = [len(tok.encode(boolq.render_prompt(e))) + 3 > seq_len for e in examples]
    assert too_long == [False, True, True, False, True, True]
    assert res.n_truncated == sum(too_long) == 4
    for e, f, enc, cut in zip(examples, formatted, encoded, too_long):
        assert len(enc["context"]) + len(enc["completion"]) <= seq_len
        assert f["context"].endswith(f"\nQuestion: {e.question.rstrip('?')}?\nAnswer:")  # question kept whole
        assert enc["completion"][0] == (YES if e.answer else NO)
        head = f"{e.title}: " if e.title else ""
        passage = f["context"][len(head):f["context"].index("\nQuestion: ")]
        assert f["context"].startswith(head) and e.passage.startswith(passage)
        if cut:
            # a word prefix, and the longest one that fits
            assert passage and len(passage) < len(e.passage) and e.passage[len(passage)] == " "
            rest = e.passage[len(passage):].split()
            longer = boolq.render_prompt(e, passage=passage + " " + rest[0])
            assert len(tok.encode(longer)) + 3 > seq_len
        else:
            assert passage == e.passage
    assert formatted[5]["context"] == formatted[2]["context"]  # the cut does not depend on the answer
    assert FTDataset(tmp_path / "out/test.jsonl", seq_len).num_truncated == 0  # the loader cuts nothing


@needs_vocab
def test_question_too_long_names_file_and_line(tmp_path):
    dev = _write_jsonl(tmp_path / "dev.jsonl", RECORDS[:2] + [dict(RECORDS[0], question="is it " + "very " * 80 + "old")])
    with pytest.raises(ValueError, match=rf"{dev}:3: the prompt has \d+ tokens with an empty passage"):
        boolq.prepare_boolq(tmp_path / "out", dev_file=dev, seq_len=64, log=lambda m: None)
    res = boolq.prepare_boolq(tmp_path / "out", dev_file=dev, seq_len=64, skip_bad_lines=True, log=lambda m: None)
    assert res["test"].n_examples == 2 and res["test"].n_bad_lines == 1


@needs_vocab
def test_outputs_cached_until_settings_change(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _many(30))
    dev = _write_jsonl(tmp_path / "dev.jsonl", RECORDS)
    kw = dict(train_file=train, dev_file=dev, valid_size=6, split_by="example", log=lambda m: None)
    first = boolq.prepare_boolq(tmp_path / "out", **kw)
    assert not any(r.cached for r in first.values())
    assert (first["train"].n_examples, first["valid"].n_examples, first["test"].n_examples) == (24, 6, 5)
    assert all(r.cached for r in boolq.prepare_boolq(tmp_path / "out", **kw).values())
    again = boolq.prepare_boolq(tmp_path / "out", **{**kw, "seed": 7})
    assert not again["train"].cached and not again["valid"].cached and again["test"].cached


# ----------------------------------------------------------------------------- splits


def test_seeded_split_disjoint_reproducible_sized():
    examples = [Example(r["question"], r["passage"], r["answer"], r["title"], i + 1) for i, r in enumerate(_many(100))]
    train, valid = boolq.split_train_valid(examples, 0.2, seed=1, split_by="example")
    assert (len(train), len(valid)) == (80, 20)
    assert {e.line for e in train}.isdisjoint({e.line for e in valid})
    assert sorted(e.line for e in train + valid) == list(range(1, 101))
    assert [e.line for e in train] == sorted(e.line for e in train)  # file order kept
    assert boolq.split_train_valid(examples, 0.2, seed=1, split_by="example") == (train, valid)
    assert boolq.split_train_valid(examples, 0.2, seed=2, split_by="example")[1] != valid
    assert len(boolq.split_train_valid(examples, 7, seed=1, split_by="example")[1]) == 7

    # by passage (3 questions each): no passage on both sides, valid overshoots by < 3
    train, valid = boolq.split_train_valid(examples, 20, seed=1)
    assert {e.passage for e in train}.isdisjoint({e.passage for e in valid})
    assert 20 <= len(valid) < 23 and len(train) + len(valid) == 100
    assert boolq.split_train_valid(examples, 20, seed=1) == (train, valid)
    for bad in (0, 100, 2.5, -0.1):
        with pytest.raises(ValueError, match="valid_size"):
            boolq.split_train_valid(examples, bad, seed=1)


# ----------------------------------------------------------------------------- accuracy from text

GOLD = ["yes", "yes", "no", "no", "yes", "no", "no"]
TEXTS = [" Yes.", "no", "No, it is not", "maybe", "", "yesterday", " NO"]


def test_parse_answer():
    assert [parse_answer(t) for t in TEXTS] == ["yes", "no", "no", None, None, None, "no"]
    assert parse_answer("\n yes\n") == "yes" and parse_answer("- yes") is None and parse_answer("true") is None


def test_accuracy_from_text_by_hand():
    report = score(GOLD, [parse_answer(t) for t in TEXTS])
    # correct: 0 (yes), 2 (no), 6 (no); unparseable: 3, 4, 5
    assert (report["n"], report["correct"], report["unparseable"]) == (7, 3, 3)
    assert report["accuracy"] == pytest.approx(3 / 7)
    assert report["confusion"] == {"yes": {"yes": 1, "no": 1, "unparseable": 1},
                                   "no": {"yes": 0, "no": 2, "unparseable": 2}}
    assert report["per_class"]["yes"] == {"n": 3, "correct": 1, "predicted": 1, "recall": pytest.approx(1 / 3)}
    assert report["per_class"]["no"] == {"n": 4, "correct": 2, "predicted": 3, "recall": 0.5}
    assert report["majority_accuracy"] == pytest.approx(4 / 7)


def _eval_cli(args):
    from jt_lora.tasks.boolq import evaluate as eval_boolq
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = eval_boolq.main(args + ["--no_progress"])
    lines = out.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 else None, lines


def _formatted_test(path, gold):
    return _write_jsonl(path, [{"context": f"P{i}\nQuestion: q{i}?\nAnswer:", "completion": g} for i, g in enumerate(gold)])


def test_text_mode_cli_from_text_records(tmp_path, capsys):
    data = _formatted_test(tmp_path / "test_formatted.jsonl", GOLD)
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    code, report, lines = _eval_cli(["--data", str(data), "--predictions", str(preds), "--output_file",
                                     str(tmp_path / "rows.jsonl")])
    assert code == 0 and report["mode"] == "text"
    assert (report["accuracy"], report["n"], report["unparseable"], report["n_missing"]) == (3 / 7, 7, 3, 0)
    assert any(line.split()[:1] == ["yes"] and line.split()[1:] == ["1", "1", "1", "3"] for line in lines)
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in rows] == ["yes", "no", "no", "unparseable", "unparseable", "unparseable", "no"]
    assert "3 unparseable answers" in capsys.readouterr().err
    # the .txt file generate writes beside its JSONL: one prediction per line
    txt = tmp_path / "p.txt"
    txt.write_text("".join(t.replace("\n", " ") + "\n" for t in TEXTS))
    assert _eval_cli(["--data", str(data), "--predictions", str(txt)])[1]["accuracy"] == pytest.approx(3 / 7)


@needs_vocab
def test_text_mode_cli_from_generated_ids(tmp_path, tok, capsys):
    """jt_lora.generate's records: ids cut at the first eos (then 0-padding); gold from the encoded file."""
    gold = ["yes", "no", "no", "yes"]
    data = _write_jsonl(tmp_path / "test.jsonl", [{"context": tok.encode(f"P{i}") + [50256],
                                                   "completion": [YES if g == "yes" else NO, 50256]}
                                                  for i, g in enumerate(gold)])
    texts = [" yes", " no! yes", " Yes", "\n\nNo"]  # -> yes (right), no (right), yes (wrong), no (wrong)
    preds = [tok.encode(t) + [50256] + tok.encode(" yes") + [0, 0] for t in texts]  # after eos: ignored
    path = _write_jsonl(tmp_path / "predict.jsonl", [{"id": i, "predict": p} for i, p in enumerate(preds)][:3])
    code, report, _ = _eval_cli(["--data", str(data), "--predictions", str(path)])
    assert code == 0 and (report["n"], report["correct"], report["n_missing"]) == (3, 2, 1)
    assert report["confusion"]["no"] == {"yes": 1, "no": 1, "unparseable": 0}
    assert "1 of 4 examples have no prediction" in capsys.readouterr().err
    _write_jsonl(path, [{"id": 9, "predict": preds[0]}])
    assert _eval_cli(["--data", str(data), "--predictions", str(path)])[0] == 1
    assert "ids [9] are not in" in capsys.readouterr().err


def test_eval_errors_name_file_and_line(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "t.jsonl", [{"context": "c", "completion": "yes"}, {"context": "c", "completion": "maybe"}])
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": 0, "text": "yes"}])
    assert _eval_cli(["--data", str(data), "--predictions", str(preds)])[0] == 1
    assert f"{data}:2: completion maybe is not" in capsys.readouterr().err
    _formatted_test(data, ["yes"])
    _write_jsonl(preds, [{"id": 0, "text": "yes"}, {"oops": 1}])
    assert _eval_cli(["--data", str(data), "--predictions", str(preds)])[0] == 1
    assert f"{preds}:2: not a prediction record" in capsys.readouterr().err


# ----------------------------------------------------------------------------- log-likelihood


def _peaked_model(seed=0, **config):
    """A random GPT-2 whose weights are large enough that yes/no are never near-ties."""
    from jt_lora import GPT2Config, GPT2LMModel
    from jt_lora.backend import jt

    np.random.seed(seed)
    model = GPT2LMModel(GPT2Config(**{"n_positions": 64, "n_embd": 16, "n_layer": 2, "n_head": 4, "adapter": "none",
                                     **config}))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        base = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
        p.update(jt.array((base + rng.normal(0, 0.5, p.shape)).astype("float32")))
    model.eval()
    return model


def _hand_logp(model, context, ids):
    """log p(id | context) for each id, by an unpadded forward and numpy's log-softmax."""
    from jt_lora.backend import jt
    logits = model(jt.array(np.array([context], dtype="int32")))[0].numpy()[0, -1].astype(np.float64)
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    return logp[ids]


def test_loglik_scores_match_unpadded_forward():
    from jt_lora.tasks.boolq.evaluate import loglik_scores

    model = _peaked_model(vocab_size=97)
    rng = np.random.default_rng(1)
    contexts = [list(rng.integers(0, 97, n)) for n in (5, 17, 1, 9, 12, 3, 30)]
    got = loglik_scores(model, contexts, 11, 42, batch_size=3)  # batches mix lengths: right padding
    want = np.array([_hand_logp(model, c, [11, 42]) for c in contexts])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want[:, 0] - want[:, 1]).min() > 1e-2  # no near-tie: the choices below are robust
    gold = ["yes", "no", "no", "yes", "no", "yes", "yes"]
    predicted = ["yes" if y >= n else "no" for y, n in want]
    report = score(gold, predicted)
    assert report["correct"] == sum(g == p for g, p in zip(gold, predicted))
    # longer prompts keep their last max_len tokens
    np.testing.assert_allclose(loglik_scores(model, contexts[-1:], 11, 42, max_len=8)[0],
                               _hand_logp(model, contexts[-1][-8:], [11, 42]), atol=1e-4)


@needs_vocab
def test_loglik_cli_matches_hand_computation(tmp_path, tok):
    model = _peaked_model(seed=2, vocab_size=50257)
    model.save_pretrained(tmp_path / "base")
    rng = np.random.default_rng(3)
    gold = ["yes", "no", "yes", "yes", "no", "no", "yes", "no", "yes"]
    contexts = [tok.encode(" ".join(["word"] * int(rng.integers(1, 20))) + "\nAnswer:") + [50256] for _ in gold]
    data = _write_jsonl(tmp_path / "test.jsonl", [{"context": c, "completion": [YES if g == "yes" else NO, 50256]}
                                                  for c, g in zip(contexts, gold)])
    code, report, lines = _eval_cli(["--data", str(data), "--init_checkpoint", str(tmp_path / "base"),
                                     "--batch_size", "4", "--output_file", str(tmp_path / "rows.jsonl")])
    assert code == 0
    want = np.array([_hand_logp(model, c, [YES, NO]) for c in contexts])
    assert np.abs(want[:, 0] - want[:, 1]).min() > 1e-2  # no near-tie
    predicted = ["yes" if y >= n else "no" for y, n in want]
    assert 0 < predicted.count("yes") < len(predicted)
    correct = sum(g == p for g, p in zip(gold, predicted))
    assert report["mode"] == "loglik" and report["n"] == 9 and report["unparseable"] == 0
    assert report["correct"] == correct and report["accuracy"] == pytest.approx(correct / 9)
    for g in ("yes", "no"):
        assert report["confusion"][g] == {p: sum(1 for x, y in zip(gold, predicted) if x == g and y == p)
                                          for p in ("yes", "no")} | {"unparseable": 0}
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([[r["logp_yes"], r["logp_no"]] for r in rows], want, atol=1e-4)
    assert lines[0].startswith("gold / predicted")
    assert _eval_cli(["--data", str(data), "--mode", "text"])[0] == 1  # text mode needs --predictions


# ----------------------------------------------------------------------------- end to end


def _run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@needs_vocab
def test_end_to_end_wrappers_on_tiny_model(tmp_path):
    """prepare -> finetune_boolq.sh (2 steps, tiny random GPT-2) -> eval_boolq.sh (loglik) and
    run_inference_boolq.sh (greedy text + accuracy)."""
    train = _write_jsonl(tmp_path / "raw/train.jsonl", _many(24, seed=1))
    dev = _write_jsonl(tmp_path / "raw/dev.jsonl", RECORDS + _many(3, seed=2))
    env = {**os.environ, "PYTHON": sys.executable, "DATA_DIR": str(tmp_path / "prep"), "WORK_DIR": str(tmp_path / "work"),
           "CKPT": "none", "MODEL_CARD": "gpt2.sm", "SEQ_LEN": "96"}
    prep = _run([sys.executable, "examples/BoolQ/prepare_boolq.py", "--train", str(train), "--dev", str(dev),
                 "--out_dir", env["DATA_DIR"], "--seq_len", "96", "--valid_size", "6"], env)
    counts = json.loads(prep.stdout.strip().splitlines()[-1])
    assert counts["test"]["n_examples"] == 8 and counts["test"]["n_truncated"] >= 2
    assert counts["train"]["n_examples"] + counts["valid"]["n_examples"] == 24

    _run(["bash", "examples/BoolQ/finetune_boolq.sh", "--n_layer", "2", "--n_embd", "32", "--n_head", "4",
          "--max_step", "2", "--train_batch_size", "4", "--valid_batch_size", "4", "--warmup_step", "0",
          "--log_interval", "1", "--eval_interval", "2", "--save_interval", "2", "--no_plot"], env)
    config = json.loads((tmp_path / "work/train_config.json").read_text())
    assert config["args"]["seq_len"] == 96 and config["args"]["train_data"] == str(tmp_path / "prep/train.jsonl")
    assert (tmp_path / "work/adapter").is_dir() and (tmp_path / "work/base").is_dir()

    out = _run(["bash", "examples/BoolQ/eval_boolq.sh", "--batch_size", "4", "--no_progress"], env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["mode"] == "loglik" and report["n"] == 8 and report["unparseable"] == 0
    assert 0 <= report["accuracy"] <= 1 and report["correct"] == round(report["accuracy"] * 8)
    assert {g: report["per_class"][g]["n"] for g in ("yes", "no")} == {"yes": counts["test"]["n_yes"],
                                                                      "no": counts["test"]["n_no"]}
    assert sum(sum(row.values()) for row in report["confusion"].values()) == 8
    assert report["n_context_truncated"] == 0 and (tmp_path / "work/eval_boolq.loglik.jsonl").exists()

    out = _run(["bash", "examples/BoolQ/run_inference_boolq.sh", "--max_examples", "3", "--no_progress"], env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["mode"] == "text" and report["n"] == 3 and report["n_missing"] == 5
    assert report["correct"] + report["unparseable"] <= 3
    gen = json.loads((tmp_path / "work/predict.boolq.greedy.config.json").read_text())
    assert gen["beam"] == 1 and gen["seq_len"] == 98 and gen["eval_len"] == 4
