"""Decoding generations into the scorer's files, as microsoft/LoRA's gpt2_decode.py does for E2E.

Layout tests use a stand-in ``decode_ids`` (ids are code points) so they need no vocabulary; the
GPT-2 round trip and the run_metric.sh end-to-end run read ../shared's vocab at run time and skip
when it (or Java) is absent.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jt_lora.io import assets
from jt_lora.tasks.e2e import decode as D

ROOT = Path(__file__).resolve().parents[1]
VOCAB = assets.try_find_asset("gpt2-vocab")


def chars(ids):
    return "".join(map(chr, ids))


def ids(text):
    return [ord(c) for c in text]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# Five test lines, three MRs; A appears again after B (grouping is by identical context, not adjacency).
INPUT_ROWS = [
    {"context": "name : A", "completion": "A one . "},
    {"context": "name : A", "completion": "A two .<|endoftext|>junk"},
    {"context": "name : B", "completion": "B one .\n\nsecond paragraph"},
    {"context": "name : A", "completion": "A three ."},
    {"context": "name : C", "completion": "C one ."},
]


@pytest.fixture
def files(tmp_path):
    inp = write_jsonl(tmp_path / "test_formatted.jsonl", INPUT_ROWS)
    samples = [  # out of order, several per MR: the last one in the file for an MR is used (as LoRA)
        {"id": 3, "predict": ids(" A first<|endoftext|>!!!")},
        {"id": 2, "predict": ids(" B pred\n\nrambling on")},
        {"id": 0, "predict": ids(" A later")},
        {"id": 4, "predict": ids("")},
        {"id": 1, "predict": ids(" A even later")},
    ]
    return tmp_path, inp, write_jsonl(tmp_path / "predict.jsonl", samples)


def run(tmp_path, inp, sample, **kw):
    ref, pred = tmp_path / "out" / "ref.txt", tmp_path / "out" / "pred.txt"
    counts = D.decode(sample, inp, str(ref), str(pred), decode_ids=chars, **kw)
    return counts, ref.read_text(encoding="utf-8"), pred.read_text(encoding="utf-8")


def test_groups_by_context_in_first_seen_order_and_writes_the_official_layout(files):
    tmp_path, inp, sample = files
    counts, ref, pred = run(tmp_path, inp, sample)
    assert counts == {"inputs": 3, "references": 5, "samples": 5}
    assert ref == "A one .\nA two .\nA three .\n\nB one .\n\nC one .\n\n"
    # cut at <|endoftext|> and at the first blank line, stripped; an empty output stays a line
    assert pred == "A even later\nB pred\n\n"


def test_written_files_read_back_through_the_scorer(files):
    from jt_lora.tasks.e2e import metrics

    tmp_path, inp, sample = files
    run(tmp_path, inp, sample)
    refs, preds = metrics.load_pair(str(tmp_path / "out" / "ref.txt"), str(tmp_path / "out" / "pred.txt"))
    assert refs == [["A one .", "A two .", "A three ."], ["B one ."], ["C one ."]]
    assert preds == ["A even later", "B pred", ""]


def test_ref_unique_file_groups_lines_instead_of_contexts(files):
    tmp_path, inp, sample = files
    (tmp_path / "uniq.txt").write_text("7\n7\n9\n9\n7\n")  # line 3 (MR A) joins B's group
    _, ref, pred = run(tmp_path, inp, sample, ref_unique_file=str(tmp_path / "uniq.txt"))
    assert ref == "A one .\nA two .\nC one .\n\nB one .\nA three .\n\n"
    # group 7's last sample is id 1 -> "A even later"; group 9's is id 2 -> "B pred"
    assert pred == "A even later\nB pred\n"


def _reference_rule(input_rows, sample_rows, decode_ids):
    """gpt2_decode.py's loop, written from its definition: a dict keyed by context, the references
    appended in input order, and ``refer_dict[key]['sample']`` assigned for every sample line."""
    refer, contexts = {}, []
    for row in input_rows:
        contexts.append(row["context"])
        refer.setdefault(row["context"], {"references": []})["references"].append(
            row["completion"].split("<|endoftext|>")[0].split("\n\n")[0].strip())
    for row in sample_rows:
        refer[contexts[row["id"]]]["sample"] = \
            decode_ids(row["predict"]).split("<|endoftext|>")[0].split("\n\n")[0].strip()
    ref = "".join("".join(r + "\n" for r in v["references"]) + "\n" for v in refer.values())
    return ref, "".join(v["sample"] + "\n" for v in refer.values())


def test_one_mr_with_different_predictions_keeps_the_last_as_the_reference(tmp_path):
    # A batched run: lines of one MR got different predictions, in an order that is neither the
    # input order nor grouped by MR. The first-seen rule would give "A1"/"B1" here.
    rows = [{"context": f"name : {m}", "completion": f"{m} ref {k} ."} for m, k in
            [("A", 0), ("B", 0), ("A", 1), ("C", 0), ("B", 1), ("A", 2)]]
    samples = [{"id": i, "predict": ids(t)} for i, t in
               [(5, " A1"), (1, " B1"), (0, " A2"), (3, " C1"), (4, " B2"), (2, " A3 <|endoftext|> x")]]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    sample = write_jsonl(tmp_path / "s.jsonl", samples)
    _, ref, pred = run(tmp_path, inp, sample)
    assert (ref, pred) == _reference_rule(rows, samples, chars)
    assert pred == "A3\nB2\nC1\n"


def test_lower_and_tokenize_as_lora(files):
    tmp_path, inp, sample = files
    _, ref, pred = run(tmp_path, inp, sample, lower=True, tokenize=True)
    assert ref.splitlines()[0] == "a one ."
    assert D.post_process("It's £20-25, ok.", tokenize=True, lower=True) == "it ' s £ 20 - 25 , ok ."


def test_line_break_inside_a_text_becomes_a_space():
    # LoRA would write it through and shift every later line of the file.
    assert D.clean_text(" one\ntwo\r\nthree\u2028four <|endoftext|> x") == "one two three four"


def test_input_without_prediction_is_an_error_naming_it(files, tmp_path):
    _, inp, _ = files
    sample = write_jsonl(tmp_path / "partial.jsonl", [{"id": 0, "predict": ids("x")}, {"id": 2, "predict": ids("y")}])
    with pytest.raises(D.DecodeError, match=r"1 of 3 inputs have no prediction .*input line 5, context 'name : C'"):
        run(tmp_path, inp, sample)


def test_sample_id_outside_the_input_file_is_an_error(files, tmp_path):
    _, inp, _ = files
    sample = write_jsonl(tmp_path / "bad.jsonl", [{"id": 5, "predict": [1]}])
    with pytest.raises(D.DecodeError, match=r"bad.jsonl:1: id 5 is not a line index .*0\.\.4"):
        run(tmp_path, inp, sample)


def test_failed_run_leaves_existing_outputs_untouched_and_no_temp_files(files, tmp_path):
    _, inp, sample = files
    out = tmp_path / "out"
    run(tmp_path, inp, sample)
    before = (out / "ref.txt").read_bytes(), (out / "pred.txt").read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": 0}])
    with pytest.raises(D.DecodeError, match="no 'predict'"):
        run(tmp_path, inp, bad)
    assert ((out / "ref.txt").read_bytes(), (out / "pred.txt").read_bytes()) == before
    assert sorted(p.name for p in out.iterdir()) == ["pred.txt", "ref.txt"]


def test_cli_reports_missing_file(tmp_path, capsys):
    code = D.main(["--sample_file", str(tmp_path / "none.jsonl"), "--input_file", str(tmp_path / "none2.jsonl"),
                   "--output_ref_file", str(tmp_path / "r"), "--output_pred_file", str(tmp_path / "p")])
    assert code == 2
    assert "input_file not found" in capsys.readouterr().err


@pytest.mark.skipif(VOCAB is None, reason="GPT-2 vocab not found (scripts/download_data.sh)")
def test_gpt2_ids_round_trip_through_the_real_tokenizer(tmp_path):
    from jt_lora.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    inp = write_jsonl(tmp_path / "in.jsonl", [{"context": "name : The Eagle", "completion": "The Eagle is a pub . "}])
    # As LoRA's beam search writes them: text, eos (50256), then zero padding (id 0 is "!").
    predict = tok.encode(" The Eagle is a café, £20-25.") + [50256, 0, 0, 0]
    sample = write_jsonl(tmp_path / "p.jsonl", [{"id": 0, "predict": predict}])
    args = ["--vocab", str(VOCAB), "--sample_file", sample, "--input_file", inp,
            "--output_ref_file", str(tmp_path / "ref.txt"), "--output_pred_file", str(tmp_path / "pred.txt")]
    assert D.main(args) == 0
    assert (tmp_path / "pred.txt").read_text(encoding="utf-8") == "The Eagle is a café, £20-25.\n"
    assert (tmp_path / "ref.txt").read_text(encoding="utf-8") == "The Eagle is a pub .\n\n"


@pytest.mark.skipif(VOCAB is None or shutil.which("java") is None, reason="needs the GPT-2 vocab and Java")
def test_run_metric_sh_decodes_then_scores(tmp_path):
    pytest.importorskip("pycocoevalcap")
    from jt_lora.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    rows = [{"context": "name : A", "completion": "A is a pub ."}, {"context": "name : A", "completion": "A is a bar ."},
            {"context": "name : B", "completion": "B serves food ."}]
    inp = write_jsonl(tmp_path / "test_formatted.jsonl", rows)
    preds = [" A is a pub .", " A is a pub .", " B serves cheap food ."]
    sample = write_jsonl(tmp_path / "predict.jsonl",
                         [{"id": i, "predict": tok.encode(p) + [50256]} for i, p in enumerate(preds)])
    proc = subprocess.run(["bash", str(ROOT / "run_metric.sh"), "--sample_file", sample, "--input_file", inp],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(scores) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert (tmp_path / "e2e_ref.txt").read_text() == "A is a pub .\nA is a bar .\n\nB serves food .\n\n"
    assert (tmp_path / "e2e_pred.txt").read_text() == "A is a pub .\nB serves cheap food .\n"
    # Same numbers as scoring the two written files directly (BLEU/NIST need no Java).
    from jt_lora.tasks.e2e import metrics

    refs, hyps = metrics.load_pair(str(tmp_path / "e2e_ref.txt"), str(tmp_path / "e2e_pred.txt"))
    assert scores["BLEU"] == pytest.approx(metrics.bleu_score(refs, hyps), abs=1e-12)
    assert scores["NIST"] == pytest.approx(metrics.nist_score(refs, hyps), abs=1e-12)
    # "B serves cheap food": LCS 3 of 4 output / 3 reference tokens; "A is a pub" matches exactly.
    f = 2.44 * 0.75 * 1.0 / (1.0 + 1.44 * 0.75)
    assert scores["ROUGE_L"] == pytest.approx((1 + f) / 2, abs=1e-12)
