#!/usr/bin/env bash
# Idempotent environment setup: creates ./.venv if missing and installs the
# pinned dependencies of requirements.lock plus hpcsgd itself (editable).
# Re-running is cheap: a stamp file records the hash of what was installed.
# Usage: source scripts/setup.sh   (or: bash scripts/setup.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HPCSGD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.hpcsgd-installed"
WANT="$(cat "$ROOT/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing pinned dependencies into $VENV"
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  # chainer's sdist needs an old setuptools and no build isolation.
  "${PIP[@]}" 'setuptools>=65,<70' wheel 'numpy==1.26.4'
  "${PIP[@]}" --no-build-isolation -r "$ROOT/requirements.lock"
  "${PIP[@]}" --no-build-isolation --no-deps -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
