#!/usr/bin/env bash
# Beam-search E2E test generations, as the LoRA replication's inference command
# (gpt2_beam.py --beam 10 --length_penalty 0.8 --no_repeat_ngram_size 4 --eos_token_id 628).
# Every default below can be overridden by passing the flag again (the last one wins), e.g.
#   ./run_inference.sh --batch_size 8 --no-unique_contexts
#   ADAPTER_DIR=trained_models/GPT2_M/e2e/checkpoint-26289 ./run_inference.sh
#   ./run_inference.sh --beam 1 --max_examples 50 --output_file greedy50.jsonl
#   ADAPTER_DIR=none ./run_inference.sh --init_checkpoint model.26289.pt --lora_dim 4 --lora_alpha 32
#     (a microsoft/LoRA checkpoint holding base + LoRA weights)
# Re-running resumes: ids already in the output file are skipped (--overwrite starts afresh).
# --eos_token_id adds to the eos ids (50256 is always one, as in the reference).
# Environment: DATA_DIR (prepared JSONL, default data/e2e_prepared), CKPT (base weights, default
# pretrained_checkpoints/gpt2-medium-pytorch_model.bin), WORK_DIR (default trained_models/GPT2_M/e2e,
# where finetune.sh writes its checkpoint-<step> adapter directories), ADAPTER_DIR (default: the
# newest checkpoint-<step> in WORK_DIR; "none": no adapter directory), PYTHON (default .venv/bin/python when present).
# Then score with: ./run_metric.sh --sample_file WORK_DIR/predict.<step>.b10p08r4.jsonl \
#                    --input_file DATA_DIR/test_formatted.jsonl
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DATA_DIR="${DATA_DIR:-$ROOT/data/e2e_prepared}"
CKPT="${CKPT:-$ROOT/pretrained_checkpoints/gpt2-medium-pytorch_model.bin}"
WORK_DIR="${WORK_DIR:-$ROOT/trained_models/GPT2_M/e2e}"
ADAPTER_DIR="${ADAPTER_DIR:-}"
if [ -z "$ADAPTER_DIR" ]; then
  # the newest checkpoint-<step> by step number; none found = the flags must name the weights
  best=-1
  for d in "$WORK_DIR"/checkpoint-*; do
    step="${d##*checkpoint-}"
    [ -d "$d" ] || continue
    case "$step" in ''|*[!0-9]*) continue ;; esac
    if [ "$step" -gt "$best" ]; then best="$step"; ADAPTER_DIR="$d"; fi
  done
fi
[ "$ADAPTER_DIR" = none ] && ADAPTER_DIR=""
case "$ADAPTER_DIR" in
  "") tag=model ;;
  *checkpoint-*) tag="${ADAPTER_DIR##*checkpoint-}" ;;
  *) tag="$(basename "$ADAPTER_DIR")" ;;   # e.g. WORK_DIR/adapter: not the whole path
esac

args=(
  --data "$DATA_DIR/test.jsonl"
  --batch_size 4
  --seq_len 512
  --eval_len 64
  --model_card gpt2.md
  --beam 10
  --length_penalty 0.8
  --no_repeat_ngram_size 4
  --repetition_penalty 1.0
  --eos_token_id 628
  --unique_contexts
  --work_dir "$WORK_DIR"
  --output_file "predict.$tag.b10p08r4.jsonl"
)
if [ -n "$ADAPTER_DIR" ]; then
  args+=(--adapter_dir "$ADAPTER_DIR" --base_checkpoint "$CKPT")
fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m jt_lora.generate "${args[@]}" "$@"
