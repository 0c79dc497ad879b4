# Shared by the Slurm and PBS jobs: plan with --dry-run, print the command, run it under
# `hpcsgd launch`, which relaunches the job with --resume auto after a killed rank, a hang or a
# lost host (docs/launch.md).
#   run_job NAME CONFIG NODES RANKS_PER_NODE srun|mpiexec [LAUNCHER OPTIONS...] -- [hpcsgd train options]
# Environment: HPCSGD_VENV (venv to activate), IMAGENET (dir with train/ and val/),
# OUT (output dir), MAX_RESTARTS (default 3), FINALIZE_GRACE (seconds, default 60),
# DRY_RUN=1 (only print the plan and the command).
run_job() {
  local name="$1" config="$2" nodes="$3" rpn="$4"
  shift 4
  local launcher="$1" largs=()
  shift
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do largs+=("$1"); shift; done
  [ "$#" -gt 0 ] && shift
  local ranks=$((nodes * rpn))
  local out="${OUT:-runs/$name-${SLURM_JOB_ID:-${PBS_JOBID:-$(date +%Y%m%d-%H%M%S)}}}"
  local data=()
  if [ -n "${IMAGENET:-}" ]; then
    data=(--set "data_path=$IMAGENET/train" --set "val_path=$IMAGENET/val")
  fi
  local cmd=(hpcsgd launch -n "$ranks" --launcher "$launcher" --launcher-args="${largs[*]}"
             --max-restarts "${MAX_RESTARTS:-3}" --finalize-grace "${FINALIZE_GRACE:-60}"
             -- train "$config" "${data[@]}" --out "$out" --resume auto "$@")
  echo "[$name] $nodes nodes x $rpn ranks/node = $ranks ranks"
  echo "[$name] plan:"
  hpcsgd train "$config" "${data[@]}" "$@" --dry-run --world-size "$ranks" --ranks-per-node "$rpn"
  echo "[$name] running: ${cmd[*]}"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "[$name] DRY_RUN=1: not launching"
    return 0
  fi
  "${cmd[@]}"
}

activate_hpcsgd() {
  # Site modules go here (docs/train.md, "Adapting a job to a site"), e.g.:
  #   module load gcc/12 openmpi/4.1 cuda/12.2 nccl/2.18
  if [ -n "${HPCSGD_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$HPCSGD_VENV/bin/activate"
  fi
  command -v hpcsgd >/dev/null || { echo "hpcsgd not on PATH: set HPCSGD_VENV" >&2; return 1; }
}
