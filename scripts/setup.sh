#!/usr/bin/env bash
# Create .venv (if absent) and install jt_lora with what the tests need. Idempotent: a second run
# only checks a stamp. Also installs the system packages the tests use (OpenMPI for data-parallel
# tests, a Java runtime for METEOR) when they are missing and we may install them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
EXTRAS="${JT_LORA_EXTRAS:-test}"

apt_install() {  # apt_install CMD PKG...: install PKGs when CMD is missing and apt-get is usable
  local cmd="$1"; shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $* (for $cmd)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >/dev/null 2>&1 \
      || echo "setup: could not install $* ; tests that need $cmd will be skipped"
  else
    echo "setup: $cmd not found; install $* for the tests that need it"
  fi
}
apt_install mpirun openmpi-bin libopenmpi-dev
apt_install java default-jre-headless

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.jt_lora_setup"
want="$(cat "$ROOT/pyproject.toml" | sha1sum | cut -d' ' -f1) $EXTRAS"
# The stamp alone could hide a package removed by hand: also check the imports the tests rely on
# (loralib is the reference for the LoRA layer tests; a find_spec check costs ~0.1 s, no import).
modules="jittor tiktoken safetensors jt_lora"
case ",$EXTRAS," in *,test,*) modules="$modules pytest loralib torch transformers peft pycocoevalcap nltk matplotlib" ;; esac
installed() {
  "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
    $modules 2>/dev/null
}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! installed; then
  echo "setup: installing jt_lora[$EXTRAS] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  echo "$want" > "$stamp"
fi
# Jittor compiles its core on first import (about 3 minutes on 2 cores, cached in ~/.cache/jittor).
# Once that has worked for this install, later runs skip it: importing Jittor costs seconds, and
# on a busy machine it can wait much longer for the lock of Jittor's cache.
warm="$VENV/.jt_lora_jittor_ready"
if [ -f "$warm" ] && [ "$(cat "$warm")" = "$want" ] && [ -d "${cache_path:-$HOME/.cache/jittor}" ]; then
  echo "setup: .venv up to date (Jittor compiled before; delete $warm to re-check)"
  exit 0
fi
"$VENV/bin/python" - <<'PY'
import time
t = time.time()
import jt_lora
from jt_lora.backend import jt, onednn_available, device_name
a = jt.ones((64, 64))
assert float((a @ a).sum().item()) == 64.0 ** 3
print(f"setup: jittor {jt.__version__} ready on {device_name()} (oneDNN: {onednn_available()}) in {time.time() - t:.0f}s")
PY
echo "$want" > "$warm"
