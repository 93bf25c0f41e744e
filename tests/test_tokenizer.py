"""The tiktoken GPT-2 tokenizer gives the reference encoder's ids.

Two references: a small pure-Python GPT-2 BPE written here (regex split, byte-to-unicode map,
lowest-rank merge first: the algorithm of GPT-2's and microsoft/LoRA's encoder.py), and
transformers' GPT2Tokenizer when installed (in transformers 5 it is backed by the Rust `tokenizers`
library, an implementation independent of tiktoken). The vocab and E2E data are found at run time
through jt_lora.io.assets (scripts/test.sh downloads them when no copy is found); only the tests that
read them skip without them, the error-path tests always run.
"""

import functools
import json
from pathlib import Path

import pytest

from jt_lora.io import assets
from jt_lora.models.tokenizer import EOS_TOKEN_ID, load_tokenizer

VOCAB = assets.try_find_asset("gpt2-vocab/encoder.json")
VOCAB = VOCAB.parent if VOCAB is not None else None
needs_vocab = pytest.mark.skipif(VOCAB is None, reason="GPT-2 vocab not found (scripts/download_data.sh or JT_LORA_DATA)")

TRICKY = [
    "",
    "Hello world",
    "  leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\n\nand\r\ncrlf",
    "many     spaces    between",
    "it's they're we've I'm you'll he'd can't IT'S I'M",  # case-sensitive contractions
    "'s alone and trailing '",
    "Café Rouge, naïve façade, £20-25, €5, ¥ 100",
    "中文字符 日本語 한국어 العربية עברית",
    "emoji 🎉👍🏽 and zero\u200bwidth and nbsp\u00a0here",
    "combining e\u0301 vs é, ﬁ ligature, Ⅻ, ², ½",
    "control \x00\x1c\x1f\x7f and \u2028 line sep",
    "numbers 1234567890 3.14159 1,000,000",
    "punctuation!!! ??? ... --- *** ((())) [[]] {{}}",
    "<|endoftext|>",
    "text <|endoftext|> more text<|endoftext|>",
    "name : The Mill | Type : pub | price : £ 20 - 25||The Mill is a pub . ",
]


def _python_gpt2_bpe(vocab_dir: Path):
    """A minimal pure-Python GPT-2 encoder (same algorithm as the reference encoder.py)."""
    regex = pytest.importorskip("regex")
    encoder = json.loads((vocab_dir / "encoder.json").read_text(encoding="utf-8"))
    lines = (vocab_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    rank = {m: i for i, m in enumerate(merges)}
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    b2u = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in b2u:
            b2u[b] = chr(256 + len(b2u) - len(printable))
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    @functools.lru_cache(maxsize=None)
    def bpe(word):
        word = list(word)
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda p: rank.get(p, float("inf")))
            if best not in rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(text):
        ids = []
        for piece in pattern.findall(text):
            ids.extend(encoder[t] for t in bpe("".join(b2u[b] for b in piece.encode("utf-8"))))
        return ids

    return encode


@pytest.fixture(scope="module")
def tok():
    if VOCAB is None:
        pytest.skip("GPT-2 vocab not found (scripts/download_data.sh or JT_LORA_DATA)")
    return load_tokenizer()


@pytest.fixture(scope="module")
def py_ref():
    if VOCAB is None:
        pytest.skip("GPT-2 vocab not found (scripts/download_data.sh or JT_LORA_DATA)")
    return _python_gpt2_bpe(VOCAB)


@pytest.fixture(scope="module")
def hf_ref():
    if VOCAB is None:
        pytest.skip("GPT-2 vocab not found (scripts/download_data.sh or JT_LORA_DATA)")
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Tokenizer(str(VOCAB / "encoder.json"), str(VOCAB / "vocab.bpe"))


def _e2e_lines():
    lines = []
    for name in ("e2e/train.txt", "e2e/valid.txt", "e2e/test.txt"):
        path = assets.try_find_asset(name)
        if path is not None:
            lines += path.read_text(encoding="utf-8").splitlines()
    if not lines:
        pytest.skip("no E2E txt files found")
    # What the converter actually encodes: the MR (context) and ' ' + text (completion).
    out = []
    for line in lines:
        mr, _, text = line.strip().partition("||")
        out += [mr, " " + text]
    return out


def test_interface(tok):
    assert tok.eos_token_id == EOS_TOKEN_ID == 50256
    assert tok.vocab_size == len(tok) == 50257
    assert tok.encode("Hello world") == [15496, 995]  # the well-known GPT-2 ids
    assert load_tokenizer() is tok  # cached per directory
    assert load_tokenizer(str(VOCAB)) is tok


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_match_python_reference(tok, py_ref, text):
    assert tok.encode(text) == py_ref(text)


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_match_transformers(tok, hf_ref, text):
    # transformers treats <|endoftext|> as a special token, so compare with allow_special=True.
    assert tok.encode(text, allow_special=True) == hf_ref.encode(text)


def test_endoftext_plain_vs_special(tok):
    plain = tok.encode("a<|endoftext|>b")
    special = tok.encode("a<|endoftext|>b", allow_special=True)
    assert EOS_TOKEN_ID not in plain and len(plain) > 3  # spelled out as "<", "|", "end", ...
    assert special == [tok.encode("a")[0], EOS_TOKEN_ID, tok.encode("b")[0]]
    assert tok.decode(plain) == tok.decode(special) == "a<|endoftext|>b"
    assert tok.encode_batch(["a<|endoftext|>b"], allow_special=True) == [special]


def test_e2e_lines_match_references(tok, py_ref, hf_ref):
    lines = _e2e_lines()
    ours = tok.encode_batch(lines)
    assert ours == [tok.encode(t) for t in lines]  # batch == one by one, in order
    reference = hf_ref(lines, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, ids, want in zip(lines, ours, reference) if ids != want]
    assert not mismatches, f"{len(mismatches)} lines differ from transformers, e.g. {mismatches[:3]}"
    assert [py_ref(t) for t in lines] == ours


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_partial_utf8_is_replaced(tok):
    ids = tok.encode("🎉")
    assert len(ids) > 1
    assert tok.decode(ids[:1]) == "\ufffd"  # an incomplete character becomes U+FFFD, no exception


def test_missing_vocab_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_tokenizer(str(tmp_path))


@needs_vocab
def test_inconsistent_vocab_is_rejected(tmp_path):
    # Swap two merges: tiktoken would then disagree with the reference, so loading must fail.
    (tmp_path / "encoder.json").write_bytes((VOCAB / "encoder.json").read_bytes())
    lines = (VOCAB / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.bpe:2: merge"):
        load_tokenizer(str(tmp_path))


@pytest.fixture
def no_data_roots(tmp_path, monkeypatch):
    """A fake project with no data anywhere: the search order sees only what a test puts there."""
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.setattr(assets, "PROJECT_ROOT", project)
    monkeypatch.delenv(assets.ENV_VAR, raising=False)
    return {"env": tmp_path / "envdata", "project": project / "data", "shared": tmp_path / "shared" / "data"}


def test_no_vocab_anywhere_names_every_place_and_the_fixes(no_data_roots):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer()
    message = str(err.value)
    assert str(no_data_roots["project"] / "gpt2-vocab" / "encoder.json") in message
    assert str(no_data_roots["shared"] / "gpt2-vocab" / "encoder.json") in message
    assert "$JT_LORA_DATA: not set" in message
    assert "set JT_LORA_DATA" in message and "scripts/download_data.sh" in message


def test_vocab_dir_without_merges_is_clear(tmp_path):
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        load_tokenizer(str(tmp_path))


@needs_vocab
def test_empty_vocab_folder_does_not_hide_a_complete_copy(no_data_roots, monkeypatch):
    # A failed download can leave an empty gpt2-vocab/ in a higher-precedence data root: here in
    # $JT_LORA_DATA and in the project's data/, with the complete copy in ../shared/data.
    for name in ("env", "project"):
        (no_data_roots[name] / "gpt2-vocab").mkdir(parents=True)
    complete = no_data_roots["shared"] / "gpt2-vocab"
    complete.mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        (complete / name).write_bytes((VOCAB / name).read_bytes())
    monkeypatch.setenv(assets.ENV_VAR, str(no_data_roots["env"]))
    tok = load_tokenizer()
    assert tok.vocab_dir == complete.resolve() and tok.vocab_dir != VOCAB
    assert tok.encode("Hello world") == [15496, 995]
