#!/usr/bin/env bash
# Run ChainerMN's own CPU tests against hpcsgd (see docs/chainermn.md).
#
#   scripts/chainermn_conformance.sh PATH_TO_CHAINER_SOURCE [RANKS] [TEST_DIRS...]
#
# PATH_TO_CHAINER_SOURCE is a checkout of github.com/chainer/chainer (v7.8.x); its
# tests/chainermn_tests are copied to a temporary folder next to
# scripts/chainermn_conformance_shim.py (as conftest.py), which points chainermn's
# create_communicator, communicator classes, create_multi_node_optimizer and the
# training-script API at hpcsgd. RANKS defaults to 2. TEST_DIRS default to the
# communicator and optimizer tests; give e.g. datasets_tests extensions_tests to run more.
# HPCSGD_CONFORMANCE_COMM=hierarchical (or flat, naive) answers every CPU name with
# that hpcsgd algorithm. GPU tests are deselected (-m "not gpu"). Extra pytest options go in
# HPCSGD_CONFORMANCE_PYTEST_ARGS (e.g. "-v -rA" for a per-test verdict); the whole run is
# killed after HPCSGD_CONFORMANCE_TIMEOUT seconds (default 900).
set -euo pipefail
src=${1:?usage: $0 PATH_TO_CHAINER_SOURCE [RANKS] [TEST_DIRS...]}
ranks=${2:-2}
shift $(( $# >= 2 ? 2 : 1 ))
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(communicator_tests optimizer_tests)
here=$(cd "$(dirname "$0")/.." && pwd)
tests=$src/tests/chainermn_tests
[ -d "$tests" ] || { echo "$tests not found: pass the root of a chainer checkout" >&2; exit 2; }
work=$(mktemp -d -t hpcsgd-chainermn-XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r "$tests" "$work/chainermn_tests"
cp "$here/scripts/chainermn_conformance_shim.py" "$work/conftest.py"
printf '[pytest]\nmarkers =\n    gpu: GPU\n    slow: slow\n    chainerx: chainerx\n' > "$work/pytest.ini"
py=${PYTHON:-python}
mpiexec=$(dirname "$(command -v "$py")")/mpiexec
[ -x "$mpiexec" ] || mpiexec=mpiexec
cd "$work"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# test_multinode_autoload downloads MNIST on rank 0 (chainer.datasets.get_mnist); offline, rank 0
# fails before its first collective and the other ranks wait for it forever. Set
# HPCSGD_CONFORMANCE_NETWORK=1 on a machine that can download it.
deselect=()
[ "${HPCSGD_CONFORMANCE_NETWORK:-0}" = 1 ] || deselect=(--deselect
  chainermn_tests/extensions_tests/test_multi_node_snapshot.py::test_multinode_autoload)
targets=()
for d in "${dirs[@]}"; do targets+=("chainermn_tests/$d"); done
# Each rank writes its own report; rank 0's goes to stdout, all to $work/rank-N.txt.
timeout "${HPCSGD_CONFORMANCE_TIMEOUT:-900}" "$mpiexec" -n "$ranks" "$py" -m mpi4py -m pytest -q -rs \
  -m "not gpu and not slow" -p no:cacheprovider ${HPCSGD_CONFORMANCE_PYTEST_ARGS:-} "${deselect[@]}" "${targets[@]}"
