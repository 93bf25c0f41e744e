#!/usr/bin/env bash
# Fine-tune GPT-2 on BoolQ through finetune.sh: its recipe (LoRA r=4, alpha 32, lr 2e-4, batch 8,
# 5 epochs, ...) with BoolQ's data, --seq_len and work dir. Any flag can be overridden, e.g.
#   examples/BoolQ/finetune_boolq.sh --adapter ina --lora_inhibition 0.3
#   WORK_DIR=trained_models/GPT2_M/boolq_ia3 examples/BoolQ/finetune_boolq.sh --adapter ia3 --lr 3e-3
#   CKPT=none examples/BoolQ/finetune_boolq.sh --model_card gpt2.sm --n_layer 2 --n_embd 32 --n_head 4 --max_step 20
# Environment: see examples/BoolQ/defaults.sh (DATA_DIR, WORK_DIR, CKPT, MODEL_CARD, SEQ_LEN); NPROC
# and PYTHON are passed on to finetune.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/defaults.sh"
boolq_help "$0" "$@" -- bash "$BOOLQ_ROOT/finetune.sh" --help
for split in train valid; do
  if [ ! -f "$DATA_DIR/$split.jsonl" ]; then
    echo "error: $DATA_DIR/$split.jsonl not found; run examples/BoolQ/prepare_boolq.py --out_dir $DATA_DIR" >&2
    exit 1
  fi
done
args=(
  --train_data "$DATA_DIR/train.jsonl"
  --valid_data "$DATA_DIR/valid.jsonl"
  --seq_len "$SEQ_LEN"
  --model_card "$MODEL_CARD"
  --work_dir "$WORK_DIR"
)
if [ "$CKPT" = none ]; then
  args+=(--init_checkpoint "")   # an empty path = random init
else
  args+=(--init_checkpoint "$CKPT")
fi
PYTHON="$PY" exec bash "$BOOLQ_ROOT/finetune.sh" "${args[@]}" "$@"
