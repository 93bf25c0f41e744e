#!/usr/bin/env bash
# Download pretrained GPT-2 weights (PyTorch pytorch_model.bin from Hugging Face) into
# pretrained_checkpoints/, named as microsoft/LoRA names them (gpt2-medium-pytorch_model.bin, ...).
#
#   bash scripts/download_checkpoints.sh              # small, medium and large (~5.3 GB)
#   bash scripts/download_checkpoints.sh medium       # only GPT-2 Medium (the paper's E2E model)
#   CKPT_DIR=/elsewhere bash scripts/download_checkpoints.sh small
#
# Files already present are skipped; each file is downloaded to a temporary name and moved into
# place only when complete. Offline, the first connection fails within CONNECT_TIMEOUT seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT_DIR="${CKPT_DIR:-$ROOT/pretrained_checkpoints}"
CONNECT_TIMEOUT="${CONNECT_TIMEOUT:-10}"
HF="https://huggingface.co/openai-community"

. "$(dirname "${BASH_SOURCE[0]}")/fetch_lib.sh"

sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(small medium large)
for size in "${sizes[@]}"; do
    case "$size" in
        small|sm|gpt2) fetch "$HF/gpt2/resolve/main/pytorch_model.bin" "$CKPT_DIR/gpt2-pytorch_model.bin" ;;
        medium|md|gpt2-medium) fetch "$HF/gpt2-medium/resolve/main/pytorch_model.bin" "$CKPT_DIR/gpt2-medium-pytorch_model.bin" ;;
        large|lg|gpt2-large) fetch "$HF/gpt2-large/resolve/main/pytorch_model.bin" "$CKPT_DIR/gpt2-large-pytorch_model.bin" ;;
        *) echo "usage: $0 [small|medium|large]..." >&2; exit 2 ;;
    esac
done
echo "done: checkpoints in ${CKPT_DIR}"
