#!/usr/bin/env bash
# Decode generated E2E token ids and score them, as the LoRA replication does
# (gpt2_decode.py, then e2e-metrics measure_scores.py -p). The last line of output is the
# scores as one JSON object: {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} on the official scale.
#
#   bash run_metric.sh --sample_file work_dir/predict.jsonl \
#       --input_file data/e2e_prepared/test_formatted.jsonl \
#       [--vocab DIR] [--output_ref_file FILE] [--output_pred_file FILE] [--ref_unique_file FILE]
#
# The reference and prediction files default to e2e_ref.txt and e2e_pred.txt beside the sample
# file; the vocabulary defaults to the gpt2-vocab asset. METEOR needs Java (apt-get install
# default-jre-headless). A bad input or an I/O fault stops with one line naming the file.
# PYTHON: the interpreter (default .venv/bin/python when present, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/pick_python.sh"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

usage_text() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
usage() { usage_text; exit "${1:-0}"; }

sample_file="" input_file="" vocab="" ref_file="" pred_file="" unique_file=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sample_file) sample_file="${2:?--sample_file needs a value}"; shift 2 ;;
    --input_file) input_file="${2:?--input_file needs a value}"; shift 2 ;;
    --vocab) vocab="${2:?--vocab needs a value}"; shift 2 ;;
    --output_ref_file) ref_file="${2:?--output_ref_file needs a value}"; shift 2 ;;
    --output_pred_file) pred_file="${2:?--output_pred_file needs a value}"; shift 2 ;;
    --ref_unique_file) unique_file="${2:?--ref_unique_file needs a value}"; shift 2 ;;
    -h|--help)
      usage_text
      echo
      echo "Step 1, python -m jt_lora.decode:"
      "$PY" -m jt_lora.decode --help
      echo
      echo "Step 2, python -m jt_lora.metrics:"
      exec "$PY" -m jt_lora.metrics --help ;;
    *) echo "run_metric.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done
if [ -z "$sample_file" ] || [ -z "$input_file" ]; then
  echo "run_metric.sh: --sample_file and --input_file are required" >&2
  usage 2 >&2
fi
out_dir="$(dirname "$sample_file")"
ref_file="${ref_file:-$out_dir/e2e_ref.txt}"
pred_file="${pred_file:-$out_dir/e2e_pred.txt}"

decode_args=(--sample_file "$sample_file" --input_file "$input_file"
             --output_ref_file "$ref_file" --output_pred_file "$pred_file")
[ -n "$vocab" ] && decode_args+=(--vocab "$vocab")
[ -n "$unique_file" ] && decode_args+=(--ref_unique_file "$unique_file")

"$PY" -m jt_lora.decode "${decode_args[@]}"
exec "$PY" -m jt_lora.metrics --ref "$ref_file" --pred "$pred_file" --json
