#!/usr/bin/env bash
# Download third-party data into the project's data/ directory (never committed: see .gitignore).
#
#   bash scripts/download_data.sh            # GPT-2 vocab, E2E txt (LoRA), official E2E CSVs
#   bash scripts/download_data.sh boolq      # BoolQ train/dev JSONL
#   bash scripts/download_data.sh all        # everything
#   DATA_DIR=/elsewhere bash scripts/download_data.sh   # another destination (then set JT_LORA_DATA)
#
# Files already present are skipped; each file is downloaded to a temporary name and moved into
# place only when complete. Offline, the first connection fails within CONNECT_TIMEOUT seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${DATA_DIR:-$ROOT/data}"
CONNECT_TIMEOUT="${CONNECT_TIMEOUT:-10}"

LORA_E2E="https://raw.githubusercontent.com/microsoft/LoRA/main/examples/NLG/data/e2e"
E2E_CSV="https://raw.githubusercontent.com/tuetschek/e2e-dataset/master"
GPT2_VOCAB="https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
BOOLQ="https://storage.googleapis.com/boolq"
# SHA-256 of the GPT-2 vocabulary files (the same hashes tiktoken pins for "gpt2").
ENCODER_SHA=196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783
VOCAB_SHA=1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5

FETCH_QUIET=1
FETCH_HINT="Offline alternative: put the files under \$JT_LORA_DATA, data/ or ../shared/data (see README)."
. "$(dirname "${BASH_SOURCE[0]}")/fetch_lib.sh"

get_vocab() {
    fetch "$GPT2_VOCAB/encoder.json" "$DATA_DIR/gpt2-vocab/encoder.json" "$ENCODER_SHA"
    fetch "$GPT2_VOCAB/vocab.bpe" "$DATA_DIR/gpt2-vocab/vocab.bpe" "$VOCAB_SHA"
}

get_e2e() {
    for split in train valid test; do
        fetch "$LORA_E2E/$split.txt" "$DATA_DIR/e2e/$split.txt"
    done
}

get_e2e_csv() {
    for name in trainset devset testset testset_w_refs; do
        fetch "$E2E_CSV/$name.csv" "$DATA_DIR/e2e-csv/$name.csv"
    done
}

get_boolq() {
    fetch "$BOOLQ/train.jsonl" "$DATA_DIR/boolq/train.jsonl"
    fetch "$BOOLQ/dev.jsonl" "$DATA_DIR/boolq/dev.jsonl"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(vocab e2e e2e-csv)
for target in "${targets[@]}"; do
    case "$target" in
        vocab) get_vocab ;;
        e2e) get_e2e ;;
        e2e-csv) get_e2e_csv ;;
        boolq) get_boolq ;;
        all) get_vocab; get_e2e; get_e2e_csv; get_boolq ;;
        *) echo "usage: $0 [vocab|e2e|e2e-csv|boolq|all]..." >&2; exit 2 ;;
    esac
done
echo "done: data in ${DATA_DIR}"
