# Sourced by every driver, with ROOT set to the project root: the interpreter to run, in $PY.
# PYTHON (a path or a command name on PATH) wins, and one that is not there stops with one line
# rather than a silent switch to another Python; otherwise the project's .venv, else python3.
if [ -n "${PYTHON:-}" ]; then
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "error: PYTHON=$PYTHON is neither an executable file nor a command on PATH; unset it to use ${ROOT}/.venv/bin/python or python3" >&2
    exit 2
  fi
  PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python3
fi
