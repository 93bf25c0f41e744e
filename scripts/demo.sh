#!/usr/bin/env bash
# The main job: E2E data -> fine-tuning -> beam search -> official E2E metrics. It ends with the
# list of its output files, then, as the LAST line, the scores as one JSON object
# {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} (also saved in $WORK/metrics.json).
#
# Default (no CKPT): an embedded demo on a TINY GPT-2 WITH RANDOM INITIAL WEIGHTS (2 layers, width
# 128), LoRA-tuned on a few hundred E2E examples: it shows the whole pipeline runs, not what LoRA
# achieves (expect near-zero scores). With a real checkpoint it runs the paper's recipe:
#   MODEL=gpt2.md CKPT=pretrained_checkpoints/gpt2-medium-pytorch_model.bin bash scripts/demo.sh
# Data (GPT-2 vocab, E2E) is found in $JT_LORA_DATA, data/ or ../shared/data, else downloaded
# (scripts/ensure_data.sh). Environment: WORK (output dir, default work_dir/demo), ADAPTER
# (lora|ina|ia3, default lora), N_TRAIN / N_TEST (demo sizes), EXTRA_TRAIN_ARGS (passed to the trainer).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/ensure_data.sh "bash scripts/demo.sh"
bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"
WORK="${WORK:-$ROOT/work_dir/demo}"
ADAPTER="${ADAPTER:-lora}"
CKPT="${CKPT:-}"
MODEL="${MODEL:-gpt2.md}"
mkdir -p "$WORK"
step() { echo; echo "=== $* ==="; }

if [ -z "$CKPT" ]; then
  N_TRAIN="${N_TRAIN:-300}"
  N_TEST="${N_TEST:-150}"
  step "1/4 data: E2E from the data found on disk (train = first $N_TRAIN valid examples, demo only)"
  "$PY" examples/NLG/prepare_e2e.py --out_dir "$WORK/data" --train_from_valid "$N_TRAIN"
  head -n 200 "$WORK/data/valid.jsonl" > "$WORK/data/valid_demo.jsonl"
  head -n "$N_TEST" "$WORK/data/test.jsonl" > "$WORK/data/test_demo.jsonl"
  head -n "$N_TEST" "$WORK/data/test_formatted.jsonl" > "$WORK/data/test_demo_formatted.jsonl"
  step "2/4 fine-tuning: $ADAPTER on a tiny RANDOMLY INITIALISED GPT-2 (a pipeline demo)"
  "$PY" -m jt_lora.train --train_data "$WORK/data/train.jsonl" --valid_data "$WORK/data/valid_demo.jsonl" \
    --model_card gpt2.sm --n_layer 2 --n_embd 128 --n_head 4 --adapter "$ADAPTER" \
    --lora_dim 8 --lora_alpha 32 --lora_dropout 0.1 $([ "$ADAPTER" = ina ] && echo --lora_inhibition 0.3) \
    --train_batch_size 8 --seq_len 512 --lr 0.01 --weight_decay 0.01 --correct_bias --adam_beta2 0.999 \
    --scheduler linear --warmup_step 20 --max_epoch 4 --label_smooth 0.1 \
    --log_interval 10 --eval_interval 50 --save_interval 50 --random_seed 110 \
    --work_dir "$WORK/train" --overwrite delete ${EXTRA_TRAIN_ARGS:-}
  step "3/4 beam search on the first $N_TEST test lines"
  "$PY" -m jt_lora.generate --data "$WORK/data/test_demo.jsonl" \
    --base_checkpoint "$WORK/train/base" --adapter_dir "$WORK/train/adapter" \
    --batch_size 8 --beam 4 --length_penalty 0.8 --no_repeat_ngram_size 4 --repetition_penalty 1.0 \
    --eos_token_id 628 --eos_token_id 50256 --seq_len 512 --eval_len 48 --unique_contexts --overwrite \
    --work_dir "$WORK/generate" --output_file predict.jsonl
  INPUT="$WORK/data/test_demo_formatted.jsonl"
else
  step "1/4 data: the full E2E splits (train must be present: scripts/download_data.sh)"
  "$PY" examples/NLG/prepare_e2e.py --out_dir "$ROOT/data/e2e_prepared"
  step "2/4 fine-tuning: $ADAPTER, the paper's recipe on $MODEL from $CKPT"
  DATA_DIR="$ROOT/data/e2e_prepared" CKPT="$CKPT" bash finetune.sh --model_card "$MODEL" --adapter "$ADAPTER" \
    --work_dir "$WORK/train" ${EXTRA_TRAIN_ARGS:-}
  step "3/4 beam search on the E2E test set"
  DATA_DIR="$ROOT/data/e2e_prepared" CKPT="$CKPT" ADAPTER_DIR="$WORK/train/adapter" WORK_DIR="$WORK/generate" \
    bash run_inference.sh --model_card "$MODEL" --output_file predict.jsonl
  INPUT="$ROOT/data/e2e_prepared/test_formatted.jsonl"
fi

step "4/4 decoding and E2E metrics"
if ! bash run_metric.sh --sample_file "$WORK/generate/predict.jsonl" --input_file "$INPUT" \
    --output_ref_file "$WORK/e2e_ref.txt" --output_pred_file "$WORK/e2e_pred.txt" > "$WORK/metrics.txt"; then
  cat "$WORK/metrics.txt"
  exit 1
fi
# run_metric.sh prints the scores as its last line; keep them as the demo's last line too.
scores="$(tail -n 1 "$WORK/metrics.txt")"
printf '%s\n' "$scores" > "$WORK/metrics.json.tmp" && mv "$WORK/metrics.json.tmp" "$WORK/metrics.json"
sed '$d' "$WORK/metrics.txt"
echo
echo "outputs:"
echo "  predictions  $WORK/e2e_pred.txt (references: $WORK/e2e_ref.txt; token ids: $WORK/generate/predict.jsonl)"
echo "  metrics      $WORK/metrics.json (full log: $WORK/metrics.txt)"
if [ -f "$WORK/train/loss_curve.png" ]; then
  echo "  loss plot    $WORK/train/loss_curve.png"
fi
echo "  adapter      $WORK/train/adapter"
echo "scores (E2E metrics, last line):"
echo "$scores"
