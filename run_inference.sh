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
# Output: WORK_DIR/predict.<step>.b<beam>p<length_penalty>r<no_repeat_ngram_size>.jsonl, named
# after the values actually used (e.g. --beam 4 gives ...b4p08r4.jsonl), unless --output_file is given.
# Defaults passed to python -m jt_lora.generate: --batch_size 4 --seq_len 512 --eval_len 64 --beam 10
#   --length_penalty 0.8 --no_repeat_ngram_size 4 --repetition_penalty 1.0 --eos_token_id 628
#   --unique_contexts; the model shape comes from the checkpoint, the adapter settings from ADAPTER_DIR.
# Then score with: ./run_metric.sh --sample_file WORK_DIR/predict.<step>.b10p08r4.jsonl \
#                    --input_file DATA_DIR/test_formatted.jsonl
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/pick_python.sh"
for a in "$@"; do
  if [ "$a" = "-h" ] || [ "$a" = "--help" ]; then
    echo "usage: [ENV=...] ./run_inference.sh [jt_lora.generate flags]"
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    echo
    echo "Flags of python -m jt_lora.generate:"
    cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m jt_lora.generate --help
  fi
done
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
  --beam 10
  --length_penalty 0.8
  --no_repeat_ngram_size 4
  --repetition_penalty 1.0
  --eos_token_id 628
  --unique_contexts
  --work_dir "$WORK_DIR"
)
if [ -n "$ADAPTER_DIR" ]; then
  args+=(--adapter_dir "$ADAPTER_DIR" --base_checkpoint "$CKPT")
fi

# The output is named after the settings actually used: the last value of each flag wins, as in
# argparse (--flag VALUE and --flag=VALUE alike).
last_value() {
  local name="$1" value="$2"; shift 2
  while [ $# -gt 0 ]; do
    case "$1" in
      "$name") [ $# -gt 1 ] && value="$2"; shift ;;
      "$name"=*) value="${1#*=}" ;;
    esac
    shift
  done
  printf '%s' "$value"
}
all=("${args[@]}" "$@")
beam="$(last_value --beam 10 "${all[@]}")"
lp="$(last_value --length_penalty 0.8 "${all[@]}")"
ngram="$(last_value --no_repeat_ngram_size 4 "${all[@]}")"
output="$(last_value --output_file "predict.$tag.b${beam}p${lp//./}r${ngram}.jsonl" "${all[@]}")"
args+=(--output_file "$output")

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m jt_lora.generate "${args[@]}" "$@"
