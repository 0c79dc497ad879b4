#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, runs ruff and the whole test suite.
# MPI tests launch mpiexec themselves (1-4 ranks, virtual nodes), each with a timeout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
ruff check hpcsgd tests benchmarks
python -m pytest -q -ra "$@" tests
