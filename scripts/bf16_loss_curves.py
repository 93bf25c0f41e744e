"""fp32 vs ``--precision bf16``: the same short training run twice, both loss curves in one PNG.

    python scripts/bf16_loss_curves.py --train_data data/e2e_prepared/valid.jsonl --out docs/bf16_loss_curves.png

Runs ``python -m jt_lora.train`` (GPT-2 S shape, random init unless --init_checkpoint, LoRA r=4,
batch 8, seq_len 128, label smoothing 0.1, dropout 0.1, logged every step) once per precision into
``--work_root``, then plots the per-step training losses and their difference and prints the max and
mean absolute difference and each run's median tokens/s.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def run(args, precision: str) -> Path:
    work = Path(args.work_root) / precision
    cmd = [sys.executable, "-m", "jt_lora.train", "--train_data", args.train_data, "--model_card", "gpt2.sm",
           "--train_batch_size", "8", "--seq_len", "128", "--max_step", str(args.steps), "--lr", "2e-3",
           "--warmup_step", "0", "--label_smooth", "0.1", "--lora_dropout", "0.1", "--log_interval", "1",
           "--save_interval", "0", "--no_plot", "--precision", precision, "--work_dir", str(work),
           "--overwrite", "delete"]
    if args.init_checkpoint:
        cmd += ["--init_checkpoint", args.init_checkpoint]
    subprocess.run(cmd, check=True)
    return work


def train_log(work: Path):
    recs = [json.loads(line) for line in open(work / "log.jsonl")]
    recs = [r for r in recs if r["kind"] == "train"]
    return (np.array([r["step"] for r in recs]), np.array([r["loss"] for r in recs]),
            np.array([r["tokens_per_s"] for r in recs]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train_data", required=True)
    p.add_argument("--init_checkpoint", default=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--work_root", default="/tmp/jt_lora_bf16_curves")
    p.add_argument("--out", default="docs/bf16_loss_curves.png")
    p.add_argument("--plot_only", action="store_true", help="plot the runs already in --work_root")
    args = p.parse_args(argv)
    runs = {}
    for precision in ("fp32", "bf16"):
        work = Path(args.work_root) / precision if args.plot_only else run(args, precision)
        runs[precision] = train_log(work)
    (s32, l32, t32), (s16, l16, t16) = runs["fp32"], runs["bf16"]
    if not np.array_equal(s32, s16):
        raise SystemExit("the two runs logged different steps")
    diff = l16 - l32
    print(f"{len(diff)} steps: max |bf16 - fp32| {np.abs(diff).max():.4f}, mean {np.abs(diff).mean():.4f}; "
          f"final loss fp32 {l32[-1]:.4f}, bf16 {l16[-1]:.4f}; median tokens/s fp32 {np.median(t32):.1f}, "
          f"bf16 {np.median(t16):.1f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    a.plot(s32, l32, label="fp32", lw=1.6)
    a.plot(s16, l16, "--", label="bf16 (--precision bf16)", lw=1.4)
    a.set_ylabel("train loss (per step)")
    a.set_title("GPT-2 S shape, LoRA r=4, batch 8: fp32 vs bf16")
    a.grid(alpha=0.3)
    a.legend()
    b.plot(s32, diff, color="C3", lw=1.2)
    b.axhline(0, color="k", lw=0.6)
    b.set_ylabel("bf16 - fp32")
    b.set_xlabel("step")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
