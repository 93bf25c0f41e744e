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

TMP=""
cleanup() {
    if [ -n "$TMP" ]; then
        rm -f "$TMP"
        rmdir "$(dirname "$TMP")" 2>/dev/null || true  # an empty folder must not hide another copy
    fi
}
trap cleanup EXIT

fetch() {
    local url="$1" dest="$2"
    if [ -s "$dest" ]; then
        echo "present: ${dest#"$ROOT"/}"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    TMP="$dest.$$.tmp"
    echo "downloading $url"
    local ok=0
    if command -v curl >/dev/null 2>&1; then
        curl -fL --connect-timeout "$CONNECT_TIMEOUT" --retry 2 --retry-connrefused -o "$TMP" "$url" || ok=$?
    elif command -v wget >/dev/null 2>&1; then
        wget --connect-timeout="$CONNECT_TIMEOUT" --tries=3 -O "$TMP" "$url" || ok=$?
    else
        echo "error: neither curl nor wget is installed" >&2
        exit 1
    fi
    if [ "$ok" -ne 0 ] || [ ! -s "$TMP" ]; then
        echo "error: could not download $url (exit $ok)." >&2
        echo "       No network? This script needs internet access; files already downloaded were kept." >&2
        exit 1
    fi
    mv "$TMP" "$dest"
    TMP=""
    echo "saved: ${dest#"$ROOT"/}"
}

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
