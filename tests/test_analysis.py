"""Attention averages, head / FFN masks, head importance, figures and the analysis command line,
on tiny GPT-2s (random or hand-set weights)."""
import json

import numpy as np
import pytest

from conftest import needs_torch
from jt_lora.analysis import attention as att
from jt_lora.analysis import importance as imp
from jt_lora.analysis.models import example_batches
from jt_lora.backend import jt
from jt_lora.training.data import FTDataset
from jt_lora.models.gpt2 import GPT2Config, GPT2LMModel

TINY = dict(vocab_size=97, n_positions=64, n_embd=16, n_layer=2, n_head=4, adapter="none")
D = TINY["n_embd"] // TINY["n_head"]


def _model(seed=0, std=0.3, **overrides):
    """A random tiny GPT-2 with larger-than-default weights (peaked attention, visible gradients)."""
    np.random.seed(seed)
    model = GPT2LMModel(GPT2Config(**{**TINY, "initializer_range": std, **overrides}))
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "ln_" not in name:
            p.update(jt.array(rng.normal(0, 0.1, p.shape).astype(np.float32)))
    return model.eval()


def _copy(model, edit=None):
    """A second model with the same weights; ``edit(name, array)`` may change them."""
    other = GPT2LMModel(model.config)
    params = dict(model.named_parameters())
    for name, p in other.named_parameters():
        value = params[name].numpy().copy()
        p.update(jt.array(edit(name, value) if edit else value))
    return other.eval()


def _dataset(seq_len=64, seed=0, n=7):
    rng = np.random.default_rng(seed)
    pairs = [(rng.integers(1, 97, rng.integers(2, 9)), rng.integers(1, 97, rng.integers(2, 9))) for _ in range(n)]
    return FTDataset(pairs, seq_len)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def dataset():
    return _dataset()


def _ids(batch):
    return jt.array(batch["input"].astype(np.int32))


# ---------------------------------------------------------------------------------------------- attention


def test_uniform_attention_average_is_exact(dataset):
    """Zero query/key weights: every position attends uniformly to itself and the past, so the
    average over any examples is 1/(i+1) below the diagonal, whatever the padding."""
    model = _copy(_model(), lambda name, v: np.zeros_like(v) if "c_attn" in name else v)
    max_len = int(dataset.lengths.max())
    maps = att.attention_maps(model, example_batches(dataset, 3), max_len)
    i, j = np.indices((max_len, max_len))
    expected = np.where(j <= i, 1.0 / (i + 1), 0.0)
    assert maps.average.shape == (2, max_len, max_len)
    np.testing.assert_allclose(maps.average, np.broadcast_to(expected, maps.average.shape), atol=1e-6)
    lengths = dataset.lengths
    np.testing.assert_array_equal(maps.count, (np.maximum(i, j)[None] < lengths[:, None, None]).sum(0))
    # uniform over i+1 keys: entropy log(i+1), averaged over every example's real rows
    rows = np.concatenate([np.arange(n) for n in lengths])
    np.testing.assert_allclose(maps.entropy, np.log(rows + 1).mean(), rtol=1e-5)
    assert maps.num_examples == len(dataset)


def test_average_equals_hand_average_of_per_example_maps(model, dataset):
    max_len = int(dataset.lengths.max())
    maps = att.attention_maps(model, example_batches(dataset, 3), max_len, per_head=True)
    total = np.zeros((2, 4, max_len, max_len))
    count = np.zeros((max_len, max_len))
    for k in range(len(dataset)):
        ids = dataset[k]["input"][None]
        n = ids.shape[1]
        per_layer = att.batch_attention(model, ids, np.array([n]))        # unpadded, one example
        for layer, probs in enumerate(per_layer):
            np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)     # rows sum to 1
            assert np.abs(np.triu(probs[0], 1)).max() == 0.0               # causal
            total[layer, :, :n, :n] += probs[0]
        count[:n, :n] += 1
    expected_heads = total / np.maximum(count, 1)
    np.testing.assert_allclose(maps.heads, expected_heads, atol=1e-5)
    np.testing.assert_allclose(maps.average, expected_heads.mean(1), atol=1e-5)
    assert np.abs(maps.average - maps.average[:, :1, :1]).max() > 0.05  # not a trivial map
    # rows of the average still sum to 1 (each is an average of distributions)
    np.testing.assert_allclose(maps.average.sum(-1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- masks


def test_all_ones_masks_equal_the_normal_forward(model):
    ids = jt.array(np.random.default_rng(1).integers(0, 97, (2, 11)).astype(np.int32))
    plain = model(ids)[0].numpy()
    masked = model(ids, head_mask=jt.ones((2, 4)), ffn_mask=jt.ones((2,)))[0].numpy()
    np.testing.assert_array_equal(masked, plain)


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3)])
def test_head_mask_removes_exactly_that_heads_contribution(model, layer, head):
    ids = jt.array(np.random.default_rng(2).integers(0, 97, (2, 11)).astype(np.int32))
    mask = np.ones((2, 4), dtype=np.float32)
    mask[layer, head] = 0.0
    masked = model(ids, head_mask=jt.array(mask))[0].numpy()

    def zero_rows(name, value):
        if name == f"transformer.h.{layer}.attn.c_proj.weight":   # Conv1D [in, out]: rows = head features
            value[head * D:(head + 1) * D, :] = 0.0
        return value

    zeroed = _copy(model, zero_rows)(ids)[0].numpy()
    np.testing.assert_allclose(masked, zeroed, rtol=1e-5, atol=1e-5)
    assert np.abs(masked - model(ids)[0].numpy()).max() > 1e-3    # the head did contribute


def test_ffn_knockout_equals_a_model_without_that_mlp(model, dataset):
    result = imp.ffn_knockout(model, lambda: example_batches(dataset, 4))
    assert result["loss"].shape == (2,)
    np.testing.assert_allclose(result["delta"], result["loss"] - result["base_loss"])
    for layer in range(2):
        def zero_mlp(name, value):
            return np.zeros_like(value) if name.startswith(f"transformer.h.{layer}.mlp.c_proj.") else value

        expected = imp.dataset_loss(_copy(model, zero_mlp), example_batches(dataset, 4))
        assert result["loss"][layer] == pytest.approx(expected, rel=1e-5)
    assert np.abs(result["delta"]).max() > 1e-4


def test_michel_importance_is_the_absolute_mask_gradient(model, dataset):
    """One batch holding every example: Michel's raw importance = |dL/dmask|, checked by central
    differences of the loss."""
    batches = lambda: example_batches(dataset, len(dataset))  # noqa: E731
    result = imp.head_importance(model, batches(), definition="michel")
    assert result["raw"].shape == (2, 4) and result["importance"].shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(result["importance"], axis=1), 1.0, rtol=1e-6)
    assert result["loss"] == pytest.approx(imp.dataset_loss(model, batches()), rel=1e-6)
    eps = 0.05
    for layer, head in [(0, 0), (0, 2), (1, 1), (1, 3)]:
        plus, minus = np.ones((2, 4)), np.ones((2, 4))
        plus[layer, head] += eps
        minus[layer, head] -= eps
        fd = (imp.dataset_loss(model, batches(), head_mask=plus) -
              imp.dataset_loss(model, batches(), head_mask=minus)) / (2 * eps)
        assert result["raw"][layer, head] == pytest.approx(abs(fd), rel=0.03, abs=2e-4)
    assert result["raw"].max() > 1e-2


def test_llm_interpret_importance_of_one_token_by_finite_differences(model):
    """One example whose only loss token is the last: in the last layer only the position
    predicting it has a gradient, so its importance is |d loss / d(scale of that position's head
    context)|, which scaling c_proj's rows for that head (the same as scaling the context) and
    differencing the loss gives independently."""
    data = FTDataset([([5, 17, 33, 8, 61], [42])], 64)
    batch = next(example_batches(data, 1))
    got = imp.head_importance(model, [batch], definition="llm-interpret")
    assert got["tokens"] == 1 and got["positions"] == 5
    eps = 0.02
    for head in range(4):
        def scaled(factor):
            def edit(name, value):
                if name == "transformer.h.1.attn.c_proj.weight":
                    value[head * D:(head + 1) * D, :] *= factor
                return value
            return imp.dataset_loss(_copy(model, edit), [batch])

        fd = (scaled(1 + eps) - scaled(1 - eps)) / (2 * eps)
        assert got["importance"][1, head] == pytest.approx(abs(fd), rel=0.02, abs=1e-5)
    assert got["importance"][1].max() > 1e-2


def test_loss_weights_select_completion_or_all_tokens(dataset):
    batch = next(example_batches(dataset, 3))
    np.testing.assert_array_equal(imp.loss_weights(batch, "completion"), batch["mask"])
    every = imp.loss_weights(batch, "all")
    np.testing.assert_array_equal(every.sum(1), batch["length"] - 1)
    with pytest.raises(ValueError, match="completion"):
        imp.loss_weights(batch, "some")


# ---------------------------------------------------------------------------------------------- figures


def _png_size(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape[:2]   # (height, width)


def test_attention_grid_has_a_panel_per_layer_and_model(tmp_path):
    from jt_lora.analysis import plots

    rng = np.random.default_rng(0)
    maps = [rng.random((3, 6, 6)) for _ in range(2)]
    fig = plots.attention_grid_figure(maps, ["base", "InA 30%"], "grid", gamma=0.5)
    panels = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 * 2
    assert len(fig.axes) - len(panels) == 3                       # one colour bar per layer
    assert [ax.get_title() for ax in panels[:2]] == ["base", "InA 30%"]
    plots.save_figure(fig, tmp_path / "grid.png", dpi=50)
    width, height = plots.attention_grid_size(3, 2)
    assert _png_size(tmp_path / "grid.png") == (round(height * 50), round(width * 50))
    assert not list(tmp_path.glob(".*.tmp"))                     # no temp file left behind


# ---------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base checkpoint, an InA adapter on it and an encoded JSONL file."""
    from jt_lora.models.saving import save_adapter

    root = tmp_path_factory.mktemp("analysis")
    base = _model(seed=3)
    base.save_pretrained(root / "base")
    # zero queries (weights and bias): every position attends uniformly to itself and the past;
    # the InA adapter below adapts q, so on this base it makes attention non-uniform
    def zero_queries(name, value):
        if "c_attn" in name:
            value[..., :TINY["n_embd"]] = 0.0
        return value

    _copy(base, zero_queries).save_pretrained(root / "uniform")
    ina = GPT2LMModel.from_pretrained(root / "base", adapter="ina", lora_attn_dim=2, lora_inhibition=0.3)
    rng = np.random.default_rng(0)
    for name, p in ina.named_parameters():
        if "lora_B" in name:
            p.update(jt.array(rng.normal(0, 1.0, p.shape).astype(np.float32)))
    save_adapter(ina, root / "ina30")
    data = root / "data.jsonl"
    rows = [{"context": rng.integers(1, 97, rng.integers(2, 9)).tolist(),
             "completion": rng.integers(1, 97, rng.integers(2, 9)).tolist()} for _ in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _run(*argv):
    from jt_lora.analysis.cli import main

    return main([*argv, "--no_progress"])


def test_attention_cli_writes_maps_pngs_and_grid(files, tmp_path):
    from jt_lora.analysis import plots

    out = tmp_path / "att"
    assert _run("attention", "--init_checkpoint", str(files / "uniform"), "--include_base",
                "--adapter_dir", str(files / "ina30"), "--label", "InA 30%", "--data", str(files / "data.jsonl"),
                "--out", str(out), "--per_head", "--batch_size", "4", "--dpi", "40") == 0
    summary = json.loads((out / "attention.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["base", "InA 30%"]
    assert [m["dir"] for m in summary["models"]] == ["base", "InA_30"]
    t = summary["max_len"]
    base_avg = np.load(out / "base" / "attention_average.npy")
    ina_avg = np.load(out / "InA_30" / "attention_average.npy")
    assert base_avg.shape == ina_avg.shape == (2, t, t) == tuple(summary["shape"])
    assert np.load(out / "InA_30" / "attention_heads.npy").shape == (2, 4, t, t)
    i, j = np.indices((t, t))
    np.testing.assert_allclose(base_avg, np.broadcast_to(np.where(j <= i, 1.0 / (i + 1), 0.0), (2, t, t)),
                               atol=1e-6)                         # uniform attention, known exactly
    lengths = [len(json.loads(line)["context"]) + len(json.loads(line)["completion"])
               for line in (files / "data.jsonl").read_text().splitlines()]
    np.testing.assert_array_equal(np.load(out / "attention_count.npy"),
                                  (np.maximum(i, j)[None] < np.array(lengths)[:, None, None]).sum(0))
    assert np.abs(ina_avg - base_avg).max() > 1e-3               # the adapter changed attention
    for slug in ("base", "InA_30"):
        for i in range(2):
            assert (out / slug / f"layer_{i}_head_average.png").stat().st_size > 0
            assert (out / slug / f"layer_{i}_heads.png").exists()
    width, height = plots.attention_grid_size(2, 2)
    assert _png_size(out / "attention_grid.png") == (round(height * 40), round(width * 40))
    config = json.loads((out / "attention_config.json").read_text())
    assert config["models"][1]["adapter_dir"].endswith("ina30") and config["per_head"] is True


@needs_torch
def test_head_importance_cli_equals_the_llm_interpret_reference(files, tmp_path, capsys):
    """The command's JSON against tests/analysis_ref.py (transformers' GPT-2, same weights);
    batch size 1, so the sum does not depend on how the command orders examples."""
    from test_analysis_reference import _reference

    rows = [json.loads(line) for line in (files / "data.jsonl").read_text().splitlines()]
    ref = _reference("importance", {"model_dir": str(files / "base"),
                                    "examples": [(r["context"], r["completion"]) for r in rows],
                                    "batches": [[k] for k in range(len(rows))]}, tmp_path)
    out = tmp_path / "imp"
    assert _run("head-importance", "--init_checkpoint", str(files / "base"), "--data", str(files / "data.jsonl"),
                "--out", str(out), "--batch_size", "1") == 0
    printed = capsys.readouterr().out
    assert str(out / "head_importance.json") in printed and str(out / "head_importance.png") in printed
    summary = json.loads((out / "head_importance.json").read_text())
    assert summary["definition"] == "llm-interpret"
    (record,) = summary["models"]
    np.testing.assert_allclose(record["head_importance"]["importance"], ref["llm-interpret"], rtol=1e-4, atol=1e-7)
    assert record["positions"] == ref["tot_tokens"] and record["loss_tokens"] == ref["eff_tokens"]
    assert record["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    ko = record["ffn_knockout"]
    assert ko["base_loss"] == pytest.approx(ref["loss"], rel=1e-5) and np.abs(ko["delta"]).max() > 1e-4
    assert (out / "head_importance.png").stat().st_size > 0

    out = tmp_path / "michel"
    assert _run("head-importance", "--init_checkpoint", str(files / "base"), "--data", str(files / "data.jsonl"),
                "--out", str(out), "--batch_size", "1", "--definition", "michel", "--no_ffn") == 0
    summary = json.loads((out / "head_importance.json").read_text())
    assert summary["definition"] == "michel"
    np.testing.assert_allclose(summary["models"][0]["head_importance"]["importance"], ref["michel"],
                               rtol=1e-4, atol=1e-6)


def test_cli_errors_name_the_file(files, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert _run("attention", "--init_checkpoint", str(files / "base"), "--adapter_dir", str(missing),
                "--data", str(files / "data.jsonl"), "--out", str(tmp_path / "o")) == 1
    assert f"adapter directory not found: {missing}" in capsys.readouterr().err
    assert _run("induction", "--init_checkpoint", str(missing), "--out", str(tmp_path / "o")) == 1
    assert str(missing) in capsys.readouterr().err
    assert _run("attention", "--init_checkpoint", str(files / "base"), "--data", str(missing),
                "--out", str(tmp_path / "o")) == 1
    assert f"data file not found: {missing}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run("attention", "--label", "x", "--init_checkpoint", str(files / "base"), "--data", "d", "--out", "o")
    assert "--label 'x' must follow" in capsys.readouterr().err
    assert _run("induction", "--init_checkpoint", str(files / "base"), "--include_base", "--base_label", "same",
                "--checkpoint", str(files / "base"), "--label", "same", "--out", str(tmp_path / "o")) == 1
    assert "labels must differ" in capsys.readouterr().err


def test_labels_become_unique_directory_names():
    from jt_lora.analysis.models import unique_slugs

    assert unique_slugs(["InA 30%", "InA 30%!", "LoRA", "../x", "%"]) == ["InA_30", "InA_30_2", "LoRA", "x", "model"]


# ---------------------------------------------------------------------------------------------- adapter config


def test_adapter_settings_come_from_the_adapter_config(files, tmp_path, capsys):
    """Flags may repeat the adapter directory's config; a contradiction names flag and file."""
    config = files / "ina30" / "adapter_config.json"
    common = ["induction", "--init_checkpoint", str(files / "base"), "--adapter_dir", str(files / "ina30"),
              "--num_sequences", "1", "--segment_len", "3", "--repeats", "2", "--exclude_ratio", "0"]
    assert _run(*common, "--out", str(tmp_path / "ok"), "--adapter", "ina", "--lora_dim", "2",
                "--lora_inhibition", "0.3") == 0
    record = json.loads((tmp_path / "ok" / "induction.json").read_text())["models"][0]
    assert record["adapter_dir"].endswith("ina30")
    capsys.readouterr()
    for flag, value, field in [("--lora_alpha", "16", "lora_attn_alpha"), ("--adapter", "lora", "adapter"),
                               ("--lora_inhibition", "0.1", "lora_inhibition")]:
        assert _run(*common, "--out", str(tmp_path / "bad"), flag, value) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} {value}") and f"contradicts {field}=" in err and str(config) in err
        assert len(err.splitlines()) == 1
    assert _run("induction", "--init_checkpoint", str(files / "base"), "--out", str(tmp_path / "x"),
                "--lora_dim", "4") == 1
    assert "no --adapter_dir is given" in capsys.readouterr().err


def test_every_default_is_shown_once():
    from jt_lora.analysis.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.help is None:
                continue
            text = formatter._get_help_string(action) % {"default": action.default}
            assert text.count("default") <= 1, (name, action.option_strings, text)
            assert "(default: None)" not in text and "(default: False)" not in text
            if action.dest in ("definition", "copying"):
                assert text.endswith("(default: llm-interpret)")


# ---------------------------------------------------------------------------------------------- I/O faults


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[0]


def _attention_args(files, out):
    return ["attention", "--init_checkpoint", str(files / "base"), "--data", str(files / "data.jsonl"),
            "--out", str(out), "--dpi", "30"]


def test_output_under_a_regular_file(files, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _run(*_attention_args(files, blocker / "out")) == 1
    line = _one_error_line(capsys)
    assert str(blocker / "out") in line and "regular file" in line and "--out" in line


def test_read_only_output(files, tmp_path, capsys, monkeypatch):
    """A read-only directory (as root, which writes anyway, the file system's EROFS is simulated)."""
    import errno
    import os

    from jt_lora.io import atomic

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        def read_only(path, mode="wb"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        monkeypatch.setattr(atomic, "atomic_open", read_only)
        out = ro
    else:
        ro.chmod(0o500)
        out = ro / "out"
    try:
        assert _run(*_attention_args(files, out)) == 1
    finally:
        ro.chmod(0o700)
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot write {out}") and "not writable" in line and "--out" in line


def test_disk_full_keeps_the_finished_files(files, tmp_path, capsys, monkeypatch):
    """ENOSPC on the last file (the summary JSON): one error line naming it; everything written
    before stays complete."""
    import errno

    from jt_lora.io import atomic

    real = atomic.atomic_write_text

    def full(path, text):
        if str(path).endswith("attention.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(atomic, "atomic_write_text", full)
    out = tmp_path / "out"
    assert _run(*_attention_args(files, out)) == 1
    line = _one_error_line(capsys)
    assert line == f"error: cannot write {out / 'attention.json'}: no space left on the device; " \
                   "free space or choose another --out"
    assert not (out / "attention.json").exists()
    average = np.load(out / "base" / "attention_average.npy")      # finished files are whole
    assert average.shape[0] == 2 and np.isfinite(average).all()
    assert json.loads((out / "attention_config.json").read_text())["command"] == "attention"


def test_non_utf8_and_invalid_json_inputs_name_file_line_and_column(files, tmp_path, capsys):
    import shutil

    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"context": [1, 2], "completion": [3]}\n{"context": [1], "completion": [4\xff]}\n')
    assert _run(*_attention_args(files, tmp_path / "o")[:-4], "--data", str(data), "--out", str(tmp_path / "o")) == 1
    assert _one_error_line(capsys) == (f"error: {data}:2: not UTF-8 (byte 0xff at column 34); "
                                       "save the file as UTF-8")

    data.write_text('{"context": [1, 2], "completion": [3]}\n\n{"context": [1], "completion": [4,]}\n')
    assert _run("attention", "--init_checkpoint", str(files / "base"), "--data", str(data),
                "--out", str(tmp_path / "o")) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {data}:3:") and "35" in line and "invalid JSON" in line

    adapter = tmp_path / "adapter"
    shutil.copytree(files / "ina30", adapter)
    config = adapter / "adapter_config.json"
    lines = config.read_text().splitlines()
    lines[2] = lines[2].rstrip(",")                                 # a missing comma on line 3
    config.write_text("\n".join(lines) + "\n")
    assert _run("induction", "--init_checkpoint", str(files / "base"), "--adapter_dir", str(adapter),
                "--out", str(tmp_path / "o")) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {config}:4:") and "invalid JSON (Expecting ',' delimiter)" in line
    config.write_bytes(b'{"adapter": "ina\xe9"}\n')
    assert _run("induction", "--init_checkpoint", str(files / "base"), "--adapter_dir", str(adapter),
                "--out", str(tmp_path / "o")) == 1
    assert _one_error_line(capsys) == f"error: {config}:1: not UTF-8 (byte 0xe9 at column 17); save the file as UTF-8"
