# BoolQ settings shared by finetune_boolq.sh, run_inference_boolq.sh and eval_boolq.sh (sourced).
# Each can be set in the environment; flags passed to a wrapper go last and override its defaults.
#   DATA_DIR    prepared data (examples/BoolQ/prepare_boolq.py --out_dir), default data/boolq_prepared
#   WORK_DIR    training output (adapter/, checkpoint-<step>/, predictions), default trained_models/GPT2_M/boolq
#   CKPT        base GPT-2 weights; "none" = a random-init base (pipeline demos and tests only),
#               which training saves to WORK_DIR/base for inference and evaluation
#   MODEL_CARD  architecture: gpt2.sm | gpt2.md | gpt2.lg (default gpt2.md, as finetune.sh)
#   SEQ_LEN     must equal prepare_boolq.py --seq_len (passages were cut to fit it), default 512
#   PYTHON      interpreter (default .venv/bin/python when present)
BOOLQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROOT="$BOOLQ_ROOT" source "$BOOLQ_ROOT/scripts/pick_python.sh"
DATA_DIR="${DATA_DIR:-$BOOLQ_ROOT/data/boolq_prepared}"
WORK_DIR="${WORK_DIR:-$BOOLQ_ROOT/trained_models/GPT2_M/boolq}"
CKPT="${CKPT:-$BOOLQ_ROOT/pretrained_checkpoints/gpt2-medium-pytorch_model.bin}"
MODEL_CARD="${MODEL_CARD:-gpt2.md}"
SEQ_LEN="${SEQ_LEN:-512}"
# Absolute paths: the drivers cd to the project root.
case "$DATA_DIR" in /*) ;; *) DATA_DIR="$PWD/$DATA_DIR" ;; esac
case "$WORK_DIR" in /*) ;; *) WORK_DIR="$PWD/$WORK_DIR" ;; esac
if [ "$CKPT" = none ]; then
  BASE="$WORK_DIR/base"       # written by training from a random init
else
  case "$CKPT" in /*) ;; *) CKPT="$PWD/$CKPT" ;; esac
  BASE="$CKPT"
fi
ADAPTER_DIR="${ADAPTER_DIR:-$WORK_DIR/adapter}"   # the final adapter training writes; "none": base only
case "$ADAPTER_DIR" in /*|none) ;; *) ADAPTER_DIR="$PWD/$ADAPTER_DIR" ;; esac
# --help / -h: the wrapper's own usage (its header comment and these settings), then the help of
# the command it runs; exits 0 without touching data. Usage: boolq_help "$0" "$@" -- CMD...
boolq_help() {
  local script="$1"; shift
  local wants=0
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    case "$1" in -h|--help) wants=1 ;; esac
    shift
  done
  [ "$wants" = 1 ] || return 0
  shift
  echo "usage: [ENV=...] $script [flags]"
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$script"
  echo
  echo "Settings now (examples/BoolQ/defaults.sh): DATA_DIR=$DATA_DIR WORK_DIR=$WORK_DIR CKPT=$CKPT"
  echo "  MODEL_CARD=$MODEL_CARD SEQ_LEN=$SEQ_LEN ADAPTER_DIR=$ADAPTER_DIR PYTHON=$PY"
  echo
  cd "$BOOLQ_ROOT" && PYTHONPATH="$BOOLQ_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$@"
}
