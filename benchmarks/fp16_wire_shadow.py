"""Shadow check of the float16 wire during a real training run: its error at every step.

Why: a training run with the float16 wire can only differ from float32 through the
averaged gradients. This runs the README main job (``hpcsgd train``, 2 ranks as
one-rank virtual nodes, so the mean crosses the wire) and wraps the communicator's
``multi_node_mean_grad``: before each call it gathers both ranks' gradients and forms
their float64 mean (the reference); after the call it compares what the wire
returned, parameter by parameter. Recorded per step and parameter: relative L2
error, signed bias along the reference (``<got - ref, ref> / |ref|^2``: negative
means the wire shrinks the gradient), values flushed to zero, non-finite values;
per step: the chunk headers (exponents) of every message, the communicator's
non-finite count, whether the ranks hold the same mean and parameters. Also
recorded: the algorithm class, wire and bucket ranges the communicator built (so a
float32 and a float16 run can be compared for everything but the wire).

    python benchmarks/fp16_wire_shadow.py --set "wire_dtype=float16" \
        --set "communicator_options={half_scaling: chunk, wire_ranks: 4096}" --epochs 1 \
        --out benchmarks/results/fp16_wire_shadow.json

Errors are dimensionless (relative to the float64 mean gradient of the same step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

PERTURB_SEED = int(os.environ.get("HPCSGD_SHADOW_PERTURB_SEED", "0"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "jobs", "configs", "fashion_mnist.yaml")


def _param_stats(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, int, int]:
    """(relative L2 error, signed bias along ref, flushed count, non-finite count); float64 in."""
    d = got - ref
    r2 = float(ref @ ref)
    if r2 == 0:
        return float(np.linalg.norm(d)), 0.0, 0, int((~np.isfinite(got)).sum())
    return (float(np.sqrt(d @ d / r2)), float(d @ ref / r2), int(((got == 0) & (ref != 0)).sum()),
            int((~np.isfinite(got)).sum()))


def install_shadow(log: dict, perturb: float = 0.0) -> None:
    """Wrap ``ReducingCommunicator.multi_node_mean_grad`` and the chunk encoder to fill ``log``."""
    from hpcsgd.comm import fp16_reduce, wire_kernels
    from hpcsgd.comm.packing import select_params
    from hpcsgd.comm.reducing import ReducingCommunicator

    orig_mean = ReducingCommunicator.multi_node_mean_grad
    orig_exp = wire_kernels.half_exponent
    headers: list[int] = []

    def half_exponent(m):
        e = orig_exp(m)
        headers.append(e)
        return e

    fp16_reduce.wire_kernels = _Proxy(wire_kernels, half_exponent=half_exponent)

    def shadow(self, model, zero_fill=False):
        params = select_params(model, zero_fill)
        names = [n for n, _ in params]
        mine = np.concatenate([p.grad.astype(np.float64).ravel() for _, p in params])
        every = self.mpi_comm.allgather(mine)
        ref = np.mean(every, axis=0)
        headers.clear()
        orig_mean(self, model, zero_fill)
        if perturb:  # the control: the same relative noise on every rank (seeded by step)
            rng = np.random.default_rng([PERTURB_SEED, len(log["steps"])])
            for _, p in params:
                p.grad *= (1.0 + perturb * rng.standard_normal(p.grad.shape)).astype(p.grad.dtype)
        got = np.concatenate([p.grad.astype(np.float64).ravel() for _, p in params])
        # every rank must hold the same mean (and, before it, the same parameters)
        weights = np.concatenate([p.array.astype(np.float64).ravel() for _, p in params])
        digests = self.mpi_comm.allgather((hashlib.sha256(got.tobytes()).hexdigest(),
                                           hashlib.sha256(weights.tobytes()).hexdigest()))
        log["rank_mismatch"] = log.get("rank_mismatch", 0) + int(len(set(digests)) != 1)
        if "names" not in log:
            log["names"] = names
            log["sizes"] = [int(p.grad.size) for _, p in params]
            reducer = next(iter(self._reducers.values()))
            alg = reducer.algorithm if hasattr(reducer, "algorithm") else None
            log["algorithm"] = type(alg).__name__ if alg is not None else repr(reducer)
            log["wire"] = getattr(alg, "wire_label", None)
            log["ranges"] = [list(map(int, r)) for r in getattr(alg, "ranges", [])]
        rows, off = [], 0
        for size in log["sizes"]:
            rows.append(_param_stats(got[off:off + size], ref[off:off + size]))
            off += size
        log["steps"].append({"params": rows, "total": _param_stats(got, ref), "headers": list(headers),
                             "nonfinite": int(getattr(self, "nonfinite_count", 0) or 0),
                             "ref_norm": float(np.linalg.norm(ref))})

    ReducingCommunicator.multi_node_mean_grad = shadow


class _Proxy:
    """A module stand-in that overrides some attributes (the rest come from the module)."""

    def __init__(self, module, **over):
        self._module, self._over = module, over

    def __getattr__(self, name):
        return self._over[name] if name in self._over else getattr(self._module, name)


def rank_main(argv: list[str]) -> None:
    """Rank side (under mpiexec): install the shadow, run ``hpcsgd train``, rank 0 writes the log."""
    from mpi4py import MPI

    from hpcsgd.cli import main as cli

    out_json, perturb, train_args = argv[0], float(argv[1]), argv[2:]
    log: dict = {"steps": []}
    install_shadow(log, perturb)
    rc = cli(["train", *train_args])
    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(out_json, "w") as f:
            json.dump(log, f)
    sys.exit(rc)


def summarize(log: dict, summary: dict) -> dict:
    """Per-parameter and per-step aggregates of the shadow log."""
    P = np.array([s["params"] for s in log["steps"]])  # steps x params x 4
    tot = np.array([s["total"] for s in log["steps"]])
    big = np.array(log["sizes"]) >= 1  # every parameter
    q = [0, 25, 117, 233] if len(log["steps"]) > 233 else list(range(0, len(log["steps"]), 50))
    return {
        "algorithm": log.get("algorithm"), "wire": log.get("wire"), "ranges": log.get("ranges"),
        "steps": len(log["steps"]), "params": len(log["names"]),
        "top1": summary.get("top1"), "skipped_steps": summary.get("skipped_steps"),
        "final_loss_mean5": float(np.mean([h["loss"] for h in summary.get("history", [])
                                           if h.get("kind") == "train"][-5:])),
        "loss": [(h["iteration"], h["loss"]) for h in summary.get("history", []) if h.get("kind") == "train"],
        "rel_l2_total": {"median": float(np.median(tot[:, 0])), "max": float(tot[:, 0].max()),
                         "first_10": float(np.median(tot[:10, 0])),
                         "last_10": float(np.median(tot[-10:, 0]))},
        "rel_l2_param_max_over_steps": float(P[:, big, 0].max()),
        "rel_l2_param_median": float(np.median(P[:, big, 0])),
        "worst_param": log["names"][int(np.argmax(P[:, :, 0].max(axis=0)))],
        "bias_total": {"mean": float(tot[:, 1].mean()), "std": float(tot[:, 1].std()),
                       "max_abs": float(np.abs(tot[:, 1]).max())},
        "bias_param_mean_over_steps": {"min": float(P[:, :, 1].mean(axis=0).min()),
                                       "max": float(P[:, :, 1].mean(axis=0).max())},
        "steps_ranks_differ": log.get("rank_mismatch"),  # mean gradient or parameters differ
        "flushed_total": int(P[:, :, 2].sum()), "nonfinite_total": int(P[:, :, 3].sum()),
        "comm_nonfinite": int(sum(s["nonfinite"] for s in log["steps"])),
        "headers_at": {str(i): log["steps"][i]["headers"] for i in q},
        "rel_l2_total_at": {str(i): float(tot[i, 0]) for i in q},
        "ref_norm_at": {str(i): log["steps"][i]["ref_norm"] for i in q},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--set", action="append", default=[], help="extra hpcsgd train --set overrides")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default="benchmarks/results/fp16_wire_shadow.json")
    p.add_argument("--label", default=None, help="key of this run in --out (default: the --set list)")
    p.add_argument("--perturb", type=float, default=0.0,
                   help="control: multiply each mean gradient element by 1 + PERTURB z, z ~ N(0, 1) "
                        "(seeded, the same on every rank): a run that differs from float32 only by "
                        "noise of the float16 wire's size, to tell trajectory divergence from bias")
    p.add_argument("--perturb-seed", type=int, default=0)
    a = p.parse_args(argv)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HPCSGD_RANKS_PER_NODE="1", HPCSGD_SHADOW_PERTURB_SEED=str(a.perturb_seed))
    with tempfile.TemporaryDirectory(prefix="hpcsgd-fp16-shadow-") as tmp:
        raw, run_dir = os.path.join(tmp, "shadow.json"), os.path.join(tmp, "run")
        cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec", "-n", str(a.ranks), sys.executable,
               "-m", "mpi4py", os.path.abspath(__file__), "--rank-side", raw, str(a.perturb), CONFIG,
               "--out", run_dir,
               "--set", f"epochs={a.epochs}", "--set", "checkpoint_interval=0"]
        for s in a.set:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout)
        if proc.returncode != 0:
            raise SystemExit(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(raw) as f:
            log = json.load(f)
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    res = summarize(log, summary)
    res["sets"], res["loadavg"] = a.set, os.getloadavg()
    res["perturb"], res["perturb_seed"], res["epochs"] = a.perturb, a.perturb_seed, a.epochs
    old = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)
    old[a.label or " ".join(a.set) or "default"] = res
    with open(a.out, "w") as f:
        json.dump(old, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k not in ("headers_at", "ranges")}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-side":
        rank_main(sys.argv[2:])
    else:
        main()
