"""Benchmark: training-step and beam-search throughput on random weights, optionally against HF.

``python -m jt_lora.bench --model gpt2.md --mode train --batch 8 --seq 128 --steps 5``
reports the median tokens/s over ``--steps`` timed runs after a warm-up, the
peak RSS and, for training, the achieved GFLOP/s. ``--compare hf`` runs the
same workload through transformers + PEFT (LoRA r=4 on c_attn, or (IA)³) in a
separate process (torch and Jittor must not share one) and prints the ratio.
With ``--json`` the last line is one JSON object.

FLOPs counted for a training step: the forward pass (2 per multiply-add:
projections, attention scores and mixing, the LM head on the positions that
are computed) times 2, since the backward pass of a frozen base computes
activation gradients only (no weight gradients), about one forward's worth;
times 3 for full fine-tuning (``--adapter full``), whose backward also computes
every weight gradient.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

__all__ = ["main", "train_flops"]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset at exec, unlike ru_maxrss, which a child
    inherits from the parent that forked it)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_flops(n_layer, n_embd, vocab, batch, seq, head_positions=None, full: bool = False) -> float:
    """Forward FLOPs x 2, or x 3 with weight gradients (``full``; see module docstring)."""
    tokens = batch * seq
    body = tokens * n_layer * 2 * (12 * n_embd * n_embd)  # qkv 3C², proj C², fc 4C², fc_proj 4C²
    attn = batch * n_layer * 2 * 2 * seq * seq * n_embd  # q·k and p·v
    head = (head_positions if head_positions is not None else tokens) * 2 * n_embd * vocab
    return (3.0 if full else 2.0) * (body + attn + head)


def _median_rate(fn, tokens, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return tokens / med, med, times


def bench_jittor(args) -> dict:
    from .backend import jt, device_name
    from .models.loading import load_model
    if args.adapter == "full":   # full fine-tuning: the plain model, every weight trained
        adapter = dict(adapter_type="none")
    else:
        adapter = dict(adapter_type=args.adapter, lora_attn_dim=4, lora_attn_alpha=32, lora_dropout=0.0,
                       lora_inhibition=0.3 if args.adapter == "ina" else 0.0)
    np.random.seed(0)
    model = load_model(None, training=True, card=args.model, **adapter)
    if args.adapter == "full":
        if args.mode != "train":
            raise ValueError("--adapter full is a training workload (--mode train)")
        for p in model.parameters():
            p.start_grad()
    cfg = model.config
    rng = np.random.default_rng(0)
    if args.mode == "train":
        from .training.optim import AdamW
        from .training.trainer import loss_and_grads
        ids = rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype("int32")
        mask = np.ones((args.batch, args.seq), dtype="float32")
        mask[:, : int(args.seq * (1 - args.loss_fraction))] = 0.0
        named = [(n, p) for n, p in model.named_parameters() if not p.is_stop_grad()]
        opt = AdamW(named, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
        batch = {"input": ids, "target": np.roll(ids, -1, axis=1), "mask": mask}
        model.train()

        def step():
            loss, grads = loss_and_grads(model, batch, [p for _, p in named], label_smooth=0.1)
            opt.step(grads)
            jt.sync([p for _, p in named] + [loss])

        rate, med, times = _median_rate(step, args.batch * args.seq, args.steps, args.warmup)
        flops = train_flops(cfg.n_layer, cfg.n_embd, cfg.vocab_size, args.batch, args.seq,
                            head_positions=int(mask.sum()), full=args.adapter == "full")
        return {"tokens_per_s": rate, "step_s": med, "gflops": flops / med / 1e9, "times": times,
                "device": device_name()}
    from .generation.beam import beam_search
    model.eval()
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, args.prompt_len))) for _ in range(args.batch)]

    def run():  # no eos: every hypothesis runs the full --new_tokens steps, as in the HF run
        beam_search(model, prompts, batch_size=args.batch, beam=args.beam, max_new_tokens=args.new_tokens,
                    eos_token_ids=(), early_stop=False)

    rate, med, times = _median_rate(run, args.batch * args.new_tokens, args.steps, args.warmup)
    return {"tokens_per_s": rate, "step_s": med, "times": times, "device": device_name()}


def bench_hf(args) -> dict:
    """The same workload through transformers + PEFT, in a child process."""
    cmd = [sys.executable, "-m", "jt_lora.bench_hf", json.dumps(vars(args))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"HF benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser():
    from .cli import DefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="python -m jt_lora.bench", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2.sm", choices=["gpt2.sm", "gpt2.md", "gpt2.lg"], help="model card")
    p.add_argument("--mode", default="train", choices=["train", "beam"], help="workload")
    p.add_argument("--adapter", default="lora", choices=["lora", "ina", "ia3", "full"],
                   help="adapter (r 4, alpha 32; InA inhibition 0.3), or full fine-tuning (train only)")
    p.add_argument("--batch", type=int, default=8, help="examples (train) or prompts (beam) per batch")
    p.add_argument("--seq", type=int, default=128, help="train: tokens per example")
    p.add_argument("--loss_fraction", type=float, default=1.0,
                   help="train: share of positions that carry loss (E2E completions are about half)")
    p.add_argument("--beam", type=int, default=10, help="beam: beam size")
    p.add_argument("--new_tokens", type=int, default=64, help="beam: tokens generated per prompt")
    p.add_argument("--prompt_len", type=int, default=32, help="beam: prompt tokens")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--compare", choices=["hf"], default=None,
                   help="also run transformers + PEFT in a child process (default: no comparison)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--table", metavar="RESULTS_JSONL", default=None,
                   help="print a Markdown table of earlier --json results and exit")
    return p


def validate_args(args) -> None:
    """Every size checked before any work: a zero batch would time nothing and report 0 tokens/s."""
    from .cli import positive_int
    for flag in ("batch", "seq", "beam", "new_tokens", "prompt_len", "steps"):
        positive_int(f"--{flag}", getattr(args, flag))
    positive_int("--warmup", args.warmup, 0)
    if not 0 < args.loss_fraction <= 1:
        raise ValueError(f"--loss_fraction must be in (0, 1], got {args.loss_fraction}")


def machine_line() -> str:
    import platform
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def table(path) -> str:
    """Markdown table of ``--json`` result lines (one per workload)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out = [f"Machine: {machine_line()}. Median of timed runs after a warm-up; ratios are pairs from one run.",
           "",
           "| model | workload | adapter | jt_lora tokens/s | HF+PEFT tokens/s | speed-up | jt_lora GFLOP/s | peak RSS jt_lora / HF (MB) |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["mode"] == "train":
            work = f"train step, batch {r['batch']} x {r['seq']}" + (
                f", loss on {r['loss_fraction']:.0%}" if r.get("loss_fraction", 1.0) < 1.0 else "")
            gflops = f"{r['gflops']:.1f}"
        else:
            work = f"beam {r['beam']}, batch {r['batch']}, {r['new_tokens']} new tokens"
            gflops = "-"
        hf = r.get("hf", {})
        out.append(f"| {r['model']} | {work} | {r['adapter']} | {r['tokens_per_s']:.1f} | "
                   f"{hf.get('tokens_per_s', float('nan')):.1f} | {r.get('speedup_vs_hf', float('nan')):.2f}x | "
                   f"{gflops} | {r['peak_rss_mb']:.0f} / {hf.get('peak_rss_mb', float('nan')):.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    from .cli import run_cli
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args), "jt_lora.bench")


def _run(args) -> int:
    if args.table:
        print(table(args.table))
        return 0
    validate_args(args)
    ours = bench_jittor(args)
    ours["peak_rss_mb"] = peak_rss_mb()
    result = {"model": args.model, "mode": args.mode, "adapter": args.adapter, "batch": args.batch,
              "tokens_per_s": ours["tokens_per_s"], "peak_rss_mb": ours["peak_rss_mb"], "jt_lora": ours}
    if args.mode == "train":
        result.update(seq=args.seq, loss_fraction=args.loss_fraction, gflops=ours["gflops"])
    else:
        result.update(beam=args.beam, new_tokens=args.new_tokens, prompt_len=args.prompt_len)
    if args.compare == "hf":
        hf = bench_hf(args)
        result["hf"] = hf
        result["speedup_vs_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
        result["memory_ratio_vs_hf"] = ours["peak_rss_mb"] / hf["peak_rss_mb"]
    line = (f"{args.model} {args.mode} {args.adapter}: jt_lora {ours['tokens_per_s']:.1f} tokens/s, "
            f"peak RSS {ours['peak_rss_mb']:.0f} MB")
    if args.mode == "train":
        line += f", {ours['gflops']:.1f} GFLOP/s"
    if "hf" in result:
        line += (f" | HF+PEFT {result['hf']['tokens_per_s']:.1f} tokens/s, {result['hf']['peak_rss_mb']:.0f} MB"
                 f" | speed-up {result['speedup_vs_hf']:.2f}x, memory {result['memory_ratio_vs_hf']:.2f}x")
    print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
