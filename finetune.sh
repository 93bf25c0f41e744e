#!/usr/bin/env bash
# Fine-tune GPT-2 on E2E with the LoRA paper's GPT-2 M recipe (microsoft/LoRA's gpt2_ft.py command).
# Every default below can be overridden by passing the flag again, e.g.
#   ./finetune.sh --adapter ina --lora_inhibition 0.3 --work_dir trained_models/GPT2_M/e2e_ina
#   ./finetune.sh --adapter ia3 --lr 3e-3
# Environment: DATA_DIR (prepared JSONL, default data/e2e_prepared), CKPT (base weights,
# default pretrained_checkpoints/gpt2-medium-pytorch_model.bin), NPROC (data-parallel processes via
# mpirun, default 1), PYTHON (default .venv/bin/python when present, else python3). --help shows all.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/pick_python.sh"
DATA_DIR="${DATA_DIR:-$ROOT/data/e2e_prepared}"
CKPT="${CKPT:-$ROOT/pretrained_checkpoints/gpt2-medium-pytorch_model.bin}"
NPROC="${NPROC:-1}"

args=(
  --train_data "$DATA_DIR/train.jsonl"
  --valid_data "$DATA_DIR/valid.jsonl"
  --train_batch_size 8
  --grad_acc 1
  --valid_batch_size 4
  --seq_len 512
  --model_card gpt2.md
  --init_checkpoint "$CKPT"
  --clip 0.0
  --lr 0.0002
  --weight_decay 0.01
  --correct_bias
  --adam_beta2 0.999
  --scheduler linear
  --warmup_step 500
  --max_epoch 5
  --save_interval 1000
  --eval_interval 2000
  --log_interval 100
  --adapter lora
  --lora_dim 4
  --lora_alpha 32
  --lora_dropout 0.1
  --label_smooth 0.1
  --work_dir "$ROOT/trained_models/GPT2_M/e2e"
  --random_seed 110
)
cd "$ROOT"
for a in "$@"; do
  if [ "$a" = "-h" ] || [ "$a" = "--help" ]; then
    cat <<EOF
usage: finetune.sh [FLAG VALUE ...]     (flags of python -m jt_lora.train; a flag given again wins)

Fine-tunes GPT-2 on E2E with the LoRA paper's GPT-2 M recipe (microsoft/LoRA's gpt2_ft.py command).

Environment:
  DATA_DIR  prepared E2E JSONL directory        (now: $DATA_DIR)
  CKPT      base GPT-2 weights                  (now: $CKPT)
  NPROC     data-parallel processes via mpirun  (now: $NPROC)
  PYTHON    interpreter                         (now: $PY)

Flags passed by default:
EOF
    i=0
    while [ "$i" -lt "${#args[@]}" ]; do
      next="${args[$((i + 1))]:-}"
      if [ -n "$next" ] && [ "${next#--}" = "$next" ]; then
        printf '  %s %s\n' "${args[$i]}" "$next"; i=$((i + 2))
      else
        printf '  %s\n' "${args[$i]}"; i=$((i + 1))
      fi
    done
    printf '\nA work_dir holds one run: --resume continues it, --overwrite starts afresh (moves the old run aside).\n\n'
    exec "$PY" -m jt_lora.train --help
  fi
done
if [ "$NPROC" -gt 1 ]; then
  exec mpirun --allow-run-as-root -np "$NPROC" "$PY" -m jt_lora.train "${args[@]}" "$@"
fi
exec "$PY" -m jt_lora.train "${args[@]}" "$@"
