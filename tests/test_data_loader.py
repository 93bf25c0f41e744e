"""FTDataset / FTDataLoader: reference semantics, dynamic padding, sharding, resume, errors."""

import json
import re

import numpy as np
import pytest

from jt_lora.training.data import FTDataLoader, FTDataset, collate, main, read_encoded_jsonl, token_counts


def _reference_item(context, completion, seq_len, max_eval_len=0):
    """LoRA's FT_Dataset.__getitem__ (no prefix/infix, joint_lm off), written from its list arithmetic."""

    def pad(tokens, length, value, direct, max_context=0):
        max_context = max_context or length
        if len(tokens) > max_context:
            tokens = tokens[:max_context] if direct > 0 else tokens[-max_context:]
        return tokens + [value] * (length - len(tokens)), len(tokens)

    inp, inp_len = pad(context + completion, seq_len, 0, 1)
    target, _ = pad((context + completion)[1:], seq_len, 0, 1)
    msk = [0.0] * (len(context) - 1) + [1.0] * (inp_len - len(context))
    msk, _ = pad(msk, seq_len, 0.0, 1)
    query, query_len = pad(context, seq_len, 0, -1, max_context=seq_len - max_eval_len)
    return {"input": inp, "target": target, "mask": msk, "query": query[:query_len], "length": inp_len}


def _random_pairs(n, seed=0, max_ctx=12, max_comp=12):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(1, 50256, rng.integers(1, max_ctx)).tolist() + [50256],
         rng.integers(1, 50256, rng.integers(1, max_comp)).tolist() + [50256])
        for _ in range(n)
    ]


def _write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"context": c, "completion": t}) + "\n" for c, t in pairs))
    return path


def test_hand_computed_example():
    ds = FTDataset([([10, 11, 50256], [20, 21, 50256])], seq_len=10)
    x = ds[0]
    assert x["input"].tolist() == [10, 11, 50256, 20, 21, 50256]
    assert x["target"].tolist() == [11, 50256, 20, 21, 50256, 0]
    # Loss on the positions predicting 20, 21, eos: the bos position and the two completion tokens.
    assert x["mask"].tolist() == [0, 0, 1, 1, 1, 0]
    assert x["query"].tolist() == [10, 11, 50256]
    assert ds.num_truncated == 0


def test_truncation_hand_computed():
    ds = FTDataset([([10, 11, 50256], [20, 21, 22, 50256]), ([1, 50256], [2, 50256])], seq_len=5)
    x = ds[0]
    assert x["input"].tolist() == [10, 11, 50256, 20, 21]
    assert x["target"].tolist() == [11, 50256, 20, 21, 22]  # the reference keeps the next real token...
    assert x["mask"].tolist() == [0, 0, 1, 1, 0]  # ...but masks it, as its _msk does
    assert ds.num_truncated == 1 and ds.lengths.tolist() == [5, 4]


def test_context_longer_than_seq_len_has_no_target():
    ds = FTDataset([(list(range(1, 9)), [5, 50256]), ([1, 2], [3])], seq_len=6, max_eval_len=2)
    assert ds[0]["mask"].sum() == 0
    assert ds[0]["query"].tolist() == [5, 6, 7, 8]  # the last seq_len - max_eval_len context tokens
    assert ds.num_truncated == 1 and ds.num_without_target == 1
    assert "1 truncated" in ds.summary() and "no completion token" in ds.summary()


@pytest.mark.parametrize("seq_len,max_eval_len", [(8, 0), (16, 4), (40, 0)])
def test_matches_reference_semantics(seq_len, max_eval_len):
    pairs = _random_pairs(50, seed=seq_len)
    ds = FTDataset(pairs, seq_len=seq_len, max_eval_len=max_eval_len)
    for i, (c, t) in enumerate(pairs):
        want, got = _reference_item(c, t, seq_len, max_eval_len), ds[i]
        n = want["length"]
        assert len(got["input"]) == n
        assert got["input"].tolist() == want["input"][:n]
        assert got["target"].tolist() == want["target"][:n]
        assert got["mask"].tolist() == want["mask"][:n]
        assert want["mask"][n:] == [0.0] * (seq_len - n)  # nothing is lost by not padding
        assert got["query"].tolist() == want["query"]
    assert ds.num_truncated == sum(len(c) + len(t) > seq_len for c, t in pairs)


def test_collate_pads_to_longest_in_batch():
    ds = FTDataset([([1, 2], [3, 4, 5]), ([6], [7]), ([8, 9, 10], [11])], seq_len=512)
    batch = collate([ds[0], ds[1]])
    assert batch["input"].shape == (2, 5) and batch["input"].dtype == np.int32
    assert batch["target"].dtype == np.int32 and batch["mask"].dtype == np.float32
    assert batch["input"][1].tolist() == [6, 7, 0, 0, 0]
    assert batch["mask"][1].tolist() == [1, 0, 0, 0, 0]
    assert batch["length"].tolist() == [5, 2] and batch["query_len"].tolist() == [2, 1]
    assert batch["query"].tolist() == [[1, 2], [6, 0]]
    assert collate([ds[1]], pad_to_multiple_of=8)["input"].shape == (1, 8)


def test_order_is_a_function_of_seed_and_epoch():
    ds = FTDataset(_random_pairs(40), seq_len=32)
    a = FTDataLoader(ds, 4, shuffle=True, seed=7)
    b = FTDataLoader(ds, 4, shuffle=True, seed=7)
    assert np.array_equal(a.epoch_order(3), b.epoch_order(3))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), FTDataLoader(ds, 4, shuffle=True, seed=8).epoch_order(0))
    assert sorted(a.epoch_order(0)) == list(range(40))
    assert FTDataLoader(ds, 4).epoch_order(5).tolist() == list(range(40))


def _ids_of_epoch(loader):
    return [batch["id"].tolist() for batch in loader]


@pytest.mark.parametrize("n,drop_last,expected", [(10, True, 2), (10, False, 3), (12, True, 3)])
def test_batch_counts(n, drop_last, expected):
    loader = FTDataLoader(FTDataset(_random_pairs(n), seq_len=32), 4, drop_last=drop_last)
    batches = _ids_of_epoch(loader)
    assert len(loader) == len(batches) == expected
    assert [i for b in batches for i in b] == list(range(expected * 4 if drop_last else n))


def _pad_to(a, width):
    return np.pad(a, [(0, 0), (0, width - a.shape[1])])


@pytest.mark.parametrize("n,drop_last", [(29, True), (29, False), (25, False)])
def test_shards_concatenate_to_the_global_batch(n, drop_last):
    ds = FTDataset(_random_pairs(n, seed=n), seq_len=16)
    world, per_rank = 3, 2
    single = list(FTDataLoader(ds, per_rank * world, shuffle=True, seed=110, drop_last=drop_last))
    ranks = [list(FTDataLoader(ds, per_rank, shuffle=True, seed=110, drop_last=drop_last, rank=r, world_size=world))
             for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)  # every rank takes the same number of steps
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(world)]
        assert sum(len(p["id"]) for p in parts) == len(whole["id"])
        for key in ("input", "target", "mask", "query"):
            width = whole[key].shape[1]
            assert all(p[key].shape[1] <= width for p in parts)  # each rank pads only to its own longest
            glued = np.concatenate([_pad_to(p[key], width) for p in parts if len(p["id"])])
            assert np.array_equal(glued, whole[key]), key
        for key in ("id", "length", "query_len"):
            assert np.concatenate([p[key] for p in parts]).tolist() == whole[key].tolist()


def test_tiny_last_batch_gives_empty_shards():
    ds = FTDataset(_random_pairs(9), seq_len=16)
    shards = [list(FTDataLoader(ds, 2, rank=r, world_size=4))[-1] for r in range(4)]
    assert [len(s["id"]) for s in shards] == [1, 0, 0, 0]
    assert shards[1]["input"].shape == (0, 0)


@pytest.mark.parametrize("stop_after", [0, 3, 7, 8, 13])
def test_resume_sees_the_same_remaining_batches(stop_after):
    ds = FTDataset(_random_pairs(35), seq_len=32)
    make = lambda: FTDataLoader(ds, 4, shuffle=True, seed=3, drop_last=True)  # 8 batches per epoch

    full = make()
    uninterrupted = []
    while full.epoch < 3:
        uninterrupted += [b["id"].tolist() for b in full]

    first = make()
    seen = []
    while len(seen) < stop_after:  # train for stop_after steps (maybe across epochs), checkpoint, "crash"
        for batch in first:
            seen.append(batch["id"].tolist())
            if len(seen) == stop_after:
                break
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip

    resumed = make()
    resumed.load_state_dict(state)
    while resumed.epoch < 3:
        seen += [b["id"].tolist() for b in resumed]
    assert seen == uninterrupted


def test_state_at_end_of_epoch_points_to_next_epoch():
    loader = FTDataLoader(FTDataset(_random_pairs(8), seq_len=32), 4, shuffle=True)
    it = iter(loader)
    next(it), next(it)  # both batches handed out; the generator has not finished yet
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (1, 0)


def test_resume_with_other_world_size_same_global_batch():
    ds = FTDataset(_random_pairs(30), seq_len=32)
    single = FTDataLoader(ds, 6, shuffle=True, seed=1, drop_last=True)
    it = iter(single)
    next(it), next(it)
    state = single.state_dict()
    rest = [b["id"].tolist() for b in it]
    ranks = []
    for r in range(2):
        loader = FTDataLoader(ds, 3, shuffle=True, seed=1, drop_last=True, rank=r, world_size=2)
        loader.load_state_dict(state)
        ranks.append([b["id"].tolist() for b in loader])
    assert [a + b for a, b in zip(*ranks)] == rest


def test_incompatible_state_is_rejected():
    ds = FTDataset(_random_pairs(30), seq_len=32)
    state = FTDataLoader(ds, 4, shuffle=True, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        FTDataLoader(ds, 4, shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        FTDataLoader(ds, 5, shuffle=True, seed=1).load_state_dict(state)


def test_read_jsonl_and_errors_name_file_and_line(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [([1, 2], [3]), ([4], [5, 6])])
    assert [(c.tolist(), t.tolist()) for c, t in read_encoded_jsonl(good)] == [([1, 2], [3]), ([4], [5, 6])]
    cases = {
        '{"context": [1], "completion": [2]}\n{"context": [1], "completion": [2]\n': r":2:35: invalid JSON",
        '{"context": [1],, "completion": [2]}\n': r":1:17: invalid JSON",
        '{"context": [1], "completion": [2]}\n\n{"context": [1]}\n': r":3: missing key 'completion'",
        '{"context": [1, "a"], "completion": [2]}\n': r":1: 'context' must be a list of integer",
        '{"context": [1], "completion": []}\n': r":1: empty 'completion'",
        '[1, 2]\n': r":1: expected a JSON object",
        "\n": r"no examples",
    }
    for i, (text, pattern) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        with pytest.raises(ValueError) as err:
            FTDataset(path, seq_len=8)
        assert str(err.value).startswith(str(path)) and re.search(pattern, str(err.value)), str(err.value)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"context": [1], "completion": [2]}\n{"context": [1], "x": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2:27: not valid UTF-8 \(byte b'\\xe9'\)"):
        FTDataset(path, seq_len=8)
    path = tmp_path / "vocab.jsonl"
    path.write_text('{"context": [1], "completion": [50257]}\n')
    with pytest.raises(ValueError, match=r"vocab\.jsonl:1: 'completion' has token ids outside"):
        FTDataset(path, seq_len=8, vocab_size=50257)


def test_token_counts_hand_computed():
    # lengths 3, 5, 2, 4 (seq_len 4 truncates the second); batch 2: padded 2*4 + 2*4 = 16.
    ds = FTDataset([([1], [2, 3]), ([1, 2], [3, 4, 5]), ([1], [2]), ([1, 2], [3, 4])], seq_len=4)
    counts = token_counts(ds, 2)
    assert counts["real_tokens"] == 3 + 4 + 2 + 4
    assert counts["dynamic_tokens"] == 16
    assert counts["fixed_tokens"] == 4 * 4
    assert counts["loss_tokens"] == 2 + 2 + 1 + 2  # completion tokens inside the window
    assert counts["truncated"] == 1
    assert token_counts(FTDataset(ds.examples, seq_len=512), 2)["fixed_tokens"] == 4 * 512


def test_token_counts_cli(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "x.jsonl", _random_pairs(20))
    assert main([str(path), "--seq_len", "512", "--batch_size", "8"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["fixed_tokens"] == 3 * 8 * 512 and counts["dynamic_tokens"] < counts["fixed_tokens"]
