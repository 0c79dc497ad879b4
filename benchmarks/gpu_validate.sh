#!/usr/bin/env bash
# GPU validation in one run, for the day a GPU machine is available: needs no edits, ends within
# 8 minutes on one GPU (HPCSGD_GPU_BUDGET seconds for all steps, default 450).
#
#   bash benchmarks/gpu_validate.sh
#
# Steps, each under its own time limit; every step runs (or is skipped with a reason) even when an
# earlier one failed, and each outcome is recorded:
#   install      pip install -e '.[gpu]' into the venv (HPCSGD_WHEELHOUSE=DIR: offline, from wheels there)
#   environment  versions (CuPy, CUDA, cuDNN, NCCL, GPU) and the problems of the pair (hpcsgd.gpu_compat)
#   tests        the GPU tests: tests/test_gpu_*.py, the CuPy kernel tests, every test marked gpu (among
#                them tests/test_gpu_half_scale.py: the scaled float16 NCCL wire against a NumPy model)
#   main_job     the README main job on the GPU: 1 rank x 256 images (the same global batch as 2 x 128),
#                hierarchical communicator, then checks test top-1 >= 88%
#   allreduce    benchmarks/allreduce.py --gpu: nccl and hierarchical (GPU), float32 and float16 (the
#                scaled default: its MAX allreduce and host read are in the timing), 1 rank
#   resnet50     benchmarks/gpu_resnet50.py: training images/s at batch 32 and 64, float32 and float16
# Writes $HPCSGD_GPU_OUT (default benchmarks/results/gpu)/gpu_validate.json (all outcomes and numbers),
# one log per step in logs/, and prints a summary. Without a GPU every step is recorded as skipped,
# with the reason, and the script exits 0; otherwise it exits 1 when any step failed.
#
# Environment: HPCSGD_VENV (default ./.venv; created by scripts/setup.sh when missing),
# HPCSGD_DATA (Fashion-MNIST IDX files, default /usr/share/datasets/fashion-mnist),
# HPCSGD_WHEELHOUSE, HPCSGD_GPU_OUT, HPCSGD_GPU_BUDGET, HPCSGD_GPU_VALIDATE_NO_GPU=1 (act as if no GPU).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTDIR="${HPCSGD_GPU_OUT:-$ROOT/benchmarks/results/gpu}"
VENV="${HPCSGD_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
DATA="${HPCSGD_DATA:-/usr/share/datasets/fashion-mnist}"
BUDGET="${HPCSGD_GPU_BUDGET:-450}"
START=$(date +%s)
HOSTPY="$(command -v python3 || echo "$PY")"
mkdir -p "$OUTDIR/logs"
STEPS="$OUTDIR/steps.jsonl"
: >"$STEPS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "[gpu_validate] $*"; }

record() {  # name status seconds detail
  "$HOSTPY" -c 'import json, sys; n, s, t, d = sys.argv[1:5]
print(json.dumps({"step": n, "status": s, "seconds": round(float(t), 1), "detail": d,
                  "log": "logs/%s.log" % n}))' "$1" "$2" "$3" "$4" >>"$STEPS"
  say "$1: $2${4:+ ($4)}"
}

run_step() {  # name limit_seconds command...: run with a time limit, record the outcome
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 15)); then
    record "$name" skipped 0 "the ${BUDGET} s budget is spent"
    return 1
  fi
  ((limit > left)) && limit=$left
  local log="$OUTDIR/logs/$name.log" t0 rc dt
  say "$name: running (limit ${limit} s): $*"
  t0=$(date +%s.%N)
  # a step is a function (exported, run in a child bash so that timeout can stop it) or a command
  timeout --kill-after=5 "$limit" bash -c '"$@"' step "$@" >"$log" 2>&1
  rc=$?
  dt=$("$HOSTPY" -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$(date +%s.%N)")
  if ((rc == 0)); then
    record "$name" ok "$dt" ""
  elif ((rc == 124 || rc == 137)); then
    record "$name" timeout "$dt" "ran past its ${limit} s limit"
  else
    local why
    why="$(grep -E 'Error|error:|FAILED|failed|not found' "$log" | grep -v MPI_Abort | tail -n 1)"
    [ -n "$why" ] || why="$(grep -v '^\s*$' "$log" | tail -n 1)"
    record "$name" failed "$dt" "exit $rc: $(echo "$why" | cut -c1-300)"
  fi
  return $rc
}

no_gpu_reason() {
  if [ "${HPCSGD_GPU_VALIDATE_NO_GPU:-0}" = 1 ]; then
    echo "no GPU (HPCSGD_GPU_VALIDATE_NO_GPU=1)"
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no NVIDIA driver on this machine (nvidia-smi not found)"
  elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "nvidia-smi lists no GPU"
  fi
}

STEP_NAMES=(install environment tests main_job allreduce resnet50)
REASON="$(no_gpu_reason)"
if [ -n "$REASON" ]; then
  for s in "${STEP_NAMES[@]}"; do record "$s" skipped 0 "$REASON"; done
else
  say "GPU: $(nvidia-smi -L | head -n 1)"
  export ROOT OUTDIR VENV PY DATA
  step_install() {
    [ -x "$PY" ] || bash scripts/setup.sh || return 1
    local src=()
    [ -n "${HPCSGD_WHEELHOUSE:-}" ] && src=(--no-index --find-links "$HPCSGD_WHEELHOUSE")
    "$PY" -m pip install --disable-pip-version-check --no-build-isolation "${src[@]}" -e ".[gpu]"
  }
  step_environment() {
    "$PY" - "$OUTDIR/environment.json" <<'EOF'
import json, sys
from hpcsgd import gpu_compat
r = gpu_compat.report()
json.dump(r, open(sys.argv[1], "w"), indent=1)
print(json.dumps(r, indent=1))
sys.exit(1 if r["problems"] else 0)
EOF
  }
  step_tests() {
    local rc=0
    "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_device.py tests/test_gpu_logic.py \
      tests/test_gpu_compat.py tests/test_gpu_topology.py tests/test_kernels_cast.py || rc=1
    "$PY" -m pytest -q -p no:cacheprovider -m gpu --deselect tests/test_gpu_device.py tests || rc=1
    return $rc
  }
  step_main_job() {
    if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA/train-images-idx3-ubyte" ]; then
      echo "Fashion-MNIST not found in $DATA: set HPCSGD_DATA=DIR holding its 4 IDX files"
      return 3
    fi
    "$PY" -m hpcsgd train jobs/configs/fashion_mnist.yaml --set gpu=true --set batch_per_rank=256 \
      --set "data_path=$DATA" --out "$OUTDIR/main_job" || return 1
    "$PY" - "$OUTDIR/main_job/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
top1 = s.get("top1")
print(f"test top-1 {top1}")
sys.exit(0 if top1 is not None and top1 >= 0.88 else 1)
EOF
  }

  export -f step_install step_environment step_tests step_main_job
  run_step install 180 step_install
  if [ ! -x "$PY" ]; then
    for s in environment tests main_job allreduce resnet50; do record "$s" skipped 0 "no venv at $VENV"; done
  else
    run_step environment 60 step_environment
    run_step tests 100 step_tests
    run_step main_job 150 step_main_job
    run_step allreduce 60 "$PY" -m mpi4py benchmarks/allreduce.py --gpu --repeats 10 \
      --out "$OUTDIR/allreduce_gpu.json"
    run_step resnet50 120 "$PY" benchmarks/gpu_resnet50.py --batches 32 64 --dtypes float32 float16 \
      --iters 15 --warmup 3 --out "$OUTDIR/gpu_resnet50.json"
  fi
fi

# one JSON file with every outcome and number, and a summary
"$HOSTPY" - "$OUTDIR" "$REASON" "$(($(date +%s) - START))" <<'EOF'
import json, os, platform, sys, time
out, reason, wall = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = [json.loads(line) for line in open(os.path.join(out, "steps.jsonl")) if line.strip()]
def load(name):
    p = os.path.join(out, name)
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
main = load("main_job/summary.json")
res = {"script": "benchmarks/gpu_validate.sh", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "host": platform.node(), "gpu_present": not reason, "skipped_reason": reason or None,
       "wall_seconds": wall, "steps": steps, "environment": load("environment.json"),
       "main_job": {k: main.get(k) for k in ("top1", "top5", "images_per_s", "iterations")} if main else None,
       "allreduce_gpu": load("allreduce_gpu.json"), "resnet50": load("gpu_resnet50.json")}
with open(os.path.join(out, "gpu_validate.json"), "w") as f:
    json.dump(res, f, indent=1)
print(f"\nGPU validation summary ({wall} s){': ' + reason if reason else ''}")
for s in steps:
    print(f"  {s['step']:<12} {s['status']:<8} {s['seconds']:7.1f} s  {s['detail']}")
if res["main_job"]:
    print(f"  main job: top-1 {res['main_job']['top1']}, {res['main_job']['images_per_s']} images/s")
for r in (res["resnet50"] or {}).get("results", []):
    print(f"  ResNet-50 {r['dtype']} batch {r['batch']}: {r['images_per_s']:.0f} images/s")
for k, r in ((res["allreduce_gpu"] or {}).get("resnet50_gpu") or {}).items():
    print(f"  allreduce {k}: {r['median_ms']:.2f} ms")
print(f"wrote {os.path.join(out, 'gpu_validate.json')}")
failed = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
sys.exit(1 if failed else 0)
EOF
