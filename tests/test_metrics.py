"""E2E metrics: hand-computed values, nltk's BLEU where it coincides, the official scorer's reading rules.

Java-dependent metrics (METEOR, ROUGE_L, CIDEr go through Stanford's PTBTokenizer) run once for the
module through the real command line (`python -m jt_lora.metrics --json`) on a 3-input corpus whose
ROUGE_L and CIDEr are computed by hand below; they skip when Java or pycocoevalcap is missing.
The `OFFICIAL` numbers were produced by the official scorer (tuetschek/e2e-metrics
`measure_scores.py -p` with pycocoevalcap 1.2) on the same two files.
"""

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jt_lora.tasks.e2e import metrics as M

ROOT = Path(__file__).resolve().parents[1]

# A 3-input corpus: a short output, an empty output, and an exact match of one of two references.
HAND_REF = "The cat sat on the mat.\n\nDogs bark loudly at night!\n\nBirds fly south\nBirds migrate south in winter\n"
HAND_PRED = "The cat sat.\n\nBirds fly south\n"
HAND_REFS = [["The cat sat on the mat."], ["Dogs bark loudly at night!"], ["Birds fly south", "Birds migrate south in winter"]]
HAND_PREDS = ["The cat sat.", "", "Birds fly south"]
OFFICIAL = {"BLEU": 0.010640940826061438, "NIST": 0.3525008940237081, "METEOR": 0.2968453565429023,
            "ROUGE_L": 0.5429553264604811, "CIDEr": 2.886824906326401}

HAS_JAVA = shutil.which("java") is not None
HAS_COCO = importlib.util.find_spec("pycocoevalcap") is not None
needs_java = pytest.mark.skipif(not (HAS_JAVA and HAS_COCO), reason="METEOR/PTBTokenizer need Java and pycocoevalcap "
                                "(apt-get install default-jre-headless; pip install pycocoevalcap)")


def write(path: Path, text: str) -> str:
    path.write_bytes(text.encode("utf-8"))
    return str(path)


# ---------------------------------------------------------------- tokenisation (mteval-v13a basic)

@pytest.mark.parametrize("text, tokens", [
    ("Hello, world.", ["Hello", ",", "world", "."]),
    ("It costs £20-25.", ["It", "costs", "£20", "-", "25", "."]),  # dash split after a digit only
    ("rated 5.5 stars, 1,000 reviews", ["rated", "5.5", "stars", ",", "1,000", "reviews"]),
    ("it's a high-end place", ["it's", "a", "high-end", "place"]),  # ' and - inside words stay
    ("(near) the river/park; ok?", ["(", "near", ")", "the", "river", "/", "park", ";", "ok", "?"]),
    ("Tom &amp; Jerry &quot;x&quot; <skipped>", ["Tom", "&", "Jerry", '"', "x", '"']),
    ("  spaced \t out\u00a0here ", ["spaced", "out", "here"]),
    ("", [""]),  # an empty output is one empty token in pymteval
])
def test_mteval_tokenize(text, tokens):
    assert M.mteval_tokenize(text) == tokens


# ---------------------------------------------------------------- BLEU

def test_bleu_equals_nltk_corpus_bleu_on_long_matching_outputs():
    """With every output >= 4 tokens and every n-gram order matched, pymteval's BLEU is textbook BLEU."""
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    refs = [
        ["The Eagle is a cheap coffee shop near Burger King.", "Near Burger King, The Eagle serves cheap coffee."],
        ["Zizzi is a family friendly pub in the city centre.", "In the city centre there is a pub called Zizzi.",
         "Zizzi, a pub in the centre, welcomes families."],
        ["The Mill serves Italian food by the river for £20-25."],
    ]
    preds = ["The Eagle is a coffee shop near Burger King.",
             "zizzi is a pub in the city centre that is family friendly.",
             "By the river, The Mill serves Italian food."]
    tok = lambda s: [t.lower() for t in M.mteval_tokenize(s)]  # noqa: E731
    expected = nltk_bleu.corpus_bleu([[tok(r) for r in rs] for rs in refs], [tok(p) for p in preds])
    assert 0.3 < expected < 0.9
    assert M.bleu_score(refs, preds) == pytest.approx(expected, abs=1e-12)


def test_bleu_brevity_penalty_and_pymteval_quirks_by_hand():
    # Output "the cat sat ." (4 tokens), "" (one empty token), "birds fly south" (3 tokens).
    # n-gram counts 8, 5, 2, -1 (pymteval adds len-n+1 even when negative; floored at 1e-9);
    # hits 7, 4, 2, 0 (floored at 1e-15); closest reference lengths 7 + 6 + 3 = 16 against c = 8.
    expected = math.exp(1 - 16 / 8) * (7 / 8 * 4 / 5 * 2 / 2 * 1e-15 / 1e-9) ** 0.25
    assert M.bleu_score(HAND_REFS, HAND_PREDS) == pytest.approx(expected, rel=1e-12)
    assert M.bleu_score(HAND_REFS, HAND_PREDS) == pytest.approx(OFFICIAL["BLEU"], abs=5e-5)


def test_bleu_is_case_insensitive_and_can_exceed_one_like_the_official_scorer():
    # 4-gram count (6-3) + (1-3) = 1 with 3 hits; 3-gram count 3 with 4 hits: (1*1*4/3*3)^(1/4) = sqrt(2).
    assert M.bleu_score([["THE CAT SAT ON THE MAT"], ["DOG"]], ["the cat sat on the mat", "dog"]) == pytest.approx(math.sqrt(2))


def test_bleu_closest_reference_length_prefers_the_shorter_on_a_tie():
    # Output of 4 tokens, references of 2 and 6 tokens: both 2 away, so r = 2 and there is no penalty;
    # had the longer one been taken, the brevity penalty exp(1 - 6/4) would apply.
    refs = [["a b", "a b c d e f"]]
    score = M.bleu_score(refs, ["a b c d"])
    assert score == pytest.approx(1.0)


# ---------------------------------------------------------------- NIST

BETA = -math.log(0.5) / math.log(1.5) ** 2  # mteval: penalty 0.5 at 2/3 of the reference length


def test_nist_information_weights_by_hand():
    # All reference n-grams occur once in 10 reference tokens: each matched unigram carries
    # log2(10/1); longer n-grams carry log2(1/1) = 0. Output unigrams: 10.
    refs = [["a b c d e"], ["f g h i j"]]
    assert M.nist_score(refs, ["a b c d e", "k l m n o"]) == pytest.approx(5 * math.log2(10) / 10)
    # One token shorter: 9 output unigrams and the length penalty at ratio 9/10.
    expected = math.exp(-BETA * math.log(0.9) ** 2) * 5 * math.log2(10) / 9
    assert M.nist_score(refs, ["a b c d e", "k l m n"]) == pytest.approx(expected)


def test_nist_multi_reference_prefix_counts_by_hand():
    # References "the cat sat on mats" / "the dog sat on rugs": 10 tokens; the, sat, on twice.
    # Unigrams: 3*log2(10/2) + 2*log2(10/1) over 5. Bigrams: the cat = log2(2/1), on mats =
    # log2(2/1), cat sat = log2(1/1), sat on = log2(2/2): 2 over 4. Trigrams: only sat on mats =
    # log2(2/1): 1 over 3. 4-grams: 0 over 2; 5-grams: 0 over 1. Lengths equal: no penalty.
    refs = [["the cat sat on mats", "the dog sat on rugs"]]
    expected = (3 * math.log2(5) + 2 * math.log2(10)) / 5 + 2 / 4 + 1 / 3
    assert M.nist_score(refs, ["The cat sat on mats"]) == pytest.approx(expected)


def test_nist_zero_output_count_scores_that_order_zero():
    # Every output 2 tokens: the 3-gram count is 0 (pymteval divides by zero there). Unigrams
    # a, b carry log2(2/1) each over 2 tokens; the bigram carries log2(1/1) = 0.
    assert M.nist_score([["a b"]], ["a b"]) == pytest.approx(1.0)


# ---------------------------------------------------------------- reading files as the official scorer

def test_reference_groups_blank_separated_crlf_and_no_final_newline(tmp_path):
    ref = write(tmp_path / "ref.txt", "r1 a \r\n r1 b\r\n\r\nr2 a\r\n\r\nr3 a\nr3 b")
    assert M.read_references(ref) == [["r1 a", "r1 b"], ["r2 a"], ["r3 a", "r3 b"]]


def test_reference_file_without_blank_line_is_single_reference(tmp_path):
    # The official reader: one group only -> one reference per line (also with a trailing blank).
    assert M.read_references(write(tmp_path / "a.txt", "x\ny\nz\n")) == [["x"], ["y"], ["z"]]
    assert M.read_references(write(tmp_path / "b.txt", "x\ny\n\n")) == [["x"], ["y"]]


@pytest.mark.parametrize("text, where", [("a\n\n\nb\n", "lines 2 and 3 are both blank"), ("\na\n\nb\n", "line 1 is blank")])
def test_reference_group_without_references_is_an_error(tmp_path, text, where):
    with pytest.raises(M.MetricsError, match=where):
        M.read_references(write(tmp_path / "ref.txt", text))


def test_empty_prediction_lines_are_kept(tmp_path):
    assert M.read_predictions(write(tmp_path / "p.txt", "a\n\n  \nb\n")) == ["a", "", "", "b"]


def test_count_mismatch_names_both_counts(tmp_path):
    ref = write(tmp_path / "ref.txt", "a\nb\n\nc\n")
    pred = write(tmp_path / "pred.txt", "a\nb\nc\n")
    with pytest.raises(M.MetricsError) as e:
        M.load_pair(ref, pred)
    assert "3 predictions" in str(e.value) and "2 inputs" in str(e.value)
    assert "pred.txt" in str(e.value) and "ref.txt" in str(e.value)


def test_missing_file_is_named(tmp_path, capsys):
    pred = write(tmp_path / "pred.txt", "a\n")
    assert M.main(["--ref", str(tmp_path / "nope.txt"), "--pred", pred]) == 2
    assert f"reference file not found: {tmp_path / 'nope.txt'}" in capsys.readouterr().err


def test_missing_java_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    ref, pred = write(tmp_path / "r.txt", HAND_REF), write(tmp_path / "p.txt", HAND_PRED)
    assert M.main(["--ref", ref, "--pred", pred, "--json"]) == 2
    out = capsys.readouterr()
    assert "apt-get install default-jre-headless" in out.err and out.out == ""


def test_table_shows_official_and_paper_scale():
    table = M.format_table({"BLEU": 0.7041, "NIST": 8.8512, "METEOR": 0.4683, "ROUGE_L": 0.7182, "CIDEr": 2.5301})
    lines = table.splitlines()
    assert lines[1].split() == ["BLEU", "0.7041", "70.41"]
    assert lines[2].split() == ["NIST", "8.8512", "8.85"]
    assert lines[5].split() == ["CIDEr", "2.5301", "2.53"]


# ---------------------------------------------------------------- full scorer (Java), one run

@pytest.fixture(scope="module")
def cli_scores(tmp_path_factory):
    if not (HAS_JAVA and HAS_COCO):
        pytest.skip("Java or pycocoevalcap missing")
    d = tmp_path_factory.mktemp("metrics")
    ref, pred = write(d / "ref.txt", HAND_REF), write(d / "pred.txt", HAND_PRED)
    proc = subprocess.run([sys.executable, "-m", "jt_lora.metrics", "--ref", ref, "--pred", pred, "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_java
def test_cli_last_line_is_json_with_the_five_metrics(cli_scores):
    scores = json.loads(cli_scores.strip().splitlines()[-1])
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert "ROUGE_L" in cli_scores.splitlines()[4]  # the table comes first


@needs_java
def test_rouge_l_hand_counted(cli_scores):
    # After PTB tokenisation (lowercase, punctuation dropped): "the cat sat" vs "the cat sat on the
    # mat": LCS 3, P = 1, R = 1/2, F(beta=1.2) = 2.44*P*R / (R + 1.44*P). The empty output scores 0,
    # the exact match 1 (precision and recall are each maximised over the references).
    f1 = 2.44 * 1 * 0.5 / (0.5 + 1.44 * 1)
    assert json.loads(cli_scores.splitlines()[-1])["ROUGE_L"] == pytest.approx((f1 + 0 + 1) / 3, abs=1e-12)


@needs_java
def test_cider_hand_computed(cli_scores):
    # No n-gram is shared between inputs, so every idf is log(3) and cancels in the cosines.
    # Input 1: "the cat sat" vs "the cat sat on the mat": unigram cosine with clipping 4/sqrt(3*8),
    # bigram 2/sqrt(2*5), trigram 1/(1*2), no 4-gram; gaussian length penalty on the bigram counts
    # (2 vs 5): exp(-9/72). Input 2 (empty) scores 0. Input 3: exact match gives [1, 1, 1, 0];
    # against "birds migrate south in winter" only the unigrams, 2/sqrt(15), with exp(-4/72); the
    # sum is averaged over 4 orders and 2 references. CIDEr-D multiplies by 10.
    s1 = 10 * math.exp(-9 / 72) * (4 / math.sqrt(24) + 2 / math.sqrt(10) + 0.5 + 0) / 4
    s3 = 10 * (3 + 2 / math.sqrt(15) * math.exp(-4 / 72)) / 4 / 2
    assert json.loads(cli_scores.splitlines()[-1])["CIDEr"] == pytest.approx((s1 + 0 + s3) / 3, abs=1e-12)


@needs_java
def test_all_five_agree_with_the_official_scorer(cli_scores):
    scores = json.loads(cli_scores.splitlines()[-1])
    for name, value in OFFICIAL.items():
        assert scores[name] == pytest.approx(value, abs=5e-5), name
    assert 0 < scores["METEOR"] < 1
