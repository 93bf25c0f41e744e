"""Opt-in bf16 compute (``nn.bf16``, ``train --precision bf16``): kernels against float64 of the
bf16-rounded inputs, the flag's checks, a short bf16 run against fp32, and the fp32 path untouched.

bf16 needs oneDNN's AMX kernels enabled before oneDNN's first use in a process, so everything that
runs bf16 runs in a child process."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_has_amx() -> bool:
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        return False
    return all(f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile"))


needs_amx = pytest.mark.skipif(not _cpu_has_amx(), reason="CPU without AMX bf16: --precision bf16 is refused here")


def _child(code: str, tmp_path) -> dict:
    """Run ``code`` in a fresh process (it prints one JSON line last)."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), returned as float64."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


@needs_amx
def test_kernels_match_float64_of_bf16_rounded_inputs(tmp_path):
    """Forward and backward of the frozen-weight product (both weight layouts, with bias) equal a
    float64 product of the bf16-rounded operands to fp32 accumulation error, and differ from the fp32
    product by about bf16's rounding (so bf16 really ran)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", x=rng.standard_normal((3, 41, 96)).astype(np.float32),
             w=rng.standard_normal((96, 70)).astype(np.float32), b=rng.standard_normal(70).astype(np.float32),
             gy=rng.standard_normal((3, 41, 70)).astype(np.float32),
             ties=np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -8 + 2 ** -20, np.inf, np.nan],
                           dtype=np.float32))
    out = _child(f"""
        import json, numpy as np
        from jt_lora.backend import jt
        from jt_lora.nn import bf16, kernels
        bf16.enable()
        d = np.load({str(tmp_path / 'in.npz')!r})
        res = {{}}
        for layout in ("in_out", "out_in"):
            w = d["w"] if layout == "in_out" else np.ascontiguousarray(d["w"].T)
            x, wv, b = jt.array(d["x"]), jt.array(w).stop_grad(), jt.array(d["b"]).stop_grad()
            with bf16.compute():
                y = kernels.dense(x, wv, b, fan_in_fan_out=layout == "in_out")
                gx = jt.grad((y * jt.array(d["gy"])).sum(), x)
            res[layout] = [y.numpy().tolist(), gx.numpy().tolist()]
        res["ties"] = bf16.to_bf16(jt.array(d["ties"])).numpy().view(np.uint16).tolist()
        print(json.dumps(res))
    """, tmp_path)
    x, w, b, gy = (np.load(tmp_path / "in.npz")[k] for k in ("x", "w", "b", "gy"))
    want_y = round_bf16(x) @ round_bf16(w) + b
    want_gx = round_bf16(gy) @ round_bf16(w).T
    scale_y = np.abs(round_bf16(x)) @ np.abs(round_bf16(w))
    scale_gx = np.abs(round_bf16(gy)) @ np.abs(round_bf16(w)).T
    for layout in ("in_out", "out_in"):
        y, gx = (np.array(v) for v in out[layout])
        assert np.all(np.abs(y - want_y) <= 1e-6 * scale_y + 1e-6), layout
        assert np.all(np.abs(gx - want_gx) <= 1e-6 * scale_gx + 1e-6), layout
        fp32_err = np.abs(y - (x.astype(np.float64) @ w + b)).max()
        assert 1e-3 < fp32_err < 0.02 * scale_y.max(), fp32_err   # bf16 rounding, not fp32 and not garbage
    # round to nearest, ties to even; inf stays inf, NaN stays NaN
    assert out["ties"][:4] == [0x3F80, 0x3F82, 0xBF80, 0x3F81]
    assert out["ties"][4] == 0x7F80 and (out["ties"][5] & 0x7F80) == 0x7F80 and (out["ties"][5] & 0x7F) != 0


@needs_amx
def test_fused_head_loss_in_bf16(tmp_path):
    """The fused LM head + loss with bf16 products: the loss equals float64 on bf16-rounded h and
    wte (the logits are exact products of rounded values); dL/dh is within bf16 rounding of the
    probabilities; gradients flow to h as in fp32."""
    rng = np.random.default_rng(1)
    n, c, v, eps = 37, 48, 1000, 0.1
    np.savez(tmp_path / "in.npz", h=rng.standard_normal((n, c)).astype(np.float32),
             wte=(0.3 * rng.standard_normal((v, c))).astype(np.float32), t=rng.integers(0, v, n).astype(np.int32))
    out = _child(f"""
        import json, numpy as np
        from jt_lora.backend import jt
        from jt_lora.nn import bf16
        from jt_lora.nn.fused_loss import fused_token_losses
        bf16.enable()
        d = np.load({str(tmp_path / 'in.npz')!r})
        h, wte = jt.array(d["h"]), jt.array(d["wte"]).stop_grad()
        with bf16.compute():
            loss = fused_token_losses(h, wte, jt.array(d["t"]), label_smooth={eps}, chunk=300)
            gh = jt.grad(loss.sum(), h)
        print(json.dumps({{"loss": loss.numpy().tolist(), "gh": gh.numpy().tolist()}}))
    """, tmp_path)
    d = np.load(tmp_path / "in.npz")
    h16, w16 = round_bf16(d["h"]), round_bf16(d["wte"])
    z = h16 @ w16.T
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    want = lse - (1 - eps) * z[np.arange(n), d["t"]] - eps * z.mean(1)
    np.testing.assert_allclose(out["loss"], want, rtol=1e-5, atol=1e-5)
    p = np.exp(z - lse[:, None])
    onehot = np.zeros_like(p)
    onehot[np.arange(n), d["t"]] = 1
    wf = d["wte"].astype(np.float64)
    want_gh = p @ w16 - (1 - eps) * onehot @ wf - eps * wf.mean(0)
    gh = np.array(out["gh"])
    assert np.abs(gh - want_gh).max() < 2 ** -8 * np.abs(p @ np.abs(w16)).max() + 1e-6


def _synthetic(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            ctx = [int(x) for x in rng.integers(0, 30, rng.integers(3, 9))] + [63]
            f.write(json.dumps({"context": ctx, "completion": [(c + 7) % 30 for c in ctx[:-1]] + [62]}) + "\n")
    return path


TINY = ["--model_card", "gpt2.sm", "--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--vocab_size", "64"]


def _train(data, work_dir, *extra):
    cmd = [sys.executable, "-m", "jt_lora.train", "--train_data", str(data), *TINY, "--seq_len", "32",
           "--train_batch_size", "4", "--lr", "0.01", "--log_interval", "1", "--no_plot", "--lora_dropout", "0.1",
           "--work_dir", str(work_dir), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def _losses(work_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(work_dir, "log.jsonl"))
            if json.loads(line)["kind"] == "train"]


@pytest.mark.parametrize("extra,message", [
    (["--precision", "fp16"], "error: --precision must be fp32 or bf16, got 'fp16'"),
    (["--precision", "bf16", "--adapter", "full"], "error: --precision bf16 computes the frozen base in bf16, "
                                                   "but --adapter full trains every weight: use --precision fp32"),
])
def test_bad_precision_is_refused_in_one_line_before_any_write(tmp_path, extra, message):
    data = _synthetic(tmp_path / "train.jsonl")
    proc = _train(data, tmp_path / "run", "--max_step", "2", *extra)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "run").exists()


def test_unavailable_reason_names_the_missing_instructions(monkeypatch):
    from jt_lora.nn import bf16
    monkeypatch.setattr(bf16, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    reason = bf16.unavailable_reason()
    assert reason is not None and "amx_bf16, amx_tile" in reason and "--precision fp32" in reason
    monkeypatch.setattr(bf16, "use_cuda", lambda: True)
    assert "CUDA" in bf16.unavailable_reason()
    with pytest.raises(RuntimeError, match="before bf16.enable"):
        with bf16.compute():
            pass


def test_runs_recorded_before_the_flag_resume_as_fp32():
    """A checkpoint's settings without ``precision`` (older runs) are fp32, not a difference."""
    import argparse
    from jt_lora.training.workdir import config_differences, fingerprint
    args = argparse.Namespace(adapter="lora", precision="fp32", init_checkpoint=None)
    current = fingerprint(args)
    old = {k: v for k, v in current.items() if k != "precision"}
    assert current["precision"] == "fp32" and config_differences(old, current) == []
    assert fingerprint(argparse.Namespace(adapter="lora", init_checkpoint=None))["precision"] == "fp32"
    bf = fingerprint(argparse.Namespace(adapter="lora", precision="bf16", init_checkpoint=None))
    assert config_differences(old, bf) == ["--precision: checkpoint 'fp32', now 'bf16'"]


@needs_amx
def test_bf16_steps_track_fp32_and_resume_checks_precision(tmp_path):
    """Eight steps (dropout on, label smoothing) in bf16 stay within 0.02 of the fp32 losses and are
    not identical to them; the precision is recorded, and resuming with another one is refused."""
    data = _synthetic(tmp_path / "train.jsonl")
    common = ["--max_step", "8", "--label_smooth", "0.1", "--save_interval", "4"]
    runs = {}
    for precision in ("fp32", "bf16"):
        proc = _train(data, tmp_path / precision, *common, "--precision", precision)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[precision] = np.array(_losses(tmp_path / precision))
    diff = np.abs(runs["bf16"] - runs["fp32"])
    assert len(diff) == 8 and diff.max() < 0.02, (runs, diff)
    assert diff.max() > 0, "bf16 run gave fp32's losses bit for bit: the bf16 path did not run"
    assert runs["bf16"][-1] < runs["bf16"][0]
    config = json.load(open(tmp_path / "bf16" / "train_config.json"))
    assert config["args"]["precision"] == "bf16"
    proc = _train(data, tmp_path / "bf16", *common, "--resume")   # default fp32 against a bf16 run
    assert proc.returncode == 2 and "--precision: checkpoint 'bf16', now 'fp32'" in proc.stderr


def test_fp32_default_is_the_plain_path(tmp_path):
    """Without the flag nothing changes: the same losses as an explicit --precision fp32, bit for bit,
    and dense() outside bf16.compute() is Jittor's own product."""
    data = _synthetic(tmp_path / "train.jsonl")
    a = _train(data, tmp_path / "default", "--max_step", "3")
    b = _train(data, tmp_path / "fp32", "--max_step", "3", "--precision", "fp32")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    assert _losses(tmp_path / "default") == _losses(tmp_path / "fp32")
    assert json.load(open(tmp_path / "default" / "train_config.json"))["args"]["precision"] == "fp32"
    from jt_lora.backend import jt
    from jt_lora.nn import bf16, kernels
    assert not bf16.active()
    rng = np.random.default_rng(0)
    x, w = jt.array(rng.standard_normal((70, 16)).astype(np.float32)), jt.array(rng.standard_normal((16, 8)).astype(np.float32))
    np.testing.assert_array_equal(kernels.dense(x, w.stop_grad()).numpy(), jt.matmul(x, w).numpy())
