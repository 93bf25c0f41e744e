#!/usr/bin/env bash
# The standard benchmark set: jt_lora against HF transformers + PEFT on this machine, in one run.
# Writes bench_results/results.jsonl and bench_results/results.md (a Markdown table for the README).
# The machine's limits (fp32 GEMM peak, read bandwidth) are measured before and after the set; every
# row records the load average and its share of the limit (training: GEMM peak; beam: read bandwidth).
# Opt-in precisions (int8 beam search, bf16 training) run without the HF comparison.
# Environment: QUICK=1 runs GPT-2 small only; STEPS (timed runs per figure, default 3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/pick_python.sh"
OUT="$ROOT/bench_results"
STEPS="${STEPS:-3}"
mkdir -p "$OUT"
: > "$OUT/results.jsonl.tmp"
limits() {  # $1: before|after; the first one is what every row's % refers to
  echo "bench: limits ($1)" >&2
  "$PY" -m jt_lora.bench --mode limits --json | tail -n 1 \
    | "$PY" -c "import json,sys; d=json.load(sys.stdin); d['when']='$1'; print(json.dumps(d))" > "$OUT/limits_$1.json"
  cat "$OUT/limits_$1.json" >> "$OUT/results.jsonl.tmp"
}
solo() { echo "bench: $*" >&2; "$PY" -m jt_lora.bench "$@" --steps "$STEPS" --warmup 1 --limits "$OUT/limits_before.json" --json | tail -n 1 >> "$OUT/results.jsonl.tmp"; }
run() { solo "$@" --compare hf; }
limits before
for adapter in lora ina ia3; do
  run --model gpt2.sm --mode train --adapter "$adapter" --batch 8 --seq 128
done
run --model gpt2.sm --mode train --adapter lora --batch 8 --seq 128 --loss_fraction 0.5
run --model gpt2.sm --mode beam --adapter lora --batch 1 --beam 10 --new_tokens 64 --prompt_len 32
run --model gpt2.sm --mode beam --adapter lora --batch 4 --beam 10 --new_tokens 64 --prompt_len 32
solo --model gpt2.sm --mode beam --adapter lora --batch 1 --beam 10 --new_tokens 64 --prompt_len 32 --precision int8
if "$PY" -c "import sys; from jt_lora.nn.bf16 import unavailable_reason; sys.exit(1 if unavailable_reason() else 0)" 2>/dev/null; then
  solo --model gpt2.sm --mode train --adapter lora --batch 8 --seq 128 --precision bf16
fi
if [ "${QUICK:-0}" != 1 ]; then
  run --model gpt2.md --mode train --adapter lora --batch 8 --seq 128
  run --model gpt2.md --mode beam --adapter lora --batch 1 --beam 10 --new_tokens 64 --prompt_len 32
  solo --model gpt2.md --mode beam --adapter lora --batch 1 --beam 10 --new_tokens 64 --prompt_len 32 --precision int8
fi
limits after
mv "$OUT/results.jsonl.tmp" "$OUT/results.jsonl"
"$PY" -m jt_lora.bench --table "$OUT/results.jsonl" > "$OUT/results.md.tmp" && mv "$OUT/results.md.tmp" "$OUT/results.md"
cat "$OUT/results.md"
