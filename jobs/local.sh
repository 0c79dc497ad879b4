#!/usr/bin/env bash
# Main job on one machine: sets up ./.venv if needed, then runs hpcsgd under mpiexec.
#   bash jobs/local.sh [NRANKS]      (default 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
N="${1:-2}"
echo "[local.sh] mpiexec -n $N python -m mpi4py benchmarks/allreduce.py --quick"
exec mpiexec -n "$N" python -m mpi4py benchmarks/allreduce.py --quick
