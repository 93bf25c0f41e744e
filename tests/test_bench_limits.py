"""``python -m jt_lora.bench --mode limits`` and the limits file a train run reads."""
import json
import subprocess
import sys

import pytest

from jt_lora import bench


def test_limits_mode_prints_peak_and_bandwidth():
    proc = subprocess.run([sys.executable, "-m", "jt_lora.bench", "--mode", "limits", "--json", "--steps", "2",
                           "--warmup", "0", "--gemm_n", "384", "--stream_mb", "64"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "limits" and result["gemm_n"] == 384 and result["stream_mb"] == 64
    assert result["gemm_gflops"] > 0.1 and result["read_gbps"] > 0.05
    assert len(result["gemm_times"]) == len(result["stream_times"]) == 2
    assert "GEMM peak" in proc.stderr and "read bandwidth" in proc.stderr


def test_limits_file_is_read_from_its_last_json_line(tmp_path):
    path = tmp_path / "limits.json"
    path.write_text("limits (2 threads): ...\n" + json.dumps({"gemm_gflops": 100.0, "read_gbps": 10.0}) + "\n")
    assert bench.load_limits(str(path))["gemm_gflops"] == 100.0
    (tmp_path / "bad.json").write_text("no json here\n")
    with pytest.raises(ValueError, match="no JSON line"):
        bench.load_limits(str(tmp_path / "bad.json"))
    (tmp_path / "train.json").write_text(json.dumps({"mode": "train", "gflops": 30.0}) + "\n")
    with pytest.raises(ValueError, match="no gemm_gflops"):
        bench.load_limits(str(tmp_path / "train.json"))


def test_limits_flags_are_checked():
    proc = subprocess.run([sys.executable, "-m", "jt_lora.bench", "--mode", "limits", "--stream_mb", "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--stream_mb" in proc.stderr


def test_table_takes_the_highest_limit_of_the_run(tmp_path):
    """The machine moves between speed levels: a row's % is against the highest limit measured."""
    rows = [{"mode": "limits", "when": "before", "gemm_gflops": 100.0, "read_gbps": 10.0},
            {"mode": "train", "model": "gpt2.sm", "adapter": "lora", "batch": 8, "seq": 128, "gflops": 90.0,
             "tokens_per_s": 1.0, "peak_rss_mb": 1.0, "pct_of_gemm_peak": 90.0},
            {"mode": "beam", "model": "gpt2.sm", "adapter": "lora", "batch": 1, "beam": 10, "new_tokens": 64,
             "streamed_gbps": 8.0, "tokens_per_s": 1.0, "peak_rss_mb": 1.0, "pct_of_read_limit": 80.0},
            {"mode": "limits", "when": "after", "gemm_gflops": 150.0, "read_gbps": 16.0}]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = bench.table(str(path))
    assert "| 60% GEMM |" in out and "| 50% read |" in out and "uses the highest" in out
