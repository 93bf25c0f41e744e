"""E2E conversion: LoRA's formatted/encoded JSONL, CSV notation, bad input, caching, CLI."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jt_lora.io import assets
from jt_lora.tasks.e2e import data as e2e_data
from jt_lora.tasks.e2e.data import Example

ROOT = Path(__file__).resolve().parents[1]
VOCAB = assets.try_find_asset("gpt2-vocab")
needs_vocab = pytest.mark.skipif(VOCAB is None, reason="GPT-2 vocab not found (scripts/download_data.sh)")

TXT = (
    "name : The Mill | Type : pub | price : £ 20 - 25||The Mill is a pub . \n"
    "name : The Mill | Type : pub | price : £ 20 - 25||It 's a pub called The Mill .\n"
    "name : Zizzi | Type : pub||Zizzi is a pub with a || in its text\n"
)


class CharTokenizer:
    """Stand-in tokenizer (one id per character) to test the record layout without a vocab."""

    def encode_batch(self, texts):
        return [[ord(ch) for ch in t] for t in texts]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_read_txt_like_format_converting_e2e(tmp_path):
    path = _write(tmp_path / "a.txt", TXT.rsplit("\n", 2)[0] + "\n")  # the first two lines
    read = e2e_data.read_txt(path)
    # The line is stripped before splitting, so the text loses its trailing space.
    assert read.examples == [
        Example("name : The Mill | Type : pub | price : £ 20 - 25", "The Mill is a pub .", 1),
        Example("name : The Mill | Type : pub | price : £ 20 - 25", "It 's a pub called The Mill .", 2),
    ]
    assert e2e_data.formatted_records(read.examples)[1] == {
        "context": "name : The Mill | Type : pub | price : £ 20 - 25",
        "completion": "It 's a pub called The Mill .",
    }


@pytest.mark.parametrize(
    "text,line,reason",
    [
        ("a||b\nno separator here\n", 2, "0 '||' separators"),
        ("a||b\nc||d\n\ne||f\n", 3, "a blank line"),
        (TXT, 3, "2 '||' separators"),
        ("a||b\n||text\n", 2, "empty MR"),
        ("a||b\nc||d\nmr||   \n", 3, "empty text"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, line, reason):
    path = _write(tmp_path / "bad.txt", text)
    with pytest.raises(ValueError) as err:
        e2e_data.read_txt(path)
    assert f"{path}:{line}: {reason}" in str(err.value) and "--skip_bad_lines" in str(err.value)
    read = e2e_data.read_txt(path, skip_bad_lines=True)
    assert len(read.bad_lines) == 1 and read.bad_lines[0].startswith(f"{path}:{line}:")
    assert len(read.examples) == text.count("\n") - 1


def test_empty_and_all_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.txt: file is empty"):
        e2e_data.read_txt(_write(tmp_path / "empty.txt", ""))
    with pytest.raises(ValueError, match=r"allbad\.txt: no usable examples \(2 bad lines skipped\)"):
        e2e_data.read_txt(_write(tmp_path / "allbad.txt", "x\ny\n"), skip_bad_lines=True)


def test_limit(tmp_path):
    path = _write(tmp_path / "a.txt", "".join(f"mr{i}||text {i}\n" for i in range(10)))
    assert [e.context for e in e2e_data.read_txt(path, limit=3).examples] == ["mr0", "mr1", "mr2"]


def test_official_mr_to_lora_notation():
    mr = "name[The Mill], eatType[pub], food[English], priceRange[£20-25], customer rating[high], " \
         "area[city centre], familyFriendly[no], near[Café Rouge]"
    assert e2e_data.official_mr_to_lora(mr) == (
        "name : The Mill | Type : pub | food : English | price : £ 20 - 25 | customer rating : high | "
        "area : city centre | family friendly : no | near : Café Rouge"
    )
    assert e2e_data.official_mr_to_lora("priceRange[less than £20]") == "price : less than £ 20"
    for bad in ["name[The Mill", "name[A] eatType[pub]", "just text", ""]:
        with pytest.raises(ValueError, match="meaning representation"):
            e2e_data.parse_official_mr(bad)


def test_lora_tokenize():
    assert e2e_data.lora_tokenize("It's near the centre. It isn't kid-friendly, £20-25.") == \
        "It 's near the centre . It is n't kid - friendly , £ 20 - 25 ."
    assert e2e_data.lora_tokenize("The 'Raja' is  nice") == "The ' Raja ' is nice"


def _csv(path, rows, header=("mr", "ref")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_read_csv(tmp_path):
    path = _csv(tmp_path / "dev.csv", [("name[Zizzi], eatType[pub]", "Zizzi is a pub."),
                                       ("name[Zizzi], priceRange[£20-25]", "Zizzi's prices:\n£20-25.")])
    raw = e2e_data.read_csv(path).examples
    assert raw[0] == Example("name : Zizzi | Type : pub", "Zizzi is a pub.", 2)
    assert raw[1].completion == "Zizzi's prices:\n£20-25." and raw[1].line == 3
    lora = e2e_data.read_csv(path, text_style="lora").examples
    assert lora[1].completion == "Zizzi 's prices : £ 20 - 25 ."


def test_csv_errors_name_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"h\.csv:1: bad CSV header \['MR'\]"):
        e2e_data.read_csv(_csv(tmp_path / "h.csv", [("name[A]",)], header=("MR",)))
    # A quoted field spanning two lines: the bad record after it is on line 4.
    path = _csv(tmp_path / "r.csv", [("name[A]", "two\nlines"), ("name[B", "ref")])
    with pytest.raises(ValueError, match=r"r\.csv:4: not an E2E meaning representation"):
        e2e_data.read_csv(path)
    assert e2e_data.read_csv(path, skip_bad_lines=True).bad_lines[0].startswith(f"{path}:4:")
    path = _csv(tmp_path / "e.csv", [("name[A]", "")])
    with pytest.raises(ValueError, match=r"e\.csv:2: empty ref"):
        e2e_data.read_csv(path)
    with pytest.raises(ValueError, match=r"n\.csv: file has a header but no records"):
        e2e_data.read_csv(_csv(tmp_path / "n.csv", []))


def test_encoded_layout_matches_gpt2_encode():
    ex = [Example("ab", "cd", 1)]
    tok = CharTokenizer()
    assert e2e_data.encode_examples(ex, tok) == [{"context": [97, 98, 50256], "completion": [32, 99, 100, 50256]}]
    assert e2e_data.encode_examples(ex, tok, add_bos=False, add_eos=False) == [
        {"context": [97, 98], "completion": [32, 99, 100]}]


def test_jsonl_bytes_match_json_dumps():
    records = [{"context": [1, 22, 333], "completion": [4, 50256]}, {"context": [], "completion": [7]}]
    assert "".join(e2e_data.encoded_jsonl_lines(records)) == "".join(json.dumps(r) + "\n" for r in records)


@needs_vocab
def test_convert_file_round_trip_and_cache(tmp_path):
    from jt_lora.models.tokenizer import load_tokenizer

    tok = load_tokenizer()
    src = _write(tmp_path / "valid.txt", TXT.rsplit("\n", 2)[0] + "\n")
    out, fmt = tmp_path / "out" / "valid.jsonl", tmp_path / "out" / "valid_formatted.jsonl"
    first = e2e_data.convert_file(src, out, fmt)
    assert not first.cached and first.n_examples == 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    formatted = [json.loads(line) for line in fmt.read_text().splitlines()]
    for r, f in zip(records, formatted):
        assert r["context"][-1] == 50256 and r["completion"][-1] == 50256
        assert tok.decode(r["context"][:-1]) == f["context"]
        assert tok.decode(r["completion"][:-1]) == " " + f["completion"]
        assert r["context"] == tok.encode(f["context"]) + [50256]
    assert fmt.read_text().splitlines()[0] == json.dumps(formatted[0])  # same escaping as the reference
    assert sum(first.length_histogram.values()) == 2 and first.n_longer_than(10) == 2
    assert not list(tmp_path.rglob("*.tmp"))

    mtime = out.stat().st_mtime_ns
    again = e2e_data.convert_file(src, out, fmt)
    assert again.cached and out.stat().st_mtime_ns == mtime and again.n_examples == 2
    assert not e2e_data.convert_file(src, out, fmt, limit=1).cached  # settings changed
    assert e2e_data.convert_file(src, out, fmt, limit=1).cached
    future = time.time() + 5
    os.utime(src, (future, future))  # the source changed after the output was written
    assert not e2e_data.convert_file(src, out, fmt, limit=1).cached
    assert not e2e_data.convert_file(src, out, fmt, limit=1, force=True).cached


@needs_vocab
def test_failed_conversion_leaves_previous_output(tmp_path):
    src = _write(tmp_path / "v.txt", "a||b\n")
    out = tmp_path / "v.jsonl"
    e2e_data.convert_file(src, out)
    before = out.read_bytes()
    _write(src, "a||b\nbroken line\n")
    with pytest.raises(ValueError, match=r"v\.txt:2:"):
        e2e_data.convert_file(src, out)
    assert out.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


@needs_vocab
def test_train_sized_file_converts_in_seconds(tmp_path):
    lines = [f"name : Place {i % 4000} | Type : pub | area : riverside||Place {i % 4000} is a riverside pub , "
             f"review number {i} says it 's fine .\n" for i in range(42_000)]
    src = _write(tmp_path / "train.txt", "".join(lines))
    result = e2e_data.convert_file(src, tmp_path / "train.jsonl", tmp_path / "train_formatted.jsonl")
    assert result.n_examples == 42_000
    assert result.seconds < 30, f"42k lines took {result.seconds:.1f}s"  # ~2s on 2 cores; generous for CI


def _shared(rel):
    path = assets.try_find_asset(rel)
    if path is None:
        pytest.skip(f"{rel} not found")
    return path


@pytest.mark.parametrize("txt,csv_name", [("e2e/test.txt", "e2e-csv/testset_w_refs.csv"),
                                          ("e2e/valid.txt", "e2e-csv/devset.csv")])
def test_csv_conversion_reproduces_lora_txt(txt, csv_name):
    from_txt = e2e_data.read_txt(_shared(txt)).examples
    from_csv = e2e_data.read_csv(_shared(csv_name), text_style="lora").examples
    assert len(from_txt) == len(from_csv)
    assert [e.context for e in from_csv] == [e.context for e in from_txt]  # every MR, same order
    same_text = sum(a.completion == b.completion for a, b in zip(from_txt, from_csv))
    assert same_text / len(from_txt) > 0.985  # the original tokenization is itself inconsistent


def test_first_mr_boundary():
    ex = [Example(mr, "t", i) for i, mr in enumerate("aaabbc")]
    assert [e2e_data.first_mr_boundary(ex, n) for n in (1, 2, 3, 4, 5, 9)] == [3, 3, 3, 5, 5, 6]


def _run_cli(*args, capsys=None):
    """The script in a subprocess, or in-process via main() when given capsys (much faster)."""
    if capsys is None:
        return subprocess.run([sys.executable, str(ROOT / "examples/NLG/prepare_e2e.py"), *args],
                              capture_output=True, text=True, timeout=300)
    spec = importlib.util.spec_from_file_location("prepare_e2e", ROOT / "examples/NLG/prepare_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@needs_vocab
def test_cli_prepares_what_is_found(tmp_path, capsys):
    data = tmp_path / "data"
    _write(data / "e2e" / "valid.txt", "".join(f"name : P{i // 3}||Text {i} .\n" for i in range(30)))
    _csv(data / "e2e-csv" / "testset_w_refs.csv", [("name[Zizzi], eatType[pub]", "Zizzi is a pub.")])
    out = tmp_path / "prepared"
    args = ["--data_dir", str(data), "--out_dir", str(out), "--vocab", str(VOCAB)]

    run = _run_cli(*args)  # once as a real script
    assert run.returncode == 0, run.stderr
    assert "train: not found" in run.stdout and "--train_from_valid" in run.stdout
    assert not (out / "train.jsonl").exists()
    assert len((out / "valid.jsonl").read_text().splitlines()) == 30
    assert json.loads((out / "test_formatted.jsonl").read_text())["context"] == "name : Zizzi | Type : pub"

    run = _run_cli(*args, "--train_from_valid", "10", capsys=capsys)
    assert run.returncode == 0, run.stderr
    assert "DEMO ONLY" in run.stdout and "first 12 examples" in run.stdout  # 10 rounded up to a whole MR
    train = [json.loads(x) for x in (out / "train_formatted.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (out / "valid_formatted.jsonl").read_text().splitlines()]
    assert len(train) == 12 and len(valid) == 18
    assert not {x["context"] for x in train} & {x["context"] for x in valid}
    assert "test:" in run.stdout and "(cached)" in run.stdout

    _write(data / "e2e" / "valid.txt", "good||line\nbad line\n")
    run = _run_cli(*args, "--splits", "valid", capsys=capsys)
    assert run.returncode == 1 and f"{data / 'e2e' / 'valid.txt'}:2:" in run.stderr
    run = _run_cli(*args, "--splits", "valid", "--skip_bad_lines", capsys=capsys)
    assert run.returncode == 0 and "1 bad lines skipped" in run.stdout
