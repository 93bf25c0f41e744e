"""Beam search: against greedy decoding, exhaustive search, a literal transcription of the
reference algorithm, batching, the KV cache; post-processing rules; the resumable CLI."""
import errno
import itertools
import json
import re

import numpy as np
import pytest

from jt_lora import GPT2Config, GPT2LMModel
from jt_lora.backend import jt
from jt_lora.generate import main
from jt_lora.generation.beam import BeamSettings, beam_search
from jt_lora.generation.predictions import read_predictions

TINY = dict(vocab_size=97, n_positions=64, n_embd=16, n_layer=2, n_head=4)
PROMPTS = [[5, 17, 3], [40, 2, 9, 88, 61, 7, 13], [71], [12, 12, 50, 4, 33]]


def _tiny_model(seed=0, **overrides):
    """Random tiny GPT-2 with LoRA; weights large enough that next-token distributions are peaked
    (random init at std 0.02 is nearly uniform: every choice would be a near-tie)."""
    np.random.seed(seed)
    model = GPT2LMModel(GPT2Config(**{**TINY, "lora_dropout": 0.0, **overrides}))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        base = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
        p.update(jt.array((base + rng.normal(0, 0.5, p.shape)).astype("float32")))
    model.eval()
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def small_vocab_model():
    return _tiny_model(seed=3, vocab_size=5)


def _log_probs(model, ids):
    """Next-token log-probabilities after ``ids``, by a full forward of the unpadded sequence."""
    logits = model(jt.array(np.array([ids], dtype="int32")))[0].numpy()[0, -1].astype(np.float64)
    return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum()), logits


def _greedy(model, prompt, max_new, eos=()):
    out = []
    for _ in range(max_new):
        out.append(int(np.argmax(_log_probs(model, prompt + out)[0])))
        if out[-1] in eos:
            break
    return out


def _reference_beam(model, prompt, *, beam, max_new_tokens, min_length=0, length_penalty=1.0,
                    no_repeat_ngram_size=0, repetition_penalty=1.0, eos_token_ids=()):
    """gpt2_beam.py's search transcribed literally: one prompt, lists and loops, full recompute."""
    hyps, scores, best, best_seq = [[]], [0.0], None, None
    for i in range(max_new_tokens):
        cands = []
        for h, sc in zip(hyps if i else hyps[:1], scores):
            if sc == -np.inf:
                cands += [(-np.inf, h + [t]) for t in range(model.config.vocab_size)]
                continue
            logits = _log_probs(model, prompt + h)[1]
            for t in set(h):
                logits[t] = logits[t] * repetition_penalty if logits[t] < 0 else logits[t] / repetition_penalty
            if i < min_length:
                logits[list(eos_token_ids)] = -np.inf
            n = no_repeat_ngram_size
            if n and i + 1 >= n:
                seen = {}
                for gram in zip(*[h[j:] for j in range(n)]):
                    seen.setdefault(gram[:-1], []).append(gram[-1])
                logits[seen.get(tuple(h[i + 1 - n:i]), [])] = -np.inf
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            cands += [(sc + logp[t], h + [t]) for t in range(len(logp))]
        cands.sort(key=lambda c: -c[0])  # stable: hypothesis order, then token id, on ties
        scores, hyps = [c[0] for c in cands[:beam]], [c[1] for c in cands[:beam]]
        for j, h in enumerate(hyps):
            if h[-1] in eos_token_ids or i == max_new_tokens - 1:
                norm = scores[j] / (i + 1) ** length_penalty
                if best is None or best < norm:
                    best, best_seq = norm, h
                scores[j] = -np.inf
    return best_seq, best


def test_beam_1_is_greedy_argmax(model):
    got = beam_search(model, PROMPTS, beam=1, max_new_tokens=12, eos_token_ids=(), batch_size=4)
    assert got == [_greedy(model, p, 12) for p in PROMPTS]
    # with eos ids the greedy sequence is cut after the first one
    eos = (got[0][5], got[1][3])
    cut = beam_search(model, PROMPTS, beam=1, max_new_tokens=12, eos_token_ids=eos, batch_size=4)
    assert cut == [_greedy(model, p, 12, eos) for p in PROMPTS]
    assert len(cut[0]) <= 6 and len(cut[1]) <= 4


@pytest.mark.parametrize("settings", [
    dict(beam=3, max_new_tokens=7, eos_token_ids=(14, 72)),
    dict(beam=4, max_new_tokens=8, length_penalty=0.8, no_repeat_ngram_size=2, repetition_penalty=1.5,
         min_length=3, eos_token_ids=(11, 72, 4)),
    dict(beam=2, max_new_tokens=6, length_penalty=2.0, no_repeat_ngram_size=3, repetition_penalty=0.7,
         eos_token_ids=(22,)),
])
def test_matches_literal_reference_algorithm(model, settings):
    seqs, scores = beam_search(model, PROMPTS[:3], batch_size=3, return_scores=True, **settings)
    for p, seq, score in zip(PROMPTS[:3], seqs, scores):
        ref_seq, ref_score = _reference_beam(model, p, **settings)
        assert seq == ref_seq
        assert score == pytest.approx(ref_score, abs=1e-4)


def test_equals_exhaustive_search(small_vocab_model):
    """A beam as wide as every prefix makes the search exact: compare with all sequences."""
    model, vocab, eos, length = small_vocab_model, 5, 4, 3
    prompts = [[1, 2, 0, 3], [2], [3, 3]]
    lengths = set()
    for length_penalty in (0.0, 0.6, 1.0, 2.0):
        seqs, scores = beam_search(model, prompts, beam=vocab ** (length - 1), max_new_tokens=length,
                                   length_penalty=length_penalty, eos_token_ids=(eos,), batch_size=3,
                                   return_scores=True)
        for prompt, seq, score in zip(prompts, seqs, scores):
            best = (-np.inf, None)
            for n in range(1, length + 1):
                for tail in itertools.product(range(vocab), repeat=n):
                    if eos in tail[:-1] or (n < length and tail[-1] != eos):
                        continue  # eos ends a sequence; only max-length sequences may end otherwise
                    logp = sum(_log_probs(model, prompt + list(tail[:j]))[0][tail[j]] for j in range(n))
                    best = max(best, (logp / n ** length_penalty, list(tail)), key=lambda b: b[0])
            assert seq == best[1]
            assert score == pytest.approx(best[0], abs=1e-4)
            lengths.add(len(seq))
    assert lengths == {1, 2, 3} or (length in lengths and len(lengths) > 1)  # eos and max-length wins


def test_batched_uneven_prompts_equal_one_by_one(model):
    kw = dict(beam=4, max_new_tokens=10, length_penalty=0.8, no_repeat_ngram_size=3, eos_token_ids=(72, 11))
    batched, s_batched = beam_search(model, PROMPTS, batch_size=4, return_scores=True, **kw)
    single, s_single = beam_search(model, PROMPTS, batch_size=1, return_scores=True, **kw)
    assert batched == single
    np.testing.assert_allclose(s_batched, s_single, atol=1e-5)
    assert len({len(p) for p in PROMPTS}) == 4  # really uneven: left padding was exercised


def test_kv_cache_equals_full_recomputation_and_early_stop_is_exact(model):
    kw = dict(beam=5, max_new_tokens=12, length_penalty=0.8, repetition_penalty=1.2, eos_token_ids=(72, 14))
    cached, s_cached = beam_search(model, PROMPTS, batch_size=4, return_scores=True, **kw)
    full, s_full = beam_search(model, PROMPTS, batch_size=4, use_cache=False, return_scores=True, **kw)
    gather, s_gather = beam_search(model, PROMPTS, batch_size=4, use_cache="gather", return_scores=True, **kw)
    every_step, s_every = beam_search(model, PROMPTS, batch_size=4, early_stop=False, return_scores=True, **kw)
    assert cached == full == gather == every_step
    np.testing.assert_allclose(s_cached, s_full, atol=1e-5)
    np.testing.assert_allclose(s_cached, s_gather, atol=1e-5)
    np.testing.assert_allclose(s_cached, s_every, atol=1e-5)  # rows leaving the batch: rounding only


def _ngrams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


@pytest.mark.parametrize("beam", [1, 4])
def test_no_repeat_ngram_never_repeats(model, beam):
    kw = dict(beam=beam, max_new_tokens=16, eos_token_ids=(), batch_size=4)
    free = beam_search(model, PROMPTS, **kw)
    assert any(len(set(_ngrams(s, 2))) < len(_ngrams(s, 2)) for s in free)  # the model does repeat
    for n in (2, 3):
        for seq in beam_search(model, PROMPTS, no_repeat_ngram_size=n, **kw):
            assert len(seq) == 16
            assert len(set(_ngrams(seq, n))) == len(_ngrams(seq, n)), (n, seq)


def test_min_length_and_several_eos_ids(model):
    greedy = beam_search(model, PROMPTS, beam=1, max_new_tokens=10, eos_token_ids=())
    first = tuple(sorted({g[0] for g in greedy}))  # every prompt's first greedy token
    for beam in (1, 3):
        short = beam_search(model, PROMPTS, beam=beam, max_new_tokens=10, eos_token_ids=first)
        assert all(s[-1] in first for s in short) and min(len(s) for s in short) == 1
        held = beam_search(model, PROMPTS, beam=beam, max_new_tokens=10, min_length=4, eos_token_ids=first)
        for seq in held:
            assert not set(seq[:4]) & set(first)
            assert len(seq) >= 5
            assert not set(seq[:-1]) & set(first)  # any eos ends the sequence
    # several eos ids: each stops greedy decoding where it first occurs
    g = greedy[1]
    a, b = g[2], g[5]
    stop = lambda e: min(g.index(x) for x in e) + 1
    for eos in ((a,), (b,), (a, b), (b, a)):
        assert beam_search(model, [PROMPTS[1]], beam=1, max_new_tokens=10, eos_token_ids=eos)[0] == g[:stop(eos)]


def test_fast_topk_equals_a_full_stable_sort():
    """The threshold shortcut used on GPT-2-sized rows returns what a full sort returns, ties included."""
    from jt_lora.generation.beam import _extend, _topk
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20, 50257)).astype(np.float32)
    logits[:, [7, 5, 900]] = logits.max() + 1.0                 # exact ties at the top
    logits[3, 100:] = -np.inf                                   # a row with banned tokens
    scores = rng.normal(-5, 1, (2, 10)).astype(np.float32)
    scores[1, 4] = -np.inf                                      # a finished (dead) hypothesis
    cand = _extend(logits, scores).reshape(2, -1)
    idx, vals = _topk(cand, 10)
    ref = np.argsort(-cand, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_array_equal(vals, np.take_along_axis(cand, ref, axis=1))
    # extensions are scores + log-probabilities: logsumexp of each row's extensions is its score
    live = np.isfinite(scores.reshape(-1))
    ext = _extend(logits, scores).astype(np.float64)[live]
    lse = np.log(np.exp(ext - ext.max(1, keepdims=True)).sum(1)) + ext.max(1)
    np.testing.assert_allclose(lse, scores.reshape(-1)[live], atol=1e-4)
    # fewer candidates than the beam: the rest are dead (index 0, -inf)
    idx, vals = _topk(np.array([[0.0, -1.0, -np.inf, 3.0]], np.float32), 6)
    assert idx.tolist() == [[3, 0, 1, 2, 0, 0]] and vals[0, :3].tolist() == [3.0, 0.0, -1.0]
    assert np.isneginf(vals[0, 3:]).all()


def test_settings_validation(model):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        beam_search(model, PROMPTS, beam=2, max_new_tokens=3, eos_token_ids=(50256,))
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        beam_search(model, [[1] * 60], beam=2, max_new_tokens=6, eos_token_ids=())
    with pytest.raises(ValueError, match="beam"):
        BeamSettings(beam=0)


# ---------------------------------------------------------------------------------------------- files

def test_read_predictions_drops_truncated_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    good = '{"id": 3, "predict": [1, 2, 0]}\n{"id": 0, "predict": [4, 0, 0]}\n'
    path.write_text(good + '{"id": 1, "pred')
    assert read_predictions(path) == {3: [1, 2, 0], 0: [4, 0, 0]}
    assert path.read_text() == good  # cut back to the last complete line
    path.write_text(good + '{"id": 1, "pred\n')  # damaged last line, newline present
    assert read_predictions(path) == {3: [1, 2, 0], 0: [4, 0, 0]} and path.read_text() == good
    path.write_text('{"id": 1, "pred\n' + good)
    with pytest.raises(ValueError, match=r"p\.jsonl:1"):
        read_predictions(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    """Base weights (HF dir) + LoRA adapter dir of the module's model, and an encoded data file."""
    from jt_lora.models.saving import save_adapter
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "base")
    save_adapter(model, root / "adapter")
    model.eval()
    contexts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[3]]
    with open(root / "test.jsonl", "w") as f:
        for c in contexts:
            f.write(json.dumps({"context": c, "completion": [1, 2]}) + "\n")
    return root, contexts


def _cli(root, out, *extra):
    return main(["--data", str(root / "test.jsonl"), "--base_checkpoint", str(root / "base"),
                 "--adapter_dir", str(root / "adapter"), "--work_dir", str(root), "--output_file", out,
                 "--beam", "3", "--eval_len", "8", "--seq_len", "32", "--length_penalty", "0.8",
                 "--no_repeat_ngram_size", "2", "--eos_token_id", "72", "--eos_token_id", "14",
                 "--batch_size", "2", "--no_progress", *extra])


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_end_to_end_base_plus_adapter(saved, model):
    root, contexts = saved
    assert _cli(root, "pred.jsonl", "--unique_contexts") == 0
    expected = beam_search(model, contexts, beam=3, max_new_tokens=8, length_penalty=0.8,
                           no_repeat_ngram_size=2, eos_token_ids=(72, 14))
    records = _lines(root / "pred.jsonl")
    assert sorted(r["id"] for r in records) == list(range(len(contexts)))
    for r in records:
        seq = expected[r["id"]]
        assert r["predict"] == seq + [0] * (8 - len(seq))  # reference layout: eval_len ids, 0-padded
    config = json.loads((root / "pred.config.json").read_text())
    assert config["beam"] == 3 and config["eos_token_ids"] == [72, 14] and config["num_examples"] == 6
    assert config["model"]["adapter"] == "lora" and config["model"]["vocab_size"] == 97
    # without --unique_contexts every example is generated: same predictions
    assert _cli(root, "pred_all.jsonl") == 0
    assert sorted(map(json.dumps, _lines(root / "pred_all.jsonl"))) == sorted(map(json.dumps, records))


def test_cli_resume_skips_done_ids_and_drops_truncated_line(saved):
    root, contexts = saved
    out = root / "resume.jsonl"
    assert _cli(root, "resume.jsonl", "--max_examples", "3") == 0
    first = _lines(out)
    assert sorted(r["id"] for r in first) == [0, 1, 2]
    # mark id 1 so regeneration would be visible, and leave a half-written line as a kill would
    marked = [dict(r, predict=[9] * 8) if r["id"] == 1 else r for r in first]
    out.write_text("".join(json.dumps(r) + "\n" for r in marked) + '{"id": 3, "predict": [5,')
    assert _cli(root, "resume.jsonl") == 0
    records = _lines(out)
    assert sorted(r["id"] for r in records) == list(range(6))
    assert next(r for r in records if r["id"] == 1)["predict"] == [9] * 8   # kept, not regenerated
    assert records[:3] == marked
    # changed search settings refuse to resume into the same file
    assert main(["--data", str(root / "test.jsonl"), "--base_checkpoint", str(root / "base"),
                 "--adapter_dir", str(root / "adapter"), "--work_dir", str(root), "--output_file",
                 "resume.jsonl", "--beam", "2", "--eval_len", "8", "--seq_len", "32", "--no_progress"]) == 1


def test_cli_errors_name_the_missing_file(saved, capsys):
    root, _ = saved
    assert main(["--data", str(root / "nope.jsonl"), "--init_checkpoint", str(root / "base")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["--data", str(root / "test.jsonl"), "--init_checkpoint", str(root / "missing_ckpt"),
                 "--work_dir", str(root)]) == 1
    assert "missing_ckpt" in capsys.readouterr().err


def test_decoded_text_cut_like_gpt2_decode():
    from jt_lora.io.assets import try_find_asset
    from jt_lora.generation.predictions import decoded_text as _text
    from jt_lora.models.tokenizer import load_tokenizer
    if try_find_asset("gpt2-vocab") is None:
        pytest.skip("gpt2-vocab asset not available")
    tok = load_tokenizer()
    ids = tok.encode("The Eagle is a pub.") + [628] + tok.encode("junk") + [0, 0]
    assert _text(tok, ids, (628, 50256)) == "The Eagle is a pub."
    assert _text(tok, tok.encode(" two\nlines ") + [50256], (628, 50256)) == "two lines"


def test_decode_cache_steps_equal_the_gathered_cache():
    """Step by step, with left padding, reordering, duplicated and dropped rows: the host-side
    cache (ancestry instead of copies, fused attention) gives the hidden states of the plain
    gathered KV cache."""
    from jt_lora.generation.cache import DecodeCache
    model = _tiny_model(seed=5)
    rng = np.random.default_rng(0)
    prompts = [[3, 8, 1, 4], [9, 2]]
    ids = np.array([[3, 8, 1, 4], [0, 0, 9, 2]], np.int32)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]], np.float32)
    pos = np.array([[0, 1, 2, 3], [0, 0, 0, 1]], np.int32)
    with jt.no_grad():
        _, past, _ = model.transformer(jt.array(ids), position_ids=jt.array(pos), attention_mask=jt.array(mask))
        cache = DecodeCache(past, mask, rows=6, steps=5)
        next_pos, full_mask = pos[:, -1] + 1, mask
        srcs = [np.array([0, 0, 0, 1, 1, 1]), np.array([2, 0, 1, 5, 5, 3]), np.array([1, 1, 0, 4]),
                np.array([3, 0, 0, 2])]
        for step, src in enumerate(srcs):
            tokens = rng.integers(0, TINY["vocab_size"], len(src)).astype(np.int32).reshape(-1, 1)
            idx = jt.array(src.astype(np.int32))
            past = [(k[idx], v[idx]) for k, v in past]
            next_pos, full_mask = next_pos[src], full_mask[src]
            full_mask = np.concatenate([full_mask, np.ones((len(src), 1), np.float32)], axis=1)
            want, past, _ = model.transformer(jt.array(tokens), past=past, position_ids=jt.array(next_pos.reshape(-1, 1)),
                                              attention_mask=jt.array(full_mask))
            cache.advance(src)
            got, same, _ = model.transformer(jt.array(tokens), past=cache,
                                             position_ids=jt.array(next_pos.reshape(-1, 1)))
            assert same is cache and cache.length == 4 + step
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
            next_pos = next_pos + 1
        with pytest.raises(ValueError, match="holds 5 steps"):
            cache.advance(np.arange(4))
            cache.advance(np.arange(4))
        with pytest.raises(ValueError, match="exceed"):
            DecodeCache(model.transformer(jt.array(ids))[1], None, rows=2, steps=3).advance(np.zeros(3))
        with pytest.raises(ValueError, match="one token per row"):
            model.transformer(jt.array(np.zeros((4, 2), np.int32)), past=cache)


# ---------------------------------------------------------------------------------------------- flags and faults

def _cli_main(root, out, *extra):
    return main(["--data", str(root / "test.jsonl"), "--base_checkpoint", str(root / "base"),
                 "--adapter_dir", str(root / "adapter"), "--work_dir", str(root), "--output_file", out,
                 "--beam", "2", "--eval_len", "4", "--seq_len", "32", "--batch_size", "2", "--no_progress", *extra])


@pytest.mark.parametrize("flags, pattern", [
    (("--batch_size", "0"), r"--batch_size must be >= 1, got 0"),
    (("--beam", "0"), r"--beam must be >= 1, got 0"),
    (("--eval_len", "0"), r"--eval_len must be >= 1, got 0"),
    (("--lora_alpha", "128"), r"--lora_alpha 128.0 contradicts lora_attn_alpha=32.0 in .*(jt_lora_adapter|adapter_config).json"),
    (("--lora_inhibition", "0.3"), r"--lora_inhibition 0.3 contradicts lora_inhibition=0.0"),
])
def test_overwrite_with_a_bad_flag_keeps_the_complete_file(saved, capsys, flags, pattern):
    root, _ = saved
    assert _cli_main(root, "keep.jsonl") == 0
    before = (root / "keep.jsonl").read_bytes(), (root / "keep.config.json").read_bytes()
    capsys.readouterr()
    assert _cli_main(root, "keep.jsonl", "--overwrite", *flags) == 1
    err = capsys.readouterr().err
    assert re.search(pattern, err) and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ((root / "keep.jsonl").read_bytes(), (root / "keep.config.json").read_bytes()) == before


def test_overwrite_replaces_only_when_complete(saved, monkeypatch, capsys):
    import jt_lora.generate as G
    root, _ = saved
    assert _cli_main(root, "ow.jsonl") == 0
    before = (root / "ow.jsonl").read_bytes()
    real, calls = G.beam_search_batch, []

    def failing(*a, **k):     # the second batch fails: a crash half-way through the new run
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(root / "ow.jsonl"))
        return real(*a, **k)
    monkeypatch.setattr(G, "beam_search_batch", failing)
    assert _cli_main(root, "ow.jsonl", "--overwrite", "--beam", "3") == 1
    err = capsys.readouterr().err
    assert "ow.jsonl: No space left on device (the disk is full" in err and "Traceback" not in err
    assert (root / "ow.jsonl").read_bytes() == before
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(G, "beam_search_batch", real)
    assert _cli_main(root, "ow.jsonl", "--overwrite", "--beam", "3") == 0
    assert json.loads((root / "ow.config.json").read_text())["beam"] == 3
    assert (root / "ow.jsonl").read_bytes() != before and len(_lines(root / "ow.jsonl")) == 6


def test_enospc_while_appending_keeps_finished_batches(saved, monkeypatch, capsys):
    import jt_lora.generation.predictions as G
    root, _ = saved
    real, calls = G.append_records, []

    def append(f, records):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", f.name)
        real(f, records)
    monkeypatch.setattr(G, "append_records", append)
    assert _cli_main(root, "full.jsonl") == 1
    err = capsys.readouterr().err
    assert "full.jsonl: No space left on device" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert len(_lines(root / "full.jsonl")) == 2            # the first batch (2 prompts) is kept
    monkeypatch.setattr(G, "append_records", real)
    assert _cli_main(root, "full.jsonl") == 0 and len(_lines(root / "full.jsonl")) == 6   # resumes


def test_read_only_and_file_parent_outputs_fail_before_work(saved, monkeypatch, capsys, tmp_path):
    import jt_lora.io.atomic as S
    root, _ = saved
    (tmp_path / "plain").write_text("x")
    assert main(["--data", str(root / "test.jsonl"), "--base_checkpoint", str(root / "base"),
                 "--adapter_dir", str(root / "adapter"), "--work_dir", str(tmp_path / "plain" / "out")]) == 1
    assert re.search(r"--work_dir .*plain is a regular file", capsys.readouterr().err)

    def read_only(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(S, "atomic_write_text", read_only)
    assert _cli_main(root, "ro.jsonl") == 1
    err = capsys.readouterr().err
    assert "ro.config.json: Read-only file system (the file system is read-only" in err and "Traceback" not in err


def test_help_prints_each_default_once():
    text = " ".join(build_help().split())
    assert "prompts per batch (each is --beam rows) (default: 10)" in text
    assert "LoRA alpha (default: 32," in text and "(default: None)" not in text
    assert text.count("(default: False)") == 1      # --unique_contexts (BooleanOptionalAction)


def build_help():
    from jt_lora.generate import build_parser
    return build_parser().format_help()
