#!/usr/bin/env bash
# Greedy answers to the BoolQ test prompts through run_inference.sh, then their accuracy
# (python -m jt_lora.eval_boolq --predictions: the first word must be yes/no, anything else counts
# wrong as "unparseable"). Flags go to jt_lora.generate, e.g.
#   examples/BoolQ/run_inference_boolq.sh --max_examples 200 --batch_size 16
# Set OUT (file name in WORK_DIR, default predict.boolq.greedy.jsonl) rather than --output_file,
# and WORK_DIR rather than --work_dir: the evaluation step reads them.
# Environment: see examples/BoolQ/defaults.sh; ADAPTER_DIR (default WORK_DIR/adapter, "none": base only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/defaults.sh"
boolq_help "$0" "$@" -- bash "$BOOLQ_ROOT/run_inference.sh" --help
EVAL_LEN="${EVAL_LEN:-4}"
OUT="${OUT:-predict.boolq.greedy.jsonl}"
# Prompts hold at most SEQ_LEN - 2 tokens (the 2-token completion " yes"/" no" + eos fits SEQ_LEN);
# generate keeps the last seq_len - eval_len prompt tokens, so this seq_len keeps them all.
GEN_SEQ_LEN=$((SEQ_LEN + EVAL_LEN - 2))
ADAPTER_DIR="$ADAPTER_DIR" CKPT="$BASE" PYTHON="$PY" bash "$BOOLQ_ROOT/run_inference.sh" \
  --data "$DATA_DIR/test.jsonl" \
  --beam 1 --eval_len "$EVAL_LEN" --seq_len "$GEN_SEQ_LEN" --length_penalty 1.0 --no_repeat_ngram_size 0 \
  --no-unique_contexts --batch_size 8 --work_dir "$WORK_DIR" --output_file "$OUT" "$@"
cd "$BOOLQ_ROOT"
PYTHONPATH="$BOOLQ_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m jt_lora.eval_boolq \
  --data "$DATA_DIR/test.jsonl" --predictions "$WORK_DIR/$OUT" --output_file "$WORK_DIR/${OUT%.jsonl}.eval.jsonl"
