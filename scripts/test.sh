#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, runs ruff and the whole test suite.
# MPI tests launch mpiexec themselves (1-4 ranks, virtual nodes), each with a timeout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
# Real-data tests use Debian's Fashion-MNIST; install it when we can (root + apt), else they skip.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
    >/dev/null 2>&1 || echo "[test.sh] could not install dataset-fashion-mnist; its tests will skip"
fi
ruff check hpcsgd tests benchmarks scripts
python -m pytest -q -ra "$@" tests
