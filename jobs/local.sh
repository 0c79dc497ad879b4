#!/usr/bin/env bash
# The main job: 2 ranks of a small ResNet on Fashion-MNIST on this machine, default
# (hierarchical) communicator; prints the final test accuracy. Sets up ./.venv if needed.
#   bash jobs/local.sh                      # 2 ranks, jobs/configs/fashion_mnist.yaml
#   N=4 bash jobs/local.sh --set epochs=1   # more ranks; extra args go to `hpcsgd train`
#   OUT=runs/x bash jobs/local.sh --resume auto
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
N="${N:-2}"
CONFIG="${CONFIG:-jobs/configs/fashion_mnist.yaml}"
OUT="${OUT:-runs/fashion_mnist-$(date +%Y%m%d-%H%M%S)}"
DATA=/usr/share/datasets/fashion-mnist

have_data() { [ -e "$DATA/train-images-idx3-ubyte.gz" ] || [ -e "$DATA/train-images-idx3-ubyte" ]; }
uses_default_data() { ! printf '%s\n' "$@" | grep -qE '^(data_path|dataset)='; }
if uses_default_data "$@" && ! have_data; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[local.sh] Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist || true
  fi
  if ! have_data; then
    echo "[local.sh] Fashion-MNIST not found in $DATA: install it (sudo apt-get install dataset-fashion-mnist)" \
         "or put the 4 IDX .gz files from github.com/zalandoresearch/fashion-mnist in DIR and add" \
         "--set data_path=DIR; or run on synthetic data: bash jobs/local.sh --set dataset=synthetic" \
         "--set 'dataset_options={shape: [1, 28, 28], n_classes: 10, n: 6000}'" >&2
    exit 1
  fi
fi

echo "[local.sh] mpiexec -n $N hpcsgd train $CONFIG --out $OUT $*"
mpiexec -n "$N" hpcsgd train "$CONFIG" --out "$OUT" "$@"
echo "[local.sh] logs, summary.json and curves.png in $OUT"
