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

``--mode limits`` measures what this machine can do at most, as the yardsticks for the workloads:
the fp32 GEMM peak (GFLOP/s: Jittor's 2-D matmul, which runs oneDNN's sgemm on every thread, on
square matrices, median of ``--steps`` runs) and the read bandwidth (GB/s: one OpenMP pass summing
a float32 array of ``--stream_mb`` MB, far beyond the caches, median of ``--steps`` passes). A train
run given ``--limits FILE`` (the ``--json`` line of a limits run; measured and written there first
when FILE does not exist) adds ``pct_of_gemm_peak``: its GFLOP/s as a percentage of that peak.

Peak memory: ``peak_rss_mb`` is the whole process's (model build and compiles included);
``steps_peak_rss_mb`` is the peak over the warm-up and timed steps only (the high-water mark is
reset before them through ``/proc/self/clear_refs``; null where that is not available).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

__all__ = ["main", "train_flops", "measure_limits"]


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


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_STEPS_PEAK_MB = None   # peak RSS over the last _median_rate's steps, when it could be reset


def _median_rate(fn, tokens, steps, warmup):
    global _STEPS_PEAK_MB
    reset = _reset_peak_rss()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    _STEPS_PEAK_MB = peak_rss_mb() if reset else None
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
    from .nn import bf16
    bf16_on = args.precision == "bf16"
    if bf16_on:   # before any oneDNN work of this process (see nn.bf16.enable)
        bf16.enable()
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
            with bf16.compute(bf16_on):   # --precision bf16: the frozen base's products
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
    if args.precision != "fp32":
        from .nn.quant import quantize_model
        quantize_model(model)
    else:   # as jt_lora.generate: the packed strips are the only copy of the block weights
        from .nn.decode_block import pack_model
        pack_model(model, rows=args.batch * args.beam)
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, args.prompt_len))) for _ in range(args.batch)]

    def run():  # no eos: every hypothesis runs the full --new_tokens steps, as in the HF run
        beam_search(model, prompts, batch_size=args.batch, beam=args.beam, max_new_tokens=args.new_tokens,
                    eos_token_ids=(), early_stop=False)

    rate, med, times = _median_rate(run, args.batch * args.new_tokens, args.steps, args.warmup)
    return {"tokens_per_s": rate, "step_s": med, "times": times, "device": device_name()}


# One OpenMP pass over a float32 array: 16 independent accumulators per thread (vectorised under
# Jittor's -Ofast -march=native), so the loop is bound by memory reads, not by the add latency.
_STREAM_SRC = r"""
const long long n = in0->num, blocks = n / 16;
const float* x = in0_p;
double total = 0.0;
#pragma omp parallel reduction(+:total)
{
    float acc[16] = {0.f};
    #pragma omp for schedule(static)
    for (long long i = 0; i < blocks; i++)
        for (int k = 0; k < 16; k++) acc[k] += x[i * 16 + k];
    for (int k = 0; k < 16; k++) total += acc[k];
}
for (long long i = blocks * 16; i < n; i++) total += x[i];
out0_p[0] = (float)total;
"""


def measure_limits(gemm_n: int = 3072, stream_mb: int = 1536, reps: int = 5) -> dict:
    """This machine's fp32 GEMM peak (GFLOP/s) and read bandwidth (GB/s), medians of ``reps`` runs."""
    from .backend import jt, device_name, onednn_available
    rng = np.random.default_rng(0)
    a = jt.array(rng.standard_normal((gemm_n, gemm_n), dtype=np.float32))
    b = jt.array(rng.standard_normal((gemm_n, gemm_n), dtype=np.float32))
    jt.sync([a, b])
    jt.matmul(a, b).sync()   # compile and warm up
    gemm_times = []
    for _ in range(reps):
        t = time.perf_counter()
        jt.matmul(a, b).sync()
        gemm_times.append(time.perf_counter() - t)
    del a, b
    n = stream_mb * (1 << 20) // 4
    x = jt.ones((n,), dtype="float32")
    x.sync()
    stream = lambda: jt.code((1,), "float32", [x], cpu_src=_STREAM_SRC)  # noqa: E731
    got = stream().item()   # compile, warm up, and check every element was read
    if abs(got - n) > 1e-6 * n:
        raise RuntimeError(f"stream kernel summed {got}, expected {n}")
    stream_times = []
    for _ in range(reps):
        t = time.perf_counter()
        stream().sync()
        stream_times.append(time.perf_counter() - t)
    gemm_s, stream_s = float(np.median(gemm_times)), float(np.median(stream_times))
    return {"gemm_gflops": 2.0 * gemm_n ** 3 / gemm_s / 1e9, "read_gbps": n * 4 / stream_s / 1e9,
            "gemm_n": gemm_n, "stream_mb": stream_mb, "gemm_times": gemm_times, "stream_times": stream_times,
            "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()), "onednn": onednn_available(),
            "device": device_name(), "machine": machine_line()}


def beam_step_bytes(card: str, precision: str = "fp32") -> int:
    """Bytes of weights one beam step must read: every block's four projections and the tied LM head
    (fp32: 4 bytes each; int8: 1 byte plus a 4-byte scale per output channel). LayerNorms, biases
    and the embedding rows looked up are negligible."""
    from .models.gpt2 import GPT2Config
    cfg = GPT2Config.from_card(card)
    n, v = cfg.n_embd, cfg.vocab_size
    params = cfg.n_layer * 12 * n * n + v * n
    if precision == "int8":
        return params + 4 * (cfg.n_layer * (3 * n + n + 4 * n + n) + v)
    return 4 * params


def load_limits(path: str) -> dict:
    """The limits JSON at ``path`` (the last JSON line of the file); measured and written there first
    when the file does not exist."""
    if not os.path.exists(path):
        limits = measure_limits()
        limits["mode"] = "limits"
        with open(path, "w") as f:
            f.write(json.dumps(limits) + "\n")
        return limits
    lines = [line for line in open(path) if line.strip().startswith("{")]
    if not lines:
        raise ValueError(f"{path}: no JSON line (expected the --json output of --mode limits)")
    limits = json.loads(lines[-1])
    if "gemm_gflops" not in limits:
        raise ValueError(f"{path}: no gemm_gflops (expected the --json output of --mode limits)")
    return limits


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
    p.add_argument("--mode", default="train", choices=["train", "beam", "limits"],
                   help="workload, or this machine's GEMM peak and read bandwidth (limits)")
    p.add_argument("--adapter", default="lora", choices=["lora", "ina", "ia3", "full"],
                   help="adapter (r 4, alpha 32; InA inhibition 0.3), or full fine-tuning (train only)")
    p.add_argument("--batch", type=int, default=8, help="examples (train) or prompts (beam) per batch")
    p.add_argument("--seq", type=int, default=128, help="train: tokens per example")
    p.add_argument("--loss_fraction", type=float, default=1.0,
                   help="train: share of positions that carry loss (E2E completions are about half)")
    p.add_argument("--beam", type=int, default=10, help="beam: beam size")
    p.add_argument("--new_tokens", type=int, default=64, help="beam: tokens generated per prompt")
    p.add_argument("--prompt_len", type=int, default=32, help="beam: prompt tokens")
    p.add_argument("--precision", default="fp32",
                   help="beam: weights fp32, or int8 (jt_lora.generate --precision int8; not with --compare hf); "
                        "train: bf16 = the frozen base's products in bfloat16 (jt_lora.train --precision bf16)")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--compare", choices=["hf"], default=None,
                   help="also run transformers + PEFT in a child process (default: no comparison)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--limits", metavar="LIMITS_JSON", default=None,
                   help="add the share of this machine's limits from this --mode limits --json output "
                        "(train: pct_of_gemm_peak; beam: pct_of_read_limit, the weights read per step at the "
                        "measured speed against the read bandwidth; measured and written there when the file "
                        "does not exist)")
    p.add_argument("--stream_mb", type=int, default=1536, help="limits: MB streamed for the read bandwidth")
    p.add_argument("--gemm_n", type=int, default=3072, help="limits: size of the square GEMM")
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
    if args.precision == "bf16":   # train: the frozen base's products in bf16 (nn.bf16)
        if args.mode != "train" or args.adapter == "full" or args.compare:
            raise ValueError("--precision bf16 applies to --mode train with an adapter, without --compare")
        from .nn.bf16 import unavailable_reason
        if unavailable_reason():
            raise ValueError(f"--precision bf16: {unavailable_reason()}")
        return
    from .nn.quant import check_precision
    check_precision(args.precision)
    if args.precision != "fp32" and (args.mode != "beam" or args.compare):
        raise ValueError(f"--precision {args.precision} applies to --mode beam without --compare")


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
    limits = [r for r in rows if r.get("mode") == "limits"]
    rows = [r for r in rows if r.get("mode") != "limits"]
    out = [f"Machine: {machine_line()}. Median of timed runs after a warm-up; ratios are pairs from one run."]
    # the machine moves between speed levels within minutes: the % column is against the highest limit
    # measured in the run, so a slow moment during one measurement cannot flatter a row
    peak = max((lim["gemm_gflops"] for lim in limits), default=None)
    read = max((lim["read_gbps"] for lim in limits), default=None)
    if limits:
        out.append("Limits (`--mode limits`, 2 threads) measured " + " and ".join(
            f"{lim.get('when', '')}: {lim['gemm_gflops']:.0f} GFLOP/s fp32 GEMM, {lim['read_gbps']:.1f} GB/s read"
            for lim in limits) + "; the % column uses the highest of them.")
    out += ["",
            "| model | workload | adapter | jt_lora tokens/s | HF+PEFT tokens/s | speed-up | jt_lora GFLOP/s | % of limit | peak RSS jt_lora / HF (MB) | load (1 min) |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["mode"] == "train":
            work = f"train step, batch {r['batch']} x {r['seq']}" + (
                f", loss on {r['loss_fraction']:.0%}" if r.get("loss_fraction", 1.0) < 1.0 else "") + (
                f", {r['precision']}" if r.get("precision", "fp32") != "fp32" else "")
            gflops = f"{r['gflops']:.1f}"
        else:
            work = f"beam {r['beam']}, batch {r['batch']}, {r['new_tokens']} new tokens" + (
                f", {r['precision']}" if r.get("precision", "fp32") != "fp32" else "")
            gflops = "-"
        hf = r.get("hf", {})
        pct = r.get("pct_of_gemm_peak", r.get("pct_of_read_limit"))
        if r["mode"] == "train" and peak and "gflops" in r:
            pct = 100.0 * r["gflops"] / peak
        elif r["mode"] == "beam" and read and "streamed_gbps" in r:
            pct = 100.0 * r["streamed_gbps"] / read
        pct = "-" if pct is None else (f"{pct:.0f}% GEMM" if r["mode"] == "train" else f"{pct:.0f}% read")
        load = "-".join(f"{x:.1f}" for x in r.get("load_1min", [])) or "-"
        ratio = f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else "-"
        hf_rate = f"{hf['tokens_per_s']:.1f}" if hf else "-"
        hf_mem = f"{hf['peak_rss_mb']:.0f}" if hf else "-"
        out.append(f"| {r['model']} | {work} | {r['adapter']} | {r['tokens_per_s']:.1f} | {hf_rate} | {ratio} | "
                   f"{gflops} | {pct} | {r['peak_rss_mb']:.0f} / {hf_mem} | {load} |")
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
    if args.mode == "limits":
        return _run_limits(args)
    limits = load_limits(args.limits) if args.limits else None
    load_before = os.getloadavg()[0]
    ours = bench_jittor(args)
    ours["peak_rss_mb"] = peak_rss_mb()
    ours["steps_peak_rss_mb"] = _STEPS_PEAK_MB
    result = {"model": args.model, "mode": args.mode, "adapter": args.adapter, "batch": args.batch,
              "tokens_per_s": ours["tokens_per_s"], "peak_rss_mb": ours["peak_rss_mb"],
              "steps_peak_rss_mb": _STEPS_PEAK_MB, "jt_lora": ours,
              "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if args.mode == "train":
        result.update(seq=args.seq, loss_fraction=args.loss_fraction, gflops=ours["gflops"], precision=args.precision)
        if limits is not None:
            result.update(pct_of_gemm_peak=100.0 * ours["gflops"] / limits["gemm_gflops"],
                          gemm_peak_gflops=limits["gemm_gflops"])
    else:
        result.update(beam=args.beam, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                      precision=args.precision)
        if limits is not None and limits.get("read_gbps"):
            step_gb = beam_step_bytes(args.model, args.precision) / 1e9
            streamed = step_gb * ours["tokens_per_s"] / args.batch   # one step per new token of a batch
            result.update(weight_gb_per_step=step_gb, streamed_gbps=streamed, read_limit_gbps=limits["read_gbps"],
                          pct_of_read_limit=100.0 * streamed / limits["read_gbps"])
    if args.compare == "hf":
        hf = bench_hf(args)
        result["hf"] = hf
        result["speedup_vs_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
        result["memory_ratio_vs_hf"] = ours["peak_rss_mb"] / hf["peak_rss_mb"]
    line = (f"{args.model} {args.mode} {args.adapter}{'' if args.precision == 'fp32' else ' ' + args.precision}: jt_lora {ours['tokens_per_s']:.1f} tokens/s, "
            f"peak RSS {ours['peak_rss_mb']:.0f} MB")
    if args.mode == "train":
        line += f", {ours['gflops']:.1f} GFLOP/s"
        if "pct_of_gemm_peak" in result:
            line += f" ({result['pct_of_gemm_peak']:.0f}% of the {result['gemm_peak_gflops']:.0f} GFLOP/s GEMM peak)"
    elif "pct_of_read_limit" in result:
        line += (f", weights streamed at {result['streamed_gbps']:.1f} GB/s ({result['pct_of_read_limit']:.0f}% of the "
                 f"{result['read_limit_gbps']:.1f} GB/s read limit)")
    if "hf" in result:
        line += (f" | HF+PEFT {result['hf']['tokens_per_s']:.1f} tokens/s, {result['hf']['peak_rss_mb']:.0f} MB"
                 f" | speed-up {result['speedup_vs_hf']:.2f}x, memory {result['memory_ratio_vs_hf']:.2f}x")
    print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(line)
    return 0


def _run_limits(args) -> int:
    from .cli import positive_int
    positive_int("--stream_mb", args.stream_mb)
    positive_int("--gemm_n", args.gemm_n)
    limits = measure_limits(gemm_n=args.gemm_n, stream_mb=args.stream_mb, reps=args.steps)
    limits["mode"] = "limits"
    line = (f"limits ({limits['threads']} threads): fp32 GEMM peak {limits['gemm_gflops']:.1f} GFLOP/s "
            f"(n={args.gemm_n}), read bandwidth {limits['read_gbps']:.1f} GB/s ({args.stream_mb} MB)")
    print(line, file=sys.stderr)
    print(json.dumps(limits) if args.json else line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
