#!/usr/bin/env bash
# Make sure the quickstart data (GPT-2 vocab, E2E valid/test files) can be found, and download it
# when it cannot. demo.sh and test.sh run this first, before setup.sh, so a user without data
# learns it in seconds rather than after the install.
#
#   bash scripts/ensure_data.sh [COMMAND]   # COMMAND: the user's command, shown in the error's example
#
# Lookup (jt_lora.io.assets, per file): $JT_LORA_DATA > data/ > ../shared/data. When something is
# missing, scripts/download_data.sh fetches it into data/ (~10 MB). If that fails (offline), the
# script prints ONE error line naming JT_LORA_DATA, the download script and the places searched,
# and exits 1; the download's own log is kept in data/download.log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMAND="${1:-bash scripts/demo.sh}"
# Any Python 3 will do: jt_lora.io.assets needs only the standard library, and .venv may not exist yet.
source "$ROOT/scripts/pick_python.sh"

# Run from $ROOT: `python -m` puts the current directory first on sys.path, so this clone's
# jt_lora is the one asked, whatever else is installed.
check() { (cd "$ROOT" && "$PY" -m jt_lora.io.assets check --command "$COMMAND" "$@"); }

check 2>/dev/null && exit 0
echo "data: GPT-2 vocab / E2E files not found; downloading them with scripts/download_data.sh into data/"
mkdir -p "$ROOT/data"
log="$ROOT/data/download.log"
if DATA_DIR="$ROOT/data" bash "$ROOT/scripts/download_data.sh" >"$log" 2>&1; then
  check
  echo "data: downloaded into data/"
else
  check --download_failed || exit 1
fi
