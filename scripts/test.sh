#!/usr/bin/env bash
# Run the test suite: find (or download) the test data, set up .venv, then pytest. Extra arguments
# go to pytest. `-rs` lists every skipped test with its reason in the summary; with the data in
# place no test skips for missing data (a skip means a missing tool, e.g. Java or OpenMPI).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/ensure_data.sh" "bash scripts/test.sh"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -rs -p no:cacheprovider tests "$@"
