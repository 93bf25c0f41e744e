#!/usr/bin/env bash
# BoolQ test accuracy by log-likelihood (" yes" vs " no" after each prompt; no generation) through
# python -m jt_lora.eval_boolq. Prints a confusion table, then one JSON line. Flags are passed on, e.g.
#   examples/BoolQ/eval_boolq.sh --batch_size 16 --max_examples 500
#   ADAPTER_DIR=trained_models/GPT2_M/boolq/checkpoint-4000 examples/BoolQ/eval_boolq.sh
#   ADAPTER_DIR=none examples/BoolQ/eval_boolq.sh       # the base model alone (zero-shot)
# Environment: see examples/BoolQ/defaults.sh; ADAPTER_DIR (default WORK_DIR/adapter).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/defaults.sh"
boolq_help "$0" "$@" -- "$PY" -m jt_lora.eval_boolq --help
if [ "$ADAPTER_DIR" = none ]; then
  model=(--init_checkpoint "$BASE")
else
  model=(--base_checkpoint "$BASE" --adapter_dir "$ADAPTER_DIR")
fi
cd "$BOOLQ_ROOT"
PYTHONPATH="$BOOLQ_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m jt_lora.eval_boolq \
  --data "$DATA_DIR/test.jsonl" "${model[@]}" --seq_len "$SEQ_LEN" \
  --output_file "$WORK_DIR/eval_boolq.loglik.jsonl" "$@"
